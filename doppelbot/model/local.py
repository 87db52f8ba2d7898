"""Where a configured model's files are: the one answer every command asks before loading.

``DOPPELBOT_MODEL`` and ``DOPPELBOT_EMBEDDER_MODEL`` hold either a local folder or a Hugging Face
hub id. A hub id is never fetched while loading: the bot must start offline, and a missing model
must fail within a second with one line, not after minutes of hub retries ending in a
transformers error that never names the setting. ``doppelbot model download``
(``doppelbot.model.download``) puts the files into ``<data dir>/models/`` and records them in
``models/manifest.json``; ``model_source`` maps the configured name to that folder (or to the
folder the setting names), or raises ``ModelMissingError`` saying what to run.

Pure Python on purpose (no hub or ML imports): the CLI resolves names before any heavy import.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from doppelbot.config import set_library_environment
from doppelbot.core.errors import ModelMissingError

Role = Literal["model", "embedder", "speech"]

MODELS_DIRNAME = "models"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

SETTING = {
    "model": "DOPPELBOT_MODEL",
    "embedder": "DOPPELBOT_EMBEDDER_MODEL",
    "speech": "DOPPELBOT_VOICE_MODEL",
}
WHAT = {"model": "reply model", "embedder": "embedder", "speech": "speech model"}
#: faster-whisper's size names and the hub repositories of its converted models.
_SIZES = "tiny tiny.en base base.en small small.en medium medium.en large-v1 large-v2 large-v3"
WHISPER_SIZES = {size: f"Systran/faster-whisper-{size}" for size in _SIZES.split()}
WHISPER_SIZES["large"] = WHISPER_SIZES["large-v3"]


def speech_repo(name: str) -> str:
    """The hub repository of speech model ``name`` (a faster-whisper size or a hub id)."""
    return WHISPER_SIZES.get(name, name)


# "org/name" or "name" as the hub spells repo ids; anything else is meant as a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

# Set once a name has been resolved: loading from the local folder must never fall back to
# the hub (read by huggingface_hub/transformers when they are imported, which comes later).
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One downloaded file: its size and the digest the hub published for it."""

    size: int
    sha256: str | None = None  # LFS files
    git_sha1: str | None = None  # small files: the git blob id
    mtime_ns: int | None = None  # when it was verified (a changed file is hashed again)

    def as_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "sha256": self.sha256,
            "git_sha1": self.git_sha1,
            "mtime_ns": self.mtime_ns,
        }


@dataclass(frozen=True, slots=True)
class LocalModel:
    """A downloaded model as the manifest records it."""

    repo_id: str
    role: Role
    folder: Path
    revision: str
    files: dict[str, FileRecord] = field(default_factory=dict)
    downloaded_at: int = 0

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())

    def problems(self) -> list[str]:
        """What is wrong on disk (missing or resized files); stat calls only, no hashing."""
        if not self.folder.is_dir():
            return [f"folder {self.folder} is gone"]
        found = []
        for name, record in self.files.items():
            path = self.folder / name
            if not path.is_file():
                found.append(f"{name} is missing")
            elif path.stat().st_size != record.size:
                found.append(f"{name} has {path.stat().st_size} bytes, not {record.size}")
        return found


def models_dir(data_dir: Path) -> Path:
    return data_dir / MODELS_DIRNAME


def folder_name(repo_id: str) -> str:
    """``ai-forever/FRED-T5-1.7B`` → ``ai-forever--FRED-T5-1.7B`` (the hub cache's spelling)."""
    return repo_id.replace("/", "--")


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~"))


def read_manifest(data_dir: Path) -> dict[str, LocalModel]:
    """The downloaded models by hub id (empty when nothing was downloaded)."""
    path = models_dir(data_dir) / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelMissingError(
            f"cannot read {path} ({exc}); run `doppelbot model download` again"
        ) from None
    found: dict[str, LocalModel] = {}
    for repo_id, entry in (raw.get("models") or {}).items():
        try:
            found[repo_id] = LocalModel(
                repo_id=repo_id,
                role=entry["role"],
                folder=models_dir(data_dir) / entry["folder"],
                revision=entry["revision"],
                files={
                    name: FileRecord(
                        size=int(f["size"]),
                        sha256=f.get("sha256"),
                        git_sha1=f.get("git_sha1"),
                        mtime_ns=f.get("mtime_ns"),
                    )
                    for name, f in entry["files"].items()
                },
                downloaded_at=int(entry.get("downloaded_at", 0)),
            )
        except (KeyError, TypeError, ValueError):
            continue  # an entry we cannot read is as good as absent: download it again
    return found


def record(data_dir: Path, model: LocalModel) -> None:
    """Add or replace ``model`` in the manifest (written to a temporary file, then renamed)."""
    folder = models_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = {}
    models = raw.get("models") if isinstance(raw.get("models"), dict) else {}
    models[model.repo_id] = {
        "role": model.role,
        "folder": model.folder.relative_to(folder).as_posix(),
        "revision": model.revision,
        "downloaded_at": model.downloaded_at or int(time.time()),
        "files": {name: rec.as_json() for name, rec in sorted(model.files.items())},
    }
    text = json.dumps({"format": MANIFEST_FORMAT, "models": models}, indent=2, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def force_offline() -> None:
    """From now on this process loads models from local files only."""

    set_library_environment(_OFFLINE_ENV, override=True)


def model_source(name: str, data_dir: Path, role: Role = "model") -> str:
    """The local folder holding model ``name`` (a folder, or a hub id that ``doppelbot model
    download`` fetched); ``ModelMissingError`` — one line naming what to do — otherwise."""
    what, setting = WHAT[role], SETTING[role]
    path = Path(name).expanduser()
    if path.is_dir():
        force_offline()
        return str(path)
    if path.exists():
        raise ModelMissingError(f"cannot load the {what} {name}: it is a file, not a folder")
    if not is_hub_id(name):
        raise ModelMissingError(f"cannot load the {what} {name}: no such folder ({setting})")
    command = "doppelbot model download" + ("" if role == "model" else f" {role}")
    hint = f"run `{command}` (or set {setting} to a folder that holds it)"
    entry = read_manifest(data_dir).get(name)
    if entry is None:
        raise ModelMissingError(f"cannot load the {what} {name}: it is not downloaded; {hint}")
    problems = entry.problems()
    if problems:
        raise ModelMissingError(
            f"cannot load the {what} {name}: the download in {entry.folder} is incomplete "
            f"({problems[0]}); {hint}"
        )
    force_offline()
    return str(entry.folder)

"""``doppelbot model download``: a model from the Hugging Face hub into the data directory.

Why not ``snapshot_download``: huggingface_hub (1.x and later) fetches each file into a
process-unique temporary file and deletes it on failure, so a download killed at 90% of FRED-T5's
weights starts again from zero; it does not compare the bytes with the digests the hub publishes;
and it would fetch every copy of the weights a repository holds (TensorFlow, ONNX, OpenVINO, the
pickled ``.bin`` next to the ``.safetensors``). So:

- the file list with sizes and digests comes from the hub's metadata
  (``HfApi.model_info(files_metadata=True)``), pinned to one commit;
- ``select_files`` keeps what doppelbot loads;
- each file is fetched with huggingface_hub's own ``http_get`` (its retries, redirects, headers
  and Range requests) into ``<folder>/.incomplete/<file>.part``; after a kill or a network
  failure the next run resumes from the bytes already there;
- the bytes are hashed while they arrive (sha256 for LFS files, the git blob sha1 for small
  ones) and compared with the hub's digest; a file that does not match is deleted, never used;
- only then is it renamed into place, and the model is recorded in ``models/manifest.json``
  (``doppelbot.model.local``) once *every* file verified. A file already in the huggingface_hub
  cache is copied from there instead of downloaded.

``HF_ENDPOINT`` (a mirror) and ``HF_TOKEN`` / ``hf auth login`` (gated repositories) work as
everywhere in huggingface_hub.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from doppelbot import __version__
from doppelbot.config import hub_endpoint
from doppelbot.core.errors import ModelDownloadError
from doppelbot.model.local import (
    FileRecord,
    LocalModel,
    Role,
    folder_name,
    models_dir,
    read_manifest,
    record,
)

Progress = Callable[[str, int, int], None]  # (stage, bytes done, bytes total)

DEFAULT_ENDPOINT = "https://huggingface.co"
PARTIAL_DIR = ".incomplete"
SPACE_MARGIN = 256 * 1024**2  # keep this much free after the download

_SKIP_NAMES = {".gitattributes", "training_args.bin"}
_SKIP_SUFFIXES = (
    ".md",
    ".h5",
    ".msgpack",
    ".ot",
    ".onnx",
    ".onnx_data",
    ".tflite",
    ".gguf",
    ".ckpt",
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
)
_SKIP_FOLDERS = ("onnx/", "openvino/", "coreml/", "tflite/", "tf/", "flax/", ".git/")


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True, slots=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files
    git_sha1: str | None  # small files (the git blob id)


@dataclass(frozen=True, slots=True)
class RemoteModel:
    repo_id: str
    revision: str  # the commit every file is fetched from
    files: tuple[RemoteFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(slots=True)
class DownloadReport:
    model: LocalModel
    fetched: list[str] = field(default_factory=list)  # downloaded (or copied) this run
    kept: list[str] = field(default_factory=list)  # already there and verified
    repaired: list[str] = field(default_factory=list)  # were there but did not verify
    bytes_fetched: int = 0
    seconds: float = 0.0


def select_files(names: Iterable[str]) -> list[str]:
    """The files doppelbot loads: configs, tokenizer files, and one copy of the weights
    (safetensors when the repository has them, else the PyTorch ``.bin``)."""
    names = list(names)
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    keep = []
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base in _SKIP_NAMES or name.startswith(_SKIP_FOLDERS):
            continue
        if name.lower().endswith(_SKIP_SUFFIXES):
            continue
        if has_safetensors and base.startswith("pytorch_model") and ".bin" in base:
            continue
        keep.append(name)
    return keep


def endpoint_url(endpoint: str | None = None) -> str:
    """``endpoint``, else ``HF_ENDPOINT``, else huggingface.co."""

    return (endpoint or hub_endpoint() or DEFAULT_ENDPOINT).rstrip("/")


@contextmanager
def _hub_errors(repo_id: str, endpoint: str) -> Iterator[None]:
    """huggingface_hub / HTTP failures → one ``ModelDownloadError`` line."""
    from huggingface_hub import errors as hub_errors

    try:
        yield
    except ModelDownloadError:
        raise
    except hub_errors.OfflineModeIsEnabled:
        raise ModelDownloadError(
            "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set in the environment: unset it for "
            "`doppelbot model download`"
        ) from None
    except hub_errors.GatedRepoError:
        raise ModelDownloadError(
            f"{repo_id} is gated on {endpoint}: accept its terms there and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelDownloadError(
            f"no model {repo_id} on {endpoint} (a typo? private repositories need "
            "`hf auth login` or HF_TOKEN)"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise ModelDownloadError(f"{repo_id} has no such revision on {endpoint}") from None
    except hub_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelDownloadError(f"the hub ({endpoint}) answered {status}: {first}") from None
    except Exception as exc:
        names = {c.__name__ for c in type(exc).__mro__}
        if names & {
            "ConnectError",
            "ConnectionError",
            "TimeoutException",
            "Timeout",
            "NetworkError",
            "TransportError",
            "ProxyError",
            "RemoteProtocolError",
        }:
            raise ModelDownloadError(
                f"cannot reach the Hugging Face hub at {endpoint} ({type(exc).__name__}: "
                f"{exc}); check the network, or set HF_ENDPOINT to a mirror. Run the command "
                "again to continue where it stopped"
            ) from None
        if isinstance(exc, OSError):
            raise ModelDownloadError(
                f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''} — run "
                "the command again to continue where it stopped"
            ) from None
        raise


def fetch_info(repo_id: str, *, revision: str = "main", endpoint: str | None = None) -> RemoteModel:
    """The files to fetch, with sizes and digests, at one commit of ``revision``."""
    from huggingface_hub import HfApi

    url = endpoint_url(endpoint)
    with _hub_errors(repo_id, url):
        info = HfApi(endpoint=url, library_name="doppelbot").model_info(
            repo_id, revision=revision, files_metadata=True
        )
    if not info.sha:
        raise ModelDownloadError(f"the hub ({url}) did not say which commit {repo_id} is at")
    by_name = {s.rfilename: s for s in info.siblings or []}
    files = []
    for name in select_files(by_name):
        sibling = by_name[name]
        lfs = sibling.lfs
        sha256 = getattr(lfs, "sha256", None) if lfs is not None else None
        size = sibling.size if sibling.size is not None else getattr(lfs, "size", None)
        if size is None or (sha256 is None and not sibling.blob_id):
            raise ModelDownloadError(
                f"the hub ({url}) gave no size or checksum for {repo_id}/{name}: cannot verify it"
            )
        files.append(
            RemoteFile(
                name, int(size), sha256, None if sha256 is not None else str(sibling.blob_id)
            )
        )
    if not files:
        raise ModelDownloadError(f"{repo_id} holds no model files doppelbot can load")
    return RemoteModel(repo_id, str(info.sha), tuple(files))


# --- hashing ----------------------------------------------------------------------------------
def _digest(remote: RemoteFile) -> Any:
    if remote.sha256 is not None:
        return hashlib.sha256()
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(b"blob %d\0" % remote.size)  # git hashes the object header, then the bytes
    return digest


def _expected(remote: RemoteFile) -> str:
    return str(remote.sha256 or remote.git_sha1).lower()


def _hash_into(digest: Any, path: Path, stage: str, total: int, progress: Progress) -> int:
    done = 0
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            digest.update(block)
            done += len(block)
            progress(stage, done, total)
    return done


def verify_file(path: Path, remote: RemoteFile, progress: Progress = _no_progress) -> bool:
    """Does the file on disk hold exactly the bytes the hub published?"""
    if not path.is_file() or path.stat().st_size != remote.size:
        return False
    digest = _digest(remote)
    _hash_into(digest, path, f"verifying {remote.path}", remote.size, progress)
    return str(digest.hexdigest()) == _expected(remote)


@dataclass(eq=False)
class _HashingWriter:
    """The file object ``http_get`` writes into: bytes go to the ``.part`` file and into the
    digest, and progress is reported. ``http_get`` rewinds to 0 when a server ignores the Range
    header; the digest then starts over too."""

    _fh: BinaryIO
    _remote: RemoteFile
    done: int
    digest: Any
    _progress: Progress

    def write(self, data: bytes) -> int:
        self._fh.write(data)
        self.digest.update(data)
        self.done += len(data)
        self._progress(self._remote.path, self.done, self._remote.size)
        return len(data)

    def tell(self) -> int:
        return self._fh.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        at = self._fh.tell() if size is None else size
        if at != 0:
            raise OSError(f"cannot resume {self._remote.path} from byte {at}")
        self._fh.truncate(0)
        self.digest = _digest(self._remote)
        self.done = 0
        self._progress(self._remote.path, 0, self._remote.size)
        return 0

    def flush(self) -> None:
        self._fh.flush()


# --- fetching ---------------------------------------------------------------------------------
def _from_hub_cache(repo_id: str, remote: RemoteFile, revision: str) -> Path | None:
    """The file in huggingface_hub's own cache (a model used before with transformers)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, remote.path, revision=revision)
    except Exception:  # the cache is a shortcut; any trouble there means: download
        return None
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    return None


def _fetch(
    model: RemoteModel, remote: RemoteFile, folder: Path, endpoint: str, progress: Progress
) -> int:
    """Fetch one file into ``folder`` (resuming its ``.part``), verify it, move it into place.
    Returns the bytes transferred."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    part = folder / PARTIAL_DIR / f"{remote.path}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if have > remote.size:
        part.unlink()
        have = 0
    digest = _digest(remote)
    if have:  # a resumed file: its first bytes go into the digest once, from disk
        _hash_into(digest, part, remote.path, remote.size, progress)
    cached = None if have else _from_hub_cache(model.repo_id, remote, model.revision)
    moved = 0
    with part.open("ab") as fh:
        writer = _HashingWriter(fh, remote, have, digest, progress)
        if cached is not None:
            with cached.open("rb") as src:
                for block in iter(lambda: src.read(8 << 20), b""):
                    writer.write(block)
        elif have < remote.size:
            url = hf_hub_url(model.repo_id, remote.path, revision=model.revision, endpoint=endpoint)
            headers = build_hf_headers(library_name="doppelbot", library_version=__version__)
            with _hub_errors(model.repo_id, endpoint):
                http_get(
                    url,
                    writer,  # type: ignore[arg-type]
                    resume_size=have,
                    headers=headers,
                    expected_size=remote.size,
                    displayed_filename=remote.path,
                )
            moved = writer.done - have
        got = str(writer.digest.hexdigest())
    if got != _expected(remote) or part.stat().st_size != remote.size:
        part.unlink(missing_ok=True)
        raise ModelDownloadError(
            f"{model.repo_id}/{remote.path} does not match the hub's checksum (got {got[:12]}…, "
            f"expected {_expected(remote)[:12]}…); the broken file was deleted — run "
            "`doppelbot model download` again"
        )
    target = folder / remote.path
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, target)
    return moved


def _check_space(folder: Path, needed: int) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + SPACE_MARGIN > free:
        raise ModelDownloadError(
            f"not enough free space for the download: {human_size(needed)} needed in {folder}, "
            f"{human_size(free)} free"
        )


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _unchanged(record_: FileRecord | None, remote: RemoteFile, path: Path) -> bool:
    """Recorded as verified, with the same digest, and not touched since (size and mtime)."""
    if record_ is None or record_.mtime_ns is None or not path.is_file():
        return False
    stat = path.stat()
    return (
        record_.size == remote.size == stat.st_size
        and record_.mtime_ns == stat.st_mtime_ns
        and (record_.sha256 or record_.git_sha1) == (remote.sha256 or remote.git_sha1)
    )


def download_model(
    repo_id: str,
    data_dir: Path,
    role: Role,
    *,
    revision: str = "main",
    endpoint: str | None = None,
    verify: bool = False,
    progress: Progress = _no_progress,
    plan: RemoteModel | None = None,
) -> DownloadReport:
    """Fetch ``repo_id`` into ``<data_dir>/models/`` and record it; see the module docstring.

    Files already there are kept when the manifest says they verified and they have not
    changed since (``verify`` hashes them anyway); a file that fails verification is fetched
    again and listed in ``repaired``."""
    started = time.monotonic()
    url = endpoint_url(endpoint)
    remote = plan or fetch_info(repo_id, revision=revision, endpoint=url)
    folder = models_dir(data_dir) / folder_name(repo_id)
    known = read_manifest(data_dir).get(repo_id)
    report = DownloadReport(model=LocalModel(repo_id, role, folder, remote.revision))
    records: dict[str, FileRecord] = {}
    todo: list[RemoteFile] = []
    for f in remote.files:
        target = folder / f.path
        previous = known.files.get(f.path) if known is not None else None
        if target.is_file():
            if (not verify and _unchanged(previous, f, target)) or verify_file(target, f, progress):
                records[f.path] = _record(f, target)
                report.kept.append(f.path)
                continue
            report.repaired.append(f.path)
            target.unlink()
        todo.append(f)
    partial = folder / PARTIAL_DIR
    needed = sum(
        f.size - min((partial / f"{f.path}.part").stat().st_size, f.size)
        if (partial / f"{f.path}.part").is_file()
        else f.size
        for f in todo
    )
    try:
        if todo:
            _check_space(folder, needed)
        for f in todo:
            report.bytes_fetched += _fetch(remote, f, folder, url, progress)
            records[f.path] = _record(f, folder / f.path)
            report.fetched.append(f.path)
    except OSError as exc:  # the disk, not the network (that is a ModelDownloadError already)
        raise ModelDownloadError(
            f"cannot write the download into {folder}: {exc.strerror or exc}"
        ) from None
    shutil.rmtree(partial, ignore_errors=True)
    report.model = LocalModel(
        repo_id, role, folder, remote.revision, records, downloaded_at=int(time.time())
    )
    record(data_dir, report.model)
    report.seconds = time.monotonic() - started
    return report


def _record(remote: RemoteFile, path: Path) -> FileRecord:
    return FileRecord(
        size=remote.size,
        sha256=remote.sha256,
        git_sha1=remote.git_sha1,
        mtime_ns=path.stat().st_mtime_ns,
    )

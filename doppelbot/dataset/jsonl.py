"""The dataset's files: JSONL rows ↔ ``domain.Sample``, the dataset folder layout, ``latest``.

The trainer, the evaluator and the builder all go through this module, so the row format (field
names included) is defined exactly once. Files are written to a temporary name and renamed, so a
crash never leaves a half-written dataset that looks complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from doppelbot.core.domain import Role, Sample, Turn
from doppelbot.core.errors import DatasetError, DoppelbotError

TRAIN_FILE = "train.jsonl"
VALIDATION_FILE = "validation.jsonl"
STATS_FILE = "stats.json"
LATEST_FILE = "latest.txt"

# The row's field names; the trainer reads exactly these.
FIELDS = (
    "chat_id",
    "context",
    "reply",
    "reply_date",
    "context_start_date",
    "source_message_ids",
    "reply_message_ids",
    "model_input",
    "model_target",
    "account",
)


def sample_to_row(sample: Sample) -> dict[str, Any]:
    return {
        "chat_id": sample.chat_id,
        "context": [{"role": t.role.value, "text": t.text} for t in sample.context],
        "reply": sample.reply,
        "reply_date": sample.reply_date,
        "context_start_date": sample.context_start_date,
        "source_message_ids": list(sample.source_message_ids),
        "reply_message_ids": list(sample.reply_message_ids),
        "model_input": sample.model_input,
        "model_target": sample.model_target,
        "account": sample.account,
    }


def row_to_sample(row: dict[str, Any]) -> Sample:
    return Sample(
        chat_id=int(row["chat_id"]),
        context=tuple(Turn(Role(t["role"]), str(t["text"])) for t in row["context"]),
        reply=str(row["reply"]),
        reply_date=int(row["reply_date"]),
        context_start_date=int(row["context_start_date"]),
        source_message_ids=tuple(int(i) for i in row["source_message_ids"]),
        reply_message_ids=tuple(int(i) for i in row["reply_message_ids"]),
        model_input=str(row.get("model_input", "")),
        model_target=str(row.get("model_target", "")),
        account=str(row.get("account", "")),
    )


def atomic_write_text(path: Path, chunks: Iterable[str]) -> int:
    """Write ``chunks`` to ``path`` via a temporary file in the same folder; returns chars."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    written = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for chunk in chunks:
                fh.write(chunk)
                written += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return written


def write_samples(path: Path | str, samples: Iterable[Sample]) -> int:
    """Write samples as JSONL (one object per line, UTF-8, atomic). Returns the row count."""
    count = 0

    def lines() -> Iterator[str]:
        nonlocal count
        dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        for sample in samples:
            count += 1
            yield dumps(sample_to_row(sample)) + "\n"

    atomic_write_text(Path(path), lines())
    return count


def iter_json_objects(
    path: Path | str, error: type[DoppelbotError], what: str = "JSONL file"
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream ``(where, object)`` for each non-empty line of a JSONL file.

    ``where`` is ``path:line`` for error messages; an unreadable file, a line that is not JSON
    or not a JSON object raises ``error`` naming the place. Every JSONL reader of the project
    (dataset, feedback, preference pairs) goes through here.
    """
    path = Path(path)
    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc}") from exc
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                raw = json.loads(line)
            except ValueError as exc:
                raise error(f"{where}: not JSON ({exc})") from None
            if not isinstance(raw, dict):
                raise error(f"{where}: expected a JSON object")
            yield where, raw


def read_samples(path: Path | str) -> Iterator[Sample]:
    """Stream the samples of a JSONL file; a malformed line raises ``DatasetError`` naming it."""
    for where, raw in iter_json_objects(path, DatasetError, "dataset file"):
        try:
            yield row_to_sample(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{where}: not a dataset row ({exc})") from exc


def write_jsonl(path: Path | str, rows: Iterable[dict[str, Any]]) -> int:
    """Write plain JSON objects as JSONL (UTF-8, atomic). Returns the row count."""
    count = 0

    def lines() -> Iterator[str]:
        nonlocal count
        for row in rows:
            count += 1
            yield json.dumps(row, ensure_ascii=False) + "\n"

    atomic_write_text(Path(path), lines())
    return count


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, [json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True), "\n"])


# --- dataset folders --------------------------------------------------------------------------
def set_latest(datasets_dir: Path, name: str) -> None:
    """Point ``latest.txt`` at ``datasets_dir / name`` (a plain file: works on every OS)."""
    atomic_write_text(datasets_dir / LATEST_FILE, [name, "\n"])


def latest_dataset_dir(datasets_dir: Path) -> Path:
    """The newest built dataset folder (the one ``latest.txt`` names)."""
    pointer = datasets_dir / LATEST_FILE
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except OSError:
        raise DatasetError(
            f"no dataset found in {datasets_dir}: run `doppelbot dataset` first"
        ) from None
    folder = datasets_dir / name
    if not name or not (folder / TRAIN_FILE).is_file():
        raise DatasetError(f"{pointer} names {name!r}, which holds no {TRAIN_FILE}")
    return folder


def resolve_dataset_dir(datasets_dir: Path, name_or_path: str | Path | None = None) -> Path:
    """A dataset folder from a name under ``datasets_dir``, a path, or ``None`` (= latest)."""
    if name_or_path is None or str(name_or_path) in ("", "latest"):
        return latest_dataset_dir(datasets_dir)
    candidate = Path(name_or_path).expanduser()
    for folder in (candidate, datasets_dir / str(name_or_path)):
        if (folder / TRAIN_FILE).is_file():
            return folder
    raise DatasetError(f"no dataset at {name_or_path} (looked for {TRAIN_FILE})")

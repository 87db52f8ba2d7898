"""Training rows: the dataset's train/validation JSONL and the owner's feedback positives.

The trainer learns ``model_input → model_target`` exactly as the dataset builder wrote them (the
shared prompt module produced both), so training can never drift from serving. Feedback rows
that carry only a context and the owner's chosen text are turned into the same format here, with
the same prompt module. Pure Python: no tokenizer, no torch (token budgets come in as a
callable).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doppelbot.core.domain import Role, Turn
from doppelbot.core.errors import DatasetError, EmptyReplyError, TrainingError
from doppelbot.core.prompt import PromptFormat, decode_reply
from doppelbot.dataset.jsonl import (
    TRAIN_FILE,
    VALIDATION_FILE,
    iter_json_objects,
    read_samples,
    resolve_dataset_dir,
)
from doppelbot.feedback.export import NEGATIVE_KINDS

FEEDBACK_SOURCE = "feedback"
DATASET_SOURCE = "dataset"


@dataclass(frozen=True, slots=True)
class TrainRow:
    """One supervised example as the trainer sees it."""

    model_input: str
    model_target: str
    reply: str
    source: str = DATASET_SOURCE
    context: tuple[Turn, ...] = ()


@dataclass(frozen=True, slots=True)
class DatasetSplits:
    """A dataset folder's two splits plus the hashes that identify their exact content."""

    name: str
    folder: Path
    train: tuple[TrainRow, ...]
    validation: tuple[TrainRow, ...]
    train_hash: str
    validation_hash: str

    @property
    def dataset_hash(self) -> str:
        return hash_strings([self.train_hash, self.validation_hash])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise TrainingError(f"cannot read {path}: {exc}") from exc
    return digest.hexdigest()


def hash_strings(parts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _reply_from_target(target: str) -> str:
    try:
        return decode_reply(target)
    except EmptyReplyError:
        return ""


def read_rows(path: Path) -> list[TrainRow]:
    """A dataset split through the dataset module's reader (its row format is the contract)."""
    rows = []
    for sample in read_samples(path):
        if not sample.model_input or not sample.model_target:
            raise DatasetError(
                f"{path}: a row has no model_input/model_target; rebuild with `doppelbot dataset`"
            )
        rows.append(
            TrainRow(
                model_input=sample.model_input,
                model_target=sample.model_target,
                reply=sample.reply or _reply_from_target(sample.model_target),
                context=sample.context,
            )
        )
    return rows


def load_dataset(datasets_dir: Path, spec: str | Path | None = None) -> DatasetSplits:
    """Both splits of a dataset folder (a name under ``datasets_dir``, a path, or latest)."""
    folder = resolve_dataset_dir(datasets_dir, spec)
    train_path, val_path = folder / TRAIN_FILE, folder / VALIDATION_FILE
    if not val_path.is_file():
        raise DatasetError(f"{folder} has no {VALIDATION_FILE}: rebuild with `doppelbot dataset`")
    return DatasetSplits(
        name=folder.name,
        folder=folder,
        train=tuple(read_rows(train_path)),
        validation=tuple(read_rows(val_path)),
        train_hash=file_sha256(train_path),
        validation_hash=file_sha256(val_path),
    )


# --- feedback positives -----------------------------------------------------------------------
def _turns(raw: Any, where: str) -> tuple[Turn, ...]:
    if not isinstance(raw, list):
        raise TrainingError(f"{where}: 'context' must be a list of {{role, text}}")
    turns = []
    for item in raw:
        try:
            turns.append(Turn(Role(item["role"]), str(item["text"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainingError(f"{where}: bad context turn ({exc})") from None
    return tuple(turns)


def feedback_row(raw: dict[str, Any], prompt: PromptFormat, where: str) -> TrainRow:
    """One feedback JSONL object → a TrainRow.

    Accepted shapes: ``model_input`` + ``model_target`` (used verbatim), or ``context`` +
    ``chosen`` (or ``reply``), rendered with the shared prompt module.
    """
    chosen = raw.get("chosen", raw.get("reply"))
    if raw.get("model_input") and raw.get("model_target"):
        target = str(raw["model_target"])
        reply = str(chosen) if chosen else _reply_from_target(target)
        # No context kept: a verbatim input is never re-rendered (see fit_to_budget).
        return TrainRow(str(raw["model_input"]), target, reply, FEEDBACK_SOURCE)
    if "context" in raw and chosen:
        turns = _turns(raw["context"], where)
        return TrainRow(
            prompt.build_input(turns),
            prompt.build_target(str(chosen)),
            str(chosen),
            FEEDBACK_SOURCE,
            turns,
        )
    raise TrainingError(
        f"{where}: a feedback row needs model_input + model_target, or context + chosen"
    )


def load_feedback(path: Path, prompt: PromptFormat) -> tuple[list[TrainRow], str]:
    """Feedback positives from a JSONL file, and the file's hash.

    Rows of ``doppelbot feedback export``'s negatives (and any row marked as one) carry no
    text to imitate and are skipped.
    """
    rows: list[TrainRow] = []
    for where, raw in iter_json_objects(path, TrainingError, "feedback file"):
        if raw.get("kind") in NEGATIVE_KINDS:
            continue
        rows.append(feedback_row(raw, prompt, where))
    return rows, file_sha256(path)


def fit_to_budget(
    row: TrainRow,
    prompt: PromptFormat,
    count_tokens: Callable[[str], int],
    max_tokens: int,
) -> TrainRow | None:
    """Drop the oldest context turns of a row we rendered ourselves until the input fits.

    Dataset rows already fit (the builder trims them with the same budget); a row with no
    context to trim that is still too long is returned as ``None`` (the caller counts it).
    """
    if count_tokens(row.model_input) <= max_tokens:
        return row
    turns: Sequence[Turn] = row.context
    while len(turns) > 1:
        turns = turns[1:]
        text = prompt.build_input(turns)
        if count_tokens(text) <= max_tokens:
            return TrainRow(text, row.model_target, row.reply, row.source, tuple(turns))
    return None

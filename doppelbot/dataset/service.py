"""``doppelbot dataset`` as a library call: Settings and the owner's flags → a dataset folder.

``build_dataset_files`` does everything the command does but print: the options from Settings
and the flags, the folder name, the FRED-T5 token counter, the schema check, the build, the
files (``train.jsonl``, ``validation.jsonl``, ``stats.json`` under
``<data dir>/datasets/<name>/``) and the ``latest`` pointer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doppelbot.core.errors import DatasetError, ModelLoadError
from doppelbot.dataset import jsonl
from doppelbot.dataset.budget import CountTokens
from doppelbot.dataset.builder import DatasetResult, Progress
from doppelbot.dataset.from_store import build_from_db
from doppelbot.dataset.options import DatasetOptions
from doppelbot.dataset.options import dataset_options as build_options
from doppelbot.dataset.stats import DatasetStats
from doppelbot.model.local import model_source
from doppelbot.model.tokenizer import TokenCounter, load_tokenizer
from doppelbot.store.database import Database

if TYPE_CHECKING:
    from doppelbot.config import Settings

_RESERVED_NAMES = ("", ".", "..", "latest", jsonl.LATEST_FILE)


@dataclass(frozen=True, slots=True)
class DatasetRequest:
    """What the owner asks of one build (the command's flags); ``None``: from Settings."""

    name: str | None = None  # the folder under datasets/ (default: a UTC timestamp)
    include_groups: bool = False
    truncate_long: bool = False
    scrub_pii: bool = True
    scrub_names: bool = False
    validation_share: float | None = None
    max_input_tokens: int | None = None
    session_gap_hours: float | None = None
    context_max_chars: int | None = None
    max_contact_share: float | None = None
    keep_duplicates: bool = False
    voice: bool | None = None
    tokenizer: Path | None = None  # default: the tokenizer of DOPPELBOT_MODEL
    token_budget: bool = True
    workers: int | None = None  # default: ``from_store.default_workers()``
    overwrite: bool = False
    account: str | None = None  # only this own account's chats (default: every account's)


@dataclass(frozen=True, slots=True)
class BuiltDataset:
    folder: Path
    result: DatasetResult
    token_budget: bool  # False: inputs were limited by characters only

    @property
    def stats(self) -> DatasetStats:
        return self.result.stats


class NoSamplesError(DatasetError):
    """The rules left no samples; ``stats`` shows what they dropped."""

    def __init__(self, stats: DatasetStats) -> None:
        super().__init__(
            "the rules left no samples (see the counts above); relax them, e.g. "
            "--truncate-long or --include-groups"
        )
        self.stats = stats


def dataset_options(settings: Settings, request: DatasetRequest) -> DatasetOptions:
    """The build's rules: Settings, with what the request sets instead."""
    overrides: dict[str, Any] = {}
    if request.include_groups:
        overrides["include_groups"] = True
    if request.truncate_long:
        overrides["long_message_policy"] = "truncate"
    if not request.scrub_pii:
        overrides["scrub_pii"] = False
    if request.scrub_names:
        overrides["keep_names"] = False
    if request.validation_share is not None:
        overrides["validation_share"] = request.validation_share
    if request.max_input_tokens is not None:
        overrides["max_input_tokens"] = request.max_input_tokens
    if request.session_gap_hours is not None:
        if request.session_gap_hours <= 0:
            raise DatasetError("--session-gap-hours must be positive")
        overrides["session_gap_hours"] = request.session_gap_hours
    if request.context_max_chars is not None:
        overrides["context_max_chars"] = request.context_max_chars
    if request.max_contact_share is not None:
        overrides["max_contact_share"] = request.max_contact_share
    if request.keep_duplicates:
        overrides["dedup_exact"] = overrides["dedup_near"] = False
    if request.voice is not None:
        overrides["voice_transcripts"] = request.voice
    return build_options(settings, **overrides)


def token_counter(settings: Settings, tokenizer: Path | None) -> CountTokens:
    """The token counter: the ``tokenizer`` folder, else DOPPELBOT_MODEL's (a folder or a
    downloaded hub model); it must be FRED-T5's tokenizer, or the budget would count wrong."""

    skip = "or pass --no-token-budget to skip the token limit"
    try:
        if tokenizer is not None:
            if not tokenizer.expanduser().is_dir():
                raise DatasetError(f"--tokenizer {tokenizer}: no such folder; {skip}")
            source = str(tokenizer.expanduser())
        else:
            source = model_source(settings.model.base, settings.store.data_dir)
        counter: CountTokens = TokenCounter(load_tokenizer(source))
        return counter
    except ModelLoadError as exc:
        raise DatasetError(
            f"{exc}; pass --tokenizer PATH (a folder with FRED-T5's vocab.json and "
            f"merges.txt), {skip}"
        ) from None


def build_dataset_files(
    settings: Settings, request: DatasetRequest, *, progress: Progress | None = None
) -> BuiltDataset:
    """Build the dataset the request asks for from the stored history and write its folder;
    ``NoSamplesError`` (nothing written) when the rules leave no samples."""

    options = dataset_options(settings, request)
    name = request.name or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if "/" in name or name in _RESERVED_NAMES:
        raise DatasetError(f"bad dataset name {name!r}")
    folder = settings.store.datasets_dir / name
    if folder.exists() and any(folder.iterdir()) and not request.overwrite:
        raise DatasetError(f"dataset {folder} already exists: choose another --name or --overwrite")

    counter = token_counter(settings, request.tokenizer) if request.token_budget else None

    async def migrate() -> None:  # the builder reads the tables directly: schema must be current
        db = await Database.open(settings.store.db_path)
        await db.close()

    asyncio.run(migrate())
    result = build_from_db(
        settings.store.db_path,
        options,
        count_tokens=counter,
        progress=progress,
        workers=request.workers,
        account=request.account,
    )
    stats = result.stats
    if not result.train and not result.validation:
        raise NoSamplesError(stats)
    folder.mkdir(parents=True, exist_ok=True)
    jsonl.write_samples(folder / jsonl.TRAIN_FILE, result.train)
    jsonl.write_samples(folder / jsonl.VALIDATION_FILE, result.validation)
    jsonl.write_json(
        folder / jsonl.STATS_FILE,
        {
            "name": name,
            "created_at": int(time.time()),
            "token_budget": counter is not None,
            "options": options.to_dict(),
            "stats": stats.to_dict(),
        },
    )
    jsonl.set_latest(settings.store.datasets_dir, name)
    return BuiltDataset(folder, result, token_budget=counter is not None)

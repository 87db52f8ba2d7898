"""``doppelbot dataset``: build the fine-tuning set from the stored history.

Reads the SQLite history (read-only), applies the dataset rules (``doppelbot.dataset``), counts
tokens with the real FRED-T5 tokenizer (loaded here, lazily: ``--help`` stays torch-free) and
writes ``train.jsonl``, ``validation.jsonl`` and ``stats.json`` under
``<data dir>/datasets/<name>/``, then points ``datasets/latest.txt`` at it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from doppelbot.cli.common import open_db, run_async, state


def _load_counter(settings: Any, tokenizer: Path | None) -> Any:
    """The token counter: the ``--tokenizer`` folder, else DOPPELBOT_MODEL's (a folder or a
    downloaded hub model); it must be FRED-T5's tokenizer, or the budget would count wrong."""
    from doppelbot.errors import DatasetError, ModelLoadError
    from doppelbot.model.local import model_source
    from doppelbot.model.tokenizer import TokenCounter, load_tokenizer

    skip = "or pass --no-token-budget to skip the token limit"
    try:
        if tokenizer is not None:
            if not tokenizer.expanduser().is_dir():
                raise DatasetError(f"--tokenizer {tokenizer}: no such folder; {skip}")
            source = str(tokenizer.expanduser())
        else:
            source = model_source(settings.model.base, settings.store.data_dir)
        return TokenCounter(load_tokenizer(source))
    except ModelLoadError as exc:
        raise DatasetError(
            f"{exc}; pass --tokenizer PATH (a folder with FRED-T5's vocab.json and "
            f"merges.txt), {skip}"
        ) from None


def dataset(
    ctx: typer.Context,
    name: str | None = typer.Option(
        None, "--name", help="Folder name under datasets/ (default: a UTC timestamp)."
    ),
    include_groups: bool = typer.Option(
        False, "--include-groups", help="Also use group chats (default: private chats only)."
    ),
    truncate_long: bool = typer.Option(
        False, "--truncate-long", help="Truncate long messages instead of dropping them."
    ),
    no_scrub: bool = typer.Option(
        False, "--no-scrub", help="Keep phone numbers, emails, cards and URLs as they are."
    ),
    scrub_names: bool = typer.Option(
        False, "--scrub-names", help="Also replace the other person's names with <NAME>."
    ),
    validation_share: float | None = typer.Option(
        None, "--validation-share", help="Share of the most recent samples for validation."
    ),
    max_input_tokens: int | None = typer.Option(
        None, "--max-input-tokens", help="Token budget of a model input (default: settings)."
    ),
    session_gap_hours: float | None = typer.Option(
        None, "--session-gap-hours", help="A longer silence ends a dialogue."
    ),
    context_max_chars: int | None = typer.Option(
        None, "--context-max-chars", help="Context keeps the most recent turns fitting this."
    ),
    max_contact_share: float | None = typer.Option(
        None, "--max-contact-share", help="Largest share of samples one chat may contribute."
    ),
    keep_duplicates: bool = typer.Option(
        False, "--keep-duplicates", help="Do not drop exact and near-duplicate samples."
    ),
    voice: bool | None = typer.Option(
        None,
        "--voice/--no-voice",
        help="Use transcripts of voice and round-video notes as their text "
        "(default: DOPPELBOT_DATASET_VOICE, on).",
    ),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="Tokenizer folder (default: the one of DOPPELBOT_MODEL)."
    ),
    no_token_budget: bool = typer.Option(
        False, "--no-token-budget", help="Skip token counting (inputs limited by characters)."
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        help="Worker processes reading and segmenting chats (default: 2 with 2+ cores, else 1).",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing dataset of the same --name."
    ),
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from doppelbot.dataset import jsonl
    from doppelbot.dataset.builder import build_from_db
    from doppelbot.dataset.options import dataset_options
    from doppelbot.errors import DatasetError

    st = state(ctx)
    settings = st.settings
    overrides: dict[str, Any] = {}
    if include_groups:
        overrides["include_groups"] = True
    if truncate_long:
        overrides["long_message_policy"] = "truncate"
    if no_scrub:
        overrides["scrub_pii"] = False
    if scrub_names:
        overrides["keep_names"] = False
    if validation_share is not None:
        overrides["validation_share"] = validation_share
    if max_input_tokens is not None:
        overrides["max_input_tokens"] = max_input_tokens
    if session_gap_hours is not None:
        if session_gap_hours <= 0:
            raise DatasetError("--session-gap-hours must be positive")
        overrides["session_gap_hours"] = session_gap_hours
    if context_max_chars is not None:
        overrides["context_max_chars"] = context_max_chars
    if max_contact_share is not None:
        overrides["max_contact_share"] = max_contact_share
    if keep_duplicates:
        overrides["dedup_exact"] = overrides["dedup_near"] = False
    if voice is not None:
        overrides["voice_transcripts"] = voice
    options = dataset_options(settings, **overrides)

    folder_name = name or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if "/" in folder_name or folder_name in ("", ".", "..", "latest", "latest.txt"):
        raise DatasetError(f"bad dataset name {folder_name!r}")
    target = settings.store.datasets_dir / folder_name
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise DatasetError(f"dataset {target} already exists: choose another --name or --overwrite")

    counter = None if no_token_budget else _load_counter(settings, tokenizer)

    async def migrate() -> None:  # the schema must be current before reading it directly
        async with open_db(settings):
            pass

    run_async(migrate())

    console = st.console
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=st.err_console,
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                label = {"chats": "reading chats", "tokens": "counting tokens"}.get(stage, stage)
                tasks[stage] = bar.add_task(label, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        result = build_from_db(
            settings.store.db_path,
            options,
            count_tokens=counter,
            progress=progress,
            workers=workers,
        )

    stats = result.stats
    if not result.train and not result.validation:
        for table in stats.rich_tables():
            console.print(table)
        raise DatasetError(
            "the rules left no samples (see the counts above); relax them, e.g. "
            "--truncate-long or --include-groups"
        )
    target.mkdir(parents=True, exist_ok=True)
    jsonl.write_samples(target / jsonl.TRAIN_FILE, result.train)
    jsonl.write_samples(target / jsonl.VALIDATION_FILE, result.validation)
    jsonl.write_json(
        target / jsonl.STATS_FILE,
        {
            "name": folder_name,
            "created_at": int(time.time()),
            "token_budget": counter is not None,
            "options": options.to_dict(),
            "stats": stats.to_dict(),
        },
    )
    jsonl.set_latest(settings.store.datasets_dir, folder_name)
    for table in stats.rich_tables():
        console.print(table)
    console.print(
        f"wrote {stats.train} training and {stats.validation} validation samples to {target}"
    )
    if counter is None:
        console.print("[yellow]token budget skipped (--no-token-budget)[/yellow]")

"""``doppelbot dataset``: build the fine-tuning set from the stored history.

Parses the flags, makes one call into ``doppelbot.dataset.service`` (which reads the history,
applies the rules, counts tokens with the real FRED-T5 tokenizer and writes the dataset folder)
and prints its stats. The tokenizer loads lazily there: ``--help`` stays torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from doppelbot.cli.common import bars, state
from doppelbot.dataset.service import DatasetRequest, NoSamplesError, build_dataset_files

if TYPE_CHECKING:
    from rich.console import Console

    from doppelbot.dataset.stats import DatasetStats


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
    account: str | None = typer.Option(
        None,
        "--account",
        metavar="NAME",
        help="Only this own account's chats (default: every account's; see `doppelbot accounts`).",
    ),
) -> None:
    st = state(ctx)
    chosen = st.use_account(account)
    settings = st.settings
    request = DatasetRequest(
        name=name,
        include_groups=include_groups,
        truncate_long=truncate_long,
        scrub_pii=not no_scrub,
        scrub_names=scrub_names,
        validation_share=validation_share,
        max_input_tokens=max_input_tokens,
        session_gap_hours=session_gap_hours,
        context_max_chars=context_max_chars,
        max_contact_share=max_contact_share,
        keep_duplicates=keep_duplicates,
        voice=voice,
        tokenizer=tokenizer,
        token_budget=not no_token_budget,
        workers=workers,
        overwrite=overwrite,
        account=chosen,
    )
    console = st.console
    try:
        with _progress_bar(st.err_console) as progress:
            built = build_dataset_files(settings, request, progress=progress)
    except NoSamplesError as exc:
        _print_stats(console, exc.stats)
        raise
    stats = built.stats
    _print_stats(console, stats)
    console.print(
        f"wrote {stats.train} training and {stats.validation} validation samples to {built.folder}"
    )
    if not built.token_budget:
        console.print("[yellow]token budget skipped (--no-token-budget)[/yellow]")


@contextmanager
def _progress_bar(console: Console) -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(stage, done, total)`` callback drawing one bar per stage, shown from the
    first call on (the build, not the loading before it) and cleared at the end."""

    bar = bars(console, transient=True)
    tasks: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()
        if stage not in tasks:
            label = {"chats": "reading chats", "tokens": "counting tokens"}.get(stage, stage)
            tasks[stage] = bar.add_task(label, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    try:
        yield progress
    finally:
        if tasks:
            bar.stop()


def _print_stats(console: Console, stats: DatasetStats) -> None:
    for table in stats.rich_tables():
        console.print(table)

"""``doppelbot feedback``: owner feedback as training data (export) and a summary (stats)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table

from doppelbot.cli.common import open_db, run_async, state
from doppelbot.dataset.jsonl import write_jsonl
from doppelbot.feedback.export import build_feedback
from doppelbot.store.feedback import feedback_replies

app = typer.Typer(no_args_is_help=True)


async def _collect(ctx: typer.Context):  # type: ignore[no-untyped-def]

    settings = state(ctx).settings
    async with open_db(settings) as db:
        replies = await feedback_replies(db)
    return build_feedback(
        replies,
        positive_emoji=settings.review.positive_reactions,
        negative_emoji=settings.review.negative_reactions,
    )


@app.command("export", help="Write positives, preference pairs and negatives as JSONL.")
def export(
    ctx: typer.Context,
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default: DATA_DIR/feedback/<timestamp>)."
    ),
) -> None:
    st = state(ctx)
    result = run_async(_collect(ctx))
    folder = out or st.settings.store.data_dir / "feedback" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)

    write_jsonl(folder / "positives.jsonl", result.positives)
    write_jsonl(folder / "pairs.jsonl", result.pairs)
    write_jsonl(folder / "negatives.jsonl", result.negatives)
    latest = st.settings.store.data_dir / "feedback" / "latest.txt"
    latest.parent.mkdir(parents=True, exist_ok=True)
    latest.write_text(str(folder.resolve()) + "\n", encoding="utf-8")
    st.console.print(
        f"wrote {len(result.positives)} positives, {len(result.pairs)} preference pairs, "
        f"{len(result.negatives)} negatives to {folder}"
    )


@app.command("stats", help="Summarise verdicts, reactions, positives and preference pairs.")
def stats(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    st = state(ctx)
    counts = run_async(_collect(ctx)).counts()
    if as_json:
        st.console.print_json(json.dumps(counts))
        return
    table = Table(title="Feedback")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, value in counts.items():
        table.add_row(key, str(value))
    st.console.print(table)

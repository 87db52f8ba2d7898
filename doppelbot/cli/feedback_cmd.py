"""``doppelbot feedback``: owner feedback as training data."""

from __future__ import annotations

import typer

from doppelbot.cli.common import not_available, state

app = typer.Typer(no_args_is_help=True)


@app.command("export", help="Write positives and preference pairs as JSONL.")
def export(ctx: typer.Context) -> None:
    state(ctx)
    not_available("feedback export")


@app.command("stats", help="Summarise verdicts, reactions and corrections.")
def stats(ctx: typer.Context) -> None:
    state(ctx)
    not_available("feedback stats")

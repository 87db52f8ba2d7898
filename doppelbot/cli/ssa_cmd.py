"""``doppelbot ssa``: Sensibleness and Specificity Average with the owner's labels."""

from __future__ import annotations

import typer

from doppelbot.cli.common import not_available, state

app = typer.Typer(no_args_is_help=True)


@app.command("start", help="Post labelling cards for N validation contexts to Saved Messages.")
def start(ctx: typer.Context) -> None:
    state(ctx)
    not_available("ssa start")


@app.command("report", help="Print sensibleness, specificity and SSA with 95% intervals.")
def report(ctx: typer.Context) -> None:
    state(ctx)
    not_available("ssa report")

"""``doppelbot model``: inspect the reply model (what int8 quantisation costs)."""

from __future__ import annotations

import typer

from doppelbot.cli.common import not_available, state

app = typer.Typer(no_args_is_help=True)


@app.command("check", help="Compare the int8 model with fp32 on samples of your dataset.")
def check(ctx: typer.Context) -> None:
    state(ctx)
    not_available("model check")

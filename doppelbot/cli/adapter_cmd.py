"""``doppelbot adapter``: choose (and roll back) the adapter the bot serves."""

from __future__ import annotations

from pathlib import Path

import typer

from doppelbot.cli.common import not_available, state

app = typer.Typer(no_args_is_help=True)


@app.command("use", help="Serve this adapter if its held-out loss is not worse (or --force).")
def use(ctx: typer.Context, adapter: Path = typer.Argument(..., help="Adapter folder.")) -> None:
    state(ctx)
    not_available("adapter use")

"""``doppelbot run`` (the userbot) and ``doppelbot status``."""

from __future__ import annotations

import typer

from doppelbot.cli.common import not_available, state


def run(ctx: typer.Context) -> None:
    state(ctx)
    not_available("run")


def status(ctx: typer.Context) -> None:
    state(ctx)
    not_available("status")

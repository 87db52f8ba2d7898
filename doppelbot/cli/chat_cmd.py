"""``doppelbot chat``: talk to the doppelganger in the terminal."""

from __future__ import annotations

import typer

from doppelbot.cli.common import not_available, state


def chat(ctx: typer.Context) -> None:
    state(ctx)
    not_available("chat")

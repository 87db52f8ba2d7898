"""``doppelbot login``, ``export`` and ``import``: getting the owner's history into SQLite."""

from __future__ import annotations

from pathlib import Path

import typer

from doppelbot.cli.common import not_available, state


def login(
    ctx: typer.Context,
    print_session_string: bool = typer.Option(
        False, "--print-session-string", help="After login, print a StringSession for containers."
    ),
) -> None:
    state(ctx)
    not_available("login")


def export(ctx: typer.Context) -> None:
    state(ctx)
    not_available("export")


def import_desktop(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="Telegram Desktop export: result.json or its folder."),
) -> None:
    state(ctx)
    not_available("import")

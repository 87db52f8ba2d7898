"""``doppelbot db`` (schema migrations) and ``doppelbot config`` (effective settings)."""

from __future__ import annotations

import datetime as dt

import typer
from rich.table import Table

from doppelbot.cli.common import run_async, state
from doppelbot.config import setting_items
from doppelbot.store.database import Database

app = typer.Typer(no_args_is_help=True)
config_app = typer.Typer(no_args_is_help=True)


@app.command("migrate", help="Apply pending schema migrations (also done on every open).")
def migrate(
    ctx: typer.Context,
    to: int | None = typer.Option(None, "--to", help="Stop at this migration number."),
) -> None:
    st = state(ctx)

    async def go() -> None:
        db = await Database.open(st.settings.store.db_path, migrate=False)
        try:
            applied = await db.migrate(target=to)
            status = await db.migration_status()
        finally:
            await db.close()
        for m in applied:
            st.console.print(f"applied {m.version:04d}_{m.name}")
        st.console.print(
            f"database {st.settings.store.db_path} at level {status.current:04d}"
            + (f", {len(status.pending)} pending" if status.pending else ", up to date")
        )

    run_async(go())


@app.command("status", help="Show applied and pending migrations.")
def status(ctx: typer.Context) -> None:
    st = state(ctx)

    async def go() -> None:
        db = await Database.open(st.settings.store.db_path, migrate=False)
        try:
            s = await db.migration_status()
        finally:
            await db.close()
        table = Table(title=f"Migrations — {st.settings.store.db_path}")
        table.add_column("#", justify="right")
        table.add_column("name")
        table.add_column("applied")
        for version, name, at in s.applied:
            when = dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
            table.add_row(f"{version:04d}", name, when)
        for m in s.pending:
            table.add_row(f"{m.version:04d}", m.name, "[yellow]pending[/]")
        st.console.print(table)

    run_async(go())


@config_app.command("show", help="Print every setting's effective value (secrets masked).")
def show(ctx: typer.Context) -> None:
    st = state(ctx)
    settings = st.settings
    table = Table(title="Effective settings")
    table.add_column("variable")
    table.add_column("value")

    for setting, value in setting_items(settings):
        text = "" if value is None else str(list(value) if isinstance(value, tuple) else value)
        if setting.key in {"api_hash", "session_string"} and value is not None:
            text = "********"
        table.add_row(setting.env, text)
    st.console.print(table)

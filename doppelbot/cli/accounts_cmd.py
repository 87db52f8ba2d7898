"""``doppelbot accounts``: the owner's own Telegram accounts, what each holds, which one runs."""

from __future__ import annotations

import datetime as dt

import typer
from rich.table import Table

from doppelbot.accounts import AccountInfo, list_accounts
from doppelbot.cli.common import open_db, run_async, state


def _when(ts: int | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def accounts(ctx: typer.Context) -> None:
    """List every own account: Telegram user, messages, chats, last export, session, running."""

    st = state(ctx)
    settings = st.base_settings

    async def go() -> list[AccountInfo]:
        async with open_db(settings) as db:
            return await list_accounts(db, settings)

    rows = run_async(go())
    table = Table(title="Own accounts", title_justify="left")
    for col in (
        "account",
        "Telegram user",
        "messages",
        "chats",
        "last export",
        "session",
        "running",
    ):
        table.add_column(col, justify="right" if col in ("messages", "chats") else "left")
    for info in rows:
        table.add_row(
            info.account.name,
            info.account.describe_user(),
            str(info.messages),
            str(info.chats),
            _when(info.last_export_at),
            "yes" if info.has_session else "-",
            f"pid {info.running.pid} ({info.running.command})" if info.running else "-",
        )
    st.console.print(table)
    if settings.telegram.session_string is not None:
        st.console.print(
            "DOPPELBOT_SESSION_STRING is set: it is the session of whichever account a command "
            "runs as (--account)."
        )

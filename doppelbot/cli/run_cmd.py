"""``doppelbot run`` (the userbot) and ``doppelbot status``.

``run`` is ``doppelbot.app.serve``: the instance lock, the workers, the connection and the
running bot until SIGINT/SIGTERM, stopped in order so a reply cut short stays recorded and the
next start resumes it. It exits non-zero when Telegram stays unreachable past the watchdog's
limit, so a supervisor restarts it. ``status`` reads only the database (and who holds the
lock): it works while the bot runs, ``--pause``/``--resume`` flip the kill switch the running
bot reads before every reply, and ``--health`` exits non-zero unless the bot runs and is
healthy. Both work on one own account (``--account``): each account's bot has its own lock,
pause switch, health and replies, and two of them run side by side.

Heavy modules (telethon, torch) are imported inside the functions only.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from doppelbot.cli.common import AccountOpt, open_db, run_async, state
from doppelbot.core.domain import ReplyStatus
from doppelbot.health import Health, verdict
from doppelbot.health import when as when_ts
from doppelbot.instance import holder_of
from doppelbot.store import bot_state, replies
from doppelbot.store.database import now

if TYPE_CHECKING:
    from doppelbot.config import Settings


def run(ctx: typer.Context, account: AccountOpt = None) -> None:
    """Answer incoming private messages in your voice until Ctrl+C / SIGTERM.

    One process per account: with --account NAME it answers that account's chats (run one
    process per account to answer on several)."""
    from doppelbot.app import serve

    st = state(ctx)
    name = st.use_account(account)
    run_async(serve(st.settings, st.err_console, account=name))


# --- status -------------------------------------------------------------------------------------
def status(
    ctx: typer.Context,
    pause: bool = typer.Option(
        False, "--pause", help="Turn the kill switch on: the bot (even a running one) stays silent."
    ),
    resume: bool = typer.Option(False, "--resume", help="Turn the kill switch off again."),
    last: int = typer.Option(10, "--last", min=0, help="How many recent replies to list."),
    texts: bool = typer.Option(
        False, "--texts", help="Also show reply texts (private: off by default)."
    ),
    health: bool = typer.Option(
        False,
        "--health",
        help="Only check health: one line, exit 0 when `doppelbot run` runs and is healthy, "
        "1 otherwise (a Docker healthcheck).",
    ),
    account: AccountOpt = None,
) -> None:
    """Health, pause state, reply counts, deferred and last replies (reads the database)."""
    st = state(ctx)
    name = st.use_account(account)
    settings = st.settings
    if pause and resume:
        raise typer.BadParameter("--pause and --resume exclude each other")
    if health:
        healthy, line = run_async(_health(settings, name))
        st.console.print(f"{'healthy' if healthy else 'unhealthy'}: {line}", markup=False)
        raise typer.Exit(0 if healthy else 1)
    run_async(
        _status(settings, st.console, name, pause=pause, resume=resume, last=last, texts=texts)
    )


async def _health(settings: Settings, account: str | None = None) -> tuple[bool, str]:
    holder = holder_of(settings.lock_path)
    if not settings.store.db_path.exists():
        return False, "not running: no database yet"
    async with open_db(settings, account) as db:
        record = Health.from_json(await bot_state.get_json(db, bot_state.HEALTH_KEY))
    return verdict(record, holder, time.time())


def _when(ts: int | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


async def _status(
    settings: Settings,
    console: Console,
    account: str | None = None,
    *,
    pause: bool,
    resume: bool,
    last: int,
    texts: bool,
) -> None:
    holder = holder_of(settings.lock_path)
    async with open_db(settings, account) as db:
        if pause or resume:
            await bot_state.set_paused(db, pause)
        paused = await bot_state.is_paused(db)
        since = await bot_state.paused_since(db)
        runtime_mode = await bot_state.global_reply_mode(db)
        counts = await replies.count_by_status(db)
        hour_ago = now() - 3600
        sent_hour = await replies.count_recent_sends(db, hour_ago)
        recent = await replies.last_replies(db, last)
        deferred = await replies.deferred_replies(db)
        health = Health.from_json(await bot_state.get_json(db, bot_state.HEALTH_KEY))
        catch_up = await bot_state.get_json(db, bot_state.CATCH_UP_KEY)

    healthy, line = verdict(health, holder, now())
    colour = "green" if healthy else ("yellow" if holder else "red")
    console.print(f"Health: [bold {colour}]{'healthy' if healthy else 'unhealthy'}[/] — {line}")
    if health is not None:
        console.print(
            f"Started {when_ts(health.started_at)} (pid {health.pid}) · last update received "
            f"{when_ts(health.last_update_at)} · last heartbeat {when_ts(health.heartbeat_at)}"
            f" · reconnects {health.reconnects}"
        )
    if catch_up:
        answered = catch_up.get("answered", 0)
        old = sum(v for k, v in catch_up.items() if k.startswith("not_answered"))
        reasons = ", ".join(
            f"{k.removeprefix('not_answered:')} {v}"
            for k, v in sorted(catch_up.items())
            if k.startswith("not_answered")
        )
        console.print(
            f"Last catch-up {when_ts(catch_up.get('at'))}: "
            f"{catch_up.get('messages_stored', 0)} message(s) stored from "
            f"{catch_up.get('chats_synced', 0)} chat(s), {answered} chat(s) answered, "
            f"{old} stored only" + (f" ({reasons})" if reasons else "")
        )

    named = f" --account {account}" if account else ""
    state_line = (
        f"[bold red]PAUSED[/] since {_when(since)} (resume: doppelbot status{named} --resume)"
        if paused
        else "[bold green]active[/]"
    )
    if account:
        console.print(f"Account: {account}")
    console.print(f"Bot: {state_line}")
    quiet = settings.responder.quiet_hours or "off"
    mode = (
        f"{runtime_mode.value} (set by /mode in Saved Messages)"
        if runtime_mode
        else settings.responder.reply_mode
    )
    console.print(
        f"Mode: {mode} · debounce {settings.responder.debounce_s:g}s · quiet hours {quiet}"
        f" · takeover {settings.responder.takeover_minutes:g} min"
    )
    console.print(
        f"Sent in the last hour: {sent_hour} (global cap {settings.responder.global_hourly_cap}, "
        f"per chat {settings.responder.per_chat_hourly_cap})"
    )
    summary = " · ".join(f"{s.value} {counts[s]}" for s in ReplyStatus if counts[s])
    console.print(f"Replies: {summary or 'none yet'}")
    if deferred:
        table = Table(title=f"Deferred replies ({len(deferred)})", title_justify="left")
        for col in ("id", "chat", "why", "tries again at"):
            table.add_column(col, justify="right" if col == "id" else "left")
        for row in deferred:
            r = row.reply
            table.add_row(
                str(r.reply_id), row.chat_name or str(r.chat_id), r.error or "", _when(r.not_before)
            )
        console.print(table)
    if not recent:
        return
    table = Table(title=f"Last {len(recent)} replies", title_justify="left")
    for col in ("id", "when", "chat", "status", "mode", "gen ms", "note"):
        table.add_column(col, justify="right" if col in ("id", "gen ms") else "left")
    if texts:
        table.add_column("text")
    for row in recent:
        r = row.reply
        note = r.error or (f"{len(r.sent_message_ids)} msg" if r.sent_message_ids else "")
        cells = [
            str(r.reply_id),
            _when(r.sent_at or r.updated_at),
            row.chat_name or str(r.chat_id),
            r.status.value,
            r.mode.value,
            str(row.generation_ms) if row.generation_ms is not None else "-",
            note,
        ]
        if texts:
            cells.append(r.final_text or r.draft_text or "")
        table.add_row(*cells)
    console.print(table)

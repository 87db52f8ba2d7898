"""``doppelbot login``, ``export`` and ``import``: getting the owner's history into SQLite.

Each command parses its options, calls the library and prints what came back. Telethon (and
the settings) are imported inside the command bodies only, so ``doppelbot --help`` stays light.
The Rich progress displays live here because drawing is the CLI's job: the exporter and the
importer only report events to a progress sink.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import (
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from doppelbot.accounts import register_login
from doppelbot.cli.common import AccountOpt, RichBars, open_db, run_async, state
from doppelbot.cli.voice_cmd import export_notes, print_report
from doppelbot.core.domain import Account
from doppelbot.core.errors import ExportIncompleteError
from doppelbot.importers.desktop import ImportOptions, ImportResult, import_desktop_export
from doppelbot.telegram.export_types import ChatReport, ExportReport, export_options

if TYPE_CHECKING:
    from doppelbot.config import Settings
    from doppelbot.telegram.login import LoginResult
    from doppelbot.voice import VoiceReport


def login(
    ctx: typer.Context,
    print_session_string: bool = typer.Option(
        False,
        "--print-session-string",
        help="Log in into a fresh StringSession and print it (for DOPPELBOT_SESSION_STRING in "
        "containers) instead of writing the session file. Treat the string like a password.",
    ),
    account: AccountOpt = None,
) -> None:
    """Interactive login: phone, the code Telegram sends, and the 2FA password if set.

    With --account NAME, logs in another of your Telegram accounts under that name (its own
    session; export, import and run take the same --account)."""
    st = state(ctx)
    name = st.use_account(account)
    settings = st.settings
    from doppelbot.telegram.login import LoginPrompts, login_interactive

    err = st.err_console

    async def ask(text: str, hide: bool = False) -> str:
        # Prompts run in a thread so the client's network tasks keep running meanwhile.
        return await asyncio.to_thread(typer.prompt, text, hide_input=hide, err=True)

    prompts = LoginPrompts(
        phone=lambda: settings.telegram.phone or ask("Phone number (international format, +…)"),
        code=lambda: ask("Login code Telegram sent you"),
        password=lambda: ask("Two-step verification password", hide=True),
        notice=lambda text: err.print(text),
    )

    async def check(who: Account, already: bool) -> None:
        # Refused when this Telegram user is already another own account: a fresh login is
        # then logged out again before anything is kept.
        async with open_db(settings) as db:
            await register_login(db, name, who)

    async def go() -> LoginResult:
        return await login_interactive(
            settings, prompts, print_session_string=print_session_string, check=check
        )

    _print_login(st.err_console, settings, run_async(go()), name)


def _print_login(
    err: Console, settings: Settings, result: LoginResult, account: str | None = None
) -> None:
    who = result.account.first_name or ""
    if result.account.username:
        who += f" (@{result.account.username})"
    verb = "Already logged in" if result.already else "Logged in"
    where = (
        "string session"
        if result.session_string is not None or settings.telegram.session_string is not None
        else f"session file {settings.session_path} (mode 0600)"
    )
    named = f" (account {account!r})" if account else ""
    err.print(f"{verb} as {who.strip() or result.account.user_id}{named}; {where}.")
    if result.session_string is not None:
        err.print(
            "Put the next line into DOPPELBOT_SESSION_STRING (it grants full access to your "
            "account: keep it secret):"
        )
        # stdout carries only the string, so `... > file` captures exactly it.
        typer.echo(result.session_string)


def _parse_date(value: str | None) -> int | None:
    if not value:
        return None
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date like 2023-01-31") from None
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())


class RichExportProgress(RichBars):
    """Per-chat and overall progress bars, FloodWait countdowns and notes."""

    def __init__(self, console: Console) -> None:
        super().__init__(console, TextColumn("{task.fields[extra]}"), TimeElapsedColumn())
        self.overall: TaskID | None = None
        self.tasks: dict[int, TaskID] = {}

    def start(self, chats: int) -> None:
        self.overall = self.progress.add_task("[bold]all chats", total=chats, extra="")

    def chat_started(self, chat_id: int, name: str, stored: int, total: int | None) -> None:
        short = name if len(name) <= 28 else name[:27] + "…"
        self.tasks[chat_id] = self.progress.add_task(
            f"  {short}", total=total, completed=stored, extra=""
        )

    def chat_advanced(self, chat_id: int, stored: int, total: int | None) -> None:
        task = self.tasks.get(chat_id)
        if task is not None:
            self.progress.update(task, completed=stored, total=total, extra="")

    def waiting(self, chat_id: int, remaining_s: int) -> None:
        task = self.tasks.get(chat_id)
        if task is not None:
            extra = f"[yellow]FloodWait: {remaining_s}s[/]" if remaining_s else ""
            self.progress.update(task, extra=extra)

    def chat_finished(self, report: ChatReport) -> None:
        task = self.tasks.pop(report.chat_id, None)
        if task is not None:
            self.progress.update(
                task,
                completed=report.stored,
                total=report.server_total or report.stored,
                extra=str(report.status),
            )
            self.progress.remove_task(task)
        if self.overall is not None:
            self.progress.advance(self.overall)


def _summary(report: ExportReport) -> Table:
    table = Table(title="Export summary")
    table.add_column("chat")
    table.add_column("id", justify="right")
    table.add_column("kind")
    table.add_column("new", justify="right")
    table.add_column("re-read", justify="right")
    table.add_column("stored", justify="right")
    table.add_column("on server", justify="right")
    table.add_column("status")
    for c in report.chats:
        colour = "red" if c.stopped else "yellow" if c.note else "green"
        table.add_row(
            c.name,
            str(c.chat_id),
            str(c.kind),
            str(c.fetched),
            str(c.refreshed),
            str(c.stored),
            "?" if c.server_total is None else str(c.server_total),
            f"[{colour}]{c.status}[/]" + (f" — {c.note}" if c.note else ""),
        )
    return table


def export(
    ctx: typer.Context,
    groups: bool = typer.Option(
        False, "--groups", help="Also export groups and supergroups (default: private chats only)."
    ),
    channels: bool = typer.Option(False, "--channels", help="Also export broadcast channels."),
    saved: bool = typer.Option(False, "--saved", help="Also export your Saved Messages."),
    chat: list[str] = typer.Option(
        [],
        "--chat",
        "-c",
        help="Only this chat: a numeric id (as Telethon marks it) or @username. Repeatable. "
        "A listed chat is exported whatever its kind.",
    ),
    since: str | None = typer.Option(
        None, "--since", help="Date floor YYYY-MM-DD (UTC): older messages are not fetched."
    ),
    replied_only: bool = typer.Option(
        False,
        "--replied-only",
        help="Only chats where you have written yourself (a read message of yours, your last "
        "message, or one already stored).",
    ),
    takeout: bool | None = typer.Option(
        None,
        "--takeout/--no-takeout",
        help="Use a takeout session (lower flood limits; Telegram may ask you to confirm it in "
        "an official app). Default: DOPPELBOT_EXPORT_USE_TAKEOUT.",
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Messages per transaction (DOPPELBOT_EXPORT_BATCH_SIZE)."
    ),
    refetch_recent: int | None = typer.Option(
        None,
        "--refetch-recent",
        min=0,
        help="Newest messages per chat fetched again on re-runs to pick up edits "
        "(DOPPELBOT_EXPORT_REFETCH_RECENT).",
    ),
    voice: bool = typer.Option(
        False,
        "--voice",
        help="Then download and transcribe the voice and round-video notes of the exported "
        "private chats (both directions; resumable; bounded by DOPPELBOT_VOICE_HISTORY_*).",
    ),
    account: AccountOpt = None,
) -> None:
    """Export your chats over MTProto into the database.

    Incremental and resumable: re-running fetches only new messages (plus the newest few again,
    for edits) and continues older history where an interrupted run stopped. FloodWait is
    waited out up to DOPPELBOT_FLOOD_WAIT_MAX_S with a countdown (and up to
    DOPPELBOT_FLOOD_WAIT_TOTAL_S per run in all); a longer wait stops that chat and keeps what
    it has. Exits with 1 when a chat failed or stopped.
    """
    st = state(ctx)
    name = st.use_account(account)
    settings = st.settings
    floor = _parse_date(since)
    from doppelbot.telegram.client import connected
    from doppelbot.telegram.export import Exporter

    options = export_options(
        settings,
        include_groups=groups,
        include_channels=channels,
        include_saved=saved,
        chats=tuple(chat),
        since=floor,
        replied_only=replied_only,
        use_takeout=takeout,
        batch_size=batch_size,
        refetch_recent=refetch_recent,
    )
    console = st.err_console

    async def go() -> tuple[ExportReport, VoiceReport | None]:
        async with (
            open_db(settings, name, "session") as db,
            connected(settings, receive_updates=False) as client,
        ):
            with RichExportProgress(console) as progress:
                report = await Exporter(client, db, options, progress=progress).run()
            notes = None
            if voice:
                # The voice notes of the chats just exported, on the same connection.
                chat_ids = report.private_chat_ids
                notes = await export_notes(settings, client, db, chat_ids, console)
            return report, notes

    report, voice_report = run_async(go())
    _print_export(st.console, console, report)
    if report.incomplete:
        raise ExportIncompleteError(
            f"{len(report.incomplete)} of {len(report.chats)} chat(s) failed or stopped (see "
            "the summary); what was fetched is kept — run `doppelbot export` again later to "
            "continue where they stopped"
        )
    if voice_report is not None:
        print_report(st.console, voice_report)


def _print_export(out: Console, err: Console, report: ExportReport) -> None:
    for note in report.notes:
        err.print(f"[yellow]note:[/] {note}")
    out.print(_summary(report))
    skipped = ", ".join(f"{n} {what}" for what, n in sorted(report.skipped.items()))
    out.print(
        f"{report.fetched} new messages from {len(report.chats)} chats in {report.seconds:.1f}s"
        + (" (takeout)" if report.used_takeout else " (normal API, paced)")
        + (f"; skipped: {skipped}" if skipped else "")
    )
    if report.with_gaps:
        out.print(
            f"[yellow]{len(report.with_gaps)} chat(s) have gaps — run `doppelbot export` again "
            "later to fill them.[/]"
        )


def import_desktop(
    ctx: typer.Context,
    path: Path = typer.Argument(
        ...,
        help="Telegram Desktop export (JSON): its result.json or the folder holding it. Both "
        "the single-chat and the full-account ('chats.list') layouts work.",
    ),
    groups: bool = typer.Option(False, "--groups", help="Also import groups and supergroups."),
    channels: bool = typer.Option(False, "--channels", help="Also import channels."),
    saved: bool = typer.Option(False, "--saved", help="Also import Saved Messages."),
    bots: bool = typer.Option(False, "--bots", help="Also import chats with bots."),
    owner_id: int | None = typer.Option(
        None,
        "--owner-id",
        help="Your numeric Telegram user id, to tell your messages apart in group exports "
        "(default: from the file, or from `doppelbot login`).",
    ),
    account: AccountOpt = None,
) -> None:
    """Import a Telegram Desktop JSON export into the same tables as `export`.

    Private chats by default (like `export`). Idempotent: importing the same file again
    stores nothing new (the summary says how many messages were new and how many were already
    stored). A malformed or truncated file stops with the position of the problem (line/column,
    or chat and message index) and writes nothing. Needs no Telegram API id and no login.
    With --account NAME the file is imported as that own account's history (added when new);
    an export of a Telegram account already stored under another name is refused.
    """
    st = state(ctx)
    name = st.use_account(account)
    settings = st.settings

    options = ImportOptions(
        include_groups=groups,
        include_channels=channels,
        include_saved=saved,
        include_bots=bots,
        owner_id=owner_id,
    )

    async def go() -> ImportResult:
        with RichImportProgress(st.err_console) as progress:
            async with open_db(settings, name, "new") as db:
                return await import_desktop_export(db, path, options, progress=progress)

    _print_import(st.console, run_async(go()))


class RichImportProgress(RichBars):
    """One transient bar over the messages written (only on a terminal)."""

    def __init__(self, console: Console) -> None:
        super().__init__(console, transient=True)
        self.task: TaskID | None = None

    def __enter__(self) -> RichImportProgress:
        super().__enter__()
        self.task = self.progress.add_task("writing messages", total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=done, total=total)


def _print_import(out: Console, result: ImportResult) -> None:
    line = (
        f"imported {result.messages} messages from {result.chats} chat(s): "
        f"{result.new} new, {result.already} already stored"
    )
    if result.skipped:
        parts = ", ".join(f"{n} {what}" for what, n in sorted(result.skipped.items()))
        line += f"; skipped {parts} (see --help to include them)"
    out.print(line)

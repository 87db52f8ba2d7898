"""One-shot, incremental, resumable history export over MTProto into SQLite.

Why it is shaped like this:

- **Resumable without losing or duplicating anything.** Per chat the store keeps a cursor, the
  id range of which every message is stored; each batch is written together with the cursor
  that covers it, in one transaction (``export_cursor``, ``export_writes``). Writes are upserts
  keyed on (chat id, message id), so fetching a message again is harmless.
- **Edits.** Telegram's history does not say "edited since". On re-runs the newest
  ``refetch_recent`` messages of each chat are fetched again and upserted, which picks up
  recent edits (older edits surface on a full re-export).
- **Takeout.** Runs inside a takeout session (lower flood limits for exports); when Telegram
  wants it confirmed first, the export says what to do and goes on with the normal API, paced
  (``takeout``).
- **FloodWait.** Waited out with a visible countdown up to ``flood_wait_max_s`` per wait and
  ``flood_wait_total_s`` per run (``flood_waits``); beyond either the chat stops cleanly,
  keeping every committed batch, and the report says so.
- **Flat memory and speed.** Pages of raw ``messages.getHistory`` answers (``history_pages``)
  are mapped straight to rows and stream into batches of ``batch_size``, dropped once
  committed; each batch is written in aiosqlite's thread while the next pages (and the next
  chat) are fetched, one write at a time and in order.

The flow: ``Exporter.run`` saves the account, picks the chats (``export_selection``), opens the
takeout; per chat ``_export_chat`` runs the walks of ``export_cursor.Walk``, each streaming
pages into batches (``_walk``), and queues the chat's final cursor and completeness check
behind its last batch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from telethon import TelegramClient
from telethon import errors as tg_errors

from doppelbot.core.errors import DoppelbotError
from doppelbot.store import accounts, history
from doppelbot.store.database import Database
from doppelbot.telegram.errors import TRANSLATED, translate
from doppelbot.telegram.export_cursor import Walk, walk_pages
from doppelbot.telegram.export_selection import ChatTarget, list_dialogs, select_chats
from doppelbot.telegram.export_types import (
    ChatReport,
    ChatStatus,
    ExportOptions,
    ExportProgress,
    ExportReport,
    NullProgress,
)
from doppelbot.telegram.export_writes import (
    Batch,
    ChatRun,
    PageRows,
    WriteQueue,
    commit_batch,
    finish_chat,
)
from doppelbot.telegram.flood_waits import FloodTooLong, FloodWaits, Sleep
from doppelbot.telegram.history_pages import Call
from doppelbot.telegram.mapping import map_account
from doppelbot.telegram.takeout import (
    Paced,
    clear_stale_takeout,
    takeout_scope,
    without_takeout_note,
)

__all__ = [
    "ChatReport",
    "ChatStatus",
    "ExportOptions",
    "ExportProgress",
    "ExportReport",
    "Exporter",
    "NullProgress",
]


class Exporter:
    """Exports the owner's chats from a connected, logged-in client into ``db``."""

    def __init__(
        self,
        client: TelegramClient,
        db: Database,
        options: ExportOptions,
        *,
        progress: ExportProgress | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.client = client
        self.db = db
        self.options = options
        self.progress = progress or NullProgress()
        self.floods = FloodWaits(
            client,
            max_s=options.flood_wait_max_s,
            total_s=options.flood_wait_total_s,
            sleep=sleep,
            countdown=self.progress,
        )
        self.writes = WriteQueue()
        self._owner_id = 0
        self._seen_peers: set[int] = set()  # senders stored in this run

    async def run(self) -> ExportReport:
        """The account, the chats to read, then every chat through a takeout session (or,
        when Telegram wants that confirmed first, through the normal API, paced). Telethon's
        errors come out as ``DoppelbotError``."""
        try:
            return await self._run()
        except DoppelbotError:
            raise
        except TRANSLATED as exc:
            raise translate(exc, flood_bound=self.options.flood_wait_max_s) from exc

    async def _run(self) -> ExportReport:
        started = time.monotonic()
        report = ExportReport()
        me = await self.floods.retry(self.client.get_me, "dialog list")
        if me is None:
            raise translate(tg_errors.UnauthorizedError(request=None))
        self._owner_id = me.id
        # Refused when the session is a Telegram user stored as another own account.
        await accounts.claim(self.db, map_account(me))
        if await clear_stale_takeout(self.client):
            report.notes.append("finished a takeout session left over by an interrupted export")
        targets = await self._select(report)
        if self.options.use_takeout and targets:
            try:
                scope = takeout_scope(t.entity for t in targets)
                async with self.client.takeout(finalize=True, **scope) as takeout:
                    report.used_takeout = True
                    await self._export_all(takeout, takeout, targets, report)
            except tg_errors.TakeoutInitDelayError as exc:
                if report.used_takeout:
                    raise
                text = without_takeout_note(exc, self.options.fallback_wait_s)
                report.notes.append(text)
                self.progress.note(text)
        if not report.used_takeout:
            paced = Paced(self.client, self.options.fallback_wait_s)
            await self._export_all(self.client, paced, targets, report)
        report.seconds = time.monotonic() - started
        return report

    async def _select(self, report: ExportReport) -> list[ChatTarget]:
        dialogs = await self.floods.retry(lambda: list_dialogs(self.client), "dialog list")
        selection = await select_chats(dialogs, self.options, self.db)
        report.notes += [f"chat {w!r} is not among your dialogs" for w in selection.not_found]
        report.skipped = selection.skipped
        return selection.targets

    async def _export_all(
        self, api: Any, call: Call, targets: list[ChatTarget], report: ExportReport
    ) -> None:
        """Every chat in turn; ``api`` resolves peers, ``call`` sends the history requests."""
        self.progress.start(len(targets))
        # Read up front: from here on the store's one connection is busy with our writes.
        known = await history.cursors_and_counts(self.db, [t.chat_id for t in targets])
        try:
            for target in targets:
                cursor, stored = known.get(target.chat_id, (None, 0))
                if cursor is None:
                    cursor = history.ExportCursor(target.chat_id)
                chat_report = ChatReport(target.chat_id, target.name, target.peer.kind)
                run = ChatRun(target, cursor, chat_report, stored)
                await self._export_chat(api, call, run, report)
        except BaseException:
            # Whatever stopped us, the write already under way is finished, not dropped.
            await self.writes.drain(quiet=True)
            raise
        await self.writes.drain()

    async def _export_chat(self, api: Any, call: Call, run: ChatRun, report: ExportReport) -> None:
        target, chat_report = run.target, run.report
        self._seen_peers.add(target.chat_id)
        self.progress.chat_started(target.chat_id, target.name, run.stored, run.cursor.server_total)
        error: str | None = None
        try:
            if target.input_peer is None:
                target.input_peer = await api.get_input_entity(target.entity)
            if run.cursor.newest_message_id == 0:
                await self._walk(call, run, Walk.BACK)
            else:
                # Each walk starts from the cursor the one before it has committed.
                await self._walk(call, run, Walk.FORWARD)
                if self.options.refetch_recent > 0:
                    await self.writes.drain()
                    await self._walk(call, run, Walk.RECENT)
                await self.writes.drain()
                if not run.cursor.history_complete:
                    await self._walk(call, run, Walk.BACK)
        except FloodTooLong as exc:
            err = exc.error("history page")
            error = str(err)
            chat_report.status = ChatStatus.FLOOD_STOPPED
            chat_report.note = f"{err}; kept what was fetched, run the export again later"
            self.progress.note(f"{target.name}: {chat_report.note}")
        except (tg_errors.RPCError, ConnectionError) as exc:
            err2 = translate(exc, flood_bound=self.options.flood_wait_max_s)
            error = str(err2)
            chat_report.status = ChatStatus.FAILED
            chat_report.note = f"{err2}; kept what was fetched"
            self.progress.note(f"{target.name}: {chat_report.note}")
        # Queued behind the chat's last batch: the next chat is fetched meanwhile.
        await self.writes.put(self._finish(run, error, report))

    async def _walk(self, call: Call, run: ChatRun, walk: Walk) -> None:
        """Stream one walk of one chat into the store, batch by batch.

        On FloodWait the partial batch is committed first, then (within the bounds) we wait
        and start again from the cursor that was just saved.
        """
        batch_size = self.options.batch_size
        floor = self.options.since if walk is Walk.BACK else None
        page_rows = PageRows(self._owner_id, run.target, self._seen_peers)
        while True:
            pages = walk_pages(
                call,
                run.target.input_peer,
                run.cursor,
                walk,
                refetch_recent=self.options.refetch_recent,
            )
            batch = Batch()
            try:
                async for page in pages:
                    run.report.server_total = page.total
                    messages = page.messages
                    cut = None if floor is None else _first_older(messages, floor)
                    if cut is not None:
                        run.floor_reached = True
                        messages = messages[:cut]
                    if messages:
                        page_rows.add(batch, messages, page.entities())
                    if cut is not None:  # the rest of the walk is older still
                        await self.writes.put(self._commit(run, batch, walk, pages.total, False))
                        return
                    if len(batch.rows) >= batch_size:
                        await self.writes.put(self._commit(run, batch, walk, pages.total, False))
                        batch = Batch()
                await self.writes.put(self._commit(run, batch, walk, pages.total, True))
                return
            except tg_errors.FloodWaitError as exc:
                await self.writes.put(self._commit(run, batch, walk, pages.total, False))
                await self.writes.drain()  # the retry starts from the cursor this commit saves
                await self.floods.wait(exc, run.target.chat_id)

    async def _commit(
        self, run: ChatRun, batch: Batch, walk: Walk, total: int | None, final: bool
    ) -> None:
        if await commit_batch(self.db, run, batch, walk, total, final=final):
            self.progress.chat_advanced(run.target.chat_id, run.stored, run.report.server_total)

    async def _finish(self, run: ChatRun, error: str | None, report: ExportReport) -> None:
        await finish_chat(self.db, run, error)
        report.chats.append(run.report)
        self.progress.chat_finished(run.report)


def _first_older(messages: list[Any], floor: int) -> int | None:
    """The index of the first of ``messages`` (newest first) dated before ``floor``."""
    for i, msg in enumerate(messages):
        if msg.date.timestamp() < floor:
            return i
    return None

"""One-shot, incremental, resumable history export over MTProto into SQLite.

Why it is shaped like this:

- **Resumable without losing or duplicating anything.** Per chat, the store keeps a cursor
  ``[oldest_message_id, newest_message_id]``: every server message in that id range is stored.
  The first run walks back from the newest message; later runs fetch what is newer than
  ``newest`` oldest-first, then continue back from ``oldest`` until the start of the history.
  Every batch is written *together with the cursor that covers it* in one transaction, so a
  kill at any moment leaves a consistent range and the next run starts exactly there. Writes
  are upserts keyed on (chat id, message id), so re-fetching is harmless.
- **Edits.** Telegram's history does not say "edited since". On re-runs the newest
  ``refetch_recent`` messages of each chat are fetched again and upserted, which picks up
  recent edits (older edits surface on a full re-export).
- **Takeout.** Runs inside a takeout session (lower flood limits for exports). When Telegram
  wants the export confirmed first (``TakeoutInitDelayError``) we explain what to do and go on
  with the normal API, paced. A takeout id left in the session by a crash is finished first.
- **FloodWait.** Waited out with a visible countdown up to ``flood_wait_max_s``; beyond that the
  chat stops cleanly, keeping every committed batch, and the report says so.
- **Flat memory.** Messages stream from Telethon's iterator into batches of ``batch_size`` and
  are dropped after commit; nothing grows with the history's length.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

from telethon import TelegramClient, utils
from telethon import errors as tg_errors
from telethon.tl import types

from doppelbot.config import Settings
from doppelbot.domain import Peer, PeerKind
from doppelbot.errors import DoppelbotError, FloodWaitTooLongError
from doppelbot.store import history
from doppelbot.store.database import Database, now
from doppelbot.telegram.errors import TAKEOUT_HELP, translate
from doppelbot.telegram.mapping import map_account, map_peer, message_row

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[Any]]


# --- options and results --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ExportOptions:
    include_groups: bool = False
    include_channels: bool = False
    include_saved: bool = False
    chats: tuple[str, ...] = ()
    since: int | None = None
    replied_only: bool = False
    use_takeout: bool = True
    batch_size: int = 500
    refetch_recent: int = 100
    flood_wait_max_s: int = 300
    fallback_wait_s: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ExportOptions:
        base = cls(
            use_takeout=settings.export_use_takeout,
            batch_size=settings.export_batch_size,
            refetch_recent=settings.export_refetch_recent,
            flood_wait_max_s=settings.flood_wait_max_s,
            fallback_wait_s=settings.export_fallback_wait_s,
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


class ChatStatus(StrEnum):
    COMPLETE = "complete"
    DATE_FLOOR = "complete to date floor"
    GAPS = "gaps"
    FLOOD_STOPPED = "stopped: flood wait"
    FAILED = "failed"


@dataclass(slots=True)
class ChatReport:
    chat_id: int
    name: str
    kind: PeerKind
    fetched: int = 0  # messages newly fetched this run (new + older history)
    refreshed: int = 0  # recent messages fetched again for edits
    stored: int = 0
    server_total: int | None = None
    status: ChatStatus = ChatStatus.COMPLETE
    note: str = ""

    @property
    def missing(self) -> int:
        """Server messages not in the store (0 when unknown or nothing is missing)."""
        if self.server_total is None:
            return 0
        return max(0, self.server_total - self.stored)


@dataclass(slots=True)
class ExportReport:
    chats: list[ChatReport] = field(default_factory=list)
    used_takeout: bool = False
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def fetched(self) -> int:
        return sum(c.fetched for c in self.chats)

    @property
    def problems(self) -> list[ChatReport]:
        return [
            c
            for c in self.chats
            if c.status in (ChatStatus.GAPS, ChatStatus.FLOOD_STOPPED, ChatStatus.FAILED)
        ]


class ExportProgress(Protocol):
    """What the exporter tells its UI (the CLI draws Rich progress bars from this)."""

    def start(self, chats: int) -> None: ...
    def chat_started(self, chat_id: int, name: str, stored: int, total: int | None) -> None: ...
    def chat_advanced(self, chat_id: int, stored: int, total: int | None) -> None: ...
    def waiting(self, chat_id: int, remaining_s: int) -> None: ...
    def chat_finished(self, report: ChatReport) -> None: ...
    def note(self, text: str) -> None: ...


class NullProgress:
    def start(self, chats: int) -> None:
        pass

    def chat_started(self, chat_id: int, name: str, stored: int, total: int | None) -> None:
        pass

    def chat_advanced(self, chat_id: int, stored: int, total: int | None) -> None:
        pass

    def waiting(self, chat_id: int, remaining_s: int) -> None:
        pass

    def chat_finished(self, report: ChatReport) -> None:
        pass

    def note(self, text: str) -> None:
        pass


# --- internals ------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Target:
    chat_id: int
    entity: Any
    peer: Peer
    name: str


@dataclass(slots=True)
class _Run:
    target: _Target
    cursor: history.ExportCursor
    report: ChatReport
    stored: int
    floor_reached: bool = False
    peer_saved: bool = False


class _FloodTooLong(Exception):
    def __init__(self, seconds: int) -> None:
        super().__init__(seconds)
        self.seconds = seconds


_BACK, _FORWARD, _RECENT = "back", "forward", "recent"


async def clear_stale_takeout(client: TelegramClient) -> bool:
    """Finish a takeout a crashed run left in the session; True when there was one."""
    if client.session.takeout_id is None:
        return False
    try:
        await client.end_takeout(success=False)
    except (tg_errors.RPCError, ValueError) as exc:
        log.debug("stale takeout could not be finished: %s", type(exc).__name__)
    client.session.takeout_id = None
    client.session.save()
    return True


def _matches(target: _Target, wanted: Iterable[str]) -> str | None:
    username = (target.peer.username or "").lower()
    for w in wanted:
        key = w.strip()
        if key.lstrip("-").isdigit() and int(key) == target.chat_id:
            return w
        if key.startswith("@") and username and key[1:].lower() == username:
            return w
        if not key.startswith("@") and username and key.lower() == username:
            return w
    return None


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
        self._sleep = sleep
        self._owner_id = 0
        self._seen_peers: set[int] = set()
        self._paced = False

    # --- entry point ------------------------------------------------------------------------------
    async def run(self) -> ExportReport:
        started = time.monotonic()
        report = ExportReport()
        me = await self._retry_flood(self.client.get_me)
        if me is None:
            raise translate(tg_errors.UnauthorizedError(request=None))
        self._owner_id = me.id
        await history.save_account(self.db, map_account(me))
        if await clear_stale_takeout(self.client):
            report.notes.append("finished a takeout session left over by an interrupted export")
        targets = await self._select(report)
        if self.options.use_takeout and targets:
            try:
                # The takeout's scope covers exactly the kinds of chat we are about to read
                # (a chat listed with --chat may be a group even without --groups).
                entities = [t.entity for t in targets]
                async with self.client.takeout(
                    finalize=True,
                    users=True,
                    chats=any(isinstance(e, types.Chat) for e in entities) or None,
                    megagroups=any(isinstance(e, types.Channel) and e.megagroup for e in entities)
                    or None,
                    channels=any(isinstance(e, types.Channel) and not e.megagroup for e in entities)
                    or None,
                ) as takeout:
                    report.used_takeout = True
                    await self._export_all(takeout, targets, report)
            except tg_errors.TakeoutInitDelayError as exc:
                if report.used_takeout:
                    raise
                text = (
                    f"{TAKEOUT_HELP} Continuing now without takeout, paced at "
                    f"{self.options.fallback_wait_s:g}s between requests "
                    f"(Telegram allows the takeout by itself in {exc.seconds / 3600:.1f} h)."
                )
                report.notes.append(text)
                self.progress.note(text)
        if not report.used_takeout:
            self._paced = True
            await self._export_all(self.client, targets, report)
        report.seconds = time.monotonic() - started
        return report

    # --- choosing the chats -----------------------------------------------------------------------
    async def _select(self, report: ExportReport) -> list[_Target]:
        opts = self.options
        wanted = list(opts.chats)
        matched: set[str] = set()
        skipped: dict[str, int] = {}
        targets: list[_Target] = []

        def skip(reason: str) -> None:
            skipped[reason] = skipped.get(reason, 0) + 1

        dialogs = await self._retry_flood(self._list_dialogs)
        for dialog in dialogs:
            entity = dialog.entity
            peer = map_peer(entity)
            name = dialog.name or str(peer.peer_id)
            target = _Target(utils.get_peer_id(entity), entity, peer, name)
            if wanted:
                hit = _matches(target, wanted)
                if hit is None:
                    continue
                matched.add(hit)
            elif isinstance(entity, types.User):
                if peer.is_self and not opts.include_saved:
                    skip("saved messages")
                    continue
                if peer.is_bot:
                    skip("bots")
                    continue
                if peer.is_deleted:
                    skip("deleted accounts")
                    continue
            elif peer.kind is PeerKind.GROUP and not opts.include_groups:
                skip("groups")
                continue
            elif peer.kind is PeerKind.CHANNEL and not opts.include_channels:
                skip("channels")
                continue
            if opts.replied_only and not await self._owner_wrote(dialog, target):
                skip("no reply of yours")
                continue
            targets.append(target)
        for w in wanted:
            if w not in matched:
                report.notes.append(f"chat {w!r} is not among your dialogs")
        report.skipped = skipped
        return targets

    async def _list_dialogs(self) -> list[Any]:
        # Dialogs are few (hundreds); collecting them is fine, unlike messages.
        return [d async for d in self.client.iter_dialogs(ignore_migrated=True)]

    async def _owner_wrote(self, dialog: Any, target: _Target) -> bool:
        """Cheap test for "I wrote here": no extra request.

        Telegram tells us up to which of *our* messages the other side has read
        (``read_outbox_max_id`` is 0 when we never sent one that was read); the dialog's last
        message may be ours; and the store may already hold our messages from a past run.
        """
        if getattr(dialog.dialog, "read_outbox_max_id", 0) or (
            dialog.message is not None and dialog.message.out
        ):
            return True
        n = await self.db.scalar(
            "SELECT 1 FROM messages WHERE chat_id = ? AND is_outgoing = 1 LIMIT 1",
            (target.chat_id,),
        )
        return n is not None

    # --- per chat ---------------------------------------------------------------------------------
    async def _export_all(self, api: Any, targets: list[_Target], report: ExportReport) -> None:
        self.progress.start(len(targets))
        for target in targets:
            chat_report = await self._export_chat(api, target)
            report.chats.append(chat_report)
            self.progress.chat_finished(chat_report)

    async def _export_chat(self, api: Any, target: _Target) -> ChatReport:
        cursor, stored = await _cursor_and_count(self.db, target.chat_id)
        chat_report = ChatReport(target.chat_id, target.name, target.peer.kind)
        run = _Run(target, cursor, chat_report, stored)
        self._seen_peers.add(target.chat_id)
        self.progress.chat_started(target.chat_id, target.name, stored, cursor.server_total)
        error: str | None = None
        try:
            if run.cursor.newest_message_id == 0:
                await self._walk(api, run, _BACK)
            else:
                await self._walk(api, run, _FORWARD)
                if self.options.refetch_recent > 0:
                    await self._walk(api, run, _RECENT)
                if not run.cursor.history_complete:
                    await self._walk(api, run, _BACK)
        except _FloodTooLong as exc:
            err = FloodWaitTooLongError(exc.seconds, self.options.flood_wait_max_s, "history page")
            error = str(err)
            chat_report.status = ChatStatus.FLOOD_STOPPED
            chat_report.note = f"{err}; kept what was fetched, run the export again later"
            self.progress.note(f"{target.name}: {chat_report.note}")
        except (tg_errors.RPCError, ConnectionError) as exc:
            err2 = translate(exc)
            error = str(err2)
            chat_report.status = ChatStatus.FAILED
            chat_report.note = f"{err2}; kept what was fetched"
            self.progress.note(f"{target.name}: {chat_report.note}")
        if chat_report.server_total is None:
            chat_report.server_total = run.cursor.server_total
        run.cursor = replace(
            run.cursor,
            server_total=chat_report.server_total,
            last_run_at=now(),
            last_error=error,
        )
        async with self.db.transaction() as conn:
            # The peer goes in with the first batch; here only when no batch was written.
            if not run.peer_saved:
                await history.upsert_peers_in(conn, [target.peer])
            await history.save_cursor_in(conn, run.cursor)
            # Completeness: what we hold against what Telegram says the chat has.
            (row,) = await conn.execute_fetchall(
                "SELECT count(*) FROM messages WHERE chat_id = ?", (target.chat_id,)
            )
            chat_report.stored = int(row[0])
        if error is None:
            if run.floor_reached and not run.cursor.history_complete:
                chat_report.status = ChatStatus.DATE_FLOOR
            elif chat_report.missing:
                chat_report.status = ChatStatus.GAPS
                chat_report.note = (
                    f"{chat_report.missing} of {chat_report.server_total} messages on the "
                    "server are not stored"
                )
        return chat_report

    def _iter_args(self, run: _Run, direction: str) -> dict[str, Any] | None:
        c = run.cursor
        if direction == _FORWARD:
            return {"min_id": c.newest_message_id, "reverse": True}
        if direction == _RECENT:
            return {"limit": self.options.refetch_recent, "max_id": c.newest_message_id + 1}
        if c.oldest_message_id is not None:
            return {"offset_id": c.oldest_message_id}
        return {}

    async def _walk(self, api: Any, run: _Run, direction: str) -> None:
        """Stream one direction of one chat into the store, batch by batch.

        On FloodWait the partial batch is committed first, then (within the bound) we wait and
        restart the iterator from the cursor that was just saved.
        """
        batch_size = self.options.batch_size
        floor = self.options.since
        wait_time = self.options.fallback_wait_s if self._paced else 0
        entity = run.target.entity
        while True:
            args = self._iter_args(run, direction)
            if args is None:
                return
            iterator = api.iter_messages(entity, wait_time=wait_time, **args)
            batch: list[Any] = []
            done = False
            # The previous batch is written (in aiosqlite's thread) while Telethon fetches and
            # parses the next one. Commits stay strictly ordered: one is started only after the
            # one before has finished, and each one carries the cursor covering its batch.
            pending: asyncio.Future[None] | None = None
            try:
                async for msg in iterator:
                    if floor is not None and direction == _BACK and msg.date.timestamp() < floor:
                        run.floor_reached = True
                        break
                    batch.append(msg)
                    if len(batch) >= batch_size:
                        run.report.server_total = iterator.total
                        if pending is not None:
                            await pending
                        pending = asyncio.ensure_future(
                            self._commit(run, batch, direction, final=False)
                        )
                        batch = []
                else:
                    done = True
                if iterator.total is not None:
                    run.report.server_total = iterator.total
                if pending is not None:
                    await pending
                    pending = None
                await self._commit(run, batch, direction, final=done)
                return
            except tg_errors.FloodWaitError as exc:
                if pending is not None:
                    await pending
                    pending = None
                await self._commit(run, batch, direction, final=False)
                await self._wait_flood(exc, run.target.chat_id)
            finally:
                if pending is not None:
                    await pending

    async def _wait_flood(self, exc: Any, chat_id: int | None) -> None:
        seconds = int(exc.seconds)
        if seconds > self.options.flood_wait_max_s:
            raise _FloodTooLong(seconds)
        for remaining in range(seconds, 0, -1):
            if chat_id is not None:
                self.progress.waiting(chat_id, remaining)
            await self._sleep(1)
        if chat_id is not None:
            self.progress.waiting(chat_id, 0)
        # We waited ourselves; drop Telethon's record so it does not refuse the retry early.
        request = getattr(exc, "request", None)
        if request is not None:
            self.client._flood_waited_requests.pop(request.CONSTRUCTOR_ID, None)

    async def _retry_flood(self, call: Callable[[], Awaitable[Any]]) -> Any:
        while True:
            try:
                return await call()
            except tg_errors.FloodWaitError as exc:
                try:
                    await self._wait_flood(exc, None)
                except _FloodTooLong:
                    raise FloodWaitTooLongError(
                        exc.seconds, self.options.flood_wait_max_s, "dialog list"
                    ) from None

    async def _commit(self, run: _Run, batch: list[Any], direction: str, *, final: bool) -> None:
        """One transaction: the batch's messages, new peers, and the cursor covering them."""
        c = run.cursor
        if not batch:
            if direction == _BACK and final and not c.history_complete:
                run.cursor = replace(c, history_complete=True)
                await history.save_cursor(self.db, run.cursor)
            return
        owner = self._owner_id
        chat_id = run.target.chat_id
        rows = []
        peers: list[Peer] = []
        seen = self._seen_peers
        for msg in batch:
            entities = None
            fwd = msg.fwd_from
            if fwd is not None and fwd.from_id is not None and msg.forward is not None:
                origin = msg.forward.sender or msg.forward.chat
                if origin is not None:
                    entities = {utils.get_peer_id(fwd.from_id): origin}
            rows.append(message_row(msg, owner_id=owner, chat_id=chat_id, entities=entities))
            sid = msg.sender_id
            if sid is not None and sid not in seen:
                sender = msg.sender
                if sender is not None:
                    seen.add(sid)
                    peers.append(map_peer(sender))
        ids = [m.id for m in batch]
        lo, hi = min(ids), max(ids)
        if direction == _BACK:
            c = replace(
                c,
                newest_message_id=c.newest_message_id or hi,
                oldest_message_id=lo
                if c.oldest_message_id is None
                else min(lo, c.oldest_message_id),
                history_complete=final,
            )
        elif direction == _FORWARD:
            c = replace(
                c,
                newest_message_id=max(hi, c.newest_message_id),
                oldest_message_id=lo if c.oldest_message_id is None else c.oldest_message_id,
            )
        c = replace(c, server_total=run.report.server_total or c.server_total)
        if not run.peer_saved:
            peers.append(run.target.peer)
        async with self.db.transaction() as conn:
            before = await _count_existing(conn, chat_id, ids) if direction == _RECENT else 0
            await conn.executemany(history.UPSERT_MESSAGE_SQL, rows)
            if peers:
                await history.upsert_peers_in(conn, peers)
            await history.save_cursor_in(conn, c)
        run.cursor = c
        run.peer_saved = True
        if direction == _RECENT:
            run.report.refreshed += before
            run.report.fetched += len(batch) - before
            run.stored += len(batch) - before
        else:
            run.report.fetched += len(batch)
            run.stored += len(batch)
        self.progress.chat_advanced(chat_id, run.stored, run.report.server_total)


async def _cursor_and_count(db: Database, chat_id: int) -> tuple[history.ExportCursor, int]:
    """The chat's cursor (a fresh one if none) and its stored message count, in one query."""
    # execute_fetchall: one hop to aiosqlite's thread instead of three (per chat, it adds up).
    (row,) = await db.conn.execute_fetchall(
        "SELECT c.newest_message_id, c.oldest_message_id, c.history_complete, c.server_total,"
        " c.last_run_at, c.last_error, (SELECT count(*) FROM messages WHERE chat_id = k.id)"
        " FROM (SELECT ? AS id) k LEFT JOIN export_cursors c ON c.chat_id = k.id",
        (chat_id,),
    )
    if row[0] is None:
        return history.ExportCursor(chat_id), int(row[6])
    cursor = history.ExportCursor(chat_id, row[0], row[1], bool(row[2]), row[3], row[4], row[5])
    return cursor, int(row[6])


async def _count_existing(conn: Any, chat_id: int, ids: list[int]) -> int:
    marks = ",".join("?" * len(ids))
    (row,) = await conn.execute_fetchall(
        f"SELECT count(*) FROM messages WHERE chat_id = ? AND message_id IN ({marks})",
        (chat_id, *ids),
    )
    return int(row[0])


async def export_history(
    client: TelegramClient,
    db: Database,
    options: ExportOptions,
    *,
    progress: ExportProgress | None = None,
    sleep: Sleep = asyncio.sleep,
) -> ExportReport:
    """Export with ``options``; Telethon errors come out as ``DoppelbotError``."""
    try:
        return await Exporter(client, db, options, progress=progress, sleep=sleep).run()
    except DoppelbotError:
        raise
    except (tg_errors.RPCError, ConnectionError, OSError) as exc:
        raise translate(exc, flood_bound=options.flood_wait_max_s) from exc

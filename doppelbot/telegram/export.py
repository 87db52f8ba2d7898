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
- **FloodWait.** Waited out with a visible countdown up to ``flood_wait_max_s`` per wait and
  ``flood_wait_total_s`` per run (thirty short waits add up too); beyond either the chat stops
  cleanly, keeping every committed batch, and the report says so.
- **Flat memory.** Messages stream page by page into batches of ``batch_size`` and are
  dropped after commit; nothing grows with the history's length.
- **Speed.** Pages are raw ``messages.getHistory`` calls paged exactly like Telethon's
  ``iter_messages`` (``_Pager``; a test holds the two to the same answers), mapped straight to
  rows; each batch is written in aiosqlite's thread while the next pages (and the next chat)
  are fetched, one write at a time and in order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

from telethon import TelegramClient, utils
from telethon import errors as tg_errors
from telethon.tl import functions, types

from doppelbot.config import Settings
from doppelbot.domain import Peer, PeerKind
from doppelbot.errors import DoppelbotError, FloodWaitTooLongError
from doppelbot.store import history
from doppelbot.store.database import Database, now
from doppelbot.telegram.errors import TAKEOUT_HELP, TRANSLATED, translate
from doppelbot.telegram.mapping import map_account, map_peer, tl_message_values

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
    flood_wait_total_s: int = 900
    fallback_wait_s: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ExportOptions:
        base = cls(
            use_takeout=settings.export_use_takeout,
            batch_size=settings.export_batch_size,
            refetch_recent=settings.export_refetch_recent,
            flood_wait_max_s=settings.flood_wait_max_s,
            flood_wait_total_s=settings.flood_wait_total_s,
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
    def incomplete(self) -> list[ChatReport]:
        """Chats that failed or stopped: the export did not do what was asked."""
        return [c for c in self.chats if c.status in (ChatStatus.FLOOD_STOPPED, ChatStatus.FAILED)]

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
    input_peer: Any = None  # resolved when the chat's export starts


@dataclass(slots=True)
class _Run:
    target: _Target
    cursor: history.ExportCursor
    report: ChatReport
    stored: int
    floor_reached: bool = False
    peer_saved: bool = False


class _FloodTooLong(Exception):
    def __init__(self, seconds: int, *, budget_left: int | None = None) -> None:
        super().__init__(seconds)
        self.seconds = seconds
        self.budget_left = budget_left  # set when the run's total budget is what ran out

    def error(self, options: ExportOptions, what: str) -> DoppelbotError:
        if self.budget_left is None:
            return FloodWaitTooLongError(self.seconds, options.flood_wait_max_s, what)
        return FloodWaitTooLongError(
            self.seconds, self.budget_left, what, total=options.flood_wait_total_s
        )


@dataclass(slots=True)
class _Batch:
    """Mapped rows waiting for their commit, with the senders not stored yet.

    The rows' message ids are strictly monotonic (``_Pager`` keeps them so), so the first and
    the last row bound the id range the batch covers.
    """

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    peers: list[Peer] = field(default_factory=list)


_BACK, _FORWARD, _RECENT = "back", "forward", "recent"
_PAGE = 100  # Telegram's cap on messages.getHistory's limit


class _Pager:
    """``messages.getHistory`` paging exactly as Telethon's ``iter_messages`` does it.

    Newest first from ``offset_id`` (exclusive), or with ``reverse`` oldest first from
    ``offset_id`` (inclusive: each page is the window above it, ``add_offset=-limit``).
    ``take`` turns one response into the messages to keep, in order, and moves the request
    to the next page; ``done`` says there is none. The stop rules are Telethon's: a reply
    that is not a slice, an empty page, an id out of order, ids already down to the limit,
    or ``limit`` messages taken.
    """

    __slots__ = ("done", "last_id", "left", "request", "reverse", "total")

    def __init__(
        self, peer: Any, *, offset_id: int, reverse: bool = False, limit: int | None = None
    ) -> None:
        self.reverse = reverse
        self.left: float = math.inf if limit is None else max(limit, 0)
        self.last_id: float = 0 if reverse else math.inf
        self.total: int | None = None
        self.done = self.left <= 0
        page = int(min(self.left, _PAGE))
        self.request = functions.messages.GetHistoryRequest(
            peer=peer,
            offset_id=offset_id,
            offset_date=None,
            add_offset=-page if reverse else 0,
            limit=page,
            max_id=0,
            min_id=0,
            hash=0,
        )

    def take(self, response: Any) -> list[Any]:
        request, reverse = self.request, self.reverse
        raw = response.messages
        self.total = getattr(response, "count", len(raw))
        kept: list[Any] = []
        last_id = self.last_id
        for msg in reversed(raw) if reverse else raw:
            if isinstance(msg, types.MessageEmpty):
                continue
            mid = msg.id
            if (mid <= last_id) if reverse else (mid >= last_id):
                self.done = True
                break
            last_id = mid
            kept.append(msg)
        self.last_id = last_id
        if len(kept) >= self.left:
            del kept[int(self.left) :]
            self.done = True
        self.left -= len(kept)
        if self.done:
            return kept
        if (
            isinstance(response, types.messages.Messages)
            or not raw
            or (not reverse and raw[0].id <= request.limit)
            or not kept
        ):
            self.done = True
            return kept
        last = kept[-1]
        request.offset_id = last.id + 1 if reverse else last.id
        request.offset_date = last.date
        page = int(min(self.left, _PAGE))
        request.limit = page
        if reverse:
            request.add_offset = -page
        return kept


def _entities(response: Any) -> dict[int, Any]:
    """A history page's users and chats by marked id (senders, forward origins)."""
    get_id = utils.get_peer_id
    found = {get_id(u): u for u in response.users}
    for c in response.chats:
        found[get_id(c)] = c
    return found


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
        self._flood_waited = 0  # seconds of FloodWait waited out in this run
        self._last_request = 0.0
        self._writing: asyncio.Future[None] | None = None

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
        return await history.has_outgoing(self.db, target.chat_id)

    # --- per chat ---------------------------------------------------------------------------------
    async def _export_all(self, api: Any, targets: list[_Target], report: ExportReport) -> None:
        self.progress.start(len(targets))
        # Read up front: from here on the store's one connection is busy with our writes.
        known = await history.cursors_and_counts(self.db, [t.chat_id for t in targets])
        try:
            for target in targets:
                cursor, stored = known.get(target.chat_id, (None, 0))
                if cursor is None:
                    cursor = history.ExportCursor(target.chat_id)
                await self._export_chat(api, target, cursor, stored, report)
        except BaseException:
            # Whatever stopped us, the write already under way is finished, not dropped.
            await self._drain(quiet=True)
            raise
        await self._drain()

    async def _export_chat(
        self,
        api: Any,
        target: _Target,
        cursor: history.ExportCursor,
        stored: int,
        report: ExportReport,
    ) -> None:
        chat_report = ChatReport(target.chat_id, target.name, target.peer.kind)
        run = _Run(target, cursor, chat_report, stored)
        self._seen_peers.add(target.chat_id)
        self.progress.chat_started(target.chat_id, target.name, stored, cursor.server_total)
        error: str | None = None
        try:
            if target.input_peer is None:
                target.input_peer = await api.get_input_entity(target.entity)
            if run.cursor.newest_message_id == 0:
                await self._walk(api, run, _BACK)
            else:
                # Each direction starts from the cursor the one before it has committed.
                await self._walk(api, run, _FORWARD)
                if self.options.refetch_recent > 0:
                    await self._drain()
                    await self._walk(api, run, _RECENT)
                await self._drain()
                if not run.cursor.history_complete:
                    await self._walk(api, run, _BACK)
        except _FloodTooLong as exc:
            err = exc.error(self.options, "history page")
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
        await self._queue(self._finish_chat(run, error, report))

    async def _finish_chat(self, run: _Run, error: str | None, report: ExportReport) -> None:
        """The chat's final cursor and completeness check, then its report."""
        target, chat_report = run.target, run.report
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
            chat_report.stored = await history.count_messages_in(conn, target.chat_id)
        if error is None:
            if run.floor_reached and not run.cursor.history_complete:
                chat_report.status = ChatStatus.DATE_FLOOR
            elif chat_report.missing:
                chat_report.status = ChatStatus.GAPS
                chat_report.note = (
                    f"{chat_report.missing} of {chat_report.server_total} messages on the "
                    "server are not stored"
                )
        report.chats.append(chat_report)
        self.progress.chat_finished(chat_report)

    # --- the write queue --------------------------------------------------------------------------
    async def _queue(self, write: Coroutine[Any, Any, None]) -> None:
        """Start ``write`` once the write before it has finished.

        Writes run (in aiosqlite's thread) while the next pages are fetched and parsed, one
        at a time and in order; at most one batch waits to be written, so memory stays flat.
        """
        try:
            await self._drain()
        except BaseException:
            write.close()
            raise
        self._writing = asyncio.ensure_future(write)

    async def _drain(self, *, quiet: bool = False) -> None:
        """Wait for the write under way (``quiet``: an error in it is only logged)."""
        writing, self._writing = self._writing, None
        if writing is None:
            return
        if not quiet:
            await writing
            return
        try:
            await writing
        except Exception as exc:  # already stopping for another reason; that one is reported
            log.debug("queued write failed while stopping: %s", type(exc).__name__)

    def _pager(self, run: _Run, direction: str) -> _Pager:
        c = run.cursor
        if direction == _FORWARD:
            return _Pager(run.target.input_peer, reverse=True, offset_id=c.newest_message_id + 1)
        if direction == _RECENT:
            return _Pager(
                run.target.input_peer,
                offset_id=c.newest_message_id + 1,
                limit=self.options.refetch_recent,
            )
        return _Pager(run.target.input_peer, offset_id=c.oldest_message_id or 0)

    async def _request(self, api: Any, request: Any) -> Any:
        if self._paced:
            # Without takeout Telegram's ordinary flood limits apply: keep requests apart.
            delay = self.options.fallback_wait_s - (time.monotonic() - self._last_request)
            if delay > 0:
                await asyncio.sleep(delay)
            self._last_request = time.monotonic()
        return await api(request)

    async def _walk(self, api: Any, run: _Run, direction: str) -> None:
        """Stream one direction of one chat into the store, batch by batch.

        Pages come from raw ``messages.getHistory`` calls (through the takeout wrapper when
        there is one) and are mapped straight into rows: ``iter_messages`` would also resolve
        every message's sender, chat and forward into objects we never read, and its takeout
        proxy adds attribute lookups per message; together about a third of the export's CPU.
        On FloodWait the partial batch is committed first, then (within the bound) we wait
        and start again from the cursor that was just saved.
        """
        batch_size = self.options.batch_size
        floor = self.options.since if direction == _BACK else None
        owner = self._owner_id
        chat_id = run.target.chat_id
        saved = run.target.peer.is_self
        seen = self._seen_peers
        while True:
            pager = self._pager(run, direction)
            batch = _Batch()
            floored = False
            try:
                while not pager.done:
                    response = await self._request(api, pager.request)
                    messages = pager.take(response)
                    run.report.server_total = pager.total
                    if floor is not None:
                        for i, msg in enumerate(messages):
                            if msg.date.timestamp() < floor:
                                run.floor_reached = floored = True
                                del messages[i:]
                                break
                    if messages:
                        entities = _entities(response)
                        rows, peers = batch.rows, batch.peers
                        for msg in messages:
                            if saved and not msg.fwd_from:
                                # Telethon's convention (and the official apps'): what is in
                                # Saved Messages was written by the owner.
                                msg.out = True
                            row = tl_message_values(msg, owner, chat_id, entities)
                            rows.append(row)
                            sid = row[2]
                            if sid is not None and sid not in seen:
                                sender = entities.get(sid)
                                if sender is not None:
                                    seen.add(sid)
                                    peers.append(map_peer(sender))
                    if floored:
                        break
                    if len(batch.rows) >= batch_size:
                        await self._queue(
                            self._commit(run, batch, direction, pager.total, final=False)
                        )
                        batch = _Batch()
                final = pager.done and not floored
                await self._queue(self._commit(run, batch, direction, pager.total, final=final))
                return
            except tg_errors.FloodWaitError as exc:
                await self._queue(self._commit(run, batch, direction, pager.total, final=False))
                await self._drain()  # the retry starts from the cursor this commit saves
                await self._wait_flood(exc, run.target.chat_id)

    async def _wait_flood(self, exc: Any, chat_id: int | None) -> None:
        seconds = int(exc.seconds)
        if seconds > self.options.flood_wait_max_s:
            raise _FloodTooLong(seconds)
        left = self.options.flood_wait_total_s - self._flood_waited
        if seconds > left:
            raise _FloodTooLong(seconds, budget_left=max(left, 0))
        self._flood_waited += seconds
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
                except _FloodTooLong as too_long:
                    raise too_long.error(self.options, "dialog list") from None

    async def _commit(
        self, run: _Run, batch: _Batch, direction: str, total: int | None, *, final: bool
    ) -> None:
        """One transaction: the batch's messages, new peers, and the cursor covering them."""
        c = run.cursor
        rows = batch.rows
        if not rows:
            if direction == _BACK and final and not c.history_complete:
                # Stored with the chat's final cursor by ``_finish_chat``, one transaction
                # fewer per chat; if that write is lost, the next run asks once more.
                run.cursor = replace(c, history_complete=True)
            return
        chat_id = run.target.chat_id
        peers = batch.peers
        first, last = rows[0][1], rows[-1][1]
        lo, hi = min(first, last), max(first, last)
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
        c = replace(c, server_total=total or c.server_total)
        if not run.peer_saved:
            peers.append(run.target.peer)
        async with self.db.transaction() as conn:
            before = 0
            if direction == _RECENT:
                before = await history.count_stored_in(conn, chat_id, [r[1] for r in rows])
            await history.upsert_message_rows_bulk_in(conn, rows)
            if peers:
                await history.upsert_peers_in(conn, peers)
            await history.save_cursor_in(conn, c)
        run.cursor = c
        run.peer_saved = True
        n = len(rows)
        if direction == _RECENT:
            run.report.refreshed += before
            run.report.fetched += n - before
            run.stored += n - before
        else:
            run.report.fetched += n
            run.stored += n
        self.progress.chat_advanced(chat_id, run.stored, run.report.server_total)


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
    except TRANSLATED as exc:
        raise translate(exc, flood_bound=options.flood_wait_max_s) from exc

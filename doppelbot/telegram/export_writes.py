"""The export's write side: pages become batches of rows, each batch is stored in one
transaction together with the cursor that covers it, and the writes overlap the fetching.

Rows are made straight from the raw TL messages (``tl_message_values``), without the
``Message`` dataclass in between: the export writes hundreds of thousands of them. A batch holds
``batch_size`` rows and is dropped once committed, so memory stays flat however long the
history is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from doppelbot.core.domain import Peer
from doppelbot.store import history
from doppelbot.store.database import Database, now
from doppelbot.telegram.export_cursor import Walk, covering
from doppelbot.telegram.export_selection import ChatTarget
from doppelbot.telegram.export_types import ChatReport, ChatStatus
from doppelbot.telegram.mapping import map_peer, tl_message_values

log = logging.getLogger(__name__)

# Where ``tl_message_values`` puts them in a row.
_MESSAGE_ID = history.MESSAGES.columns.index("message_id")
_SENDER_ID = history.MESSAGES.columns.index("sender_id")


@dataclass(slots=True)
class ChatRun:
    """One chat's export in this run: the cursor committed so far and what to report."""

    target: ChatTarget
    cursor: history.ExportCursor
    report: ChatReport
    stored: int
    floor_reached: bool = False
    peer_saved: bool = False  # the chat's own peer row is written (with the first batch)


@dataclass(slots=True)
class Batch:
    """Rows waiting for their commit, with the senders not stored yet.

    The rows' message ids are strictly monotonic (``HistoryPages`` keeps them so), so the
    first and the last row bound the id range the batch covers.
    """

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    peers: list[Peer] = field(default_factory=list)


class PageRows:
    """Turns one chat's pages into ``messages`` rows in a batch, and each sender not seen
    before in this run into a peer to store with it."""

    __slots__ = ("chat_id", "owner_id", "saved", "seen")

    def __init__(self, owner_id: int, target: ChatTarget, seen: set[int]) -> None:
        self.owner_id = owner_id
        self.chat_id = target.chat_id
        self.saved = target.peer.is_self
        self.seen = seen

    def add(self, batch: Batch, messages: list[Any], entities: dict[int, Any]) -> None:
        owner, chat_id, saved, seen = self.owner_id, self.chat_id, self.saved, self.seen
        rows, peers = batch.rows, batch.peers
        for msg in messages:
            if saved and not msg.fwd_from:
                # Telethon's convention (and the official apps'): what is in Saved Messages
                # was written by the owner.
                msg.out = True
            row = tl_message_values(msg, owner, chat_id, entities)
            rows.append(row)
            sid = row[_SENDER_ID]
            if sid is not None and sid not in seen:
                sender = entities.get(sid)
                if sender is not None:
                    seen.add(sid)
                    peers.append(map_peer(sender))


async def commit_batch(
    db: Database, run: ChatRun, batch: Batch, walk: Walk, total: int | None, *, final: bool
) -> bool:
    """One transaction: the batch's messages, new peers, and the cursor covering them; False
    when there was nothing to write."""
    c = run.cursor
    rows = batch.rows
    if not rows:
        if walk is Walk.BACK and final and not c.history_complete:
            # Stored with the chat's final cursor by ``finish_chat``, one transaction fewer
            # per chat; if that write is lost, the next run asks once more.
            run.cursor = replace(c, history_complete=True)
        return False
    chat_id = run.target.chat_id
    peers = batch.peers
    c = covering(c, walk, rows[0][_MESSAGE_ID], rows[-1][_MESSAGE_ID], final=final, total=total)
    if not run.peer_saved:
        peers.append(run.target.peer)
    async with db.transaction() as conn:
        before = 0
        if walk is Walk.RECENT:
            before = await history.count_stored_in(conn, chat_id, [r[_MESSAGE_ID] for r in rows])
        await history.upsert_message_rows_bulk_in(conn, rows)
        if peers:
            await history.upsert_peers_in(conn, peers)
        await history.save_cursor_in(conn, c)
    run.cursor = c
    run.peer_saved = True
    n = len(rows)
    if walk is Walk.RECENT:
        run.report.refreshed += before
        run.report.fetched += n - before
        run.stored += n - before
    else:
        run.report.fetched += n
        run.stored += n
    return True


async def finish_chat(db: Database, run: ChatRun, error: str | None) -> None:
    """The chat's final cursor, and its report's completeness check: what the store holds
    against what Telegram says the chat has."""
    target, chat_report = run.target, run.report
    if chat_report.server_total is None:
        chat_report.server_total = run.cursor.server_total
    run.cursor = replace(
        run.cursor,
        server_total=chat_report.server_total,
        last_run_at=now(),
        last_error=error,
    )
    async with db.transaction() as conn:
        # The peer goes in with the first batch; here only when no batch was written.
        if not run.peer_saved:
            await history.upsert_peers_in(conn, [target.peer])
        await history.save_cursor_in(conn, run.cursor)
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


class WriteQueue:
    """Writes run (in aiosqlite's thread) while the next pages are fetched and parsed, one at
    a time and in order; at most one batch waits to be written, so memory stays flat."""

    __slots__ = ("_writing",)

    def __init__(self) -> None:
        self._writing: asyncio.Future[None] | None = None

    async def put(self, write: Coroutine[Any, Any, None]) -> None:
        """Start ``write`` once the write before it has finished."""
        try:
            await self.drain()
        except BaseException:
            write.close()
            raise
        self._writing = asyncio.ensure_future(write)

    async def drain(self, *, quiet: bool = False) -> None:
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

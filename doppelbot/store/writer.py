"""Keeping the store current with the messages the running bot sees, even while SQLite is busy.

Every private message the live bot sees is written at once, so the reply context is always the
real recent history. A write can still fail after the database's own busy retries (a backup
holding the file, a full disk for a moment): then the message is kept in memory and written in
the background until it succeeds, and the responder reads it from here meanwhile — a message is
never lost because the disk was busy when it arrived.
"""

from __future__ import annotations

import asyncio
import logging

from doppelbot.core.domain import Message, Peer
from doppelbot.core.errors import describe
from doppelbot.store import history
from doppelbot.store.database import Database

log = logging.getLogger("doppelbot.store")

#: The background retry backs off up to this many seconds between rounds.
MAX_RETRY_DELAY_S = 60.0


class MessageWriter:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._peers: dict[int, Peer] = {}  # as last written: unchanged peers are not rewritten
        self._unsaved: dict[tuple[int, int], tuple[Message, Peer]] = {}
        self._retrier: asyncio.Task[None] | None = None

    async def save(self, message: Message, peer: Peer) -> None:
        """Store the message; when that fails, keep it and retry in the background."""
        try:
            await self._write(message, peer)
        except Exception as exc:
            key = (message.chat_id, message.message_id)
            log.error(
                "live: message not stored yet chat=%d msg=%d (%s); retrying in the background",
                *key,
                describe(exc),
            )
            self._unsaved[key] = (message, peer)
            if self._retrier is None or self._retrier.done():
                self._retrier = asyncio.get_running_loop().create_task(self._retry())

    def unsaved_in(self, chat_id: int) -> list[Message]:
        """Messages of ``chat_id`` not stored yet (the responder adds them to the context)."""
        return [m for (chat, _), (m, _) in self._unsaved.items() if chat == chat_id]

    async def aclose(self) -> None:
        """Stop the background retry after one last attempt."""
        if self._retrier is not None:
            self._retrier.cancel()
            await asyncio.gather(self._retrier, return_exceptions=True)
        if self._unsaved:
            await self._retry(once=True)
        if self._unsaved:
            log.error("live: %d message(s) could not be stored", len(self._unsaved))

    async def _write(self, message: Message, peer: Peer) -> None:
        async with self.db.transaction() as conn:
            if self._peers.get(peer.peer_id) != peer:
                await history.upsert_peers_in(conn, [peer])
            await history.upsert_messages_in(conn, [message])
        self._peers[peer.peer_id] = peer

    async def _retry(self, *, once: bool = False) -> None:
        delay = 1.0
        while self._unsaved:
            for key, (message, peer) in list(self._unsaved.items()):
                try:
                    await self._write(message, peer)
                except Exception as exc:
                    log.debug("live: store retry failed: %s", describe(exc))
                    continue
                self._unsaved.pop(key, None)
            if once or not self._unsaved:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY_S)
        if not self._unsaved:
            log.info("live: the messages that could not be stored are stored now")

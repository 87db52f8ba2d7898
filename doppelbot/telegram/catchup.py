"""What happened while the bot was down, fetched at start.

Telethon's own catch-up (``catch_up=True``) replays missed updates from the update state a file
session keeps, but a string session keeps none, a long gap makes Telegram answer "too long",
and an update already fetched before a crash is gone for good. So every start also walks the
recent dialogs: a private chat whose newest message is newer than the newest one stored gets
its missing messages fetched and stored, and each chat's newest incoming message becomes a
candidate the responder may answer (its catch-up rules decide). The owner's Saved Messages
notes written meanwhile are fetched too, for the review workflow to apply in order.

Nothing here decides whether to answer; it only reads Telegram and writes the store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from telethon import TelegramClient
from telethon import errors as tg_errors
from telethon.tl import types

from doppelbot.core.domain import Message, Peer
from doppelbot.core.errors import describe
from doppelbot.responder.service import CatchUpCandidate
from doppelbot.store import history
from doppelbot.store.database import Database
from doppelbot.telegram.errors import translate
from doppelbot.telegram.mapping import map_message, map_peer

log = logging.getLogger("doppelbot.catchup")

#: Dialogs read at start (newest first): also how far back a downtime is caught up.
DIALOGS = 200
#: Messages fetched per chat at most; a chat with more missing keeps the newest.
PER_CHAT = 200
#: Saved Messages notes fetched at most (the owner's answers written while down).
SAVED_NOTES = 200


@dataclass
class CatchUpReport:
    dialogs: int = 0
    chats_synced: int = 0
    messages_stored: int = 0
    errors: int = 0
    candidates: list[CatchUpCandidate] = field(default_factory=list)
    saved_backlog: list[Message] = field(default_factory=list)
    saved_top_id: int = 0
    #: Per chat, the newest message id the sync saw: what is newer arrived live.
    tops: dict[int, int] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        return {
            "dialogs": self.dialogs,
            "chats_synced": self.chats_synced,
            "messages_stored": self.messages_stored,
            "saved_notes": len(self.saved_backlog),
            "errors": self.errors,
        }


_FAILURES = (tg_errors.RPCError, ConnectionError, OSError, TimeoutError, ValueError)


async def sync_after_downtime(
    client: TelegramClient,
    db: Database,
    *,
    owner_id: int,
    stores: Callable[[Peer], bool],
    saved_seen: int | None,
) -> CatchUpReport:
    """Fetch and store what the dialogs show is missing; see the module docstring."""
    report = CatchUpReport()
    try:
        dialogs = await client.get_dialogs(limit=DIALOGS)
    except _FAILURES as exc:
        report.errors += 1
        log.warning("catch-up: cannot read the dialogs (%s)", describe(translate(exc)))
        return report
    report.dialogs = len(dialogs)
    for dialog in dialogs:
        entity = dialog.entity
        if entity is None:
            continue
        peer = map_peer(entity)
        top = dialog.message
        top_id = int(top.id) if top is not None else 0
        if peer.is_self or peer.peer_id == owner_id:
            report.saved_top_id = top_id
            continue
        report.tops[peer.peer_id] = top_id
        if not stores(peer) or peer.kind.value != "user" or peer.is_deleted:
            continue
        try:
            stored = await history.newest_message_id(db, peer.peer_id)
            if top_id > stored:
                found = await client.get_messages(entity, limit=PER_CHAT, min_id=stored)
                messages = [
                    map_message(m, owner_id=owner_id, chat_id=peer.peer_id)
                    for m in found
                    if isinstance(m, types.Message | types.MessageService)
                ]
                async with db.transaction() as conn:
                    await history.upsert_peers_in(conn, [peer])
                    await history.upsert_messages_in(conn, messages)
                report.chats_synced += 1
                report.messages_stored += len(messages)
            candidate = await _candidate(db, peer, dialog)
        except _FAILURES as exc:
            report.errors += 1
            log.warning("catch-up: chat=%d not synced (%s)", peer.peer_id, describe(translate(exc)))
            continue
        if candidate is not None:
            report.candidates.append(candidate)
    if saved_seen is not None and report.saved_top_id > saved_seen:
        try:
            found = await client.get_messages("me", limit=SAVED_NOTES, min_id=saved_seen)
        except _FAILURES as exc:
            report.errors += 1
            log.warning("catch-up: Saved Messages not read (%s)", describe(translate(exc)))
        else:
            report.saved_backlog = sorted(
                (
                    map_message(m, owner_id=owner_id, chat_id=owner_id)
                    for m in found
                    if isinstance(m, types.Message)
                ),
                key=lambda m: m.message_id,
            )
    return report


async def _candidate(db: Database, peer: Peer, dialog: Any) -> CatchUpCandidate | None:
    """The chat's newest stored message, when it is the other person's (or None: the owner
    or the bot spoke last, nothing waits for an answer)."""
    recent = await history.recent_messages(db, peer.peer_id, 1)
    if not recent or recent[-1].is_service or recent[-1].is_outgoing:
        return None
    newest = recent[-1]
    read_max = int(getattr(dialog.dialog, "read_inbox_max_id", 0) or 0)
    return CatchUpCandidate(
        message=newest,
        peer=peer,
        read_by_owner=read_max >= newest.message_id,
    )

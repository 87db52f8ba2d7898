"""Which of the owner's dialogs an export reads.

Private chats by default; groups, channels and Saved Messages when asked for; bots and deleted
accounts never unless listed by name. ``--chat`` lists chats by id or @username (then their
kind does not matter), and ``--replied-only`` keeps only chats where the owner has written.
What is left out is counted by reason for the report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from telethon import TelegramClient, utils
from telethon.tl import types

from doppelbot.core.domain import Peer, PeerKind
from doppelbot.store import history
from doppelbot.store.database import Database
from doppelbot.telegram.export_types import ExportOptions
from doppelbot.telegram.mapping import map_peer


@dataclass(slots=True)
class ChatTarget:
    chat_id: int
    entity: Any
    peer: Peer
    name: str
    input_peer: Any = None  # resolved when the chat's export starts


@dataclass(slots=True)
class Selection:
    targets: list[ChatTarget] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason → chats left out
    not_found: list[str] = field(default_factory=list)  # listed chats not among the dialogs

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


async def list_dialogs(client: TelegramClient) -> list[Any]:
    # Dialogs are few (hundreds); collecting them is fine, unlike messages.
    return [d async for d in client.iter_dialogs(ignore_migrated=True)]


async def select_chats(dialogs: Iterable[Any], options: ExportOptions, db: Database) -> Selection:
    """The chats of ``dialogs`` to export, in dialog order."""
    wanted = list(options.chats)
    matched: set[str] = set()
    selection = Selection()
    for dialog in dialogs:
        entity = dialog.entity
        peer = map_peer(entity)
        name = dialog.name or str(peer.peer_id)
        target = ChatTarget(utils.get_peer_id(entity), entity, peer, name)
        if wanted:
            hit = _matches(target, wanted)
            if hit is None:
                continue
            matched.add(hit)
        elif isinstance(entity, types.User):
            if peer.is_self and not options.include_saved:
                selection.skip("saved messages")
                continue
            if peer.is_bot:
                selection.skip("bots")
                continue
            if peer.is_deleted:
                selection.skip("deleted accounts")
                continue
        elif peer.kind is PeerKind.GROUP and not options.include_groups:
            selection.skip("groups")
            continue
        elif peer.kind is PeerKind.CHANNEL and not options.include_channels:
            selection.skip("channels")
            continue
        if options.replied_only and not await _owner_wrote(dialog, target, db):
            selection.skip("no reply of yours")
            continue
        selection.targets.append(target)
    selection.not_found = [w for w in wanted if w not in matched]
    return selection


def _matches(target: ChatTarget, wanted: Iterable[str]) -> str | None:
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


async def _owner_wrote(dialog: Any, target: ChatTarget, db: Database) -> bool:
    """Cheap test for "I wrote here": no extra request.

    Telegram tells us up to which of *our* messages the other side has read
    (``read_outbox_max_id`` is 0 when we never sent one that was read); the dialog's last
    message may be ours; and the store may already hold our messages from a past run.
    """
    if getattr(dialog.dialog, "read_outbox_max_id", 0) or (
        dialog.message is not None and dialog.message.out
    ):
        return True
    return await history.has_outgoing(db, target.chat_id)

"""The live bot's Telegram side: event handlers → store → responder, and sending.

``TelethonTransport`` implements the responder's ``ChatTransport`` over a real
``TelegramClient`` (errors translated to ours: FloodWait becomes ``FloodWaitError`` so the core
decides how long to wait). ``LiveBot`` turns Telethon's update events into domain messages,
writes every private message it sees (incoming and outgoing, from any device) into SQLite —
so the reply context is always the real recent history — and hands new ones to the responder
and to its listeners (the owner's notes in Saved Messages, reactions). Both are built by the
composition root (``doppelbot.app``), which also runs the start-up catch-up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from telethon import TelegramClient, events
from telethon import errors as tg_errors
from telethon import utils as tg_utils
from telethon.tl import functions, types

from doppelbot.config import Settings
from doppelbot.core.domain import Message, Peer, PeerKind, Reaction
from doppelbot.core.errors import FloodWaitError, describe
from doppelbot.core.ports import Transcriber
from doppelbot.responder.service import Responder
from doppelbot.responder.transport import Clock
from doppelbot.store.database import Database
from doppelbot.store.writer import MessageWriter
from doppelbot.telegram.errors import translate
from doppelbot.telegram.mapping import map_message, map_peer
from doppelbot.telegram.voice import transcribe_incoming

log = logging.getLogger("doppelbot.live")


MessageListener = Callable[[Message, Peer], Awaitable[None]]
#: (chat id, message id, the message's current reactions): from UpdateMessageReactions and from
#: edits that carry a reactions field.
ReactionListener = Callable[[int, int, Sequence[Reaction]], Awaitable[None]]
EventHandler = Callable[["LiveBot", Any], Awaitable[None]]


def map_reactions(chat_id: int, message_id: int, reactions: Any) -> list[Reaction]:
    """Telegram's ``MessageReactions`` → the current state, one row per emoji.

    ``chosen_order`` marks the owner's own pick; the rest of a count is other people's. A row
    is ``by_owner`` only when nobody else chose that emoji (feedback reads other people's)."""
    out: list[Reaction] = []
    for result in getattr(reactions, "results", None) or ():
        reaction = result.reaction
        if isinstance(reaction, types.ReactionEmoji):
            emoji = reaction.emoticon
        elif isinstance(reaction, types.ReactionCustomEmoji):
            emoji = f"custom:{reaction.document_id}"
        else:  # paid stars and future kinds carry no opinion we can read
            continue
        own = 1 if result.chosen_order is not None else 0
        others = max(0, int(result.count) - own)
        if others:
            out.append(Reaction(chat_id, message_id, emoji, others, False))
        elif own:
            out.append(Reaction(chat_id, message_id, emoji, 1, True))
    return out


class TelethonTransport:
    """``ChatTransport`` over Telethon."""

    def __init__(self, client: TelegramClient) -> None:
        self.client = client
        self.owner_id = 0  # known once logged in (``start``)

    def start(self, owner_id: int) -> None:
        self.owner_id = owner_id

    async def send_message(
        self, chat_id: int, text: str, *, reply_to: int | None = None
    ) -> Message:
        try:
            # parse_mode=None: the text goes out exactly as generated (no Markdown turning
            # "**" into bold), so a restart can find it again by comparing texts.
            sent = await self.client.send_message(chat_id, text, reply_to=reply_to, parse_mode=None)
        except tg_errors.FloodWaitError as exc:
            raise FloodWaitError(exc.seconds, "message") from exc
        except (tg_errors.RPCError, ConnectionError, OSError, TimeoutError, ValueError) as exc:
            raise translate(exc) from exc
        return map_message(sent, owner_id=self.owner_id, chat_id=chat_id)

    async def set_typing(self, chat_id: int, typing: bool = True) -> None:
        action: Any = types.SendMessageTypingAction() if typing else types.SendMessageCancelAction()
        try:
            peer = await self.client.get_input_entity(chat_id)
            await self.client(functions.messages.SetTypingRequest(peer=peer, action=action))
        except (tg_errors.RPCError, ConnectionError, OSError, TimeoutError, ValueError) as exc:
            raise translate(exc) from exc

    async def recent_outgoing(self, chat_id: int, *, min_id: int = 0) -> Sequence[Message]:
        try:
            found = await self.client.get_messages(chat_id, limit=100, min_id=min_id)
        except tg_errors.FloodWaitError as exc:
            raise FloodWaitError(exc.seconds, "history") from exc
        except (tg_errors.RPCError, ConnectionError, OSError, TimeoutError, ValueError) as exc:
            raise translate(exc) from exc
        return [
            map_message(m, owner_id=self.owner_id, chat_id=chat_id)
            for m in found
            if getattr(m, "out", False) and isinstance(m, types.Message)
        ]


def _guarded(what: str) -> Callable[[EventHandler], EventHandler]:
    """An event handler of ``LiveBot``: kept until ``start`` when it comes early, tracked so
    ``aclose`` can wait for it, and never fatal (an update must never take the bot down)."""

    def wrap(handle: EventHandler) -> EventHandler:
        @functools.wraps(handle)
        async def handler(self: LiveBot, event: Any) -> None:
            if self._closing or self._defer(getattr(self, handle.__name__), event):
                return
            with self._tracked():
                try:
                    await handle(self, event)
                except Exception as exc:
                    log.error("live: %s not handled: %s", what, describe(exc))

        return handler

    return wrap


class LiveBot:
    """Telethon update events → the store → the responder and the listeners.

    Installed before the client connects, so nothing Telethon's catch-up replays right after
    connecting is missed: events that arrive before ``start`` (the logged-in account is not
    known until then) are kept and handled then. Every message is stored at once, but
    incoming ones reach the responder only after the start-up sync (``caught_up``), and only
    when newer than what the sync saw in that chat — what arrived while the bot was down is
    the catch-up's to decide, however it is delivered (Telethon replays it as updates too).
    """

    def __init__(
        self,
        client: TelegramClient,
        db: Database,
        settings: Settings,
        *,
        writer: MessageWriter,
        responder: Responder | None,
        listeners: Sequence[MessageListener] = (),
        reaction_listeners: Sequence[ReactionListener] = (),
        transcriber: Transcriber | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.client = client
        self.db = db
        self.settings = settings
        self.writer = writer
        self.responder = responder
        #: Called for every new message the bot sees, Saved Messages included (the owner's
        #: notes are read there).
        self.listeners = tuple(listeners)
        #: Called with the current reactions of a message, in any chat (feedback capture,
        #: reactions on review cards).
        self.reaction_listeners = tuple(reaction_listeners)
        #: Voice and round-video notes in private chats are transcribed (bounded in time)
        #: before the responder hears of them, so a reply answers what they said.
        self.transcriber = transcriber
        self.clock = clock or Clock()
        self.owner_id: int | None = None
        #: When the newest update of any kind arrived, and Telegram's account-wide sequence
        #: number (pts) of the newest one that carries it: the watchdog compares both.
        self.last_update_at = self.clock.time()
        self.last_pts: int | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self._early: list[tuple[Callable[[Any], Awaitable[None]], Any]] = []
        self._started = False
        self._closing = False
        self._installed = False
        self._synced: dict[int, int] | None = None  # None until the start-up sync is done
        self._held: list[tuple[Message, Peer]] = []
        self._handlers: list[tuple[Callable[..., Any], Any]] = [
            (self._on_new, events.NewMessage()),
            (self._on_edit, events.MessageEdited()),
            (self._on_reactions, events.Raw(types.UpdateMessageReactions)),
            (self._on_any, events.Raw()),
        ]

    def install(self) -> None:
        """Add the event handlers (before connecting: see the class docstring)."""
        if self._installed:
            return
        self._installed = True
        for callback, event in self._handlers:
            self.client.add_event_handler(callback, event)

    async def start(self, owner_id: int) -> None:
        """Begin handling events as ``owner_id`` (those that came early are handled now)."""
        self.owner_id = owner_id
        self.install()
        self._started = True
        early, self._early = self._early, []
        for handler, event in early:
            await handler(event)

    async def caught_up(self, tops: dict[int, int]) -> None:
        """The start-up sync saw each chat up to ``tops[chat]``: incoming messages held until
        now reach the responder when they are newer than that, and so do later ones."""
        self._synced = dict(tops)
        held, self._held = self._held, []
        for message, peer in held:
            await self._to_responder(message, peer)

    async def _to_responder(self, message: Message, peer: Peer) -> None:
        if self.responder is None or peer.is_self:
            return
        if not message.is_outgoing:
            if self._synced is None:
                self._held.append((message, peer))
                return
            if message.message_id <= self._synced.get(message.chat_id, 0):
                return  # the catch-up already decided about it
        await self.responder.on_message(message, peer)

    async def aclose(self) -> None:
        """Stop taking events and wait for the handlers already running."""
        self._closing = True
        for callback, event in self._handlers:
            self.client.remove_event_handler(callback, event)
        if self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    def stores(self, peer: Peer) -> bool:
        """Which chats are kept current in the store: private chats with people, and groups
        when group replies are switched on (their context is needed then)."""
        if peer.is_self or peer.kind in (PeerKind.BOT, PeerKind.CHANNEL):
            return False
        if peer.kind is PeerKind.GROUP:
            return self.settings.responder.group_reply_probability > 0
        return True

    async def _seen(self, event: Any) -> tuple[Message, Peer] | None:
        """The event's message as ours, with its chat, stored when the chat is kept (None: a
        chat we cannot see)."""
        assert self.owner_id is not None
        entity = event.chat if event.chat is not None else await event.get_chat()
        if entity is None:
            return None
        peer = map_peer(entity)
        message = map_message(event.message, owner_id=self.owner_id, chat_id=peer.peer_id)
        if self.stores(peer):
            await self.writer.save(message, peer)
        return message, peer

    @contextmanager
    def _tracked(self) -> Iterator[None]:
        """Track the running handler so ``aclose`` can await what is in flight."""
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            yield
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def transcribe(self, message: Any) -> None:
        """Transcribe a voice or round-video note (Telethon message) and store the result;
        never raises and never waits longer than the download and transcription timeouts —
        a note that cannot be transcribed is answered without its words."""
        if self.transcriber is None:
            return
        try:
            row = await transcribe_incoming(
                self.client,
                self.db,
                self.transcriber,
                message,
                self.settings.voice,
                download_timeout_s=self.settings.voice.timeout_s,
            )
        except Exception as exc:
            log.warning("live: voice note not transcribed: %s", describe(exc))
            return
        if row is not None and not row.usable:
            log.info("live: voice note without a transcript (%s)", row.status)

    async def transcribe_recent(self, chat_id: int, message_ids: Sequence[int]) -> None:
        """Transcribe the notes among ``message_ids`` of a chat (what arrived while down)."""
        if self.transcriber is None or not message_ids:
            return
        try:
            found = await self.client.get_messages(chat_id, ids=list(message_ids))
        except (tg_errors.RPCError, ConnectionError, OSError, ValueError) as exc:
            log.warning("live: voice notes not fetched: %s", describe(translate(exc)))
            return
        for message in found or ():
            if message is not None:
                await self.transcribe(message)

    def _defer(self, handler: Callable[[Any], Awaitable[None]], event: Any) -> bool:
        """Before ``start``: keep the event for later. True when kept."""
        if self._started:
            return False
        self._early.append((handler, event))
        return True

    def known_pts(self) -> int | None:
        """The account's update sequence number this client has processed: Telethon's own
        count (it includes updates about our own sends), else the newest one we saw."""
        box = getattr(self.client, "_message_box", None)
        try:
            pts = box.session_state()[0]["pts"] if box is not None else None
        except Exception:  # Telethon internals moved: fall back to what we saw ourselves
            pts = None
        if isinstance(pts, int) and pts > 0:
            return pts
        return self.last_pts

    async def _on_any(self, update: Any) -> None:
        self.last_update_at = self.clock.time()
        pts = getattr(update, "pts", None)
        if isinstance(pts, int) and not _is_channel_update(update):
            self.last_pts = pts if self.last_pts is None else max(self.last_pts, pts)

    @_guarded("update")
    async def _on_new(self, event: Any) -> None:
        if (seen := await self._seen(event)) is None:
            return
        message, peer = seen
        if message.is_voice_note and peer.kind is PeerKind.USER and not peer.is_self:
            await self.transcribe(event.message)
        await self._to_responder(message, peer)
        for listener in self.listeners:
            await listener(message, peer)

    @_guarded("edit")
    async def _on_edit(self, event: Any) -> None:
        if (seen := await self._seen(event)) is None:
            return
        peer = seen[1]
        # Reactions may arrive as an edit of the message that carries them; no field means
        # "no news about reactions", not "none".
        reactions = getattr(event.message, "reactions", None)
        if reactions is not None:
            await self._emit_reactions(peer.peer_id, int(event.message.id), reactions)

    @_guarded("reactions")
    async def _on_reactions(self, update: Any) -> None:
        chat_id = tg_utils.get_peer_id(update.peer)
        await self._emit_reactions(chat_id, int(update.msg_id), update.reactions)

    async def _emit_reactions(self, chat_id: int, message_id: int, reactions: Any) -> None:
        current = map_reactions(chat_id, message_id, reactions)
        for listener in self.reaction_listeners:
            await listener(chat_id, message_id, current)


def _is_channel_update(update: Any) -> bool:
    """Channel updates count their own pts; only the account's sequence is compared."""
    if hasattr(update, "channel_id"):
        return True
    message = getattr(update, "message", None)
    return isinstance(getattr(message, "peer_id", None), types.PeerChannel)

"""The live bot's Telegram side: event handlers → store → responder, and sending.

``TelethonTransport`` implements the responder's ``ChatTransport`` over a real
``TelegramClient`` (errors translated to ours: FloodWait becomes ``FloodWaitError`` so the core
decides how long to wait). ``LiveBot`` turns Telethon's update events into domain messages,
writes every private message it sees (incoming and outgoing, from any device) into SQLite —
so the reply context is always the real recent history — and hands new ones to the responder.
``run_live`` wires it all for ``doppelbot run`` with the model and the knowledge base passed in,
so this module never imports torch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from telethon import TelegramClient, events
from telethon import errors as tg_errors
from telethon import utils as tg_utils
from telethon.tl import functions, types

from doppelbot.config import Settings
from doppelbot.domain import Message, Peer, PeerKind, Reaction
from doppelbot.errors import DoppelbotError, FloodWaitError
from doppelbot.ports import FactRetriever, ReplyGenerator
from doppelbot.responder.loopmon import LoopLagMonitor
from doppelbot.responder.service import DraftSink, Responder, describe
from doppelbot.store import history
from doppelbot.store.database import Database
from doppelbot.telegram.errors import translate
from doppelbot.telegram.mapping import map_account, map_message, map_peer

log = logging.getLogger("doppelbot.live")

#: Dialogs read at start so Telethon knows the access hashes of recent chats (a string
#: session keeps no entity cache between runs).
WARM_DIALOGS = 200

MessageListener = Callable[[Message, Peer], Awaitable[None]]
#: (chat id, message id, the message's current reactions): from UpdateMessageReactions and from
#: edits that carry a reactions field.
ReactionListener = Callable[[int, int, Sequence[Reaction]], Awaitable[None]]


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

    def __init__(self, client: TelegramClient, owner_id: int) -> None:
        self.client = client
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


class LiveBot:
    """Telethon update events → the store → the responder (and any extra listeners)."""

    def __init__(
        self,
        client: TelegramClient,
        db: Database,
        settings: Settings,
        *,
        owner_id: int,
        responder: Responder | None = None,
    ) -> None:
        self.client = client
        self.db = db
        self.settings = settings
        self.owner_id = owner_id
        self.responder = responder
        #: Called for every new message the bot sees, Saved Messages included (the review
        #: workflow reads owner commands there).
        self.listeners: list[MessageListener] = []
        #: Called with the current reactions of a message, in any chat (feedback capture,
        #: reactions on review cards).
        self.reaction_listeners: list[ReactionListener] = []
        self._peers: dict[int, Peer] = {}
        self._inflight: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._handlers: list[tuple[Callable[..., Any], Any]] = [
            (self._on_new, events.NewMessage()),
            (self._on_edit, events.MessageEdited()),
            (self._on_reactions, events.Raw(types.UpdateMessageReactions)),
        ]

    def install(self) -> None:
        for callback, event in self._handlers:
            self.client.add_event_handler(callback, event)

    async def aclose(self) -> None:
        """Stop taking events and wait for the handlers already running."""
        self._closing = True
        for callback, event in self._handlers:
            self.client.remove_event_handler(callback, event)
        if self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    def _stores(self, peer: Peer) -> bool:
        """Which chats are kept current in the store: private chats with people, and groups
        when group replies are switched on (their context is needed then)."""
        if peer.is_self or peer.kind in (PeerKind.BOT, PeerKind.CHANNEL):
            return False
        if peer.kind is PeerKind.GROUP:
            return self.settings.group_reply_probability > 0
        return True

    async def _peer(self, event: Any) -> Peer | None:
        entity = event.chat if event.chat is not None else await event.get_chat()
        if entity is None:
            return None
        return map_peer(entity)

    async def _save(self, message: Message, peer: Peer) -> None:
        async with self.db.transaction() as conn:
            if self._peers.get(peer.peer_id) != peer:
                await history.upsert_peers_in(conn, [peer])
            await history.upsert_messages_in(conn, [message])
        self._peers[peer.peer_id] = peer

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

    async def _on_new(self, event: Any) -> None:
        if self._closing:
            return
        with self._tracked():
            try:
                peer = await self._peer(event)
                if peer is None:
                    return
                message = map_message(event.message, owner_id=self.owner_id, chat_id=peer.peer_id)
                if self._stores(peer):
                    await self._save(message, peer)
                if self.responder is not None and not peer.is_self:
                    await self.responder.on_message(message, peer)
                for listener in self.listeners:
                    await listener(message, peer)
            except Exception as exc:  # an update must never take the bot down
                log.error("live: update not handled: %s", describe(exc))

    async def _on_edit(self, event: Any) -> None:
        if self._closing:
            return
        with self._tracked():
            try:
                peer = await self._peer(event)
                if peer is None:
                    return
                if self._stores(peer):
                    message = map_message(
                        event.message, owner_id=self.owner_id, chat_id=peer.peer_id
                    )
                    await self._save(message, peer)
                # Reactions may arrive as an edit of the message that carries them; no field
                # means "no news about reactions", not "none".
                reactions = getattr(event.message, "reactions", None)
                if reactions is not None:
                    await self._emit_reactions(peer.peer_id, int(event.message.id), reactions)
            except Exception as exc:
                log.error("live: edit not handled: %s", describe(exc))

    async def _on_reactions(self, update: Any) -> None:
        if self._closing:
            return
        with self._tracked():
            try:
                chat_id = tg_utils.get_peer_id(update.peer)
                await self._emit_reactions(chat_id, int(update.msg_id), update.reactions)
            except Exception as exc:
                log.error("live: reactions not handled: %s", describe(exc))

    async def _emit_reactions(self, chat_id: int, message_id: int, reactions: Any) -> None:
        current = map_reactions(chat_id, message_id, reactions)
        for listener in self.reaction_listeners:
            await listener(chat_id, message_id, current)


@dataclass
class LiveSession:
    """What ``run_live`` built; passed to ``on_ready`` (tests, the review workflow)."""

    client: TelegramClient
    db: Database
    owner_id: int
    transport: TelethonTransport
    responder: Responder
    bot: LiveBot
    monitor: LoopLagMonitor
    extras: dict[str, Any] = field(default_factory=dict)


async def run_live(
    settings: Settings,
    db: Database,
    client: TelegramClient,
    *,
    generator: ReplyGenerator,
    facts: FactRetriever | None = None,
    stop: asyncio.Event,
    drafts: DraftSink | None = None,
    on_ready: Callable[[LiveSession], Awaitable[None]] | None = None,
    responder_kwargs: dict[str, Any] | None = None,
) -> LiveSession:
    """Run the bot on a connected, authorised ``client`` until ``stop`` is set or Telegram
    disconnects for good; then stop in order: events → responder → (caller closes the rest)."""
    me = await client.get_me()
    if me is None:
        raise DoppelbotError("Telegram did not return the logged-in account")
    owner_id = int(me.id)
    await history.save_account(db, map_account(me))
    try:
        await client.get_dialogs(limit=WARM_DIALOGS)
    except (tg_errors.RPCError, ConnectionError, OSError) as exc:
        log.warning("live: could not read dialogs at start: %s", describe(translate(exc)))
    transport = TelethonTransport(client, owner_id)
    responder = Responder(
        settings,
        db,
        owner_id=owner_id,
        transport=transport,
        generator=generator,
        facts=facts,
        drafts=drafts,
        **(responder_kwargs or {}),
    )
    bot = LiveBot(client, db, settings, owner_id=owner_id, responder=responder)
    monitor = LoopLagMonitor(interval_s=0.05)
    session = LiveSession(client, db, owner_id, transport, responder, bot, monitor)
    bot.install()
    monitor.start()
    try:
        await responder.start()
        log.info(
            "live: running as user %d, mode=%s, debounce=%.1fs",
            owner_id,
            settings.reply_mode,
            settings.debounce_s,
        )
        if on_ready is not None:
            await on_ready(session)
        disconnected = asyncio.ensure_future(client.disconnected)
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({disconnected, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (disconnected, stopped):
                fut.cancel()
            await asyncio.gather(disconnected, stopped, return_exceptions=True)
        if not stop.is_set():
            log.warning("live: Telegram disconnected; stopping")
    finally:
        await bot.aclose()
        await responder.aclose()
        await monitor.stop()
        log.info(
            "live: stopped (sent=%d, loop lag p99=%.0f ms)",
            responder.stats["sent"],
            monitor.percentile(99) * 1000,
        )
    return session

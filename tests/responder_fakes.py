"""Plain fakes for the responder core's unit tests: a Telegram transport, a reply generator
and a harness that stores messages like the adapter does before handing them to the core."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doppelbot.config import GenerationOptions, Settings, load_settings
from doppelbot.core.domain import Message, Peer, PeerKind
from doppelbot.core.errors import FloodWaitError, GenerationError
from doppelbot.core.ports import ModelIdentity, ScoredFact
from doppelbot.responder.compose import ReplyComposer
from doppelbot.responder.service import Responder
from doppelbot.store import history
from doppelbot.store.database import Database

OWNER = 100


def fast_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Tiny debounce, no human delays, a short "typing…": tests stay fast."""
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "reply_mode": "auto",
        "debounce_s": 0.05,
        "human_delay_min_s": 0.0,
        "human_delay_max_s": 0.0,
        "typing_chars_per_s": 1000.0,
        "typing_max_s": 0.01,
        "takeover_minutes": 30.0,
        "shutdown_grace_s": 0.1,  # crash tests hang sends on purpose
    }
    values.update(overrides)
    return load_settings(env_file=None, **values)


@dataclass
class Sent:
    chat_id: int
    message_id: int
    text: str


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.typing: list[int] = []
        self.outgoing: dict[int, list[Message]] = {}
        self._next_id = 10_000
        self.flood_waits: list[int] = []  # next sends raise FloodWait with these seconds
        self.fail_sends = 0
        self.hold: asyncio.Event | None = None  # when set: sends wait for it (crash tests)
        self.hold_after_send = False

    async def send_message(
        self, chat_id: int, text: str, *, reply_to: int | None = None
    ) -> Message:
        if self.flood_waits:
            raise FloodWaitError(self.flood_waits.pop(0), "message")
        if self.fail_sends:
            self.fail_sends -= 1
            raise ConnectionError("network down")
        if self.hold is not None and not self.hold_after_send:
            await self.hold.wait()
        self._next_id += 1
        msg = Message(chat_id, self._next_id, OWNER, True, int(time.time()), text)
        self.sent.append(Sent(chat_id, msg.message_id, text))
        self.outgoing.setdefault(chat_id, []).append(msg)
        if self.hold is not None and self.hold_after_send:
            await self.hold.wait()
        return msg

    async def set_typing(self, chat_id: int, typing: bool = True) -> None:
        self.typing.append(chat_id)

    async def recent_outgoing(self, chat_id: int, *, min_id: int = 0) -> Sequence[Message]:
        return [m for m in self.outgoing.get(chat_id, []) if m.message_id > min_id]

    def texts(self, chat_id: int | None = None) -> list[str]:
        return [s.text for s in self.sent if chat_id is None or s.chat_id == chat_id]


class FakeGenerator:
    def __init__(self, reply: str = "ок, понял") -> None:
        self.reply = reply
        self.prompts: list[str] = []
        self.fail: BaseException | None = None
        self.gate: asyncio.Event | None = None  # when set: generations wait for it
        self.started = asyncio.Event()
        self.delay_s = 0.0

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity("fake-model", "fake-adapter")

    async def generate(self, prompt: str, options: GenerationOptions) -> str:
        self.prompts.append(prompt)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return self.reply


class FailingGenerator(FakeGenerator):
    def __init__(self) -> None:
        super().__init__()
        self.fail = GenerationError("boom")


class FakeFacts:
    """Retrieves ``facts``; ``similarity`` scores every candidate ``reply_score``."""

    def __init__(self, facts: list[ScoredFact], reply_score: float = 0.5) -> None:
        self.facts = facts
        self.reply_score = reply_score
        self.queries: list[str] = []

    async def retrieve(
        self, query: str, *, top_k: int | None = None, threshold: float | None = None
    ) -> list[ScoredFact]:
        self.queries.append(query)
        return list(self.facts)

    async def similarity(self, query: str, candidates: Sequence[str]) -> list[float]:
        return [self.reply_score for _ in candidates]


def user(peer_id: int, **kw: Any) -> Peer:
    kw.setdefault("first_name", f"U{peer_id}")
    kw.setdefault("is_contact", True)
    return Peer(peer_id, kw.pop("kind", PeerKind.USER), **kw)


@dataclass
class Harness:
    db: Database
    settings: Settings
    transport: FakeTransport
    generator: FakeGenerator
    responder: Responder
    facts: Any = None

    def next_id(self, chat_id: int) -> int:
        # One id sequence for the whole account, shared with the transport's sends (as in
        # Telegram's private chats), so ids grow in time order.
        self.transport._next_id += 1
        return self.transport._next_id

    async def incoming(self, peer: Peer, text: str, **kw: Any) -> Message:
        msg = Message(
            peer.peer_id,
            kw.pop("message_id", None) or self.next_id(peer.peer_id),
            kw.pop("sender_id", peer.peer_id),
            False,
            kw.pop("date", int(time.time())),
            text,
            **kw,
        )
        await history.upsert_peers(self.db, [peer])
        await history.upsert_messages(self.db, [msg])
        await self.responder.on_message(msg, peer)
        return msg

    async def owner_writes(self, peer: Peer, text: str) -> Message:
        msg = Message(peer.peer_id, self.next_id(peer.peer_id), OWNER, True, int(time.time()), text)
        await history.upsert_messages(self.db, [msg])
        await self.responder.on_message(msg, peer)
        return msg

    async def idle(self, limit_s: float = 10.0) -> None:
        async with asyncio.timeout(limit_s):
            await self.responder.wait_idle()


async def wait_for(predicate: Callable[[], Any], limit_s: float = 5.0) -> None:
    """Poll ``predicate`` (sync or async) until it is truthy; fails after ``limit_s``."""
    async with asyncio.timeout(limit_s):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return
            await asyncio.sleep(0.01)


def make_responder(
    settings: Settings,
    db: Database,
    transport: FakeTransport,
    generator: FakeGenerator,
    **kw: Any,
) -> Responder:
    facts = kw.pop("facts", None)
    kw.setdefault("composer", ReplyComposer(settings, facts=facts))
    return Responder(settings, db, owner_id=OWNER, transport=transport, generator=generator, **kw)

"""The bot running in-process on the fake Telegram: the one harness of the end-to-end tests.

``start_bot`` runs ``doppelbot run``'s own wiring (``serve``, with the review) or the bare
responder (``run_live`` without it) on the real Telethon client — only its MTProto sender is
the in-process fake — and hands back a ``Run`` that waits for the bot to go idle and reads
what it sent. ``Life`` adds restarts that do not need a real process to die: the bot is
started with a Telethon *file* session (so Telethon's own catch-up replays missed updates, as
in production), stopped, and started again on one data directory; the fake keeps receiving
messages while it is stopped. The model is scripted where the tests are about the daemon, not
the text.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from telethon.sessions import SQLiteSession

from doppelbot.app import App, run_live, serve
from doppelbot.cli.common import open_db
from doppelbot.config import GenerationOptions, Settings
from doppelbot.core.ports import ModelIdentity, ReplyGenerator
from doppelbot.instance import invoked_with
from doppelbot.review.cards import CARD_MARK
from doppelbot.store.database import Database
from tests.faketg import OWNER_ID, FakeTelegram
from tests.responder_fakes import fast_settings, wait_for

Patch = Callable[[App], Awaitable[None]]


class Scripted:
    """Answers with the next scripted text (the last one repeats); ``gate`` holds generations."""

    def __init__(self, *texts: str) -> None:
        self.texts = list(texts) or ["ок"]
        self.prompts: list[str] = []
        self.gate: asyncio.Event | None = None

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity("scripted", None)

    async def generate(self, prompt: str, options: GenerationOptions) -> str:
        self.prompts.append(prompt)
        if self.gate is not None:
            await self.gate.wait()
        return self.texts[min(len(self.prompts), len(self.texts)) - 1]


@dataclass
class Run:
    """One running bot."""

    tg: FakeTelegram
    settings: Settings
    session: App
    gen: Any
    task: asyncio.Task[Any]
    stop: asyncio.Event
    client: Any

    @property
    def db(self) -> Database:
        return self.session.db

    @property
    def responder(self) -> Any:
        return self.session.responder

    async def quiet(self, limit_s: float = 20.0) -> None:
        """Until the start-up catch-up is done, Telethon dispatched everything pushed and the
        bot and its responder are idle (twice in a row: one idle moment can be a hand-over)."""

        async def calm() -> bool:
            await self.tg.settle()
            return (
                self.session.bot._synced is not None  # the start-up catch-up is done
                and not self.client._event_handler_tasks
                and not self.session.bot._inflight
                and not self.responder.busy
            )

        async with asyncio.timeout(limit_s):
            while True:  # polling: idleness spans Telethon's tasks, the bot's and timers
                if await calm() and await calm():
                    return
                await asyncio.sleep(0.01)

    def sent_to(self, peer: Any) -> list[str]:
        chat = self.tg.marked_id(peer)
        return [s.text for s in self.tg.sent if s.chat_id == chat]

    def saved(self) -> list[Any]:
        """What the bot posted in Saved Messages (cards and answers)."""
        return [s for s in self.tg.sent if s.chat_id == OWNER_ID]

    def cards(self) -> list[Any]:
        return [s for s in self.saved() if s.text.startswith(CARD_MARK)]

    def card_text(self, card_id: int) -> str:
        return str(self.tg._chat(OWNER_ID).msgs[card_id].message)

    def answers_to(self, message_id: int) -> list[str]:
        return [s.text for s in self.saved() if s.reply_to == message_id]

    async def owner_says(self, text: str, *, reply_to: int | None = None) -> int:
        """The owner writes in their Saved Messages (from the phone)."""
        msg = self.tg.push_outgoing(self.tg.me, text, reply_to=reply_to)
        await self.quiet()
        return int(msg.id)


@asynccontextmanager
async def start_bot(
    tg: FakeTelegram,
    settings: Settings,
    gen: ReplyGenerator,
    *,
    client: Any = None,
    db: Database | None = None,
    review: bool = True,
    patch: Patch | None = None,
    until: Literal["ready", "caught_up", "quiet"] = "ready",
) -> AsyncIterator[Run]:
    """The bot on ``tg``, stopped cleanly at the end of the block (its failure is raised).

    ``review``: ``doppelbot run`` (``serve``, which opens the store itself); False: the bare
    responder of a run without the review (``run_live``) on ``db`` (None: the settings' store).
    ``client``: a memory-session client of ``tg`` unless given. ``patch`` runs on the started
    app before its catch-up. The block begins once the app is ``ready``, its start-up catch-up
    is done (``caught_up``), or it is ``quiet``."""
    client = client or tg.client(flood_sleep_threshold=0)
    stop = asyncio.Event()
    ready: asyncio.Future[App] = asyncio.get_running_loop().create_future()

    async def on_ready(session: App) -> None:
        if patch is not None:
            await patch(session)
        ready.set_result(session)

    async def bare(db: Database) -> App:
        return await run_live(
            settings, db, client, generator=gen, stop=stop, on_ready=on_ready, review=False
        )

    async def main() -> App:
        if review:
            console = Console(file=io.StringIO())
            return await serve(
                settings, console, client=client, generator=gen, stop=stop, on_ready=on_ready
            )
        await client.connect()
        if db is not None:
            return await bare(db)
        async with open_db(settings) as own:
            return await bare(own)

    task = asyncio.create_task(main())
    try:
        async with asyncio.timeout(20):
            session = await asyncio.shield(ready)
        run = Run(tg, settings, session, gen, task, stop, client)
        if until == "caught_up":
            await wait_for(lambda: session.bot._synced is not None, 20)
        elif until == "quiet":
            await run.quiet()
        yield run
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await asyncio.gather(task, return_exceptions=True)
        if client.is_connected():
            await client.disconnect()
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


@dataclass
class Life:
    """A data directory, a fake Telegram and a login that survive restarts of the bot."""

    tmp_path: Path
    tg: FakeTelegram = field(default_factory=FakeTelegram)
    runs: int = 0

    @property
    def session_path(self) -> Path:
        return self.tmp_path / "data" / "doppelbot.session"

    def settings(self, **overrides: Any) -> Settings:
        return fast_settings(self.tmp_path, **overrides)

    @asynccontextmanager
    async def run(
        self, gen: Scripted | None = None, *, patch: Patch | None = None, **overrides: Any
    ) -> AsyncIterator[Run]:
        """Start ``doppelbot run`` (``serve``); stopped cleanly at the end of the block."""
        invoked_with(["run"])
        settings = self.settings(**overrides)
        self.session_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.runs == 0 and not self.session_path.exists():
            self.tg.file_session(self.session_path)
        self.runs += 1
        client = self.tg.client(
            session=SQLiteSession(str(self.session_path)),
            flood_sleep_threshold=0,
            catch_up=True,
        )
        async with start_bot(
            self.tg,
            settings,
            gen or Scripted(),
            client=client,
            patch=patch,
            until="caught_up",
        ) as run:
            yield run

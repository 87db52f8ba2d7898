"""``doppelbot run``'s own wiring (``serve``) in-process, over and over on one data directory.

For restart behaviour that does not need a real process to die: the bot is started with a
Telethon *file* session (so Telethon's own catch-up replays missed updates, as in production)
on the in-process fake Telegram, stopped, and started again; the fake keeps receiving messages
while it is stopped. ``crash()`` simulates a process dying mid-send by cancelling it with no
grace. The model is scripted: these tests are about the daemon, not the text.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from telethon.sessions import SQLiteSession

from doppelbot.app import App
from doppelbot.config import GenerationOptions, Settings
from doppelbot.core.ports import ModelIdentity
from tests.faketg import OWNER_ID, FakeTelegram
from tests.responder_fakes import fast_settings, wait_for


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
    gen: Scripted
    task: asyncio.Task[Any]
    stop: asyncio.Event
    client: Any

    @property
    def db(self) -> Any:
        return self.session.db

    @property
    def responder(self) -> Any:
        return self.session.responder

    async def quiet(self, limit_s: float = 15.0) -> None:
        async def calm() -> bool:
            await self.tg.settle()
            return (
                self.session.bot._synced is not None  # the start-up catch-up is done
                and not self.client._event_handler_tasks
                and not self.session.bot._inflight
                and not self.responder.busy
            )

        async with asyncio.timeout(limit_s):
            while True:
                if await calm() and await calm():
                    return
                await asyncio.sleep(0.01)

    def sent_to(self, peer: Any) -> list[str]:
        chat = self.tg.marked_id(peer)
        return [s.text for s in self.tg.sent if s.chat_id == chat]

    def cards(self) -> list[Any]:
        return [s for s in self.tg.sent if s.chat_id == OWNER_ID and s.text.startswith("🤖")]

    def card_text(self, card_id: int) -> str:
        return str(self.tg._chat(OWNER_ID).msgs[card_id].message)

    def answers_to(self, message_id: int) -> list[str]:
        return [s.text for s in self.tg.sent if s.chat_id == OWNER_ID and s.reply_to == message_id]

    async def owner_says(self, text: str, *, reply_to: int | None = None) -> int:
        msg = self.tg.push_outgoing(self.tg.me, text, reply_to=reply_to)
        await self.quiet()
        return int(msg.id)


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
        self, gen: Scripted | None = None, *, patch: Any = None, **overrides: Any
    ) -> AsyncIterator[Run]:
        """Start ``doppelbot run`` (``serve``); stopped cleanly at the end of the block."""
        from doppelbot.app import serve
        from doppelbot.instance import invoked_with

        invoked_with(["run"])
        gen = gen or Scripted()
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
        stop = asyncio.Event()
        ready: asyncio.Future[App] = asyncio.get_running_loop().create_future()

        async def on_ready(session: App) -> None:
            if patch is not None:
                await patch(session)
            ready.set_result(session)

        task = asyncio.create_task(
            serve(
                settings,
                Console(file=io.StringIO()),
                client=client,
                generator=gen,
                stop=stop,
                on_ready=on_ready,
            )
        )
        try:
            async with asyncio.timeout(20):
                session = await asyncio.shield(ready)
            run = Run(self.tg, settings, session, gen, task, stop, client)
            await wait_for(lambda: session.bot._synced is not None, 20)  # caught up
            yield run
        finally:
            stop.set()
            async with asyncio.timeout(20):
                await asyncio.gather(task, return_exceptions=True)
            if client.is_connected():
                await client.disconnect()
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

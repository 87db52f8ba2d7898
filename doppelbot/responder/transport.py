"""The responder's view of Telegram and of time: small Protocols its adapters implement.

``doppelbot/telegram/live.py`` implements ``ChatTransport`` over Telethon; the core's tests use
plain in-memory fakes. ``Clock`` is injected so policy decisions and delivery delays can be
tested without waiting for real.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from doppelbot.core.domain import Message


class ChatTransport(Protocol):
    """What the responder needs from Telegram."""

    async def send_message(
        self, chat_id: int, text: str, *, reply_to: int | None = None
    ) -> Message:
        """Send ``text``; returns the sent message. Raises ``FloodWaitError`` when Telegram
        asks to wait, ``TelegramError`` on other refusals."""
        ...

    async def set_typing(self, chat_id: int, typing: bool = True) -> None:
        """Show (or cancel) "typing…" in ``chat_id``; Telegram shows it for about 5 s."""
        ...

    async def recent_outgoing(self, chat_id: int, *, min_id: int = 0) -> Sequence[Message]:
        """The account's own messages in ``chat_id`` newer than ``min_id`` (for reconciling
        an interrupted send after a restart)."""
        ...


@dataclass(frozen=True, slots=True)
class Clock:
    """Wall time (UTC unix seconds) and sleeping; tests substitute both."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)
        else:
            await asyncio.sleep(0)

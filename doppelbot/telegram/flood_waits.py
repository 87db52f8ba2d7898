"""FloodWait during an export: waited out with a visible countdown, within two bounds.

One wait may last at most ``max_s`` and all the waits of a run together at most ``total_s``
(thirty short waits add up too). Beyond either, ``wait`` raises ``FloodTooLong`` so the caller
can stop cleanly (an export stops that chat and keeps what it stored); ``retry`` turns it into
the ``FloodWaitTooLongError`` the user sees, for calls that have no chat to stop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from telethon import TelegramClient
from telethon import errors as tg_errors

from doppelbot.core.errors import FloodWaitTooLongError

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[Any]]


class Countdown(Protocol):
    def waiting(self, chat_id: int, remaining_s: int) -> None: ...


class FloodTooLong(Exception):
    """Telegram asked for a wait past one of the bounds."""

    def __init__(self, seconds: int, bound: int, *, total: int | None = None) -> None:
        super().__init__(seconds)
        self.seconds = seconds
        self.bound = bound  # the per-wait bound, or what was left of the run's total
        self.total = total  # set when the run's total budget is what ran out

    def error(self, what: str) -> FloodWaitTooLongError:
        return FloodWaitTooLongError(self.seconds, self.bound, what, total=self.total)


class FloodWaits:
    """The FloodWait budget of one run."""

    def __init__(
        self,
        client: TelegramClient,
        *,
        max_s: int,
        total_s: int,
        sleep: Sleep,
        countdown: Countdown,
    ) -> None:
        self.client = client
        self.max_s = max_s
        self.total_s = total_s
        self.waited = 0  # seconds waited out in this run
        self._sleep = sleep
        self._countdown = countdown

    async def wait(self, exc: tg_errors.FloodWaitError, chat_id: int | None) -> None:
        """Wait out ``exc`` second by second (counting down on ``chat_id``'s progress), or
        raise ``FloodTooLong`` when that would pass a bound."""
        seconds = int(exc.seconds)
        if seconds > self.max_s:
            raise FloodTooLong(seconds, self.max_s)
        left = self.total_s - self.waited
        if seconds > left:
            raise FloodTooLong(seconds, max(left, 0), total=self.total_s)
        self.waited += seconds
        for remaining in range(seconds, 0, -1):
            if chat_id is not None:
                self._countdown.waiting(chat_id, remaining)
            await self._sleep(1)
        if chat_id is not None:
            self._countdown.waiting(chat_id, 0)
        # We waited ourselves; drop Telethon's record so it does not refuse the retry early.
        request = getattr(exc, "request", None)
        if request is not None:
            self.client._flood_waited_requests.pop(request.CONSTRUCTOR_ID, None)

    async def retry(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """``call()``, again after each FloodWait within the bounds."""
        while True:
            try:
                return await call()
            except tg_errors.FloodWaitError as exc:
                try:
                    await self.wait(exc, None)
                except FloodTooLong as too_long:
                    raise too_long.error(what) from None

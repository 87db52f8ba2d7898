"""Per-chat debounce timers: answer a burst once, after the other person stops typing.

Each chat has its own ``loop.call_later`` handle, re-armed by every new message; nothing is
shared between chats, so a slow generation (or a long burst) in one chat never delays another
chat's timer. Firing only calls a plain callback — the work itself runs elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Debouncer(Generic[K]):
    def __init__(self, delay_s: float, on_fire: Callable[[K], None]) -> None:
        self.delay_s = delay_s
        self._on_fire = on_fire
        self._handles: dict[K, asyncio.TimerHandle] = {}
        self._closed = False

    def touch(self, key: K, delay_s: float | None = None) -> None:
        """(Re)start ``key``'s timer: it fires ``delay_s`` after the last touch."""
        if self._closed:
            return
        old = self._handles.pop(key, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        delay = self.delay_s if delay_s is None else delay_s
        self._handles[key] = loop.call_later(delay, self._fire, key)

    def cancel(self, key: K) -> bool:
        handle = self._handles.pop(key, None)
        if handle is None:
            return False
        handle.cancel()
        return True

    def pending(self, key: K) -> bool:
        return key in self._handles

    def __len__(self) -> int:
        return len(self._handles)

    def close(self) -> None:
        self._closed = True
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()

    def _fire(self, key: K) -> None:
        self._handles.pop(key, None)
        self._on_fire(key)

"""Event-loop lag: how late a short periodic sleep wakes up.

The bot lives on one event loop; anything that blocks it (a synchronous model call, a slow
SQLite statement on the loop thread) delays every chat at once. ``doppelbot run`` logs when the
lag gets high; the tests and ``scripts/bench_responder.py`` assert on its percentiles.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

log = logging.getLogger("doppelbot.loop")


class LoopLagMonitor:
    def __init__(self, interval_s: float = 0.01, warn_s: float = 0.25, keep: int = 100_000) -> None:
        self.interval_s = interval_s
        self.warn_s = warn_s
        self.samples: deque[float] = deque(maxlen=keep)  # lag per wake-up, seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def __aenter__(self) -> LoopLagMonitor:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, time.perf_counter() - before - self.interval_s)
            self.samples.append(lag)
            if lag > self.warn_s:
                log.warning("event loop blocked for %.0f ms", lag * 1000)

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile (0-100) of the lag in seconds; 0 without samples."""
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
        return ordered[index]

    @property
    def max(self) -> float:
        return max(self.samples, default=0.0)

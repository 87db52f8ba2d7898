"""Keeps a months-long connection honest: updates flowing, Telegram reachable, health recorded.

Telethon clients are known to stop receiving updates after hours while every request still
works (the connection looks fine, nothing is logged). Telethon also gives up reconnecting after
a few tries and simply ends up disconnected. So once per ``watchdog_interval_s`` this:

- reconnects (with backoff) when the client is disconnected;
- after ``watchdog_idle_s`` without any update, asks Telegram for the update state (a cheap
  ``updates.GetState``): when Telegram's sequence (pts) moved past the last update we saw,
  updates were lost on the way — reconnect and fetch the difference (Telethon's catch-up);
- raises ``TelegramOutageError`` once Telegram has been unreachable (or the stream broken)
  for ``watchdog_max_outage_s``, so ``doppelbot run`` exits non-zero and a supervisor
  (systemd ``Restart=``, Docker ``restart:``) starts it again cleanly;
- writes a heartbeat (``doppelbot.health.Health``) for ``doppelbot status --health``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Protocol

from telethon import TelegramClient
from telethon import errors as tg_errors
from telethon.tl import functions

from doppelbot.config import DaemonSettings
from doppelbot.core.errors import NotLoggedInError, TelegramOutageError, describe
from doppelbot.health import Health, State
from doppelbot.responder.transport import Clock
from doppelbot.telegram.errors import translate

log = logging.getLogger("doppelbot.watchdog")

#: A GetState that takes longer than this counts as a failed check.
PROBE_TIMEOUT_S = 20.0
#: Reconnect attempts back off up to this long between tries.
MAX_BACKOFF_S = 60.0

_NETWORK = (tg_errors.RPCError, ConnectionError, OSError, TimeoutError)


class UpdateSource(Protocol):
    """What the watchdog reads off the live bot."""

    last_update_at: float

    def known_pts(self) -> int | None:
        """The account's update sequence number processed so far (None: unknown)."""
        ...


class Watchdog:
    def __init__(
        self,
        client: TelegramClient,
        source: UpdateSource,
        settings: DaemonSettings,
        *,
        record: Callable[[Health], Awaitable[None]],
        clock: Clock | None = None,
    ) -> None:
        self.client, self.source, self.record = client, source, record
        self.interval_s = settings.watchdog_interval_s
        self.idle_s = settings.watchdog_idle_s
        self.max_outage_s = settings.watchdog_max_outage_s
        self.clock = clock or Clock()
        now = self.clock.time()
        self.health = Health(
            pid=os.getpid(),
            started_at=now,
            heartbeat_at=now,
            interval_s=self.interval_s,
            state=State.STARTING,
        )
        self._backoff = 1.0
        self._next_attempt = 0.0

    async def beat(self, state: State | None = None, **changes: object) -> None:
        """Record the current health (also used for the start and the clean stop)."""
        now = self.clock.time()
        self.health = self.health.beat(
            now,
            state=state or self.health.state,
            last_update_at=self.source.last_update_at,
            **changes,
        )
        try:
            await self.record(self.health)
        except Exception as exc:  # a heartbeat that cannot be written must not stop the bot
            log.warning("watchdog: heartbeat not recorded: %s", describe(exc))

    async def run(self) -> None:
        """Check forever; returns never, raises ``TelegramOutageError`` / ``NotLoggedInError``."""
        await self.beat(State.OK)
        while True:
            await self.clock.sleep(self.interval_s)
            await self.check()

    async def check(self) -> None:
        """One round (tests call it directly)."""
        now = self.clock.time()
        healthy = await self._connected_and_flowing(now)
        if healthy:
            if self.health.outage_since is not None:
                log.info("watchdog: Telegram is back after %.0fs", now - self.health.outage_since)
            self._backoff = 1.0
            self._next_attempt = 0.0
            await self.beat(State.OK, outage_since=None, detail="")
            return
        since = self.health.outage_since or now
        await self.beat(State.RECONNECTING, outage_since=since)
        if now - since >= self.max_outage_s:
            detail = f"Telegram unreachable or silent for {now - since:.0f}s"
            await self.beat(State.FAILED, detail=detail)
            raise TelegramOutageError(
                f"{detail} (DOPPELBOT_WATCHDOG_MAX_OUTAGE_S={self.max_outage_s:g}); exiting so "
                "a supervisor can restart doppelbot"
            )

    async def _connected_and_flowing(self, now: float) -> bool:
        if not self.client.is_connected():
            return await self._reconnect(now, "disconnected")
        idle = now - self.source.last_update_at
        last_probe = self.health.last_probe_at or self.health.started_at
        in_outage = self.health.outage_since is not None
        if not in_outage and (idle < self.idle_s or now - last_probe < self.idle_s):
            return True
        if in_outage and now < self._next_attempt:
            return False
        try:
            state = await asyncio.wait_for(
                self.client(functions.updates.GetStateRequest()), PROBE_TIMEOUT_S
            )
        except _NETWORK as exc:
            log.warning("watchdog: Telegram does not answer (%s)", describe(translate(exc)))
            return await self._reconnect(now, "no answer", force=not in_outage)
        self.health = self.health.beat(now, last_probe_at=now)
        known = self.source.known_pts()
        if known is not None and state.pts > known:
            log.warning(
                "watchdog: no update for %.0fs but Telegram is %d update(s) ahead: the update "
                "stream stalled; reconnecting",
                idle,
                state.pts - known,
            )
            return await self._reconnect(now, "update stream stalled", force=True)
        return True

    async def _reconnect(self, now: float, why: str, *, force: bool = False) -> bool:
        if not force and now < self._next_attempt:
            return False
        self._next_attempt = now + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        log.info("watchdog: reconnecting to Telegram (%s)", why)
        try:
            if self.client.is_connected():
                await self.client.disconnect()
            await asyncio.wait_for(self.client.connect(), PROBE_TIMEOUT_S)
            authorised = await asyncio.wait_for(self.client.is_user_authorized(), PROBE_TIMEOUT_S)
        except _NETWORK as exc:
            log.warning("watchdog: reconnect failed (%s)", describe(translate(exc)))
            return False
        if not authorised:
            await self.beat(State.FAILED, detail="logged out")
            raise NotLoggedInError("Telegram logged this session out; run `doppelbot login` again")
        # What arrived while the stream was broken comes now as ordinary updates.
        await self.client.catch_up()
        self.health = self.health.beat(now, reconnects=self.health.reconnects + 1)
        self._backoff = 1.0
        return True

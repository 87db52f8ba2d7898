"""The export's channel to Telegram: a takeout session, or the normal API, paced.

A takeout session is Telegram's own way to export data, with lower flood limits than the
normal API. Telegram may first want the owner to confirm it in an official app
(``TakeoutInitDelayError``); the export then goes on without it, keeping its requests apart
so the normal API's limits are not hit. A takeout left open by a killed run is finished
before a new one starts (Telegram allows one at a time).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from telethon import TelegramClient
from telethon import errors as tg_errors
from telethon.tl import types

from doppelbot.telegram.errors import TAKEOUT_HELP
from doppelbot.telegram.history_pages import Call

log = logging.getLogger(__name__)


async def clear_stale_takeout(client: TelegramClient) -> bool:
    """Finish a takeout a crashed run left in the session; True when there was one."""
    if client.session.takeout_id is None:
        return False
    try:
        await client.end_takeout(success=False)
    except (tg_errors.RPCError, ValueError) as exc:
        log.debug("stale takeout could not be finished: %s", type(exc).__name__)
    client.session.takeout_id = None
    client.session.save()
    return True


def takeout_scope(entities: Iterable[Any]) -> dict[str, bool | None]:
    """``client.takeout`` arguments covering exactly the kinds of chat about to be read (a
    chat listed by name may be a group even when groups were not asked for)."""
    entities = list(entities)
    return {
        "users": True,
        "chats": any(isinstance(e, types.Chat) for e in entities) or None,
        "megagroups": any(isinstance(e, types.Channel) and e.megagroup for e in entities) or None,
        "channels": any(isinstance(e, types.Channel) and not e.megagroup for e in entities) or None,
    }


def without_takeout_note(exc: tg_errors.TakeoutInitDelayError, interval_s: float) -> str:
    return (
        f"{TAKEOUT_HELP} Continuing now without takeout, paced at "
        f"{interval_s:g}s between requests "
        f"(Telegram allows the takeout by itself in {exc.seconds / 3600:.1f} h)."
    )


class Paced:
    """Sends requests through ``call`` at least ``interval_s`` apart."""

    __slots__ = ("_call", "_interval_s", "_last")

    def __init__(self, call: Call, interval_s: float) -> None:
        self._call = call
        self._interval_s = interval_s
        self._last = 0.0

    async def __call__(self, request: Any) -> Any:
        delay = self._interval_s - (time.monotonic() - self._last)
        if delay > 0:
            await asyncio.sleep(delay)
        self._last = time.monotonic()
        return await self._call(request)

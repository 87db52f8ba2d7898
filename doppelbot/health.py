"""The running bot's health, as a supervisor and ``doppelbot status`` see it.

A userbot left on for months fails quietly: the update stream can stop while the connection
looks fine, Telegram can be unreachable for a while, the process can hang. So the bot writes a
heartbeat (``Health``) into the store every ``watchdog_interval_s``, and ``verdict`` judges it
from the outside: the bot is healthy when its process holds the session lock, the heartbeat is
fresh and Telegram is reachable. ``doppelbot status --health`` exits non-zero otherwise, which
makes it a Docker healthcheck or a systemd ``ExecCondition`` as it is.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from typing import Any

from doppelbot.instance import LockHolder


class State(StrEnum):
    STARTING = "starting"  # connected, catching up with what happened while down
    OK = "ok"
    RECONNECTING = "reconnecting"  # Telegram unreachable or the update stream silent
    STOPPED = "stopped"  # stopped cleanly
    FAILED = "failed"  # gave up (outage longer than the limit, logged out)


@dataclass(frozen=True, slots=True)
class Health:
    pid: int
    started_at: float
    heartbeat_at: float
    interval_s: float
    state: State = State.STARTING
    last_update_at: float | None = None  # the newest update received from Telegram
    last_probe_at: float | None = None  # the newest successful "are updates flowing?" check
    outage_since: float | None = None
    reconnects: int = 0
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Health | None:
        if not data:
            return None
        known = {f.name for f in fields(cls)}
        try:
            values = {k: v for k, v in data.items() if k in known}
            values["state"] = State(values.get("state", State.STARTING))
            return cls(**values)
        except (TypeError, ValueError):
            return None

    def beat(self, now: float, **changes: Any) -> Health:
        return replace(self, heartbeat_at=now, **changes)


#: A heartbeat older than this many intervals means the process is stuck (or gone).
STALE_BEATS = 3


def verdict(health: Health | None, holder: LockHolder | None, now: float) -> tuple[bool, str]:
    """(healthy, one line saying why)."""
    if holder is None or not holder.command.startswith("doppelbot run"):
        return False, "not running: no `doppelbot run` holds this account's session"
    if health is None or health.pid != holder.pid:
        return False, f"starting: no heartbeat yet from {holder.describe()}"
    age = now - health.heartbeat_at
    if age > STALE_BEATS * health.interval_s + 5:
        return False, f"stuck: the last heartbeat is {age:.0f}s old (pid {health.pid})"
    if health.state is State.RECONNECTING:
        since = health.outage_since or health.heartbeat_at
        return False, f"reconnecting: Telegram unreachable or silent for {now - since:.0f}s"
    if health.state in (State.FAILED, State.STOPPED):
        return False, f"{health.state.value}: {health.detail or 'see the log'}"
    return True, f"{health.state.value}: up {_span(now - health.started_at)}" + (
        f", last update {_span(now - health.last_update_at)} ago" if health.last_update_at else ""
    )


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")

"""Global bot state in the store: the pause kill switch and per-chat reply modes.

Both live in SQLite rather than in memory so they survive restarts and so another process —
``doppelbot status --pause`` in a second terminal, or an owner command in Saved Messages — can
flip them while the bot runs: the responder reads them again before every reply.

The running bot also records here what ``doppelbot status`` shows and a restart needs: its
health (a heartbeat), the last catch-up, when it first ran (nothing older is ever answered
after a restart) and the newest Saved Messages note it has acted on (so the owner's answers
written while it was down are applied once, in order).

All of it is per own account (the handle's): each account's bot is paused, set to a mode and
watched on its own, even while two of them run at once.
"""

from __future__ import annotations

import json
from typing import Any

from doppelbot.core.domain import ReplyMode
from doppelbot.store.database import Database, now
from doppelbot.store.table import Table

BOT_STATE = Table(
    "bot_state", ("key", "value", "updated_at"), key=("account_id", "key"), per_account=True
)
CHAT_SETTINGS = Table(
    "chat_settings",
    ("chat_id", "reply_mode", "updated_at"),
    key=("account_id", "chat_id"),
    per_account=True,
)

PAUSED_KEY = "paused"
REPLY_MODE_KEY = "reply_mode"  # the runtime default set by ``/mode MODE``; overrides settings
HEALTH_KEY = "health"
CATCH_UP_KEY = "catch_up"
FIRST_RUN_KEY = "first_run_at"
SAVED_SEEN_KEY = "saved_seen_id"


async def get_value(db: Database, key: str) -> str | None:
    value = await db.scalar(
        "SELECT value FROM bot_state WHERE account_id = ? AND key = ?", (db.account_id, key)
    )
    return None if value is None else str(value)


async def set_value(db: Database, key: str, value: str) -> None:
    await db.execute(
        BOT_STATE.insert(conflict="update", account_id=db.account_id), (key, value, now())
    )


async def is_paused(db: Database) -> bool:
    return (await get_value(db, PAUSED_KEY)) == "1"


async def set_paused(db: Database, paused: bool) -> None:
    await set_value(db, PAUSED_KEY, "1" if paused else "0")


async def paused_since(db: Database) -> int | None:
    row = await db.fetchone(
        "SELECT updated_at FROM bot_state WHERE account_id = ? AND key = ? AND value = '1'",
        (db.account_id, PAUSED_KEY),
    )
    return None if row is None else int(row["updated_at"])


async def chat_reply_mode(db: Database, chat_id: int) -> ReplyMode | None:
    value = await db.scalar(
        "SELECT reply_mode FROM chat_settings WHERE account_id = ? AND chat_id = ?",
        (db.account_id, chat_id),
    )
    return ReplyMode(value) if value else None


async def set_chat_reply_mode(db: Database, chat_id: int, mode: ReplyMode | None) -> None:
    """``None`` removes the override: the chat follows the global ``reply_mode`` again."""
    await db.execute(
        CHAT_SETTINGS.insert(conflict="update", account_id=db.account_id),
        (chat_id, mode.value if mode else None, now()),
    )


async def global_reply_mode(db: Database) -> ReplyMode | None:
    """The default mode set at runtime (``/mode MODE``); None: ``settings.responder.reply_mode``."""
    value = await get_value(db, REPLY_MODE_KEY)
    return ReplyMode(value) if value else None


async def set_global_reply_mode(db: Database, mode: ReplyMode | None) -> None:
    await set_value(db, REPLY_MODE_KEY, mode.value if mode else "")


async def chat_mode_overrides(db: Database) -> dict[int, ReplyMode]:
    rows = await db.fetchall(
        "SELECT chat_id, reply_mode FROM chat_settings WHERE account_id = ?"
        " AND reply_mode IS NOT NULL",
        (db.account_id,),
    )
    return {int(r["chat_id"]): ReplyMode(r["reply_mode"]) for r in rows}


async def get_json(db: Database, key: str) -> dict[str, Any] | None:
    value = await get_value(db, key)
    if not value:
        return None
    try:
        data = json.loads(value)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


async def set_json(db: Database, key: str, value: dict[str, Any]) -> None:
    await set_value(db, key, json.dumps(value, sort_keys=True))


async def get_int(db: Database, key: str) -> int | None:
    value = await get_value(db, key)
    try:
        return int(value) if value else None
    except ValueError:
        return None


async def set_int(db: Database, key: str, value: int) -> None:
    await set_value(db, key, str(int(value)))


async def first_run_at(db: Database, at: int) -> int:
    """When the bot first ran in this data directory (recorded as ``at`` the first time)."""
    known = await get_int(db, FIRST_RUN_KEY)
    if known is None:
        await set_int(db, FIRST_RUN_KEY, at)
        return at
    return known

"""Global bot state in the store: the pause kill switch and per-chat reply modes.

Both live in SQLite rather than in memory so they survive restarts and so another process —
``doppelbot status --pause`` in a second terminal, or an owner command in Saved Messages — can
flip them while the bot runs: the responder reads them again before every reply.
"""

from __future__ import annotations

from doppelbot.domain import ReplyMode
from doppelbot.store.database import Database, now

PAUSED_KEY = "paused"
REPLY_MODE_KEY = "reply_mode"  # the runtime default set by ``/mode MODE``; overrides settings


async def get_value(db: Database, key: str) -> str | None:
    value = await db.scalar("SELECT value FROM bot_state WHERE key = ?", (key,))
    return None if value is None else str(value)


async def set_value(db: Database, key: str, value: str) -> None:
    await db.execute(
        "INSERT INTO bot_state (key, value, updated_at) VALUES (?,?,?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        (key, value, now()),
    )


async def is_paused(db: Database) -> bool:
    return (await get_value(db, PAUSED_KEY)) == "1"


async def set_paused(db: Database, paused: bool) -> None:
    await set_value(db, PAUSED_KEY, "1" if paused else "0")


async def paused_since(db: Database) -> int | None:
    row = await db.fetchone(
        "SELECT updated_at FROM bot_state WHERE key = ? AND value = '1'", (PAUSED_KEY,)
    )
    return None if row is None else int(row[0])


async def chat_reply_mode(db: Database, chat_id: int) -> ReplyMode | None:
    value = await db.scalar("SELECT reply_mode FROM chat_settings WHERE chat_id = ?", (chat_id,))
    return ReplyMode(value) if value else None


async def set_chat_reply_mode(db: Database, chat_id: int, mode: ReplyMode | None) -> None:
    """``None`` removes the override: the chat follows the global ``reply_mode`` again."""
    await db.execute(
        "INSERT INTO chat_settings (chat_id, reply_mode, updated_at) VALUES (?,?,?)"
        " ON CONFLICT (chat_id) DO UPDATE SET reply_mode = excluded.reply_mode,"
        " updated_at = excluded.updated_at",
        (chat_id, mode.value if mode else None, now()),
    )


async def global_reply_mode(db: Database) -> ReplyMode | None:
    """The default mode set at runtime (``/mode MODE``); None: ``settings.reply_mode``."""
    value = await get_value(db, REPLY_MODE_KEY)
    return ReplyMode(value) if value else None


async def set_global_reply_mode(db: Database, mode: ReplyMode | None) -> None:
    await set_value(db, REPLY_MODE_KEY, mode.value if mode else "")


async def chat_mode_overrides(db: Database) -> dict[int, ReplyMode]:
    rows = await db.fetchall(
        "SELECT chat_id, reply_mode FROM chat_settings WHERE reply_mode IS NOT NULL"
    )
    return {int(r[0]): ReplyMode(r[1]) for r in rows}

"""Chat history in the store: peers, messages and per-chat export cursors.

Export, Desktop import and the live bot all write here through the same idempotent upserts
keyed on (account, chat id, message id), so re-running anything never duplicates a message and
an edit simply replaces the stored row. Every function reads and writes the rows of the
handle's own account only (private-chat message ids are counted per account: two accounts'
ids overlap).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from doppelbot.core.domain import MediaKind, Message, Peer, PeerKind
from doppelbot.store.database import Database, Tx, now
from doppelbot.store.table import Table, from_row, optional

MESSAGES = Table(
    "messages",
    (
        "chat_id",
        "message_id",
        "sender_id",
        "is_outgoing",
        "date",
        "edit_date",
        "text",
        "reply_to_message_id",
        "is_forwarded",
        "forwarded_from",
        "media_kind",
        "sticker_emoji",
        "grouped_id",
        "service_action",
    ),
    key=("account_id", "chat_id", "message_id"),
    per_account=True,
)
PEERS = Table(
    "peers",
    (
        "peer_id",
        "kind",
        "first_name",
        "last_name",
        "title",
        "username",
        "is_bot",
        "is_deleted",
        "is_contact",
        "is_self",
        "updated_at",
    ),
    key=("account_id", "peer_id"),
    per_account=True,
)
EXPORT_CURSORS = Table(
    "export_cursors",
    (
        "chat_id",
        "newest_message_id",
        "oldest_message_id",
        "history_complete",
        "server_total",
        "last_run_at",
        "last_error",
    ),
    key=("account_id", "chat_id"),
    per_account=True,
)

MESSAGE_COLUMNS = MESSAGES.column_list


def message_values(m: Message) -> tuple[Any, ...]:
    """A message as the values of a ``messages`` row: ``MESSAGES.values(m)``, written out
    because a Desktop import makes one for every message (10× faster than the generic path;
    ``tests/test_store_table.py`` checks the two agree)."""
    return (
        m.chat_id,
        m.message_id,
        m.sender_id,
        int(m.is_outgoing),
        m.date,
        m.edit_date,
        m.text,
        m.reply_to_message_id,
        int(m.is_forwarded),
        m.forwarded_from,
        m.media_kind.value if m.media_kind else None,
        m.sticker_emoji,
        m.grouped_id,
        m.service_action,
    )


def row_message(r: Any) -> Message:
    """A ``messages`` row (read by column name) → ``Message``."""
    return from_row(
        Message,
        r,
        is_outgoing=bool,
        is_forwarded=bool,
        media_kind=optional(MediaKind),
    )


def peer_values(p: Peer, updated_at: int | None = None) -> tuple[Any, ...]:
    """A peer as the values of a ``peers`` row (``PEERS.columns`` order)."""
    return PEERS.values(p, updated_at=updated_at if updated_at is not None else now())


def row_peer(r: Any) -> Peer:
    """A ``peers`` row (read by column name) → ``Peer``."""
    return from_row(
        Peer, r, kind=PeerKind, is_bot=bool, is_deleted=bool, is_contact=bool, is_self=bool
    )


@dataclass(frozen=True, slots=True)
class ExportCursor:
    chat_id: int
    newest_message_id: int = 0
    oldest_message_id: int | None = None
    history_complete: bool = False
    server_total: int | None = None
    last_run_at: int | None = None
    last_error: str | None = None


# --- writes (callable inside an open transaction: pass its connection) -------------------------
async def upsert_messages_in(conn: Tx, messages: Iterable[Message]) -> None:
    await conn.executemany(
        MESSAGES.insert(conflict="update", account_id=conn.account_id),
        [message_values(m) for m in messages],
    )


async def upsert_peers_in(conn: Tx, peers: Iterable[Peer]) -> None:
    ts = now()
    await conn.executemany(
        PEERS.insert(conflict="update", account_id=conn.account_id),
        [peer_values(p, ts) for p in peers],
    )


async def save_cursor_in(conn: Tx, c: ExportCursor) -> None:
    await conn.execute(
        EXPORT_CURSORS.insert(conflict="update", account_id=conn.account_id),
        EXPORT_CURSORS.values(c),
    )


async def insert_peers_if_new_in(conn: Tx, peers: Iterable[Peer]) -> None:
    """Peers not stored yet (a file's names never overwrite what a live export knows)."""
    ts = now()
    await conn.executemany(
        PEERS.insert(conflict="ignore", account_id=conn.account_id),
        [peer_values(p, ts) for p in peers],
    )


async def upsert_message_rows_in(conn: Tx, rows: Sequence[tuple[Any, ...]]) -> None:
    """Rows made by ``message_values`` (or an importer's equivalent)."""
    await conn.executemany(MESSAGES.insert(conflict="update", account_id=conn.account_id), rows)


async def count_stored_in(conn: Tx, chat_id: int, message_ids: Sequence[int]) -> int:
    """How many of ``message_ids`` of the chat are stored (index lookups only: cheap in a chat
    of millions; json_each: no limit on the number of ids)."""
    (row,) = await conn.execute_fetchall(
        "SELECT count(*) FROM messages WHERE account_id = ? AND chat_id = ?"
        " AND message_id IN (SELECT value FROM json_each(?))",
        (conn.account_id, chat_id, json.dumps(list(message_ids))),
    )
    return int(row[0])


#: 500 rows x 14 columns = 7,000 parameters, well under SQLite's 32,766.
ROWS_PER_STATEMENT = 500


async def upsert_message_rows_bulk_in(conn: Tx, rows: Sequence[tuple[Any, ...]]) -> None:
    """``upsert_message_rows_in`` for many rows (the export), as multi-row statements.

    Why not ``executemany``: it takes the GIL back for every row (to bind it) after releasing
    it around that row's ``sqlite3_step``, so beside an event loop busy parsing pages it waits
    for the GIL once per row. One statement per ``ROWS_PER_STATEMENT`` rows binds them in one
    go and inserts them all with the GIL released."""
    for i in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[i : i + ROWS_PER_STATEMENT]
        sql = MESSAGES.insert(rows=len(chunk), conflict="update", account_id=conn.account_id)
        await conn.execute(sql, list(chain.from_iterable(chunk)))


async def count_messages_in(conn: Tx, chat_id: int) -> int:
    (row,) = await conn.execute_fetchall(
        "SELECT count(*) FROM messages WHERE account_id = ? AND chat_id = ?",
        (conn.account_id, chat_id),
    )
    return int(row[0])


# --- convenience wrappers (each its own transaction) -------------------------------------------
async def upsert_messages(db: Database, messages: Iterable[Message]) -> None:
    async with db.transaction() as conn:
        await upsert_messages_in(conn, messages)


async def upsert_peers(db: Database, peers: Iterable[Peer]) -> None:
    async with db.transaction() as conn:
        await upsert_peers_in(conn, peers)


async def save_cursor(db: Database, cursor: ExportCursor) -> None:
    async with db.transaction() as conn:
        await save_cursor_in(conn, cursor)


# --- reads -------------------------------------------------------------------------------------
async def get_peer(db: Database, peer_id: int) -> Peer | None:
    return await PEERS.rows(db, "peer_id = ?", (peer_id,)).one(row_peer)


async def find_peer_by_username(db: Database, username: str) -> Peer | None:
    return await PEERS.rows(
        db, "username = ? COLLATE NOCASE", (username.lstrip("@"),), tail="ORDER BY peer_id LIMIT 1"
    ).one(row_peer)


async def list_peers(db: Database) -> list[Peer]:
    return await PEERS.rows(db, tail="ORDER BY peer_id").all(row_peer)


async def get_cursor(db: Database, chat_id: int) -> ExportCursor | None:
    return await EXPORT_CURSORS.rows(db, "chat_id = ?", (chat_id,)).one(_cursor)


async def get_message(db: Database, chat_id: int, message_id: int) -> Message | None:
    return await MESSAGES.rows(db, "chat_id = ? AND message_id = ?", (chat_id, message_id)).one(
        row_message
    )


async def count_messages(db: Database, chat_id: int | None = None) -> int:
    if chat_id is None:
        return int(
            await db.scalar("SELECT count(*) FROM messages WHERE account_id = ?", (db.account_id,))
        )
    return int(
        await db.scalar(
            "SELECT count(*) FROM messages WHERE account_id = ? AND chat_id = ?",
            (db.account_id, chat_id),
        )
    )


async def chat_ids_with_messages(db: Database) -> list[int]:
    rows = await db.fetchall(
        "SELECT DISTINCT chat_id FROM messages WHERE account_id = ? ORDER BY chat_id",
        (db.account_id,),
    )
    return [int(r["chat_id"]) for r in rows]


async def recent_messages(db: Database, chat_id: int, limit: int = 50) -> list[Message]:
    """The chat's last ``limit`` messages, oldest first."""
    newest = await MESSAGES.rows(
        db, "chat_id = ?", (chat_id, limit), tail="ORDER BY date DESC, message_id DESC LIMIT ?"
    ).all(row_message)
    return newest[::-1]


async def iter_chat_messages(
    db: Database, chat_id: int, *, batch: int = 5000
) -> AsyncIterator[Message]:
    """All messages of one chat in time order, streamed in batches."""
    async with db.conn.execute(
        MESSAGES.select("chat_id = ?", tail="ORDER BY date, message_id", account_id=db.account_id),
        (chat_id,),
    ) as cursor:
        while rows := await cursor.fetchmany(batch):
            for r in rows:
                yield row_message(r)


async def newest_incoming_id(db: Database, chat_id: int) -> int | None:
    """The newest message the other side wrote in ``chat_id`` (service messages aside)."""
    value = await db.scalar(
        "SELECT max(message_id) FROM messages WHERE account_id = ? AND chat_id = ?"
        " AND is_outgoing = 0 AND service_action IS NULL",
        (db.account_id, chat_id),
    )
    return None if value is None else int(value)


async def newest_message_id(db: Database, chat_id: int) -> int:
    """The newest message of ``chat_id`` in the store (0: none)."""
    value = await db.scalar(
        "SELECT max(message_id) FROM messages WHERE account_id = ? AND chat_id = ?",
        (db.account_id, chat_id),
    )
    return 0 if value is None else int(value)


async def messages_by_ids(db: Database, chat_id: int, message_ids: Sequence[int]) -> list[Message]:
    """The stored messages of ``chat_id`` among ``message_ids``, in id order."""
    if not message_ids:
        return []
    marks = ",".join("?" * len(message_ids))
    return await MESSAGES.rows(
        db,
        f"chat_id = ? AND message_id IN ({marks})",
        (chat_id, *message_ids),
        tail="ORDER BY message_id",
    ).all(row_message)


async def voice_notes_since(db: Database, chat_id: int, since: int, limit: int = 5) -> list[int]:
    """The newest incoming voice/round-video notes of ``chat_id`` dated ``since`` or later that
    have no finished transcript (what a restart transcribes before answering)."""
    rows = await db.fetchall(
        "SELECT m.message_id FROM messages m WHERE m.account_id = ? AND m.chat_id = ?"
        " AND m.is_outgoing = 0 AND m.media_kind IN ('voice', 'video_note') AND m.date >= ?"
        " AND NOT EXISTS (SELECT 1 FROM transcripts t WHERE t.account_id = m.account_id"
        "  AND t.chat_id = m.chat_id AND t.message_id = m.message_id AND t.status = 'done')"
        " ORDER BY m.message_id DESC LIMIT ?",
        (db.account_id, chat_id, since, limit),
    )
    return sorted(int(r["message_id"]) for r in rows)


async def count_incoming_between(db: Database, chat_id: int, after: int, before: int) -> int:
    """Incoming messages of ``chat_id`` with ids strictly between ``after`` and ``before``."""
    value = await db.scalar(
        "SELECT count(*) FROM messages WHERE account_id = ? AND chat_id = ? AND is_outgoing = 0"
        " AND message_id > ? AND message_id < ?",
        (db.account_id, chat_id, after, before),
    )
    return int(value or 0)


async def owner_turn_after(db: Database, chat_id: int, after: int) -> list[Message]:
    """The owner's messages after message ``after`` up to the other person's next one."""
    return await MESSAGES.rows(
        db,
        "chat_id = ? AND is_outgoing = 1 AND message_id > ? AND message_id < coalesce("
        "(SELECT min(message_id) FROM messages WHERE account_id = ? AND chat_id = ?"
        " AND is_outgoing = 0 AND message_id > ?), 1 << 62)",
        (chat_id, after, db.account_id, chat_id, after),
        tail="ORDER BY message_id",
    ).all(row_message)


async def has_outgoing(db: Database, chat_id: int) -> bool:
    """Whether the store holds any message the owner wrote in ``chat_id``."""
    found = await db.scalar(
        "SELECT 1 FROM messages WHERE account_id = ? AND chat_id = ? AND is_outgoing = 1 LIMIT 1",
        (db.account_id, chat_id),
    )
    return found is not None


async def cursors_and_counts(
    db: Database, chat_ids: Sequence[int]
) -> dict[int, tuple[ExportCursor | None, int]]:
    """Each chat's export cursor (None if it has none yet) and stored message count, in one
    query (one hop to aiosqlite's thread for all chats; json_each: no limit on the ids)."""
    if not chat_ids:
        return {}
    rows = await db.fetchall(
        "SELECT k.value AS chat_id, c.newest_message_id, c.oldest_message_id,"
        " c.history_complete, c.server_total, c.last_run_at, c.last_error,"
        " (SELECT count(*) FROM messages m WHERE m.account_id = ? AND m.chat_id = k.value)"
        " AS stored FROM json_each(?) k LEFT JOIN export_cursors c"
        " ON c.account_id = ? AND c.chat_id = k.value",
        (db.account_id, json.dumps(list(chat_ids)), db.account_id),
    )
    found: dict[int, tuple[ExportCursor | None, int]] = {}
    for r in rows:
        cursor = None if r["newest_message_id"] is None else _cursor(r)
        found[int(r["chat_id"])] = (cursor, int(r["stored"]))
    return found


def _cursor(r: Any) -> ExportCursor:
    return from_row(ExportCursor, r, history_complete=bool)

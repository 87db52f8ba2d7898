"""Chat history in the store: the account, peers, messages and per-chat export cursors.

Export, Desktop import and the live bot all write here through the same idempotent upserts
keyed on (chat id, message id), so re-running anything never duplicates a message and an edit
simply replaces the stored row.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

from doppelbot.domain import Account, MediaKind, Message, Peer, PeerKind
from doppelbot.store.database import Database, now

MESSAGE_COLUMNS = (
    "chat_id, message_id, sender_id, is_outgoing, date, edit_date, text, reply_to_message_id, "
    "is_forwarded, forwarded_from, media_kind, sticker_emoji, grouped_id, service_action"
)

UPSERT_MESSAGE_SQL = f"""
INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)
ON CONFLICT (chat_id, message_id) DO UPDATE SET
    sender_id=excluded.sender_id, is_outgoing=excluded.is_outgoing, date=excluded.date,
    edit_date=excluded.edit_date, text=excluded.text,
    reply_to_message_id=excluded.reply_to_message_id, is_forwarded=excluded.is_forwarded,
    forwarded_from=excluded.forwarded_from, media_kind=excluded.media_kind,
    sticker_emoji=excluded.sticker_emoji, grouped_id=excluded.grouped_id,
    service_action=excluded.service_action
"""

UPSERT_PEER_SQL = """
INSERT INTO peers (peer_id, kind, first_name, last_name, title, username, is_bot, is_deleted,
                   is_contact, is_self, updated_at)
VALUES (?,?,?,?,?,?,?,?,?,?,?)
ON CONFLICT (peer_id) DO UPDATE SET
    kind=excluded.kind, first_name=excluded.first_name, last_name=excluded.last_name,
    title=excluded.title, username=excluded.username, is_bot=excluded.is_bot,
    is_deleted=excluded.is_deleted, is_contact=excluded.is_contact, is_self=excluded.is_self,
    updated_at=excluded.updated_at
"""


def message_row(m: Message) -> tuple[Any, ...]:
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


def row_message(r: Sequence[Any]) -> Message:
    return Message(
        chat_id=r[0],
        message_id=r[1],
        sender_id=r[2],
        is_outgoing=bool(r[3]),
        date=r[4],
        edit_date=r[5],
        text=r[6],
        reply_to_message_id=r[7],
        is_forwarded=bool(r[8]),
        forwarded_from=r[9],
        media_kind=MediaKind(r[10]) if r[10] else None,
        sticker_emoji=r[11],
        grouped_id=r[12],
        service_action=r[13],
    )


def peer_row(p: Peer, updated_at: int | None = None) -> tuple[Any, ...]:
    return (
        p.peer_id,
        p.kind.value,
        p.first_name,
        p.last_name,
        p.title,
        p.username,
        int(p.is_bot),
        int(p.is_deleted),
        int(p.is_contact),
        int(p.is_self),
        updated_at if updated_at is not None else now(),
    )


def row_peer(r: Sequence[Any]) -> Peer:
    return Peer(
        peer_id=r[0],
        kind=PeerKind(r[1]),
        first_name=r[2],
        last_name=r[3],
        title=r[4],
        username=r[5],
        is_bot=bool(r[6]),
        is_deleted=bool(r[7]),
        is_contact=bool(r[8]),
        is_self=bool(r[9]),
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
async def upsert_messages_in(conn: aiosqlite.Connection, messages: Iterable[Message]) -> None:
    await conn.executemany(UPSERT_MESSAGE_SQL, [message_row(m) for m in messages])


async def upsert_peers_in(conn: aiosqlite.Connection, peers: Iterable[Peer]) -> None:
    ts = now()
    await conn.executemany(UPSERT_PEER_SQL, [peer_row(p, ts) for p in peers])


async def save_cursor_in(conn: aiosqlite.Connection, c: ExportCursor) -> None:
    await conn.execute(
        "INSERT INTO export_cursors (chat_id, newest_message_id, oldest_message_id,"
        " history_complete, server_total, last_run_at, last_error) VALUES (?,?,?,?,?,?,?)"
        " ON CONFLICT (chat_id) DO UPDATE SET newest_message_id=excluded.newest_message_id,"
        " oldest_message_id=excluded.oldest_message_id,"
        " history_complete=excluded.history_complete, server_total=excluded.server_total,"
        " last_run_at=excluded.last_run_at, last_error=excluded.last_error",
        (
            c.chat_id,
            c.newest_message_id,
            c.oldest_message_id,
            int(c.history_complete),
            c.server_total,
            c.last_run_at,
            c.last_error,
        ),
    )


INSERT_PEER_IF_NEW_SQL = (
    "INSERT INTO peers (peer_id, kind, first_name, last_name, title, username, is_bot,"
    " is_deleted, is_contact, is_self, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (peer_id) DO NOTHING"
)


async def insert_peers_if_new_in(conn: aiosqlite.Connection, peers: Iterable[Peer]) -> None:
    """Peers not stored yet (a file's names never overwrite what a live export knows)."""
    ts = now()
    await conn.executemany(INSERT_PEER_IF_NEW_SQL, [peer_row(p, ts) for p in peers])


async def upsert_message_rows_in(
    conn: aiosqlite.Connection, rows: Sequence[tuple[Any, ...]]
) -> None:
    """Rows made by ``message_row`` (or an importer's equivalent)."""
    await conn.executemany(UPSERT_MESSAGE_SQL, rows)


async def count_stored_in(
    conn: aiosqlite.Connection, chat_id: int, message_ids: Sequence[int]
) -> int:
    """How many of ``message_ids`` of the chat are stored (index lookups only: cheap in a chat
    of millions; json_each: no limit on the number of ids)."""
    import json

    (row,) = await conn.execute_fetchall(
        "SELECT count(*) FROM messages WHERE chat_id = ?"
        " AND message_id IN (SELECT value FROM json_each(?))",
        (chat_id, json.dumps(list(message_ids))),
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


async def save_account(db: Database, account: Account) -> None:
    await db.execute(
        "INSERT INTO account (user_id, first_name, last_name, username, phone, updated_at)"
        " VALUES (?,?,?,?,?,?) ON CONFLICT (user_id) DO UPDATE SET first_name=excluded.first_name,"
        " last_name=excluded.last_name, username=excluded.username, phone=excluded.phone,"
        " updated_at=excluded.updated_at",
        (
            account.user_id,
            account.first_name,
            account.last_name,
            account.username,
            account.phone,
            now(),
        ),
    )


# --- reads -------------------------------------------------------------------------------------
async def get_account(db: Database) -> Account | None:
    r = await db.fetchone(
        "SELECT user_id, first_name, last_name, username, phone FROM account"
        " ORDER BY updated_at DESC LIMIT 1"
    )
    return Account(*r) if r else None


async def get_peer(db: Database, peer_id: int) -> Peer | None:
    r = await db.fetchone("SELECT * FROM peers WHERE peer_id = ?", (peer_id,))
    return row_peer(r) if r else None


async def find_peer_by_username(db: Database, username: str) -> Peer | None:
    r = await db.fetchone(
        "SELECT * FROM peers WHERE username = ? COLLATE NOCASE", (username.lstrip("@"),)
    )
    return row_peer(r) if r else None


async def list_peers(db: Database) -> list[Peer]:
    return [row_peer(r) for r in await db.fetchall("SELECT * FROM peers ORDER BY peer_id")]


async def get_cursor(db: Database, chat_id: int) -> ExportCursor | None:
    r = await db.fetchone(
        "SELECT chat_id, newest_message_id, oldest_message_id, history_complete, server_total,"
        " last_run_at, last_error FROM export_cursors WHERE chat_id = ?",
        (chat_id,),
    )
    if not r:
        return None
    return ExportCursor(r[0], r[1], r[2], bool(r[3]), r[4], r[5], r[6])


async def get_message(db: Database, chat_id: int, message_id: int) -> Message | None:
    r = await db.fetchone(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? AND message_id = ?",
        (chat_id, message_id),
    )
    return row_message(r) if r else None


async def count_messages(db: Database, chat_id: int | None = None) -> int:
    if chat_id is None:
        return int(await db.scalar("SELECT count(*) FROM messages"))
    return int(await db.scalar("SELECT count(*) FROM messages WHERE chat_id = ?", (chat_id,)))


async def chat_ids_with_messages(db: Database) -> list[int]:
    rows = await db.fetchall("SELECT DISTINCT chat_id FROM messages ORDER BY chat_id")
    return [int(r[0]) for r in rows]


async def recent_messages(db: Database, chat_id: int, limit: int = 50) -> list[Message]:
    """The chat's last ``limit`` messages, oldest first."""
    rows = await db.fetchall(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = ?"
        " ORDER BY date DESC, message_id DESC LIMIT ?",
        (chat_id, limit),
    )
    return [row_message(r) for r in reversed(rows)]


async def iter_chat_messages(
    db: Database, chat_id: int, *, batch: int = 5000
) -> AsyncIterator[Message]:
    """All messages of one chat in time order, streamed in batches."""
    async with db.conn.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? ORDER BY date, message_id",
        (chat_id,),
    ) as cursor:
        while rows := await cursor.fetchmany(batch):
            for r in rows:
                yield row_message(r)


async def newest_incoming_id(db: Database, chat_id: int) -> int | None:
    """The newest message the other side wrote in ``chat_id`` (service messages aside)."""
    value = await db.scalar(
        "SELECT max(message_id) FROM messages WHERE chat_id = ? AND is_outgoing = 0"
        " AND service_action IS NULL",
        (chat_id,),
    )
    return None if value is None else int(value)


async def newest_message_id(db: Database, chat_id: int) -> int:
    """The newest message of ``chat_id`` in the store (0: none)."""
    value = await db.scalar("SELECT max(message_id) FROM messages WHERE chat_id = ?", (chat_id,))
    return 0 if value is None else int(value)


async def messages_by_ids(db: Database, chat_id: int, message_ids: Sequence[int]) -> list[Message]:
    """The stored messages of ``chat_id`` among ``message_ids``, in id order."""
    if not message_ids:
        return []
    marks = ",".join("?" * len(message_ids))
    rows = await db.fetchall(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? AND message_id IN ({marks})"
        " ORDER BY message_id",
        (chat_id, *message_ids),
    )
    return [row_message(r) for r in rows]


async def voice_notes_since(db: Database, chat_id: int, since: int, limit: int = 5) -> list[int]:
    """The newest incoming voice/round-video notes of ``chat_id`` dated ``since`` or later that
    have no finished transcript (what a restart transcribes before answering)."""
    rows = await db.fetchall(
        "SELECT m.message_id FROM messages m WHERE m.chat_id = ? AND m.is_outgoing = 0"
        " AND m.media_kind IN ('voice', 'video_note') AND m.date >= ? AND NOT EXISTS ("
        "  SELECT 1 FROM transcripts t WHERE t.chat_id = m.chat_id"
        "  AND t.message_id = m.message_id AND t.status = 'done')"
        " ORDER BY m.message_id DESC LIMIT ?",
        (chat_id, since, limit),
    )
    return sorted(int(r["message_id"]) for r in rows)

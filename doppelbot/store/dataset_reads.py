"""Fast synchronous reads of the history for the dataset builder.

The builder reads every message once — a million rows for a heavy user — so it bypasses the
async store and the ``Message`` dataclass: a read-only ``sqlite3`` connection (WAL lets it run
beside the bot) returns each chat's rows as the plain tuples the dataset rules consume, with the
message kind already decided in SQL (``doppelbot.dataset.rules.KIND_SQL``).
"""

from __future__ import annotations

import sqlite3
from itertools import islice
from operator import itemgetter, le
from pathlib import Path

from doppelbot.dataset.rules import KIND_SQL, TEXT_SQL, Row
from doppelbot.domain import Peer
from doppelbot.errors import StoreError
from doppelbot.store.history import row_peer

CHAT_ROWS_SQL = (
    f"SELECT message_id, is_outgoing, date, {TEXT_SQL}, reply_to_message_id, {KIND_SQL}"
    " FROM messages WHERE chat_id = ?"
)
_DATE = itemgetter(2)
_TIME_ORDER = itemgetter(2, 0)


def open_readonly(path: Path | str) -> sqlite3.Connection:
    """A read-only connection to the store (fails clearly if the database does not exist)."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"no database at {path}: run `doppelbot export` or `doppelbot import`")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA query_only=ON")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from exc
    return conn


def account_user_id(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT user_id FROM account ORDER BY updated_at DESC LIMIT 1").fetchone()
    return int(row[0]) if row else None


def chats_with_peers(conn: sqlite3.Connection) -> list[tuple[int, Peer | None]]:
    """``(chat_id, peer or None)`` for every chat that has messages, in chat id order."""
    peers = {
        int(r[0]): row_peer(r)
        for r in conn.execute(
            "SELECT peer_id, kind, first_name, last_name, title, username, is_bot, is_deleted,"
            " is_contact, is_self FROM peers"
        )
    }
    # a skip-scan over the primary key: one index probe per chat instead of reading every row
    rows = conn.execute(
        "WITH RECURSIVE c(id) AS (SELECT min(chat_id) FROM messages UNION ALL"
        " SELECT (SELECT min(chat_id) FROM messages WHERE chat_id > c.id) FROM c"
        " WHERE c.id IS NOT NULL) SELECT id FROM c WHERE id IS NOT NULL"
    ).fetchall()
    return [(int(chat_id), peers.get(int(chat_id))) for (chat_id,) in rows]


def chat_message_counts(conn: sqlite3.Connection) -> dict[int, int]:
    """Messages per chat (from the ``(chat_id, date)`` index: no message row is read)."""
    rows = conn.execute("SELECT chat_id, count(*) FROM messages GROUP BY chat_id").fetchall()
    return {int(chat_id): int(n) for chat_id, n in rows}


def chat_rows(conn: sqlite3.Connection, chat_id: int) -> list[Row]:
    """All messages of one chat in time order ``(date, message_id)``, as dataset rows.

    Read in primary-key (message id) order, which is time order in every real chat, and
    sorted only when a date goes backwards: ordering by date in SQL would cost a lookup per row.
    """
    try:
        rows = conn.execute(CHAT_ROWS_SQL, (chat_id,)).fetchall()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read chat {chat_id}: {exc}") from exc
    dates = list(map(_DATE, rows))
    if not all(map(le, dates, islice(dates, 1, None))):
        rows.sort(key=_TIME_ORDER)
    return rows

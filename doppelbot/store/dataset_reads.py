"""Fast synchronous reads of the history for the dataset builder.

The builder reads every message once — a million rows for a heavy user — so it bypasses the
async store and the ``Message`` dataclass: a read-only ``sqlite3`` connection (WAL lets it run
beside the bot) returns each chat's rows as the plain tuples the dataset rules consume, with the
message kind already decided in SQL (``KIND_SQL``, the twin of ``dataset.rules.rule_row``).

The history of several own accounts shares the tables; every read here is of one account's
rows (``account_id``, the default account unless told), and ``own_accounts`` lists them all.
"""

from __future__ import annotations

import sqlite3
from itertools import islice
from operator import itemgetter, le
from pathlib import Path
from typing import NamedTuple

from doppelbot.core import domain
from doppelbot.core.domain import Peer, Row, voice_message_text
from doppelbot.core.errors import StoreError
from doppelbot.store.database import DEFAULT_ACCOUNT_ID
from doppelbot.store.history import PEERS, row_peer

KIND_SQL = (
    f"CASE WHEN service_action IS NOT NULL THEN {domain.KIND_SERVICE}"
    f" WHEN is_forwarded THEN {domain.KIND_FORWARDED}"
    f" WHEN media_kind = 'sticker' THEN {domain.KIND_STICKER}"
    f" WHEN media_kind = 'webpage' THEN {domain.KIND_WEBPAGE}"
    f" WHEN media_kind IS NOT NULL THEN {domain.KIND_MEDIA} ELSE {domain.KIND_TEXT} END"
)
TEXT_SQL = (
    "CASE WHEN media_kind = 'sticker' AND is_forwarded = 0 AND service_action IS NULL"
    " THEN coalesce(sticker_emoji, '') ELSE text END"
)
CHAT_ROWS_SQL = (
    f"SELECT message_id, is_outgoing, date, {TEXT_SQL}, reply_to_message_id, {KIND_SQL}"
    " FROM messages WHERE account_id = ? AND chat_id = ?"
)
# finished, non-empty transcripts of one chat (voice and round-video notes)
CHAT_TRANSCRIPTS_SQL = (
    "SELECT message_id, text FROM transcripts WHERE account_id = ? AND chat_id = ?"
    " AND status = 'done' AND text != ''"
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


class OwnAccountRow(NamedTuple):
    """One own account, as the dataset needs it."""

    account_id: int
    name: str
    user_id: int | None


def own_accounts(conn: sqlite3.Connection) -> list[OwnAccountRow]:
    """Every own account, in account id order (the default one first)."""
    rows = conn.execute("SELECT account_id, name, user_id FROM accounts ORDER BY account_id")
    return [OwnAccountRow(int(a), str(n), None if u is None else int(u)) for a, n, u in rows]


def account_user_id(conn: sqlite3.Connection, account_id: int = DEFAULT_ACCOUNT_ID) -> int | None:
    """The Telegram user id of an own account (None: not known yet)."""
    row = conn.execute(
        "SELECT user_id FROM accounts WHERE account_id = ?", (account_id,)
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def chats_with_peers(
    conn: sqlite3.Connection, account_id: int = DEFAULT_ACCOUNT_ID
) -> list[tuple[int, Peer | None]]:
    """``(chat_id, peer or None)`` for every chat of the account that has messages, in chat
    id order."""
    cursor = conn.execute(PEERS.select(account_id=account_id))
    cursor.row_factory = sqlite3.Row
    peers = {p.peer_id: p for p in map(row_peer, cursor)}
    # a skip-scan over the primary key: one index probe per chat instead of reading every row
    rows = conn.execute(
        "WITH RECURSIVE c(id) AS (SELECT min(chat_id) FROM messages WHERE account_id = ?1"
        " UNION ALL SELECT (SELECT min(chat_id) FROM messages WHERE account_id = ?1"
        " AND chat_id > c.id) FROM c WHERE c.id IS NOT NULL) SELECT id FROM c"
        " WHERE id IS NOT NULL",
        (account_id,),
    ).fetchall()
    return [(int(chat_id), peers.get(int(chat_id))) for (chat_id,) in rows]


def chat_message_counts(
    conn: sqlite3.Connection, account_id: int = DEFAULT_ACCOUNT_ID
) -> dict[int, int]:
    """Messages per chat of the account (from the ``(account_id, chat_id, date)`` index: no
    message row is read)."""
    rows = conn.execute(
        "SELECT chat_id, count(*) FROM messages WHERE account_id = ? GROUP BY chat_id",
        (account_id,),
    ).fetchall()
    return {int(chat_id): int(n) for chat_id, n in rows}


def has_transcripts(conn: sqlite3.Connection) -> bool:
    """Whether the store holds any finished transcript (False before migration 0012)."""
    try:
        row = conn.execute("SELECT 1 FROM transcripts WHERE status = 'done' LIMIT 1").fetchone()
    except sqlite3.OperationalError:  # no such table: a database from before transcripts
        return False
    return row is not None


def transcribed_notes(
    conn: sqlite3.Connection, account_id: int = DEFAULT_ACCOUNT_ID
) -> set[tuple[int, int]]:
    """(chat id, message id) of every note of the account that reads as its transcript in
    the dataset."""
    if not has_transcripts(conn):
        return set()
    rows = conn.execute(
        "SELECT t.chat_id, t.message_id FROM transcripts t JOIN messages m"
        " ON m.account_id = t.account_id AND m.chat_id = t.chat_id"
        " AND m.message_id = t.message_id"
        " WHERE t.account_id = ? AND t.status = 'done' AND t.text != '' AND m.is_forwarded = 0"
        " AND m.service_action IS NULL",
        (account_id,),
    ).fetchall()
    return {(int(c), int(m)) for c, m in rows}


def chat_rows(
    conn: sqlite3.Connection,
    chat_id: int,
    *,
    transcripts: bool = False,
    account_id: int = DEFAULT_ACCOUNT_ID,
) -> list[Row]:
    """All messages of one chat in time order ``(date, message_id)``, as dataset rows.

    Read in primary-key (message id) order, which is time order in every real chat, and
    sorted only when a date goes backwards: ordering by date in SQL would cost a lookup per row.
    With ``transcripts``, a transcribed voice/round-video note becomes a text row of what it
    said (one indexed lookup per chat; the rows are only rebuilt in chats that have some).
    """
    try:
        rows = conn.execute(CHAT_ROWS_SQL, (account_id, chat_id)).fetchall()
        found = (
            dict(conn.execute(CHAT_TRANSCRIPTS_SQL, (account_id, chat_id)).fetchall())
            if transcripts
            else {}
        )
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read chat {chat_id}: {exc}") from exc
    if found:
        rows = [
            (r[0], r[1], r[2], voice_message_text(r[3], found[r[0]]), r[4], domain.KIND_TEXT)
            if r[5] == domain.KIND_MEDIA and r[0] in found
            else r
            for r in rows
        ]
    dates = list(map(_DATE, rows))
    if not all(map(le, dates, islice(dates, 1, None))):
        rows.sort(key=_TIME_ORDER)
    return rows

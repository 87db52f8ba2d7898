"""Replies in the store: the lifecycle of every answer the bot produces.

A reply moves ``queued → generating → sending → sent`` (or ``awaiting_review`` in review mode,
or ends ``dropped`` / ``failed`` / ``expired``). Every move is a guarded compare-and-set on the
status (``transition``), so two tasks — or a task and a restart — can never both move the same
reply: the one that loses sees ``False`` and backs off. That is what makes "never send twice"
hold: a reply is only ever sent by whoever moved it into ``sending``, and after a crash a reply
still in ``sending`` is reconciled against the chat before anything is sent again.

The sent message ids are recorded after every part, so the bot can tell its own messages from
the owner's (human takeover) and a restart knows which parts already went out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

from doppelbot.domain import Reply, ReplyMode, ReplyStatus
from doppelbot.store.database import Database

S = ReplyStatus

#: The moves a reply may make. Terminal states have none.
TRANSITIONS: dict[ReplyStatus, frozenset[ReplyStatus]] = {
    S.QUEUED: frozenset({S.GENERATING, S.DROPPED, S.FAILED}),
    # GENERATING → QUEUED: re-queued after a restart interrupted the generation.
    S.GENERATING: frozenset({S.QUEUED, S.SENDING, S.AWAITING_REVIEW, S.DROPPED, S.FAILED}),
    # AWAITING_REVIEW → GENERATING: the owner asked for another draft.
    S.AWAITING_REVIEW: frozenset({S.SENDING, S.GENERATING, S.DROPPED, S.EXPIRED, S.FAILED}),
    S.SENDING: frozenset({S.SENT, S.DROPPED, S.FAILED}),
    S.SENT: frozenset(),
    S.DROPPED: frozenset(),
    S.FAILED: frozenset(),
    S.EXPIRED: frozenset(),
}

#: Not finished yet: what a restart must pick up again.
OPEN_STATUSES = (S.QUEUED, S.GENERATING, S.AWAITING_REVIEW, S.SENDING)

_COLUMNS = (
    "reply_id, chat_id, status, mode, trigger_message_id, context_message_ids, draft_text,"
    " final_text, error, model_id, adapter_id, review_message_id, sent_message_ids, created_at,"
    " updated_at, generated_at, sent_at"
)
_UPDATABLE = frozenset(
    {
        "trigger_message_id",
        "context_message_ids",
        "prompt",
        "draft_text",
        "final_text",
        "error",
        "model_id",
        "adapter_id",
        "review_message_id",
        "sent_message_ids",
        "generated_at",
        "sent_at",
        "generation_ms",
        "mode",
    }
)


def _ids(value: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in json.loads(value or "[]"))


def row_reply(r: Sequence[Any]) -> Reply:
    return Reply(
        reply_id=r[0],
        chat_id=r[1],
        status=ReplyStatus(r[2]),
        mode=ReplyMode(r[3]),
        trigger_message_id=r[4],
        context_message_ids=_ids(r[5]),
        draft_text=r[6],
        final_text=r[7],
        error=r[8],
        model_id=r[9],
        adapter_id=r[10],
        review_message_id=r[11],
        sent_message_ids=_ids(r[12]),
        created_at=r[13],
        updated_at=r[14],
        generated_at=r[15],
        sent_at=r[16],
    )


def _encode(name: str, value: object) -> object:
    if name in ("context_message_ids", "sent_message_ids"):
        return json.dumps([int(x) for x in value])  # type: ignore[attr-defined]
    if isinstance(value, ReplyMode):
        return value.value
    return value


class IllegalTransitionError(ValueError):
    """A programming error: the code asked for a move the lifecycle does not allow."""


# --- writes inside an open transaction ---------------------------------------------------------
async def create_in(
    conn: aiosqlite.Connection,
    *,
    chat_id: int,
    mode: ReplyMode,
    trigger_message_id: int,
    now: int,
    status: ReplyStatus = S.QUEUED,
) -> int:
    cursor = await conn.execute(
        "INSERT INTO replies (chat_id, status, mode, trigger_message_id, created_at, updated_at)"
        " VALUES (?,?,?,?,?,?)",
        (chat_id, status.value, mode.value, trigger_message_id, now, now),
    )
    assert cursor.lastrowid is not None
    return int(cursor.lastrowid)


async def transition_in(
    conn: aiosqlite.Connection,
    reply_id: int,
    frm: ReplyStatus | Iterable[ReplyStatus],
    to: ReplyStatus,
    *,
    now: int,
    **fields: object,
) -> bool:
    """Move ``reply_id`` from one of ``frm`` to ``to`` and set ``fields``; False when the reply
    is no longer in ``frm`` (someone else moved it first)."""
    sources = (frm,) if isinstance(frm, ReplyStatus) else tuple(frm)
    for source in sources:
        if to not in TRANSITIONS[source]:
            raise IllegalTransitionError(f"reply cannot move from {source} to {to}")
    unknown = set(fields) - _UPDATABLE
    if unknown:
        raise ValueError(f"not a reply field: {sorted(unknown)}")
    sets = ["status = ?", "updated_at = ?"] + [f"{k} = ?" for k in fields]
    params: list[object] = [to.value, now] + [_encode(k, v) for k, v in fields.items()]
    marks = ",".join("?" * len(sources))
    cursor = await conn.execute(
        f"UPDATE replies SET {', '.join(sets)} WHERE reply_id = ? AND status IN ({marks})",
        (*params, reply_id, *(s.value for s in sources)),
    )
    return cursor.rowcount == 1


async def update_in(
    conn: aiosqlite.Connection, reply_id: int, *, now: int, **fields: object
) -> None:
    """Set fields without changing the status (e.g. the review card's message id)."""
    unknown = set(fields) - _UPDATABLE
    if unknown:
        raise ValueError(f"not a reply field: {sorted(unknown)}")
    sets = ["updated_at = ?"] + [f"{k} = ?" for k in fields]
    await conn.execute(
        f"UPDATE replies SET {', '.join(sets)} WHERE reply_id = ?",
        (now, *(_encode(k, v) for k, v in fields.items()), reply_id),
    )


async def add_sent_id_in(
    conn: aiosqlite.Connection, reply_id: int, message_id: int, *, now: int
) -> None:
    row = await (
        await conn.execute("SELECT sent_message_ids FROM replies WHERE reply_id = ?", (reply_id,))
    ).fetchone()
    ids = list(_ids(row[0] if row else None))
    if message_id not in ids:
        ids.append(message_id)
    await conn.execute(
        "UPDATE replies SET sent_message_ids = ?, updated_at = ? WHERE reply_id = ?",
        (json.dumps(ids), now, reply_id),
    )


async def count_recent_sends_in(
    conn: aiosqlite.Connection, since: int, chat_id: int | None = None
) -> int:
    """Replies sent (or being sent) since ``since``: what the hourly caps count."""
    sql = (
        "SELECT count(*) FROM replies WHERE"
        " ((status = 'sent' AND sent_at >= ?) OR (status = 'sending' AND updated_at >= ?))"
    )
    params: list[object] = [since, since]
    if chat_id is not None:
        sql += " AND chat_id = ?"
        params.append(chat_id)
    row = await (await conn.execute(sql, params)).fetchone()
    return int(row[0]) if row else 0


# --- convenience wrappers and reads ------------------------------------------------------------
async def create(
    db: Database, *, chat_id: int, mode: ReplyMode, trigger_message_id: int, now: int
) -> int:
    async with db.transaction() as conn:
        return await create_in(
            conn, chat_id=chat_id, mode=mode, trigger_message_id=trigger_message_id, now=now
        )


async def transition(
    db: Database,
    reply_id: int,
    frm: ReplyStatus | Iterable[ReplyStatus],
    to: ReplyStatus,
    *,
    now: int,
    **fields: object,
) -> bool:
    async with db.transaction() as conn:
        return await transition_in(conn, reply_id, frm, to, now=now, **fields)


async def queue_for_chat(
    db: Database, *, chat_id: int, mode: ReplyMode, trigger_message_id: int, now: int
) -> int:
    """The chat's one queued reply, created or pointed at the newest incoming message: a
    burst of messages is one reply."""
    async with db.transaction() as conn:
        row = await (
            await conn.execute(
                "SELECT reply_id, trigger_message_id FROM replies"
                " WHERE chat_id = ? AND status = 'queued' ORDER BY reply_id DESC LIMIT 1",
                (chat_id,),
            )
        ).fetchone()
        if row is None:
            return await create_in(
                conn, chat_id=chat_id, mode=mode, trigger_message_id=trigger_message_id, now=now
            )
        if trigger_message_id > row[1]:
            await update_in(conn, row[0], now=now, trigger_message_id=trigger_message_id, mode=mode)
        return int(row[0])


async def get(db: Database, reply_id: int) -> Reply | None:
    r = await db.fetchone(f"SELECT {_COLUMNS} FROM replies WHERE reply_id = ?", (reply_id,))
    return row_reply(r) if r else None


async def get_by_review_message(db: Database, review_message_id: int) -> Reply | None:
    r = await db.fetchone(
        f"SELECT {_COLUMNS} FROM replies WHERE review_message_id = ?"
        " ORDER BY reply_id DESC LIMIT 1",
        (review_message_id,),
    )
    return row_reply(r) if r else None


async def queued_for_chat(db: Database, chat_id: int) -> Reply | None:
    r = await db.fetchone(
        f"SELECT {_COLUMNS} FROM replies WHERE chat_id = ? AND status = 'queued'"
        " ORDER BY reply_id DESC LIMIT 1",
        (chat_id,),
    )
    return row_reply(r) if r else None


async def with_status(
    db: Database, statuses: Iterable[ReplyStatus], chat_id: int | None = None
) -> list[Reply]:
    values = [s.value for s in statuses]
    sql = f"SELECT {_COLUMNS} FROM replies WHERE status IN ({','.join('?' * len(values))})"
    params: list[object] = list(values)
    if chat_id is not None:
        sql += " AND chat_id = ?"
        params.append(chat_id)
    rows = await db.fetchall(sql + " ORDER BY reply_id", params)
    return [row_reply(r) for r in rows]


async def for_chat(db: Database, chat_id: int) -> list[Reply]:
    rows = await db.fetchall(
        f"SELECT {_COLUMNS} FROM replies WHERE chat_id = ? ORDER BY reply_id", (chat_id,)
    )
    return [row_reply(r) for r in rows]


async def count_recent_sends(db: Database, since: int, chat_id: int | None = None) -> int:
    return await count_recent_sends_in(db.conn, since, chat_id)


async def bot_message_ids(db: Database, chat_id: int) -> set[int]:
    """Every message id the bot itself sent in ``chat_id``."""
    rows = await db.fetchall(
        "SELECT sent_message_ids FROM replies WHERE chat_id = ? AND sent_message_ids != '[]'",
        (chat_id,),
    )
    found: set[int] = set()
    for r in rows:
        found.update(_ids(r[0]))
    return found


async def count_by_status(db: Database) -> dict[ReplyStatus, int]:
    rows = await db.fetchall("SELECT status, count(*) FROM replies GROUP BY status")
    counts = {s: 0 for s in ReplyStatus}
    for status, n in rows:
        counts[ReplyStatus(status)] = int(n)
    return counts


@dataclass(frozen=True, slots=True)
class ReplySummary:
    """One row of ``doppelbot status``: no texts, only what happened and how fast."""

    reply: Reply
    generation_ms: int | None
    chat_name: str | None


async def last_replies(db: Database, limit: int = 10) -> list[ReplySummary]:
    cols = ", ".join(f"r.{c.strip()}" for c in _COLUMNS.split(","))
    rows = await db.fetchall(
        f"SELECT {cols}, r.generation_ms, p.first_name, p.last_name, p.title, p.username"
        " FROM replies r LEFT JOIN peers p ON p.peer_id = r.chat_id"
        " ORDER BY r.reply_id DESC LIMIT ?",
        (limit,),
    )
    out = []
    for r in rows:
        reply = row_reply(r[:17])
        parts = [x for x in (r[18], r[19]) if x]
        name = r[20] or (" ".join(parts) if parts else None) or (f"@{r[21]}" if r[21] else None)
        out.append(ReplySummary(reply, r[17], name))
    return out

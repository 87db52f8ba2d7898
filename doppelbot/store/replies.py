"""Replies in the store: the lifecycle of every answer the bot produces.

A reply moves ``queued → generating → sending → sent`` (or ``awaiting_review`` in review mode,
or ends ``dropped`` / ``failed`` / ``expired``). Quiet hours and the hourly caps move it to
``deferred`` instead of dropping it: it goes back to ``queued`` when the window opens. Every
move is a guarded compare-and-set on the status (``transition``), so two tasks — or a task and
a restart — can never both move the same reply: the one that loses sees ``False`` and backs
off. That is what makes "never send twice" hold: a reply is only ever sent by whoever moved it
into ``sending``, and after a crash a reply still in ``sending`` is reconciled against the chat
before anything is sent again.

The sent message ids are recorded after every part, so the bot can tell its own messages from
the owner's (human takeover) and a restart knows which parts already went out.

Reply ids are unique across accounts, but every function here reads and moves the replies of
the handle's own account only: two accounts' bots run side by side on one database, and one
must never touch the other's replies (nor count them against its caps).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from doppelbot.core.domain import Reply, ReplyMode, ReplyStatus
from doppelbot.store.database import Database, Tx
from doppelbot.store.table import Table, from_row, json_ids

S = ReplyStatus

#: The moves a reply may make. Terminal states have none.
TRANSITIONS: dict[ReplyStatus, frozenset[ReplyStatus]] = {
    S.QUEUED: frozenset({S.GENERATING, S.DEFERRED, S.DROPPED, S.FAILED}),
    # DEFERRED → QUEUED: the window opened; the reply is generated from the history then.
    S.DEFERRED: frozenset({S.QUEUED, S.DROPPED, S.FAILED}),
    # GENERATING → QUEUED: re-queued after a restart interrupted the generation.
    # GENERATING → DEFERRED: a cap filled up while generating (the text is not kept).
    S.GENERATING: frozenset(
        {S.QUEUED, S.DEFERRED, S.SENDING, S.AWAITING_REVIEW, S.DROPPED, S.FAILED}
    ),
    # AWAITING_REVIEW → GENERATING: the owner asked for another draft.
    S.AWAITING_REVIEW: frozenset({S.SENDING, S.GENERATING, S.DROPPED, S.EXPIRED, S.FAILED}),
    # SENDING → DEFERRED: quiet hours began before the first part went out.
    S.SENDING: frozenset({S.SENT, S.DEFERRED, S.DROPPED, S.FAILED}),
    S.SENT: frozenset(),
    S.DROPPED: frozenset(),
    S.FAILED: frozenset(),
    S.EXPIRED: frozenset(),
}

#: Not finished yet: what a restart must pick up again.
OPEN_STATUSES = (S.QUEUED, S.DEFERRED, S.GENERATING, S.AWAITING_REVIEW, S.SENDING)
#: The chat's one pending reply (a new message points it at itself instead of adding one).
PENDING_STATUSES = (S.QUEUED, S.DEFERRED)

REPLIES = Table(
    "replies",
    (
        "reply_id",
        "chat_id",
        "status",
        "mode",
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
        "created_at",
        "updated_at",
        "generated_at",
        "sent_at",
        "generation_ms",
        "not_before",
    ),
    key=("reply_id",),
    per_account=True,
)
_NEWEST = "ORDER BY reply_id DESC LIMIT 1"
#: What a move may set besides the status (the rest is set once, or by the move itself).
_UPDATABLE = frozenset(REPLIES.columns) - {
    "reply_id",
    "chat_id",
    "status",
    "created_at",
    "updated_at",
}


def row_reply(r: Any) -> Reply:
    """A ``sqlite3.Row`` (read by column name) → ``Reply``."""
    return from_row(
        Reply,
        r,
        status=ReplyStatus,
        mode=ReplyMode,
        context_message_ids=json_ids,
        sent_message_ids=json_ids,
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
    conn: Tx,
    *,
    chat_id: int,
    mode: ReplyMode,
    trigger_message_id: int,
    now: int,
    status: ReplyStatus = S.QUEUED,
) -> int:
    cursor = await conn.execute(
        REPLIES.insert(
            columns=("chat_id", "status", "mode", "trigger_message_id", "created_at", "updated_at"),
            account_id=conn.account_id,
        ),
        (chat_id, status.value, mode.value, trigger_message_id, now, now),
    )
    assert cursor.lastrowid is not None
    return int(cursor.lastrowid)


async def transition_in(
    conn: Tx,
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
        f"UPDATE replies SET {', '.join(sets)} WHERE reply_id = ? AND account_id = ?"
        f" AND status IN ({marks})",
        (*params, reply_id, conn.account_id, *(s.value for s in sources)),
    )
    return cursor.rowcount == 1


async def update_in(conn: Tx, reply_id: int, *, now: int, **fields: object) -> None:
    """Set fields without changing the status (e.g. the review card's message id)."""
    unknown = set(fields) - _UPDATABLE
    if unknown:
        raise ValueError(f"not a reply field: {sorted(unknown)}")
    sets = ["updated_at = ?"] + [f"{k} = ?" for k in fields]
    await conn.execute(
        f"UPDATE replies SET {', '.join(sets)} WHERE reply_id = ? AND account_id = ?",
        (now, *(_encode(k, v) for k, v in fields.items()), reply_id, conn.account_id),
    )


async def add_sent_id_in(conn: Tx, reply_id: int, message_id: int, *, now: int) -> None:
    row = await (
        await conn.execute(
            "SELECT sent_message_ids FROM replies WHERE reply_id = ? AND account_id = ?",
            (reply_id, conn.account_id),
        )
    ).fetchone()
    ids = list(json_ids(row["sent_message_ids"] if row else None))
    if message_id not in ids:
        ids.append(message_id)
    await conn.execute(
        "UPDATE replies SET sent_message_ids = ?, updated_at = ? WHERE reply_id = ?"
        " AND account_id = ?",
        (json.dumps(ids), now, reply_id, conn.account_id),
    )


def _counted_sends(account_id: int, since: int, chat_id: int | None) -> tuple[str, list[object]]:
    """The WHERE clause of what the hourly caps count: the account's replies sent (or being
    sent) since ``since`` (the caps are per account: each is its own bot to Telegram)."""
    sql = (
        " WHERE account_id = ? AND ((status = 'sent' AND sent_at >= ?)"
        " OR (status = 'sending' AND updated_at >= ?))"
    )
    params: list[object] = [account_id, since, since]
    if chat_id is not None:
        sql += " AND chat_id = ?"
        params.append(chat_id)
    return sql, params


async def count_recent_sends_in(conn: Tx, since: int, chat_id: int | None = None) -> int:
    """Replies sent (or being sent) since ``since``: what the hourly caps count."""
    where, params = _counted_sends(conn.account_id, since, chat_id)
    row = await (await conn.execute("SELECT count(*) FROM replies" + where, params)).fetchone()
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
    db: Database,
    *,
    chat_id: int,
    mode: ReplyMode,
    trigger_message_id: int,
    now: int,
    unless_covered: bool = False,
) -> int | None:
    """The chat's one pending (queued or deferred) reply, created or pointed at the newest
    incoming message: a burst of messages is one reply. ``unless_covered``: do nothing (None)
    when a reply already answers this message or a newer one — a message seen twice (a
    restart's catch-up, an update delivered again) is answered at most once."""
    async with db.transaction() as conn:
        marks = ",".join("?" * len(PENDING_STATUSES))
        row = await (
            await conn.execute(
                "SELECT reply_id, trigger_message_id FROM replies WHERE account_id = ?"
                f" AND chat_id = ? AND status IN ({marks}) ORDER BY reply_id DESC LIMIT 1",
                (conn.account_id, chat_id, *(s.value for s in PENDING_STATUSES)),
            )
        ).fetchone()
        if row is None:
            if unless_covered:
                covered = await (
                    await conn.execute(
                        "SELECT 1 FROM replies WHERE account_id = ? AND chat_id = ?"
                        " AND trigger_message_id >= ? LIMIT 1",
                        (conn.account_id, chat_id, trigger_message_id),
                    )
                ).fetchone()
                if covered is not None:
                    return None
            return await create_in(
                conn, chat_id=chat_id, mode=mode, trigger_message_id=trigger_message_id, now=now
            )
        reply_id, trigger = int(row["reply_id"]), int(row["trigger_message_id"])
        if trigger_message_id > trigger:
            await update_in(
                conn, reply_id, now=now, trigger_message_id=trigger_message_id, mode=mode
            )
        return reply_id


async def get(db: Database, reply_id: int) -> Reply | None:
    return await REPLIES.rows(db, "reply_id = ?", (reply_id,)).one(row_reply)


async def get_by_review_message(db: Database, review_message_id: int) -> Reply | None:
    return await REPLIES.rows(db, "review_message_id = ?", (review_message_id,), tail=_NEWEST).one(
        row_reply
    )


async def queued_for_chat(db: Database, chat_id: int) -> Reply | None:
    return await REPLIES.rows(
        db, "chat_id = ? AND status = 'queued'", (chat_id,), tail=_NEWEST
    ).one(row_reply)


async def finished_reviews_since(db: Database, since: int) -> list[Reply]:
    """Review drafts with a card that reached an end state since ``since``."""
    return await REPLIES.rows(
        db,
        "mode = 'review' AND review_message_id IS NOT NULL"
        " AND status IN ('sent', 'dropped', 'failed', 'expired') AND updated_at >= ?",
        (since,),
        tail="ORDER BY reply_id",
    ).all(row_reply)


async def deferred_for_chat(db: Database, chat_id: int) -> Reply | None:
    return await REPLIES.rows(
        db, "chat_id = ? AND status = 'deferred'", (chat_id,), tail=_NEWEST
    ).one(row_reply)


async def recent_send_times(db: Database, since: int, chat_id: int | None = None) -> list[int]:
    """When each reply counted by the hourly caps went out (or started to), oldest first:
    a cap frees a slot an hour after its oldest send."""
    where, params = _counted_sends(db.account_id, since, chat_id)
    rows = await db.fetchall(
        "SELECT CASE status WHEN 'sent' THEN sent_at ELSE updated_at END AS at FROM replies"
        + where
        + " ORDER BY at",
        params,
    )
    return [int(r["at"]) for r in rows]


async def with_status(
    db: Database, statuses: Iterable[ReplyStatus], chat_id: int | None = None
) -> list[Reply]:
    values = [s.value for s in statuses]
    where = f"status IN ({','.join('?' * len(values))})"
    params: list[object] = list(values)
    if chat_id is not None:
        where += " AND chat_id = ?"
        params.append(chat_id)
    return await REPLIES.rows(db, where, params, tail="ORDER BY reply_id").all(row_reply)


async def for_chat(db: Database, chat_id: int) -> list[Reply]:
    return await REPLIES.rows(db, "chat_id = ?", (chat_id,), tail="ORDER BY reply_id").all(
        row_reply
    )


async def count_recent_sends(db: Database, since: int, chat_id: int | None = None) -> int:
    where, params = _counted_sends(db.account_id, since, chat_id)
    return int(await db.scalar("SELECT count(*) FROM replies" + where, params) or 0)


async def bot_message_ids(db: Database, chat_id: int) -> set[int]:
    """Every message id the bot itself sent in ``chat_id``."""
    rows = await db.fetchall(
        "SELECT sent_message_ids FROM replies WHERE account_id = ? AND chat_id = ?"
        " AND sent_message_ids != '[]'",
        (db.account_id, chat_id),
    )
    found: set[int] = set()
    for r in rows:
        found.update(json_ids(r["sent_message_ids"]))
    return found


async def count_by_status(db: Database) -> dict[ReplyStatus, int]:
    rows = await db.fetchall(
        "SELECT status, count(*) AS n FROM replies WHERE account_id = ? GROUP BY status",
        (db.account_id,),
    )
    counts = {s: 0 for s in ReplyStatus}
    for r in rows:
        counts[ReplyStatus(r["status"])] = int(r["n"])
    return counts


@dataclass(frozen=True, slots=True)
class ReplySummary:
    """One row of ``doppelbot status``: no texts, only what happened and how fast."""

    reply: Reply
    generation_ms: int | None
    chat_name: str | None


async def last_replies(db: Database, limit: int = 10) -> list[ReplySummary]:
    return await _summaries(db, "ORDER BY r.reply_id DESC LIMIT ?", (limit,))


async def deferred_replies(db: Database) -> list[ReplySummary]:
    """Every deferred reply, soonest first (``doppelbot status`` lists them)."""
    return await _summaries(db, "AND r.status = 'deferred' ORDER BY r.not_before, r.reply_id", ())


async def _summaries(db: Database, tail: str, params: Sequence[object]) -> list[ReplySummary]:
    rows = await db.fetchall(
        f"SELECT {REPLIES.qualified('r')}, p.first_name, p.last_name, p.title, p.username"
        " FROM replies r LEFT JOIN peers p ON p.account_id = r.account_id"
        f" AND p.peer_id = r.chat_id WHERE r.account_id = ? {tail}",
        (db.account_id, *params),
    )
    out = []
    for r in rows:
        parts = [x for x in (r["first_name"], r["last_name"]) if x]
        name = (
            r["title"]
            or (" ".join(parts) if parts else None)
            or (f"@{r['username']}" if r["username"] else None)
        )
        out.append(ReplySummary(row_reply(r), r["generation_ms"], name))
    return out


async def last_auto_sent(db: Database, chat_id: int) -> Reply | None:
    """The chat's newest reply sent in auto mode (what a takeover correction corrects)."""
    return await REPLIES.rows(
        db,
        "chat_id = ? AND status = 'sent' AND mode = 'auto' AND sent_message_ids != '[]'",
        (chat_id,),
        tail="ORDER BY sent_at DESC, reply_id DESC LIMIT 1",
    ).one(row_reply)


async def owner_written_since(
    db: Database, chat_id: int, since: int, *, replies_since: int
) -> list[tuple[int, int]]:
    """(message id, date) of the owner's own messages in ``chat_id`` dated ``since`` or later,
    newest first, leaving out those a reply recorded as the bot's (such a reply was updated
    after its send, so only replies updated since ``replies_since`` are looked at)."""
    rows = await db.fetchall(
        "SELECT m.message_id, m.date FROM messages m WHERE m.account_id = ? AND m.chat_id = ?"
        " AND m.is_outgoing = 1 AND m.date >= ? AND NOT EXISTS ("
        "  SELECT 1 FROM replies r, json_each(r.sent_message_ids) j"
        "  WHERE r.account_id = m.account_id AND r.chat_id = m.chat_id AND r.updated_at >= ?"
        "  AND j.value = m.message_id)"
        " ORDER BY m.date DESC, m.message_id DESC",
        (db.account_id, chat_id, since, replies_since),
    )
    return [(int(r["message_id"]), int(r["date"])) for r in rows]

"""Feedback in the store: review verdicts, reactions (current state) and what export reads.

Reactions are state, not events: Telegram reports the full current set of reactions on a
message (as ``UpdateMessageReactions`` or inside an edit), so ``set_reactions`` replaces the
message's rows; seeing the same update twice changes nothing.

Reactions belong to the handle's account (message ids are per account); verdicts belong to a
reply, and so to its account. What feedback export reads is every account's: the owner's
feedback trains one doppelganger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from doppelbot.core.domain import Reaction, ReviewVerdict, Verdict
from doppelbot.store.database import Database, Tx, now
from doppelbot.store.table import Table, from_row, json_ids

VERDICTS = Table(
    "review_verdicts",
    (
        "verdict_id",
        "reply_id",
        "verdict",
        "draft_text",
        "final_text",
        "created_at",
        "source_message_id",
    ),
    key=("verdict_id",),
)
REACTIONS = Table(
    "reactions",
    ("chat_id", "message_id", "emoji", "count", "by_owner", "updated_at"),
    key=("account_id", "chat_id", "message_id", "emoji"),
    per_account=True,
)


async def record_verdict_in(
    conn: Tx,
    reply_id: int,
    verdict: Verdict,
    draft_text: str,
    final_text: str | None,
    at: int | None = None,
    *,
    source_message_id: int | None = None,
) -> None:
    """``source_message_id``: the owner's answer that gave the verdict, when there is one."""
    await conn.execute(
        VERDICTS.insert(columns=VERDICTS.columns[1:]),
        (
            reply_id,
            verdict.value,
            draft_text,
            final_text,
            at if at is not None else now(),
            source_message_id,
        ),
    )


async def record_verdict(
    db: Database,
    reply_id: int,
    verdict: Verdict,
    draft_text: str,
    final_text: str | None,
    at: int | None = None,
) -> None:
    async with db.transaction() as conn:
        await record_verdict_in(conn, reply_id, verdict, draft_text, final_text, at)


async def repair_missing_verdicts(db: Database, at: int) -> int:
    """Record the verdict of every reviewed reply that went out (or started to) without one:
    only the owner's approval moves a review draft to 'sending', so a reply there with no
    approval on record lost it to a crash (older versions wrote it after the send). Returns
    how many were recorded."""
    async with db.transaction() as conn:
        rows = await (
            await conn.execute(
                "SELECT reply_id, draft_text, final_text FROM replies r WHERE r.account_id = ?"
                " AND r.mode = 'review' AND r.status IN ('sending', 'sent')"
                " AND NOT EXISTS (SELECT 1 FROM review_verdicts v WHERE v.reply_id = r.reply_id"
                " AND v.verdict IN ('approved', 'corrected'))",
                (conn.account_id,),
            )
        ).fetchall()
        for r in rows:
            draft = r["draft_text"] or ""
            final = r["final_text"] or draft
            verdict = Verdict.APPROVED if final == draft else Verdict.CORRECTED
            await record_verdict_in(conn, r["reply_id"], verdict, draft, final, at)
    return len(rows)


async def answered_by(db: Database, reply_id: int, message_id: int) -> bool:
    """Whether the owner's message ``message_id`` already gave ``reply_id`` a verdict."""
    found = await db.scalar(
        "SELECT 1 FROM review_verdicts WHERE reply_id = ? AND source_message_id = ?",
        (reply_id, message_id),
    )
    return found is not None


def _verdict(r: Any) -> ReviewVerdict:
    return from_row(ReviewVerdict, r, verdict=Verdict)


def _reaction(r: Any) -> Reaction:
    return from_row(Reaction, r, by_owner=bool)


async def verdicts_for(db: Database, reply_id: int) -> list[ReviewVerdict]:
    return await VERDICTS.rows(db, "reply_id = ?", (reply_id,), tail="ORDER BY verdict_id").all(
        _verdict
    )


async def set_reactions(
    db: Database, chat_id: int, message_id: int, reactions: Sequence[Reaction]
) -> None:
    """Replace the stored reactions of one message with its current state."""
    ts = now()
    async with db.transaction() as conn:
        await conn.execute(
            "DELETE FROM reactions WHERE account_id = ? AND chat_id = ? AND message_id = ?",
            (conn.account_id, chat_id, message_id),
        )
        await conn.executemany(
            REACTIONS.insert(conflict="update", account_id=conn.account_id),
            [(chat_id, message_id, r.emoji, r.count, int(r.by_owner), ts) for r in reactions],
        )


async def reactions_for(db: Database, chat_id: int, message_id: int) -> list[Reaction]:
    return await REACTIONS.rows(
        db, "chat_id = ? AND message_id = ?", (chat_id, message_id), tail="ORDER BY emoji"
    ).all(_reaction)


@dataclass(frozen=True, slots=True)
class FeedbackReply:
    """A reply with everything feedback export needs."""

    reply_id: int
    chat_id: int
    status: str
    mode: str
    prompt: str | None
    draft_text: str | None
    final_text: str | None
    sent_message_ids: tuple[int, ...]
    context_message_ids: tuple[int, ...]
    verdicts: tuple[ReviewVerdict, ...]
    reactions: tuple[Reaction, ...]  # other people's reactions on the sent messages


async def feedback_replies(db: Database) -> list[FeedbackReply]:
    """Every reply that has a prompt, of every own account, with its verdicts and the
    reactions on it (time order)."""

    rows = await db.fetchall(
        "SELECT reply_id, account_id, chat_id, status, mode, prompt, draft_text, final_text,"
        " sent_message_ids, context_message_ids FROM replies WHERE prompt IS NOT NULL"
        " ORDER BY created_at, reply_id"
    )
    by_reply: dict[int, list[ReviewVerdict]] = {}
    for v in await VERDICTS.rows(db, tail="ORDER BY verdict_id").all(_verdict):
        by_reply.setdefault(v.reply_id, []).append(v)
    reaction_rows = await db.fetchall(
        f"SELECT account_id, {REACTIONS.column_list} FROM reactions WHERE by_owner = 0"
    )
    reactions: dict[tuple[int, int, int], list[Reaction]] = {}
    for r in reaction_rows:
        key = (r["account_id"], r["chat_id"], r["message_id"])
        reactions.setdefault(key, []).append(_reaction(r))
    out = []
    for r in rows:
        sent = json_ids(r["sent_message_ids"])
        reacts = tuple(
            x for mid in sent for x in reactions.get((r["account_id"], r["chat_id"], mid), ())
        )
        extra = {
            "sent_message_ids": sent,
            "verdicts": tuple(by_reply.get(r["reply_id"], ())),
            "reactions": reacts,
        }
        out.append(from_row(FeedbackReply, {**r, **extra}, context_message_ids=json_ids))
    return out


async def latest_verdict(db: Database, reply_id: int, verdict: Verdict) -> ReviewVerdict | None:
    return await VERDICTS.rows(
        db,
        "reply_id = ? AND verdict = ?",
        (reply_id, verdict.value),
        tail="ORDER BY verdict_id DESC LIMIT 1",
    ).one(_verdict)


async def set_final_text(db: Database, verdict_id: int, text: str) -> None:
    """A takeover went on in more messages: the verdict holds the whole turn."""
    async with db.transaction() as conn:
        await conn.execute(
            "UPDATE review_verdicts SET final_text = ? WHERE verdict_id = ?", (text, verdict_id)
        )

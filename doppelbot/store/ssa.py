"""SSA batches, items and labels in the store (see migrations/0010_ssa.sql).

Posting is resumable: items are stored before any card is posted, each card's message id is
recorded as soon as it is sent, and only items without a card are posted on a re-run.
Labels are upserted per item, so the owner may change a mark by answering again.

Batches, items and labels are shared by all own accounts (they judge one doppelganger), but a
card is a message in the Saved Messages of the account that posted it: posting records the
handle's account with the card's id, and cards are looked up within the handle's account.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from doppelbot.core.domain import Candidate, SsaLabel
from doppelbot.store.database import Database, now
from doppelbot.store.table import Table, from_row

SSA_BATCHES = Table(
    "ssa_batches",
    ("batch_id", "dataset", "seed", "n_contexts", "sources", "created_at"),
    key=("batch_id",),
)
SSA_ITEMS = Table(
    "ssa_items",
    (
        "item_id",
        "batch_id",
        "context_key",
        "source",
        "position",
        "context",
        "model_input",
        "reply",
        "card_message_id",
        "posted_at",
    ),
    key=("item_id",),
)
SSA_LABELS = Table(
    "ssa_labels", ("item_id", "sensible", "specific", "raw", "labelled_at"), key=("item_id",)
)


@dataclass(frozen=True, slots=True)
class SsaItem:
    item_id: int
    batch_id: int
    context_key: str
    source: str
    position: int
    context: tuple[tuple[str, str], ...]  # (role, text)
    model_input: str
    reply: str
    card_message_id: int | None


async def create_batch(
    db: Database,
    *,
    dataset: str,
    seed: int,
    n_contexts: int,
    candidates: Sequence[Candidate],
    contexts: dict[str, tuple[tuple[tuple[str, str], ...], str]],
) -> int:
    """Store a batch and its items in blind order; ``contexts`` maps key → (turns, input)."""
    sources = sorted({c.source for c in candidates})
    async with db.transaction() as conn:
        cur = await conn.execute(
            SSA_BATCHES.insert(columns=SSA_BATCHES.columns[1:]),
            (dataset, seed, n_contexts, json.dumps(sources), now()),
        )
        batch_id = int(cur.lastrowid or 0)
        await conn.executemany(
            SSA_ITEMS.insert(columns=SSA_ITEMS.columns[1:8]),
            [
                (
                    batch_id,
                    c.context_key,
                    c.source,
                    pos,
                    json.dumps(contexts[c.context_key][0], ensure_ascii=False),
                    contexts[c.context_key][1],
                    c.reply,
                )
                for pos, c in enumerate(candidates)
            ],
        )
    return batch_id


def _turns(value: str) -> tuple[tuple[str, str], ...]:
    return tuple((str(role), str(text)) for role, text in json.loads(value))


def _item(r: Any) -> SsaItem:
    return from_row(SsaItem, r, context=_turns)


async def items(db: Database, batch_id: int, *, unposted_only: bool = False) -> list[SsaItem]:
    extra = " AND card_message_id IS NULL" if unposted_only else ""
    return await SSA_ITEMS.rows(
        db, f"batch_id = ?{extra}", (batch_id,), tail="ORDER BY position"
    ).all(_item)


async def item_by_card(db: Database, card_message_id: int) -> SsaItem | None:
    """The item whose card is message ``card_message_id`` of the handle's Saved Messages."""
    return await SSA_ITEMS.rows(
        db, "account_id = ? AND card_message_id = ?", (db.account_id, card_message_id)
    ).one(_item)


async def mark_posted(db: Database, item_id: int, card_message_id: int) -> None:
    """The item's card went out to the handle's Saved Messages as ``card_message_id``."""
    await db.execute(
        "UPDATE ssa_items SET account_id = ?, card_message_id = ?, posted_at = ? WHERE item_id = ?",
        (db.account_id, card_message_id, now(), item_id),
    )


async def card_ids(db: Database, batch_id: int | None = None) -> list[int]:
    """The cards the handle's account posted (of one batch, or of all)."""
    sql = "SELECT card_message_id FROM ssa_items WHERE account_id = ?"
    params: tuple[int, ...] = (db.account_id,)
    if batch_id is not None:
        sql += " AND batch_id = ?"
        params += (batch_id,)
    rows = await db.fetchall(sql, params)
    return [int(r["card_message_id"]) for r in rows]


async def save_label(db: Database, item_id: int, label: SsaLabel, raw: str) -> None:
    await db.execute(
        SSA_LABELS.insert(conflict="update"),
        (item_id, int(label.sensible), int(label.specific), raw, now()),
    )


async def latest_batch_id(db: Database) -> int | None:
    value = await db.scalar("SELECT max(batch_id) FROM ssa_batches")
    return None if value is None else int(value)


async def labels_by_source(
    db: Database, batch_id: int | None = None
) -> dict[str, list[tuple[str, SsaLabel]]]:
    """source → [(context_key, label)] for labelled items (all batches when None)."""
    where = "" if batch_id is None else " WHERE i.batch_id = ?"
    rows = await db.fetchall(
        "SELECT i.source, i.context_key, l.sensible, l.specific FROM ssa_labels l"
        f" JOIN ssa_items i ON i.item_id = l.item_id{where} ORDER BY i.position",
        () if batch_id is None else (batch_id,),
    )
    out: dict[str, list[tuple[str, SsaLabel]]] = {}
    for r in rows:
        label = SsaLabel(bool(r["sensible"]), bool(r["specific"]))
        out.setdefault(str(r["source"]), []).append((str(r["context_key"]), label))
    return out


async def batch_progress(db: Database, batch_id: int) -> tuple[int, int, int]:
    """(items, posted, labelled)."""
    r = await db.fetchone(
        "SELECT count(*) AS items, count(i.card_message_id) AS posted,"
        " count(l.item_id) AS labelled FROM ssa_items i"
        " LEFT JOIN ssa_labels l ON l.item_id = i.item_id WHERE i.batch_id = ?",
        (batch_id,),
    )
    return int(r["items"]), int(r["posted"]), int(r["labelled"])


async def count_labelled(db: Database, batch_id: int | None = None) -> int:
    """Labelled items (of one batch, or of all)."""
    sql = "SELECT count(*) FROM ssa_labels l JOIN ssa_items i ON i.item_id = l.item_id"
    if batch_id is None:
        return int(await db.scalar(sql))
    return int(await db.scalar(sql + " WHERE i.batch_id = ?", (batch_id,)))

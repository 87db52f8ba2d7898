"""Which LoRA adapter the bot serves (an append-only history) and the training runs' records.

The newest ``adapter_choices`` row is the served adapter; ``previous_choice_id`` links each
choice to the one it replaced, so a rollback walks back one step at a time and nothing is ever
lost. ``training_runs`` has one row per run folder (a resumed run keeps its row). The rules —
when a switch is allowed, what a rollback serves — live in ``doppelbot.training.registry``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doppelbot.store.database import Database, now
from doppelbot.store.table import Table, from_row

ADAPTER_CHOICES = Table(
    "adapter_choices",
    (
        "choice_id",
        "adapter_path",
        "adapter_name",
        "heldout_loss",
        "forced",
        "reason",
        "previous_choice_id",
        "chosen_at",
    ),
    key=("choice_id",),
)
TRAINING_RUNS = Table(
    "training_runs",
    (
        "run_id",
        "method",
        "status",
        "base_model",
        "run_dir",
        "adapter_path",
        "dataset_hash",
        "params",
        "metrics",
        "started_at",
        "finished_at",
    ),
    key=("run_dir",),
)
# A resumed run updates its row; an adapter path once known is kept.
_UPSERT_RUN = (
    TRAINING_RUNS.insert(
        columns=TRAINING_RUNS.columns[1:],
        conflict="update",
        update=("status", "dataset_hash", "params", "metrics", "finished_at"),
    )
    + ", adapter_path=COALESCE(excluded.adapter_path, training_runs.adapter_path)"
)


@dataclass(frozen=True, slots=True)
class AdapterChoice:
    choice_id: int
    adapter_path: Path
    adapter_name: str
    heldout_loss: float | None
    forced: bool
    reason: str
    previous_choice_id: int | None
    chosen_at: int


def _choice(r: Any) -> AdapterChoice:
    return from_row(AdapterChoice, r, adapter_path=Path, forced=bool)


async def current_choice(db: Database) -> AdapterChoice | None:
    return await ADAPTER_CHOICES.rows(db, tail="ORDER BY choice_id DESC LIMIT 1").one(_choice)


async def get_choice(db: Database, choice_id: int) -> AdapterChoice | None:
    return await ADAPTER_CHOICES.rows(db, "choice_id = ?", (choice_id,)).one(_choice)


async def choice_history(db: Database, limit: int = 20) -> list[AdapterChoice]:
    return await ADAPTER_CHOICES.rows(
        db, params=(limit,), tail="ORDER BY choice_id DESC LIMIT ?"
    ).all(_choice)


async def insert_choice(
    db: Database,
    adapter: Path,
    *,
    heldout_loss: float | None,
    forced: bool,
    reason: str,
    previous_choice_id: int | None,
) -> int:
    """Append a choice; returns its id."""
    async with db.transaction() as conn:
        cursor = await conn.execute(
            ADAPTER_CHOICES.insert(columns=ADAPTER_CHOICES.columns[1:]),
            (
                str(adapter),
                adapter.name,
                heldout_loss,
                int(forced),
                reason,
                previous_choice_id,
                now(),
            ),
        )
    return int(cursor.lastrowid or 0)


async def upsert_run(
    db: Database,
    *,
    run_dir: Path,
    method: str,
    status: str,
    base_model: str,
    started_at: int,
    dataset_hash: str | None = None,
    params: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    adapter_path: Path | None = None,
    finished_at: int | None = None,
) -> None:
    """Insert or update the ``training_runs`` row of one run folder (a resumed run keeps its
    row: the folder is the natural key)."""
    await db.execute(
        _UPSERT_RUN,
        (
            method,
            status,
            base_model,
            str(run_dir),
            None if adapter_path is None else str(adapter_path),
            dataset_hash,
            json.dumps(params or {}, ensure_ascii=False, sort_keys=True),
            json.dumps(metrics or {}, ensure_ascii=False, sort_keys=True),
            started_at,
            finished_at,
        ),
    )

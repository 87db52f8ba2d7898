"""The SSA labelling flow: sample contexts, generate, post blind cards, read labels, report.

Core code: it talks to the model through ``ReplyGenerator`` and to Saved Messages through
``CardPoster``, so it is tested with plain fakes; ``doppelbot ssa`` wires the model worker and
Telethon. Sources are adapter names, plus ``owner`` for the owner's real reply (a reference row,
labelled blind like the rest).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from doppelbot.config import GenerationOptions
from doppelbot.core.domain import Candidate, Sample, SsaLabel
from doppelbot.core.errors import GenerationError
from doppelbot.core.ports import ReplyGenerator
from doppelbot.ssa.labels import (
    LABEL_HELP,
    SsaReport,
    blind_order,
    parse_label,
    ssa_report,
)
from doppelbot.store import ssa as store
from doppelbot.store.database import Database

OWNER_SOURCE = "owner"
CARD_MARK = "🧪 SSA #"


class CardPoster(Protocol):
    async def post(self, text: str) -> int:
        """Post ``text`` to Saved Messages; returns the card's message id."""
        ...


def context_key(sample: Sample) -> str:
    first = sample.reply_message_ids[0] if sample.reply_message_ids else sample.reply_date
    return f"{sample.chat_id}:{first}"


def sample_contexts(samples: Sequence[Sample], n: int, seed: int) -> list[Sample]:
    """``n`` distinct contexts, chosen reproducibly for a seed."""
    unique = {context_key(s): s for s in samples}
    keys = sorted(unique)
    chosen = random.Random(seed).sample(keys, min(n, len(keys)))
    return [unique[k] for k in sorted(chosen)]


async def prepare_batch(
    db: Database,
    samples: Sequence[Sample],
    generators: Mapping[str, ReplyGenerator],
    options: GenerationOptions,
    *,
    dataset: str,
    n: int,
    seed: int,
    include_owner: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Generate a reply per (context, source), store the blind-ordered batch; returns its id.

    A failed generation leaves that (context, source) out rather than storing junk.
    """
    if OWNER_SOURCE in generators:
        raise ValueError(f"{OWNER_SOURCE!r} is reserved for the owner's real replies")
    chosen = sample_contexts(samples, n, seed)
    total = len(chosen) * len(generators)
    done = 0
    candidates: list[Candidate] = []
    contexts: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {}
    for sample in chosen:
        key = context_key(sample)
        contexts[key] = (tuple((t.role.value, t.text) for t in sample.context), sample.model_input)
        if include_owner:
            candidates.append(Candidate(key, OWNER_SOURCE, sample.reply))
        for source, generator in generators.items():
            try:
                reply = await generator.generate(sample.model_input, options)
            except GenerationError:
                reply = None
            if reply:
                candidates.append(Candidate(key, source, reply))
            done += 1
            if on_progress:
                on_progress(done, total)
    ordered = blind_order(candidates, seed)
    return await store.create_batch(
        db,
        dataset=dataset,
        seed=seed,
        n_contexts=len(chosen),
        candidates=ordered,
        contexts=contexts,
    )


def format_ssa_card(item: store.SsaItem, total: int) -> str:
    lines = [f"{CARD_MARK}{item.item_id} ({item.position + 1}/{total})"]
    for role, text in item.context[-6:]:
        who = "Я" if role == "owner" else "Собеседник"
        lines.append(f"› {who}: {' '.join(text.split())}")
    lines += ["", f"💬 {item.reply}", "", LABEL_HELP]
    return "\n".join(lines)


async def post_batch(
    db: Database,
    batch_id: int,
    poster: CardPoster,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Post every card of the batch not posted yet (resumable); returns how many were posted."""
    all_items = await store.items(db, batch_id)
    pending = [i for i in all_items if i.card_message_id is None]
    for n, item in enumerate(pending, 1):
        message_id = await poster.post(format_ssa_card(item, len(all_items)))
        await store.mark_posted(db, item.item_id, message_id)
        if on_progress:
            on_progress(n, len(pending))
    return len(pending)


@dataclass(frozen=True, slots=True)
class LabelOutcome:
    item: store.SsaItem
    label: SsaLabel


async def record_label(db: Database, card_message_id: int, text: str) -> LabelOutcome | None:
    """The owner answered ``text`` to a message: if it is an SSA card, parse and store the
    label. ``None`` when the message is not an SSA card; ``LabelSyntaxError`` (with the hint to
    show) when the marks are malformed."""
    item = await store.item_by_card(db, card_message_id)
    if item is None:
        return None
    label = parse_label(text)
    await store.save_label(db, item.item_id, label, text.strip())
    return LabelOutcome(item, label)


@dataclass(frozen=True, slots=True)
class SourceRow:
    source: str
    report: SsaReport
    common: SsaReport | None  # on contexts every compared source has a label for


def compare(
    labels: Mapping[str, Sequence[tuple[str, SsaLabel]]],
) -> list[SourceRow]:
    """One row per source; ``common`` restricts every source to the contexts all share."""

    shared: set[str] | None = None
    for rows in labels.values():
        keys = {k for k, _ in rows}
        shared = keys if shared is None else shared & keys
    out = []
    for source in sorted(labels, key=lambda s: (s == OWNER_SOURCE, s)):
        rows = labels[source]
        common = (
            ssa_report([lab for k, lab in rows if k in shared])
            if shared is not None and len(labels) > 1
            else None
        )
        out.append(SourceRow(source, ssa_report([lab for _, lab in rows]), common))
    return out

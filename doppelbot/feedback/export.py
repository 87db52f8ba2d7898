"""Owner feedback → training data (pure core).

Turns the stored replies, verdicts and reactions into three JSONL-ready sets:

- **positives** (for SFT on feedback): approved drafts and the owner's corrections (weight 1),
  replies the other person reacted to positively (weight 1), and replies sent in auto mode that
  nobody corrected or disliked (weak positives, weight ``weak_weight``);
- **pairs** (for DPO): (prompt, rejected draft, chosen owner text) from corrections, from
  takeovers (the owner rewrote right after a bot reply) and from drafts the owner regenerated
  before approving another;
- **negatives** (for a KTO-style objective): rejected and regenerated-away drafts, replies with a
  negative reaction, and replies the owner took over.

Each row carries ``model_input`` (the exact prompt the reply was generated from) and, for
positives, ``model_target`` from the shared prompt module, so the trainer uses them as is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from doppelbot.core.domain import Verdict
from doppelbot.core.prompt import build_target
from doppelbot.store.feedback import FeedbackReply

WEAK_WEIGHT = 0.3

#: ``kind`` values of negatives.jsonl rows (texts the owner did not want): never imitated.
NEGATIVE_KINDS = frozenset(
    {
        "negative",
        "rejected",
        "regenerated_away",
        "corrected_away",
        "taken_over",
        "negative_reaction",
    }
)


@dataclass
class FeedbackExport:
    positives: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    negatives: list[dict[str, Any]] = field(default_factory=list)
    verdicts: Counter[str] = field(default_factory=Counter)
    reactions: Counter[str] = field(default_factory=Counter)

    def counts(self) -> dict[str, int]:
        out = {
            "positives": len(self.positives),
            "pairs": len(self.pairs),
            "negatives": len(self.negatives),
        }
        for kind, n in sorted(Counter(p["kind"] for p in self.positives).items()):
            out[f"positives.{kind}"] = n
        for kind, n in sorted(Counter(p["kind"] for p in self.pairs).items()):
            out[f"pairs.{kind}"] = n
        for v, n in sorted(self.verdicts.items()):
            out[f"verdicts.{v}"] = n
        for v, n in sorted(self.reactions.items()):
            out[f"reactions.{v}"] = n
        return out


@dataclass
class _ReplyRows:
    """Adds one reply's rows to the export, each distinct text once."""

    r: FeedbackReply
    out: FeedbackExport
    seen_pos: set[str] = field(default_factory=set)
    seen_pair: set[tuple[str, str]] = field(default_factory=set)
    seen_neg: set[str] = field(default_factory=set)

    def _row(self, kind: str, **fields: Any) -> dict[str, Any]:
        r = self.r
        return {"reply_id": r.reply_id, "chat_id": r.chat_id, "kind": kind, **fields}

    def positive(self, kind: str, text: str | None, weight: float) -> None:
        if not text or not text.strip() or text in self.seen_pos:
            return
        self.seen_pos.add(text)
        target = build_target(text)
        self.out.positives.append(
            self._row(
                kind, weight=weight, model_input=self.r.prompt, model_target=target, reply=text
            )
        )

    def pair(self, kind: str, rejected: str | None, chosen: str | None) -> None:
        if not rejected or not chosen or rejected.strip() == chosen.strip():
            return
        if (rejected, chosen) in self.seen_pair:
            return
        self.seen_pair.add((rejected, chosen))
        self.out.pairs.append(
            self._row(kind, model_input=self.r.prompt, rejected=rejected, chosen=chosen)
        )

    def negative(self, kind: str, text: str | None) -> None:
        if not text or not text.strip() or text in self.seen_neg:
            return
        self.seen_neg.add(text)
        self.out.negatives.append(self._row(kind, model_input=self.r.prompt, reply=text))


def build_feedback(
    replies: Iterable[FeedbackReply],
    *,
    positive_emoji: Sequence[str],
    negative_emoji: Sequence[str],
    weak_weight: float = WEAK_WEIGHT,
) -> FeedbackExport:
    pos_set, neg_set = set(positive_emoji), set(negative_emoji)
    out = FeedbackExport()
    for r in replies:
        if not r.prompt:
            continue
        rows = _ReplyRows(r, out)
        positive, pair, negative = rows.positive, rows.pair, rows.negative

        regenerated_away: list[str] = []
        corrected_or_taken_over = False
        for v in r.verdicts:
            out.verdicts[v.verdict.value] += 1
            if v.verdict is Verdict.APPROVED:
                positive("approved", v.final_text or v.draft_text, 1.0)
            elif v.verdict is Verdict.CORRECTED:
                corrected_or_taken_over = True
                positive("corrected", v.final_text, 1.0)
                pair("corrected", v.draft_text, v.final_text)
                negative("corrected_away", v.draft_text)
            elif v.verdict is Verdict.TAKEOVER:
                corrected_or_taken_over = True
                pair("takeover", v.draft_text, v.final_text)
                negative("taken_over", v.draft_text)
            elif v.verdict is Verdict.REGENERATED:
                regenerated_away.append(v.draft_text)
                negative("regenerated_away", v.draft_text)
            elif v.verdict is Verdict.REJECTED:
                negative("rejected", v.draft_text)

        final_chosen = next(
            (
                v.final_text or v.draft_text
                for v in reversed(r.verdicts)
                if v.verdict in (Verdict.APPROVED, Verdict.CORRECTED)
            ),
            None,
        )
        for old in regenerated_away:
            pair("regenerated", old, final_chosen)

        sent_text = r.final_text or r.draft_text
        liked = [x for x in r.reactions if x.emoji in pos_set]
        disliked = [x for x in r.reactions if x.emoji in neg_set]
        for x in r.reactions:
            if x.emoji in pos_set:
                out.reactions["positive"] += 1
            elif x.emoji in neg_set:
                out.reactions["negative"] += 1
        if r.status == "sent" and sent_text:
            if liked and not disliked:
                positive("reaction", sent_text, 1.0)
            if disliked:
                negative("negative_reaction", sent_text)
            if r.mode == "auto" and not corrected_or_taken_over and not disliked:
                positive("sent_unedited", sent_text, weak_weight)
    return out

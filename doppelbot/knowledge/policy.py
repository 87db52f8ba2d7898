"""The fact-fallback rule, as plain core logic (no embedder here).

The generated reply and the best fact are scored against the incoming message, and the *fact*
is sent unless the reply is more relevant by at least a margin (0.1 cosine): a fine-tuned small
model often answers "where do you work?" with a vague line, while a stored fact answers it. The
rule is off by default (``DOPPELBOT_FACT_FALLBACK``) because a bare fact reads unlike chat.

``decide_fallback`` is pure; ``apply_fact_fallback`` gets the reply's score through any
``FactRetriever`` (the knowledge base, or a fake in tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from doppelbot.core.ports import FactRetriever, ScoredFact

# Cosines come out of float32 maths: 0.6 - 0.5 is 0.0999…; a reply better by exactly the margin
# must be kept (a tie goes to the model's own words).
_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class FallbackDecision:
    text: str  # what to send
    use_fact: bool
    reply_score: float | None = None
    fact_score: float | None = None
    fact_id: int | None = None


def fact_wins(reply_score: float, fact_score: float, margin: float) -> bool:
    """True when the fact should be sent: the reply is NOT more relevant by >= ``margin``."""
    return reply_score - fact_score < margin - _EPS


def decide_fallback(
    reply: str,
    reply_score: float,
    best_fact: ScoredFact | None,
    *,
    enabled: bool,
    margin: float,
) -> FallbackDecision:
    """Keep ``reply`` or answer with ``best_fact`` (its ``score`` = similarity to the message)."""
    if not enabled or best_fact is None:
        return FallbackDecision(
            reply, False, reply_score, None if best_fact is None else best_fact.score
        )
    if fact_wins(reply_score, best_fact.score, margin):
        return FallbackDecision(
            best_fact.text, True, reply_score, best_fact.score, best_fact.fact_id
        )
    return FallbackDecision(reply, False, reply_score, best_fact.score, best_fact.fact_id)


async def apply_fact_fallback(
    retriever: FactRetriever,
    message: str,
    reply: str,
    facts: Sequence[ScoredFact],
    *,
    enabled: bool,
    margin: float,
) -> FallbackDecision:
    """The rule end to end: ``facts`` are those retrieved for ``message`` (best first).

    Nothing is encoded when the rule is off or no fact was retrieved.
    """
    if not enabled or not facts:
        return FallbackDecision(reply, False)
    best = max(facts, key=lambda f: f.score)
    (reply_score,) = await retriever.similarity(message, [reply])
    return decide_fallback(reply, reply_score, best, enabled=True, margin=margin)

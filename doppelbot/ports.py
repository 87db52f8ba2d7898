"""The core's view of its adapters: small Protocols the model, knowledge and Telegram
adapters implement, so the core (responder, review, dataset) is tested with plain fakes and
never imports torch or telethon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from doppelbot.domain import GenerationOptions


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """Which weights produced a reply (stored with every reply)."""

    model_id: str
    adapter_id: str | None = None


class ReplyGenerator(Protocol):
    """The model worker as the event loop sees it."""

    @property
    def identity(self) -> ModelIdentity: ...

    async def generate(self, prompt: str, options: GenerationOptions) -> str:
        """The decoded reply text; raises ``GenerationError`` (never returns junk or '')."""
        ...


@dataclass(frozen=True, slots=True)
class ScoredFact:
    fact_id: int
    text: str
    score: float


class FactRetriever(Protocol):
    async def retrieve(
        self, query: str, *, top_k: int | None = None, threshold: float | None = None
    ) -> list[ScoredFact]: ...

    async def similarity(self, query: str, candidates: Sequence[str]) -> list[float]:
        """Cosine similarity of ``query`` to each candidate (for the fact-fallback rule)."""
        ...

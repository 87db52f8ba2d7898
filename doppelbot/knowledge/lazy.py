"""The running bot's knowledge base: opened when there is a fact to retrieve, never fatal.

A bot without facts never pays for the embedder (hundreds of MB, seconds to load): the first
``/fact`` in Saved Messages (or ``doppelbot facts add`` while the bot runs) is picked up by the
next reply, which opens the knowledge base then — once. A knowledge base that cannot load (the
embedder missing offline) leaves the bot answering without facts rather than not at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from doppelbot.core.errors import DoppelbotError
from doppelbot.core.ports import ScoredFact
from doppelbot.store.facts import count_facts

if TYPE_CHECKING:
    from doppelbot.config import Settings
    from doppelbot.knowledge.knowledge_base import KnowledgeBase
    from doppelbot.store.database import Database

log = logging.getLogger("doppelbot.knowledge")


class LazyKnowledgeBase:
    """A ``FactRetriever`` that opens ``KnowledgeBase`` on the first retrieval with facts."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self._settings = settings
        self._db = db
        self._kb: KnowledgeBase | None = None
        self._failed = False
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        return self._kb is not None

    async def warm(self) -> None:
        """Open it now when there are facts (at start, so the first reply does not wait)."""
        if await self._get() is None and not self._failed:
            log.info(
                "knowledge: no facts yet (`/fact` in Saved Messages or `doppelbot facts add`); "
                "the knowledge base loads with the first one"
            )

    async def _get(self) -> KnowledgeBase | None:
        if self._kb is not None or self._failed:
            return self._kb
        async with self._lock:
            if self._kb is None and not self._failed and await count_facts(self._db):
                from doppelbot.knowledge.knowledge_base import KnowledgeBase

                log.info("knowledge: loading the knowledge base")
                try:
                    self._kb = await KnowledgeBase.open(self._settings, self._db)
                except DoppelbotError as exc:
                    self._failed = True
                    log.warning("knowledge: unavailable (%s): answering without facts", exc)
        return self._kb

    async def retrieve(
        self, query: str, *, top_k: int | None = None, threshold: float | None = None
    ) -> list[ScoredFact]:
        kb = await self._get()
        return [] if kb is None else await kb.retrieve(query, top_k=top_k, threshold=threshold)

    async def similarity(self, query: str, candidates: Sequence[str]) -> list[float]:
        kb = await self._get()
        if kb is None:
            return [0.0 for _ in candidates]
        return list(await kb.similarity(query, candidates))

    async def aclose(self) -> None:
        if self._kb is not None:
            await self._kb.aclose()
            self._kb = None


def knowledge_for(settings: Settings, db: Database) -> LazyKnowledgeBase | None:
    """The bot's knowledge base, or None when replies use no facts at all (settings)."""
    if settings.knowledge.facts_top_k == 0 and not settings.knowledge.fact_fallback:
        return None
    return LazyKnowledgeBase(settings, db)

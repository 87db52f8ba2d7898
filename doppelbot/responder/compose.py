"""From a conversation to what the model is asked, and from its answer to the reply.

One path for every reply the owner sees — the running bot's and ``doppelbot chat``'s — so what
the terminal shows is what the bot would say: facts retrieved for the newest message, the
model input kept within ``max_input_tokens`` (the oldest turns go first, then the facts; the
newest turn must be the other person's), and the fact fallback applied to the answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from doppelbot.config import Settings
from doppelbot.core.domain import Role, Turn
from doppelbot.core.errors import PromptTooLongError, describe
from doppelbot.core.ports import FactRetriever, ScoredFact
from doppelbot.dataset.budget import CountTokens, fit_turns
from doppelbot.knowledge.policy import apply_fact_fallback

log = logging.getLogger("doppelbot.responder")


class ReplyComposer:
    def __init__(
        self,
        settings: Settings,
        *,
        facts: FactRetriever | None = None,
        count_tokens: CountTokens | None = None,
    ) -> None:
        self.settings = settings
        self.facts = facts
        #: None: no token budget check (tests, fakes without a tokenizer).
        self.count_tokens = count_tokens
        self.format = settings.prompt.format

    async def retrieve(self, query: str) -> list[ScoredFact]:
        """Facts for ``query``; none when retrieval fails (facts make replies better, their
        absence is not fatal)."""
        if self.facts is None or self.settings.knowledge.facts_top_k == 0 or not query:
            return []
        try:
            return await self.facts.retrieve(
                query,
                top_k=self.settings.knowledge.facts_top_k,
                threshold=self.settings.knowledge.facts_threshold,
            )
        except Exception as exc:
            log.warning("responder: fact retrieval failed: %s", describe(exc))
            return []

    async def prompt(self, turns: Sequence[Turn], facts: Sequence[ScoredFact]) -> str:
        """The model input within ``max_input_tokens``: the oldest turns go first, then the
        facts; ``PromptTooLongError`` when the newest message alone does not fit. Counting runs
        in a thread (the tokenizer would hold the event loop)."""
        texts = [f.text for f in facts]
        if self.count_tokens is None:
            return self.format.build_input(turns, texts)
        return await asyncio.to_thread(self._fit, turns, texts)

    def _fit(self, turns: Sequence[Turn], facts: Sequence[str]) -> str:
        assert self.count_tokens is not None
        for attempt in (facts, []) if facts else ([],):
            fit = fit_turns(
                turns, self.format, self.count_tokens, self.settings.model.max_input_tokens, attempt
            )
            if fit is not None:
                kept, prompt, _ = fit
                if kept and kept[-1].role is Role.OTHER:
                    return prompt
        raise PromptTooLongError("the newest message alone exceeds max_input_tokens")

    async def finish(self, query: str, text: str, facts: Sequence[ScoredFact]) -> str:
        """The reply to send: the model's ``text``, or the best fact when the fact fallback
        finds it answers ``query`` better."""
        if not self.settings.knowledge.fact_fallback or not facts or self.facts is None:
            return text
        try:
            decision = await apply_fact_fallback(
                self.facts,
                query,
                text,
                facts,
                enabled=True,
                margin=self.settings.knowledge.fact_fallback_margin,
            )
        except Exception as exc:
            log.warning("responder: fact fallback skipped: %s", describe(exc))
            return text
        if decision.use_fact:
            log.info("responder: answered with fact=%s instead of the reply", decision.fact_id)
        return decision.text

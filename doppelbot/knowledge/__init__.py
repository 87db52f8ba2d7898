"""The knowledge base: facts about the owner, retrieved by meaning with sentence-transformers.

The only package (besides ``model``/``training``) that touches sentence-transformers/torch, and it
imports them lazily, on ``Embedder.load``. Facts themselves live in SQLite
(``doppelbot.store.facts``: add/list/remove/import, embedding cache); the fact-fallback rule is
core (``doppelbot.knowledge.policy``).

API (what the responder uses)::

    from doppelbot.knowledge import KnowledgeBase

    kb = await KnowledgeBase.open(settings, db)   # loads the embedder (settings.knowledge) in
    try:                                          # the worker thread, encodes uncached facts,
                                                  # builds the index
        facts = await kb.retrieve(message_text)   # list[ScoredFact]; top_k / threshold default
                                                  # to settings.knowledge's facts_top_k and
                                                  # facts_threshold
        prompt = fmt.build_input(turns, facts=[f.text for f in facts])
        sims = await kb.similarity(message_text, [reply])   # for the fact-fallback rule
    finally:
        await kb.aclose()                         # stops the worker thread; db stays open

``KnowledgeBase`` implements ``doppelbot.core.ports.FactRetriever``. All encoding runs in one worker
thread owned by the object (torch threads there: ``settings.knowledge.embedder_threads``); the
index follows fact changes made by any process, checked cheaply before each query. Tests and scripts
may pass ``embedder=Embedder.load(path)`` to ``open`` to share one loaded model.
"""

from __future__ import annotations

from doppelbot.knowledge.embedder import Embedder
from doppelbot.knowledge.index import FactIndex
from doppelbot.knowledge.knowledge_base import KnowledgeBase, KnowledgeStats

__all__ = ["Embedder", "FactIndex", "KnowledgeBase", "KnowledgeStats"]

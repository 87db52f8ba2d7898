"""``KnowledgeBase``: the ``FactRetriever`` the bot and ``doppelbot facts search`` use.

Every call into the embedder runs in ONE worker thread owned by the knowledge base (a
single-thread executor): the event loop never blocks on torch, and the embedder, which is not
re-entrant, is never used by two threads at once. Fact embeddings are computed once per
``(model, text hash)`` and cached in SQLite; the in-memory index is a numpy matrix rebuilt (cheaply,
from the cache) whenever the fact set changes — checked before every query with a one-row query,
so a fact added by another process (``doppelbot facts add`` while the bot runs) is seen by the
next message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from doppelbot.core.errors import KnowledgeError, ModelMissingError
from doppelbot.core.ports import ScoredFact
from doppelbot.knowledge.embedder import Embedder, set_worker_threads
from doppelbot.knowledge.index import FactIndex, blob_to_vector, vector_to_blob
from doppelbot.model.local import model_source
from doppelbot.store import facts as fact_store

if TYPE_CHECKING:
    from doppelbot.config import KnowledgeSettings, Settings
    from doppelbot.store.database import Database

log = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[int, int], None]  # (facts encoded so far, facts to encode)

ENCODE_CHUNK = 256  # facts per encode call while filling the cache; each chunk is saved at once
QUERY_CACHE_SIZE = 256


@dataclass(slots=True)
class KnowledgeStats:
    facts: int = 0  # facts in the current index
    facts_encoded: int = 0  # fact embeddings computed (cache misses) by this object
    facts_from_cache: int = 0  # fact embeddings read from the SQLite cache at the last rebuild
    rebuilds: int = 0
    query_encodes: int = 0
    query_cache_hits: int = 0


def _device(setting: str) -> str | None:
    return None if setting == "auto" else setting


class KnowledgeBase:
    """Facts retrieval over one database. Build with ``await KnowledgeBase.open(settings, db)``.

    ``open`` loads the embedder in the worker thread (unless one is passed in), encodes facts not
    yet cached and builds the index. Close with ``await kb.aclose()`` (or ``async with``); the
    database stays open — it belongs to the caller.
    """

    def __init__(
        self,
        db: Database,
        embedder: Embedder,
        executor: ThreadPoolExecutor,
        settings: KnowledgeSettings,
    ) -> None:
        self._db = db
        self._embedder = embedder
        self._executor = executor
        self.settings = settings  # the default top_k and threshold of ``retrieve``
        self.stats = KnowledgeStats()
        self._index = FactIndex.empty(embedder.dim)
        self._signature: tuple[int, int] | None = None
        self._sync_lock = asyncio.Lock()
        self._queries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        settings: Settings,
        db: Database,
        *,
        embedder: Embedder | None = None,
        progress: Progress | None = None,
    ) -> KnowledgeBase:
        """Load (or reuse) the embedder, fill the embedding cache, build the index."""
        executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="doppelbot-embedder",
            initializer=set_worker_threads,
            initargs=(settings.knowledge.embedder_threads,),
        )
        try:
            if embedder is None:
                loop = asyncio.get_running_loop()
                name, device = settings.knowledge.embedder_model, _device(settings.model.device)
                try:  # a hub id must have been downloaded: no fetching (and waiting) here
                    folder = model_source(name, settings.store.data_dir, "embedder")
                except ModelMissingError as exc:
                    raise KnowledgeError(str(exc)) from None
                embedder = await loop.run_in_executor(
                    executor, lambda: Embedder.load(folder, device=device, model_id=name)
                )
            kb = cls(db, embedder, executor, settings.knowledge)
            await kb.refresh(progress=progress)
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        return kb

    async def aclose(self) -> None:
        """Stop the worker thread (after the encode in progress, if any). Idempotent."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    async def __aenter__(self) -> KnowledgeBase:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    @property
    def model_id(self) -> str:
        return self._embedder.model_id

    @property
    def index(self) -> FactIndex:
        """The current in-memory index (replaced, never mutated, on each rebuild)."""
        return self._index

    def __len__(self) -> int:
        return len(self._index)

    # --- the worker thread ----------------------------------------------------------------------
    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise KnowledgeError("the knowledge base is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except RuntimeError as exc:  # submitted while shutting down
            if self._closed:
                raise KnowledgeError("the knowledge base is closed") from exc
            raise

    async def _encode(self, texts: Sequence[str]) -> np.ndarray:
        items = list(texts)
        return await self._run(lambda: self._embedder.encode(items))

    async def _encode_query(self, text: str) -> np.ndarray:
        # The responder asks about the same incoming message twice (retrieve, then the
        # fallback's similarity): keep recent query vectors instead of encoding again.
        cached = self._queries.get(text)
        if cached is not None:
            self._queries.move_to_end(text)
            self.stats.query_cache_hits += 1
            return cached
        vector = await self._run(lambda: self._embedder.encode_query(text))
        self.stats.query_encodes += 1
        self._queries[text] = vector
        if len(self._queries) > QUERY_CACHE_SIZE:
            self._queries.popitem(last=False)
        return vector

    # --- index ----------------------------------------------------------------------------------
    async def refresh(self, *, progress: Progress | None = None, force: bool = False) -> bool:
        """Rebuild the index if the fact set changed (or ``force``); True when rebuilt.

        Facts without a cached embedding for this model are encoded in chunks, each chunk saved
        to the cache at once, so an interrupted first run keeps what it did.
        """
        async with self._sync_lock:
            signature = await fact_store.facts_signature(self._db)
            if not force and signature == self._signature:
                return False
            model, dim = self._embedder.model_id, self._embedder.dim
            stored = await fact_store.facts_with_embeddings(self._db, model)
            vectors: dict[int, np.ndarray] = {}
            missing: list[fact_store.StoredFact] = []
            for f in stored:
                if f.vector is not None and f.dim == dim:
                    vectors[f.fact_id] = blob_to_vector(f.vector, dim)
                else:  # not cached, or cached by a different model under the same name
                    missing.append(f)
            if missing:
                log.info("encoding %d fact(s) with %s", len(missing), model)
            total = len(missing)
            if progress and total:
                progress(0, total)
            for start in range(0, total, ENCODE_CHUNK):
                chunk = missing[start : start + ENCODE_CHUNK]
                encoded = await self._encode([f.text for f in chunk])
                await fact_store.put_embeddings(
                    self._db,
                    model,
                    [
                        (f.text_hash, dim, vector_to_blob(v))
                        for f, v in zip(chunk, encoded, strict=True)
                    ],
                )
                for f, v in zip(chunk, encoded, strict=True):
                    vectors[f.fact_id] = v
                self.stats.facts_encoded += len(chunk)
                if progress:
                    progress(min(start + len(chunk), total), total)
            if stored:
                index = FactIndex.build(
                    [f.fact_id for f in stored],
                    [f.text for f in stored],
                    [vectors[f.fact_id] for f in stored],
                )
            else:
                index = FactIndex.empty(dim)
            self._index = index
            # The signature read *before* loading: a change racing with this rebuild makes the
            # next check rebuild again rather than being missed.
            self._signature = signature
            self.stats.facts = len(index)
            self.stats.facts_from_cache = len(stored) - total
            self.stats.rebuilds += 1
            return True

    # --- FactRetriever --------------------------------------------------------------------------
    async def retrieve(
        self, query: str, *, top_k: int | None = None, threshold: float | None = None
    ) -> list[ScoredFact]:
        """The facts most similar to ``query``: at most ``top_k``, each with cosine >=
        ``threshold`` (defaults: ``facts_top_k`` / ``facts_threshold``), best first."""
        k = self.settings.facts_top_k if top_k is None else top_k
        limit = self.settings.facts_threshold if threshold is None else threshold
        text = query.strip()
        if self._closed:
            raise KnowledgeError("the knowledge base is closed")
        if not text or k <= 0:
            return []
        # Encode while the fact set is checked in SQLite: the check's thread hop then costs
        # nothing. (With no facts indexed yet, check first: maybe nothing needs encoding.)
        pending = asyncio.ensure_future(self._encode_query(text)) if len(self._index) else None
        try:
            await self.refresh()
        except BaseException:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            raise
        index = self._index
        if len(index) == 0:
            if pending is not None:
                await pending
            return []
        vector = await pending if pending is not None else await self._encode_query(text)
        return index.search(vector, k, limit)

    async def similarity(self, query: str, candidates: Sequence[str]) -> list[float]:
        """Cosine similarity of ``query`` to each candidate text (-1…1)."""
        if not candidates:
            return []
        q = await self._encode_query(query.strip())
        vectors = await self._encode(list(candidates))
        return [float(min(s, 1.0)) for s in vectors @ q]

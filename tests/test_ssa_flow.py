from __future__ import annotations

import pytest

from doppelbot.config import GenerationOptions
from doppelbot.core.domain import Role, Sample, Turn
from doppelbot.core.errors import GenerationError
from doppelbot.core.ports import ModelIdentity
from doppelbot.ssa.flow import (
    OWNER_SOURCE,
    compare,
    context_key,
    format_ssa_card,
    post_batch,
    prepare_batch,
    record_label,
)
from doppelbot.ssa.labels import LabelSyntaxError, SsaLabel
from doppelbot.store import ssa as store
from doppelbot.store.database import Database


def _samples(n: int) -> list[Sample]:
    return [
        Sample(
            chat_id=10 + i % 3,
            context=(Turn(Role.OTHER, f"вопрос {i}"),),
            reply=f"ответ {i}",
            reply_date=1000 + i,
            context_start_date=900 + i,
            source_message_ids=(i * 2,),
            reply_message_ids=(i * 2 + 1,),
            model_input=f"<SC1>prompt {i}",
            model_target=f"<extra_id_0>ответ {i}</s>",
        )
        for i in range(n)
    ]


class Gen:
    def __init__(self, name: str, fail_on: str | None = None) -> None:
        self.name, self.fail_on, self.calls = name, fail_on, 0

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity("tiny", self.name)

    async def generate(self, prompt: str, options: GenerationOptions) -> str:
        self.calls += 1
        if self.fail_on and self.fail_on in prompt:
            raise GenerationError("boom")
        return f"reply to {prompt[-2:]}"


class Poster:
    def __init__(self, fail_after: int | None = None) -> None:
        self.posted: list[str] = []
        self.fail_after = fail_after

    async def post(self, text: str) -> int:
        if self.fail_after is not None and len(self.posted) >= self.fail_after:
            raise ConnectionError("network down")
        self.posted.append(text)
        return 5000 + len(self.posted)


async def test_batch_is_blind_and_complete(db: Database) -> None:
    gens = {"alpha-v1": Gen("alpha-v1"), "beta-v2": Gen("beta-v2", fail_on="prompt 3")}
    batch = await prepare_batch(
        db, _samples(5), gens, GenerationOptions(), dataset="d", n=5, seed=1
    )
    items = await store.items(db, batch)
    keys = {i.context_key for i in items}
    assert len(keys) == 5
    by_source = {s: [i for i in items if i.source == s] for s in (*gens, OWNER_SOURCE)}
    assert len(by_source["alpha-v1"]) == 5 and len(by_source[OWNER_SOURCE]) == 5
    # the failed generation is left out, never stored as junk
    assert len(by_source["beta-v2"]) == 4
    assert not any(i.model_input.endswith("prompt 3") for i in by_source["beta-v2"])
    assert [i.position for i in items] == list(range(len(items)))
    # mixed: the sources are not grouped in posting order
    first_half = {i.source for i in items[: len(items) // 2]}
    assert len(first_half) >= 2
    # the card never names its source
    for item in items:
        card = format_ssa_card(item, len(items))
        assert item.source not in card and OWNER_SOURCE not in card
        assert "`11`" in card and item.reply in card


async def test_posting_resumes_without_duplicates(db: Database) -> None:
    batch = await prepare_batch(
        db, _samples(4), {"A": Gen("A")}, GenerationOptions(), dataset="d", n=4, seed=2
    )
    poster = Poster(fail_after=3)
    with pytest.raises(ConnectionError):
        await post_batch(db, batch, poster)
    assert await store.batch_progress(db, batch) == (8, 3, 0)
    poster.fail_after = None
    assert await post_batch(db, batch, poster) == 5
    assert len(poster.posted) == 8 and len(set(poster.posted)) == 8
    assert await post_batch(db, batch, poster) == 0


async def test_label_round_trip(db: Database) -> None:
    batch = await prepare_batch(
        db, _samples(3), {"A": Gen("A")}, GenerationOptions(), dataset="d", n=3, seed=3
    )
    await post_batch(db, batch, Poster())
    cards = await store.card_ids(db, batch)
    assert await record_label(db, 999_999, "11") is None  # not a card: ignored
    out = await record_label(db, cards[0], "10")
    assert out is not None and out.label == SsaLabel(True, False)
    with pytest.raises(LabelSyntaxError, match="`11`"):
        await record_label(db, cards[1], "maybe")
    await record_label(db, cards[0], "11")  # the owner changed their mind: latest wins
    labels = await store.labels_by_source(db, batch)
    assert [lab for rows in labels.values() for _, lab in rows] == [SsaLabel(True, True)]
    assert await store.batch_progress(db, batch) == (6, 6, 1)


def test_compare_on_common_contexts() -> None:
    y, n = SsaLabel(True, True), SsaLabel(False, False)
    labels = {
        "A": [("c1", y), ("c2", y), ("c3", n)],
        "B": [("c1", n), ("c2", y)],
        OWNER_SOURCE: [("c1", y), ("c2", y), ("c3", y)],
    }
    rows = compare(labels)
    assert [r.source for r in rows] == ["A", "B", OWNER_SOURCE]
    a = rows[0]
    assert a.report.n == 3 and a.report.ssa == pytest.approx(2 / 3)
    assert a.common is not None and a.common.n == 2 and a.common.ssa == 1.0
    assert rows[1].common.ssa == 0.5 and rows[2].common.ssa == 1.0


def test_context_key_is_stable() -> None:
    s = _samples(1)[0]
    assert context_key(s) == "10:1"

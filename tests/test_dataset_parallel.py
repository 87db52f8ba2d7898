"""The multi-process build (``build_from_db(workers=2)``) equals the single-process build."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from doppelbot.core.domain import MediaKind, Message, Peer, PeerKind, Role, Turn
from doppelbot.core.prompt import PromptFormat
from doppelbot.dataset import from_store
from doppelbot.dataset.builder import DatasetResult
from doppelbot.dataset.from_store import build_from_db
from doppelbot.dataset.options import DatasetOptions
from doppelbot.dataset.render import prompt_frame
from doppelbot.store.database import Database
from doppelbot.store.history import upsert_messages, upsert_peers
from tests.dataset_helpers import assert_stats_describe_the_samples

WORDS = [
    "привет",
    "как",
    "дела",
    "норм",
    "Маша",
    "давай",
    "завтра",
    "кино",
    "ладно",
    "спасибо",
    "смотри",
    "дома",
    "работа",
]
EXTRAS = (
    "",
    "",
    " +7 916 123-45-67",
    " ivan@mail.ru",
    " vk.com/id1",
    " т.е. да",
    "  <s>  ок",
    "...",
)
# the same little dialogue in several chats: duplicates across chats (and worker chunks)
SCRIPT = [("you", "привет"), ("me", "привет!"), ("you", "как дела?"), ("me", "норм")]


def _history(chats: int, per_chat: int, seed: int = 3) -> tuple[list[Peer], list[Message]]:
    rng = random.Random(seed)
    peers, messages = [], []
    for c in range(chats):
        chat = 100 + c
        peers.append(Peer(chat, PeerKind.USER, first_name="Маша", username=f"masha{c}"))
        date = 1_700_000_000 + c * 97
        mid = 0
        if c % 3 == 0:
            for who, text in SCRIPT:
                mid += 1
                date += 60
                messages.append(Message(chat, mid, None, who == "me", date, text))
        for _ in range(per_chat):
            mid += 1
            date += rng.choice((30, 90, 600, 4 * 3600))
            text = " ".join(rng.choices(WORDS, k=rng.randint(1, 9))) + rng.choice(EXTRAS)
            if rng.random() < 0.05:
                text = " ".join([text] * 30)  # too long
            extra: dict[str, Any] = {}
            r = rng.random()
            if r < 0.03:
                extra = {"is_forwarded": True}
            elif r < 0.06:
                text, extra = "", {"media_kind": MediaKind.STICKER, "sticker_emoji": "👍"}
            if mid > 3 and rng.random() < 0.1:
                extra["reply_to_message_id"] = mid - rng.randint(1, 3)
            out = rng.random() < 0.5
            messages.append(Message(chat, mid, None if out else chat, out, date, text, **extra))
    return peers, messages


def _stats_describe_the_samples(result: DatasetResult) -> None:
    assert result.stats.samples == len(result.train) + len(result.validation)
    assert_stats_describe_the_samples(result)


def _same(a: DatasetResult, b: DatasetResult) -> None:
    assert a.train == b.train
    assert a.validation == b.validation
    da, db_ = a.stats.to_dict(), b.stats.to_dict()
    da.pop("seconds"), db_.pop("seconds")
    assert da == db_


@pytest.mark.parametrize(
    "options",
    [
        DatasetOptions(),
        DatasetOptions(
            keep_names=False,
            long_message_policy="truncate",
            context_max_chars=120,
            max_contact_share=0.05,
        ),
    ],
    ids=["defaults", "names-truncate-cap"],
)
async def test_workers_build_the_same_dataset(
    db: Database, monkeypatch: pytest.MonkeyPatch, options: DatasetOptions
) -> None:
    peers, messages = _history(chats=24, per_chat=60)
    await upsert_peers(db, peers)
    await upsert_messages(db, messages)
    monkeypatch.setattr(from_store, "MIN_MESSAGES_PER_WORKER", 1)  # a tiny DB still forks

    def counter(text: str) -> int:  # a deterministic stand-in: trims and drops some inputs
        return len(text) // 3

    tight = replace(options, max_input_tokens=60)
    for opts, count in ((options, None), (tight, counter)):
        single = build_from_db(db.path, opts, count_tokens=count, workers=1)
        assert "chats_wall" not in single.stats.seconds
        assert single.train and single.validation
        assert single.stats.samples_dropped["duplicate_exact"] > 0
        _stats_describe_the_samples(single)
        for workers in (2, 3):
            multi = build_from_db(db.path, opts, count_tokens=count, workers=workers)
            if from_store._can_fork():
                assert "chats_wall" in multi.stats.seconds  # the worker path really ran
            _same(single, multi)
    assert single.stats.token_trimmed > 0 and single.stats.samples_dropped["input_too_long"] > 0


def test_prompt_frame_matches_build_input() -> None:
    fmt = PromptFormat("персона  <SC1> тест", "Он", "Я")
    prefix, suffix = prompt_frame(fmt)
    turns = (Turn(Role.OTHER, "а  <s>б"), Turn(Role.OWNER, " в\tг "), Turn(Role.OTHER, "д"))
    for n in (1, 2, 3):
        assert prefix + "\n".join(fmt.dialog_lines(turns[:n])) + suffix == fmt.build_input(
            turns[:n]
        )

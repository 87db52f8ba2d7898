"""The token budget counted line by line: it must give exactly what counting whole inputs gives."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from doppelbot.config import PromptSettings
from doppelbot.dataset.budget import calibrate
from doppelbot.dataset.builder import build_dataset
from doppelbot.dataset.options import DatasetOptions
from tests.dataset_helpers import conv, source

WORDS = [
    "привет",
    "как",
    "дела",
    "норм",
    "давай",
    "завтра",
    "кино",
    "ладно",
    "спасибо",
    "смотри",
    "дома",
    "работа",
    "Маша",
    "ок",
    "да",
    "нет",
    "hello",
    "12",
    "3,5",
    "👍",
    "😂",
    "<PHONE>",
    "<URL>",
    "т.е.",
    "ну...",
    "?!",
    "))",
    "—",
    "«так»",
    "ёлка",
    "Ёж",
]


def _chats(n_chats: int, per_chat: int, seed: int = 11) -> list[list]:
    rng = random.Random(seed)
    chats = []
    for c in range(n_chats):
        specs = []
        for _ in range(per_chat):
            words = rng.choices(WORDS, k=rng.randint(1, 14))
            text = " ".join(words) + rng.choice(["", "", "?", "!", "...", ")"])
            if rng.random() < 0.1:
                text += "\n" + " ".join(rng.choices(WORDS, k=3))
            specs.append((rng.choice(["me", "you"]), text, rng.choice([20, 60, 600])))
        chats.append(conv(100 + c, *specs))
    return chats


class _WholeOnly:
    """The same counter without ``count_many``: the builder then counts every input whole."""

    def __init__(self, counter) -> None:  # type: ignore[no-untyped-def]
        self.counter = counter

    def __call__(self, text: str) -> int:
        return self.counter(text)


@pytest.fixture(scope="module")
def counter(tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    from doppelbot.model.tokenizer import TokenCounter, load_tokenizer

    return TokenCounter(load_tokenizer(tokenizer_dir))


@pytest.mark.parametrize("persona", ["Ты — это я.", "", "  <SC1> персона с числом 5  "])
def test_inputs_add_up_line_by_line(counter, persona: str) -> None:  # type: ignore[no-untyped-def]
    options = DatasetOptions(
        prompt=PromptSettings(persona=persona), validation_share=0.0, max_contact_share=1.0
    )
    fmt = options.prompt_format
    shape = calibrate(fmt, counter.count_many)
    assert shape is not None
    first, step = shape
    samples = build_dataset([source(c) for c in _chats(6, 80)], options).train
    assert len(samples) > 100
    whole = counter.count_many([s.model_input for s in samples])
    for sample, n in zip(samples, whole, strict=True):
        lines = fmt.dialog_lines(sample.context)
        assert n == first + sum(counter.count_many(lines)) + step * (len(lines) - 1)


def test_calibrate_refuses_a_counter_that_does_not_add_up() -> None:
    fmt = DatasetOptions().prompt_format

    def by_words(texts):  # type: ignore[no-untyped-def]  # ceil(words / 3): not additive
        return [math.ceil(len(t.split()) / 3) for t in texts]

    assert calibrate(fmt, by_words) is None


@pytest.mark.parametrize("max_tokens", [40, 90, 160])
def test_line_budget_builds_what_whole_counting_builds(counter, max_tokens: int) -> None:  # type: ignore[no-untyped-def]
    options = DatasetOptions(
        prompt=PromptSettings(persona="Ты — это я."),
        max_input_tokens=max_tokens,
        validation_share=0.1,
        max_contact_share=1.0,
        context_max_chars=500,
    )
    sources = [source(c) for c in _chats(5, 70, seed=max_tokens)]
    by_lines = build_dataset(sources, options, count_tokens=counter)
    whole = build_dataset(sources, options, count_tokens=_WholeOnly(counter))
    assert by_lines.train == whole.train and by_lines.validation == whole.validation
    a, b = by_lines.stats.to_dict(), whole.stats.to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert by_lines.stats.token_checked > 0
    if max_tokens < 100:
        assert by_lines.stats.token_trimmed > 0
    for s in by_lines.train + by_lines.validation:
        assert counter(s.model_input) <= max_tokens
    tighter = build_dataset(sources, replace(options, max_input_tokens=25), count_tokens=counter)
    assert tighter.stats.samples_dropped["input_too_long"] > 0

"""``doppelbot chat``'s conversation: answered through the bot's own reply path.

The composer is the one the responder uses; these tests check what the terminal relies on:
turns merged as in the dataset, facts in the prompt, the retry without facts and the fact
fallback, and a message too long for the input budget leaving the conversation unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from doppelbot.core.domain import Role, Turn
from doppelbot.core.errors import GenerationError, PromptTooLongError
from doppelbot.core.ports import ScoredFact
from doppelbot.responder.compose import ReplyComposer
from doppelbot.responder.conversation import Conversation
from tests.responder_fakes import FakeFacts, FakeGenerator, fast_settings


def chars(text: str) -> int:
    """A stand-in tokenizer: one token per character."""
    return len(text)


def _conversation(
    tmp_path: Path, *, facts: FakeFacts | None = None, budget: int | None = None, **settings: object
) -> tuple[Conversation, FakeGenerator]:
    if budget is not None:
        settings["max_input_tokens"] = budget
    s = fast_settings(tmp_path, **settings)
    gen = FakeGenerator("ну привет")
    composer = ReplyComposer(s, facts=facts, count_tokens=chars)
    return Conversation(gen, composer, s.generation, max_turns=8), gen


async def test_turns_alternate_and_the_prompt_is_the_bots(tmp_path: Path) -> None:
    conv, gen = _conversation(tmp_path)
    first = await conv.answer("привет")
    assert first.reply == "ну привет" and first.prompt == gen.prompts[0]
    await conv.answer("как дела?")
    assert conv.turns == [
        Turn(Role.OTHER, "привет"),
        Turn(Role.OWNER, "ну привет"),
        Turn(Role.OTHER, "как дела?"),
        Turn(Role.OWNER, "ну привет"),
    ]
    assert conv.composer.format.build_input(conv.turns[:3]) == gen.prompts[1]
    conv.reset()
    assert conv.turns == []


async def test_facts_are_used_and_dropped_first_when_the_budget_is_tight(
    tmp_path: Path,
) -> None:
    fact = ScoredFact(1, "Я живу в Казани, " * 5, 0.9)
    conv, gen = _conversation(tmp_path, facts=FakeFacts([fact], reply_score=0.9))
    await conv.answer("где ты живёшь?")
    assert "Я живу в Казани" in gen.prompts[0]
    plain = conv.composer.format.build_input([Turn(Role.OTHER, "где ты живёшь?")])
    # A budget that holds the message but not the message and the fact: the fact goes.
    tight, gen2 = _conversation(
        tmp_path, facts=FakeFacts([fact], reply_score=0.9), budget=len(plain) + 5
    )
    await tight.answer("где ты живёшь?")
    assert gen2.prompts == [plain]


async def test_the_fact_fallback_answers_like_the_bot(tmp_path: Path) -> None:
    facts = FakeFacts([ScoredFact(1, "Я живу в Казани", 0.8)], reply_score=0.2)
    conv, _ = _conversation(tmp_path, facts=facts, fact_fallback=True)
    answer = await conv.answer("где ты живёшь?")
    assert answer.reply == "Я живу в Казани"
    assert conv.turns[-1] == Turn(Role.OWNER, "Я живу в Казани")


async def test_a_message_too_long_is_not_taken(tmp_path: Path) -> None:
    probe, _ = _conversation(tmp_path)
    fits = len(probe.composer.format.build_input([Turn(Role.OTHER, "привет")]))
    conv, gen = _conversation(tmp_path, budget=fits + 40)
    await conv.answer("привет")
    before = list(conv.turns)
    with pytest.raises(PromptTooLongError):
        await conv.answer("очень " * 100)
    assert conv.turns == before and len(gen.prompts) == 1


async def test_a_failed_generation_keeps_the_message_unanswered(tmp_path: Path) -> None:
    conv, gen = _conversation(tmp_path)
    gen.fail = GenerationError("boom")
    with pytest.raises(GenerationError):
        await conv.answer("привет")
    assert conv.turns == [Turn(Role.OTHER, "привет")]
    gen.fail = None
    await conv.answer("ты тут?")
    assert conv.turns[0] == Turn(Role.OTHER, "привет\nты тут?")

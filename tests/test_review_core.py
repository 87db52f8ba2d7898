from __future__ import annotations

import pytest

from doppelbot.core.domain import ReplyMode
from doppelbot.review.cards import (
    CardAction,
    CardActionKind,
    card_reply_id,
    format_card,
    parse_card_answer,
    reaction_action,
)
from doppelbot.review.commands import Command, CommandError, CommandName, parse_command


@pytest.mark.parametrize("text", ["ok", "OK", "+", " ok. ", "ок", "👍"])
def test_approve_words(text: str) -> None:
    assert parse_card_answer(text) == CardAction(CardActionKind.APPROVE)


@pytest.mark.parametrize("text", ["no", "-", "нет", "No!"])
def test_reject_words(text: str) -> None:
    assert parse_card_answer(text) == CardAction(CardActionKind.REJECT)


@pytest.mark.parametrize("text", ["again", "ещё", "Again"])
def test_again_words(text: str) -> None:
    assert parse_card_answer(text) == CardAction(CardActionKind.REGENERATE)


def test_anything_else_is_a_correction() -> None:
    assert parse_card_answer("  ok, буду в 8  ") == CardAction(
        CardActionKind.CORRECT, "ok, буду в 8"
    )
    assert parse_card_answer("   ") is None


def test_reactions_on_cards() -> None:
    assert reaction_action("👍", ["👍"], ["👎"]) == CardAction(CardActionKind.APPROVE)
    assert reaction_action("👎", ["👍"], ["👎"]) == CardAction(CardActionKind.REJECT)
    assert reaction_action("🎉", ["👍"], ["👎"]) is None


def test_card_text() -> None:
    text = format_card(
        reply_id=42,
        chat_name="Аня",
        incoming=["привет", "ты где?"],
        draft="дома",
        expires_in_min=60,
    )
    assert text.splitlines()[0] == "🤖 Draft #42 — Аня"
    assert "› привет" in text and "› ты где?" in text and "✍️ Draft: дома" in text
    assert "Expires in 60 min" in text
    assert card_reply_id(text) == 42
    sent = format_card(
        reply_id=7, chat_name="Б", incoming=["x"], draft="y", expires_in_min=1, auto_sent=True
    )
    assert "✅ Sent: y" in sent and "Expires" not in sent


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("/pause", Command(CommandName.PAUSE)),
        ("/resume", Command(CommandName.RESUME)),
        ("/status", Command(CommandName.STATUS)),
        ("/help", Command(CommandName.HELP)),
        ("/mode @anna review", Command(CommandName.MODE, chat="@anna", mode=ReplyMode.REVIEW)),
        ("/mode 12345 OFF", Command(CommandName.MODE, chat="12345", mode=ReplyMode.OFF)),
        ("/mode auto", Command(CommandName.MODE, mode=ReplyMode.AUTO)),
        ("/fact Я живу в Казани", Command(CommandName.FACT, text="Я живу в Казани")),
    ],
)
def test_commands(text: str, want: Command) -> None:
    assert parse_command(text) == want


@pytest.mark.parametrize("text", ["pause", "hello /pause", "", "ok"])
def test_not_commands(text: str) -> None:
    assert parse_command(text) is None


@pytest.mark.parametrize("text", ["/pasue", "/unknown arg", "/", " /Stop"])
def test_any_slash_text_is_a_command_and_unknown_ones_say_so(text: str) -> None:
    with pytest.raises(CommandError, match=r"unknown command .* \(see /help\)"):
        parse_command(text)


@pytest.mark.parametrize("text", ["/mode", "/mode @a loud", "/fact", "/mode a b c"])
def test_malformed_commands_hint(text: str) -> None:
    with pytest.raises(CommandError, match="usage"):
        parse_command(text)

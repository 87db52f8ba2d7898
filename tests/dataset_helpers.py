"""Hand-made conversations for the dataset tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from doppelbot.core.domain import MediaKind, Message
from doppelbot.dataset.builder import ChatSource, DatasetResult
from doppelbot.dataset.rules import rule_row
from doppelbot.dataset.stats import summarize

T0 = 1_700_000_000


def conv(chat_id: int, *specs: Sequence[Any], start: int = T0) -> list[Message]:
    """``("me"|"you", text, seconds after the previous message, {extra Message fields})``.

    Message ids count from 1; ``seconds`` defaults to 60.
    """
    out = []
    date = start
    for i, spec in enumerate(specs, 1):
        who, text = spec[0], spec[1]
        gap = spec[2] if len(spec) > 2 else 60
        extra = dict(spec[3]) if len(spec) > 3 else {}
        date += gap
        if "media_kind" in extra and isinstance(extra["media_kind"], str):
            extra["media_kind"] = MediaKind(extra["media_kind"])
        out.append(
            Message(
                chat_id=chat_id,
                message_id=extra.pop("message_id", i),
                sender_id=None if who == "me" else chat_id,
                is_outgoing=who == "me",
                date=extra.pop("date", date),
                text=text,
                **extra,
            )
        )
    return out


def source(messages: Sequence[Message], name: str = "", names: tuple[str, ...] = ()) -> ChatSource:
    rows = [rule_row(m) for m in sorted(messages, key=lambda m: (m.date, m.message_id))]
    return ChatSource(messages[0].chat_id, rows, name, names)


def assert_stats_describe_the_samples(result: DatasetResult) -> None:
    """The stats' length distributions and per-chat counts are those of the samples that came
    out (the builder measures them as it makes the samples, not from the result)."""
    samples = [*result.train, *result.validation]
    stats = result.stats
    assert stats.context_chars == summarize(
        [len("\n".join(t.text for t in s.context)) for s in samples]
    )
    assert stats.context_turns == summarize([len(s.context) for s in samples])
    assert stats.reply_chars == summarize([len(s.reply) for s in samples])
    for chat_id, chat in stats.per_chat.items():
        assert chat.train == sum(1 for s in result.train if s.chat_id == chat_id)
        assert chat.validation == sum(1 for s in result.validation if s.chat_id == chat_id)
        assert chat.samples == chat.train + chat.validation

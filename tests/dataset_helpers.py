"""Hand-made conversations for the dataset tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from doppelbot.dataset.builder import ChatSource
from doppelbot.dataset.rules import rule_row
from doppelbot.domain import MediaKind, Message

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

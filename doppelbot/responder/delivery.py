"""Turning a generated text into what is actually sent, and how human it looks.

Pure helpers: cleaning the model's text, splitting a multi-line reply into separate messages
(people send several short messages rather than one with line breaks, and the model learnt
their replies that way), and
how long "typing…" and the pause before answering last.
"""

from __future__ import annotations

import random

from doppelbot.core.errors import EmptyReplyError
from doppelbot.core.prompt import sanitize

#: More parts than this reads like spam; the rest is joined into the last message.
MAX_PARTS = 5
#: Telegram's limit for one text message.
MAX_MESSAGE_CHARS = 4096
#: Telegram shows "typing…" for about 5 s per action; it is re-sent before that runs out.
TYPING_REFRESH_S = 4.5


def split_reply(text: str, *, split_lines: bool = True) -> list[str]:
    """The messages to send for one reply; raises ``EmptyReplyError`` when nothing is left."""
    lines = [sanitize(line) for line in text.splitlines()] if split_lines else [sanitize(text)]
    parts = [p for p in lines if p]
    if not parts:
        raise EmptyReplyError("the reply is empty after clean-up")
    if len(parts) > MAX_PARTS:
        parts = [*parts[: MAX_PARTS - 1], " ".join(parts[MAX_PARTS - 1 :])]
    return [p[:MAX_MESSAGE_CHARS] for p in parts]


def typing_seconds(text: str, chars_per_s: float, max_s: float) -> float:
    return min(len(text) / chars_per_s, max_s)


def human_delay(rng: random.Random, min_s: float, max_s: float) -> float:
    return rng.uniform(min_s, max_s) if max_s > min_s else min_s

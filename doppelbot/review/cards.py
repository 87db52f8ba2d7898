"""Draft cards in Saved Messages and how the owner answers them.

A card shows the chat, the last incoming messages and the draft. The owner replies to the card:
``ok``/``+`` approves, ``no``/``-`` rejects, ``again`` asks for another draft, and any other text
is a correction that is sent instead. Pure text in, pure decisions out: the Telegram side only
posts the text and routes replies here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

APPROVE_WORDS = frozenset({"ok", "+", "ок", "да", "yes", "y", "👍", "send", "ok!"})
REJECT_WORDS = frozenset({"no", "-", "нет", "n", "👎", "drop"})
AGAIN_WORDS = frozenset({"again", "ещё", "еще", "заново", "regen", "🔄"})

CARD_MARK = "🤖 Draft #"
_CARD_ID_RE = re.compile(r"🤖 Draft #(\d+)")
_MAX_QUOTE = 300


class CardActionKind(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    REGENERATE = "regenerate"
    CORRECT = "correct"


@dataclass(frozen=True, slots=True)
class CardAction:
    kind: CardActionKind
    text: str | None = None  # the corrected text, for CORRECT


def parse_card_answer(text: str) -> CardAction | None:
    """The owner's reply to a card → what to do. ``None`` for an empty reply."""
    stripped = text.strip()
    if not stripped:
        return None
    word = stripped.lower().rstrip(".!")
    if word in APPROVE_WORDS:
        return CardAction(CardActionKind.APPROVE)
    if word in REJECT_WORDS:
        return CardAction(CardActionKind.REJECT)
    if word in AGAIN_WORDS:
        return CardAction(CardActionKind.REGENERATE)
    return CardAction(CardActionKind.CORRECT, stripped)


def reaction_action(
    emoji: str, positive: Sequence[str], negative: Sequence[str]
) -> CardAction | None:
    """A reaction on a card (where Telegram allows them): 👍-like approves, 👎-like rejects."""
    if emoji in positive:
        return CardAction(CardActionKind.APPROVE)
    if emoji in negative:
        return CardAction(CardActionKind.REJECT)
    return None


def _quote(text: str) -> str:
    one = " ".join(text.split())
    return one if len(one) <= _MAX_QUOTE else one[: _MAX_QUOTE - 1] + "…"


def format_card(
    *,
    reply_id: int,
    chat_name: str,
    incoming: Sequence[str],
    draft: str,
    expires_in_min: float,
    auto_sent: bool = False,
    outcome: str | None = None,
) -> str:
    """The card's text. ``auto_sent`` cards are copies of replies already sent (auto mode).
    ``outcome`` (e.g. "✅ Sent.") replaces the instructions once the card is answered, so the
    card itself shows what happened instead of a new message."""
    lines = [f"{CARD_MARK}{reply_id} — {chat_name}"]
    for text in incoming[-5:]:
        lines.append(f"› {_quote(text)}")
    lines.append("")
    lines.append(("✅ Sent: " if auto_sent else "✍️ Draft: ") + draft)
    lines.append("")
    if outcome is not None:
        lines.append(outcome)
    elif auto_sent:
        lines.append("Reply to this card with a better text to record a correction.")
    else:
        lines.append(
            f"Reply: ok / + send · no / - drop · again = new draft · any other text = send that "
            f"instead. Expires in {expires_in_min:g} min."
        )
    return "\n".join(lines)


def card_reply_id(card_text: str) -> int | None:
    """The reply id a card's text names (a fallback when the card id is not in the store)."""
    match = _CARD_ID_RE.search(card_text)
    return int(match.group(1)) if match else None

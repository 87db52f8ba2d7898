"""Saved Messages as a place for cards: posting them and reading the owner's answers.

Used by ``doppelbot ssa`` (labelling cards) outside the running bot; the live bot reads answers
from its update handlers instead. Only the owner's own messages in their own Saved Messages are
read — nobody else can write there.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from telethon import TelegramClient

from doppelbot.telegram.errors import telegram_errors


@dataclass(frozen=True, slots=True)
class CardAnswer:
    card_message_id: int
    message_id: int
    text: str
    date: int


class SavedMessagesPoster:
    """``CardPoster`` over Telethon: posts to the owner's Saved Messages ("me")."""

    def __init__(self, client: TelegramClient, *, flood_bound: int | None = None) -> None:
        self._client = client
        self._flood_bound = flood_bound

    async def post(self, text: str) -> int:
        with telegram_errors(flood_bound=self._flood_bound):
            message = await self._client.send_message("me", text, link_preview=False)
        return int(message.id)


async def answers_to_cards(
    client: TelegramClient, card_ids: Collection[int], *, flood_bound: int | None = None
) -> list[CardAnswer]:
    """The owner's replies to any of ``card_ids`` in Saved Messages, oldest first."""
    if not card_ids:
        return []
    wanted = set(card_ids)
    found: list[CardAnswer] = []
    with telegram_errors(flood_bound=flood_bound):
        async for m in client.iter_messages("me", min_id=min(wanted), reverse=True):
            reply_to = m.reply_to_msg_id
            if reply_to in wanted and m.out and (m.message or "").strip():
                date = int(m.date.timestamp()) if m.date else 0
                found.append(CardAnswer(int(reply_to), int(m.id), m.message, date))
    return found

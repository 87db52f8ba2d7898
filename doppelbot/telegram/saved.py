"""Saved Messages as a place for cards: posting and editing them, reading the owner's answers.

The running bot's draft cards and ``doppelbot ssa``'s labelling cards are posted here; the bot
reads answers from its update handlers, ``doppelbot ssa`` (outside the bot) with
``answers_to_cards``. Only the owner's own messages in their own Saved Messages are read —
nobody else can write there. Texts go out with ``parse_mode=None``: a card shows a draft (and
what the other person wrote) exactly as it is, never as Markdown.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from telethon import TelegramClient
from telethon import errors as tg_errors

from doppelbot.telegram.errors import telegram_errors


@dataclass(frozen=True, slots=True)
class CardAnswer:
    card_message_id: int
    message_id: int
    text: str
    date: int


class TelethonSavedMessages:
    """The review's ``SavedMessages`` and SSA's ``CardPoster`` over Telethon ("me")."""

    def __init__(self, client: TelegramClient, *, flood_bound: int | None = None) -> None:
        self._client = client
        self._flood_bound = flood_bound

    async def post(self, text: str, *, reply_to: int | None = None) -> int:
        with telegram_errors(flood_bound=self._flood_bound):
            message = await self._client.send_message(
                "me", text, reply_to=reply_to, link_preview=False, parse_mode=None
            )
        return int(message.id)

    async def edit(self, message_id: int, text: str) -> None:
        with telegram_errors(flood_bound=self._flood_bound):
            try:
                await self._client.edit_message(
                    "me", message_id, text, link_preview=False, parse_mode=None
                )
            except tg_errors.MessageNotModifiedError:
                return

    async def text_of(self, message_id: int) -> str | None:
        with telegram_errors(flood_bound=self._flood_bound):
            message = await self._client.get_messages("me", ids=message_id)
        text = getattr(message, "message", None)
        return text if isinstance(text, str) else None


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

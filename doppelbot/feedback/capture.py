"""Feedback the owner and the contacts give without being asked.

- *Takeover corrections*: the owner writing in a chat right after an auto reply says what the
  reply should have been; (bot reply, owner's turn) is recorded as a ``takeover`` verdict, and
  further messages of the same turn extend it.
- *Reactions* of other people on the bot's sent replies: their current state is stored.
- *Verdicts a crash lost*: every reviewed reply that went out has the owner's approval on
  record (older versions wrote it after the send); the start repairs what is missing.

Verdicts on cards themselves are recorded by the review (``doppelbot.review``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from doppelbot.config import Settings
from doppelbot.core.domain import Message, Reaction, Verdict
from doppelbot.responder.transport import Clock
from doppelbot.store import feedback, history, replies
from doppelbot.store.database import Database

log = logging.getLogger("doppelbot.feedback")


class FeedbackCapture:
    def __init__(self, settings: Settings, db: Database, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock or Clock()
        self.owner_id: int | None = None
        self._takeover_lock = asyncio.Lock()

    async def start(self, owner_id: int) -> None:
        """Record the verdicts a crash may have lost (before anything else acts on drafts)."""
        self.owner_id = owner_id
        repaired = await feedback.repair_missing_verdicts(self.db, int(self.clock.time()))
        if repaired:
            log.info("feedback: recorded %d verdict(s) a crash had left unwritten", repaired)

    async def on_owner_message(self, message: Message) -> None:
        """The responder's hook: the owner wrote in a chat themselves (not the bot)."""
        window_s = self.settings.review.takeover_correction_minutes * 60
        if window_s <= 0 or not message.text.strip() or message.chat_id == self.owner_id:
            return
        async with self._takeover_lock:  # one verdict per bot reply, even for a burst
            await self._record_takeover(message, window_s)

    async def _record_takeover(self, message: Message, window_s: float) -> None:
        reply = await replies.last_auto_sent(self.db, message.chat_id)
        if reply is None or reply.sent_at is None:
            return
        last_bot = max(reply.sent_message_ids)
        if message.message_id <= last_bot or message.date - reply.sent_at > window_s:
            return
        if await history.count_incoming_between(
            self.db, message.chat_id, last_bot, message.message_id
        ):
            return  # the other person answered the bot first: a new turn, not a correction
        # The owner's whole turn after the bot's reply, from the store (handlers may run out
        # of order; reading it all makes every call give the same answer).
        bot_ids = await replies.bot_message_ids(self.db, message.chat_id)
        turn = await history.owner_turn_after(self.db, message.chat_id, last_bot)
        parts = [m.text.strip() for m in turn if m.message_id not in bot_ids and m.text.strip()]
        text = "\n".join(parts) or message.text.strip()
        existing = await feedback.latest_verdict(self.db, reply.reply_id, Verdict.TAKEOVER)
        if existing is not None and existing.verdict_id is not None:
            await feedback.set_final_text(self.db, existing.verdict_id, text)
        else:
            bot_text = reply.final_text or reply.draft_text or ""
            await feedback.record_verdict(
                self.db, reply.reply_id, Verdict.TAKEOVER, bot_text, text, int(self.clock.time())
            )
        log.info("feedback: takeover correction recorded reply=%d", reply.reply_id)

    async def on_reactions(
        self, chat_id: int, message_id: int, current: Sequence[Reaction]
    ) -> None:
        """``LiveBot`` reaction listener: other people's reactions on the bot's sent replies
        are stored as feedback (their current state)."""
        if chat_id == self.owner_id:
            return  # the owner's reactions on cards are the review's
        if message_id in await replies.bot_message_ids(self.db, chat_id):
            await feedback.set_reactions(self.db, chat_id, message_id, current)

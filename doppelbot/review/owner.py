"""The owner's notes in Saved Messages: answers to draft cards, reactions on them, commands.

Why it is shaped like this:

- Only the owner can command: a note counts only when it is in the owner's own Saved Messages
  chat, outgoing, written by the owner and not forwarded; the bot's own posts there are
  recognised and skipped. Nothing a stranger writes is ever read as a command.
- Notes are acted on one at a time, in order, each once: the newest one acted on is kept in
  the store, so the notes written while the bot was down are applied at start (``start``),
  before any live note, and a note seen again after a restart does nothing.
- An approval is the owner's word: it goes to the responder (``Approver``) with the verdict
  written in the transaction that claims the draft; everything else the owner says about a
  draft is a compare-and-set on the reply, so an ``ok`` twice, an ``ok`` racing the expiry, or
  a reaction plus a reply send it at most once.
- It answers tersely: an answered card is edited to show its outcome; a new message is posted
  only for command answers, hints and late answers to a finished card.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from doppelbot.config import Settings
from doppelbot.core.domain import (
    Message,
    Peer,
    PeerKind,
    Reaction,
    Reply,
    ReplyMode,
    ReplyStatus,
    Verdict,
)
from doppelbot.responder.service import Approval, ClaimHook
from doppelbot.responder.transport import Clock
from doppelbot.review.cards import (
    CardAction,
    CardActionKind,
    card_reply_id,
    parse_card_answer,
    reaction_action,
)
from doppelbot.review.commands import CommandTable, is_command
from doppelbot.review.drafts import (
    OUTCOME_AUTO_BAD,
    OUTCOME_AUTO_CORRECTED,
    OUTCOME_AUTO_GOOD,
    OUTCOME_DROPPED,
    OUTCOME_EXPIRED,
    OUTCOME_REGENERATED,
    OUTCOME_TOO_LATE,
    DraftDesk,
    failed_outcome,
    sent_outcome,
)
from doppelbot.review.owner_commands import CommandContext
from doppelbot.ssa.flow import record_label
from doppelbot.ssa.labels import LabelSyntaxError
from doppelbot.store import bot_state, feedback, replies
from doppelbot.store.database import Database

log = logging.getLogger("doppelbot.review")

S = ReplyStatus

LATE_NOTES = {
    S.EXPIRED: "⌛ This draft expired — nothing was sent.",
    S.SENT: "Already sent.",
    S.DROPPED: "This draft was dropped — nothing was sent.",
    S.FAILED: "This draft failed; nothing more will be sent.",
    S.QUEUED: "⏳ A new draft is on its way.",
    S.GENERATING: "⏳ A new draft is on its way.",
}


class Approver(Protocol):
    """What the review asks of the responder."""

    async def send_approved(
        self, reply_id: int, text: str | None = None, *, on_claim: ClaimHook | None = None
    ) -> Approval: ...

    async def regenerate(self, reply_id: int) -> None: ...


class OwnerNotes:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        drafts: DraftDesk,
        approver: Approver,
        commands: CommandTable[CommandContext],
        *,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.drafts = drafts
        self.approver = approver
        self.commands = commands
        self.clock = clock or Clock()
        self.owner_id: int | None = None
        self._closing = False
        # One answer at a time per reply: a reply and a reaction, or an update seen twice,
        # must not both act (the store's compare-and-set guards sends; this guards verdicts).
        self._reply_locks: dict[int, asyncio.Lock] = {}
        self._saved_lock = asyncio.Lock()
        self._saved_seen: int | None = None
        self._backlog_applied = asyncio.Event()

    # --- lifecycle --------------------------------------------------------------------------
    async def start(
        self, owner_id: int, backlog: Sequence[Message] = (), *, saved_top_id: int = 0
    ) -> int:
        """Apply the notes written while the bot was down (``backlog``, oldest first); on the
        very first start there is nothing to catch up (nothing older than ``saved_top_id`` is
        read: older notes are the owner's own business). Returns how many were applied."""
        self.owner_id = owner_id
        applied = 0
        async with self._saved_lock:
            self._saved_seen = await bot_state.get_int(self.db, bot_state.SAVED_SEEN_KEY)
            if self._saved_seen is None:
                self._saved_seen = max([saved_top_id, *(m.message_id for m in backlog)])
                await bot_state.set_int(self.db, bot_state.SAVED_SEEN_KEY, self._saved_seen)
            else:
                note = Peer(owner_id, PeerKind.USER, is_self=True)
                for message in sorted(backlog, key=lambda m: m.message_id):
                    if not self._is_owner_note(message, note):
                        continue
                    if await self.drafts.is_own_post(message.message_id):
                        continue
                    if await self._note_once(message):
                        applied += 1
        self._backlog_applied.set()
        if applied:
            log.info("review: applied %d note(s) written while the bot was down", applied)
        return applied

    def close(self) -> None:
        self._closing = True

    # --- input ------------------------------------------------------------------------------
    def _is_owner_note(self, message: Message, peer: Peer) -> bool:
        """Only the owner's own, self-written messages in their own Saved Messages count."""
        return (
            self.owner_id is not None
            and message.chat_id == self.owner_id
            and peer.peer_id == self.owner_id
            and peer.is_self
            and message.is_outgoing
            and message.sender_id in (None, self.owner_id)
            and not message.is_forwarded
        )

    async def on_saved_message(self, message: Message, peer: Peer) -> None:
        """``LiveBot`` listener: every new message; acts only on the owner's notes."""
        if self._closing or not self._is_owner_note(message, peer):
            return
        if await self.drafts.is_own_post(message.message_id):
            return
        await self._backlog_applied.wait()
        async with self._saved_lock:
            await self._note_once(message)

    async def on_reactions(
        self, chat_id: int, message_id: int, current: Sequence[Reaction]
    ) -> None:
        """``LiveBot`` reaction listener: the owner's reactions on cards act on them."""
        if self._closing or chat_id != self.owner_id:
            return
        reply = await replies.get_by_review_message(self.db, message_id)
        if reply is None:
            return
        for reaction in current:
            action = reaction_action(
                reaction.emoji,
                self.settings.review.positive_reactions,
                self.settings.review.negative_reactions,
            )
            if action is not None:
                await self._act(reply, action, answer_id=None)
                return

    async def _note_once(self, message: Message) -> bool:
        """Act on one owner note unless it was acted on already (call with the lock held)."""
        if self._saved_seen is not None and message.message_id <= self._saved_seen:
            return False
        await self._handle_note(message)
        self._saved_seen = message.message_id
        await bot_state.set_int(self.db, bot_state.SAVED_SEEN_KEY, message.message_id)
        return True

    async def _handle_note(self, message: Message) -> None:
        text = message.text or ""
        target = message.reply_to_message_id
        if not is_command(text) and target is not None:
            # An answer to a card or an SSA card; a command, even as an answer to a card,
            # is a command ("/status" must never go out as a correction).
            if not await self.drafts.is_own_post(target) and await self._ssa_label(
                message, target, text
            ):
                return
            if await self._card_answer(message, target, text):
                return
        assert self.owner_id is not None
        context = CommandContext(self.settings, self.db, self.owner_id, self.clock)
        answer = await self.commands.dispatch(text, context)
        if answer is not None:
            await self.drafts.post(answer, reply_to=message.message_id)

    async def _ssa_label(self, message: Message, target: int, text: str) -> bool:
        try:
            outcome = await record_label(self.db, target, text)
        except LabelSyntaxError as exc:
            await self.drafts.post(f"⚠️ {exc}", reply_to=message.message_id)
            return True
        if outcome is None:
            return False
        log.info("review: SSA label saved card=%d", target)
        return True

    async def _card_answer(self, message: Message, card_id: int, text: str) -> bool:
        """The owner replied to one of our cards; False when ``card_id`` is not a card."""
        reply = await replies.get_by_review_message(self.db, card_id)
        if reply is None:
            # Not in the store under this id: an older card of a regenerated draft?
            named = card_reply_id(await self.drafts.text_of(card_id) or "")
            if named is None or (await replies.get(self.db, named)) is None:
                return False
            await self.drafts.post(
                "This card was replaced by a newer draft — answer the newest card.",
                reply_to=message.message_id,
            )
            return True
        action = parse_card_answer(text)
        if action is None:
            return True
        await self._act(reply, action, answer_id=message.message_id, answered_at=message.date)
        return True

    # --- acting on a card -------------------------------------------------------------------
    async def _act(
        self,
        reply: Reply,
        action: CardAction,
        *,
        answer_id: int | None,
        answered_at: int | None = None,
    ) -> None:
        lock = self._reply_locks.setdefault(reply.reply_id, asyncio.Lock())
        async with lock:
            fresh = await replies.get(self.db, reply.reply_id)
            if fresh is None:
                return
            if fresh.mode is ReplyMode.AUTO:
                await self._act_on_copy(fresh, action, answer_id=answer_id)
            elif fresh.status is not S.AWAITING_REVIEW:
                await self._late(fresh, answer_id)
            elif answered_at is None or not await self._answered_too_late(
                fresh, action.kind, answered_at, answer_id
            ):
                await self._act_on_draft(fresh, action, answer_id)

    async def _act_on_draft(self, reply: Reply, action: CardAction, answer_id: int | None) -> None:
        kind = action.kind
        if kind is CardActionKind.REJECT:
            if await self.drafts.finish(
                reply,
                S.DROPPED,
                Verdict.REJECTED,
                None,
                error="rejected",
                source_message_id=answer_id,
            ):
                await self.drafts.show(reply, OUTCOME_DROPPED)
            else:
                await self._late(await replies.get(self.db, reply.reply_id), answer_id)
        elif kind is CardActionKind.REGENERATE:
            await self._regenerate(reply, answer_id)
        else:
            await self._send(
                reply, action.text if kind is CardActionKind.CORRECT else None, answer_id
            )

    async def _answered_too_late(
        self, reply: Reply, kind: CardActionKind, answered_at: int, answer_id: int | None
    ) -> bool:
        """An answer applied after a restart is judged by when it was written: after the
        draft's lifetime it finds the draft expired; an approval older than the catch-up age
        is not carried out any more (the conversation has moved on)."""
        since = reply.generated_at or reply.updated_at
        if answered_at - since >= self.settings.review.draft_ttl_minutes * 60:
            await self.drafts.expire(reply, "expired", OUTCOME_EXPIRED)
            await self._late(await replies.get(self.db, reply.reply_id), answer_id)
            return True
        age = self.clock.time() - answered_at
        max_age = self.settings.responder.catch_up_max_age_s
        if kind in (CardActionKind.APPROVE, CardActionKind.CORRECT) and 0 < max_age < age:
            await self.drafts.expire(reply, "too_old", OUTCOME_TOO_LATE.format(hours=age / 3600))
            return True
        return False

    async def _send(self, reply: Reply, text: str | None, answer_id: int | None) -> None:
        verdict = Verdict.APPROVED if text is None else Verdict.CORRECTED
        draft = reply.draft_text or ""
        now = int(self.clock.time())

        async def record(conn: Any, final_text: str) -> None:
            # The owner's word is training data whatever happens to the send afterwards.
            final = final_text if text is not None else draft
            await feedback.record_verdict_in(
                conn, reply.reply_id, verdict, draft, final, now, source_message_id=answer_id
            )

        result = await self.approver.send_approved(reply.reply_id, text, on_claim=record)
        after = await replies.get(self.db, reply.reply_id)
        if after is None:
            return
        if result is Approval.NOT_WAITING:
            if after.status is not S.SENDING:  # SENDING: the other answer is sending it now
                await self._late(after, answer_id)
            return
        if result is Approval.SENT:
            outcome = sent_outcome(after)
        elif result is Approval.STALE:
            outcome = await self.drafts.stale_outcome(after)
        else:
            outcome = failed_outcome(after)
        await self.drafts.show(after, outcome)

    async def _regenerate(self, reply: Reply, answer_id: int | None) -> None:
        await feedback.record_verdict(
            self.db,
            reply.reply_id,
            Verdict.REGENERATED,
            reply.draft_text or "",
            None,
            int(self.clock.time()),
        )
        await self.drafts.show(reply, OUTCOME_REGENERATED)
        await self.approver.regenerate(reply.reply_id)
        after = await replies.get(self.db, reply.reply_id)
        if after is not None and after.status is S.FAILED:
            await self.drafts.post(
                "⚠️ Could not make a new draft; the chat stays unanswered.", reply_to=answer_id
            )

    async def _act_on_copy(
        self, reply: Reply, action: CardAction, *, answer_id: int | None
    ) -> None:
        """An answer to the copy of a reply sent in auto mode: feedback only."""
        sent_text = reply.final_text or reply.draft_text or ""
        if action.kind is CardActionKind.CORRECT:
            verdict, final, outcome = Verdict.CORRECTED, action.text, OUTCOME_AUTO_CORRECTED
        elif action.kind is CardActionKind.APPROVE:
            verdict, final, outcome = Verdict.APPROVED, sent_text, OUTCOME_AUTO_GOOD
        elif action.kind is CardActionKind.REJECT:
            verdict, final, outcome = Verdict.REJECTED, None, OUTCOME_AUTO_BAD
        else:
            if answer_id is not None:
                await self.drafts.post(
                    "This reply was already sent; answer with a better text to record a "
                    "correction.",
                    reply_to=answer_id,
                )
            return
        if answer_id is None and await feedback.latest_verdict(self.db, reply.reply_id, verdict):
            return  # a reaction state seen again (updates repeat, edits carry it): once
        await feedback.record_verdict(
            self.db, reply.reply_id, verdict, sent_text, final, int(self.clock.time())
        )
        await self.drafts.show(reply, outcome)

    async def _late(self, reply: Reply | None, answer_id: int | None) -> None:
        """An answer to a card that is no longer waiting (said once, to a reply only: a
        repeated reaction stays silent)."""
        if reply is None or answer_id is None:
            return
        if await feedback.answered_by(self.db, reply.reply_id, answer_id):
            return  # this very answer was acted on before a restart: nothing new to say
        note = LATE_NOTES.get(reply.status)
        if note is not None:
            await self.drafts.post(note, reply_to=answer_id)

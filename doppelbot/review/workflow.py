"""The review workflow in Saved Messages: draft cards, the owner's answers, owner commands,
expiry and feedback capture (reactions, verdicts, takeover corrections).

Why it is shaped like this:

- It is core code: Saved Messages is reached through the small ``SavedMessages`` port and the
  responder through its public review API (``send_approved``, ``regenerate``, hooks), so the
  Telegram side (``doppelbot.telegram.review``) only maps events and posts text.
- Everything it decides is in SQLite: a card is found again by ``replies.review_message_id``
  (a restart loses no draft), verdicts are written in the same transaction as the reply's move
  (for an approval: the claim that starts the send), and every move is the replies store's
  compare-and-set — an ``ok`` twice, an ``ok`` racing the expiry, or a reaction plus a reply
  send the draft at most once.
- Nothing the owner writes while the bot is down is lost: the notes written meanwhile are
  applied at start, in order, once (the newest note acted on is kept in the store), and an
  approval judged against the draft's lifetime at the moment it was written.
- Only the owner can command: a message counts only when it is in the owner's own Saved
  Messages chat, outgoing, written by the owner and not forwarded. Nothing a stranger writes is
  ever read as a command; the bot's own posts there are recognised and skipped.
- It answers tersely: an answered card is edited to show its outcome (no new message); a new
  message is posted only for command answers, hints and late answers to a finished card.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from doppelbot.config import Settings
from doppelbot.domain import (
    Message,
    Peer,
    PeerKind,
    Reaction,
    Reply,
    ReplyMode,
    ReplyStatus,
    Verdict,
)
from doppelbot.errors import DoppelbotError
from doppelbot.responder.service import Approval
from doppelbot.responder.transport import Clock
from doppelbot.review.cards import (
    CardAction,
    CardActionKind,
    card_reply_id,
    format_card,
    parse_card_answer,
    reaction_action,
)
from doppelbot.review.commands import HELP_TEXT, Command, CommandError, CommandName, parse_command
from doppelbot.store import bot_state, feedback, history, replies, transcripts
from doppelbot.store.database import Database

if TYPE_CHECKING:
    from doppelbot.responder.context import LiveContext
    from doppelbot.responder.service import Responder

log = logging.getLogger("doppelbot.review")

S = ReplyStatus

#: How often the expiry sweep runs at most (it also runs at start).
MAX_SWEEP_S = 30.0

OUTCOME_SENT = "✅ Sent."
OUTCOME_CORRECTED = "✅ Sent your text instead:"
OUTCOME_DROPPED = "🗑 Dropped — nothing was sent."
OUTCOME_EXPIRED = "⌛ Expired — nothing was sent."
OUTCOME_REGENERATED = "🔄 Replaced by a new draft (below)."
OUTCOME_AUTO_CORRECTED = "✏️ Correction recorded (the sent reply stays)."
OUTCOME_AUTO_GOOD = "👍 Noted as a good reply."
OUTCOME_AUTO_BAD = "👎 Noted as a bad reply."
OUTCOME_STALE = "⚠️ Not sent: {name} wrote again after this draft; a new draft answers everything."
OUTCOME_TOO_LATE = (
    "⌛ Not sent: your answer was written {hours:.0f} h ago while the bot was down "
    "(more than DOPPELBOT_CATCH_UP_MAX_AGE)."
)


class SavedMessages(Protocol):
    """The owner's Saved Messages chat, as the workflow needs it."""

    async def post(self, text: str, *, reply_to: int | None = None) -> int:
        """Post ``text``; returns the new message's id."""
        ...

    async def edit(self, message_id: int, text: str) -> None:
        """Replace a posted message's text (unchanged text is not an error)."""
        ...

    async def text_of(self, message_id: int) -> str | None:
        """The text of a message there, None when it is gone."""
        ...


def _minutes(value: float) -> float:
    return round(value, 1) if value < 1 else float(round(value))


class ReviewWorkflow:
    """Implements the responder's ``DraftSink``; ``attach`` wires it to a running bot."""

    def __init__(self, settings: Settings, db: Database, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock or Clock()
        self.owner_id: int | None = None
        self.saved: SavedMessages | None = None
        self.responder: Responder | None = None
        self.stats: Counter[str] = Counter()
        self._own_posts: set[int] = set()
        self._post_lock = asyncio.Lock()
        self._carding: set[int] = set()  # replies whose card is being posted right now
        self._takeover_lock = asyncio.Lock()
        # One answer at a time per reply: a reply and a reaction, or an update seen twice,
        # must not both act (the store's compare-and-set guards sends; this guards verdicts).
        self._reply_locks: dict[int, asyncio.Lock] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        # The owner's notes are acted on one at a time, in order, each once: the newest one
        # acted on is remembered (also in the store, for the next start). Live notes wait
        # until the notes written while the bot was down have been applied.
        self._saved_lock = asyncio.Lock()
        self._saved_seen: int | None = None
        self._backlog_applied = asyncio.Event()

    # --- wiring -----------------------------------------------------------------------------
    def attach(self, *, responder: Responder, saved: SavedMessages, owner_id: int) -> None:
        self.responder = responder
        self.saved = saved
        self.owner_id = owner_id
        responder.drafts = self
        responder.on_sent.append(self._on_sent)
        responder.on_owner_message.append(self.on_owner_message)

    async def start(
        self,
        backlog: Sequence[Message] = (),
        *,
        saved_top_id: int = 0,
        refresh_since: float | None = None,
    ) -> None:
        """Catch up with what happened while the bot was down: record verdicts a crash may
        have lost, show the outcome on cards of drafts finished since ``refresh_since`` (a
        crash may have come between the two), apply the owner's notes written meanwhile
        (``backlog``, oldest first; on the very first start nothing older than
        ``saved_top_id`` is read), expire old drafts, post cards for drafts that have none,
        then keep expiring on a timer."""
        repaired = await feedback.repair_missing_verdicts(self.db, int(self.clock.time()))
        if repaired:
            log.info("review: recorded %d verdict(s) a crash had left unwritten", repaired)
        if refresh_since is not None:
            await self._refresh_cards(int(refresh_since))
        await self.apply_backlog(backlog, saved_top_id=saved_top_id)
        await self.expire_due()
        for reply in await replies.with_status(self.db, [S.AWAITING_REVIEW]):
            if reply.review_message_id is None:
                await self._post_card(reply, only_if_missing=True)
        ttl_s = self.settings.draft_ttl_minutes * 60
        interval = max(0.05, min(MAX_SWEEP_S, ttl_s / 4))
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(interval))

    async def aclose(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    async def _sweep(self, interval: float) -> None:
        while not self._closing:
            await self.clock.sleep(interval)
            try:
                await self.expire_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the sweep must outlive one bad round
                log.warning("review: expiry sweep failed: %s", _describe(exc))

    # --- posting ----------------------------------------------------------------------------
    async def _post(self, text: str, *, reply_to: int | None = None) -> int | None:
        if self.saved is None:
            return None
        # Held while posting: the update for our own post may arrive before ``post`` returns
        # its id, and the listener waits on this lock before deciding whose message it is.
        async with self._post_lock:
            try:
                message_id = await self.saved.post(text, reply_to=reply_to)
            except DoppelbotError as exc:
                log.warning("review: could not post to Saved Messages: %s", exc)
                return None
            self._own_posts.add(message_id)
        return message_id

    async def _edit(self, message_id: int | None, text: str) -> None:
        if self.saved is None or message_id is None:
            return
        try:
            await self.saved.edit(message_id, text)
        except DoppelbotError as exc:  # e.g. the owner deleted the card: nothing to show
            log.info("review: card %d not edited: %s", message_id, exc)

    async def _card_text(
        self, reply: Reply, *, outcome: str | None = None, auto: bool | None = None
    ) -> str:
        peer = await history.get_peer(self.db, reply.chat_id)
        name = peer.display_name if peer is not None else str(reply.chat_id)
        incoming = await self._incoming_texts(reply)
        is_auto = reply.mode is ReplyMode.AUTO if auto is None else auto
        draft = (reply.final_text if is_auto else reply.draft_text) or reply.draft_text or ""
        ttl_s = self.settings.draft_ttl_minutes * 60
        since = reply.generated_at or reply.updated_at or int(self.clock.time())
        left = max(0.0, since + ttl_s - self.clock.time()) / 60
        return format_card(
            reply_id=reply.reply_id,
            chat_name=name,
            incoming=incoming,
            draft=draft,
            expires_in_min=_minutes(left),
            auto_sent=is_auto,
            outcome=outcome,
        )

    async def _incoming_texts(self, reply: Reply) -> list[str]:
        ids = list(reply.context_message_ids) or [reply.trigger_message_id]
        stored = await history.messages_by_ids(self.db, reply.chat_id, ids)
        out = []
        for m in await transcripts.attach(self.db, [m for m in stored if not m.is_outgoing]):
            if m.is_voice_note:
                # The transcript is what the draft answers: the owner must see it too.
                said = f"🎤 {m.transcript}" if m.transcript else f"[{m.media_kind}]"
                shown = f"{m.text}\n{said}" if m.text else said
            else:
                sticker = m.sticker_emoji and f"[sticker {m.sticker_emoji}]"
                shown = m.text or sticker or (m.media_kind and f"[{m.media_kind}]") or ""
            if shown:
                out.append(shown)
        return out

    async def _post_card(self, reply: Reply, *, only_if_missing: bool = False) -> None:
        if reply.reply_id in self._carding:
            return
        self._carding.add(reply.reply_id)
        try:
            if only_if_missing:
                fresh = await replies.get(self.db, reply.reply_id)
                if fresh is None or fresh.review_message_id is not None:
                    return
                reply = fresh
            card_id = await self._post(await self._card_text(reply))
            if card_id is None:
                return
            async with self.db.transaction() as conn:
                await replies.update_in(
                    conn, reply.reply_id, now=int(self.clock.time()), review_message_id=card_id
                )
            self.stats["cards"] += 1
            log.info("review: card posted reply=%d card=%d", reply.reply_id, card_id)
        finally:
            self._carding.discard(reply.reply_id)

    # --- the responder's hooks --------------------------------------------------------------
    async def draft_ready(self, reply: Reply, context: LiveContext) -> None:
        """A new draft (or a regenerated one: the old card was already marked replaced)."""
        await self._post_card(reply)

    async def _on_sent(self, reply: Reply) -> None:
        """Auto mode: a copy of what was sent, so the owner can correct it afterwards. Review
        mode: the card shows that it went out (also for a send resumed after a restart)."""
        if reply.mode is ReplyMode.AUTO and reply.review_message_id is None:
            await self._post_card(reply)
        elif reply.mode is ReplyMode.REVIEW and reply.review_message_id is not None:
            await self._edit(
                reply.review_message_id,
                await self._card_text(reply, outcome=self._sent_outcome(reply)),
            )

    async def _refresh_cards(self, since: int) -> None:
        """Cards of review drafts that finished since ``since``: show their outcome (editing
        a card that already shows it changes nothing)."""
        for reply in await replies.finished_reviews_since(self.db, since):
            outcome = await self._outcome(reply)
            if outcome is not None:
                await self._edit(
                    reply.review_message_id, await self._card_text(reply, outcome=outcome)
                )

    async def _outcome(self, reply: Reply) -> str | None:
        if reply.status is S.SENT:
            return self._sent_outcome(reply)
        if reply.status is S.EXPIRED:
            return OUTCOME_EXPIRED
        if reply.status is S.FAILED:
            return f"⚠️ Sending failed ({reply.error or 'error'})."
        if reply.status is S.DROPPED and reply.error == "stale":
            peer = await history.get_peer(self.db, reply.chat_id)
            return OUTCOME_STALE.format(name=peer.display_name if peer is not None else "they")
        if reply.status is S.DROPPED and reply.error == "rejected":
            return OUTCOME_DROPPED
        return None

    @staticmethod
    def _sent_outcome(reply: Reply) -> str:
        final = reply.final_text or ""
        if final == (reply.draft_text or ""):
            return OUTCOME_SENT
        return f"{OUTCOME_CORRECTED}\n{final}"

    async def on_owner_message(self, message: Message) -> None:
        """The owner wrote in a chat right after an auto reply: (bot reply, owner text) is a
        correction (verdict ``takeover``); further messages extend the same turn."""
        window_s = self.settings.takeover_correction_minutes * 60
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
        self.stats["takeovers"] += 1
        log.info("review: takeover correction recorded reply=%d", reply.reply_id)

    # --- expiry -----------------------------------------------------------------------------
    async def expire_due(self) -> int:
        """Expire drafts older than ``draft_ttl_minutes``; returns how many."""
        ttl_s = self.settings.draft_ttl_minutes * 60
        now = self.clock.time()
        expired = 0
        for reply in await replies.with_status(self.db, [S.AWAITING_REVIEW]):
            since = reply.generated_at or reply.updated_at
            if now - since < ttl_s:
                continue
            if await self._expire(reply, "expired", OUTCOME_EXPIRED):
                expired += 1
        if expired:
            log.info("review: %d draft(s) expired", expired)
        return expired

    async def _finish(
        self,
        reply: Reply,
        to: ReplyStatus,
        verdict: Verdict,
        final_text: str | None,
        *,
        error: str,
        source_message_id: int | None = None,
    ) -> bool:
        """Move an awaiting draft to ``to`` and record the verdict, atomically."""
        now = int(self.clock.time())
        async with self.db.transaction() as conn:
            moved = await replies.transition_in(
                conn, reply.reply_id, S.AWAITING_REVIEW, to, now=now, error=error
            )
            if moved:
                await feedback.record_verdict_in(
                    conn,
                    reply.reply_id,
                    verdict,
                    reply.draft_text or "",
                    final_text,
                    now,
                    source_message_id=source_message_id,
                )
        return moved

    # --- input from Saved Messages ----------------------------------------------------------
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
        async with self._post_lock:  # our own post's id is known once the lock is free
            pass
        if message.message_id in self._own_posts:
            return
        await self._backlog_applied.wait()
        async with self._saved_lock:
            await self._note_once(message)

    async def apply_backlog(self, backlog: Sequence[Message], *, saved_top_id: int = 0) -> int:
        """The owner's notes written while the bot was down, applied in order; returns how
        many were new. On the very first start there is nothing to catch up: older notes
        are the owner's own business."""
        applied = 0
        async with self._saved_lock:
            self._saved_seen = await bot_state.get_int(self.db, bot_state.SAVED_SEEN_KEY)
            if self._saved_seen is None:
                self._saved_seen = max([saved_top_id, *(m.message_id for m in backlog)])
                await bot_state.set_int(self.db, bot_state.SAVED_SEEN_KEY, self._saved_seen)
            else:
                owner = self.owner_id
                for message in sorted(backlog, key=lambda m: m.message_id):
                    note = Peer(owner, PeerKind.USER, is_self=True) if owner else None
                    if note is None or not self._is_owner_note(message, note):
                        continue
                    if message.message_id in self._own_posts:
                        continue
                    if await self._note_once(message):
                        applied += 1
        self._backlog_applied.set()
        if applied:
            log.info("review: applied %d note(s) written while the bot was down", applied)
        self.stats["backlog_notes"] += applied
        return applied

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
        if _is_command(text):
            # Even as an answer to a card: "/status" must never go out as a correction.
            await self._command(message, text)
            return
        if (
            target is not None
            and target not in self._own_posts
            and await self._ssa_label(message, target, text)
        ):
            return
        if target is not None and await self._card_answer(message, target, text):
            return
        await self._command(message, text)

    async def _ssa_label(self, message: Message, target: int, text: str) -> bool:
        from doppelbot.ssa.flow import record_label
        from doppelbot.ssa.labels import LabelSyntaxError

        try:
            outcome = await record_label(self.db, target, text)
        except LabelSyntaxError as exc:
            await self._post(f"⚠️ {exc}", reply_to=message.message_id)
            return True
        if outcome is None:
            return False
        self.stats["ssa_labels"] += 1
        log.info("review: SSA label saved card=%d", target)
        return True

    async def _card_answer(self, message: Message, card_id: int, text: str) -> bool:
        """The owner replied to one of our cards; False when ``card_id`` is not a card."""
        reply = await replies.get_by_review_message(self.db, card_id)
        if reply is None:
            # Not in the store under this id: an older card of a regenerated draft?
            card_text = await self.saved.text_of(card_id) if self.saved is not None else None
            named = card_reply_id(card_text or "")
            if named is None or (await replies.get(self.db, named)) is None:
                return False
            await self._post(
                "This card was replaced by a newer draft — answer the newest card.",
                reply_to=message.message_id,
            )
            return True
        action = parse_card_answer(text)
        if action is None:
            return True
        await self._act(reply, action, answer_id=message.message_id, answered_at=message.date)
        return True

    async def on_reactions(
        self, chat_id: int, message_id: int, current: Sequence[Reaction]
    ) -> None:
        """``LiveBot`` reaction listener: the owner's reactions on cards act on them; other
        people's reactions on the bot's sent replies are stored as feedback (current state)."""
        if self._closing:
            return
        if chat_id == self.owner_id:
            reply = await replies.get_by_review_message(self.db, message_id)
            if reply is None:
                return
            for reaction in current:
                action = reaction_action(
                    reaction.emoji,
                    self.settings.positive_reactions,
                    self.settings.negative_reactions,
                )
                if action is not None:
                    await self._act(reply, action, answer_id=None)
                    return
            return
        if message_id in await replies.bot_message_ids(self.db, chat_id):
            await feedback.set_reactions(self.db, chat_id, message_id, current)
            self.stats["reaction_updates"] += 1

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
            if fresh is not None:
                await self._act_locked(fresh, action, answer_id=answer_id, answered_at=answered_at)

    async def _act_locked(
        self,
        reply: Reply,
        action: CardAction,
        *,
        answer_id: int | None,
        answered_at: int | None = None,
    ) -> None:
        if reply.mode is ReplyMode.AUTO:
            await self._act_on_copy(reply, action, answer_id=answer_id)
            return
        if reply.status is not S.AWAITING_REVIEW:
            await self._late(reply, answer_id)
            return
        kind = action.kind
        if answered_at is not None and await self._answered_too_late(
            reply, kind, answered_at, answer_id
        ):
            return
        if kind is CardActionKind.REJECT:
            if await self._finish(
                reply,
                S.DROPPED,
                Verdict.REJECTED,
                None,
                error="rejected",
                source_message_id=answer_id,
            ):
                self.stats["rejected"] += 1
                await self._edit(
                    reply.review_message_id, await self._card_text(reply, outcome=OUTCOME_DROPPED)
                )
            else:
                await self._late(await replies.get(self.db, reply.reply_id), answer_id)
            return
        if kind is CardActionKind.REGENERATE:
            await self._regenerate(reply, answer_id)
            return
        await self._send(reply, action.text if kind is CardActionKind.CORRECT else None, answer_id)

    async def _answered_too_late(
        self, reply: Reply, kind: CardActionKind, answered_at: int, answer_id: int | None
    ) -> bool:
        """An answer applied after a restart is judged by when it was written: after the
        draft's lifetime it finds the draft expired; an approval older than the catch-up age
        is not carried out any more (the conversation has moved on)."""
        since = reply.generated_at or reply.updated_at
        if answered_at - since >= self.settings.draft_ttl_minutes * 60:
            await self._expire(reply, "expired", OUTCOME_EXPIRED)
            await self._late(await replies.get(self.db, reply.reply_id), answer_id)
            return True
        age = self.clock.time() - answered_at
        max_age = self.settings.catch_up_max_age
        if kind in (CardActionKind.APPROVE, CardActionKind.CORRECT) and 0 < max_age < age:
            await self._expire(reply, "too_old", OUTCOME_TOO_LATE.format(hours=age / 3600))
            return True
        return False

    async def _expire(self, reply: Reply, error: str, outcome: str) -> bool:
        """Expire an awaiting draft (verdict ``expired``) and show ``outcome`` on its card."""
        if not await self._finish(reply, S.EXPIRED, Verdict.EXPIRED, None, error=error):
            return False
        self.stats["expired"] += 1
        await self._edit(
            reply.review_message_id, await self._card_text(reply, outcome=outcome, auto=False)
        )
        return True

    async def _send(self, reply: Reply, text: str | None, answer_id: int | None) -> None:
        assert self.responder is not None
        verdict = Verdict.APPROVED if text is None else Verdict.CORRECTED
        draft = reply.draft_text or ""
        now = int(self.clock.time())

        async def record(conn: Any, final_text: str) -> None:
            # The owner's word is training data whatever happens to the send afterwards.
            final = final_text if text is not None else draft
            await feedback.record_verdict_in(
                conn, reply.reply_id, verdict, draft, final, now, source_message_id=answer_id
            )

        result = await self.responder.send_approved(reply.reply_id, text, on_claim=record)
        after = await replies.get(self.db, reply.reply_id)
        if after is None:
            return
        if result is Approval.NOT_WAITING:
            if after.status is not S.SENDING:  # SENDING: the other answer is sending it now
                await self._late(after, answer_id)
            return
        self.stats[verdict.value] += 1
        if result is Approval.SENT:
            outcome = self._sent_outcome(after)
        elif result is Approval.STALE:
            self.stats["stale_approvals"] += 1
            peer = await history.get_peer(self.db, reply.chat_id)
            name = peer.display_name if peer is not None else "they"
            outcome = OUTCOME_STALE.format(name=name)
        else:
            outcome = f"⚠️ Sending failed ({after.error or 'error'})."
        await self._edit(reply.review_message_id, await self._card_text(after, outcome=outcome))

    async def _regenerate(self, reply: Reply, answer_id: int | None) -> None:
        assert self.responder is not None
        await feedback.record_verdict(
            self.db,
            reply.reply_id,
            Verdict.REGENERATED,
            reply.draft_text or "",
            None,
            int(self.clock.time()),
        )
        self.stats["regenerated"] += 1
        await self._edit(
            reply.review_message_id, await self._card_text(reply, outcome=OUTCOME_REGENERATED)
        )
        await self.responder.regenerate(reply.reply_id)
        after = await replies.get(self.db, reply.reply_id)
        if after is not None and after.status is S.FAILED:
            await self._post(
                "⚠️ Could not make a new draft; the chat stays unanswered.", reply_to=answer_id
            )

    async def _act_on_copy(
        self, reply: Reply, action: CardAction, *, answer_id: int | None
    ) -> None:
        """An answer to the copy of a reply sent in auto mode: feedback only."""
        sent_text = reply.final_text or reply.draft_text or ""
        now = int(self.clock.time())
        if action.kind is CardActionKind.CORRECT:
            verdict, final, outcome = Verdict.CORRECTED, action.text, OUTCOME_AUTO_CORRECTED
        elif action.kind is CardActionKind.APPROVE:
            verdict, final, outcome = Verdict.APPROVED, sent_text, OUTCOME_AUTO_GOOD
        elif action.kind is CardActionKind.REJECT:
            verdict, final, outcome = Verdict.REJECTED, None, OUTCOME_AUTO_BAD
        else:
            if answer_id is not None:
                await self._post(
                    "This reply was already sent; answer with a better text to record a "
                    "correction.",
                    reply_to=answer_id,
                )
            return
        if answer_id is None and await feedback.latest_verdict(self.db, reply.reply_id, verdict):
            return  # a reaction state seen again (updates repeat, edits carry it): once
        await feedback.record_verdict(self.db, reply.reply_id, verdict, sent_text, final, now)
        self.stats[f"auto_{verdict.value}"] += 1
        await self._edit(reply.review_message_id, await self._card_text(reply, outcome=outcome))

    async def _late(self, reply: Reply | None, answer_id: int | None) -> None:
        """An answer to a card that is no longer waiting (said once, to a reply only: a
        repeated reaction stays silent)."""
        if reply is None or answer_id is None:
            return
        if await feedback.answered_by(self.db, reply.reply_id, answer_id):
            return  # this very answer was acted on before a restart: nothing new to say
        notes = {
            S.EXPIRED: "⌛ This draft expired — nothing was sent.",
            S.SENT: "Already sent.",
            S.DROPPED: "This draft was dropped — nothing was sent.",
            S.FAILED: "This draft failed; nothing more will be sent.",
            S.QUEUED: "⏳ A new draft is on its way.",
            S.GENERATING: "⏳ A new draft is on its way.",
        }
        note = notes.get(reply.status)
        if note is not None:
            await self._post(note, reply_to=answer_id)

    # --- commands ---------------------------------------------------------------------------
    async def _command(self, message: Message, text: str) -> None:
        try:
            command = parse_command(text)
            if command is None:
                return  # an ordinary note
            answer = await self._run_command(command)
        except CommandError as exc:
            answer = f"⚠️ {exc}"
        except DoppelbotError as exc:
            answer = f"⚠️ {exc}"
        self.stats["commands"] += 1
        await self._post(answer, reply_to=message.message_id)

    async def _run_command(self, command: Command) -> str:
        name = command.name
        if name is CommandName.PAUSE:
            await bot_state.set_paused(self.db, True)
            log.info("review: paused by the owner")
            return "⏸ Paused: no replies anywhere until /resume."
        if name is CommandName.RESUME:
            await bot_state.set_paused(self.db, False)
            log.info("review: resumed by the owner")
            return "▶️ Resumed."
        if name is CommandName.HELP:
            return HELP_TEXT
        if name is CommandName.FACT:
            return await self._add_fact(command.text or "")
        if name is CommandName.MODE:
            return await self._set_mode(command)
        return await self.status_text()

    async def _add_fact(self, text: str) -> str:
        from doppelbot.store.facts import SOURCE_SAVED_MESSAGES, add_fact_ex

        result = await add_fact_ex(self.db, text, SOURCE_SAVED_MESSAGES)
        if result.created:
            return f"📌 Fact #{result.fact.fact_id} saved; replies use it from now on."
        return f"📌 Already known (fact #{result.fact.fact_id})."

    async def _set_mode(self, command: Command) -> str:
        assert command.mode is not None
        if command.chat is None:
            await bot_state.set_global_reply_mode(self.db, command.mode)
            return f"Default mode: {command.mode.value} (chats without their own mode)."
        chat_id, name = await self._resolve_chat(command.chat)
        await bot_state.set_chat_reply_mode(self.db, chat_id, command.mode)
        return f"Mode for {name}: {command.mode.value}."

    async def _resolve_chat(self, token: str) -> tuple[int, str]:
        raw = token.strip()
        chat_id: int | None = None
        if raw.lstrip("-").isdigit():
            chat_id = int(raw)
        else:
            found = await history.find_peer_by_username(self.db, raw)
            chat_id = None if found is None else found.peer_id
        if chat_id is None or chat_id == self.owner_id:
            raise CommandError(
                f"unknown chat {raw!r}: use its id (see /status or `doppelbot status`) or "
                "@username of someone who wrote to you"
            )
        peer = await history.get_peer(self.db, chat_id)
        return chat_id, peer.display_name if peer is not None else str(chat_id)

    async def status_text(self) -> str:
        paused = await bot_state.is_paused(self.db)
        mode = await bot_state.global_reply_mode(self.db) or ReplyMode(self.settings.reply_mode)
        counts = await replies.count_by_status(self.db)
        sent_hour = await replies.count_recent_sends(self.db, int(self.clock.time()) - 3600)
        overrides = await bot_state.chat_mode_overrides(self.db)
        lines = [
            "⏸ Paused (send /resume)" if paused else "▶️ Active",
            f"Default mode: {mode.value}",
            f"Drafts waiting: {counts[S.AWAITING_REVIEW]} · sent in the last hour: {sent_hour}",
            "Replies: "
            + (" · ".join(f"{s.value} {counts[s]}" for s in ReplyStatus if counts[s]) or "none"),
        ]
        if overrides:
            names = []
            for chat_id, chat_mode in sorted(overrides.items())[:10]:
                peer = await history.get_peer(self.db, chat_id)
                label = peer.display_name if peer is not None else str(chat_id)
                names.append(f"{label} ({chat_id}): {chat_mode.value}")
            lines.append("Chat modes: " + "; ".join(names))
        return "\n".join(lines)


def _is_command(text: str) -> bool:
    try:
        return parse_command(text) is not None
    except CommandError:
        return True


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DoppelbotError):
        return f"{type(exc).__name__}: {exc}"[:300]
    return type(exc).__name__

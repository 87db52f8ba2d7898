"""Draft cards in the owner's Saved Messages: posting them, keeping them current, expiring them.

A card is the owner's view of one reply: the incoming messages it answers (a voice note by its
transcript), the draft, how long it waits, and — once answered — its outcome. Everything about
a card is in SQLite (``replies.review_message_id``), so a restart loses none: cards missing
after a crash are posted at start and the outcome of drafts finished around a crash is shown
again. The desk also knows which Saved Messages posts are the bot's own, so they are never
taken for the owner's notes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from doppelbot.config import Settings
from doppelbot.core.domain import Reply, ReplyMode, ReplyStatus, Verdict
from doppelbot.core.errors import DoppelbotError, describe
from doppelbot.responder.transport import Clock
from doppelbot.review.cards import format_card
from doppelbot.store import feedback, history, replies, transcripts
from doppelbot.store.database import Database

if TYPE_CHECKING:
    from doppelbot.responder.context import LiveContext

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
    """The owner's Saved Messages chat, as the review needs it."""

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


class DraftDesk:
    """The responder's ``DraftSink`` and sent-hook, and the cards' keeper."""

    def __init__(
        self, settings: Settings, db: Database, saved: SavedMessages, *, clock: Clock | None = None
    ) -> None:
        self.settings = settings
        self.db = db
        self.saved = saved
        self.clock = clock or Clock()
        self._own_posts: set[int] = set()
        self._post_lock = asyncio.Lock()
        self._carding: set[int] = set()  # replies whose card is being posted right now
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False

    # --- lifecycle --------------------------------------------------------------------------
    async def refresh_since(self, since: float) -> None:
        """Cards of drafts that finished since ``since`` show their outcome (a crash may have
        come between the two; editing a card that already shows it changes nothing)."""
        for reply in await replies.finished_reviews_since(self.db, int(since)):
            outcome = await self.outcome(reply)
            if outcome is not None:
                await self.show(reply, outcome)

    async def start(self) -> None:
        """Expire old drafts, post cards for drafts that have none, then keep expiring."""
        await self.expire_due()
        for reply in await replies.with_status(self.db, [S.AWAITING_REVIEW]):
            if reply.review_message_id is None:
                await self._post_card(reply, only_if_missing=True)
        ttl_s = self.settings.review.draft_ttl_minutes * 60
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
                log.warning("review: expiry sweep failed: %s", describe(exc))

    # --- posting ----------------------------------------------------------------------------
    async def post(self, text: str, *, reply_to: int | None = None) -> int | None:
        # Held while posting: the update for our own post may arrive before ``post`` returns
        # its id, and ``is_own_post`` waits on this lock before deciding whose message it is.
        async with self._post_lock:
            try:
                message_id = await self.saved.post(text, reply_to=reply_to)
            except DoppelbotError as exc:
                log.warning("review: could not post to Saved Messages: %s", exc)
                return None
            self._own_posts.add(message_id)
        return message_id

    async def is_own_post(self, message_id: int) -> bool:
        async with self._post_lock:  # our own post's id is known once the lock is free
            pass
        return message_id in self._own_posts

    async def edit(self, message_id: int | None, text: str) -> None:
        if message_id is None:
            return
        try:
            await self.saved.edit(message_id, text)
        except DoppelbotError as exc:  # e.g. the owner deleted the card: nothing to show
            log.info("review: card %d not edited: %s", message_id, exc)

    async def text_of(self, message_id: int) -> str | None:
        return await self.saved.text_of(message_id)

    # --- cards ------------------------------------------------------------------------------
    async def card_text(
        self, reply: Reply, *, outcome: str | None = None, auto: bool | None = None
    ) -> str:
        peer = await history.get_peer(self.db, reply.chat_id)
        name = peer.display_name if peer is not None else str(reply.chat_id)
        incoming = await self._incoming_texts(reply)
        is_auto = reply.mode is ReplyMode.AUTO if auto is None else auto
        draft = (reply.final_text if is_auto else reply.draft_text) or reply.draft_text or ""
        ttl_s = self.settings.review.draft_ttl_minutes * 60
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

    async def show(self, reply: Reply, outcome: str, *, auto: bool | None = None) -> None:
        """Edit ``reply``'s card to show ``outcome``."""
        await self.edit(
            reply.review_message_id, await self.card_text(reply, outcome=outcome, auto=auto)
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
            card_id = await self.post(await self.card_text(reply))
            if card_id is None:
                return
            async with self.db.transaction() as conn:
                await replies.update_in(
                    conn, reply.reply_id, now=int(self.clock.time()), review_message_id=card_id
                )
            log.info("review: card posted reply=%d card=%d", reply.reply_id, card_id)
        finally:
            self._carding.discard(reply.reply_id)

    # --- the responder's hooks --------------------------------------------------------------
    async def draft_ready(self, reply: Reply, context: LiveContext) -> None:
        """A new draft (or a regenerated one: the old card was already marked replaced)."""
        await self._post_card(reply)

    async def on_sent(self, reply: Reply) -> None:
        """Auto mode: a copy of what was sent, so the owner can correct it afterwards. Review
        mode: the card shows that it went out (also for a send resumed after a restart)."""
        if reply.mode is ReplyMode.AUTO and reply.review_message_id is None:
            await self._post_card(reply)
        elif reply.mode is ReplyMode.REVIEW and reply.review_message_id is not None:
            await self.show(reply, sent_outcome(reply))

    async def outcome(self, reply: Reply) -> str | None:
        """What a finished draft's card says (None: nothing to show)."""
        if reply.status is S.SENT:
            return sent_outcome(reply)
        if reply.status is S.EXPIRED:
            return OUTCOME_EXPIRED
        if reply.status is S.FAILED:
            return failed_outcome(reply)
        if reply.status is S.DROPPED and reply.error == "stale":
            return await self.stale_outcome(reply)
        if reply.status is S.DROPPED and reply.error == "rejected":
            return OUTCOME_DROPPED
        return None

    async def stale_outcome(self, reply: Reply) -> str:
        peer = await history.get_peer(self.db, reply.chat_id)
        return OUTCOME_STALE.format(name=peer.display_name if peer is not None else "they")

    # --- ending a draft ---------------------------------------------------------------------
    async def finish(
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

    async def expire(self, reply: Reply, error: str, outcome: str) -> bool:
        """Expire an awaiting draft (verdict ``expired``) and show ``outcome`` on its card."""
        if not await self.finish(reply, S.EXPIRED, Verdict.EXPIRED, None, error=error):
            return False
        await self.show(reply, outcome, auto=False)
        return True

    async def expire_due(self) -> int:
        """Expire drafts older than ``draft_ttl_minutes``; returns how many."""
        ttl_s = self.settings.review.draft_ttl_minutes * 60
        now = self.clock.time()
        expired = 0
        for reply in await replies.with_status(self.db, [S.AWAITING_REVIEW]):
            since = reply.generated_at or reply.updated_at
            if now - since < ttl_s:
                continue
            if await self.expire(reply, "expired", OUTCOME_EXPIRED):
                expired += 1
        if expired:
            log.info("review: %d draft(s) expired", expired)
        return expired


def sent_outcome(reply: Reply) -> str:
    final = reply.final_text or ""
    if final == (reply.draft_text or ""):
        return OUTCOME_SENT
    return f"{OUTCOME_CORRECTED}\n{final}"


def failed_outcome(reply: Reply) -> str:
    return f"⚠️ Sending failed ({reply.error or 'error'})."

"""The responder: from incoming messages to sent replies, safely.

Flow for one chat: every eligible incoming message (re)arms the chat's debounce timer and
points the chat's one ``queued`` reply at it; when the other person has been quiet for
``debounce_s`` the chat's runner task checks the safety gate, builds the context from the
stored history, retrieves facts, generates in the model worker, post-processes and — in auto
mode — claims a send slot (caps are counted in the same transaction) and delivers: a human
pause, "typing…" proportional to the length, then the parts one by one. In review mode the
draft goes to the ``DraftSink`` instead (the card in the owner's Saved Messages).

Why it is shaped like this:

- Chats are independent: one runner task per chat keeps order inside the chat, timers are per
  chat, and generations share a small semaphore only because the worker runs one at a time.
- A reply is only ever sent by whoever moved it to ``sending`` (a compare-and-set in SQLite),
  and every sent part's id is stored right away. A restart reconciles a reply left in
  ``sending`` against the chat itself before sending anything, so nothing goes out twice;
  ``queued``/``generating`` replies are re-queued, so nothing pending is lost.
- New messages during generation make the reply stale: it is dropped, and the reply queued
  by the newer message covers everything. The same holds for a reply resumed after a restart
  and for a draft the owner approves: a reply never goes out once newer messages wait.
- Quiet hours and the hourly caps postpone a reply (``deferred``) instead of dropping it; when
  the window opens it is generated again from the history of that moment, unless it has grown
  older than ``catch_up_max_age`` (then it is dropped, and ``doppelbot status`` says so).
- A message is answered at most once: a reply that already covers it (same or newer trigger)
  keeps a message seen again — a restart's catch-up, an update delivered twice — silent.
- The owner's explicit approval of a draft wins over quiet hours, caps and the kill switch.
- The owner writing in a chat (any device) is told apart from the bot's own sends by the
  recorded sent ids; it cancels what is pending there and silences the chat for a while.
- Every error stays inside its reply: it is recorded and logged (never with message texts)
  and the bot keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from doppelbot.config import HOUR_S, Settings
from doppelbot.core.domain import Message, Peer, PeerKind, Reply, ReplyMode, ReplyStatus
from doppelbot.core.errors import (
    DoppelbotError,
    FloodWaitError,
    FloodWaitTooLongError,
    GenerationError,
    describe,
)
from doppelbot.core.ports import ReplyGenerator
from doppelbot.responder import delivery
from doppelbot.responder.compose import ReplyComposer
from doppelbot.responder.context import (
    HISTORY_WINDOW,
    ContextBuilder,
    LiveContext,
    default_context_builder,
)
from doppelbot.responder.debounce import Debouncer
from doppelbot.responder.policy import (
    DEFER_REASONS,
    GateInputs,
    Skip,
    catch_up_skip,
    chat_eligibility,
    defer_until,
    eligibility,
    gate,
    group_dice,
)
from doppelbot.responder.transport import ChatTransport, Clock
from doppelbot.store import bot_state, history, replies, transcripts
from doppelbot.store.database import Database

log = logging.getLogger("doppelbot.responder")

S = ReplyStatus

#: Replies deferred by quiet hours go out spread over this many seconds after they end.
QUIET_END_SPREAD_S = 300.0
#: Generations waiting on the worker at once. The worker runs one at a time; queueing more
#: would only make their contexts older (and risk the worker's queue limit).
MAX_PARALLEL_GENERATIONS = 4
#: Telegram dates messages by its clock, replies are stamped by ours; lookups that compare
#: the two allow this much difference.
CLOCK_SKEW_S = 600
#: A message dated up to this far in our future (a fast phone, a slow server clock) is
#: still part of the conversation.
FUTURE_SKEW_S = 300


class DraftSink(Protocol):
    """Receives drafts in review mode (the card in the owner's Saved Messages)."""

    async def draft_ready(self, reply: Reply, context: LiveContext) -> None: ...


SentHook = Callable[[Reply], Awaitable[None]]
#: Runs inside the transaction that claims an approved draft for sending, with that
#: transaction's connection and the final text (the review records the owner's verdict
#: there, so a crash can never separate the two).
ClaimHook = Callable[[Any, str], Awaitable[None]]


class Approval(StrEnum):
    """What became of a draft the owner approved (or corrected)."""

    SENT = "sent"
    STALE = "stale"  # newer messages arrived after the draft: not sent
    FAILED = "failed"  # sending failed (see the reply's error)
    NOT_WAITING = "not_waiting"  # the draft was no longer awaiting review


@dataclass(frozen=True, slots=True)
class CatchUpCandidate:
    """A chat whose newest message arrived while the bot was down (from the start-up sync)."""

    message: Message  # the chat's newest message, written by the other person
    peer: Peer
    read_by_owner: bool  # the owner read it on another device meanwhile


#: The owner wrote in a chat themselves (not the bot): feedback capture records takeover
#: corrections from it.
OwnerMessageHook = Callable[[Message], Awaitable[None]]


def _answers_up_to(reply: Reply) -> int:
    """The newest incoming message a reply took into account."""
    return max((reply.trigger_message_id, *reply.context_message_ids))


@dataclass
class _Chat:
    chat_id: int
    peer: Peer | None = None
    last_incoming_id: int = 0
    last_arrival: float = 0.0  # monotonic time of the newest eligible incoming message
    pending: bool = False
    recover: Reply | None = None  # a reply left in 'sending' by a previous run
    runner: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set: not sending right now
    own_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.idle.set()


@dataclass(frozen=True, slots=True)
class SentRecord:
    """One delivered reply, for benchmarks and tests."""

    reply_id: int
    chat_id: int
    latency_s: float  # newest incoming message → last part sent, minus the configured delays


class Responder:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        transport: ChatTransport,
        generator: ReplyGenerator,
        composer: ReplyComposer | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        context_builder: ContextBuilder | None = None,
        drafts: DraftSink | None = None,
        on_sent: Sequence[SentHook] = (),
        on_owner_message: Sequence[OwnerMessageHook] = (),
        unsaved: Callable[[int], Sequence[Message]] | None = None,
        owner_id: int | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        #: The logged-in account; the running bot learns it on connecting (``start``).
        self.owner_id = owner_id
        self.transport = transport
        self.generator = generator
        #: Facts, the prompt within the input budget, the fact fallback: shared with
        #: ``doppelbot chat``, so the terminal answers as the bot would.
        self.composer = composer or ReplyComposer(settings)
        self.clock = clock or Clock()
        self.rng = rng or random.Random()
        self.drafts = drafts
        # Messages the adapter could not store yet (the database was busy): still context.
        self._unsaved = unsaved
        self.on_sent = tuple(on_sent)
        self.on_owner_message = tuple(on_owner_message)
        self.policy = settings.responder
        #: The owner's other own accounts (known once started): never answered.
        self.other_own: frozenset[int] = frozenset()
        self._options = settings.generation
        self._context = context_builder or default_context_builder(settings)
        self._debouncer: Debouncer[int] = Debouncer(settings.responder.debounce_s, self._schedule)
        # Deferred replies wake up here when their window opens (one timer per chat).
        self._wakeups: Debouncer[int] = Debouncer(0.0, self._wake)
        self._chats: dict[int, _Chat] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gen_slots = asyncio.Semaphore(
            max(1, min(settings.model.worker_queue_size, MAX_PARALLEL_GENERATIONS))
        )
        self._closing = False
        self._warned_no_drafts = False
        self.stats: Counter[str] = Counter()
        self.sent_log: deque[SentRecord] = deque(maxlen=10_000)

    # --- lifecycle --------------------------------------------------------------------------
    async def start(
        self, owner_id: int | None = None, *, other_own: frozenset[int] = frozenset()
    ) -> None:
        """Pick up what a previous run left open: re-queue unfinished generations, re-arm
        deferred replies and reconcile interrupted sends. Everything resumed waits a full
        debounce first, so a burst still arriving after the restart is answered as one.
        ``other_own``: the owner's other accounts (their chats are never answered)."""
        if owner_id is not None:
            self.owner_id = owner_id
        self.other_own = frozenset(other_own)
        if self.owner_id is None:
            raise ValueError("the responder starts once the logged-in account is known")
        open_rows = await replies.with_status(
            self.db, (S.QUEUED, S.DEFERRED, S.GENERATING, S.SENDING)
        )
        now = self._now()
        newest_queued: dict[int, Reply] = {}
        resume: set[int] = set()
        for reply in open_rows:
            state = self._state(reply.chat_id)
            if reply.status is S.DEFERRED:
                self._arm_wakeup(reply.chat_id, reply.not_before)
                continue
            resume.add(reply.chat_id)
            if reply.status is S.SENDING:
                state.recover = reply
                continue
            if reply.status is S.GENERATING:
                await replies.transition(self.db, reply.reply_id, S.GENERATING, S.QUEUED, now=now)
            older = newest_queued.get(reply.chat_id)
            if older is not None:  # one queued reply per chat covers all its messages
                await replies.transition(
                    self.db, older.reply_id, S.QUEUED, S.DROPPED, now=now, error=Skip.SUPERSEDED
                )
            newest_queued[reply.chat_id] = reply
        for chat_id in resume:
            log.info("responder: resuming open replies chat=%d", chat_id)
            await self._sync_last_incoming(self._state(chat_id))
            self._debouncer.touch(chat_id)

    async def catch_up(
        self,
        candidates: Sequence[CatchUpCandidate],
        *,
        first_run_at: float,
        down_since: float,
    ) -> Counter[str]:
        """Answer what arrived while the bot was down (from ``down_since``, the previous
        run's last sign of life), within the catch-up rules (``policy.catch_up_skip``);
        returns what became of those chats."""
        outcome: Counter[str] = Counter()
        now = self._now()
        for c in candidates:
            if c.message.date < down_since:
                continue  # older than the downtime: the previous run saw it
            skip = catch_up_skip(
                message_date=c.message.date,
                now=now,
                first_run_at=first_run_at,
                read_by_owner=c.read_by_owner,
                cfg=self.policy,
            )
            if skip is not None:
                outcome[f"not_answered:{skip}"] += 1
                continue
            queued = await self._on_incoming(c.message, c.peer, catch_up=True)
            outcome["answered" if queued else "not_eligible_or_covered"] += 1
        self.stats.update({f"catch_up:{k}": v for k, v in outcome.items()})
        return outcome

    async def aclose(self) -> None:
        """Stop: no new work, cancel timers, let deliveries in progress finish (up to
        ``settings.daemon.shutdown_grace_s``), cancel the rest and wait for it. Replies cut short
        stay ``generating``/``sending`` in the store and are picked up by the next start."""
        self._closing = True
        self._debouncer.close()
        self._wakeups.close()
        delivering = [
            s.runner
            for s in self._chats.values()
            if s.runner is not None and not s.runner.done() and not s.idle.is_set()
        ]
        if delivering and self.settings.daemon.shutdown_grace_s > 0:
            # A reply half-way out is better finished than resumed by the next start.
            await asyncio.wait(delivering, timeout=self.settings.daemon.shutdown_grace_s)
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Until no timer is armed and no task runs (tests and benchmarks; wrap it in
        ``asyncio.timeout``)."""
        while True:
            if not self.busy:
                return
            await asyncio.sleep(0.005)  # polling: idleness spans timers and tasks

    @property
    def busy(self) -> bool:
        """A debounce timer is armed or a task runs (deferred replies waiting for their
        window do not count: they may wait for hours)."""
        return bool(len(self._debouncer) or self._tasks)

    # --- input from the Telegram adapter ----------------------------------------------------
    async def on_message(self, message: Message, peer: Peer) -> None:
        """A new message in a chat (already written to the store by the adapter). Never
        raises: a failure here must not stop the update loop."""
        if self._closing:
            return
        try:
            if message.is_outgoing:
                await self._on_outgoing(message)
            else:
                await self._on_incoming(message, peer)
        except Exception as exc:
            log.error(
                "responder: message not handled chat=%d msg=%d: %s",
                message.chat_id,
                message.message_id,
                describe(exc),
            )

    async def _on_incoming(self, message: Message, peer: Peer, *, catch_up: bool = False) -> bool:
        """Queue (or extend) the chat's reply for ``message``; True when it did."""
        reason = eligibility(message, peer, self.owner_id, self.policy, self.other_own)
        if reason is not None:
            log.debug("responder: ignored chat=%d reason=%s", message.chat_id, reason)
            return False
        if not catch_up and self._now() - message.date > max(
            self.policy.catch_up_max_age_s, CLOCK_SKEW_S
        ):
            # An old message delivered as if new (an update replayed late): the start-up
            # catch-up decides about those, never the live path.
            log.info("responder: not answering an old message chat=%d", message.chat_id)
            return False
        chat_id = message.chat_id
        mode = await self._mode(chat_id)
        if mode is ReplyMode.OFF:
            return False
        state = self._state(chat_id)
        state.peer = peer
        state.last_incoming_id = max(state.last_incoming_id, message.message_id)
        state.last_arrival = self.clock.monotonic()
        queued = await replies.queue_for_chat(
            self.db,
            chat_id=chat_id,
            mode=mode,
            trigger_message_id=message.message_id,
            now=self._now(),
            unless_covered=True,
        )
        if queued is None:
            log.debug("responder: already answered chat=%d msg=%d", chat_id, message.message_id)
            return False
        if await replies.deferred_for_chat(self.db, chat_id) is None:
            self._debouncer.touch(chat_id)
        return True

    async def _on_outgoing(self, message: Message) -> None:
        if message.chat_id == self.owner_id:
            return  # Saved Messages: the review's business, never a takeover
        state = self._chats.get(message.chat_id)
        if state is None:
            # Nothing pending or remembered here; the stored message alone keeps the chat
            # silent for the takeover window (the gate reads it). Nothing was sent here by
            # this run either, so it is the owner's.
            await self._notify_owner_message(message)
            return
        if message.message_id in state.own_ids:
            return
        if not state.idle.is_set():
            # The update for our own send can arrive before send_message returns its id.
            self._spawn(self._classify_after_send(state, message))
            return
        await self._takeover(message)

    async def _classify_after_send(self, state: _Chat, message: Message) -> None:
        await state.idle.wait()
        if message.message_id in state.own_ids:
            return
        if message.message_id in await replies.bot_message_ids(self.db, message.chat_id):
            return
        await self._takeover(message)

    async def _takeover(self, message: Message) -> None:
        """The owner wrote in this chat: drop what is queued; the gate keeps the chat silent
        for ``takeover_minutes`` (it reads the owner's messages from the store)."""
        chat_id = message.chat_id
        self._debouncer.cancel(chat_id)
        queued = await replies.queued_for_chat(self.db, chat_id)
        if queued is not None:
            await self._drop(queued.reply_id, S.QUEUED, Skip.TAKEOVER, chat_id)
        log.info("responder: owner took over chat=%d", chat_id)
        await self._notify_owner_message(message)

    async def _notify_owner_message(self, message: Message) -> None:
        for hook in self.on_owner_message:
            try:
                await hook(message)
            except Exception as exc:
                log.warning(
                    "responder: owner-message hook failed chat=%d: %s",
                    message.chat_id,
                    describe(exc),
                )

    # --- scheduling -------------------------------------------------------------------------
    def _state(self, chat_id: int) -> _Chat:
        state = self._chats.get(chat_id)
        if state is None:
            state = self._chats[chat_id] = _Chat(chat_id)
        return state

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _schedule(self, chat_id: int) -> None:
        """The debounce fired (or a restart found open work): make sure the chat's runner
        runs once more."""
        if self._closing:
            return
        state = self._state(chat_id)
        state.pending = True
        if state.runner is None or state.runner.done():
            state.runner = self._spawn(self._run_chat(state))

    async def _run_chat(self, state: _Chat) -> None:
        while (state.pending or state.recover) and not self._closing:
            state.pending = False
            try:
                async with state.lock:
                    if state.recover is not None:
                        reply, state.recover = state.recover, None
                        await self._reconcile(state, reply)
                    await self._process(state)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the dispatch boundary: one reply's error stays there
                self.stats["errors"] += 1
                log.error("responder: reply failed chat=%d: %s", state.chat_id, describe(exc))

    # --- one reply --------------------------------------------------------------------------
    async def _process(self, state: _Chat) -> None:
        chat_id = state.chat_id
        reply = await replies.queued_for_chat(self.db, chat_id)
        if reply is None:
            return
        peer = state.peer or await history.get_peer(self.db, chat_id)
        if peer is None:
            await self._drop(reply.reply_id, S.QUEUED, Skip.UNKNOWN_PEER, chat_id)
            return
        state.peer = peer
        mode = await self._mode(chat_id)
        reason = chat_eligibility(peer, self.owner_id, self.policy, self.other_own)
        if reason is None and mode is ReplyMode.OFF:
            reason = Skip.MODE_OFF
        if reason is None:
            reason = await self._gate(chat_id)
        if reason is None and peer.kind is PeerKind.GROUP:
            reason = group_dice(peer, self.policy, self.rng.random())
        if reason in DEFER_REASONS:
            await self._defer(reply.reply_id, S.QUEUED, reason, chat_id)
            return
        if reason is not None:
            await self._drop(reply.reply_id, S.QUEUED, reason, chat_id)
            return
        await self._generate(state, reply.reply_id, S.QUEUED, mode)

    async def _generate(
        self, state: _Chat, reply_id: int, frm: ReplyStatus, mode: ReplyMode
    ) -> None:
        chat_id = state.chat_id
        async with self._gen_slots:
            messages = await history.recent_messages(self.db, chat_id, HISTORY_WINDOW)
            if self._unsaved is not None:
                known = {m.message_id for m in messages}
                messages += [m for m in self._unsaved(chat_id) if m.message_id not in known]
            # A voice note counts with what it said, as in the training set.
            messages = await transcripts.attach(self.db, messages)
            newest_incoming = max((m.message_id for m in messages if not m.is_outgoing), default=0)
            state.last_incoming_id = max(state.last_incoming_id, newest_incoming)
            snapshot = state.last_incoming_id
            peer = state.peer or await history.get_peer(self.db, chat_id)
            peer = peer or Peer(chat_id, PeerKind.USER)
            try:
                context = self._context(messages, int(self._now()) + FUTURE_SKEW_S, peer)
            except Exception as exc:  # a context bug must not leave the reply queued forever
                await self._fail(reply_id, frm, exc)
                log.error("responder: context failed chat=%d: %s", chat_id, describe(exc))
                return
            if not context.answerable:
                await self._drop(reply_id, frm, Skip.NOTHING_TO_ANSWER, chat_id)
                return
            facts = await self.composer.retrieve(context.query)
            try:
                prompt = await self.composer.prompt(context.turns, facts)
            except GenerationError as exc:
                await self._fail(reply_id, frm, exc)
                return
            identity = self.generator.identity
            moved = await self._move(
                reply_id,
                frm,
                S.GENERATING,
                context_message_ids=context.message_ids,
                prompt=prompt,
                model_id=identity.model_id,
                adapter_id=identity.adapter_id,
                mode=mode,
            )
            if not moved:
                return  # dropped meanwhile (takeover, shutdown of a review, …)
            started = self.clock.monotonic()
            try:
                text = await self.generator.generate(prompt, self._options)
                text = await self.composer.finish(context.query, text, facts)
                parts = delivery.split_reply(text, split_lines=self.settings.responder.split_lines)
            except Exception as exc:
                gen_ms = int((self.clock.monotonic() - started) * 1000)
                await self._fail(reply_id, S.GENERATING, exc, generation_ms=gen_ms)
                log.warning(
                    "responder: generation failed chat=%d reply=%d: %s",
                    chat_id,
                    reply_id,
                    describe(exc),
                )
                return
        gen_ms = int((self.clock.monotonic() - started) * 1000)
        text = "\n".join(parts)
        generated = {"draft_text": text, "generated_at": int(self._now()), "generation_ms": gen_ms}
        if state.last_incoming_id > snapshot:
            # Newer messages arrived: one fresh reply answers everything at once.
            if await self._drop(reply_id, S.GENERATING, Skip.STALE, chat_id, **generated):
                await self._requeue(state, ReplyMode(mode))
            return
        mode = await self._mode(chat_id)
        if mode is ReplyMode.OFF:
            await self._drop(reply_id, S.GENERATING, Skip.MODE_OFF, chat_id, **generated)
            return
        if mode is ReplyMode.REVIEW:
            await self._to_review(reply_id, context, generated)
            return
        if await self._claim(chat_id, reply_id, S.GENERATING, final_text=text, **generated):
            log.info(
                "responder: reply generated chat=%d reply=%d gen_ms=%d chars=%d",
                chat_id,
                reply_id,
                gen_ms,
                len(text),
            )
            await self._deliver(state, reply_id, parts, snapshot=snapshot)

    async def _to_review(
        self, reply_id: int, context: LiveContext, generated: dict[str, Any]
    ) -> None:
        moved = await self._move(reply_id, S.GENERATING, S.AWAITING_REVIEW, **generated)
        if not moved:
            return
        self.stats["drafts"] += 1
        reply = await replies.get(self.db, reply_id)
        if self.drafts is None or reply is None:
            if not self._warned_no_drafts:
                self._warned_no_drafts = True
                log.warning(
                    "responder: review mode, but no draft desk: drafts are "
                    "stored as 'awaiting_review' and nothing is sent"
                )
            return
        await self.drafts.draft_ready(reply, context)

    # --- the gate and the send slot ---------------------------------------------------------
    async def _gate(self, chat_id: int, *, with_caps: bool = True) -> Skip | None:
        now = self._now()
        chat_n = glob_n = 0
        if with_caps:
            since = int(now) - HOUR_S
            chat_n = await replies.count_recent_sends(self.db, since, chat_id)
            glob_n = await replies.count_recent_sends(self.db, since)
        inputs = GateInputs(
            now=now,
            paused=await bot_state.is_paused(self.db),
            last_owner_message_at=await self._last_owner_message_at(chat_id),
            chat_sends_last_hour=chat_n,
            global_sends_last_hour=glob_n,
        )
        return gate(inputs, self.policy)

    async def _last_owner_message_at(self, chat_id: int) -> float | None:
        """The newest message the owner wrote in this chat themselves (not the bot) within the
        takeover window. The bot's messages are those a reply recorded as sent; such a reply
        was updated after the message was sent, which keeps the lookup to recent replies."""
        since = int(self._now() - self.policy.takeover_s) - 1
        written = await replies.owner_written_since(
            self.db, chat_id, since, replies_since=since - CLOCK_SKEW_S
        )
        state = self._chats.get(chat_id)
        own = state.own_ids if state is not None else set()
        for message_id, date in written:
            if message_id not in own:
                return float(date)
        return None

    async def _claim(self, chat_id: int, reply_id: int, frm: ReplyStatus, **fields: Any) -> bool:
        """Move the reply to 'sending' if the gate still allows it. The hourly caps are
        counted in the same transaction, so concurrent chats can never overshoot them; a reply
        the gate stops is deferred or dropped (compare-and-set: whoever moves it first wins)."""
        reason = await self._gate(chat_id, with_caps=False)
        now = self._now()
        async with self.db.transaction() as conn:
            if reason is None:
                since = int(now) - HOUR_S
                inputs = GateInputs(
                    now=now,
                    paused=False,
                    last_owner_message_at=None,
                    chat_sends_last_hour=await replies.count_recent_sends_in(conn, since, chat_id),
                    global_sends_last_hour=await replies.count_recent_sends_in(conn, since),
                )
                reason = gate(inputs, self.policy)
            if reason is None:
                return await replies.transition_in(
                    conn, reply_id, frm, S.SENDING, now=int(now), **fields
                )
        fields.pop("final_text", None)
        if reason in DEFER_REASONS:
            await self._defer(reply_id, frm, reason, chat_id, **fields)
        else:
            await self._drop(reply_id, frm, reason, chat_id, **fields)
        return False

    async def _drop(
        self, reply_id: int, frm: ReplyStatus, reason: Skip, chat_id: int, **fields: Any
    ) -> bool:
        moved = await self._move(reply_id, frm, S.DROPPED, error=str(reason), **fields)
        if moved:
            self._count_drop(reason, chat_id, reply_id)
        return moved

    async def _requeue(self, state: _Chat, mode: ReplyMode) -> None:
        """After a stale drop: make sure a queued reply covers the newer messages (the newer
        message may have updated the very reply that was just dropped) and that it runs."""
        await replies.queue_for_chat(
            self.db,
            chat_id=state.chat_id,
            mode=mode,
            trigger_message_id=state.last_incoming_id,
            now=int(self._now()),
            unless_covered=True,
        )
        if not self._debouncer.pending(state.chat_id):
            state.pending = True

    # --- deferral ---------------------------------------------------------------------------
    async def _defer_time(self, reason: Skip, chat_id: int) -> float:
        now = self._now()
        since = int(now) - HOUR_S
        chat_times: list[int] = []
        global_times: list[int] = []
        if reason is Skip.CHAT_CAP:
            chat_times = await replies.recent_send_times(self.db, since, chat_id)
        elif reason is Skip.GLOBAL_CAP:
            global_times = await replies.recent_send_times(self.db, since)
        at = defer_until(
            reason,
            now,
            self.policy,
            chat_send_times=chat_times,
            global_send_times=global_times,
        )
        if reason is Skip.QUIET_HOURS:
            # Not everyone at the very minute the quiet hours end: that looks like a robot.
            at += self.rng.uniform(0, QUIET_END_SPREAD_S)
        return at

    async def _move(self, reply_id: int, frm: ReplyStatus, to: ReplyStatus, **fields: Any) -> bool:
        """Compare-and-set one reply's status, stamped now (False: it had moved on already)."""
        return await replies.transition(self.db, reply_id, frm, to, now=self._now(), **fields)

    async def _fail(
        self, reply_id: int, frm: ReplyStatus, exc: BaseException, **fields: Any
    ) -> None:
        """The reply cannot be made: ``failed``, with why (never with foreign texts)."""
        await self._move(reply_id, frm, S.FAILED, error=describe(exc), **fields)
        self.stats["failed"] += 1

    async def _defer(
        self, reply_id: int, frm: ReplyStatus, reason: Skip, chat_id: int, **fields: Any
    ) -> bool:
        not_before = await self._defer_time(reason, chat_id)
        moved = await self._move(
            reply_id,
            frm,
            S.DEFERRED,
            error=str(reason),
            not_before=int(not_before),
            **fields,
        )
        if moved:
            self._count_defer(reason, chat_id, reply_id, not_before)
        return moved

    def _count_defer(self, reason: Skip, chat_id: int, reply_id: int, not_before: float) -> None:
        self.stats[f"deferred:{reason}"] += 1
        log.info(
            "responder: reply deferred chat=%d reply=%d reason=%s for %.0fs",
            chat_id,
            reply_id,
            reason,
            not_before - self._now(),
        )
        self._arm_wakeup(chat_id, not_before)

    def _arm_wakeup(self, chat_id: int, not_before: float | None) -> None:
        if self._closing:
            return
        delay = max(0.0, (not_before or 0) - self._now())
        self._wakeups.touch(chat_id, delay)

    def _wake(self, chat_id: int) -> None:
        if not self._closing:
            self._spawn(self._resume_deferred(chat_id))

    async def _resume_deferred(self, chat_id: int, *, force: bool = False) -> None:
        """A deferred reply's window opened: queue it again (it is generated from the history
        of now), or drop it when what it answers has grown too old."""
        state = self._state(chat_id)
        async with state.lock:
            reply = await replies.deferred_for_chat(self.db, chat_id)
            if reply is None:
                return
            now = self._now()
            if not force and reply.not_before is not None and reply.not_before > now + 0.5:
                self._arm_wakeup(chat_id, reply.not_before)  # woken early (clock change)
                return
            max_age = self.policy.catch_up_max_age_s
            trigger = await history.get_message(self.db, chat_id, reply.trigger_message_id)
            if max_age > 0 and trigger is not None and now - trigger.date > max_age:
                await self._drop(reply.reply_id, S.DEFERRED, Skip.TOO_OLD, chat_id)
                return
            await replies.transition(
                self.db, reply.reply_id, S.DEFERRED, S.QUEUED, now=now, error=None, not_before=None
            )
            log.info("responder: deferred reply=%d is due chat=%d", reply.reply_id, chat_id)
        self._schedule(chat_id)

    def _count_drop(self, reason: Skip, chat_id: int, reply_id: int) -> None:
        self.stats[f"dropped:{reason}"] += 1
        log.info("responder: reply dropped chat=%d reply=%d reason=%s", chat_id, reply_id, reason)

    # --- delivery ---------------------------------------------------------------------------
    async def _deliver(
        self,
        state: _Chat,
        reply_id: int,
        parts: Sequence[str],
        *,
        snapshot: int | None,
        start: int = 0,
        pause: bool = True,
        approved: bool = False,
    ) -> bool:
        """Send ``parts[start:]`` of a reply that is in 'sending'. ``snapshot``: the newest
        incoming message the reply answers — a newer one before the first part makes it
        stale (None: do not check). ``approved``: the owner said so explicitly, so only
        staleness can still stop it (not the kill switch, quiet hours or takeover). Returns
        whether everything was sent."""
        chat_id = state.chat_id
        delays = 0.0
        sent_any = start > 0
        state.idle.clear()
        try:
            if pause:
                wait = delivery.human_delay(
                    self.rng,
                    self.settings.responder.human_delay_min_s,
                    self.settings.responder.human_delay_max_s,
                )
                delays += wait
                await self.clock.sleep(wait)
            for index in range(start, len(parts)):
                part = parts[index]
                delays += await self._type(chat_id, part)
                if not sent_any:
                    # Last look before anything goes out: the owner may have taken over, the
                    # kill switch may be on, or newer messages made the reply stale.
                    reason = await self._last_look(state, snapshot, gated=not approved)
                    if reason in DEFER_REASONS:
                        await self._defer(reply_id, S.SENDING, reason, chat_id)
                        return False
                    if reason is not None:
                        dropped = await self._drop(reply_id, S.SENDING, reason, chat_id)
                        if dropped and reason is Skip.STALE:
                            await self._requeue(state, await self._mode(chat_id))
                        return False
                message = await self._send(chat_id, part)
                sent_any = True
                state.own_ids.add(message.message_id)
                if len(state.own_ids) > 256:  # only the recent ones matter; the store has all
                    state.own_ids = set(sorted(state.own_ids)[-128:])
                now = int(self._now())
                async with self.db.transaction() as conn:
                    await replies.add_sent_id_in(conn, reply_id, message.message_id, now=now)
                    await history.upsert_messages_in(conn, [message])
            await self._move(reply_id, S.SENDING, S.SENT, sent_at=int(self._now()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = describe(exc) + (" (partly sent)" if sent_any else "")
            await self._move(reply_id, S.SENDING, S.FAILED, error=error)
            self.stats["failed"] += 1
            log.warning("responder: send failed chat=%d reply=%d: %s", chat_id, reply_id, error)
            return False
        finally:
            state.idle.set()
        latency = (
            self.clock.monotonic()
            - state.last_arrival
            - delays
            - self.settings.responder.debounce_s
        )
        self.sent_log.append(SentRecord(reply_id, chat_id, max(0.0, latency)))
        self.stats["sent"] += 1
        log.info("responder: reply sent chat=%d reply=%d parts=%d", chat_id, reply_id, len(parts))
        await self._notify_sent(reply_id)
        return True

    async def _last_look(
        self, state: _Chat, snapshot: int | None, *, gated: bool = True
    ) -> Skip | None:
        """Right before the first part goes out: still wanted?"""
        if snapshot is not None and state.last_incoming_id > snapshot:
            return Skip.STALE
        return await self._gate(state.chat_id, with_caps=False) if gated else None

    async def _type(self, chat_id: int, text: str) -> float:
        seconds = delivery.typing_seconds(
            text, self.settings.responder.typing_chars_per_s, self.settings.responder.typing_max_s
        )
        if seconds <= 0:
            return 0.0
        remaining = seconds
        while remaining > 0:
            try:
                await self.transport.set_typing(chat_id, True)
            except Exception as exc:  # cosmetic: never worth losing the reply over
                log.debug("responder: typing failed chat=%d: %s", chat_id, describe(exc))
            step = min(remaining, delivery.TYPING_REFRESH_S)
            await self.clock.sleep(step)
            remaining -= step
        return seconds

    async def _send(self, chat_id: int, text: str) -> Message:
        bound = self.settings.export.flood_wait_max_s
        waited = 0
        while True:
            try:
                return await self.transport.send_message(chat_id, text)
            except FloodWaitError as exc:
                if waited + exc.seconds > bound:
                    raise FloodWaitTooLongError(exc.seconds, bound, "message") from None
                log.warning(
                    "responder: flood wait %ds before sending chat=%d", exc.seconds, chat_id
                )
                waited += exc.seconds
                await self.clock.sleep(exc.seconds)

    async def _notify_sent(self, reply_id: int) -> None:
        if not self.on_sent:
            return
        reply = await replies.get(self.db, reply_id)
        if reply is None:
            return
        for hook in self.on_sent:
            try:
                await hook(reply)
            except Exception as exc:
                log.warning("responder: sent-hook failed reply=%d: %s", reply_id, describe(exc))

    # --- recovery after a restart -----------------------------------------------------------
    async def _reconcile(self, state: _Chat, reply: Reply) -> None:
        """A reply a previous run left in 'sending': find which of its parts reached the chat
        (never trusting memory), record them, and send only what is missing — unless newer
        messages made it stale, in which case a fresh reply is queued instead."""
        chat_id = state.chat_id
        text = reply.final_text or reply.draft_text or ""
        try:
            parts = delivery.split_reply(text, split_lines=self.settings.responder.split_lines)
        except DoppelbotError:
            await self._move(reply.reply_id, S.SENDING, S.FAILED, error="no text")
            return
        sent = list(reply.sent_message_ids)
        min_id = max([reply.trigger_message_id, *sent])
        try:
            outgoing = await self.transport.recent_outgoing(chat_id, min_id=min_id)
        except Exception as exc:
            # Unknown whether it went out: sending now could send twice. Keep it for later.
            log.warning(
                "responder: cannot check chat=%d for reply=%d (%s); it stays 'sending' until "
                "the next start",
                chat_id,
                reply.reply_id,
                describe(exc),
            )
            return
        known = await replies.bot_message_ids(self.db, chat_id)
        index = len(sent)
        found: list[Message] = []
        for message in sorted(outgoing, key=lambda m: m.message_id):
            if index >= len(parts) or message.message_id in known:
                continue
            if message.text.strip() == parts[index]:
                found.append(message)
                index += 1
        now = int(self._now())
        if found:
            async with self.db.transaction() as conn:
                for message in found:
                    await replies.add_sent_id_in(conn, reply.reply_id, message.message_id, now=now)
                await history.upsert_messages_in(conn, found)
            state.own_ids.update(m.message_id for m in found)
        if index >= len(parts):
            await replies.transition(
                self.db, reply.reply_id, S.SENDING, S.SENT, now=now, sent_at=now
            )
            self.stats["reconciled"] += 1
            log.info("responder: reply=%d was already sent chat=%d", reply.reply_id, chat_id)
            await self._notify_sent(reply.reply_id)
            return
        snapshot = _answers_up_to(reply)
        await self._sync_last_incoming(state)
        if index == 0 and state.last_incoming_id > snapshot:
            # Newer messages arrived while we were down: this reply answers too little.
            await self._drop(reply.reply_id, S.SENDING, Skip.STALE, chat_id)
            await self._requeue(state, reply.mode)
            return
        log.info(
            "responder: resuming interrupted send chat=%d reply=%d parts=%d/%d",
            chat_id,
            reply.reply_id,
            index,
            len(parts),
        )
        state.last_arrival = self.clock.monotonic()
        # A review reply in 'sending' was approved by the owner: their word still stands.
        await self._deliver(
            state,
            reply.reply_id,
            parts,
            snapshot=snapshot if index == 0 else None,
            start=index,
            pause=False,
            approved=reply.mode is ReplyMode.REVIEW,
        )

    # --- for the owner's review ---------------------------------------------------------------
    async def send_approved(
        self, reply_id: int, text: str | None = None, *, on_claim: ClaimHook | None = None
    ) -> Approval:
        """Send a reviewed draft (``text`` replaces it: a correction). The owner's explicit
        approval wins over the caps, quiet hours and the kill switch; a draft that newer
        messages made stale is still refused. ``on_claim`` runs inside the transaction that
        moves the draft on (to 'sending', or 'dropped' when stale): the owner's verdict is
        recorded there, so no crash can lose it. The chat's order is kept."""
        reply = await replies.get(self.db, reply_id)
        if reply is None:
            return Approval.NOT_WAITING
        parts = delivery.split_reply(
            text if text is not None else (reply.draft_text or ""),
            split_lines=self.settings.responder.split_lines,
        )
        final = "\n".join(parts)
        state = self._state(reply.chat_id)
        async with state.lock:
            await self._sync_last_incoming(state)
            snapshot = _answers_up_to(reply)
            stale = state.last_incoming_id > snapshot
            now = self._now()
            # A newer message makes the draft stale: dropped, with the owner's text kept.
            to, why = (S.DROPPED, {"error": str(Skip.STALE)}) if stale else (S.SENDING, {})
            async with self.db.transaction() as conn:
                moved = await replies.transition_in(
                    conn, reply_id, S.AWAITING_REVIEW, to, now=int(now), final_text=final, **why
                )
                if moved and on_claim is not None:
                    await on_claim(conn, final)
            if not moved:
                return Approval.NOT_WAITING
            if stale:
                self._count_drop(Skip.STALE, reply.chat_id, reply_id)
                await self._requeue(state, ReplyMode.REVIEW)
                return Approval.STALE
            state.last_arrival = self.clock.monotonic()
            sent = await self._deliver(
                state, reply_id, parts, snapshot=snapshot, pause=False, approved=True
            )
        if sent:
            return Approval.SENT
        after = await replies.get(self.db, reply_id)
        if after is not None and after.error == Skip.STALE:
            return Approval.STALE
        return Approval.FAILED

    async def regenerate(self, reply_id: int) -> None:
        """Generate a new draft for a reply awaiting review (the owner said "again")."""
        reply = await replies.get(self.db, reply_id)
        if reply is None or reply.status is not S.AWAITING_REVIEW:
            return
        state = self._state(reply.chat_id)
        async with state.lock:
            await self._generate(state, reply_id, S.AWAITING_REVIEW, ReplyMode.REVIEW)

    # --- helpers ----------------------------------------------------------------------------
    def _now(self) -> float:
        return self.clock.time()

    async def _sync_last_incoming(self, state: _Chat) -> None:
        """What the store knows is the newest incoming message (after a restart the memory
        starts empty; the catch-up has stored what arrived meanwhile)."""
        newest = await history.newest_incoming_id(self.db, state.chat_id)
        if newest is not None:
            state.last_incoming_id = max(state.last_incoming_id, newest)

    async def _mode(self, chat_id: int) -> ReplyMode:
        override = await bot_state.chat_reply_mode(self.db, chat_id)
        if override is not None:
            return override
        # ``/mode MODE`` in Saved Messages changes the default at runtime (stored).
        return await bot_state.global_reply_mode(self.db) or ReplyMode(
            self.settings.responder.reply_mode
        )

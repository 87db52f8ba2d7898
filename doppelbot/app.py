"""The composition root of ``doppelbot run``: every object of the running bot is built here, once.

``build_bot`` makes each service with its collaborators passed in — nothing is wired afterwards —
and ``App.run`` starts them in the one order that loses nothing after a restart, and stops them
in the reverse one::

    Telegram updates ─▶ LiveBot ─▶ MessageWriter (SQLite)
                          │ ├────▶ Responder ─▶ ReplyGenerator (model worker thread)
                          │ │         │  ├───▶ FactRetriever (knowledge base)
                          │ │         │  └───▶ TelethonTransport ─▶ the chat
                          │ │         ├─ drafts, sent replies ─▶ DraftDesk ─▶ Saved Messages
                          │ │         └─ the owner writing in a chat ─▶ FeedbackCapture
                          │ └─ Saved Messages notes, reactions on cards ─▶ OwnerNotes
                          │                       (approve/correct/drop via the Responder)
                          └─ reactions on sent replies ─▶ FeedbackCapture
    Watchdog: is Telegram still talking to us (health record, exit when it is not)

The objects themselves know nothing of each other beyond the small interfaces they are given
(``ports``, ``DraftSink``, ``Approver``, listeners), so each is tested alone; this module is
where they meet, and ``serve`` adds the process around them: the instance lock, signals, the
model and speech workers, the knowledge base and the Telegram connection.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from doppelbot.accounts import account_scope, login_hint, settings_for
from doppelbot.config import Settings
from doppelbot.core.errors import NotLoggedInError
from doppelbot.core.ports import FactRetriever, ReplyGenerator, Transcriber
from doppelbot.dataset.budget import CountTokens
from doppelbot.feedback.capture import FeedbackCapture
from doppelbot.health import Health, State
from doppelbot.instance import InstanceLock
from doppelbot.model.local import model_source
from doppelbot.responder.compose import ReplyComposer
from doppelbot.responder.conversation import Conversation
from doppelbot.responder.loopmon import LoopLagMonitor
from doppelbot.responder.service import Responder
from doppelbot.review.drafts import DraftDesk
from doppelbot.review.owner import OwnerNotes
from doppelbot.review.owner_commands import OWNER_COMMANDS
from doppelbot.speech import TranscriptionWorker
from doppelbot.speech.model import whisper_spec
from doppelbot.store import accounts as own_accounts
from doppelbot.store import bot_state, history
from doppelbot.store.database import Database
from doppelbot.store.writer import MessageWriter

if TYPE_CHECKING:
    from rich.console import Console

    from doppelbot.telegram.catchup import CatchUpReport
    from doppelbot.telegram.live import LiveBot, TelethonTransport
    from doppelbot.telegram.watchdog import Watchdog

log = logging.getLogger("doppelbot.live")

#: How often the event loop's responsiveness is sampled (``status`` and benchmarks read it).
LOOP_SAMPLE_S = 0.05


@dataclass
class App:
    """The running bot's services, and what its start learned."""

    settings: Settings
    db: Database
    client: Any
    writer: MessageWriter
    transport: TelethonTransport
    responder: Responder
    drafts: DraftDesk | None  # None: no review (a bare responder, in tests)
    notes: OwnerNotes | None
    capture: FeedbackCapture
    bot: LiveBot
    monitor: LoopLagMonitor
    watchdog: Watchdog
    catch_up: CatchUpReport | None = None  # what the start-up sync found
    #: The previous run's last sign of life (None: the first run here).
    down_since: float | None = None

    async def run(
        self, stop: asyncio.Event, *, on_ready: Callable[[App], Awaitable[None]] | None = None
    ) -> App:
        """Run on the connected, authorised client until ``stop`` is set; raises
        ``TelegramOutageError`` when Telegram stays unreachable past the watchdog's limit (the
        process then exits non-zero). ``on_ready`` runs once everything has started, before
        the catch-up answers anything (tests and benchmarks hook in there)."""
        from doppelbot.telegram.client import logged_in_account

        self.bot.install()  # a client connected by the caller: from now on at least
        account = await logged_in_account(self.client)
        owner = account.user_id
        # Refused when this Telegram user is another own account (or this account another
        # user): one bot must never answer from, or write into, another account's history.
        await own_accounts.claim(self.db, account)
        others = frozenset(await own_accounts.own_user_ids(self.db)) - {owner}
        previous = Health.from_json(await bot_state.get_json(self.db, bot_state.HEALTH_KEY))
        self.transport.start(owner)
        await self.watchdog.beat()
        first_run = await bot_state.first_run_at(self.db, int(self.bot.clock.time()))
        self.monitor.start()
        checker: asyncio.Task[None] | None = None
        try:
            await self._start(owner, previous, others)
            if on_ready is not None:
                await on_ready(self)
            await self._catch_up(first_run, previous)
            log.info(
                "live: running as user %d, mode=%s, debounce=%.1fs",
                owner,
                self.settings.responder.reply_mode,
                self.settings.responder.debounce_s,
            )
            checker = asyncio.ensure_future(self.watchdog.run())
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({checker, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                await asyncio.gather(stopped, return_exceptions=True)
            if checker.done() and not checker.cancelled() and checker.exception() is not None:
                raise checker.exception()  # type: ignore[misc]
        finally:
            if checker is not None and not checker.done():
                checker.cancel()
                await asyncio.gather(checker, return_exceptions=True)
            await self._stop()
        return self

    async def _start(self, owner: int, previous: Health | None, others: frozenset[int]) -> None:
        """The store learns what happened while the bot was down before anything acts on it
        (a resumed reply is checked against the real history); the owner's notes written
        meanwhile are applied before any draft can expire, and before live notes."""
        from doppelbot.telegram.catchup import sync_after_downtime

        saved_seen = await bot_state.get_int(self.db, bot_state.SAVED_SEEN_KEY)
        self.catch_up = await sync_after_downtime(
            self.client, self.db, owner_id=owner, stores=self.bot.stores, saved_seen=saved_seen
        )
        # The previous run's last sign of life (a crash happens after its last heartbeat):
        # what arrived since then is what this start has to catch up with.
        if previous is not None:
            self.down_since = previous.heartbeat_at - 2 * previous.interval_s
        await self.responder.start(owner, other_own=others)
        await self.capture.start(owner)
        if self.drafts is not None and self.notes is not None:
            if self.down_since is not None:
                await self.drafts.refresh_since(self.down_since)
            await self.notes.start(
                owner, self.catch_up.saved_backlog, saved_top_id=self.catch_up.saved_top_id
            )
            await self.drafts.start()
        # Events that came while starting (kept by the bot) are handled now.
        await self.bot.start(owner)

    async def _catch_up(self, first_run: int, previous: Health | None) -> None:
        since = self.down_since if previous is not None else float(first_run)
        report = self.catch_up
        assert since is not None and report is not None
        for candidate in report.candidates:
            chat_id = candidate.peer.peer_id
            notes = await history.voice_notes_since(self.db, chat_id, int(since))
            await self.bot.transcribe_recent(chat_id, notes)
        outcome = await self.responder.catch_up(
            report.candidates, first_run_at=first_run, down_since=since
        )
        await self.bot.caught_up(report.tops)
        summary = {**report.summary(), **outcome, "at": int(self.bot.clock.time())}
        await bot_state.set_json(self.db, bot_state.CATCH_UP_KEY, summary)
        log.info(
            "live: caught up: %d chat(s) synced, %d message(s) stored, %d chat(s) answered, "
            "%d not (too old or read elsewhere)",
            report.chats_synced,
            report.messages_stored,
            outcome.get("answered", 0),
            sum(v for k, v in outcome.items() if k.startswith("not_answered")),
        )

    async def _stop(self) -> None:
        """Events first, then replies in flight (their cards are still kept current), then
        the rest; a reply cut short stays recorded and the next start resumes it."""
        await self.bot.aclose()
        if self.notes is not None:
            self.notes.close()
        await self.responder.aclose()
        if self.drafts is not None:
            await self.drafts.aclose()
        await self.writer.aclose()
        await self.monitor.stop()
        if self.watchdog.health.state is not State.FAILED:
            await self.watchdog.beat(State.STOPPED, detail="stopped")
        log.info(
            "live: stopped (sent=%d, loop lag p99=%.0f ms)",
            self.responder.stats["sent"],
            self.monitor.percentile(99) * 1000,
        )


def build_bot(
    settings: Settings,
    db: Database,
    client: Any,
    *,
    generator: ReplyGenerator,
    facts: FactRetriever | None = None,
    transcriber: Transcriber | None = None,
    count_tokens: CountTokens | None = None,
    review: bool = True,
) -> App:
    """Every service of the running bot, each built once with its collaborators.

    The Telegram adapters are imported here, not at the top: they load telethon, which
    ``doppelbot chat`` and the training commands do not need.

    ``count_tokens`` keeps prompts within ``max_input_tokens`` (None: no budget check, for
    generators without a tokenizer); ``review`` False leaves out the Saved Messages review
    (a bare responder, for tests)."""
    from doppelbot.telegram.live import LiveBot, TelethonTransport
    from doppelbot.telegram.saved import TelethonSavedMessages
    from doppelbot.telegram.watchdog import Watchdog

    writer = MessageWriter(db)
    transport = TelethonTransport(client)
    drafts = (
        DraftDesk(
            settings,
            db,
            TelethonSavedMessages(client, flood_bound=settings.export.flood_wait_max_s),
        )
        if review
        else None
    )
    capture = FeedbackCapture(settings, db)
    responder = Responder(
        settings,
        db,
        transport=transport,
        generator=generator,
        composer=ReplyComposer(settings, facts=facts, count_tokens=count_tokens),
        drafts=drafts,
        on_sent=() if drafts is None else (drafts.on_sent,),
        on_owner_message=(capture.on_owner_message,),
        unsaved=writer.unsaved_in,
    )
    notes = (
        None
        if drafts is None
        else OwnerNotes(settings, db, drafts, approver=responder, commands=OWNER_COMMANDS)
    )
    bot = LiveBot(
        client,
        db,
        settings,
        writer=writer,
        responder=responder,
        listeners=() if notes is None else (notes.on_saved_message,),
        reaction_listeners=(
            (capture.on_reactions,) if notes is None else (notes.on_reactions, capture.on_reactions)
        ),
        transcriber=transcriber,
    )
    watchdog = Watchdog(
        client,
        bot,
        settings.daemon,
        record=lambda h: bot_state.set_json(db, bot_state.HEALTH_KEY, h.to_json()),
    )
    return App(
        settings,
        db,
        client,
        writer,
        transport,
        responder,
        drafts,
        notes,
        capture,
        bot,
        LoopLagMonitor(interval_s=LOOP_SAMPLE_S),
        watchdog,
    )


async def run_live(
    settings: Settings,
    db: Database,
    client: Any,
    *,
    stop: asyncio.Event,
    on_ready: Callable[[App], Awaitable[None]] | None = None,
    **services: Any,
) -> App:
    """Build the bot on a connected client (``services``: ``build_bot``'s keywords) and run it
    until ``stop`` (tests, benchmarks)."""
    return await build_bot(settings, db, client, **services).run(stop, on_ready=on_ready)


def _install_signals(stop: asyncio.Event) -> list[int]:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            # First signal: stop cleanly. The handler is removed then, so a second Ctrl+C
            # interrupts for real if a clean stop hangs.
            def handler(s: int = sig) -> None:
                log.info("run: signal %s received, stopping", signal.Signals(s).name)
                stop.set()
                loop.remove_signal_handler(s)

            loop.add_signal_handler(sig, handler)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread/Windows
            pass
    return installed


async def serve(
    settings: Settings,
    console: Console,
    *,
    client: Any = None,
    generator: ReplyGenerator | None = None,
    facts: FactRetriever | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[App], Awaitable[None]] | None = None,
    account: str | None = None,
) -> App:
    """The whole ``doppelbot run``: one process per own account (its instance lock), the
    workers and the connection around the app, until SIGINT/SIGTERM or ``stop``. ``account``:
    the own account to answer as (None: the default one). Tests pass a fake-Telegram
    ``client``, a small ``generator`` and their own ``stop``."""

    settings = settings_for(settings, account)
    if (
        client is None
        and settings.telegram.session_string is None
        and not settings.session_path.exists()
    ):
        raise NotLoggedInError(f"not logged in to Telegram: run {login_hint(account)} first")
    with InstanceLock(settings.lock_path):
        if generator is None:
            # Without the model files, say so before anything else (one line, at once).
            model_source(settings.model.base, settings.store.data_dir)
        stop = stop or asyncio.Event()
        signals = _install_signals(stop)
        try:
            return await _serve(
                settings,
                console,
                client=client,
                generator=generator,
                facts=facts,
                stop=stop,
                on_ready=on_ready,
                account=account,
            )
        finally:
            loop = asyncio.get_running_loop()
            for sig in signals:
                loop.remove_signal_handler(sig)


async def _serve(
    settings: Settings,
    console: Console,
    *,
    client: Any,
    generator: ReplyGenerator | None,
    facts: FactRetriever | None,
    stop: asyncio.Event,
    on_ready: Callable[[App], Awaitable[None]] | None,
    account: str | None,
) -> App:
    from doppelbot.knowledge.lazy import knowledge_for
    from doppelbot.telegram.client import connected, create_client

    async with AsyncExitStack() as stack:
        # Closed in reverse: the connection, the knowledge base, the workers, the store.
        db = await Database.open(settings.store.db_path)
        stack.push_async_callback(db.close)
        db = await stack.enter_async_context(account_scope(db, settings, account, "session"))
        speech: Any = None
        if settings.voice.transcription:
            speech = TranscriptionWorker(whisper_spec(settings))  # loads on the first note
            stack.push_async_callback(speech.aclose)
        worker: Any = None
        count_tokens: CountTokens | None = None
        if generator is None:
            from doppelbot.model.worker import model_worker

            worker = model_worker(settings)  # loads once connected (below)
            stack.push_async_callback(worker.aclose)
            generator, count_tokens = worker, worker.token_counter()
        kb: Any = None
        if facts is None:
            kb = facts = knowledge_for(settings, db)
            if kb is not None:
                stack.push_async_callback(kb.aclose)
        client = client or create_client(settings, catch_up=True)
        app = build_bot(
            settings,
            db,
            client,
            generator=generator,
            facts=facts,
            transcriber=speech,
            count_tokens=count_tokens,
        )
        # The handlers go in before connecting (Telethon replays missed updates at once; the
        # bot keeps them until it starts), and the connection is made before the slow loads
        # below, so a session or network problem is said at once.
        await stack.enter_async_context(
            connected(
                settings, client=client, before_connect=lambda _: app.bot.install(), locked=True
            )
        )
        if worker is not None:
            with console.status("Loading the reply model…"):
                await worker.start()
        if kb is not None:
            with console.status("Loading the knowledge base…"):
                await kb.warm()
        if settings.responder.reply_mode == "review":
            console.print(
                "reply_mode=review: drafts go to your Saved Messages; reply ok / no / again "
                "or your own text to a card (/help there lists the commands)."
            )
        console.print("doppelbot is running; Ctrl+C stops it.")
        return await app.run(stop, on_ready=on_ready)


@dataclass
class ChatSession:
    """What ``doppelbot chat`` talks through: the bot's own reply path and model."""

    conversation: Conversation
    worker: Any  # the model worker (its identity and model info are shown)
    facts_on: bool


@asynccontextmanager
async def open_chat(
    settings: Settings,
    *,
    adapter: Any,
    max_turns: int,
    greedy: bool,
    use_facts: bool,
    progress: Any = None,
) -> AsyncIterator[ChatSession]:
    """The model worker (with ``adapter``), the knowledge base when there are facts, and a
    conversation answered through the bot's ``ReplyComposer``; closed on exit."""
    from doppelbot.knowledge.lazy import knowledge_for
    from doppelbot.model.worker import model_worker

    options = settings.generation
    if greedy:
        options = replace(options, do_sample=False)
    async with AsyncExitStack() as stack:
        worker = model_worker(settings, adapter=adapter, progress=progress)
        stack.push_async_callback(worker.aclose)
        await worker.start()
        kb = None
        # No database yet (nothing exported): no facts, and none is created just for chat.
        if use_facts and settings.store.db_path.exists():
            db = await Database.open(settings.store.db_path)
            stack.push_async_callback(db.close)
            kb = knowledge_for(settings, db)
            if kb is not None:
                stack.push_async_callback(kb.aclose)
                await kb.warm()
        composer = ReplyComposer(settings, facts=kb, count_tokens=worker.token_counter())
        yield ChatSession(
            Conversation(worker, composer, options, max_turns=max_turns),
            worker,
            facts_on=kb is not None and kb.loaded,
        )

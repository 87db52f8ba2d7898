"""``doppelbot run`` (the userbot) and ``doppelbot status``.

``run`` takes the data directory's instance lock, connects with the stored session, starts the
model worker and the knowledge base, and hands over to ``doppelbot.telegram.live.run_live``
until SIGINT/SIGTERM; then it stops in order (events → replies in flight → knowledge base →
model worker → Telegram → database), so a reply cut short stays recorded and the next start
resumes it. It exits non-zero when Telegram stays unreachable past the watchdog's limit, so a
supervisor restarts it. ``status`` reads only the database (and who holds the lock): it works
while the bot runs, ``--pause``/``--resume`` flip the kill switch the running bot reads before
every reply, and ``--health`` exits non-zero unless the bot runs and is healthy.

Heavy modules (telethon, torch) are imported inside the functions only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import signal
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from doppelbot.cli.common import open_db, run_async, state

if TYPE_CHECKING:
    from doppelbot.config import Settings
    from doppelbot.ports import FactRetriever, ReplyGenerator
    from doppelbot.review.workflow import ReviewWorkflow
    from doppelbot.store.database import Database
    from doppelbot.telegram.live import LiveSession

log = logging.getLogger("doppelbot.run")


def run(ctx: typer.Context) -> None:
    """Answer incoming private messages in your voice until Ctrl+C / SIGTERM."""
    st = state(ctx)
    settings = st.settings
    run_async(serve(settings, st.err_console))


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


class _LazyFacts:
    """A ``FactRetriever`` that opens the knowledge base once there is a fact to retrieve.

    Without facts at start the embedder is not loaded at all (a bot without facts never pays
    for it); the first ``/fact`` in Saved Messages (or ``doppelbot facts add``) is picked up by
    the next reply, which opens the knowledge base then — once."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self._settings = settings
        self._db = db
        self._kb: Any = None
        self._failed = False
        self._lock = asyncio.Lock()

    async def _get(self) -> Any:
        if self._kb is not None or self._failed:
            return self._kb
        async with self._lock:
            if self._kb is None and not self._failed:
                from doppelbot.store.facts import count_facts

                if not await count_facts(self._db):
                    return None
                from doppelbot.errors import DoppelbotError
                from doppelbot.knowledge.knowledge_base import KnowledgeBase

                log.info("run: the first fact arrived: loading the knowledge base")
                try:
                    self._kb = await KnowledgeBase.open(self._settings, self._db)
                except DoppelbotError as exc:
                    self._failed = True
                    log.warning("run: knowledge base unavailable (%s): answering without", exc)
        return self._kb

    async def retrieve(
        self, query: str, *, top_k: int | None = None, threshold: float | None = None
    ) -> list[Any]:
        kb = await self._get()
        return [] if kb is None else await kb.retrieve(query, top_k=top_k, threshold=threshold)

    async def similarity(self, query: str, candidates: Any) -> list[float]:
        kb = await self._get()
        if kb is None:
            return [0.0 for _ in candidates]
        return list(await kb.similarity(query, candidates))

    async def aclose(self) -> None:
        if self._kb is not None:
            await self._kb.aclose()


async def _open_facts(settings: Settings, db: Database, console: Console) -> Any:
    """The knowledge base, or None when it cannot load (the bot then answers without facts
    rather than not at all). Without facts yet: a lazy one that opens on the first fact."""
    if settings.facts_top_k == 0 and not settings.fact_fallback:
        return None
    from doppelbot.store.facts import count_facts

    if not await count_facts(db):
        log.info("run: no facts yet (`/fact` in Saved Messages or `doppelbot facts add`)")
        return _LazyFacts(settings, db)
    from doppelbot.errors import DoppelbotError
    from doppelbot.knowledge.knowledge_base import KnowledgeBase

    try:
        with console.status("Loading the knowledge base…"):
            return await KnowledgeBase.open(settings, db)
    except DoppelbotError as exc:
        log.warning("run: knowledge base unavailable (%s): answering without facts", exc)
        return None


def _token_counter(settings: Settings, worker: Any) -> Any:
    """Counts prompt tokens so contexts are trimmed to ``max_input_tokens`` (oldest turns
    first) exactly as in the dataset; None when no tokenizer is at hand."""
    from doppelbot.errors import DoppelbotError
    from doppelbot.model.local import model_source
    from doppelbot.model.tokenizer import TokenCounter, load_tokenizer

    tokenizer = getattr(worker, "tokenizer", None)
    try:
        return TokenCounter(
            tokenizer or load_tokenizer(model_source(settings.model, settings.data_dir))
        )
    except DoppelbotError as exc:
        log.warning("run: no tokenizer for the prompt budget (%s)", exc)
        return None


def _review_sink(settings: Settings, db: Database) -> ReviewWorkflow:
    """The review workflow (Saved Messages cards, owner commands, feedback capture); it is
    attached to the running bot in ``on_ready``."""
    from doppelbot.review.workflow import ReviewWorkflow

    return ReviewWorkflow(settings, db)


async def serve(
    settings: Settings,
    console: Console,
    *,
    client: Any = None,
    generator: ReplyGenerator | None = None,
    facts: FactRetriever | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Any = None,
    responder_kwargs: dict[str, Any] | None = None,
) -> LiveSession:
    """The whole ``run``; tests pass a fake-Telegram ``client``, a small ``generator``, their
    own ``stop`` event and responder options."""
    from doppelbot.errors import NotLoggedInError
    from doppelbot.instance import InstanceLock

    if client is None and settings.session_string is None and not settings.session_path.exists():
        raise NotLoggedInError("not logged in to Telegram: run `doppelbot login` first")
    with InstanceLock(settings.lock_path):
        if generator is None:
            from doppelbot.model.local import model_source

            # Without the model files, say so before touching Telegram (one line, at once).
            model_source(settings.model, settings.data_dir)
        return await _serve(
            settings,
            console,
            client=client,
            generator=generator,
            facts=facts,
            stop=stop,
            on_ready=on_ready,
            responder_kwargs=responder_kwargs,
        )


async def _serve(
    settings: Settings,
    console: Console,
    *,
    client: Any,
    generator: ReplyGenerator | None,
    facts: FactRetriever | None,
    stop: asyncio.Event | None,
    on_ready: Any,
    responder_kwargs: dict[str, Any] | None,
) -> LiveSession:
    from doppelbot.telegram.client import connected, create_client
    from doppelbot.telegram.live import LiveBot, run_live

    stop = stop or asyncio.Event()
    signals = _install_signals(stop)
    worker: Any = None
    kb: Any = None
    responder_kwargs = dict(responder_kwargs or {})
    bot: Any = None

    speech: Any = None
    if settings.voice_transcription:
        from doppelbot.speech import TranscriptionWorker

        speech = TranscriptionWorker.from_settings(settings)  # loads on the first note

    def listen_early(tg: Any) -> None:
        # Handlers go in before connecting: Telethon replays missed updates right away.
        nonlocal bot
        bot = LiveBot(tg, db, settings, transcriber=speech)
        bot.install()

    try:
        async with (
            open_db(settings) as db,
            connected(
                settings,
                client=client,
                make_client=lambda: create_client(settings, catch_up=True),
                before_connect=listen_early,
                locked=True,
            ) as tg,
        ):
            if generator is None:
                from doppelbot.model.worker import ModelWorker

                with console.status("Loading the reply model…"):
                    worker = ModelWorker.from_settings(settings)
                    await worker.start()
                generator = worker
                responder_kwargs["count_tokens"] = _token_counter(settings, worker)
            if facts is None:
                kb = facts = await _open_facts(settings, db, console)
            from doppelbot.telegram.review import attach_review

            workflow = _review_sink(settings, db)

            async def ready(session: LiveSession) -> None:
                await attach_review(session, workflow)
                if on_ready is not None:
                    await on_ready(session)

            if settings.reply_mode == "review":
                console.print(
                    "reply_mode=review: drafts go to your Saved Messages; reply ok / no / again "
                    "or your own text to a card (/help there lists the commands)."
                )
            console.print("doppelbot is running; Ctrl+C stops it.")
            try:
                return await run_live(
                    settings,
                    db,
                    tg,
                    generator=generator,
                    facts=facts,
                    stop=stop,
                    drafts=workflow,
                    on_ready=ready,
                    responder_kwargs=responder_kwargs,
                    bot=bot,
                )
            finally:
                await workflow.aclose()
                if speech is not None:
                    await speech.aclose()
                if kb is not None:
                    await kb.aclose()
                if worker is not None:
                    await worker.aclose()
    finally:
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.remove_signal_handler(sig)


# --- status -------------------------------------------------------------------------------------
def status(
    ctx: typer.Context,
    pause: bool = typer.Option(
        False, "--pause", help="Turn the kill switch on: the bot (even a running one) stays silent."
    ),
    resume: bool = typer.Option(False, "--resume", help="Turn the kill switch off again."),
    last: int = typer.Option(10, "--last", min=0, help="How many recent replies to list."),
    texts: bool = typer.Option(
        False, "--texts", help="Also show reply texts (private: off by default)."
    ),
    health: bool = typer.Option(
        False,
        "--health",
        help="Only check health: one line, exit 0 when `doppelbot run` runs and is healthy, "
        "1 otherwise (a Docker healthcheck).",
    ),
) -> None:
    """Health, pause state, reply counts, deferred and last replies (reads the database)."""
    st = state(ctx)
    settings = st.settings
    if pause and resume:
        raise typer.BadParameter("--pause and --resume exclude each other")
    if health:
        healthy, line = run_async(_health(settings))
        st.console.print(f"{'healthy' if healthy else 'unhealthy'}: {line}", markup=False)
        raise typer.Exit(0 if healthy else 1)
    run_async(_status(settings, st.console, pause=pause, resume=resume, last=last, texts=texts))


async def _health(settings: Settings) -> tuple[bool, str]:
    import time

    from doppelbot.health import Health, verdict
    from doppelbot.instance import holder_of
    from doppelbot.store import bot_state

    holder = holder_of(settings.lock_path)
    if not settings.db_path.exists():
        return False, "not running: no database yet"
    async with open_db(settings) as db:
        record = Health.from_json(await bot_state.get_json(db, bot_state.HEALTH_KEY))
    return verdict(record, holder, time.time())


def _when(ts: int | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


async def _status(
    settings: Settings, console: Console, *, pause: bool, resume: bool, last: int, texts: bool
) -> None:
    from doppelbot.domain import ReplyStatus
    from doppelbot.health import Health, verdict
    from doppelbot.health import when as when_ts
    from doppelbot.instance import holder_of
    from doppelbot.store import bot_state, replies
    from doppelbot.store.database import now

    holder = holder_of(settings.lock_path)
    async with open_db(settings) as db:
        if pause or resume:
            await bot_state.set_paused(db, pause)
        paused = await bot_state.is_paused(db)
        since = await bot_state.paused_since(db)
        runtime_mode = await bot_state.global_reply_mode(db)
        counts = await replies.count_by_status(db)
        hour_ago = now() - 3600
        sent_hour = await replies.count_recent_sends(db, hour_ago)
        recent = await replies.last_replies(db, last)
        deferred = await replies.deferred_replies(db)
        health = Health.from_json(await bot_state.get_json(db, bot_state.HEALTH_KEY))
        catch_up = await bot_state.get_json(db, bot_state.CATCH_UP_KEY)

    healthy, line = verdict(health, holder, now())
    colour = "green" if healthy else ("yellow" if holder else "red")
    console.print(f"Health: [bold {colour}]{'healthy' if healthy else 'unhealthy'}[/] — {line}")
    if health is not None:
        console.print(
            f"Started {when_ts(health.started_at)} (pid {health.pid}) · last update received "
            f"{when_ts(health.last_update_at)} · last heartbeat {when_ts(health.heartbeat_at)}"
            f" · reconnects {health.reconnects}"
        )
    if catch_up:
        answered = catch_up.get("answered", 0)
        old = sum(v for k, v in catch_up.items() if k.startswith("not_answered"))
        reasons = ", ".join(
            f"{k.removeprefix('not_answered:')} {v}"
            for k, v in sorted(catch_up.items())
            if k.startswith("not_answered")
        )
        console.print(
            f"Last catch-up {when_ts(catch_up.get('at'))}: "
            f"{catch_up.get('messages_stored', 0)} message(s) stored from "
            f"{catch_up.get('chats_synced', 0)} chat(s), {answered} chat(s) answered, "
            f"{old} stored only" + (f" ({reasons})" if reasons else "")
        )

    state_line = (
        f"[bold red]PAUSED[/] since {_when(since)} (resume: doppelbot status --resume)"
        if paused
        else "[bold green]active[/]"
    )
    console.print(f"Bot: {state_line}")
    quiet = settings.quiet_hours or "off"
    mode = (
        f"{runtime_mode.value} (set by /mode in Saved Messages)"
        if runtime_mode
        else settings.reply_mode
    )
    console.print(
        f"Mode: {mode} · debounce {settings.debounce_s:g}s · quiet hours {quiet}"
        f" · takeover {settings.takeover_minutes:g} min"
    )
    console.print(
        f"Sent in the last hour: {sent_hour} (global cap {settings.global_hourly_cap}, "
        f"per chat {settings.per_chat_hourly_cap})"
    )
    summary = " · ".join(f"{s.value} {counts[s]}" for s in ReplyStatus if counts[s])
    console.print(f"Replies: {summary or 'none yet'}")
    if deferred:
        table = Table(title=f"Deferred replies ({len(deferred)})", title_justify="left")
        for col in ("id", "chat", "why", "tries again at"):
            table.add_column(col, justify="right" if col == "id" else "left")
        for row in deferred:
            r = row.reply
            table.add_row(
                str(r.reply_id), row.chat_name or str(r.chat_id), r.error or "", _when(r.not_before)
            )
        console.print(table)
    if not recent:
        return
    table = Table(title=f"Last {len(recent)} replies", title_justify="left")
    for col in ("id", "when", "chat", "status", "mode", "gen ms", "note"):
        table.add_column(col, justify="right" if col in ("id", "gen ms") else "left")
    if texts:
        table.add_column("text")
    for row in recent:
        r = row.reply
        note = r.error or (f"{len(r.sent_message_ids)} msg" if r.sent_message_ids else "")
        cells = [
            str(r.reply_id),
            _when(r.sent_at or r.updated_at),
            row.chat_name or str(r.chat_id),
            r.status.value,
            r.mode.value,
            str(row.generation_ms) if row.generation_ms is not None else "-",
            note,
        ]
        if texts:
            cells.append(r.final_text or r.draft_text or "")
        table.add_row(*cells)
    console.print(table)

"""Benchmark: many chats writing at once to the live bot.

Why: ``doppelbot run`` must answer every chat exactly once however bursty the traffic is, and
its single event loop must stay responsive meanwhile (a blocked loop delays every chat). Here
50 chats × 10 messages arrive within one second through the fake Telegram (real Telethon
client, update loop and requests; only the MTProto sender is replaced) into the real live
adapter, responder and SQLite store, with a tiny random FRED-T5-shaped model in the real model
worker thread generating every reply.

Measured: ``replies_sent`` (chats answered), ``duplicates`` (chats that got more than one
reply, plus sent messages no reply accounts for), ``loop_lag_p99_ms`` (how late a 10 ms timer
fires, sampled during the whole run) and ``p50_reply_latency_s`` (newest message of a chat →
its last part sent, minus the configured debounce/human delay/typing time).
Targets: replies_sent == chats, duplicates == 0, loop_lag_p99_ms < 50.

Then a downtime phase: the bot stops; while it is down, ``--down-old`` chats send a burst,
the downtime goes on past the catch-up age (``--down-age`` seconds, the bench's
``DOPPELBOT_CATCH_UP_MAX_AGE``), and ``--down-fresh`` more chats send a burst. The bot starts
again (the same file session, so Telethon's own catch-up replays the missed updates too) and
must answer exactly the fresh bursts, once each: ``caught_up_answered`` == ``down_fresh``,
``caught_up_stored_only`` == ``down_old``, ``duplicates`` 0 over both phases.

Usage: ``flock /tmp/doppelbot-bench.lock .venv/bin/python scripts/bench_responder.py
[--chats 50] [--messages 10] [--debounce 1.0] [--generator tiny|echo] [--no-review]``. ``echo``
replaces the model by an instant fake (isolates the pipeline's own cost). The bot runs as
``doppelbot run`` builds it, review included (in auto mode every sent reply is copied to the
owner's Saved Messages: ``cards_posted``); ``--no-review`` runs the responder alone. Prints a
table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class EchoGenerator:
    """An instant stand-in for the model (``--generator echo``)."""

    @property
    def identity(self) -> Any:
        from doppelbot.core.ports import ModelIdentity

        return ModelIdentity("echo")

    async def generate(self, prompt: str, options: Any) -> str:
        await asyncio.sleep(0)
        return "ок, понял тебя"


async def _tiny_worker(settings_kw: dict[str, Any], workdir: Path) -> Any:
    from doppelbot.config import load_settings
    from doppelbot.model.worker import model_worker
    from tests.tiny_model import make_tiny_model_dir

    model_dir = make_tiny_model_dir(workdir / "tiny-model")
    settings = load_settings(env_file=None, **{**settings_kw, "model": str(model_dir)})
    worker = model_worker(settings)
    await worker.start()
    return worker


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from telethon.sessions import SQLiteSession

    from doppelbot.app import App, run_live
    from doppelbot.config import load_settings
    from doppelbot.core.domain import ReplyStatus
    from doppelbot.responder.loopmon import LoopLagMonitor
    from doppelbot.store import replies
    from doppelbot.store.database import Database
    from tests.faketg import FakeTelegram

    workdir = Path(tempfile.mkdtemp(prefix="bench-responder-"))
    settings_kw: dict[str, Any] = {
        "data_dir": workdir / "data",
        "reply_mode": "auto",
        "debounce_s": args.debounce,
        "human_delay_min_s": 0.0,
        "human_delay_max_s": 0.0,
        "typing_chars_per_s": 1000.0,
        "typing_max_s": 0.0,
        "per_chat_hourly_cap": 100,
        "global_hourly_cap": 10_000,
        "max_new_tokens": args.max_new_tokens,
        "do_sample": False,
        "split_lines": False,
        "catch_up_max_age": args.down_age,
    }
    settings = load_settings(env_file=None, **settings_kw)
    if args.generator == "tiny":
        generator = await _tiny_worker(settings_kw, workdir)
    else:
        generator = EchoGenerator()
    db = await Database.open(settings.store.db_path)
    tg = FakeTelegram()
    users = [tg.add_user(f"Contact{i}", username=f"contact{i}") for i in range(args.chats)]
    session_file = workdir / "data" / "bench.session"
    tg.file_session(session_file)

    async def start() -> tuple[Any, asyncio.Event, asyncio.Task[Any], App]:
        client = tg.client(
            session=SQLiteSession(str(session_file)), flood_sleep_threshold=0, catch_up=True
        )
        await client.connect()
        stop = asyncio.Event()
        ready: asyncio.Future[App] = asyncio.get_running_loop().create_future()

        async def on_ready(session: App) -> None:
            ready.set_result(session)

        task = asyncio.create_task(
            run_live(
                settings,
                db,
                client,
                generator=generator,
                stop=stop,
                on_ready=on_ready,
                review=not args.no_review,
            )
        )
        return client, stop, task, await ready

    async def settle(client: Any, session: App) -> None:
        async def calm() -> bool:
            await tg.settle()
            return (
                session.bot._synced is not None
                and not client._event_handler_tasks
                and not session.bot._inflight
                and not session.responder.busy
            )

        async with asyncio.timeout(args.limit_s):
            while True:
                if await calm() and await calm():
                    break
                await asyncio.sleep(0.02)

    client, stop, task, session = await start()
    monitor = LoopLagMonitor(interval_s=0.01)
    monitor.start()
    started = time.perf_counter()
    gap = 1.0 / args.messages
    for i in range(args.messages):  # every chat writes a message every `gap`: all within 1 s
        for user in users:
            tg.push_incoming(user, f"сообщение {i}: как у тебя дела сегодня?")
        await asyncio.sleep(gap)
    arrived = time.perf_counter() - started

    await settle(client, session)
    total = time.perf_counter() - started
    await monitor.stop()
    stop.set()
    await task
    await client.disconnect()
    latencies = [r.latency_s for r in session.responder.sent_log]

    # --- downtime -----------------------------------------------------------------------------
    old = [tg.add_user(f"Old{i}") for i in range(args.down_old)]
    fresh = [tg.add_user(f"Fresh{i}") for i in range(args.down_fresh)]
    for user in old:
        for i in range(3):
            tg.push_incoming(user, f"пока тебя не было {i}")
    await asyncio.sleep(args.down_age + 0.5)  # the downtime outlasts the catch-up age
    for user in fresh:
        for i in range(3):
            tg.push_incoming(user, f"ты где? {i}")
    restarted = time.perf_counter()
    client, stop, task, session = await start()
    await settle(client, session)
    catch_up_s = time.perf_counter() - restarted
    stop.set()
    await task
    await client.disconnect()

    per_chat_sent: dict[int, int] = {}
    accounted: set[int] = set()
    for user in [*users, *old, *fresh]:
        rows = await replies.for_chat(db, user.id)
        sent_rows = [r for r in rows if r.status is ReplyStatus.SENT]
        per_chat_sent[user.id] = len(sent_rows)
        for r in sent_rows:
            accounted.update(r.sent_message_ids)
    statuses = await replies.count_by_status(db)
    await db.close()
    if hasattr(generator, "aclose"):
        await generator.aclose()
    # Auto replies are copied to the owner's Saved Messages (cards to correct them later):
    # those are the review's, one per sent reply; anything else unaccounted is a stray send.
    owner_chat = tg.me.id
    cards = sum(1 for s in tg.sent if s.chat_id == owner_chat)
    stray = sum(1 for s in tg.sent if s.chat_id != owner_chat and s.message_id not in accounted)
    duplicates = sum(n - 1 for n in per_chat_sent.values() if n > 1) + stray
    return {
        "chats": args.chats,
        "messages_per_chat": args.messages,
        "generator": args.generator,
        "replies_sent": sum(1 for u in users if per_chat_sent[u.id] >= 1),
        "duplicates": duplicates,
        "messages_sent": len(tg.sent) - cards,
        "review": not args.no_review,
        "cards_posted": cards,
        "dropped": statuses[ReplyStatus.DROPPED],
        "failed": statuses[ReplyStatus.FAILED],
        "loop_lag_p50_ms": round(monitor.percentile(50) * 1000, 2),
        "loop_lag_p99_ms": round(monitor.percentile(99) * 1000, 2),
        "loop_lag_max_ms": round(monitor.max * 1000, 2),
        "p50_reply_latency_s": round(statistics.median(latencies), 3) if latencies else None,
        "max_reply_latency_s": round(max(latencies), 3) if latencies else None,
        "arrival_window_s": round(arrived, 3),
        "total_s": round(total, 2),
        "debounce_s": args.debounce,
        "down_fresh": args.down_fresh,
        "down_old": args.down_old,
        "caught_up_answered": sum(1 for u in fresh if per_chat_sent[u.id] >= 1),
        "caught_up_stored_only": sum(1 for u in old if per_chat_sent[u.id] == 0),
        "catch_up_s": round(catch_up_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--debounce", type=float, default=1.0)
    parser.add_argument("--generator", choices=("tiny", "echo"), default="tiny")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--limit-s", type=float, default=300.0)
    parser.add_argument(
        "--no-review",
        action="store_true",
        help="The responder alone: no copies of auto replies in Saved Messages.",
    )
    parser.add_argument("--down-fresh", type=int, default=20, help="Bursts within the age.")
    parser.add_argument("--down-old", type=int, default=10, help="Bursts older than the age.")
    parser.add_argument("--down-age", type=float, default=3.0, help="Catch-up age, seconds.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(bench(args))

    from rich.console import Console
    from rich.table import Table

    table = Table(title="responder benchmark")
    table.add_column("metric")
    table.add_column("value", justify="right")
    targets = {
        "replies_sent": f"== {args.chats}",
        "duplicates": "== 0",
        "loop_lag_p99_ms": "< 50",
        "caught_up_answered": f"== {args.down_fresh}",
        "caught_up_stored_only": f"== {args.down_old}",
    }
    for key, value in result.items():
        label = f"{key} (target {targets[key]})" if key in targets else key
        table.add_row(label, str(value))
    Console(stderr=True).print(table)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

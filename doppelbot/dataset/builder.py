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
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from doppelbot.dataset import quality
from doppelbot.dataset.budget import CountTokens, count_many, surely_fits
from doppelbot.dataset.options import DatasetOptions
from doppelbot.dataset.render import MemoPromptFormat
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
from doppelbot.dataset.sessions import pick_window, segment_chat, window_turns
from doppelbot.dataset.split import split_by_time
from doppelbot.dataset.stats import ChatStats, DatasetStats, summarize
from doppelbot.domain import Sample, Turn
from doppelbot.errors import DatasetError

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages: "chats", "tokens"."""

# A candidate before it becomes a Sample (tuples: cheap to make by the hundred thousand).
_Candidate = tuple[
    int,  # chat_id
    tuple[Turn, ...],  # context, oldest first
    str,  # reply
    int,  # reply date
    tuple[int, ...],  # source (context) message ids
    tuple[int, ...],  # reply message ids
    tuple[int, ...],  # messages per context turn
    tuple[int, ...],  # first date per context turn
]

TOKEN_BATCH = 512


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
        self._counters = new_counters()
        self._scrubber = make_scrubber(options)
        self._clean = make_cleaner(options, self._counters, self._scrubber)
        self._candidates: list[_Candidate] = []
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
        opts = self.options
        clean = self._clean
        if self._scrubber is not None and not opts.keep_names:
            pattern = name_pattern(source.names)
            clean = make_cleaner(opts, self._counters, self._scrubber.with_names(pattern))
        tl = segment_chat(source.rows, opts, clean)
        tl.finish(opts.dedup_near)
        stats = self.stats
        stats.sessions += len(tl.session_starts)
        stats.turns += tl.n_turns
        chat = stats.per_chat.setdefault(
            source.chat_id, ChatStats(source.chat_id, source.name or str(source.chat_id))
        )
        chat.messages += len(source.rows)
        chat.kept_messages += len(tl.ids)
        stats.messages_read += len(source.rows)
        stats.messages_kept += len(tl.ids)

        chat_id = source.chat_id
        starts = tl.turn_starts
        n_turns = len(starts)
        n_msgs = len(tl.ids)
        ids = tuple(tl.ids)  # slices of a tuple are the id tuples the samples keep
        dates, texts, norms = tl.dates, tl.texts, tl.norms
        turn_outs = tl.turn_outs
        turns, turn_texts, turn_norms = tl.turns, tl.turn_texts, tl.turn_norms
        turn_sizes, turn_dates = tl.turn_sizes, tl.turn_dates
        quote_turns = tl.quote_turns if opts.include_reply_to else set()
        max_chars = opts.context_max_chars
        dedup_exact, dedup_near = opts.dedup_exact, opts.dedup_near
        seen_exact, seen_near = self._seen_exact, self._seen_near
        dropped = self._dropped
        out = self._candidates
        append = out.append
        before = len(out)
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
                    dropped["context_too_long"] += 1
                    continue
                lo, j, quote = window
                if j >= 0:  # only the newest messages of the last turn fit
                    ctx = window_turns(tl, last, window)
                    key_texts: tuple[object, ...] = (ctx[0].text,)
                    key_norms: tuple[object, ...] = (" ".join(norms[j:rs]),)
                    src = ids[j:rs]
                    sizes: tuple[int, ...] = (rs - j,)
                    first_dates: tuple[int, ...] = (dates[j],)
                else:
                    ctx = turns[lo:k]
                    key_texts = turn_texts[lo:k]
                    key_norms = turn_norms[lo:k]
                    src = ids[starts[lo] : rs]
                    sizes = turn_sizes[lo:k]
                    first_dates = turn_dates[lo:k]
                    if quote >= 0:
                        ctx = window_turns(tl, last, window)
                        q_out = ctx[0].role
                        key_texts = ((q_out, texts[quote]), *key_texts)
                        key_norms = ((q_out, norms[quote]), *key_norms)
                        src = (ids[quote], *src)
                        sizes = (1, *sizes)
                        first_dates = (dates[quote], *first_dates)
                reply = turn_texts[k]
                if dedup_exact:
                    key = hash((key_texts, reply))
                    if key in seen_exact:
                        dropped["duplicate_exact"] += 1
                        continue
                    seen_exact.add(key)
                if dedup_near:
                    nkey = hash((key_norms, turn_norms[k]))
                    if nkey in seen_near:
                        dropped["duplicate_near"] += 1
                        continue
                    seen_near.add(nkey)
                re_ = starts[k + 1] if k + 1 < n_turns else n_msgs
                append((chat_id, ctx, reply, dates[rs], src, ids[rs:re_], sizes, first_dates))
        added = len(out) - before
        chat.candidates += added
        self._build_s += time.perf_counter() - started
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
        inputs: list[str] = []
        turns_of: list[tuple[Turn, ...]] = []
        unsure: list[int] = []
        for i, cand in enumerate(cands):
            turns = cand[1]
            text = build_input(turns)
            turns_of.append(turns)
            inputs.append(text)
            if count is not None and not surely_fits(text, max_tokens):
                unsure.append(i)

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
            chat_id, _pairs, reply, reply_date, src, reply_ids, sizes, first_dates = cand
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
        c = self._counters
        stats.messages_dropped = {name: c[idx] for idx, name in DROP_REASONS.items()}
        stats.messages_truncated = c[TRUNCATED]
        stats.stickers_as_emoji = c[STICKER_EMOJI]
        stats.pii_replaced = dict(self._scrubber.counts) if self._scrubber is not None else {}
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
            [sum(len(t.text) for t in s.context) + len(s.context) - 1 for s in everything]
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
) -> DatasetResult:
    """Build the dataset from the SQLite store (read-only; safe beside a running bot)."""
    from doppelbot.store.dataset_reads import (
        account_user_id,
        chat_rows,
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
            chosen = []
            for chat_id, peer in chats:
                reason = chat_skip_reason(chat_id, peer, account_id, options.include_groups)
                if reason is None:
                    chosen.append((chat_id, peer))
                else:
                    stats.chats_skipped[reason] = stats.chats_skipped.get(reason, 0) + 1
            if not chosen:
                raise DatasetError(
                    "no chats to build a dataset from: export your history first "
                    "(`doppelbot export` or `doppelbot import`)"
                    + ("" if options.include_groups or not chats else "; or try --include-groups")
                )
            read_s = time.perf_counter() - started
            for done, (chat_id, peer) in enumerate(chosen, 1):
                started = time.perf_counter()
                rows = chat_rows(conn, chat_id)
                read_s += time.perf_counter() - started
                names: tuple[str | None, ...] = ()
                name = str(chat_id)
                if peer is not None:
                    names = (peer.first_name, peer.last_name, peer.username)
                    name = peer.display_name
                builder.add_chat(ChatSource(chat_id, rows, name, names))
                if progress is not None:
                    progress("chats", done, len(chosen))
            stats.seconds["read"] = round(read_s, 3)
        finally:
            conn.close()
        return builder.finish()

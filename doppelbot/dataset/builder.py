"""The dataset builder: chats → "context → my reply" samples → train/validation.

Pipeline (each stage counted in ``DatasetStats``):

1. per chat (``_ChatMaker.part``; in forked worker processes for big histories): message
   rules, sessions and turns (``sessions.segment``); one candidate per owner turn that answers
   the other person, with the context chosen by ``sessions.pick_window``, and its duplicate
   keys; the chat's dialog lines (the shared prompt format's) joined into one string;
2. merge, strictly in chat id order (``DatasetBuilder._merge``): exact and near duplicates are
   dropped, every other candidate becomes a ``Sample`` whose ``model_input``/``model_target``
   are the ``doppelbot.prompt.PromptFormat`` ones (a slice of the chat's dialog string between
   the format's fixed prefix and suffix); inputs the byte bound cannot clear wait for stage 3;
3. the token budget: those inputs are counted (line by line, ``budget.calibrate``) and lose
   their oldest context turns until they fit in ``max_input_tokens``, or the sample goes;
4. the per-contact cap thins chats that would contribute more than ``max_contact_share``;
5. the time split: the most recent ``validation_share`` is validation.

The builder never imports a tokenizer: ``count_tokens`` is injected (``None`` skips stage 3;
the CLI always passes the real FRED-T5 counter).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sqlite3
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate, chain, compress, islice
from operator import add, attrgetter, is_not, le, sub
from pathlib import Path

from doppelbot.dataset import quality
from doppelbot.dataset.budget import CountTokens, calibrate, count_many, surely_fits
from doppelbot.dataset.options import DatasetOptions
from doppelbot.dataset.render import MemoPromptFormat, line_prefixes, prompt_frame, target_frame
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
from doppelbot.dataset.sessions import ROLES, pick_window, segment_chat
from doppelbot.dataset.split import split_by_time
from doppelbot.dataset.stats import ChatStats, DatasetStats, summarize
from doppelbot.domain import Sample, Turn
from doppelbot.errors import DatasetError
from doppelbot.prompt import fake_turn_pattern

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages: "chats", "tokens"."""

# One candidate sample of a chat, before deduplication: four int64s in ``_ChatPart.candidates``.
# ``lo`` >= 0: the context is the whole turns ``lo:k``; ``lo`` < 0: it is not a run of whole
# turns (a quoted message, or part of one long turn) and ``_ChatPart.explicit[-1 - lo]`` says
# what it is. ``key``/``nkey`` are the exact/near-duplicate keys (64-bit hashes; 0 when off).

# An explicit context: leading (is_owner, text) turns, then whole turns ``lo:k`` (``lo`` = ``k``
# when none), with the source message ids, messages per context turn and first date per turn.
_Explicit = tuple[
    tuple[tuple[int, str], ...], int, tuple[int, ...], tuple[int, ...], tuple[int, ...]
]


def _ints(raw: bytes) -> array[int]:
    values = array("q")
    values.frombytes(raw)
    return values


@dataclass(frozen=True, slots=True)
class _ChatPart:
    """What stage 1 makes of one chat, in a compact form that crosses between processes
    cheaply (int64 arrays as bytes, the dialog lines as one string): made in a worker process
    or in-process, merged in chat order by ``DatasetBuilder._merge`` (which alone deduplicates,
    so the order is all that decides which duplicate survives)."""

    chat_id: int
    messages: int
    kept: int
    sessions: int
    context_too_long: int
    turn_outs: bytes  # 1 = the owner's turn
    # every turn's dialog line (``PromptFormat.dialog_lines``: role prefix + sanitized text),
    # joined by newlines as in a model input; UTF-16 bytes when packed for another process
    # (a quarter of the cost of pickling the str). One slice of it is a context's dialog.
    body: str | bytes
    line_ends: bytes  # where each line ends in ``body`` (int64)
    changed: tuple[tuple[int, str], ...]  # (turn, text) where sanitizing changed the text
    ids: bytes  # kept message ids, time order (int64)
    turn_starts: bytes  # index of each turn's first message in ``ids`` (int64)
    turn_dates: bytes  # each turn's first date (int64)
    candidates: bytes  # four int64s per candidate: lo, k, key, nkey (see above)
    explicit: tuple[_Explicit, ...]


# A kept candidate whose model input the byte bound cannot clear: ``_materialize`` counts its
# tokens (trimming or dropping it) and makes its Sample.
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
LINE_BATCH = 4096
LINE_SUM_MARGIN = 8
"""Inputs whose line-by-line token sum is this close to the limit are also counted whole."""
_TEXT = attrgetter("text")
_CHAT_ID = attrgetter("chat_id")
_CONTEXT = attrgetter("context")
_REPLY = attrgetter("reply")
_MINUS_ONE = (-1).__add__
_PLUS_ONE = (1).__add__
MIN_MESSAGES_PER_WORKER = 50_000
"""Below this many messages per worker process, building in-process is faster than forking."""


def default_workers() -> int:
    """Worker processes for ``build_from_db``: two whenever there are two cores or more, else
    none (in-process). The parent merges the workers' chats (about a third of the work) while
    they go on, so even on two cores two workers beat one process: measured on this project's
    2-core machine, 1M messages took 1.4–1.9× less wall time than in-process."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


@dataclass(frozen=True, slots=True)
class ChatSource:
    """One chat's history for the builder: rows in ``(date, message_id)`` order (see
    ``rules.Row``)."""

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
        self.labels = line_prefixes(options.prompt_format)
        fmt = options.prompt_format
        self.turn_text = fmt.turn_text
        self.fake_turn = fake_turn_pattern(fmt.role_other, fmt.role_owner)

    @property
    def pii(self) -> dict[str, int]:
        return dict(self.scrubber.counts) if self.scrubber is not None else {}

    def part(
        self,
        chat_id: int,
        rows: Sequence[Row],
        names: tuple[str | None, ...] = (),
        *,
        pack: bool = False,
    ) -> _ChatPart:
        """One chat's part; ``pack`` encodes its dialog string for the trip to another
        process."""
        opts = self.options
        clean = self.clean
        if self.scrubber is not None and not opts.keep_names:
            pattern = name_pattern(names)
            clean = make_cleaner(opts, self.counters, self.scrubber.with_names(pattern))
        tl = segment_chat(rows, opts, clean)
        tl.finish(opts.dedup_near, with_turns=False)

        starts = tl.turn_starts
        n_turns = len(starts)
        ids = tuple(tl.ids)  # slices of a tuple are the id tuples an explicit context keeps
        dates, texts, norms = tl.dates, tl.texts, tl.norms
        turn_outs = tl.turn_outs
        turn_texts, turn_norms = tl.turn_texts, tl.turn_norms
        turn_sizes, turn_dates = tl.turn_sizes, tl.turn_dates
        quote_turns = tl.quote_turns if opts.include_reply_to else set()
        max_chars = opts.context_max_chars
        dedup_exact, dedup_near = opts.dedup_exact, opts.dedup_near
        too_long = 0
        cands = array("q")
        push = cands.extend
        explicit: list[_Explicit] = []
        session_starts = tl.session_starts
        across = opts.reply_to_across_sessions
        for s, first in enumerate(session_starts):
            end = session_starts[s + 1] if s + 1 < len(session_starts) else n_turns
            floor = 0 if across else starts[first]
            # turns alternate speakers: every owner turn after the first answers the other
            for k in range(first + 1, end):
                if not turn_outs[k]:
                    continue
                last = k - 1
                quote_from: tuple[int, ...] = ()
                if quote_turns and (k in quote_turns or last in quote_turns):
                    quote_from = tuple(t for t in (k, last) if t in quote_turns)
                window = pick_window(tl, first, last, max_chars, quote_from, floor)
                if window is None:
                    too_long += 1
                    continue
                lo, j, quote = window
                if j >= 0:  # only the newest messages of the last turn fit
                    rs = starts[k]
                    head = ((turn_outs[last], "\n".join(texts[j:rs])),)
                    key_texts: tuple[object, ...] = (head[0][1],)
                    key_norms: tuple[object, ...] = (" ".join(norms[j:rs]),)
                    explicit.append((head, k, ids[j:rs], (rs - j,), (dates[j],)))
                    lo = -len(explicit)
                else:
                    key_texts = turn_texts[lo:k]
                    key_norms = turn_norms[lo:k]
                    if quote >= 0:
                        q_out = tl.out_of(quote)
                        role = ROLES[q_out]
                        key_texts = ((role, texts[quote]), *key_texts)
                        key_norms = ((role, norms[quote]), *key_norms)
                        explicit.append(
                            (
                                ((q_out, texts[quote]),),
                                lo,
                                (ids[quote], *ids[starts[lo] : starts[k]]),
                                (1, *turn_sizes[lo:k]),
                                (dates[quote], *turn_dates[lo:k]),
                            )
                        )
                        lo = -len(explicit)
                # hash() of str is salted per interpreter: the keys are only ever compared
                # with keys from the same process or from forked children (same salt)
                key = hash((key_texts, turn_texts[k])) if dedup_exact else 0
                nkey = hash((key_norms, turn_norms[k])) if dedup_near else 0
                push((lo, k, key, nkey))
        # ``turn_text`` is a strip for a text without "<", double spaces, tabs or a line that
        # reads like a speaker label: strip them all, and do it properly only in the rare
        # chat where the result shows one
        labels = map(self.labels.__getitem__, turn_outs)
        clean = list(map(str.strip, turn_texts))
        lines = list(map(add, labels, clean))
        body = "\n".join(lines)
        joined = "\x00".join(clean)
        if (
            "<" in body
            or "  " in body
            or "\t" in body
            or ("\n" in joined and self.fake_turn.search(joined))
        ):
            clean = list(map(self.turn_text, turn_texts))
            lines = list(map(add, map(self.labels.__getitem__, turn_outs), clean))
            body = "\n".join(lines)
        changed: tuple[tuple[int, str], ...] = ()
        if any(map(is_not, turn_texts, clean)):
            changed = tuple(
                (t, text)
                for t, (text, same) in enumerate(zip(turn_texts, clean, strict=True))
                if text is not same and text != same
            )
        # line t ends at the sum of the lengths (each + its newline) up to it, minus one
        line_ends = array("q", map(_MINUS_ONE, accumulate(map(_PLUS_ONE, map(len, lines)))))
        return _ChatPart(
            chat_id=chat_id,
            messages=len(rows),
            kept=len(ids),
            sessions=len(session_starts),
            context_too_long=too_long,
            turn_outs=bytes(turn_outs),
            body=body.encode("utf-16-le") if pack else body,
            line_ends=line_ends.tobytes(),
            changed=changed,
            ids=array("q", ids).tobytes(),
            turn_starts=array("q", starts).tobytes(),
            turn_dates=array("q", turn_dates).tobytes(),
            candidates=cands.tobytes(),
            explicit=tuple(explicit),
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
        self._fmt = options.prompt_format
        self._frame = prompt_frame(self._fmt)
        self._counters = new_counters()  # from other processes' makers (``add_counts``)
        self._pii: dict[str, int] = {}
        # the samples in candidate order; ``None`` marks one whose input awaits token counting
        # (``_unsure`` holds it): the order is what the contact cap thins by, so it must not
        # depend on which inputs needed counting
        self._samples: list[Sample | None] = []
        self._unsure: list[tuple[int, _Kept]] = []
        self._target_frame = target_frame(self._fmt)
        self._prefix_lengths = tuple(map(len, line_prefixes(self._fmt)))  # other, owner
        # per sample in ``_samples``: context chars and turns, for the stats (``_fill_stats``)
        self._ctx_chars: list[int] = []
        self._ctx_turns: list[int] = []  # -1: the sample was dropped (token budget)
        self._reply_chars: list[int] = []
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

    # --- stages 1–2 ----------------------------------------------------------------------------
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

        outs = part.turn_outs
        body = part.body if isinstance(part.body, str) else part.body.decode("utf-16-le")
        line_ends = _ints(part.line_ends).tolist()
        if len(line_ends) != len(outs) or (line_ends and line_ends[-1] != len(body)):
            raise DatasetError(f"chat {chat_id}: a worker's turns do not add up (a bug)")
        line_starts = [0, *map(_PLUS_ONE, line_ends[:-1])]
        # each turn's text is its line after the role prefix (sanitized), except ``changed``
        text_starts = list(map(add, line_starts, map(self._prefix_lengths.__getitem__, outs)))
        texts = list(map(body.__getitem__, map(slice, text_starts, line_ends)))
        for t, text in part.changed:
            texts[t] = text
        turns = tuple(map(Turn, map(ROLES.__getitem__, outs), texts))
        ids = tuple(_ints(part.ids))
        starts = _ints(part.turn_starts).tolist()
        turn_dates = tuple(_ints(part.turn_dates))
        ends = [*starts[1:], len(ids)]
        turn_sizes = tuple(map(sub, ends, starts))
        explicit = part.explicit
        prefix, suffix = self._frame
        build_input = self._fmt.build_input
        dedup_exact, dedup_near = self.options.dedup_exact, self.options.dedup_near
        seen_exact, seen_near = self._seen_exact, self._seen_near
        out = self._samples
        append = out.append
        unsure = self._unsure
        before = len(out)
        max_tokens = self.options.max_input_tokens
        budget = self.count_tokens is not None
        # a reply turn is the owner's: its line is the owner's prefix + the sanitized text,
        # which is what the target wraps
        target_prefix, target_suffix = self._target_frame
        running = [0, *accumulate(map(len, texts))]
        ctx_chars, ctx_turns = self._ctx_chars, self._ctx_turns
        reply_chars = self._reply_chars
        fields = iter(_ints(part.candidates))
        for lo, k, key, nkey in zip(fields, fields, fields, fields, strict=True):
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
            rs = starts[k]
            plain = lo >= 0
            if plain:
                ctx = turns[lo:k]
                src = ids[starts[lo] : rs]
                text = f"{prefix}{body[line_starts[lo] : line_ends[k - 1]]}{suffix}"
                ctx_chars.append(running[k] - running[lo] + k - lo - 1)
                ctx_turns.append(k - lo)
                first_date = turn_dates[lo]
            else:
                head, lo, src, sizes, first_dates = explicit[-1 - lo]
                ctx = (*(Turn(ROLES[o], t) for o, t in head), *turns[lo:k])
                text = build_input(ctx)
                ctx_chars.append(sum(map(len, map(_TEXT, ctx))) + len(ctx) - 1)
                ctx_turns.append(len(ctx))
                first_date = first_dates[0]
            reply = texts[k]
            reply_chars.append(len(reply))
            if budget and not surely_fits(text, max_tokens):
                if plain:
                    sizes, first_dates = turn_sizes[lo:k], turn_dates[lo:k]
                kept = (chat_id, ctx, reply, turn_dates[k], src, ids[rs : ends[k]], sizes)
                unsure.append((len(out), (*kept, first_dates, text)))
                append(None)
                continue
            # positional: a third cheaper than keywords, for hundreds of thousands of samples
            append(
                Sample(
                    chat_id,
                    ctx,
                    reply,
                    turn_dates[k],
                    first_date,
                    src,
                    ids[rs : ends[k]],
                    text,
                    f"{target_prefix}{body[text_starts[k] : line_ends[k]]}{target_suffix}",
                )
            )
        added = len(out) - before
        chat.candidates += added
        return added

    # --- stages 3–5 -----------------------------------------------------------------------------
    def finish(self) -> DatasetResult:
        opts = self.options
        stats = self.stats
        stats.candidates = len(self._samples)
        stats.seconds["samples"] = round(self._build_s, 3)

        started = time.perf_counter()
        samples = self._materialize()
        stats.seconds["prompts"] = round(time.perf_counter() - started, 3)

        started = time.perf_counter()
        made = len(samples)
        samples = self._apply_cap(samples)
        chats = list(map(_CHAT_ID, samples))
        # merged in chat id order (``build_from_db``/``build_dataset``), each chat in time order
        by_chat = all(map(le, chats, islice(chats, 1, None)))
        train, validation = split_by_time(samples, opts.validation_share, by_chat=by_chat)
        stats.seconds["cap_split"] = round(time.perf_counter() - started, 3)

        self._fill_stats(train, validation, all_made=len(samples) == made)
        return DatasetResult(train, validation, stats)

    def _materialize(self) -> list[Sample]:
        """The samples, with the inputs the byte bound could not clear counted and, when over
        ``max_input_tokens``, trimmed (oldest context turns first) or dropped."""
        count = self.count_tokens
        samples = self._samples
        unsure = self._unsure
        self._samples, self._unsure = [], []
        self._seen_exact.clear()
        self._seen_near.clear()
        token_counts: list[int] = []
        if count is not None and unsure:
            started = time.perf_counter()
            self.stats.token_checked = len(unsure)
            fmt = MemoPromptFormat.of(self._fmt)
            many = getattr(count, "count_many", None)
            shape = calibrate(self._fmt, many) if many is not None else None
            if many is not None and shape is not None:
                fits = self._fit_by_lines(unsure, fmt, many, shape)
            else:
                fits = self._fit_by_inputs(unsure, fmt, count)
            for (at, kept), (cut, n, text) in zip(unsure, fits, strict=True):
                if n < 0:
                    self._dropped["input_too_long"] += 1
                    self._ctx_turns[at] = -1  # no sample
                    continue
                chat_id, ctx, reply, reply_date, src, reply_ids, sizes, first_dates, _ = kept
                if cut:
                    ctx = ctx[cut:]
                    src = src[sum(sizes[:cut]) :]
                    first_dates = first_dates[cut:]
                    self._ctx_chars[at] = sum(map(len, map(_TEXT, ctx))) + len(ctx) - 1
                    self._ctx_turns[at] = len(ctx)
                    self.stats.token_trimmed += 1
                token_counts.append(n)
                samples[at] = Sample(
                    chat_id,
                    ctx,
                    reply,
                    reply_date,
                    first_dates[0],
                    src,
                    reply_ids,
                    text,
                    fmt.build_target(reply),
                )
            self.stats.seconds["token_budget"] = round(time.perf_counter() - started, 3)
        self.stats.input_tokens_counted = summarize(token_counts)
        if unsure:
            return [sample for sample in samples if sample is not None]
        return samples  # type: ignore[return-value]  # no placeholders without unsure inputs

    def _fit_by_inputs(
        self, unsure: list[tuple[int, _Kept]], fmt: MemoPromptFormat, count: CountTokens
    ) -> list[tuple[int, int, str]]:
        """``(turns cut from the front, tokens, model input)`` per candidate (tokens -1: not
        even the newest turn fits), counting every input whole."""
        fits: list[tuple[int, int, str]] = []
        for b in range(0, len(unsure), TOKEN_BATCH):
            batch = unsure[b : b + TOKEN_BATCH]
            counted = count_many(count, [kept[8] for _, kept in batch])
            for (_, kept), n in zip(batch, counted, strict=True):
                fits.append(self._trim_exactly(kept[1], 0, n, kept[8], fmt, count))
            if self.progress is not None:
                self.progress("tokens", min(b + TOKEN_BATCH, len(unsure)), len(unsure))
        return fits

    def _fit_by_lines(
        self,
        unsure: list[tuple[int, _Kept]],
        fmt: MemoPromptFormat,
        count_many_: Callable[[Sequence[str]], list[int]],
        shape: tuple[int, int],
    ) -> list[tuple[int, int, str]]:
        """``_fit_by_inputs``, but each distinct dialog line is counted once and an input's
        tokens are added up from its lines (``budget.calibrate``). Inputs that end up within
        ``LINE_SUM_MARGIN`` tokens of the limit are counted whole as well, so a tokenizer that
        ever merged across a line break could not push one over it."""
        max_tokens = self.options.max_input_tokens
        first, step = shape
        line_tokens: dict[str, int] = {}
        pending: list[str] = []
        for _, kept in unsure:
            for line in fmt.dialog_lines(kept[1]):
                if line not in line_tokens:
                    line_tokens[line] = 0
                    pending.append(line)
        for b in range(0, len(pending), LINE_BATCH):
            batch = pending[b : b + LINE_BATCH]
            line_tokens.update(zip(batch, count_many_(batch), strict=True))
            if self.progress is not None:
                self.progress("tokens", min(b + LINE_BATCH, len(pending)), len(pending))
        count = self.count_tokens
        assert count is not None
        fits: list[tuple[int, int, str]] = []
        for _, kept in unsure:
            ctx = kept[1]
            counts = list(map(line_tokens.__getitem__, fmt.dialog_lines(ctx)))
            total = first + sum(counts) + step * (len(counts) - 1)
            cut = 0
            while total > max_tokens and cut < len(counts) - 1:
                total -= counts[cut] + step
                cut += 1
            if total > max_tokens + LINE_SUM_MARGIN:
                fits.append((cut + 1, -1, ""))  # not even the newest turn fits
                continue
            text = kept[8] if not cut else fmt.build_input(ctx[cut:])
            if total > max_tokens - LINE_SUM_MARGIN:
                fits.append(self._trim_exactly(ctx, cut, count(text), text, fmt, count))
            else:
                fits.append((cut, total, text))
        return fits

    def _trim_exactly(
        self,
        ctx: tuple[Turn, ...],
        cut: int,
        n: int,
        text: str,
        fmt: MemoPromptFormat,
        count: CountTokens,
    ) -> tuple[int, int, str]:
        """From ``ctx[cut:]`` (``n`` tokens, input ``text``), drop the oldest turns until the
        input fits, counting each try whole."""
        max_tokens = self.options.max_input_tokens
        while n > max_tokens:
            cut += 1
            if cut >= len(ctx):
                return cut, -1, ""
            text = fmt.build_input(ctx[cut:])
            n = count(text)
        return cut, n, text

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

    def _fill_stats(
        self, train: list[Sample], validation: list[Sample], *, all_made: bool = False
    ) -> None:
        """The stats of a finished build. ``all_made``: the cap dropped nothing, so the
        samples are exactly those ``_merge`` and ``_materialize`` measured as they made them
        (hundreds of thousands of samples need not be walked again)."""
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
        per_chat = stats.per_chat
        for chat_id, n in Counter(map(_CHAT_ID, validation)).items():
            per_chat[chat_id].validation += n
        ctx_chars, ctx_turns, reply_chars = self._ctx_chars, self._ctx_turns, self._reply_chars
        self._ctx_chars, self._ctx_turns, self._reply_chars = [], [], []
        if all_made:
            if self._dropped["input_too_long"]:
                made = [t >= 0 for t in ctx_turns]
                ctx_chars = list(compress(ctx_chars, made))
                ctx_turns = list(compress(ctx_turns, made))
                reply_chars = list(compress(reply_chars, made))
                for chat_id, n in Counter(map(_CHAT_ID, train)).items():
                    per_chat[chat_id].train += n
            else:
                for chat in per_chat.values():
                    chat.train = chat.candidates - chat.validation
            for chat in per_chat.values():
                chat.samples = chat.train + chat.validation
            stats.context_chars = summarize(ctx_chars)
            stats.context_turns = summarize(ctx_turns)
            stats.reply_chars = summarize(reply_chars)
            stats.chats_used = sum(1 for chat in per_chat.values() if chat.messages)
            return
        for chat_id, n in Counter(map(_CHAT_ID, train)).items():
            per_chat[chat_id].train += n
        for chat in per_chat.values():
            chat.samples = chat.train + chat.validation
        everything = [*train, *validation]
        # lengths over all samples' turns at once, in C-level passes: chars of sample i are the
        # difference of running totals at its first and one-past-last turn, plus the newlines
        contexts = list(map(_CONTEXT, everything))
        n_turns = list(map(len, contexts))
        running = [0, *accumulate(map(len, map(_TEXT, chain.from_iterable(contexts))))]
        bounds = [0, *accumulate(n_turns)]
        chars = map(sub, map(running.__getitem__, bounds[1:]), map(running.__getitem__, bounds))
        stats.context_chars = summarize(list(map(add, chars, map(_MINUS_ONE, n_turns))))
        stats.context_turns = summarize(n_turns)
        stats.reply_chars = summarize(list(map(len, map(_REPLY, everything))))
        stats.chats_used = sum(1 for chat in stats.per_chat.values() if chat.messages)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building: the builder makes millions of small tuples and no
    reference cycles, and each full collection would walk all of them (about 7 % of a 1M-message
    build). Restored afterwards; plain reference counting still frees everything.

    While paused, every new object stays in the youngest generation, so the first collection
    after a plain ``gc.enable()`` would walk all of them at once (about 0.4 s per million
    messages). ``freeze``/``unfreeze`` first moves them to the oldest generation, which the
    collector only walks again when enough new objects survive to warrant it.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.freeze()
            gc.unfreeze()
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

    Chats are independent until deduplication, so with ``workers`` > 1 (default:
    ``default_workers()``) chunks of chats are read and segmented in forked worker processes,
    and their candidates merged here in chat id order: the output is identical to a
    single-process build.
    Small histories (under ``MIN_MESSAGES_PER_WORKER`` messages per worker) and platforms
    without ``fork`` build in this process.
    """
    from doppelbot.store.dataset_reads import (
        account_user_id,
        chat_message_counts,
        chats_with_peers,
        open_readonly,
        transcribed_notes,
    )

    builder = DatasetBuilder(options, count_tokens=count_tokens, progress=progress)
    stats = builder.stats
    with _gc_paused():
        conn = open_readonly(db_path)
        try:
            started = time.perf_counter()
            account_id = account_user_id(conn)
            voice = transcribed_notes(conn) if options.voice_transcripts else set()
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
                read_s += _build_in_process(builder, conn, chosen, bool(voice))
        finally:
            conn.close()
        if chunks:
            read_s += _build_in_workers(builder, Path(db_path), chunks, n_workers, bool(voice))
        stats.seconds["read"] = round(read_s, 3)
        result = builder.finish()
        if voice:
            _voice_stats(result, voice, {chat_id for chat_id, _, _ in chosen})
        return result


def _voice_stats(result: DatasetResult, voice: set[tuple[int, int]], chat_ids: set[int]) -> None:
    """How much of the dataset came from transcribed voice and round-video notes."""
    stats = result.stats
    stats.voice_notes_transcribed = sum(1 for chat_id, _ in voice if chat_id in chat_ids)
    for sample in chain(result.train, result.validation):
        chat_id = sample.chat_id
        if any((chat_id, mid) in voice for mid in sample.reply_message_ids):
            stats.samples_voice_reply += 1
        if any((chat_id, mid) in voice for mid in sample.source_message_ids):
            stats.samples_voice_context += 1


_ChatSpec = tuple[int, str, tuple[str | None, ...]]
"""(chat_id, display name, the other person's names)"""


def _can_fork() -> bool:
    # fork, not spawn: the duplicate keys are str hashes, salted per interpreter, and forked
    # workers share the parent's salt (macOS lists fork but it is unsafe there)
    return "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"


def _chunks(chosen: list[_ChatSpec], sizes: list[int], workers: int) -> list[list[_ChatSpec]]:
    """Consecutive runs of chats, each about a quarter of what is left per worker (so at
    least four per worker), shrinking towards the end: the workers stay busy while the parent
    merges finished ones, and the parent's last merge, after the workers are done, is short."""
    remaining = sum(sizes)
    smallest = max(1, remaining // (workers * 32))
    chunks: list[list[_ChatSpec]] = [[]]
    filled = 0
    target = max(smallest, remaining // (workers * 4))
    for spec, size in zip(chosen, sizes, strict=True):
        if filled >= target:
            chunks.append([])
            filled = 0
            target = max(smallest, remaining // (workers * 4))
        chunks[-1].append(spec)
        filled += size
        remaining -= size
    return chunks


def _build_in_process(
    builder: DatasetBuilder, conn: sqlite3.Connection, chosen: list[_ChatSpec], voice: bool
) -> float:
    """Stage 1 chat by chat in this process; returns the seconds spent reading."""
    from doppelbot.store.dataset_reads import chat_rows

    read_s = 0.0
    progress = builder.progress
    for done, (chat_id, name, names) in enumerate(chosen, 1):
        started = time.perf_counter()
        rows = chat_rows(conn, chat_id, transcripts=voice)
        read_s += time.perf_counter() - started
        builder.add_chat(ChatSource(chat_id, rows, name, names))
        if progress is not None:
            progress("chats", done, len(chosen))
    return read_s


def _build_in_workers(
    builder: DatasetBuilder,
    db_path: Path,
    chunks: list[list[_ChatSpec]],
    workers: int,
    voice: bool,
) -> float:
    """Stage 1 in forked worker processes, merged here in chunk (= chat id) order while the
    workers go on with later chunks; returns the seconds the workers spent reading, summed.

    Tried on this project's 2-core machine: letting this process also build chunks whenever
    the next one to merge was not ready was no faster than two workers and a merging parent
    (the parent's merging is about a third of the work)."""
    progress = builder.progress
    total = sum(map(len, chunks))
    done = 0
    read_s = build_s = 0.0
    started = time.perf_counter()
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        jobs = [
            pool.submit(
                _worker_chunk, db_path, builder.options, [(c, n) for c, _, n in chunk], voice
            )
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


_ChunkResult = tuple[list[_ChatPart], list[int], dict[str, int], float, float]


def _worker_chunk(
    db_path: Path,
    options: DatasetOptions,
    chats: list[tuple[int, tuple[str | None, ...]]],
    voice: bool = False,
) -> _ChunkResult:
    """A worker process's job: read and segment some chats (a packed ``_ChatPart`` each, in
    order), with the counters and the seconds spent reading and building."""
    from doppelbot.store.dataset_reads import chat_rows, open_readonly

    gc.disable()  # a short-lived process of acyclic tuples (see ``_gc_paused``)
    maker = _ChatMaker(options)
    parts = []
    read_s = build_s = 0.0
    conn = open_readonly(db_path)
    try:
        for chat_id, names in chats:
            started = time.perf_counter()
            rows = chat_rows(conn, chat_id, transcripts=voice)
            read_s += time.perf_counter() - started
            parts.append(maker.part(chat_id, rows, names, pack=True))
            build_s += time.perf_counter() - started
    finally:
        conn.close()
    return parts, maker.counters, maker.pii, read_s, build_s - read_s

"""The dataset builder: chats → "context → my reply" samples → train/validation.

Pipeline (each stage counted in ``DatasetStats``):

1. per chat (``candidates.ChatMaker``; in forked worker processes for big histories, see
   ``from_store``): message rules, sessions and turns, one candidate per owner turn that
   answers the other person, with its context and duplicate keys;
2. merge, strictly in chat id order (``DatasetBuilder.add_part``): exact and near duplicates are
   dropped, every other candidate becomes a ``Sample`` whose ``model_input``/``model_target``
   are the ``doppelbot.core.prompt.PromptFormat`` ones (a slice of the chat's dialog string between
   the format's fixed prefix and suffix); inputs the byte bound cannot clear wait for stage 3;
3. the token budget: those inputs are counted (line by line, ``budget.calibrate``) and lose
   their oldest context turns until they fit in ``max_input_tokens``, or the sample goes;
4. the per-contact cap thins chats that would contribute more than ``max_contact_share``;
5. the time split: the most recent ``validation_share`` is validation.

The stats' length distributions come from lengths measured as each sample is made (stage 2,
or stage 3 when it trims one) and are thinned with the samples, so hundreds of thousands of
samples are never walked again to describe them.

The builder never imports a tokenizer: ``count_tokens`` is injected (``None`` skips stage 3;
the CLI always passes the real FRED-T5 counter).
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate, compress, islice, repeat
from operator import add, attrgetter, le, sub
from typing import NamedTuple

from doppelbot.core.domain import Row, Sample, Turn
from doppelbot.core.errors import DatasetError
from doppelbot.dataset import quality
from doppelbot.dataset.budget import (
    CountTokens,
    Fit,
    calibrate,
    fit_by_inputs,
    fit_by_lines,
    surely_fits,
)
from doppelbot.dataset.candidates import NO_HEAD, ChatMaker, ChatPart, MadeChunk, int64s
from doppelbot.dataset.options import DatasetOptions
from doppelbot.dataset.render import MemoPromptFormat, line_prefixes, prompt_frame, target_frame
from doppelbot.dataset.rules import DROP_REASONS, STICKER_EMOJI, TRUNCATED, new_counters
from doppelbot.dataset.sessions import ROLES
from doppelbot.dataset.split import split_by_time
from doppelbot.dataset.stats import AccountStats, ChatStats, DatasetStats, summarize

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages: "chats", "tokens"."""

_TEXT = attrgetter("text")
_CHAT_ID = attrgetter("chat_id")


@dataclass(frozen=True, slots=True)
class ChatSource:
    """One chat's history for the builder: rows in ``(date, message_id)`` order (see
    ``domain.Row``)."""

    chat_id: int
    rows: Sequence[Row]
    name: str = ""
    names: tuple[str | None, ...] = ()  # the other person's names, for keep_names=False
    account: str = ""  # the own account whose chat it is ("": one account, not recorded)


@dataclass(frozen=True, slots=True)
class DatasetResult:
    train: list[Sample]
    validation: list[Sample]
    stats: DatasetStats


class _Unsure(NamedTuple):
    """A sample whose model input the byte bound cannot clear: stage 3 counts its tokens and
    makes the ``Sample`` (with fewer context turns when it must), or drops it."""

    at: int  # its place in ``DatasetBuilder._samples``
    chat_id: int
    account: str
    context: tuple[Turn, ...]  # oldest first
    reply: str
    reply_date: int
    source_ids: tuple[int, ...]  # the context's message ids
    reply_ids: tuple[int, ...]
    turn_sizes: tuple[int, ...]  # messages per context turn (what trimming a turn removes)
    turn_dates: tuple[int, ...]  # first date per context turn
    model_input: str


@dataclass(slots=True)
class _Lengths:
    """Per sample, in sample order: the lengths the stats describe (``DatasetStats``)."""

    context_chars: list[int] = field(default_factory=list)
    context_turns: list[int] = field(default_factory=list)
    reply_chars: list[int] = field(default_factory=list)

    def keep(self, mask: Sequence[bool]) -> None:
        for values in (self.context_chars, self.context_turns, self.reply_chars):
            values[:] = compress(values, mask)

    def take(self, indexes: Sequence[int]) -> None:
        for values in (self.context_chars, self.context_turns, self.reply_chars):
            values[:] = map(values.__getitem__, indexes)


def _context_chars(ctx: Sequence[Turn]) -> int:
    """A context's texts joined by newlines, as ``context_max_chars`` measures it."""
    return sum(map(len, map(_TEXT, ctx))) + len(ctx) - 1


class DatasetBuilder:
    """Feed chats with ``add_chat`` (any number, streamed) or, when made elsewhere,
    ``add_chunk``; then ``finish()``."""

    def __init__(
        self,
        options: DatasetOptions,
        *,
        count_tokens: CountTokens | None = None,
        progress: Progress | None = None,
        voice_notes: set[tuple[str, int, int]] | None = None,
    ) -> None:
        self.options = options
        self.count_tokens = count_tokens
        self.progress = progress
        # (account, chat, message) read as their transcript (message ids are per account)
        self.voice_notes = voice_notes or set()
        self.stats = DatasetStats()
        self._maker = ChatMaker(options)
        self._fmt = options.prompt_format
        self._frame = prompt_frame(self._fmt)
        self._counters = new_counters()  # from other processes' makers (``add_chunk``)
        self._pii: dict[str, int] = {}
        # the samples in candidate order; ``None`` marks one whose input awaits token counting
        # (``_unsure`` holds it): the order is what the contact cap thins by, so it must not
        # depend on which inputs needed counting
        self._samples: list[Sample | None] = []
        self._unsure: list[_Unsure] = []
        self._lengths = _Lengths()
        self._target_frame = target_frame(self._fmt)
        self._prefix_lengths = tuple(map(len, line_prefixes(self._fmt)))  # other, owner
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
        added = self.add_part(part, source.name, source.account)
        self._build_s += time.perf_counter() - started
        return added

    def add_chunk(self, chunk: MadeChunk, names: Sequence[str], accounts: Sequence[str]) -> None:
        """Chats made by another ``ChatMaker`` (a worker process), with their display names
        (and own accounts), in chat id order after every chat added before."""
        for i, n in enumerate(chunk.counters):
            self._counters[i] += n
        for kind, n in chunk.pii.items():
            self._pii[kind] = self._pii.get(kind, 0) + n
        started = time.perf_counter()
        for part, name, account in zip(chunk.parts, names, accounts, strict=True):
            self.add_part(part, name, account)
        self._build_s += time.perf_counter() - started + chunk.build_s

    def add_part(self, part: ChatPart, name: str = "", account: str = "") -> int:
        """One chat's candidates, deduplicated against everything added before, made into
        samples with their model inputs; returns how many were kept. The same chat id from
        two own ``account``s is one contact (its stats and its share of the samples)."""
        chat_id = part.chat_id
        stats = self.stats
        if account:
            own = stats.per_account.setdefault(account, AccountStats(account))
            own.chats += 1
            own.messages += part.messages
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
        line_ends = int64s(part.line_ends).tolist()
        if len(line_ends) != len(outs) or (line_ends and line_ends[-1] != len(body)):
            raise DatasetError(f"chat {chat_id}: a worker's turns do not add up (a bug)")
        # a line starts one past the newline that ends the line before it
        line_starts = [0, *map(add, line_ends[:-1], repeat(1))]
        # each turn's text is its line after the role prefix (sanitized), except ``changed``
        text_starts = list(map(add, line_starts, map(self._prefix_lengths.__getitem__, outs)))
        texts = list(map(body.__getitem__, map(slice, text_starts, line_ends)))
        for t, text in part.changed:
            texts[t] = text
        turns = tuple(map(Turn, map(ROLES.__getitem__, outs), texts))
        ids = tuple(int64s(part.ids))
        starts = int64s(part.turn_starts).tolist()
        turn_dates = tuple(int64s(part.turn_dates))
        ends = [*starts[1:], len(ids)]
        turn_sizes = tuple(map(sub, ends, starts))
        heads, no_head = part.heads, NO_HEAD
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
        # the texts of turns lo:k are running[k] - running[lo] chars long
        running = [0, *accumulate(map(len, texts))]
        lengths = self._lengths
        add_ctx_chars = lengths.context_chars.append
        add_ctx_turns = lengths.context_turns.append
        add_reply_chars = lengths.reply_chars.append
        # five int64s per candidate in ``CANDIDATE_FIELDS`` order (``lo``: the context's first
        # whole turn, ``k``: the reply's turn); one iterator zipped with itself reads them in fives
        fields = iter(int64s(part.candidates))
        for lo, k, key, near_key, head in zip(fields, fields, fields, fields, fields, strict=True):
            if dedup_exact:
                if key in seen_exact:
                    dropped["duplicate_exact"] += 1
                    continue
                seen_exact.add(key)
            if dedup_near:
                if near_key in seen_near:
                    dropped["duplicate_near"] += 1
                    continue
                seen_near.add(near_key)
            reply_start = starts[k]
            src = ids[starts[lo] : reply_start]
            if head == no_head:  # the whole turns lo:k, one slice of the dialog string
                ctx = turns[lo:k]
                text = f"{prefix}{body[line_starts[lo] : line_ends[k - 1]]}{suffix}"
                add_ctx_chars(running[k] - running[lo] + k - lo - 1)  # texts + newlines
                add_ctx_turns(k - lo)
                first_date = turn_dates[lo]
            else:
                h = heads[head]
                ctx = (Turn(ROLES[h.is_owner], h.text), *turns[lo:k])
                src = (*h.message_ids, *src)
                text = build_input(ctx)
                add_ctx_chars(_context_chars(ctx))
                add_ctx_turns(len(ctx))
                first_date = h.date
            reply = texts[k]
            add_reply_chars(len(reply))
            if budget and not surely_fits(text, max_tokens):
                if head == no_head:
                    sizes, dates = turn_sizes[lo:k], turn_dates[lo:k]
                else:
                    sizes = (len(h.message_ids), *turn_sizes[lo:k])
                    dates = (h.date, *turn_dates[lo:k])
                unsure.append(
                    _Unsure(
                        len(out),
                        chat_id,
                        account,
                        ctx,
                        reply,
                        turn_dates[k],
                        src,
                        ids[reply_start : ends[k]],
                        sizes,
                        dates,
                        text,
                    )
                )
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
                    ids[reply_start : ends[k]],
                    text,
                    f"{target_prefix}{body[text_starts[k] : line_ends[k]]}{target_suffix}",
                    account,
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
        samples, per_chat = self._apply_cap(samples)
        chats = list(map(_CHAT_ID, samples))
        # merged in chat id order (``build_from_db``/``build_dataset``), each chat in time order
        by_chat = all(map(le, chats, islice(chats, 1, None)))
        train, validation = split_by_time(samples, opts.validation_share, by_chat=by_chat)
        stats.seconds["cap_split"] = round(time.perf_counter() - started, 3)

        self._fill_stats(train, validation, per_chat)
        return DatasetResult(train, validation, stats)

    def _materialize(self) -> list[Sample]:
        """The samples, with the inputs the byte bound could not clear counted and, when over
        ``max_input_tokens``, trimmed (oldest context turns first) or dropped."""
        samples = self._samples
        unsure = self._unsure
        self._samples, self._unsure = [], []
        self._seen_exact.clear()
        self._seen_near.clear()
        token_counts: list[int] = []
        if unsure:  # only with a token counter
            started = time.perf_counter()
            self.stats.token_checked = len(unsure)
            fmt = MemoPromptFormat.of(self._fmt)
            lengths = self._lengths
            for u, fit in zip(unsure, self._fit(unsure, fmt), strict=True):
                if fit is None:
                    self._dropped["input_too_long"] += 1
                    continue  # its place stays ``None``
                ctx, src, dates = u.context, u.source_ids, u.turn_dates
                if fit.cut:
                    ctx = ctx[fit.cut :]
                    src = src[sum(u.turn_sizes[: fit.cut]) :]
                    dates = dates[fit.cut :]
                    lengths.context_chars[u.at] = _context_chars(ctx)
                    lengths.context_turns[u.at] = len(ctx)
                    self.stats.token_trimmed += 1
                token_counts.append(fit.tokens)
                samples[u.at] = Sample(
                    u.chat_id,
                    ctx,
                    u.reply,
                    u.reply_date,
                    dates[0],
                    src,
                    u.reply_ids,
                    fit.model_input,
                    fmt.build_target(u.reply),
                    u.account,
                )
            self.stats.seconds["token_budget"] = round(time.perf_counter() - started, 3)
            if self._dropped["input_too_long"]:
                made = [sample is not None for sample in samples]
                samples = list(compress(samples, made))
                lengths.keep(made)
        self.stats.input_tokens_counted = summarize(token_counts)
        return samples  # type: ignore[return-value]  # every ``None`` was replaced or removed

    def _fit(self, unsure: list[_Unsure], fmt: MemoPromptFormat) -> list[Fit | None]:
        """Each unsure input's ``Fit`` (``None``: not even its newest turn fits)."""
        count = self.count_tokens
        assert count is not None
        contexts = [u.context for u in unsure]
        inputs = [u.model_input for u in unsure]
        max_tokens = self.options.max_input_tokens
        progress = self.progress

        def on_batch(done: int, total: int) -> None:
            if progress is not None:
                progress("tokens", done, total)

        count_lines = getattr(count, "count_many", None)
        shape = calibrate(self._fmt, count_lines) if count_lines is not None else None
        if count_lines is not None and shape is not None:
            return fit_by_lines(
                contexts, inputs, fmt, count, count_lines, shape, max_tokens, on_batch
            )
        return fit_by_inputs(contexts, inputs, fmt, count, max_tokens, on_batch)

    def _apply_cap(self, samples: list[Sample]) -> tuple[list[Sample], Mapping[int, int]]:
        """The samples the per-contact cap keeps (their lengths thinned alike), and how many
        each chat keeps."""
        counts = Counter(map(_CHAT_ID, samples))
        share = self.options.max_contact_share
        cap = quality.contact_cap(counts, share)
        self.stats.contact_cap = cap
        self.stats.contact_cap_unsatisfiable = quality.cap_unsatisfiable(counts, share)
        if cap is None:
            return samples, counts
        by_chat: dict[int, list[int]] = {}
        for i, chat_id in enumerate(map(_CHAT_ID, samples)):
            by_chat.setdefault(chat_id, []).append(i)
        kept: list[int] = []
        for chat_indexes in by_chat.values():
            if len(chat_indexes) > cap:
                self._dropped["contact_cap"] += len(chat_indexes) - cap
                spaced = quality.evenly_spaced(len(chat_indexes), cap)
                kept.extend(map(chat_indexes.__getitem__, spaced))
            else:
                kept.extend(chat_indexes)
        self._lengths.take(kept)
        return list(map(samples.__getitem__, kept)), {c: min(n, cap) for c, n in counts.items()}

    def _fill_stats(
        self, train: list[Sample], validation: list[Sample], samples_per_chat: Mapping[int, int]
    ) -> None:
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
        for chat_id, n in samples_per_chat.items():
            per_chat[chat_id].samples = n
        for chat_id, n in Counter(map(_CHAT_ID, validation)).items():
            per_chat[chat_id].validation = n
        for chat in per_chat.values():
            chat.train = chat.samples - chat.validation
        lengths, self._lengths = self._lengths, _Lengths()
        stats.context_chars = summarize(lengths.context_chars)
        stats.context_turns = summarize(lengths.context_turns)
        stats.reply_chars = summarize(lengths.reply_chars)
        stats.chats_used = sum(1 for chat in per_chat.values() if chat.messages)
        if stats.per_account:
            for account, n in Counter(s.account for s in train).items():
                stats.per_account[account].train = n
            for account, n in Counter(s.account for s in validation).items():
                stats.per_account[account].validation = n
            for own in stats.per_account.values():
                own.samples = own.train + own.validation
        if self.voice_notes:
            self._fill_voice_stats(train, validation)

    def _fill_voice_stats(self, train: list[Sample], validation: list[Sample]) -> None:
        """How much of the dataset came from transcribed voice and round-video notes."""
        stats = self.stats
        voice = self.voice_notes
        chats = stats.per_chat
        stats.voice_notes_transcribed = sum(1 for _, chat_id, _ in voice if chat_id in chats)
        for sample in (*train, *validation):
            account, chat_id = sample.account, sample.chat_id
            if any((account, chat_id, mid) in voice for mid in sample.reply_message_ids):
                stats.samples_voice_reply += 1
            if any((account, chat_id, mid) in voice for mid in sample.source_message_ids):
                stats.samples_voice_context += 1


@contextmanager
def gc_paused() -> Iterator[None]:
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
    with gc_paused():
        for source in sorted(sources, key=lambda s: (s.chat_id, s.account)):
            builder.add_chat(source)
            n += 1
        builder.stats.chats_total = max(builder.stats.chats_total, n)
        return builder.finish()

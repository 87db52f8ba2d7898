"""Stage 1 of the dataset build: one chat → its sample candidates, packed to travel.

``ChatMaker.part`` applies the message rules to one chat, splits it into sessions and turns
(``sessions.segment``) and makes one candidate per owner turn that answers the other person:
the context ``sessions.pick_window`` chooses, and the candidate's duplicate keys. It makes no
``Sample`` yet: which candidates survive depends on the chats merged before this one
(deduplication), so the builder makes samples while it merges chats in chat id order
(``DatasetBuilder.add_part``). Chats are independent until then, which is what lets
``from_store.build_from_db`` run this stage in forked worker processes.

A ``ChatPart`` is compact because it crosses between processes: int64 arrays as bytes and the
chat's dialog lines as one string, a fraction of the cost of pickling tuples of strings.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from operator import add, is_not
from typing import NamedTuple

from doppelbot.core.domain import Row
from doppelbot.core.prompt import fake_turn_pattern
from doppelbot.dataset.options import DatasetOptions
from doppelbot.dataset.render import line_prefixes
from doppelbot.dataset.rules import make_cleaner, make_scrubber, new_counters
from doppelbot.dataset.scrub import name_pattern
from doppelbot.dataset.sessions import ROLES, pick_window, segment_chat

CANDIDATE_FIELDS = ("first_turn", "reply_turn", "key", "near_key", "head")
"""The int64s of one candidate in ``ChatPart.candidates``, in this order:

- ``first_turn``, ``reply_turn``: the context ends with the whole turns
  ``first_turn:reply_turn`` (none when they are equal), and the reply is turn ``reply_turn``;
- ``key``, ``near_key``: the exact and near-duplicate keys (64-bit hashes; 0 when that
  deduplication is off);
- ``head``: the index in ``ChatPart.heads`` of a turn placed before the whole turns, or
  ``NO_HEAD`` when the context is the whole turns alone (most candidates).

Plain int64s rather than one object per candidate: a big history has hundreds of thousands
of candidates, and an array of ints crosses between processes almost for free.
"""
NO_HEAD = -1


class ContextHead(NamedTuple):
    """The first turn of a context when it is not a whole turn of the chat: a quoted older
    message (``include_reply_to``), or the newest messages of a last turn too long to fit
    whole (then it is the whole context: the candidate has no whole turns)."""

    is_owner: int
    text: str
    message_ids: tuple[int, ...]
    date: int  # of its first message


def int64s(raw: bytes) -> array[int]:
    """An int64 array packed by ``ChatMaker.part`` (``array.tobytes``)."""
    values = array("q")
    values.frombytes(raw)
    return values


@dataclass(frozen=True, slots=True)
class ChatPart:
    """What stage 1 makes of one chat (in a worker process or in-process), for
    ``DatasetBuilder.add_part``."""

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
    candidates: bytes  # ``len(CANDIDATE_FIELDS)`` int64s per candidate, in that order
    heads: tuple[ContextHead, ...]  # the candidates' context heads (their ``head`` field)


class MadeChunk(NamedTuple):
    """What one ``ChatMaker`` (a worker process) made of a run of chats."""

    parts: list[ChatPart]  # in the order of the chats asked for
    counters: list[int]  # drop counters (``rules.new_counters``)
    pii: dict[str, int]  # PII replacements by kind
    read_s: float  # seconds spent reading the rows
    build_s: float  # seconds spent making the parts


class ChatMaker:
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
    ) -> ChatPart:
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
        ids = tuple(tl.ids)  # slices of a tuple are the id tuples a context head keeps
        dates, texts, norms = tl.dates, tl.texts, tl.norms
        turn_outs = tl.turn_outs
        turn_texts, turn_norms = tl.turn_texts, tl.turn_norms
        quote_turns = tl.quote_turns if opts.include_reply_to else set()
        max_chars = opts.context_max_chars
        dedup_exact, dedup_near = opts.dedup_exact, opts.dedup_near
        too_long = 0
        cands = array("q")
        push = cands.extend
        heads: list[ContextHead] = []
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
                head = NO_HEAD
                if j >= 0:  # only the newest messages j: of the last turn fit
                    reply_start = starts[k]
                    text = "\n".join(texts[j:reply_start])
                    heads.append(ContextHead(turn_outs[last], text, ids[j:reply_start], dates[j]))
                    head = len(heads) - 1
                    lo = k  # so no whole turns follow the head
                    key_texts: tuple[object, ...] = (text,)
                    key_norms: tuple[object, ...] = (" ".join(norms[j:reply_start]),)
                else:
                    key_texts = turn_texts[lo:k]
                    key_norms = turn_norms[lo:k]
                    if quote >= 0:
                        q_out = tl.out_of(quote)
                        heads.append(ContextHead(q_out, texts[quote], (ids[quote],), dates[quote]))
                        head = len(heads) - 1
                        role = ROLES[q_out]
                        key_texts = ((role, texts[quote]), *key_texts)
                        key_norms = ((role, norms[quote]), *key_norms)
                # hash() of str is salted per interpreter: the keys are only ever compared
                # with keys from the same process or from forked children (same salt)
                key = hash((key_texts, turn_texts[k])) if dedup_exact else 0
                near_key = hash((key_norms, turn_norms[k])) if dedup_near else 0
                push((lo, k, key, near_key, head))
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
        # line t ends after the lines 0..t and the t newlines between them
        line_ends = array("q", map(add, accumulate(map(len, lines)), range(len(lines))))
        return ChatPart(
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
            turn_dates=array("q", tl.turn_dates).tobytes(),
            candidates=cands.tobytes(),
            heads=tuple(heads),
        )

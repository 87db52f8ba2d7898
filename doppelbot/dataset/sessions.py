"""Sessions, turns and the context window: one chat's history as a dialogue.

``segment`` walks a chat's rows once (the builder's hot loop): it applies the message rules,
starts a new session after a silence longer than ``session_gap_s`` (measured between *all*
messages, dropped ones included — a photo is activity too) and merges consecutive kept
messages of one speaker into turns. The result is a ``ChatTimeline`` of flat parallel lists
and per-turn tuples, so a context is a few tuple slices rather than new objects.

``pick_window`` chooses the context for a turn: the most recent turns of the same session whose
newline-joined texts fit in ``context_max_chars`` (the newest turn is cut at a message boundary
if it alone is too long), plus at most one older message that the reply or the last turn quotes
(reply_to). The builder and ``build_live_context`` (the responder's view of "now") share it, so
training and serving see contexts built by the same rules.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from doppelbot.core.domain import Message, Role, Row, Turn
from doppelbot.dataset.rules import Cleaner, make_cleaner, make_scrubber, rule_row
from doppelbot.dataset.rules import new_counters as _new_counters
from doppelbot.dataset.scrub import name_pattern

if TYPE_CHECKING:
    from doppelbot.dataset.options import DatasetOptions

ROLES = (Role.OTHER, Role.OWNER)  # indexed by is_outgoing


class ChatTimeline:
    """One chat's kept messages (parallel lists, time order), its turns and its sessions.

    Turn ``k`` spans messages ``turn_starts[k]:turn_end(k)``; session ``s`` spans turns
    ``session_starts[s]:session_end(s)``. Consecutive turns of a session alternate speakers.
    After ``finish()``, ``turns``/``turn_texts``/``turn_norms``/``turn_sizes``/``turn_dates``
    hold one entry per turn.
    """

    __slots__ = (
        "_index",
        "dates",
        "ids",
        "norms",
        "quote_turns",
        "rtos",
        "session_starts",
        "texts",
        "turn_dates",
        "turn_norms",
        "turn_outs",
        "turn_sizes",
        "turn_starts",
        "turn_texts",
        "turns",
    )

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.dates: list[int] = []
        self.texts: list[str] = []
        self.norms: list[str] = []
        self.rtos: dict[int, int] = {}  # message index → the id it replies to (when it does)
        self.turn_starts: list[int] = []
        self.turn_outs: list[int] = []  # 1 = the owner's turn
        self.session_starts: list[int] = []
        self.quote_turns: set[int] = set()  # turns with at least one reply_to
        self.turns: tuple[Turn, ...] = ()
        self.turn_texts: tuple[str, ...] = ()
        self.turn_norms: tuple[str, ...] = ()
        self.turn_sizes: tuple[int, ...] = ()
        self.turn_dates: tuple[int, ...] = ()
        self._index: dict[int, int] | None = None

    @property
    def n_turns(self) -> int:
        return len(self.turn_starts)

    def turn_end(self, k: int) -> int:
        return self.turn_starts[k + 1] if k + 1 < len(self.turn_starts) else len(self.ids)

    def session_end(self, s: int) -> int:
        return self.session_starts[s + 1] if s + 1 < len(self.session_starts) else self.n_turns

    def session_of_turn(self, k: int) -> int:
        return bisect_right(self.session_starts, k) - 1

    def out_of(self, i: int) -> int:
        """Whether message ``i`` is the owner's (1) or the other person's (0)."""
        return self.turn_outs[bisect_right(self.turn_starts, i) - 1]

    def position(self, message_id: int) -> int | None:
        """Index of a kept message by id (built on first use: most chats never quote)."""
        if self._index is None:
            self._index = {mid: i for i, mid in enumerate(self.ids)}
        return self._index.get(message_id)

    def finish(self, with_norms: bool = True, with_turns: bool = True) -> ChatTimeline:
        """Per-turn texts, sizes and dates (and ``Turn`` objects and near-duplicate keys when
        asked), made once for all samples."""
        texts, norms, starts, outs = self.texts, self.norms, self.turn_starts, self.turn_outs
        bounds = list(zip(starts, [*starts[1:], len(texts)][: len(starts)], strict=True))
        self.turn_texts = tt = tuple(
            [texts[s] if e - s == 1 else "\n".join(texts[s:e]) for s, e in bounds]
        )
        if with_turns:
            roles = ROLES
            self.turns = tuple([Turn(roles[o], t) for o, t in zip(outs, tt, strict=True)])
        self.turn_sizes = tuple([e - s for s, e in bounds])
        dates = self.dates
        self.turn_dates = tuple([dates[s] for s in starts])
        if with_norms:
            self.turn_norms = tuple(
                [norms[s] if e - s == 1 else " ".join(norms[s:e]) for s, e in bounds]
            )
        return self


def segment(rows: Iterable[Row], clean: Cleaner, gap_s: int) -> ChatTimeline:
    """Rows (time order) → a ``ChatTimeline`` (sessions and turns of the kept messages).

    One ``clean`` call per message (most return from its regex-free fast path); the rest of the
    loop is list appends. Measured on this project's 2-core machine, splitting the work into
    C-level ``map``/``compress`` passes over columns was slower: the string operations, not
    the interpreter, dominate.
    """
    tl = ChatTimeline()
    ids_append = tl.ids.append
    dates_append = tl.dates.append
    texts_append = tl.texts.append
    norms_append = tl.norms.append
    rtos = tl.rtos
    turn_starts = tl.turn_starts
    turn_outs = tl.turn_outs
    session_starts = tl.session_starts
    quote_turns = tl.quote_turns
    new_session = True
    prev = 1 << 62  # the first message never "follows a gap"
    cur = -1
    n = 0
    for mid, out, date, text, rto, kind in rows:
        if date - prev > gap_s:
            new_session = True
        prev = date
        kept = clean(text, kind)
        if kept is None:
            continue
        text, norm = kept
        if new_session:
            session_starts.append(len(turn_starts))
            turn_starts.append(n)
            turn_outs.append(out)
            new_session = False
            cur = out
        elif out != cur:
            turn_starts.append(n)
            turn_outs.append(out)
            cur = out
        ids_append(mid)
        dates_append(date)
        texts_append(text)
        norms_append(norm)
        if rto:
            rtos[n] = rto
            quote_turns.add(len(turn_starts) - 1)
        n += 1
    return tl


def segment_chat(rows: Iterable[Row], options: DatasetOptions, clean: Cleaner) -> ChatTimeline:
    """``segment`` with the options' session gap."""
    return segment(rows, clean, options.session_gap_s)


def pick_window(
    tl: ChatTimeline,
    first_turn: int,
    last_turn: int,
    max_chars: int,
    quote_from: Sequence[int] = (),
    quote_floor: int = 0,
) -> tuple[int, int, int] | None:
    """The context ending with turn ``last_turn``, at most ``max_chars`` long.

    Returns ``(k, j, quote)``: whole turns ``k..last_turn``, or — when ``j >= 0`` — only the
    messages ``j:`` of ``last_turn`` (it alone is too long); ``quote`` is the index of one
    older quoted message placed before them, or -1. Turns before ``first_turn`` (the session
    start) are never used; ``quote_from`` lists turns whose reply_to targets may add the quote,
    which must not be older than message ``quote_floor``. ``None`` when not even the newest
    message of ``last_turn`` fits.
    """
    turn_texts = tl.turn_texts
    newest = len(turn_texts[last_turn])
    if newest > max_chars:
        texts = tl.texts
        last_start = tl.turn_starts[last_turn]
        j = tl.turn_end(last_turn) - 1
        total = len(texts[j])
        if total > max_chars:
            return None
        while j > last_start and total + 1 + len(texts[j - 1]) <= max_chars:
            j -= 1
            total += 1 + len(texts[j])
        return last_turn, j, -1

    total = newest
    k = last_turn
    while k > first_turn and total + 1 + len(turn_texts[k - 1]) <= max_chars:
        k -= 1
        total += 1 + len(turn_texts[k])
    if not quote_from:
        return k, -1, -1

    starts = tl.turn_starts
    window_start = starts[k]
    rtos = tl.rtos
    quote = -1
    for qt in quote_from:
        for i in range(starts[qt], tl.turn_end(qt)):
            target = rtos.get(i)
            if target:
                pos = tl.position(target)
                if pos is not None and quote_floor <= pos < window_start:
                    quote = pos
                    break
        if quote >= 0:
            break
    if quote < 0:
        return k, -1, -1
    q_len = len(tl.texts[quote]) + 1
    if q_len + newest > max_chars:
        return k, -1, -1  # the newest turn has priority over the quoted message
    while total + q_len > max_chars:  # make room: the oldest turns go first
        total -= len(turn_texts[k]) + 1
        k += 1
    return k, -1, quote


def window_turns(
    tl: ChatTimeline, last_turn: int, window: tuple[int, int, int]
) -> tuple[Turn, ...]:
    """The ``Turn`` objects of a ``pick_window`` result, oldest first."""
    k, j, quote = window
    if j >= 0:
        end = tl.turn_end(last_turn)
        return (Turn(ROLES[tl.turn_outs[last_turn]], "\n".join(tl.texts[j:end])),)
    turns = tl.turns[k : last_turn + 1]
    if quote >= 0:
        turns = (Turn(ROLES[tl.out_of(quote)], tl.texts[quote]), *turns)
    return turns


def build_live_context(
    messages: Sequence[Message],
    now: int,
    options: DatasetOptions,
    *,
    names: Iterable[str | None] = (),
) -> tuple[Turn, ...]:
    """The context for answering a chat *now*, built by the dataset's rules.

    ``messages`` are the chat's recent messages (any order; e.g. ``recent_messages(db, chat,
    50)``); messages dated after ``now`` are ignored. The same filters, PII scrubbing, merging
    and character limit as the training set apply; the context is the last session's most
    recent turns (a silence longer than the session gap separates it from older ones), plus one
    older message of that session the last turn quotes. Normally the last turn is the other
    person's; if the owner spoke last it is returned as is and the caller decides. ``names``
    are the other person's first/last name/username, replaced when ``options.keep_names`` is
    off. The token budget is the caller's: see ``doppelbot.dataset.budget.fit_turns``.
    """
    ordered = sorted((m for m in messages if m.date <= now), key=lambda m: (m.date, m.message_id))
    scrubber = make_scrubber(options)
    if scrubber is not None and not options.keep_names:
        scrubber = scrubber.with_names(name_pattern(names))
    clean = make_cleaner(options, _new_counters(), scrubber)
    rows = [rule_row(m) for m in ordered]
    tl = segment_chat(rows, options, clean).finish(False)
    if not tl.n_turns:
        return ()
    last = tl.n_turns - 1
    first = tl.session_starts[-1]
    floor = 0 if options.reply_to_across_sessions else tl.turn_starts[first]
    quote_from = (last,) if options.include_reply_to and last in tl.quote_turns else ()
    window = pick_window(tl, first, last, options.context_max_chars, quote_from, floor)
    if window is None:
        return ()
    return window_turns(tl, last, window)

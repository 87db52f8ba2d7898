"""The token budget: a model input never exceeds ``max_input_tokens``.

Token counting is injected (``doppelbot.model.tokenizer.TokenCounter`` in the CLI, the
responder's tokenizer at runtime), so this module stays free of tokenizer imports. FRED-T5's
tokenizer is byte-level BPE: every token covers at least one UTF-8 byte, so an input of at
most ``max_tokens - 1`` bytes fits without being tokenized at all (the ``- 1`` covers a prefix
space some BPE set-ups add). Only longer inputs are counted, in batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from doppelbot.core.domain import Role, Turn
from doppelbot.core.prompt import PromptFormat

CountTokens = Callable[[str], int]
OnBatch = Callable[[int, int], None]
"""``on_batch(done, total)``: progress of counting, after each batch."""

TOKEN_BATCH = 512
LINE_BATCH = 4096
LINE_SUM_MARGIN = 8
"""Inputs whose line-by-line token sum is this close to the limit are also counted whole."""


def surely_fits(text: str, max_tokens: int) -> bool:
    """True when ``text`` cannot have more than ``max_tokens`` byte-level BPE tokens."""
    # a str has at most 4 bytes per char: skip the encode for obviously short texts
    if 4 * len(text) + 1 <= max_tokens:
        return True
    return len(text.encode("utf-8")) + 1 <= max_tokens


def count_many(count_tokens: CountTokens, texts: Sequence[str]) -> list[int]:
    """Batch counting when the counter offers it (``TokenCounter.count_many``)."""
    batch = getattr(count_tokens, "count_many", None)
    if batch is not None:
        return list(batch(texts))
    return [count_tokens(t) for t in texts]


def fit_turns(
    turns: Sequence[Turn],
    fmt: PromptFormat,
    count_tokens: CountTokens,
    max_tokens: int,
    facts: Sequence[str] = (),
) -> tuple[tuple[Turn, ...], str, int] | None:
    """Drop the oldest turns until ``fmt.build_input(turns, facts)`` fits in ``max_tokens``.

    Returns ``(turns kept, model input, tokens)`` (tokens is -1 when the byte bound proved the
    fit without counting), or ``None`` when not even the newest turn fits.
    """
    kept = tuple(turns)
    while kept:
        text = fmt.build_input(kept, facts)
        if surely_fits(text, max_tokens):
            return kept, text, -1
        n = count_tokens(text)
        if n <= max_tokens:
            return kept, text, n
        kept = kept[1:]
    return None


# Probe turns for ``calibrate``: line endings and starts of every kind a dialog line can have
# (letters, punctuation, digits, emoji, a placeholder, an inner newline).
_PROBES = (
    (Role.OTHER, "привет"),
    (Role.OWNER, "как дела?"),
    (Role.OTHER, "норм, 12"),
    (Role.OWNER, "ок 👍"),
    (Role.OTHER, "звони <PHONE>"),
    (Role.OWNER, "да\nнет..."),
)


def calibrate(
    fmt: PromptFormat, count_many: Callable[[Sequence[str]], list[int]]
) -> tuple[int, int] | None:
    """``(first, per_line)`` such that a model input's tokens are ``first + per_line * (n - 1)``
    plus the tokens of its ``n`` dialog lines counted one by one — or ``None`` when the
    tokenizer does not split that way on the probes.

    Byte-level BPE (FRED-T5's) splits text into words before merging, and a line break between
    two dialog lines is always a word boundary, so a context's tokens add up line by line
    (``tests/test_dataset_budget.py`` checks it on thousands of real inputs). Counting each
    line once instead of every input that repeats it is what makes the budget cheap: a turn
    sits in the context of several consecutive samples.
    """
    turns = [Turn(role, text) for role, text in _PROBES]
    inputs, line_sets = [], []
    for n in range(1, len(turns) + 1):
        for start in range(len(turns) - n + 1):
            chosen = turns[start : start + n]
            inputs.append(fmt.build_input(chosen))
            line_sets.append(fmt.dialog_lines(chosen))
    lines = sorted({line for ls in line_sets for line in ls})
    per_line = dict(zip(lines, count_many(lines), strict=True))
    totals = count_many(inputs)
    overheads = [t - sum(per_line[x] for x in ls) for t, ls in zip(totals, line_sets, strict=True)]
    first = overheads[0]
    singles = [o for o, ls in zip(overheads, line_sets, strict=True) if len(ls) == 1]
    pairs = [o for o, ls in zip(overheads, line_sets, strict=True) if len(ls) == 2]
    if len(set(singles)) != 1 or len(set(pairs)) != 1:
        return None
    step = pairs[0] - first
    if any(o != first + step * (len(ls) - 1) for o, ls in zip(overheads, line_sets, strict=True)):
        return None
    return first, step


# --- fitting many dataset inputs ----------------------------------------------------------------
class Fit(NamedTuple):
    """A model input that fits the budget once its oldest ``cut`` context turns are gone."""

    cut: int
    tokens: int
    model_input: str


def fit_by_inputs(
    contexts: Sequence[tuple[Turn, ...]],
    inputs: Sequence[str],
    fmt: PromptFormat,
    count: CountTokens,
    max_tokens: int,
    on_batch: OnBatch | None = None,
) -> list[Fit | None]:
    """Per context (``inputs``: its model input), the ``Fit`` — or ``None`` when not even the
    newest turn fits — counting every input whole."""
    fits: list[Fit | None] = []
    for b in range(0, len(inputs), TOKEN_BATCH):
        batch = inputs[b : b + TOKEN_BATCH]
        counted = count_many(count, batch)
        for ctx, text, n in zip(contexts[b : b + TOKEN_BATCH], batch, counted, strict=True):
            fits.append(trim_exactly(ctx, 0, n, text, fmt, count, max_tokens))
        if on_batch is not None:
            on_batch(min(b + TOKEN_BATCH, len(inputs)), len(inputs))
    return fits


def fit_by_lines(
    contexts: Sequence[tuple[Turn, ...]],
    inputs: Sequence[str],
    fmt: PromptFormat,
    count: CountTokens,
    count_lines: Callable[[Sequence[str]], list[int]],
    shape: tuple[int, int],
    max_tokens: int,
    on_batch: OnBatch | None = None,
) -> list[Fit | None]:
    """``fit_by_inputs``, but each distinct dialog line is counted once (``count_lines``, in
    batches) and an input's tokens are added up from its lines (``shape``: what ``calibrate``
    found for ``count_lines``).
    Inputs that end up within ``LINE_SUM_MARGIN`` tokens of the limit are counted whole as
    well, so a tokenizer that ever merged across a line break could not push one over it.

    ``fmt`` should be a ``render.MemoPromptFormat``: each turn's line is made once although
    it sits in several contexts."""
    first, step = shape
    line_tokens: dict[str, int] = {}
    pending: list[str] = []
    for ctx in contexts:
        for line in fmt.dialog_lines(ctx):
            if line not in line_tokens:
                line_tokens[line] = 0
                pending.append(line)
    for b in range(0, len(pending), LINE_BATCH):
        batch = pending[b : b + LINE_BATCH]
        line_tokens.update(zip(batch, count_lines(batch), strict=True))
        if on_batch is not None:
            on_batch(min(b + LINE_BATCH, len(pending)), len(pending))
    fits: list[Fit | None] = []
    for ctx, whole in zip(contexts, inputs, strict=True):
        counts = list(map(line_tokens.__getitem__, fmt.dialog_lines(ctx)))
        total = first + sum(counts) + step * (len(counts) - 1)
        cut = 0
        while total > max_tokens and cut < len(counts) - 1:
            total -= counts[cut] + step
            cut += 1
        if total > max_tokens + LINE_SUM_MARGIN:
            fits.append(None)  # not even the newest turn fits
            continue
        text = whole if not cut else fmt.build_input(ctx[cut:])
        if total > max_tokens - LINE_SUM_MARGIN:
            fits.append(trim_exactly(ctx, cut, count(text), text, fmt, count, max_tokens))
        else:
            fits.append(Fit(cut, total, text))
    return fits


def trim_exactly(
    ctx: tuple[Turn, ...],
    cut: int,
    n: int,
    text: str,
    fmt: PromptFormat,
    count: CountTokens,
    max_tokens: int,
) -> Fit | None:
    """From ``ctx[cut:]`` (``n`` tokens, input ``text``), drop the oldest turns until the
    input fits, counting each try whole; ``None`` when not even the newest turn fits."""
    while n > max_tokens:
        cut += 1
        if cut >= len(ctx):
            return None
        text = fmt.build_input(ctx[cut:])
        n = count(text)
    return Fit(cut, n, text)

"""The token budget: a model input never exceeds ``max_input_tokens``.

Token counting is injected (``doppelbot.model.tokenizer.TokenCounter`` in the CLI, the
responder's tokenizer at runtime), so this module stays free of tokenizer imports. FRED-T5's
tokenizer is byte-level BPE: every token covers at least one UTF-8 byte, so an input of at
most ``max_tokens - 1`` bytes fits without being tokenized at all (the ``- 1`` covers a prefix
space some BPE set-ups add). Only longer inputs are counted, in batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from doppelbot.domain import Turn
from doppelbot.prompt import PromptFormat

CountTokens = Callable[[str], int]


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

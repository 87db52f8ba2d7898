"""The FRED-T5 tokenizer (GPT2-style BPE) and token counting for prompt budgets.

FRED-T5's tokenizer has 50,365 ids but the model only 50,364 embedding rows: the unknown
token ``<|endoftext|>`` is id 50364, so it must never reach the model. ``safe_ids`` maps any
out-of-range id to the pad id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from doppelbot.core.errors import ModelLoadError

FRED_VOCAB_SIZE = 50364
FRED_TOKENIZER_SIZE = 50365  # the model's rows + <|endoftext|>
FRED_SPECIAL_IDS = {"<pad>": 0, "<s>": 1, "</s>": 2}
# Tokens doppelbot's prompts and decoding rely on: the denoiser mode and the span sentinels.
FRED_MARKERS = ("<SC1>", "<SC6>", "<LM>", "<extra_id_0>", "<extra_id_1>")


def load_tokenizer(name_or_path: str | Path, *, check: bool = True) -> Any:
    """Load the GPT2Tokenizer of a FRED-T5 checkpoint (a local folder; see
    ``doppelbot.model.local.model_source`` for hub ids) and refuse one that is not FRED-T5's."""
    from transformers import GPT2Tokenizer

    try:
        tok = GPT2Tokenizer.from_pretrained(str(name_or_path), clean_up_tokenization_spaces=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"cannot load tokenizer from {name_or_path}: {exc}") from exc
    if check:
        check_fred_tokenizer(tok, str(name_or_path))
    return tok


def fred_tokenizer_problems(tok: Any) -> list[str]:
    """Why ``tok`` is not FRED-T5's tokenizer (empty: it is).

    A folder without ``vocab.json``, or another model's tokenizer, "loads" fine and then counts
    every text as a few tokens, silently switching the token budget off; the prompts' ``<SC1>``
    and the ``<extra_id_N>`` sentinels would be plain text to it."""
    problems = []
    if len(tok) != FRED_TOKENIZER_SIZE:
        problems.append(f"{len(tok):,} ids instead of {FRED_TOKENIZER_SIZE:,}")
    for token, wanted in FRED_SPECIAL_IDS.items():
        got = tok.convert_tokens_to_ids(token)
        if got != wanted:
            problems.append(f"{token} is id {got}, not {wanted}")
    unk = getattr(tok, "unk_token_id", None)
    missing = [m for m in FRED_MARKERS if tok.convert_tokens_to_ids(m) in (None, unk)]
    if missing:
        problems.append(f"no {', '.join(missing)}")
    return problems


def check_fred_tokenizer(tok: Any, source: str) -> None:
    problems = fred_tokenizer_problems(tok)
    if problems:
        raise ModelLoadError(
            f"{source} does not hold FRED-T5's tokenizer ({'; '.join(problems[:3])}); doppelbot "
            "needs FRED-T5's (vocab.json, merges.txt and its special tokens)"
        )


def safe_ids(ids: Sequence[int], vocab_size: int, replacement: int = 0) -> list[int]:
    """Replace ids the model has no embedding for (e.g. ``<|endoftext|>`` = 50364)."""
    return [i if 0 <= i < vocab_size else replacement for i in ids]


class TokenCounter:
    """Counts model-input tokens exactly as the model sees them (no special tokens added).

    ``source`` gives the tokenizer when it is first needed: the model worker's, which exists
    only once the model is loaded (the bot is built before that)."""

    def __init__(self, tokenizer: Any = None, *, source: Callable[[], Any] | None = None) -> None:
        self._given = tokenizer
        self._source = source

    @property
    def _tok(self) -> Any:
        if self._given is None and self._source is not None:
            self._given = self._source()
        if self._given is None:
            raise ModelLoadError("no tokenizer to count tokens with: the model is not loaded")
        return self._given

    def __call__(self, text: str) -> int:
        return len(self._tok(text, add_special_tokens=False).input_ids)

    def count_many(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        enc = self._tok(list(texts), add_special_tokens=False)
        return [len(ids) for ids in enc.input_ids]

"""The FRED-T5 tokenizer (GPT2-style BPE) and token counting for prompt budgets.

FRED-T5's tokenizer has 50,365 ids but the model only 50,364 embedding rows: the unknown
token ``<|endoftext|>`` is id 50364, so it must never reach the model. ``safe_ids`` maps any
out-of-range id to the pad id.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from doppelbot.errors import ModelLoadError

FRED_VOCAB_SIZE = 50364


def load_tokenizer(name_or_path: str | Path) -> Any:
    """Load the GPT2Tokenizer of a FRED-T5 checkpoint (hub id or local folder)."""
    from transformers import GPT2Tokenizer

    try:
        tok = GPT2Tokenizer.from_pretrained(str(name_or_path), clean_up_tokenization_spaces=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load tokenizer from {name_or_path}: {exc}") from exc
    return tok


def safe_ids(ids: Sequence[int], vocab_size: int, replacement: int = 0) -> list[int]:
    """Replace ids the model has no embedding for (e.g. ``<|endoftext|>`` = 50364)."""
    return [i if 0 <= i < vocab_size else replacement for i in ids]


class TokenCounter:
    """Counts model-input tokens exactly as the model sees them (no special tokens added)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def __call__(self, text: str) -> int:
        return len(self._tok(text, add_special_tokens=False).input_ids)

    def count_many(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        enc = self._tok(list(texts), add_special_tokens=False)
        return [len(ids) for ids in enc.input_ids]

"""Seq2seq examples for FRED-T5: tokenizing rows, batching them, and the token loss.

Shared by every training method and by the held-out evaluation, so a row is tokenized, padded
and scored the same way wherever it is used. torch is imported inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from doppelbot.model.tokenizer import safe_ids
from doppelbot.training.data import TrainRow
from doppelbot.training.types import IGNORE_INDEX, Example


@dataclass
class EncodeStats:
    rows: int = 0
    dropped_long_input: int = 0
    truncated_target: int = 0
    dropped_empty: int = 0


def subset(rows: Sequence[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` rows spread evenly over the sequence (the validation split is in time
    order: an even spread covers all of it, and the choice is deterministic)."""
    if limit is None or len(rows) <= limit:
        return list(rows)
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit)]


def encode_rows(
    tokenizer: Any,
    rows: Sequence[TrainRow],
    *,
    max_input: int,
    max_target: int,
    vocab_size: int,
    stats: EncodeStats | None = None,
) -> tuple[list[Example], list[TrainRow]]:
    """Tokenize ``model_input``/``model_target`` exactly as written (no special tokens added:
    the target already ends in ``</s>``). Inputs over budget are dropped (the dataset builder
    trims to the same budget, so this only catches stale datasets); long targets are cut
    without ``</s>`` so the model never learns to stop mid-reply. Returns the examples and the
    rows they came from."""
    stats = stats if stats is not None else EncodeStats()
    stats.rows += len(rows)
    if not rows:
        return [], []
    inputs = tokenizer([r.model_input for r in rows], add_special_tokens=False).input_ids
    targets = tokenizer([r.model_target for r in rows], add_special_tokens=False).input_ids
    examples: list[Example] = []
    kept: list[TrainRow] = []
    pad = int(tokenizer.pad_token_id or 0)
    for row, inp, tgt in zip(rows, inputs, targets, strict=True):
        if not inp or not tgt:
            stats.dropped_empty += 1
            continue
        if len(inp) > max_input:
            stats.dropped_long_input += 1
            continue
        if len(tgt) > max_target:
            stats.truncated_target += 1
            tgt = tgt[:max_target]
        # FRED-T5's tokenizer knows one id (<|endoftext|> = 50364) the model has no row for.
        examples.append(
            Example(
                tuple(safe_ids(inp, vocab_size, pad)),
                tuple(safe_ids(tgt, vocab_size, pad)),
            )
        )
        kept.append(row)
    return examples, kept


def collate_seq2seq(examples: Sequence[Example], pad_id: int = 0) -> dict[str, Any]:
    """Right-pad a micro-batch; padded label positions are ignored by the loss."""
    import torch

    src = max(len(e.input_ids) for e in examples)
    tgt = max(len(e.labels) for e in examples)
    input_ids = torch.full((len(examples), src), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), src), dtype=torch.long)
    labels = torch.full((len(examples), tgt), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention[i, : len(e.input_ids)] = 1
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def label_nll(model: Any, batch: dict[str, Any], *, reduction: str) -> Any:
    """Negative log-likelihood of the batch's labels under the decoder (padding skipped):
    summed over the batch (``"sum"``) or per token (``"none"``: rows × target length)."""
    import torch

    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        use_cache=False,  # T5's decoder keeps its own config copy with use_cache on
    )
    logits = out.logits.float()
    labels = batch["labels"]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    return nll if reduction == "sum" else nll.view(labels.shape)


def seq2seq_token_nll(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Summed token negative log-likelihood of the labels, and the number of label tokens."""
    labels = batch["labels"]
    return label_nll(model, batch, reduction="sum"), int((labels != IGNORE_INDEX).sum())


def sequence_logprobs(model: Any, batch: dict[str, Any]) -> Any:
    """log p(labels | input) per row: the sum of the target tokens' log-probabilities."""
    return -label_nll(model, batch, reduction="none").sum(dim=1)

"""``sft``: supervised seq2seq fine-tuning on the dataset's ``model_input → model_target``.

Feedback positives given with ``--feedback`` join the train split, each repeated
``feedback_weight`` times; the run starts from a new LoRA or continues ``--init-adapter``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from doppelbot.core.errors import TrainingError
from doppelbot.training.data import (
    DatasetSplits,
    TrainRow,
    fit_to_budget,
    hash_strings,
    load_dataset,
    load_feedback,
)
from doppelbot.training.seq2seq import (
    EncodeStats,
    collate_seq2seq,
    encode_rows,
    seq2seq_token_nll,
    subset,
)
from doppelbot.training.types import Example, MethodContext, PreparedData


class SftMethod:
    """Supervised seq2seq fine-tuning (also the base of ``feedback``, which only picks other
    training rows)."""

    name = "sft"
    description = "supervised fine-tuning on the dataset (+ feedback positives with --feedback)"
    rows_per_example = 1

    def initial_adapter(self, ctx: MethodContext) -> Path | None:
        return ctx.options.init_adapter

    def train_rows(
        self,
        ctx: MethodContext,
        dataset: DatasetSplits,
        feedback: list[TrainRow],
        summary: dict[str, Any],
    ) -> list[TrainRow]:
        """The rows to train on (``summary`` gets the counts recorded with the adapter)."""
        weight = ctx.options.feedback_weight
        summary["feedback_rows"] = len(feedback)
        summary["feedback_weight"] = weight if feedback else 0
        return [*dataset.train, *(row for row in feedback for _ in range(weight))]

    def prepare(self, ctx: MethodContext) -> PreparedData:
        options = ctx.options
        dataset = load_dataset(ctx.datasets_dir, options.dataset)
        summary: dict[str, Any] = {
            "dataset": dataset.name,
            "dataset_train_rows": len(dataset.train),
            "dataset_validation_rows": len(dataset.validation),
        }
        feedback: list[TrainRow] = []
        feedback_hash = None
        if options.feedback is not None:
            feedback, feedback_hash = load_feedback(options.feedback, ctx.prompt)
            feedback = _fit_feedback(ctx, feedback, summary) if feedback else []
        rows = self.train_rows(ctx, dataset, feedback, summary)
        stats = EncodeStats()
        kwargs = {
            "max_input": options.model.max_input_tokens,
            "max_target": options.max_target_tokens,
            "vocab_size": ctx.vocab_size,
        }
        train, _ = encode_rows(ctx.tokenizer, rows, stats=stats, **kwargs)
        val_rows = subset(dataset.validation, options.eval_max_samples)
        validation, val_kept = encode_rows(ctx.tokenizer, val_rows, stats=stats, **kwargs)
        summary.update(
            train_examples=len(train),
            validation_examples=len(validation),
            dropped_long_input=stats.dropped_long_input,
            truncated_target=stats.truncated_target,
        )
        if not train:
            raise TrainingError(
                f"no training examples left in {dataset.folder} (rows: {stats.rows}, "
                f"over the {options.model.max_input_tokens}-token input budget: "
                f"{stats.dropped_long_input})"
            )
        data_hash = hash_strings(
            [
                self.name,
                dataset.dataset_hash,
                feedback_hash or "",
                str(options.feedback_weight),
                str(options.feedback_replay),
            ]
        )
        return PreparedData(train, validation, val_kept, dataset, data_hash, summary)

    def setup(self, model: Any, scorer: Any, data: PreparedData) -> dict[str, Any]:
        return {}

    def heldout_metrics(self, scorer: Any, data: PreparedData) -> dict[str, float]:
        return {}

    def collate(self, examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
        return collate_seq2seq(examples, pad_id)

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
        """Mean token loss of one micro-batch, and its label-token count."""
        nll, n = seq2seq_token_nll(model, batch)
        return nll / max(n, 1), n


def _fit_feedback(
    ctx: MethodContext, rows: list[TrainRow], summary: dict[str, Any]
) -> list[TrainRow]:
    """Feedback rows cut to the input budget (oldest context turns first)."""

    def count(text: str) -> int:
        return len(ctx.tokenizer(text, add_special_tokens=False).input_ids)

    fitted = []
    for row in rows:
        fit = fit_to_budget(row, ctx.prompt, count, ctx.options.model.max_input_tokens)
        if fit is not None:
            fitted.append(fit)
    summary["feedback_dropped_long"] = len(rows) - len(fitted)
    return fitted

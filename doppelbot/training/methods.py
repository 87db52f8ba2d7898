"""Training methods: what data a run learns from and which loss it minimises.

``doppelbot train --method NAME`` picks one from ``METHODS``. A method prepares tokenized
examples (train and held-out), batches them and computes a loss; the trainer around it —
accumulation, checkpoints, resume, logging, the adapter export — is the same for every method.

- ``sft``: the dataset's train split (plus feedback positives, repeated ``feedback_weight``
  times, when ``--feedback`` is given); starts from a new LoRA or continues ``--init-adapter``.
- ``feedback``: continues an existing adapter (the served one by default) on the feedback
  positives, replaying dataset rows alongside so the model does not forget the owner's style.

- ``dpo``: preference tuning on feedback pairs (``doppelbot.training.dpo``), which plugs in by
  subclassing ``TrainingMethod`` with its own examples, ``collate``, ``loss``, ``setup`` (the
  frozen reference) and ``heldout_metrics``, and adds itself with ``register_method``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doppelbot.errors import TrainingError
from doppelbot.training.data import (
    DatasetSplits,
    TrainRow,
    fit_to_budget,
    hash_strings,
    load_dataset,
    load_feedback,
)

if TYPE_CHECKING:
    from doppelbot.prompt import PromptFormat
    from doppelbot.training.trainer import TrainOptions

IGNORE_INDEX = -100  # label positions the loss skips (padding)


@dataclass(frozen=True, slots=True)
class Example:
    """One tokenized seq2seq example."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids) + len(self.labels)


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
    from doppelbot.model.tokenizer import safe_ids

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


def seq2seq_token_nll(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Summed token negative log-likelihood of the labels, and the number of label tokens."""
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
        logits.view(-1, logits.size(-1)),
        labels.view(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll, int((labels != IGNORE_INDEX).sum())


@dataclass
class MethodContext:
    options: TrainOptions
    tokenizer: Any
    vocab_size: int
    datasets_dir: Path
    prompt: PromptFormat


@dataclass
class PreparedData:
    train: list[Example]
    validation: list[Example]
    validation_rows: list[TrainRow]
    dataset: DatasetSplits
    data_hash: str
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def max_source_len(self) -> int:
        return max((len(e.input_ids) for e in [*self.train, *self.validation]), default=1)

    @property
    def max_target_len(self) -> int:
        return max((len(e.labels) for e in [*self.train, *self.validation]), default=1)


class TrainingMethod:
    """Supervised seq2seq fine-tuning on ``model_input → model_target`` (the ``sft`` method)."""

    name = "sft"
    description = "supervised fine-tuning on the dataset (+ feedback positives with --feedback)"
    rows_per_example = 1  # model rows one example becomes in a batch (memory pre-flight)

    def initial_adapter(self, ctx: MethodContext) -> Path | None:
        return ctx.options.init_adapter

    def _feedback_rows(self, ctx: MethodContext) -> tuple[list[TrainRow], str | None]:
        path = ctx.options.feedback
        if path is None:
            return [], None
        rows, digest = load_feedback(path, ctx.prompt)
        return rows, digest

    def _fit_feedback(
        self, ctx: MethodContext, rows: list[TrainRow], summary: dict[str, Any]
    ) -> list[TrainRow]:
        def count(text: str) -> int:
            return len(ctx.tokenizer(text, add_special_tokens=False).input_ids)

        fitted = []
        for row in rows:
            fit = fit_to_budget(row, ctx.prompt, count, ctx.options.max_input_tokens)
            if fit is not None:
                fitted.append(fit)
        summary["feedback_dropped_long"] = len(rows) - len(fitted)
        return fitted

    def train_rows(
        self,
        ctx: MethodContext,
        dataset: DatasetSplits,
        feedback: list[TrainRow],
        summary: dict[str, Any],
    ) -> list[TrainRow]:
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
        feedback, feedback_hash = self._feedback_rows(ctx)
        feedback = self._fit_feedback(ctx, feedback, summary) if feedback else []
        rows = self.train_rows(ctx, dataset, feedback, summary)
        stats = EncodeStats()
        kwargs = {
            "max_input": options.max_input_tokens,
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
                f"over the {options.max_input_tokens}-token input budget: "
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
        """Called once the starting model is loaded and before a checkpoint is restored (so it
        sees the starting policy, on resume too); returns figures for the run's metrics."""
        return {}

    def heldout_metrics(self, scorer: Any, data: PreparedData) -> dict[str, float]:
        """Method-specific held-out figures, measured before the first step and at the end."""
        return {}

    def collate(self, examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
        return collate_seq2seq(examples, pad_id)

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
        """Mean token loss of one micro-batch, and its label-token count."""
        nll, n = seq2seq_token_nll(model, batch)
        return nll / max(n, 1), n


class FeedbackMethod(TrainingMethod):
    """Continue an adapter on the owner's feedback positives, with dataset replay."""

    name = "feedback"
    description = "continue an adapter on feedback positives (--feedback), replaying dataset rows"

    def initial_adapter(self, ctx: MethodContext) -> Path | None:
        if ctx.options.init_adapter is None:
            raise TrainingError(
                "--method feedback continues an existing adapter: give --init-adapter, or "
                "choose one with `doppelbot adapter use` first"
            )
        return ctx.options.init_adapter

    def train_rows(
        self,
        ctx: MethodContext,
        dataset: DatasetSplits,
        feedback: list[TrainRow],
        summary: dict[str, Any],
    ) -> list[TrainRow]:
        if ctx.options.feedback is None:
            raise TrainingError("--method feedback needs --feedback PATH (feedback export JSONL)")
        if not feedback:
            raise TrainingError(f"{ctx.options.feedback} holds no usable feedback positives")
        weighted = [row for row in feedback for _ in range(ctx.options.feedback_weight)]
        n_replay = min(len(dataset.train), round(len(weighted) * ctx.options.feedback_replay))
        # Seeded, so a resumed run sees the very same replay rows.
        replay = random.Random(f"replay:{ctx.options.seed}").sample(list(dataset.train), n_replay)
        summary.update(
            feedback_rows=len(feedback),
            feedback_weight=ctx.options.feedback_weight,
            replay_rows=n_replay,
        )
        return [*weighted, *replay]


METHODS: dict[str, TrainingMethod] = {}


def register_method(method: TrainingMethod) -> None:
    METHODS[method.name] = method


register_method(TrainingMethod())
register_method(FeedbackMethod())


def get_method(name: str) -> TrainingMethod:
    from doppelbot.training import dpo  # noqa: F401  (registers ``dpo``; it imports this module)

    try:
        return METHODS[name]
    except KeyError:
        raise TrainingError(
            f"unknown training method {name!r} (available: {', '.join(sorted(METHODS))})"
        ) from None

"""Held-out evaluation of adapters on the dataset's validation split.

For each adapter (or the base model alone): token loss and perplexity of the owner's real
replies, and — from greedy generations — chrF against the real replies, style statistics
(length, emoji, punctuation) beside the same statistics of the real replies, distinct-n and
repetition. Several adapters share one loaded base model and the same validation subset, so
the comparison is side by side.

Metrics live in the ``METRICS`` registry: a later metric (e.g. preference accuracy on held-out
pairs) is one ``register_metric`` call, and it gets the shared ``Scorer`` for model
likelihoods.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from doppelbot.config import (
    SECTION_CONFIG,
    GenerationOptions,
    ModelSettings,
    NewTokens,
    TrainSettings,
    default_of,
)
from doppelbot.core.errors import EmptyReplyError, TrainingError
from doppelbot.core.prompt import decode_reply
from doppelbot.model.loader import resolve_device
from doppelbot.model.local import model_source
from doppelbot.model.tokenizer import load_tokenizer
from doppelbot.training.data import TrainRow, load_dataset
from doppelbot.training.dpo import encode_pairs, score_pairs
from doppelbot.training.metrics import corpus_chrf, diversity_stats, style_stats
from doppelbot.training.modeling import (
    load_adapter_for_eval,
    load_base_model,
    load_config,
    resolve_precision,
)
from doppelbot.training.registry import cached_eval, heldout_key, store_eval
from doppelbot.training.seq2seq import (
    collate_seq2seq,
    encode_rows,
    seq2seq_token_nll,
    sequence_logprobs,
    subset,
)
from doppelbot.training.types import Example, TrainOptions


# --- model-side primitives ---------------------------------------------------------------------
class Scorer:
    """Likelihoods and generations of one loaded model (with its active adapter)."""

    def __init__(self, model: Any, tokenizer: Any, *, device: Any, batch_size: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = max(1, batch_size)
        self.pad_id = int(tokenizer.pad_token_id or 0)

    def _batches(self, items: Sequence[Any]) -> Iterator[Sequence[Any]]:
        for start in range(0, len(items), self.batch_size):
            yield items[start : start + self.batch_size]

    def _on_device(self, examples: Sequence[Example]) -> Iterator[dict[str, Any]]:
        for chunk in self._batches(examples):
            yield {k: v.to(self.device) for k, v in collate_seq2seq(chunk, self.pad_id).items()}

    @contextmanager
    def _scoring(self) -> Iterator[None]:
        """Eval mode without gradients; the model's mode is restored afterwards (the trainer
        scores between steps)."""
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def token_nll(self, examples: Sequence[Example]) -> tuple[float, int]:
        """Summed token NLL over ``examples`` and the number of target tokens."""
        total, count = 0.0, 0
        with self._scoring():
            for batch in self._on_device(examples):
                nll, n = seq2seq_token_nll(self.model, batch)
                total += float(nll)
                count += n
        return total, count

    def mean_loss(self, examples: Sequence[Example]) -> float:
        total, count = self.token_nll(examples)
        if count == 0:
            raise TrainingError("no validation tokens to evaluate")
        return total / count

    def sequence_logprobs(self, examples: Sequence[Example]) -> list[float]:
        """Log-probability of each example's target given its input (for preference metrics)."""
        out: list[float] = []
        with self._scoring():
            for batch in self._on_device(examples):
                out += [float(x) for x in sequence_logprobs(self.model, batch)]
        return out

    def generate(self, examples: Sequence[Example], *, max_new_tokens: int) -> list[str]:
        """Greedy replies, decoded exactly as the bot decodes them ('' when empty)."""
        import torch

        replies: list[str] = []
        self.model.eval()
        with torch.no_grad():
            for chunk in self._batches(examples):
                batch = collate_seq2seq(chunk, self.pad_id)
                out = self.model.generate(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                )
                for ids in out.tolist():
                    raw = self.tokenizer.decode(ids, skip_special_tokens=False)
                    try:
                        replies.append(decode_reply(raw))
                    except EmptyReplyError:
                        replies.append("")
        return replies


# --- the metric registry ------------------------------------------------------------------------
@dataclass
class EvalContext:
    adapter: Path | None
    rows: Sequence[TrainRow]
    examples: Sequence[Example]
    references: list[str]
    scorer: Scorer
    generations: list[str] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricSpec:
    """One metric group. ``reference`` computes the same statistics on the owner's real
    replies (shown as their own column)."""

    name: str
    compute: Callable[[EvalContext], dict[str, float]]
    needs_generations: bool = False
    reference: Callable[[Sequence[str]], dict[str, float]] | None = None


def _loss(ctx: EvalContext) -> dict[str, float]:
    loss = ctx.scorer.mean_loss(ctx.examples)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def _chrf(ctx: EvalContext) -> dict[str, float]:
    assert ctx.generations is not None
    return {"chrf": corpus_chrf(ctx.generations, ctx.references)}


def _style(ctx: EvalContext) -> dict[str, float]:
    assert ctx.generations is not None
    return style_stats(ctx.generations)


def _diversity(ctx: EvalContext) -> dict[str, float]:
    assert ctx.generations is not None
    return diversity_stats(ctx.generations)


def _preference(ctx: EvalContext) -> dict[str, float]:
    """Preference accuracy and mean log-prob margin on held-out pairs (``extras["pairs"]``:
    ``PairRow``s, with ``max_input``/``max_target``); nothing when no pairs were given."""
    pairs = ctx.extras.get("pairs")
    if not pairs:
        return {}
    encoded = ctx.extras.get("_pairs_encoded")
    if encoded is None:  # once per evaluation: every adapter scores the same pairs
        encoded = encode_pairs(
            ctx.scorer.tokenizer,
            pairs,
            max_input=int(ctx.extras["max_input"]),
            max_target=int(ctx.extras["max_target"]),
            vocab_size=int(ctx.scorer.model.config.vocab_size),
        )
        ctx.extras["_pairs_encoded"] = encoded
    return score_pairs(ctx.scorer, encoded).metrics()


METRICS: dict[str, MetricSpec] = {
    "loss": MetricSpec("loss", _loss),
    "chrf": MetricSpec("chrf", _chrf, needs_generations=True),
    "style": MetricSpec("style", _style, needs_generations=True, reference=style_stats),
    "diversity": MetricSpec(
        "diversity", _diversity, needs_generations=True, reference=diversity_stats
    ),
    "preference": MetricSpec("preference", _preference),
}


def register_metric(spec: MetricSpec) -> None:
    METRICS[spec.name] = spec


# --- evaluation runs ----------------------------------------------------------------------------
@pydantic_dataclass(frozen=True, config=SECTION_CONFIG)
class EvalOptions(TrainSettings):
    """One evaluation: the train section of the settings (the validation subset
    ``eval_max_samples``, ``precision``, ``batch_size``, ``max_target_tokens`` — as training
    measures its held-out loss), the model section, and this evaluation's choices."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    max_new_tokens: NewTokens = default_of(GenerationOptions, "max_new_tokens")
    dataset: str | Path | None = None
    metrics: tuple[str, ...] | None = None  # None = all registered
    use_cache: bool = True
    # Set: ``model.base`` may be a hub id downloaded into this data directory. Resolved only
    # when the model is loaded (cached evaluations need no model).
    data_dir: Path | None = None

    @property
    def files(self) -> str:
        """Where the base model's files are read from."""
        if self.data_dir is None:
            return self.model.base
        return model_source(self.model.base, self.data_dir)


@dataclass
class EvalReport:
    label: str
    adapter: Path | None
    metrics: dict[str, float]
    samples: int
    generations: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "adapter": None if self.adapter is None else str(self.adapter),
            "samples": self.samples,
            "metrics": self.metrics,
        }


@dataclass
class Comparison:
    dataset: str
    dataset_folder: Path
    validation_hash: str
    samples: int
    reports: list[EvalReport]
    reference: dict[str, float]
    references: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "dataset_folder": str(self.dataset_folder),
            "validation_hash": self.validation_hash,
            "samples": self.samples,
            "reports": [r.to_json() for r in self.reports],
            "owner_reference": self.reference,
        }


@contextmanager
def _active(model: Any, name: str | None) -> Iterator[None]:
    """Select one adapter of a multi-adapter model, or none (the base model alone)."""
    if name is None:
        disable = getattr(model, "disable_adapter", None)
        with disable() if disable is not None else nullcontext():
            yield
    else:
        model.set_adapter(name)
        yield


def selected_metrics(names: Sequence[str] | None) -> list[MetricSpec]:
    if names is None:
        return list(METRICS.values())
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise TrainingError(
            f"unknown metric(s) {', '.join(unknown)} (available: {', '.join(METRICS)})"
        )
    return [METRICS[n] for n in names]


def evaluate_adapters(
    options: EvalOptions,
    adapters: Sequence[Path | None],
    *,
    datasets_dir: Path,
    labels: Sequence[str] | None = None,
    extras: dict[str, Any] | None = None,
) -> Comparison:
    """Evaluate each adapter (None = base model) on the same validation subset."""
    import torch

    specs = selected_metrics(options.metrics)
    dataset = load_dataset(datasets_dir, options.dataset)
    rows = subset(dataset.validation, options.eval_max_samples)
    if not rows:
        raise TrainingError(f"{dataset.folder} has an empty validation split")
    if options.model.torch_threads:
        torch.set_num_threads(options.model.torch_threads)
    device = resolve_device(options.model.device)
    precision = resolve_precision(options.precision, device)
    tokenizer = load_tokenizer(options.files)
    config = load_config(options.files)
    examples, kept = encode_rows(
        tokenizer,
        rows,
        max_input=options.model.max_input_tokens,
        max_target=options.max_target_tokens,
        vocab_size=int(config.vocab_size),
    )
    if not examples:
        raise TrainingError("no validation example fits the input budget")
    references = [r.reply for r in kept]
    base = load_base_model(options.files, device=device, precision=precision)
    real = [a for a in adapters if a is not None]
    model, names = load_adapter_for_eval(base, real)
    name_of = dict(zip([str(a) for a in real], names, strict=True))
    model.eval()
    scorer = Scorer(model, tokenizer, device=base.device, batch_size=options.batch_size)
    key = heldout_cache_key(options, dataset.validation_hash, precision)
    need_gen = any(s.needs_generations for s in specs)
    shared = extras if extras is not None else {}  # one dict: metrics may cache in it
    reports = []
    for i, adapter in enumerate(adapters):
        label = labels[i] if labels else ("base" if adapter is None else adapter.name)
        with _active(model, None if adapter is None else name_of[str(adapter)]):
            ctx = EvalContext(adapter, kept, examples, references, scorer, extras=shared)
            if need_gen:
                ctx.generations = scorer.generate(examples, max_new_tokens=options.max_new_tokens)
            metrics: dict[str, float] = {}
            for spec in specs:
                metrics.update(spec.compute(ctx))
        reports.append(EvalReport(label, adapter, metrics, len(examples), ctx.generations or []))
        if adapter is not None and options.use_cache:
            # The cache key names the validation split, not a pairs file: keep pref_* out.
            store_eval(
                adapter, key, {k: v for k, v in metrics.items() if not k.startswith("pref_")}
            )
    reference: dict[str, float] = {}
    for spec in specs:
        if spec.reference is not None:
            reference.update(spec.reference(references))
    return Comparison(
        dataset.name,
        dataset.folder,
        dataset.validation_hash,
        len(examples),
        reports,
        reference,
        references,
    )


def heldout_cache_key(
    options: TrainOptions | EvalOptions, validation_hash: str, precision: str
) -> str:
    """The key a held-out evaluation is cached under in an adapter's folder (written by the
    export after training, read by every later evaluation)."""
    return heldout_key(
        validation_hash,
        options.eval_max_samples,
        options.model.max_input_tokens,
        options.max_target_tokens,
        precision,
    )


def heldout_losses(
    options: EvalOptions, adapters: Sequence[Path], *, datasets_dir: Path
) -> list[float]:
    """Held-out loss of each adapter on the current validation split, from the adapter's
    cached evaluation when the split, subset and lengths are the same, else measured now."""
    dataset = load_dataset(datasets_dir, options.dataset)
    precision = resolve_precision(options.precision, resolve_device(options.model.device))
    key = heldout_cache_key(options, dataset.validation_hash, precision)
    losses: dict[str, float] = {}
    missing = []
    for adapter in adapters:
        cached = cached_eval(adapter, key) if options.use_cache else None
        if cached is not None and "loss" in cached:
            losses[str(adapter)] = float(cached["loss"])
        else:
            missing.append(adapter)
    if missing:
        opts = replace(options, metrics=("loss",))
        comparison = evaluate_adapters(opts, missing, datasets_dir=datasets_dir)
        for report in comparison.reports:
            losses[str(report.adapter)] = report.metrics["loss"]
    return [losses[str(a)] for a in adapters]

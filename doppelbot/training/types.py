"""The types every training module shares: the run's options, a tokenized example, the data a
method prepares, and what a training method is.

They live apart from the modules that use them so that the methods, the evaluation and the loop
can all import them without importing one another. Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from doppelbot.model.local import model_source
from doppelbot.training.data import DatasetSplits, TrainRow

if TYPE_CHECKING:
    from doppelbot.config import Settings
    from doppelbot.prompt import PromptFormat

IGNORE_INDEX = -100  # label positions the loss skips (padding)


@dataclass(frozen=True)
class TrainOptions:
    """Everything one training run depends on (built from Settings + CLI overrides)."""

    model: str  # as configured: a hub id or a folder (recorded with the adapter)
    method: str = "sft"
    dataset: str | None = None
    feedback: Path | None = None
    init_adapter: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 6
    grad_accum: int = 8
    lr: float = 1e-3
    save_steps: int = 20
    resume: bool = True
    run_name: str | None = None
    seed: int = 42
    gradient_checkpointing: bool = True
    preflight: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q", "v")
    max_input_tokens: int = 712
    max_target_tokens: int = 64
    keep_checkpoints: int = 3
    eval_max_samples: int = 200
    eval_batch_size: int = 8
    feedback_weight: int = 2
    feedback_replay: float = 1.0
    pairs: Path | None = None  # dpo: preference pairs JSONL
    dpo_beta: float = 0.1
    pref_heldout_share: float = 0.2
    persona: str = ""
    role_other: str = "Собеседник"
    role_owner: str = "Я"
    torch_threads: int | None = None
    model_files: str | None = None  # the local folder of ``model`` when that is a hub id

    @property
    def files(self) -> str:
        """Where the base model's files are read from."""
        return self.model_files or self.model

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TrainOptions:
        """Options from ``settings`` and the CLI; the base model must be on this machine
        (``doppelbot model download``), which is checked here, before anything loads."""
        base = cls(
            model=settings.model,
            device=settings.device,
            precision=settings.train_precision,
            epochs=settings.train_epochs,
            batch_size=settings.batch_size,
            grad_accum=settings.grad_accum_steps,
            lr=settings.learning_rate,
            save_steps=settings.save_steps,
            seed=settings.train_seed,
            gradient_checkpointing=settings.gradient_checkpointing,
            lora_r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            lora_targets=tuple(settings.lora_targets),
            max_input_tokens=settings.max_input_tokens,
            max_target_tokens=settings.max_target_tokens,
            keep_checkpoints=settings.keep_checkpoints,
            eval_max_samples=settings.eval_max_samples,
            feedback_weight=settings.feedback_weight,
            feedback_replay=settings.feedback_replay,
            dpo_beta=settings.dpo_beta,
            pref_heldout_share=settings.pref_heldout_share,
            persona=settings.persona,
            role_other=settings.role_other,
            role_owner=settings.role_owner,
            torch_threads=settings.torch_threads,
        )
        options = replace(base, **{k: v for k, v in overrides.items() if v is not None})
        if options.model_files is None:
            options = replace(options, model_files=model_source(options.model, settings.data_dir))
        return options

    def trajectory(self) -> dict[str, Any]:
        """The settings that decide every step's numbers. A run resumes only under the same
        trajectory; the length (steps, epochs) and the save cadence may change between tries."""
        extra = {"dpo_beta": self.dpo_beta} if self.method == "dpo" else {}
        return {
            **extra,
            "method": self.method,
            "model": self.model,
            "init_adapter": None if self.init_adapter is None else str(self.init_adapter),
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "lr": self.lr,
            "seed": self.seed,
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "lora_targets": list(self.lora_targets),
            "max_input_tokens": self.max_input_tokens,
            "max_target_tokens": self.max_target_tokens,
        }


@dataclass(frozen=True, slots=True)
class Example:
    """One tokenized seq2seq example."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids) + len(self.labels)


@dataclass
class MethodContext:
    """What a method prepares its data with."""

    options: TrainOptions
    tokenizer: Any
    vocab_size: int
    datasets_dir: Path
    prompt: PromptFormat


@dataclass
class PreparedData:
    """A method's tokenized examples: the ones it trains on and the held-out ones."""

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


class TrainingMethod(Protocol):
    """What data a run learns from and which loss it minimises (``doppelbot train --method``).

    The trainer around a method — accumulation, checkpoints, resume, logging, the adapter
    export — is the same for every method. ``scorer`` is an ``evaluate.Scorer`` of the model
    being trained."""

    name: str
    description: str
    rows_per_example: int  # model rows one example becomes in a batch (memory pre-flight)

    def initial_adapter(self, ctx: MethodContext) -> Path | None:
        """The adapter the run continues (None: a new LoRA); checked before any data loads."""
        ...

    def prepare(self, ctx: MethodContext) -> PreparedData: ...

    def setup(self, model: Any, scorer: Any, data: PreparedData) -> dict[str, Any]:
        """Called once the starting model is loaded and before a checkpoint is restored (so it
        sees the starting policy, on resume too); returns figures for the run's metrics."""
        ...

    def heldout_metrics(self, scorer: Any, data: PreparedData) -> dict[str, float]:
        """Method-specific held-out figures, measured before the first step and at the end."""
        ...

    def collate(self, examples: Sequence[Any], pad_id: int) -> dict[str, Any]: ...

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
        """The loss of one micro-batch (what is back-propagated), and its size."""
        ...

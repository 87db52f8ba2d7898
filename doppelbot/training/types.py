"""The types every training module shares: the run's options, a tokenized example, the data a
method prepares, and what a training method is.

They live apart from the modules that use them so that the methods, the evaluation and the loop
can all import them without importing one another. Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from doppelbot.config import SECTION_CONFIG, ModelSettings, PromptSettings, TrainSettings
from doppelbot.training.data import DatasetSplits, TrainRow

if TYPE_CHECKING:
    from doppelbot.core.prompt import PromptFormat

IGNORE_INDEX = -100  # label positions the loss skips (padding)


@pydantic_dataclass(frozen=True, config=SECTION_CONFIG)
class TrainOptions(TrainSettings):
    """Everything one training run depends on: the train section of the settings, the model
    section (``model.base`` as configured — a hub id or a folder, recorded with the adapter —
    its device, threads and input budget) and the prompt, with this run's choices
    (``doppelbot.training.service.train_options`` builds it from Settings and the CLI)."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    prompt: PromptSettings = Field(default_factory=PromptSettings)
    method: str = "sft"
    dataset: str | None = None
    feedback: Path | None = None
    init_adapter: Path | None = None
    max_steps: int | None = None
    resume: bool = True
    run_name: str | None = None
    preflight: bool = True
    eval_batch_size: int = 8
    pairs: Path | None = None  # dpo: preference pairs JSONL
    model_files: str | None = None  # the local folder of ``model.base`` when that is a hub id

    @property
    def files(self) -> str:
        """Where the base model's files are read from."""
        return self.model_files or self.model.base

    def trajectory(self) -> dict[str, Any]:
        """The settings that decide every step's numbers. A run resumes only under the same
        trajectory; the length (steps, epochs) and the save cadence may change between tries."""
        extra = {"dpo_beta": self.dpo_beta} if self.method == "dpo" else {}
        return {
            **extra,
            "method": self.method,
            "model": self.model.base,
            "init_adapter": None if self.init_adapter is None else str(self.init_adapter),
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "lr": self.lr,
            "seed": self.seed,
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "lora_targets": list(self.lora_targets),
            "max_input_tokens": self.model.max_input_tokens,
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

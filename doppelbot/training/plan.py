"""Everything decided about a run before the model loads: its data, its steps, its memory.

``doppelbot train --dry-run`` prints this plan and stops; ``trainer.train`` follows it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from doppelbot.model.loader import resolve_device
from doppelbot.model.tokenizer import load_tokenizer
from doppelbot.training.methods import get_method
from doppelbot.training.modeling import load_config, resolve_precision
from doppelbot.training.preflight import ModelShape, PreflightReport, TrainingSetup, preflight
from doppelbot.training.types import MethodContext, PreparedData, TrainOptions


@dataclass(frozen=True)
class Plan:
    device: str
    precision: str
    world_size: int
    total_steps: int
    steps_per_epoch: int
    train_examples: int
    validation_examples: int
    examples_per_step: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def method_context(
    options: TrainOptions, *, datasets_dir: Path, tokenizer: Any, vocab_size: int
) -> MethodContext:
    return MethodContext(
        options=options,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        datasets_dir=datasets_dir,
        prompt=options.prompt.format,
    )


def make_plan(
    options: TrainOptions, data: PreparedData, *, device: str, precision: str, world: int
) -> Plan:
    per_step = options.batch_size * options.grad_accum * world
    steps_per_epoch = max(1, math.ceil(len(data.train) / per_step))
    total = options.max_steps or max(1, math.ceil(options.epochs * len(data.train) / per_step))
    return Plan(
        device=device,
        precision=precision,
        world_size=world,
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        train_examples=len(data.train),
        validation_examples=len(data.validation),
        examples_per_step=per_step,
    )


@dataclass
class PlannedRun:
    data: PreparedData
    plan: Plan
    preflight: PreflightReport
    tokenizer: Any
    init_adapter: Path | None


def plan_training(
    options: TrainOptions, *, datasets_dir: Path, world: int = 1, device: str | None = None
) -> PlannedRun:
    """Everything decided before loading the model: the data, the step plan and the memory
    estimate (``doppelbot train --dry-run`` prints this and stops)."""
    device = device or resolve_device(options.model.device)
    precision = resolve_precision(options.precision, device)
    tokenizer = load_tokenizer(options.files)
    config = load_config(options.files)
    method = get_method(options.method)
    ctx = method_context(
        options, datasets_dir=datasets_dir, tokenizer=tokenizer, vocab_size=int(config.vocab_size)
    )
    init_adapter = method.initial_adapter(ctx)  # checked before any data or model is loaded
    data = method.prepare(ctx)
    plan = make_plan(options, data, device=device, precision=precision, world=world)
    setup = TrainingSetup(
        precision=precision,
        device=device,
        batch_size=options.batch_size * method.rows_per_example,
        source_len=data.max_source_len,
        target_len=data.max_target_len,
        lora_r=options.lora_r,
        lora_targets=tuple(options.lora_targets),
        gradient_checkpointing=options.gradient_checkpointing,
    )
    report = preflight(ModelShape.from_config(config), setup)
    return PlannedRun(data, plan, report, tokenizer, init_adapter)

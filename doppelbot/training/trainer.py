"""The fine-tuning loop: LoRA on FRED-T5, resumable to the exact step, one adapter per run.

We run our own small loop on ``accelerate.Accelerator`` rather than the HF ``Trainer``: it is
short enough to read, it makes exact resumption simple to guarantee (the data order is a pure
function of the seed and the example position; RNG, optimizer and scheduler states are saved
with every checkpoint), and ``accelerate launch`` distributes it over several GPUs without any
distribution code of ours.

A run lives in ``runs_dir/<run name>/``: ``run.json`` (what the run is — its fingerprint, the
plan, its status), ``log.jsonl`` (one line per optimizer step), ``loss.png`` and
``checkpoints/step-NNNNNNN/``. Running the same command again (same data and trajectory
settings) finds the unfinished run and continues it from its newest checkpoint. The result is
a versioned adapter folder under ``adapters_dir`` (see ``registry``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doppelbot.dataset.jsonl import atomic_write_text, write_json
from doppelbot.errors import TrainingError, TrainingInterruptedError
from doppelbot.training import checkpoint as ckpt
from doppelbot.training.data import hash_strings, prompt_format
from doppelbot.training.methods import Example, MethodContext, PreparedData, get_method
from doppelbot.training.registry import (
    META_FILE,
    heldout_key,
    next_adapter_name,
    read_json,
    write_meta,
)

if TYPE_CHECKING:
    from rich.console import Console

    from doppelbot.config import Settings

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
LOCK_FILE = ".lock"


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
        from doppelbot.model.local import model_source

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


@dataclass(frozen=True)
class StepEvent:
    """What callbacks see after each optimizer step."""

    step: int
    total_steps: int
    loss: float
    run_dir: Path
    checkpoint: Path | None


# A callback may return True to ask for a graceful stop (checkpoint, then exit as Ctrl-C does).
Callback = Callable[[StepEvent], bool | None]


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    metrics: dict[str, Any]
    resumed_from: int | None
    plan: dict[str, Any] = field(default_factory=dict)


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


# --- data order --------------------------------------------------------------------------------
class ExampleStream:
    """Example positions 0, 1, 2, … → examples: epoch ``k`` is a permutation seeded by
    (seed, k), so any position is reproducible without replaying the ones before it."""

    def __init__(self, examples: Sequence[Example], seed: int) -> None:
        self.examples = examples
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            random.Random(f"data:{self.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}  # one epoch at a time is all a run needs
        return self._orders[epoch]

    def take(self, start: int, count: int) -> list[Example]:
        n = len(self.examples)
        return [self.examples[self.order(p // n)[p % n]] for p in range(start, start + count)]


# --- run folders -------------------------------------------------------------------------------
def _read_run(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / RUN_FILE)


def _write_run(run_dir: Path, meta: dict[str, Any]) -> None:
    write_json(run_dir / RUN_FILE, {**meta, "updated_at": int(time.time())})


class RunLock:
    """An exclusive lock on a run folder, so two processes never train into one run."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fh: Any = None

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: trust the user
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        self._fh = fh
        return True

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def locate_run(
    runs_dir: Path, options: TrainOptions, fingerprint: str
) -> tuple[Path, RunLock, bool]:
    """The run folder to train in, locked, and whether it may hold a checkpoint to resume."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    if options.run_name:
        run_dir = runs_dir / options.run_name
        lock = RunLock(run_dir)
        if not lock.acquire():
            raise TrainingError(f"run {options.run_name} is being trained by another process")
        meta = _read_run(run_dir)
        if meta:
            problem = None
            if meta.get("fingerprint") != fingerprint:
                problem = "was started with different data or settings"
            elif meta.get("status") == "finished":
                problem = f"has already finished (adapter {meta.get('adapter')})"
            elif not options.resume:
                problem = "exists and --no-resume would restart it from scratch"
            if problem:
                lock.release()
                raise TrainingError(f"run {options.run_name} {problem}; choose another --run-name")
            return run_dir, lock, True
        return run_dir, lock, False
    if options.resume:
        candidates = []
        for path in runs_dir.iterdir():
            meta = _read_run(path) if path.is_dir() else {}
            if meta.get("fingerprint") == fingerprint and meta.get("status") != "finished":
                candidates.append((int(meta.get("updated_at", 0)), path))
        for _, path in sorted(candidates, reverse=True):
            lock = RunLock(path)
            if lock.acquire():
                return path, lock, True
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        run_dir = runs_dir / (f"{options.method}-{stamp}" + (f"-{i}" if i else ""))
        if run_dir.exists():
            continue
        lock = RunLock(run_dir)
        if lock.acquire():
            return run_dir, lock, False
    raise TrainingError(f"cannot create a run folder in {runs_dir}")


def _truncate_log(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """Keep the log lines up to the resumed checkpoint (later steps will be redone)."""
    path = run_dir / LOG_FILE
    entries = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if int(entry.get("step", 0)) <= step:
                entries.append(entry)
    atomic_write_text(path, [json.dumps(e) + "\n" for e in entries])
    return entries


def plot_loss(
    path: Path, entries: Sequence[dict[str, Any]], val: Sequence[tuple[int, float]]
) -> None:
    """Loss curve PNG (matplotlib's Agg canvas directly: no pyplot global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [int(e["step"]) for e in entries]
    ax.plot(steps, [float(e["loss"]) for e in entries], label="train loss", linewidth=1.2)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


@contextlib.contextmanager
def _graceful_sigint(flag: dict[str, bool]) -> Iterator[None]:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second: stop at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if flag.get("stop"):
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag["stop"] = True
        log.warning("stopping after this step (checkpoint first); Ctrl-C again to abort now")

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --- progress ----------------------------------------------------------------------------------
class _Progress:
    def __init__(self, console: Console | None, total: int, start: int) -> None:
        self._progress = None
        self._task: Any = None
        if console is None:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._progress.add_task(
            "train", total=total, completed=start, loss="–", tps="–"
        )
        self._progress.start()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task, completed=step, loss=f"{loss:.4f}", tps=f"{tokens_per_s:,.0f}"
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


# --- the run ----------------------------------------------------------------------------------
def make_accelerator(device: str) -> Any:
    """The run's ``Accelerator``, on ``device`` (``cpu``/``cuda``) or a ``TrainingError``.

    accelerate keeps ONE device per process: after a CPU run, ``Accelerator(cpu=False)``
    silently stays on the CPU (the CUDA int8 base then gets CPU batches, which bitsandbytes
    answers with an illegal memory access that poisons the CUDA context), and after a CUDA run
    ``cpu=True`` is refused. A single-process state on another device is therefore reset;
    under ``accelerate launch`` (several processes) the launcher's state is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    shared = PartialState._shared_state
    previous = shared.get("device")
    if previous is not None and previous.type != device and shared.get("num_processes", 1) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    # LoRA on a frozen base: every trainable weight gets a gradient each step.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    accelerator = Accelerator(cpu=device == "cpu", kwargs_handlers=[ddp])
    if accelerator.device.type != device:
        raise TrainingError(
            f"the training run was planned on {device}, but accelerate runs this process on "
            f"{accelerator.device} (ACCELERATE_* settings?)"
        )
    return accelerator


def method_context(
    options: TrainOptions, *, datasets_dir: Path, tokenizer: Any, vocab_size: int
) -> MethodContext:
    return MethodContext(
        options=options,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        datasets_dir=datasets_dir,
        prompt=prompt_format(options.persona, options.role_other, options.role_owner),
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
    preflight: Any  # preflight.PreflightReport
    tokenizer: Any
    init_adapter: Path | None


def plan_training(
    options: TrainOptions, *, datasets_dir: Path, world: int = 1, device: str | None = None
) -> PlannedRun:
    """Everything decided before loading the model: the data, the step plan and the memory
    estimate (``doppelbot train --dry-run`` prints this and stops)."""
    from doppelbot.model.tokenizer import load_tokenizer
    from doppelbot.training.modeling import load_config, resolve_device, resolve_precision
    from doppelbot.training.preflight import ModelShape, preflight

    device = device or resolve_device(options.device)
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
    report = preflight(
        ModelShape.from_config(config),
        precision=precision,
        device=device,
        batch_size=options.batch_size * method.rows_per_example,
        source_len=data.max_source_len,
        target_len=data.max_target_len,
        lora_r=options.lora_r,
        lora_targets=options.lora_targets,
        gradient_checkpointing=options.gradient_checkpointing,
    )
    return PlannedRun(data, plan, report, tokenizer, init_adapter)


def train(
    options: TrainOptions,
    *,
    datasets_dir: Path,
    runs_dir: Path,
    adapters_dir: Path,
    console: Console | None = None,
    callbacks: Sequence[Callback] = (),
    on_start: Callable[[Path, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train (or resume) one run and export its adapter. ``on_start(run_dir, run_meta)`` is
    called once the run folder is known (the CLI records the run in SQLite there)."""
    import torch

    from doppelbot.training.modeling import resolve_device

    if options.torch_threads:
        torch.set_num_threads(options.torch_threads)
    method = get_method(options.method)
    device = resolve_device(options.device)
    accelerator = make_accelerator(device)
    world = accelerator.num_processes
    main = accelerator.is_main_process
    planned = plan_training(options, datasets_dir=datasets_dir, world=world, device=device)
    data, plan, report, tokenizer = planned.data, planned.plan, planned.preflight, planned.tokenizer
    if options.preflight:
        from doppelbot.training.preflight import check

        check(report)
    fingerprint = hash_strings([json.dumps(options.trajectory(), sort_keys=True), data.data_hash])

    # One process picks (and locks) the run folder; the others follow it.
    picked: list[Any] = [None, False]
    lock: RunLock | None = None
    if main:
        run_dir, lock, may_resume = locate_run(runs_dir, options, fingerprint)
        picked = [str(run_dir), may_resume]
    if world > 1:
        from accelerate.utils import broadcast_object_list

        picked = broadcast_object_list(picked)
    try:
        return _train_in(
            options,
            method=method,
            accelerator=accelerator,
            data=data,
            plan=plan,
            preflight_info={
                "text": report.describe(),
                "estimate_bytes": report.estimate.total,
                "available_bytes": report.available,
                "fits": report.fits,
            },
            fingerprint=fingerprint,
            run_dir=Path(picked[0]),
            may_resume=bool(picked[1]),
            adapters_dir=adapters_dir,
            console=console if main else None,
            callbacks=callbacks,
            on_start=on_start if main else None,
            tokenizer=tokenizer,
            init_adapter=planned.init_adapter,
        )
    finally:
        if lock is not None:
            lock.release()


def _train_in(
    options: TrainOptions,
    *,
    method: Any,
    accelerator: Any,
    data: PreparedData,
    plan: Plan,
    preflight_info: dict[str, Any],
    fingerprint: str,
    run_dir: Path,
    may_resume: bool,
    adapters_dir: Path,
    console: Console | None,
    callbacks: Sequence[Callback],
    on_start: Callable[[Path, dict[str, Any]], None] | None,
    tokenizer: Any,
    init_adapter: Path | None,
) -> TrainResult:
    import torch
    from transformers import get_constant_schedule
    from transformers.optimization import Adafactor

    from doppelbot.training.evaluate import Scorer
    from doppelbot.training.modeling import (
        load_base_model,
        lora_config,
        prepare_for_training,
        trainable_parameters,
    )

    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if main:
        ckpt.remove_partial(run_dir)
    accelerator.wait_for_everyone()

    # Model: the same seed before the LoRA init makes a fresh run reproducible.
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    device_index = accelerator.local_process_index if plan.device == "cuda" else 0
    base = load_base_model(
        options.files, device=plan.device, precision=plan.precision, device_index=device_index
    )
    model = prepare_for_training(
        base,
        precision=plan.precision,
        lora=lora_config(
            r=options.lora_r,
            alpha=options.lora_alpha,
            dropout=options.lora_dropout,
            targets=options.lora_targets,
        ),
        init_adapter=init_adapter,
        gradient_checkpointing=options.gradient_checkpointing,
    )
    trainable, total_params = trainable_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # The seed's optimizer: Adafactor with a fixed learning rate, no relative steps.
    optimizer = Adafactor(
        params, lr=options.lr, scale_parameter=False, relative_step=False, warmup_init=False
    )
    scheduler = get_constant_schedule(optimizer)
    model = accelerator.prepare(model)
    unwrapped = accelerator.unwrap_model(model)
    device = accelerator.device
    pad_id = int(tokenizer.pad_token_id or 0)
    scorer = Scorer(unwrapped, tokenizer, device=device, batch_size=options.eval_batch_size)
    # Before any checkpoint is restored: the method sees the starting policy (DPO's reference).
    setup_metrics = method.setup(unwrapped, scorer, data)

    state = ckpt.TrainerState(seed=options.seed, world_size=world, data_fingerprint=data.data_hash)
    resumed_from: int | None = None
    entries: list[dict[str, Any]] = []

    def load_checkpoint(folder: Path) -> ckpt.TrainerState:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        loaded = ckpt.read_state(folder)
        if loaded.world_size != world:
            raise TrainingError(
                f"checkpoint {folder.name} was written by {loaded.world_size} processes, "
                f"this run has {world}"
            )
        set_peft_model_state_dict(unwrapped, load_file(str(folder / ckpt.ADAPTER_WEIGHTS)))
        optimizer.load_state_dict(
            torch.load(folder / ckpt.OPTIMIZER_FILE, weights_only=True, map_location=device)
        )
        scheduler.load_state_dict(torch.load(folder / ckpt.SCHEDULER_FILE, weights_only=True))
        ckpt.restore_rng(ckpt.load_rng(folder, rank))
        return loaded

    if may_resume and options.resume:
        found = ckpt.load_latest(run_dir, load_checkpoint)
        if found is not None:
            _, state = found
            resumed_from = state.step
            if main:
                entries = _truncate_log(run_dir, state.step)
    if resumed_from is None and main:
        for stale in (LOG_FILE, PLOT_FILE):
            (run_dir / stale).unlink(missing_ok=True)

    run_meta = _read_run(run_dir) if main else {}
    created = int(run_meta.get("created_at", time.time()))
    run_meta = {
        "name": run_dir.name,
        "method": options.method,
        "fingerprint": fingerprint,
        "status": "running",
        "created_at": created,
        "base_model": options.model,
        "trajectory": options.trajectory(),
        "options": {
            "epochs": options.epochs,
            "max_steps": options.max_steps,
            "save_steps": options.save_steps,
            "gradient_checkpointing": options.gradient_checkpointing,
            "feedback": None if options.feedback is None else str(options.feedback),
            "feedback_weight": options.feedback_weight,
            "feedback_replay": options.feedback_replay,
            "pairs": None if options.pairs is None else str(options.pairs),
            "eval_max_samples": options.eval_max_samples,
        },
        "plan": plan.to_json(),
        "preflight": preflight_info,
        "data": {
            **data.summary,
            "dataset_folder": str(data.dataset.folder),
            "dataset_hash": data.dataset.dataset_hash,
            "data_hash": data.data_hash,
            "validation_hash": data.dataset.validation_hash,
        },
        "parameters": {"trainable": trainable, "total": total_params},
        "resumed_from": resumed_from,
    }
    if main:
        _write_run(run_dir, run_meta)
        if on_start is not None:
            on_start(run_dir, run_meta)
        if state.val_loss_start is None and data.validation:
            state.val_loss_start = scorer.mean_loss(data.validation)
        if "method_start" not in state.extra:
            state.extra["method_start"] = method.heldout_metrics(scorer, data)
    accelerator.wait_for_everyone()

    stream = ExampleStream(data.train, options.seed)
    per_micro = options.batch_size
    progress = _Progress(console, plan.total_steps, state.step)
    stop = {"stop": False}
    saved_step = state.step if resumed_from is not None else -1
    boundary_rng = ckpt.capture_rng()

    def save(step_state: ckpt.TrainerState, rng: dict[str, Any]) -> Path | None:
        nonlocal saved_step
        tmp = run_dir / ckpt.CHECKPOINTS / f".tmp-{ckpt.checkpoint_name(step_state.step)}"
        if main:
            tmp = ckpt.tmp_checkpoint_dir(run_dir, step_state.step)
        accelerator.wait_for_everyone()
        ckpt.save_rng(tmp, rank, rng)
        accelerator.wait_for_everyone()
        final = None
        if main:
            unwrapped.save_pretrained(str(tmp), safe_serialization=True)
            torch.save(optimizer.state_dict(), tmp / ckpt.OPTIMIZER_FILE)
            torch.save(scheduler.state_dict(), tmp / ckpt.SCHEDULER_FILE)
            ckpt.write_state(tmp, step_state)
            final = ckpt.publish_checkpoint(run_dir, tmp, step_state.step, options.keep_checkpoints)
            plot_loss(run_dir / PLOT_FILE, entries, _val_points(state))
        accelerator.wait_for_everyone()
        saved_step = step_state.step
        return final

    log_fh = (run_dir / LOG_FILE).open("a", encoding="utf-8") if main else None
    started = time.perf_counter() - state.elapsed_s
    try:
        with _graceful_sigint(stop):
            while state.step < plan.total_steps:
                model.train()
                step_losses = []
                step_tokens = 0
                t0 = time.perf_counter()
                for micro in range(options.grad_accum):
                    # Global micro-batch index → this process's slice of the example stream.
                    index = (state.step * options.grad_accum + micro) * world + rank
                    examples = stream.take(index * per_micro, per_micro)
                    batch = {k: v.to(device) for k, v in method.collate(examples, pad_id).items()}
                    sync = micro == options.grad_accum - 1
                    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                        loss, _n = method.loss(model, batch)
                        accelerator.backward(loss / options.grad_accum)
                    step_losses.append(loss.detach())
                    step_tokens += sum(e.n_tokens for e in examples)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                mean_loss = torch.stack(step_losses).mean()
                if world > 1:
                    mean_loss = accelerator.reduce(mean_loss, reduction="mean")
                step_loss = float(mean_loss)
                state.step += 1
                state.examples_seen = (state.step * options.grad_accum) * world * per_micro
                state.tokens_seen += step_tokens * world
                state.elapsed_s = time.perf_counter() - started
                state.last_loss = step_loss
                boundary_rng = ckpt.capture_rng()
                dt = time.perf_counter() - t0
                entry = {
                    "step": state.step,
                    "loss": round(step_loss, 6),
                    "lr": scheduler.get_last_lr()[0],
                    "epoch": round(state.examples_seen / max(1, len(data.train)), 4),
                    "tokens": state.tokens_seen,
                    "tokens_per_s": round(step_tokens * world / dt, 1) if dt > 0 else None,
                    "step_s": round(dt, 4),
                    "elapsed_s": round(state.elapsed_s, 2),
                }
                entries.append(entry)
                if log_fh is not None:
                    log_fh.write(json.dumps(entry) + "\n")
                    log_fh.flush()
                progress.update(state.step, step_loss, entry["tokens_per_s"] or 0.0)
                checkpoint_path = None
                if state.step % options.save_steps == 0 or state.step == plan.total_steps:
                    checkpoint_path = save(state, boundary_rng)
                event = StepEvent(state.step, plan.total_steps, step_loss, run_dir, checkpoint_path)
                for callback in callbacks:
                    if callback(event):
                        stop["stop"] = True
                if world > 1:  # every process must stop at the same step, or they deadlock
                    flag = torch.tensor(float(stop["stop"]), device=device)
                    stop["stop"] = bool(accelerator.reduce(flag, reduction="sum") > 0)
                if stop["stop"] and state.step < plan.total_steps:
                    if saved_step != state.step:
                        save(state, boundary_rng)
                    raise TrainingInterruptedError(
                        f"stopped at step {state.step}/{plan.total_steps}; run the same "
                        f"command again to resume ({run_dir.name})"
                    )
    except BaseException as exc:
        progress.close()
        if log_fh is not None:
            log_fh.close()
        if main:
            interrupted = isinstance(exc, TrainingInterruptedError | KeyboardInterrupt)
            run_meta.update(
                status="interrupted" if interrupted else "failed",
                stopped_at_step=state.step,
                error=None if interrupted else f"{type(exc).__name__}: {exc}",
            )
            _write_run(run_dir, run_meta)
        raise
    progress.close()
    if log_fh is not None:
        log_fh.close()

    # --- finish: held-out loss, adapter export ------------------------------------------------
    accelerator.wait_for_everyone()
    metrics: dict[str, Any] = {}
    adapter_dir = run_dir
    if main:
        val_loss = scorer.mean_loss(data.validation) if data.validation else None
        state.extra["val_loss_end"] = val_loss
        metrics = {
            "steps": state.step,
            "train_loss_last": state.last_loss,
            "train_loss_mean_last_10": _tail_mean(entries, 10),
            "val_loss_start": state.val_loss_start,
            "val_loss": val_loss,
            "val_perplexity": None if val_loss is None else math.exp(min(val_loss, 50.0)),
            "tokens": state.tokens_seen,
            "seconds": round(state.elapsed_s, 2),
            **setup_metrics,
            **{f"{k}_start": v for k, v in state.extra.get("method_start", {}).items()},
            **method.heldout_metrics(scorer, data),
        }
        plot_loss(run_dir / PLOT_FILE, entries, _val_points(state))
        adapter_dir = export_adapter(
            unwrapped,
            adapters_dir=adapters_dir,
            options=options,
            data=data,
            run_dir=run_dir,
            metrics=metrics,
            init_adapter=None if init_adapter is None else Path(init_adapter),
            precision=plan.precision,
        )
        run_meta.update(status="finished", adapter=str(adapter_dir), metrics=metrics)
        _write_run(run_dir, run_meta)
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, adapter_dir, state.step, metrics, resumed_from, plan.to_json())


def _val_points(state: ckpt.TrainerState) -> list[tuple[int, float]]:
    points = []
    if state.val_loss_start is not None:
        points.append((0, float(state.val_loss_start)))
    end = state.extra.get("val_loss_end")
    if end is not None:
        points.append((state.step, float(end)))
    return points


def _tail_mean(entries: Sequence[dict[str, Any]], n: int) -> float | None:
    tail = [float(e["loss"]) for e in entries[-n:]]
    return sum(tail) / len(tail) if tail else None


def export_adapter(
    model: Any,
    *,
    adapters_dir: Path,
    options: TrainOptions,
    data: PreparedData,
    run_dir: Path,
    metrics: dict[str, Any],
    init_adapter: Path | None,
    precision: str,
) -> Path:
    """Write the versioned adapter folder atomically (temp folder + rename)."""
    import peft
    import torch
    import transformers

    adapters_dir.mkdir(parents=True, exist_ok=True)
    key = heldout_key(
        data.dataset.validation_hash,
        options.eval_max_samples,
        options.max_input_tokens,
        options.max_target_tokens,
        precision,
    )
    for _ in range(100):
        name = next_adapter_name(adapters_dir, options.method)
        final = adapters_dir / name
        tmp = adapters_dir / f".tmp-{name}-{os.getpid()}"
        model.save_pretrained(str(tmp), safe_serialization=True)
        version = int(name[1:5]) if name[1:5].isdigit() else None
        meta = {
            "name": name,
            "version": version,
            "method": options.method,
            "base_model": options.model,
            "created_at": int(time.time()),
            "run_dir": str(run_dir),
            "init_adapter": None if init_adapter is None else str(init_adapter),
            "dataset": {
                "name": data.dataset.name,
                "folder": str(data.dataset.folder),
                "hash": data.dataset.dataset_hash,
                "train_hash": data.dataset.train_hash,
                "validation_hash": data.dataset.validation_hash,
                "data_hash": data.data_hash,
                **data.summary,
            },
            "settings": {
                **options.trajectory(),
                "epochs": options.epochs,
                "max_steps": options.max_steps,
                "gradient_checkpointing": options.gradient_checkpointing,
                "precision": precision,
                "feedback": None if options.feedback is None else str(options.feedback),
            },
            "metrics": metrics,
            "evals": {}
            if metrics.get("val_loss") is None
            else {
                key: {
                    "loss": metrics["val_loss"],
                    "perplexity": metrics["val_perplexity"],
                    "evaluated_at": int(time.time()),
                }
            },
            "libraries": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        }
        write_meta(tmp, meta)
        try:
            if final.exists():
                raise FileExistsError(final)
            os.rename(tmp, final)  # fails if another run took this version meanwhile
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            continue
        assert (final / META_FILE).is_file()
        return final
    raise TrainingError(f"cannot create a new adapter folder in {adapters_dir}")

"""The fine-tuning loop: LoRA on FRED-T5, resumable to the exact step, one adapter per run.

We run our own small loop on ``accelerate.Accelerator`` rather than the HF ``Trainer``: it is
short enough to read, it makes exact resumption simple to guarantee (the data order is a pure
function of the seed and the example position; RNG, optimizer and scheduler states are saved
with every checkpoint), and ``accelerate launch`` distributes it over several GPUs without any
distribution code of ours.

``train`` is the loop, to be read top to bottom; ``Run`` holds one run's model, optimizer and
counters and does the four things the loop asks of it: ``setup``, ``step``, ``save`` and
``finish``. The run's folder is described in ``runs``; the result is a versioned adapter folder
under ``adapters_dir`` (``export``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

from doppelbot.core.errors import TrainingError, TrainingInterruptedError
from doppelbot.model.loader import resolve_device
from doppelbot.training import checkpoint as ckpt
from doppelbot.training.data import hash_strings
from doppelbot.training.evaluate import Scorer
from doppelbot.training.export import export_adapter
from doppelbot.training.methods import get_method
from doppelbot.training.modeling import (
    load_base_model,
    lora_config,
    prepare_for_training,
    trainable_parameters,
)
from doppelbot.training.plan import PlannedRun, plan_training
from doppelbot.training.preflight import check
from doppelbot.training.runs import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    LOG_FILE,
    PLOT_FILE,
    RUNNING,
    RunLock,
    locate_run,
    plot_loss,
    read_run,
    truncate_log,
    write_run,
)
from doppelbot.training.types import Example, TrainingMethod, TrainOptions

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class RunUpdate:
    """A run's status changed; run.json already says so (what ``on_status`` hears)."""

    run_dir: Path
    status: str  # runs.RUNNING, INTERRUPTED, FAILED or FINISHED
    meta: dict[str, Any]  # run.json as just written
    reason: str | None = None  # why it stopped early (interrupted or failed)


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    metrics: dict[str, Any]
    resumed_from: int | None
    plan: dict[str, Any] = field(default_factory=dict)
    # False in the other processes of `accelerate launch`: the main one reports the run.
    main_process: bool = True


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


# --- stopping and progress ---------------------------------------------------------------------
class StopRequest:
    """A graceful stop, asked for by the first Ctrl-C or by a callback: the loop finishes the
    current step, checkpoints and stops. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        self.requested = True

    @contextlib.contextmanager
    def on_ctrl_c(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.requested = True
            log.warning("stopping after this step (checkpoint first); Ctrl-C again to abort now")

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class Progress:
    """The progress bar on the console (nothing without one)."""

    def __init__(self, console: Console | None, total: int, start: int) -> None:
        self._progress = None
        self._task: Any = None
        if console is None:
            return
        self._progress = RichProgress(
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

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()


# --- the run -----------------------------------------------------------------------------------
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


class Run:
    """One training run in this process: its folder (locked), model, optimizer, counters, log.

    The run's status is set here and nowhere else: ``running`` once ``setup`` has the folder,
    the model and the checkpoint, then ``finished`` (``finish``), or ``interrupted``/``failed``
    (``stopped``). Each change is written to run.json and handed to ``on_status`` — the CLI
    keeps it in SQLite. Under ``accelerate launch`` every process has a Run; only the main one
    writes files, and every process reaches each barrier in the same order.
    """

    def __init__(
        self,
        options: TrainOptions,
        planned: PlannedRun,
        *,
        method: TrainingMethod,
        accelerator: Any,
        adapters_dir: Path,
        on_status: Callable[[RunUpdate], None] | None = None,
    ) -> None:
        self.options, self.planned, self.method = options, planned, method
        self.data, self.plan = planned.data, planned.plan
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.adapters_dir = adapters_dir
        self.on_status = on_status
        # What the run is: the same trajectory on the same data continues the same run.
        trajectory = json.dumps(options.trajectory(), sort_keys=True)
        self.fingerprint = hash_strings([trajectory, self.data.data_hash])
        self.run_dir = Path()  # claimed in setup
        self._lock: RunLock | None = None
        self.state = ckpt.TrainerState(
            seed=options.seed, world_size=self.world, data_fingerprint=self.data.data_hash
        )
        self.status: str | None = None  # None until the run is running
        self.meta: dict[str, Any] = {}  # run.json
        self.resumed_from: int | None = None
        self.entries: list[dict[str, Any]] = []  # log.jsonl, one entry per step
        self.saved_step = -1  # the step of the newest checkpoint of this run
        self.tokens_per_s = 0.0  # of the last step
        self._log_file: Any = None

    # --- setup: the run folder, the model, the checkpoint, run.json ---------------------------
    def setup(self, runs_dir: Path) -> None:
        import torch
        from transformers import get_constant_schedule
        from transformers.optimization import Adafactor

        options, accelerator, plan = self.options, self.accelerator, self.plan
        may_resume = self._claim_folder(runs_dir)
        if self.main:
            ckpt.remove_partial(self.run_dir)
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
            init_adapter=self.planned.init_adapter,
            gradient_checkpointing=options.gradient_checkpointing,
        )
        self.parameters = trainable_parameters(model)
        params = [p for p in model.parameters() if p.requires_grad]
        # Adafactor with a fixed learning rate and no relative steps.
        self.optimizer = Adafactor(
            params, lr=options.lr, scale_parameter=False, relative_step=False, warmup_init=False
        )
        self.scheduler = get_constant_schedule(self.optimizer)
        self.model = accelerator.prepare(model)
        self.unwrapped = accelerator.unwrap_model(self.model)
        self.device = accelerator.device
        self.pad_id = int(self.planned.tokenizer.pad_token_id or 0)
        self.scorer = Scorer(
            self.unwrapped,
            self.planned.tokenizer,
            device=self.device,
            batch_size=options.eval_batch_size,
        )
        # Before any checkpoint is restored: the method sees the starting policy (DPO's reference).
        self.setup_metrics = self.method.setup(self.unwrapped, self.scorer, self.data)

        # Resume from the newest checkpoint that loads; the log keeps the steps up to it.
        if may_resume and options.resume:
            found = ckpt.load_latest(self.run_dir, self._load_checkpoint)
            if found is not None:
                _, self.state = found
                self.resumed_from = self.saved_step = self.state.step
                if self.main:
                    self.entries = truncate_log(self.run_dir, self.state.step)
        if self.resumed_from is None and self.main:
            for stale in (LOG_FILE, PLOT_FILE):
                (self.run_dir / stale).unlink(missing_ok=True)

        self.meta = self._describe(read_run(self.run_dir) if self.main else {})
        self._set_status(RUNNING)
        if self.main:  # the "before" figures, once per run (a resumed run keeps its own)
            if self.state.val_loss_start is None and self.data.validation:
                self.state.val_loss_start = self.scorer.mean_loss(self.data.validation)
            if "method_start" not in self.state.extra:
                self.state.extra["method_start"] = self.method.heldout_metrics(
                    self.scorer, self.data
                )
        accelerator.wait_for_everyone()

        self.stream = ExampleStream(self.data.train, options.seed)
        self.rng = ckpt.capture_rng()  # what a checkpoint of the current step restores
        if self.main:
            self._log_file = (self.run_dir / LOG_FILE).open("a", encoding="utf-8")
        self.started = time.perf_counter() - self.state.elapsed_s

    def _claim_folder(self, runs_dir: Path) -> bool:
        """Pick and lock the run folder — the unfinished run of the same fingerprint, or a new
        one — in the main process; the others follow it. Returns whether it may hold a
        checkpoint to resume."""
        picked: list[Any] = [None, False]
        if self.main:
            run_dir, self._lock, may_resume = locate_run(runs_dir, self.options, self.fingerprint)
            picked = [str(run_dir), may_resume]
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            picked = broadcast_object_list(picked)
        self.run_dir = Path(picked[0])
        return bool(picked[1])

    def _load_checkpoint(self, folder: Path) -> ckpt.TrainerState:
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        loaded = ckpt.read_state(folder)
        if loaded.world_size != self.world:
            raise TrainingError(
                f"checkpoint {folder.name} was written by {loaded.world_size} processes, "
                f"this run has {self.world}"
            )
        set_peft_model_state_dict(self.unwrapped, load_file(str(folder / ckpt.ADAPTER_WEIGHTS)))
        self.optimizer.load_state_dict(
            torch.load(folder / ckpt.OPTIMIZER_FILE, weights_only=True, map_location=self.device)
        )
        self.scheduler.load_state_dict(torch.load(folder / ckpt.SCHEDULER_FILE, weights_only=True))
        ckpt.restore_rng(ckpt.load_rng(folder, self.rank))
        return loaded

    def _describe(self, previous: dict[str, Any]) -> dict[str, Any]:
        """run.json: what this run is (a resumed run keeps its creation time)."""
        options, data = self.options, self.data
        trainable, total = self.parameters
        return {
            "name": self.run_dir.name,
            "method": options.method,
            "fingerprint": self.fingerprint,
            "status": RUNNING,
            "created_at": int(previous.get("created_at", time.time())),
            "base_model": options.model.base,
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
            "plan": self.plan.to_json(),
            "preflight": {
                "text": self.planned.preflight.describe(),
                "estimate_bytes": self.planned.preflight.estimate.total,
                "available_bytes": self.planned.preflight.available,
                "fits": self.planned.preflight.fits,
            },
            "data": {
                **data.summary,
                "dataset_folder": str(data.dataset.folder),
                "dataset_hash": data.dataset.dataset_hash,
                "data_hash": data.data_hash,
                "validation_hash": data.dataset.validation_hash,
            },
            "parameters": {"trainable": trainable, "total": total},
            "resumed_from": self.resumed_from,
        }

    # --- step: one optimizer step over grad_accum micro-batches ------------------------------
    def step(self) -> float:
        """Forward and backward over ``grad_accum`` micro-batches, then one update. Returns the
        step's loss (the mean over micro-batches and processes); logs the step."""
        import torch

        options, state, accelerator = self.options, self.state, self.accelerator
        self.model.train()
        losses = []
        tokens = 0
        t0 = time.perf_counter()
        for micro in range(options.grad_accum):
            # Global micro-batch index → this process's slice of the example stream.
            index = (state.step * options.grad_accum + micro) * self.world + self.rank
            examples = self.stream.take(index * options.batch_size, options.batch_size)
            batch = self.method.collate(examples, self.pad_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            # Gradients are averaged across processes once, on the last micro-batch.
            sync = micro == options.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(self.model):
                loss, _n = self.method.loss(self.model, batch)
                accelerator.backward(loss / options.grad_accum)
            losses.append(loss.detach())
            tokens += sum(e.n_tokens for e in examples)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        mean_loss = torch.stack(losses).mean()
        if self.world > 1:
            mean_loss = accelerator.reduce(mean_loss, reduction="mean")
        step_loss = float(mean_loss)
        state.step += 1
        state.examples_seen = (state.step * options.grad_accum) * self.world * options.batch_size
        state.tokens_seen += tokens * self.world
        state.elapsed_s = time.perf_counter() - self.started
        state.last_loss = step_loss
        self.rng = ckpt.capture_rng()
        dt = time.perf_counter() - t0
        tokens_per_s = round(tokens * self.world / dt, 1) if dt > 0 else None
        self.tokens_per_s = tokens_per_s or 0.0
        entry = {
            "step": state.step,
            "loss": round(step_loss, 6),
            "lr": self.scheduler.get_last_lr()[0],
            "epoch": round(state.examples_seen / max(1, len(self.data.train)), 4),
            "tokens": state.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "step_s": round(dt, 4),
            "elapsed_s": round(state.elapsed_s, 2),
        }
        self.entries.append(entry)
        if self._log_file is not None:
            self._log_file.write(json.dumps(entry) + "\n")
            self._log_file.flush()
        return step_loss

    def any_process(self, flag: bool) -> bool:
        """``flag`` of any process, in every process (they must stop at the same step, or the
        others wait for ever at the next barrier)."""
        if self.world == 1:
            return flag
        import torch

        votes = torch.tensor(float(flag), device=self.device)
        return bool(self.accelerator.reduce(votes, reduction="sum") > 0)

    # --- save: a checkpoint of the current step ----------------------------------------------
    def checkpoint_due(self) -> bool:
        step = self.state.step
        return step % self.options.save_steps == 0 or step == self.plan.total_steps

    def save(self) -> Path | None:
        """Checkpoint the current step: every process its RNG state, the main one the rest.
        Returns the checkpoint folder (None in the other processes)."""
        import torch

        accelerator, step = self.accelerator, self.state.step
        tmp = self.run_dir / ckpt.CHECKPOINTS / f".tmp-{ckpt.checkpoint_name(step)}"
        if self.main:
            tmp = ckpt.tmp_checkpoint_dir(self.run_dir, step)
        accelerator.wait_for_everyone()
        ckpt.save_rng(tmp, self.rank, self.rng)
        accelerator.wait_for_everyone()
        final = None
        if self.main:
            self.unwrapped.save_pretrained(str(tmp), safe_serialization=True)
            torch.save(self.optimizer.state_dict(), tmp / ckpt.OPTIMIZER_FILE)
            torch.save(self.scheduler.state_dict(), tmp / ckpt.SCHEDULER_FILE)
            ckpt.write_state(tmp, self.state)
            final = ckpt.publish_checkpoint(self.run_dir, tmp, step, self.options.keep_checkpoints)
            plot_loss(self.run_dir / PLOT_FILE, self.entries, self._val_points())
        accelerator.wait_for_everyone()
        self.saved_step = step
        return final

    # --- finish: held-out loss, metrics, the adapter -----------------------------------------
    def finish(self) -> TrainResult:
        self._close_log()
        self.accelerator.wait_for_everyone()
        state, data = self.state, self.data
        metrics: dict[str, Any] = {}
        adapter_dir = self.run_dir
        if self.main:
            val_loss = self.scorer.mean_loss(data.validation) if data.validation else None
            state.extra["val_loss_end"] = val_loss
            metrics = {
                "steps": state.step,
                "train_loss_last": state.last_loss,
                "train_loss_mean_last_10": _tail_mean(self.entries, 10),
                "val_loss_start": state.val_loss_start,
                "val_loss": val_loss,
                "val_perplexity": None if val_loss is None else math.exp(min(val_loss, 50.0)),
                "tokens": state.tokens_seen,
                "seconds": round(state.elapsed_s, 2),
                **self.setup_metrics,
                **{f"{k}_start": v for k, v in state.extra.get("method_start", {}).items()},
                **self.method.heldout_metrics(self.scorer, data),
            }
            plot_loss(self.run_dir / PLOT_FILE, self.entries, self._val_points())
            init_adapter = self.planned.init_adapter
            adapter_dir = export_adapter(
                self.unwrapped,
                adapters_dir=self.adapters_dir,
                options=self.options,
                data=data,
                run_dir=self.run_dir,
                metrics=metrics,
                init_adapter=None if init_adapter is None else Path(init_adapter),
                precision=self.plan.precision,
            )
        self._set_status(FINISHED, adapter=str(adapter_dir), metrics=metrics)
        self.accelerator.wait_for_everyone()
        return TrainResult(
            self.run_dir,
            adapter_dir,
            state.step,
            metrics,
            self.resumed_from,
            self.plan.to_json(),
            main_process=self.main,
        )

    # --- status --------------------------------------------------------------------------------
    def stopped(self, exc: BaseException) -> None:
        """The run ended early with ``exc``: interrupted when asked to stop, else failed.
        Nothing is recorded for a run that never started running."""
        if self.status != RUNNING:
            return
        interrupted = isinstance(exc, TrainingInterruptedError | KeyboardInterrupt)
        self._set_status(
            INTERRUPTED if interrupted else FAILED,
            reason=str(exc),
            stopped_at_step=self.state.step,
            error=None if interrupted else f"{type(exc).__name__}: {exc}",
        )

    def _set_status(self, status: str, *, reason: str | None = None, **fields: Any) -> None:
        self.status = status
        if not self.main:
            return
        self.meta.update(status=status, **fields)
        write_run(self.run_dir, self.meta)
        if self.on_status is not None:
            self.on_status(RunUpdate(self.run_dir, status, dict(self.meta), reason))

    def close(self) -> None:
        """Close the log and unlock the run folder (the Run cannot step any more)."""
        self._close_log()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _val_points(self) -> list[tuple[int, float]]:
        points = []
        if self.state.val_loss_start is not None:
            points.append((0, float(self.state.val_loss_start)))
        end = self.state.extra.get("val_loss_end")
        if end is not None:
            points.append((self.state.step, float(end)))
        return points


def _tail_mean(entries: Sequence[dict[str, Any]], n: int) -> float | None:
    tail = [float(e["loss"]) for e in entries[-n:]]
    return sum(tail) / len(tail) if tail else None


# --- the loop ----------------------------------------------------------------------------------
def train(
    options: TrainOptions,
    *,
    datasets_dir: Path,
    runs_dir: Path,
    adapters_dir: Path,
    console: Console | None = None,
    callbacks: Sequence[Callback] = (),
    on_status: Callable[[RunUpdate], None] | None = None,
) -> TrainResult:
    """Train (or resume) one run and export its adapter. ``on_status`` hears each change of
    the run's status (running, then finished, interrupted or failed) once run.json has it."""
    import torch

    # Where and on what: the device, the data, the number of steps, whether memory suffices —
    # all decided before the model loads.
    if options.model.torch_threads:
        torch.set_num_threads(options.model.torch_threads)
    method = get_method(options.method)
    device = resolve_device(options.model.device)
    accelerator = make_accelerator(device)
    main = accelerator.is_main_process
    planned = plan_training(
        options, datasets_dir=datasets_dir, world=accelerator.num_processes, device=device
    )
    if options.preflight:
        check(planned.preflight)

    run = Run(
        options,
        planned,
        method=method,
        accelerator=accelerator,
        adapters_dir=adapters_dir,
        on_status=on_status if main else None,
    )
    stop = StopRequest()
    total = planned.plan.total_steps
    try:
        # The run folder — the unfinished run of the same trajectory and data, or a new one —
        # and the model and optimizer, restored from its newest checkpoint when resuming.
        run.setup(runs_dir)
        progress = Progress(console if main else None, total, run.state.step)
        with progress, stop.on_ctrl_c():
            while run.state.step < total:
                loss = run.step()
                progress.update(run.state.step, loss, run.tokens_per_s)

                checkpoint = run.save() if run.checkpoint_due() else None

                # Callbacks see every step; any of them may ask for a graceful stop.
                event = StepEvent(run.state.step, total, loss, run.run_dir, checkpoint)
                for callback in callbacks:
                    if callback(event):
                        stop.request()

                # Stop (Ctrl-C or a callback) between steps, checkpointed: the same command
                # resumes exactly here.
                if run.any_process(stop.requested) and run.state.step < total:
                    if run.saved_step != run.state.step:
                        run.save()
                    raise TrainingInterruptedError(
                        f"stopped at step {run.state.step}/{total}; run the same "
                        f"command again to resume ({run.run_dir.name})"
                    )

        # Held-out loss, metrics, and the adapter folder.
        return run.finish()
    except BaseException as exc:
        run.stopped(exc)
        raise
    finally:
        run.close()

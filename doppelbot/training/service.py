"""Training as the owner asks for it: adapter names instead of folders (``current``, ``base``),
``latest`` pairs, Settings instead of options, and the bookkeeping in SQLite.

Each function is one thing a CLI command does (``train``, ``eval``, ``adapter use``); the
command parses its arguments, calls one of these and prints what comes back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from doppelbot.config import ModelSettings, Settings, extend
from doppelbot.core.errors import TrainingError
from doppelbot.dataset.jsonl import write_json
from doppelbot.model.loader import serving_adapter
from doppelbot.model.local import model_source
from doppelbot.store.adapters import AdapterChoice, current_choice, upsert_run
from doppelbot.store.database import Database
from doppelbot.training.dpo import load_pairs, pairs_file, split_pairs
from doppelbot.training.evaluate import Comparison, EvalOptions, evaluate_adapters, heldout_losses
from doppelbot.training.registry import (
    CURRENT_SPEC,
    AdapterInfo,
    adapter_info,
    check_not_worse,
    resolve_adapter,
    use_adapter,
)
from doppelbot.training.runs import FAILED, FINISHED, INTERRUPTED
from doppelbot.training.trainer import RunUpdate, TrainResult, train
from doppelbot.training.types import TrainOptions

if TYPE_CHECKING:
    from rich.console import Console


T = TypeVar("T")


def _with_db(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    async def go() -> T:
        async with await Database.open(settings.store.db_path) as db:
            return await work(db)

    return asyncio.run(go())


# --- names → folders ---------------------------------------------------------------------------
def served_adapter(settings: Settings) -> Path | None:
    """The served adapter, exactly as the bot resolves it (None: the base model alone)."""
    return asyncio.run(serving_adapter(settings))


def adapter_from_spec(settings: Settings, spec: str) -> Path | None:
    """An ADAPTER argument → its folder: a path, a name under the adapters folder, ``base``
    (None: no adapter) or ``current`` (the served one)."""
    if spec == CURRENT_SPEC:
        current = served_adapter(settings)
        if current is None:
            raise TrainingError("no adapter is served yet (`doppelbot adapter use ADAPTER`)")
        return current
    return resolve_adapter(settings.store.adapters_dir, spec)


# --- train -------------------------------------------------------------------------------------
def _model_section(settings: Settings, model: str | None, device: str | None) -> ModelSettings:
    """The model section with the CLI's ``--model``/``--device`` (None: as configured)."""
    changes = {"base": model, "device": device}
    return extend(
        ModelSettings,
        settings.model,
        **{name: value for name, value in changes.items() if value is not None},
    )


def eval_options(
    settings: Settings,
    *,
    model: str | None = None,
    device: str | None = None,
    limit: int | None = None,
    **overrides: Any,
) -> EvalOptions:
    """``doppelbot eval``'s options: the train and model sections with the CLI's choices
    (an override of None keeps the setting; ``limit``: validation samples)."""
    chosen = {name: value for name, value in overrides.items() if value is not None}
    if limit is not None:
        chosen["eval_max_samples"] = limit
    return extend(
        EvalOptions,
        settings.train,
        model=_model_section(settings, model, device),
        max_new_tokens=settings.generation.max_new_tokens,
        data_dir=settings.store.data_dir,
        **chosen,
    )


def train_options(
    settings: Settings,
    *,
    method: str,
    init_adapter: str | None = None,
    feedback: Path | None = None,
    pairs: str | None = None,
    lr: float | None = None,
    **overrides: Any,
) -> TrainOptions:
    """``doppelbot train``'s options: ``feedback`` and ``dpo`` continue the served adapter
    unless ``init_adapter`` names one; ``dpo`` reads the latest pairs unless ``pairs`` names
    a file, at its own learning rate unless ``lr`` is given."""
    init: Path | None = None
    if init_adapter is not None:
        init = adapter_from_spec(settings, init_adapter)
    elif method in ("feedback", "dpo"):
        init = served_adapter(settings)
    if method == "feedback" and feedback is None:
        raise TrainingError("--method feedback needs --feedback PATH (`doppelbot feedback export`)")
    pairs_path: Path | None = None
    if method == "dpo":
        pairs_path = pairs_file(settings.store.data_dir, pairs)
        lr = lr or settings.train.dpo_learning_rate
    elif pairs is not None:
        raise TrainingError("--pairs is for --method dpo")
    model = _model_section(settings, overrides.pop("model", None), overrides.pop("device", None))
    chosen = {name: value for name, value in overrides.items() if value is not None}
    return extend(
        TrainOptions,
        settings.train,
        **chosen,
        model=model,
        prompt=settings.prompt,
        method=method,
        init_adapter=init,
        feedback=feedback,
        pairs=pairs_path,
        **({"lr": lr} if lr is not None else {}),
        # the base model must be on this machine (`doppelbot model download`): checked here,
        # before anything loads
        model_files=model_source(model.base, settings.store.data_dir),
    )


class RunRecorder:
    """Keeps a run's row in ``training_runs`` in step with the status the run reports."""

    def __init__(self, settings: Settings, options: TrainOptions) -> None:
        self.settings = settings
        self.options = options
        self.started_at = int(time.time())  # a resumed run's row keeps its first start

    def __call__(self, update: RunUpdate) -> None:
        meta = update.meta
        fields: dict[str, Any] = {
            "run_dir": update.run_dir,
            "method": self.options.method,
            "base_model": self.options.model.base,
            "started_at": self.started_at,
            "dataset_hash": meta["data"]["dataset_hash"],
            "params": {**meta["trajectory"], **meta["options"], "plan": meta["plan"]},
        }
        if update.status == FINISHED:
            fields.update(
                metrics=meta["metrics"],
                adapter_path=Path(meta["adapter"]),
                finished_at=int(time.time()),
            )
        elif update.status in (INTERRUPTED, FAILED):
            fields.update(metrics={"error": (update.reason or "")[:500]})
        _with_db(self.settings, lambda db: upsert_run(db, status=update.status, **fields))


def train_and_record(
    settings: Settings,
    options: TrainOptions,
    *,
    console: Console | None = None,
    on_status: Callable[[RunUpdate], None] | None = None,
) -> TrainResult:
    """Train (``trainer.train``) with the run recorded in SQLite; ``on_status`` hears each
    status change after the database has it."""
    recorder = RunRecorder(settings, options)

    def status_changed(update: RunUpdate) -> None:
        recorder(update)
        if on_status is not None:
            on_status(update)

    return train(
        options,
        datasets_dir=settings.store.datasets_dir,
        runs_dir=settings.store.runs_dir,
        adapters_dir=settings.store.adapters_dir,
        console=console,
        on_status=status_changed,
    )


# --- eval --------------------------------------------------------------------------------------
def compare_adapters(
    settings: Settings,
    specs: Sequence[str],
    *,
    pairs: str | None = None,
    all_pairs: bool = False,
    output: Path | None = None,
    **overrides: Any,
) -> tuple[Comparison, Path]:
    """Evaluate the named adapters side by side on the validation split (and, with ``pairs``,
    on the held-out preference pairs, or on all of them); the JSON report is written to
    ``output`` (default: ``runs/evals/eval-DATE.json``), whose path is returned."""
    paths = [adapter_from_spec(settings, s) for s in specs]
    options = eval_options(settings, **overrides)
    extras: dict[str, Any] = {}
    if pairs is not None:
        rows = load_pairs(pairs_file(settings.store.data_dir, pairs))
        scored = rows if all_pairs else split_pairs(rows, settings.train.pref_heldout_share)[1]
        if not scored:
            raise TrainingError(
                f"no held-out pairs among {len(rows)} (DOPPELBOT_PREF_HELDOUT_SHARE="
                f"{settings.train.pref_heldout_share}); use --all-pairs"
            )
        extras = {
            "pairs": scored,
            "max_input": settings.model.max_input_tokens,
            "max_target": settings.train.max_target_tokens,
        }
    labels = [p.name if p is not None else "base" for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{i + 1}:{label}" for i, label in enumerate(labels)]
    comparison = evaluate_adapters(
        options, paths, datasets_dir=settings.store.datasets_dir, labels=labels, extras=extras
    )
    target = (
        output or settings.store.runs_dir / "evals" / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    write_json(target, comparison.to_json())
    return comparison, target


# --- adapter use -------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterSwitch:
    """What ``adapter use`` did."""

    info: AdapterInfo  # the candidate
    previous: AdapterChoice | None  # what was served before
    choice: AdapterChoice | None  # the new choice; None when the candidate was served already
    loss: float | None = None  # the candidate's held-out loss (None with --force)
    previous_loss: float | None = None  # the served one's, when it could be compared
    previous_gone: bool = False  # the served adapter's folder no longer exists


def switch_adapter(
    settings: Settings,
    spec: str,
    *,
    force: bool = False,
    dataset: str | None = None,
    measuring: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> AdapterSwitch:
    """Serve the adapter ``spec`` if its held-out loss is not worse than the served one's
    (``force``: whatever the loss); ``measuring`` wraps the held-out measurement (a spinner)."""
    candidate = resolve_adapter(settings.store.adapters_dir, spec)
    if candidate is None:
        raise TrainingError(
            "`adapter use` needs an adapter folder (to serve no adapter, roll back)"
        )
    info = adapter_info(candidate)
    if info.base_model and info.base_model != settings.model.base and not force:
        raise TrainingError(
            f"{info.name} was trained on {info.base_model}, but DOPPELBOT_MODEL is "
            f"{settings.model.base}; use --force if they are the same weights"
        )
    current = _with_db(settings, current_choice)
    if current is not None and current.adapter_path.resolve() == candidate.resolve():
        return AdapterSwitch(info, current, None)

    loss = previous_loss = None
    gone = False
    if not force:
        gone = current is not None and not current.adapter_path.is_dir()
        options = eval_options(settings, dataset=dataset, metrics=("loss",))
        compare = [candidate] if current is None or gone else [candidate, current.adapter_path]
        with measuring():
            losses = heldout_losses(options, compare, datasets_dir=settings.store.datasets_dir)
        loss = losses[0]
        if current is not None and len(losses) > 1:
            previous_loss = losses[1]
            check_not_worse(info.name, loss, current.adapter_name, previous_loss)

    async def record(db: Database) -> AdapterChoice:
        return await use_adapter(db, candidate, heldout_loss=loss, forced=force)

    return AdapterSwitch(info, current, _with_db(settings, record), loss, previous_loss, gone)

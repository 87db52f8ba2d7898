"""Atomic, resumable training checkpoints.

A checkpoint holds everything needed to continue a run exactly as if it had never stopped:
the LoRA weights, the optimizer and scheduler state, the RNG states (torch CPU and CUDA, per
process, plus Python's) and the trainer's counters — the data order is a pure function of the
seed and the example position, so the position is enough to rebuild it.

Each checkpoint is written into a hidden temporary folder and renamed into place only once
every file is flushed to disk: a kill in the middle of a save leaves the previous checkpoint as
the latest, never a half-written one. Left-over temporary folders are removed on the next start.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from doppelbot.core.errors import TrainingError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "step-"
_TMP = ".tmp-"

T = TypeVar("T")


@dataclass
class TrainerState:
    """The trainer's counters; saved as JSON next to the tensors."""

    step: int = 0
    examples_seen: int = 0  # position in the (seeded, per-epoch shuffled) example stream
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    seed: int = 0
    world_size: int = 1
    data_fingerprint: str = ""
    val_loss_start: float | None = None
    last_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:07d}"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(_PREFIX) and (path / STATE_FILE).is_file():
            try:
                found.append((int(path.name[len(_PREFIX) :]), path))
            except ValueError:
                continue
    return sorted(found)


def remove_partial(run_dir: Path) -> int:
    """Delete temporary folders a killed save left behind; returns how many."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return 0
    removed = 0
    for path in root.iterdir():
        if path.name.startswith(_TMP):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_checkpoint_dir(run_dir: Path, step: int) -> Path:
    tmp = checkpoints_dir(run_dir) / f"{_TMP}{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_checkpoint(run_dir: Path, tmp: Path, step: int, keep: int) -> Path:
    """Make a fully written temporary folder the checkpoint of ``step`` (atomic rename), then
    prune all but the newest ``keep``."""
    _fsync_tree(tmp)
    final = checkpoints_dir(run_dir) / checkpoint_name(step)
    if final.exists():  # the same step saved again (e.g. an interrupted final save)
        old = final.with_name(f"{_TMP}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def write_state(folder: Path, state: TrainerState) -> None:
    (folder / STATE_FILE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")


def read_state(folder: Path) -> TrainerState:
    try:
        raw = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        return TrainerState(**raw)
    except (OSError, ValueError, TypeError) as exc:
        raise TrainingError(f"unreadable checkpoint state in {folder}: {exc}") from exc


def load_latest(run_dir: Path, loader: Callable[[Path], T]) -> tuple[Path, T] | None:
    """Load the newest checkpoint that loads; a damaged one is skipped with a warning."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, loader(path)
        except Exception as exc:  # a damaged checkpoint must not block the older ones
            log.warning("checkpoint %s cannot be loaded (%s); trying an older one", path.name, exc)
    return None


# --- RNG ----------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


def save_rng(folder: Path, rank: int, state: dict[str, Any]) -> None:
    import torch

    torch.save(
        {
            "torch": state["torch"],
            "cuda": state.get("cuda"),
            "python": json.dumps(state["python"]),
        },
        folder / rng_file(rank),
    )


def load_rng(folder: Path, rank: int) -> dict[str, Any]:
    import torch

    raw = torch.load(folder / rng_file(rank), weights_only=True)
    state: dict[str, Any] = {"torch": raw["torch"], "python": json.loads(raw["python"])}
    if raw.get("cuda") is not None:
        state["cuda"] = raw["cuda"]
    return state

"""Run folders on disk: ``runs_dir/<run name>/`` with its run.json, log, plot and lock.

``run.json`` says what the run is (its fingerprint, the plan, its status), ``log.jsonl`` holds
one line per optimizer step, ``loss.png`` the loss curve, ``checkpoints/`` the checkpoints
(``checkpoint``). Running the same command again (same data and trajectory settings) finds the
unfinished run by its fingerprint and continues it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from doppelbot.core.errors import TrainingError
from doppelbot.dataset.jsonl import atomic_write_text, write_json
from doppelbot.training.registry import read_json
from doppelbot.training.types import TrainOptions

try:  # POSIX; doppelbot runs on Linux and macOS
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
LOCK_FILE = ".lock"

# A run's status: running until it ends one of the three other ways. Only a finished run is
# never resumed.
RUNNING = "running"
INTERRUPTED = "interrupted"
FAILED = "failed"
FINISHED = "finished"


def read_run(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / RUN_FILE)


def write_run(run_dir: Path, meta: dict[str, Any]) -> None:
    write_json(run_dir / RUN_FILE, {**meta, "updated_at": int(time.time())})


class RunLock:
    """An exclusive lock on a run folder, so two processes never train into one run."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fh: Any = None

    def acquire(self) -> bool:
        if fcntl is None:  # no advisory locks on this platform: trust the user
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
        meta = read_run(run_dir)
        if meta:
            problem = None
            if meta.get("fingerprint") != fingerprint:
                problem = "was started with different data or settings"
            elif meta.get("status") == FINISHED:
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
            meta = read_run(path) if path.is_dir() else {}
            if meta.get("fingerprint") == fingerprint and meta.get("status") != FINISHED:
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


def truncate_log(run_dir: Path, step: int) -> list[dict[str, Any]]:
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

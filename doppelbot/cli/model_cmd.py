"""``doppelbot model``: inspect the reply model (what int8 quantisation costs).

Also home of the helpers ``chat`` shares with it: the Rich progress shown while the model loads
and the ``--adapter`` resolution. torch is imported inside the command bodies only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from doppelbot.cli.common import run_async, state

if TYPE_CHECKING:
    from rich.console import Console

    from doppelbot.config import Settings

app = typer.Typer(no_args_is_help=True)

ADAPTER_HELP = (
    "LoRA adapter: a folder, a name from `doppelbot adapter list`, or `base` for none "
    "(default: the serving adapter)."
)


@contextmanager
def load_progress(console: Console) -> Iterator[Any]:
    """A Rich progress bar fed by the loader's ``(stage, done, total)`` callbacks, which arrive
    from the model thread (Rich's progress is thread-safe)."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=max(total, 1))
            bar.update(tasks[stage], completed=done, total=max(total, 1))

        yield update


def resolve_adapter_option(settings: Settings, spec: str | None) -> Path | str | None:
    """``--adapter`` → a folder, None (``base``) or ``"serving"`` (not given)."""
    if spec is None:
        return "serving"
    from doppelbot.training.registry import resolve_adapter

    return resolve_adapter(settings.adapters_dir, spec)


def _dataset_file(settings: Settings, dataset: Path | None) -> Path:
    from doppelbot.dataset.jsonl import TRAIN_FILE, VALIDATION_FILE, resolve_dataset_dir
    from doppelbot.errors import DatasetError

    if dataset is not None and dataset.is_file():
        return dataset
    folder = resolve_dataset_dir(settings.datasets_dir, dataset)
    for name in (VALIDATION_FILE, TRAIN_FILE):
        path = folder / name
        if path.is_file() and path.stat().st_size > 0:
            return path
    raise DatasetError(f"{folder} holds no samples")


@app.command("check", help="Compare the int8 model with fp32 on samples of your dataset.")
def check(
    ctx: typer.Context,
    dataset: Path | None = typer.Option(
        None,
        "--dataset",
        help="A dataset JSONL file or folder (default: the latest dataset's validation split).",
    ),
    samples: int = typer.Option(32, "--samples", "-n", min=1, help="Samples to compare on."),
    adapter: str | None = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
) -> None:
    app_state = state(ctx)
    settings = app_state.settings
    from doppelbot.errors import ModelError

    if settings.precision == "fp32":
        raise ModelError("DOPPELBOT_PRECISION is fp32: there is no quantisation to check")
    path = _dataset_file(settings, dataset)

    from doppelbot.model.check import load_pairs, run_check
    from doppelbot.model.loader import ModelSpec, apply_torch_threads, serving_adapter

    pairs = load_pairs(path, samples)
    chosen = resolve_adapter_option(settings, adapter)
    if chosen == "serving":
        chosen = run_async(serving_adapter(settings))
    spec = ModelSpec.from_settings(settings, adapter=None if chosen is None else Path(chosen))
    apply_torch_threads(settings.torch_threads)
    console = app_state.console
    with load_progress(app_state.err_console) as progress:
        report = run_check(spec, pairs, progress=progress)
    if as_json:
        console.print_json(json.dumps({"dataset": str(path), **report.as_dict()}))
        return
    from rich.table import Table

    table = Table(title=f"{report.candidate} vs {report.reference} on {path}", show_header=False)
    table.add_row("adapter", str(spec.adapter or "none (base model)"))
    table.add_row("samples / target tokens", f"{report.samples} / {report.tokens}")
    table.add_row("top-1 agreement", f"{report.top1_agreement:.1%}")
    table.add_row("mean KL per token", f"{report.mean_kl:.4f} nats")
    table.add_row(f"loss {report.reference}", f"{report.loss_reference:.4f}")
    table.add_row(f"loss {report.candidate}", f"{report.loss_candidate:.4f}")
    table.add_row("loss delta", f"{report.loss_delta:+.4f}")
    console.print(table)

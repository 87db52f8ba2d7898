"""``doppelbot model``: get the models (``download``, ``download --list``) and inspect the reply
model (``check``: what int8 quantisation costs).

Also home of the helpers ``chat`` shares with it: the Rich progress shown while the model loads
and the ``--adapter`` resolution. torch and huggingface_hub are imported inside the command
bodies only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from doppelbot.cli.common import AdapterOpt, run_async, state
from doppelbot.core.errors import DatasetError, ModelDownloadError, ModelError
from doppelbot.dataset.jsonl import TRAIN_FILE, VALIDATION_FILE, resolve_dataset_dir
from doppelbot.model.download import download_model, fetch_info, human_size
from doppelbot.model.local import SETTING, WHAT, is_hub_id, models_dir, read_manifest, speech_repo
from doppelbot.training.registry import resolve_adapter

if TYPE_CHECKING:
    from rich.console import Console

    from doppelbot.config import Settings

app = typer.Typer(no_args_is_help=True)


@contextmanager
def load_progress(console: Console) -> Iterator[Any]:
    """A Rich progress bar fed by the loader's ``(stage, done, total)`` callbacks, which arrive
    from the model thread (Rich's progress is thread-safe)."""

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

    return resolve_adapter(settings.store.adapters_dir, spec)


def _dataset_file(settings: Settings, dataset: Path | None) -> Path:
    if dataset is not None and dataset.is_file():
        return dataset
    folder = resolve_dataset_dir(settings.store.datasets_dir, dataset)
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
    adapter: AdapterOpt = None,
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
) -> None:
    app_state = state(ctx)
    settings = app_state.settings

    if settings.model.precision == "fp32":
        raise ModelError("DOPPELBOT_PRECISION is fp32: there is no quantisation to check")
    path = _dataset_file(settings, dataset)

    from doppelbot.model.check import load_pairs, run_check
    from doppelbot.model.loader import apply_torch_threads, model_spec, serving_adapter

    pairs = load_pairs(path, samples)
    chosen = resolve_adapter_option(settings, adapter)
    if chosen == "serving":
        chosen = run_async(serving_adapter(settings))
    spec = model_spec(settings, adapter=None if chosen is None else Path(chosen))
    apply_torch_threads(settings.model.torch_threads)
    console = app_state.console
    with load_progress(app_state.err_console) as progress:
        report = run_check(spec, pairs, progress=progress)
    if as_json:
        console.print_json(json.dumps({"dataset": str(path), **report.as_dict()}))
        return

    table = Table(title=f"{report.candidate} vs {report.reference} on {path}", show_header=False)
    table.add_row("adapter", str(spec.adapter or "none (base model)"))
    table.add_row("samples / target tokens", f"{report.samples} / {report.tokens}")
    table.add_row("top-1 agreement", f"{report.top1_agreement:.1%}")
    table.add_row("mean KL per token", f"{report.mean_kl:.4f} nats")
    table.add_row(f"loss {report.reference}", f"{report.loss_reference:.4f}")
    table.add_row(f"loss {report.candidate}", f"{report.loss_candidate:.4f}")
    table.add_row("loss delta", f"{report.loss_delta:+.4f}")
    console.print(table)


WHAT_CHOICES = ("model", "embedder", "speech")


@app.command(
    "download",
    help="Download the reply model (FRED-T5-1.7B + tokenizer) and the embedder into the data "
    "directory: resumable, verified against the hub's checksums; later commands use these "
    "copies and never the network.",
)
def download(
    ctx: typer.Context,
    what: list[str] | None = typer.Argument(
        None,
        help="model, embedder and/or speech (the voice-note model; default: all three, speech "
        "only when DOPPELBOT_VOICE_TRANSCRIPTION is on).",
        show_default=False,
    ),
    model: str | None = typer.Option(
        None, "--model", help="Hub id of the reply model (default: DOPPELBOT_MODEL)."
    ),
    embedder: str | None = typer.Option(
        None, "--embedder", help="Hub id of the embedder (default: DOPPELBOT_EMBEDDER_MODEL)."
    ),
    revision: str = typer.Option(
        "main", "--revision", help="Branch, tag or commit to download (default: main)."
    ),
    verify: bool = typer.Option(
        False, "--verify", help="Hash every file already downloaded again, even unchanged ones."
    ),
    list_: bool = typer.Option(
        False, "--list", help="Show what is downloaded (sizes, paths) and download nothing."
    ),
) -> None:
    app_state = state(ctx)
    settings = app_state.settings

    default = [w for w in WHAT_CHOICES if w != "speech" or settings.voice.transcription]
    chosen = list(dict.fromkeys(what or default))
    for item in chosen:
        if item not in WHAT_CHOICES:
            raise typer.BadParameter(
                f"{item!r}: choose model, embedder or speech", param_hint="WHAT"
            )
    if list_:
        _print_downloads(app_state.console, settings)
        return

    targets = {
        "model": model or settings.model.base,
        "embedder": embedder or settings.knowledge.embedder_model,
        "speech": speech_repo(settings.voice.model),
    }

    console, err = app_state.console, app_state.err_console
    done: list[tuple[str, str]] = []
    for role in chosen:
        name = targets[role]
        if Path(name).expanduser().is_dir():
            console.print(f"{WHAT[role]}: {name} is a local folder; nothing to download")
            continue
        if not is_hub_id(name):
            raise ModelDownloadError(f"{name!r} is neither a hub id nor an existing folder")
        with err.status(f"asking the hub about {name}…"):
            plan = fetch_info(name, revision=revision)
        console.print(
            f"{WHAT[role]} [bold]{name}[/] @ {plan.revision[:12]}: {len(plan.files)} files, "
            f"{human_size(plan.size)}"
        )
        with _byte_progress(err) as progress:
            report = download_model(
                name,
                settings.store.data_dir,
                role,  # type: ignore[arg-type]
                revision=revision,
                verify=verify,
                progress=progress,
                plan=plan,
            )
        parts = [f"{len(report.fetched)} fetched ({human_size(report.bytes_fetched)})"]
        if report.kept:
            parts.append(f"{len(report.kept)} already there")
        if report.repaired:
            parts.append(f"{len(report.repaired)} did not verify and were fetched again")
        console.print(
            f"  verified → {report.model.folder} ({', '.join(parts)}; {report.seconds:.0f}s)",
            soft_wrap=True,
        )
        done.append((role, name))
    for role, name in done:
        configured = {
            "model": settings.model.base,
            "embedder": settings.knowledge.embedder_model,
            "speech": speech_repo(settings.voice.model),
        }[role]
        if name != configured:
            console.print(
                f"[yellow]note:[/] {SETTING[role]} is {configured}; set {SETTING[role]}={name} "
                "to use this download"
            )
    if done:
        console.print("Commands now load these copies from the data directory, offline.")


@contextmanager
def _byte_progress(console: Console) -> Iterator[Any]:
    """Per-file byte bars for the download's ``(stage, done, total)`` callbacks."""

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                label = stage if len(stage) <= 40 else "…" + stage[-39:]
                tasks[stage] = bar.add_task(label, total=max(total, 1))
            bar.update(tasks[stage], completed=done, total=max(total, 1))

        yield update


def _print_downloads(console: Console, settings: Settings) -> None:
    """One block per model: what it is, whether it is whole, its size and folder."""

    found = read_manifest(settings.store.data_dir)
    configured = {"model": settings.model.base, "embedder": settings.knowledge.embedder_model}
    console.print(f"models in {models_dir(settings.store.data_dir)}:")
    for repo_id, entry in sorted(found.items(), key=lambda kv: (kv[1].role, kv[0])):
        problems = entry.problems()
        state_text = f"[red]incomplete: {escape(problems[0])}[/]" if problems else "complete"
        mark = f" ({SETTING[entry.role]})" if configured.get(entry.role) == repo_id else ""
        console.print(
            f"  {WHAT[entry.role]} [bold]{escape(repo_id)}[/]{mark} @ {entry.revision[:12]}: "
            f"{len(entry.files)} files, {human_size(entry.size)}, {state_text}"
        )
        console.print(f"    {entry.folder}", highlight=False, soft_wrap=True)
    if not found:
        console.print("  none")
    for role, name in configured.items():
        if name in found:
            continue
        if Path(name).expanduser().is_dir():
            console.print(f"{SETTING[role]} is the local folder {name}")
        else:
            console.print(
                f"[yellow]{SETTING[role]}={escape(name)} is not downloaded:[/] run "
                f"`doppelbot model download {role}`"
            )

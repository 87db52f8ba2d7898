"""``doppelbot train`` and ``doppelbot eval``: fine-tuning and held-out evaluation.

Each command parses its options, makes one call into ``doppelbot.training.service`` and prints
the result with Rich. The training package is imported inside the command bodies: torch must
not load for ``doppelbot --help``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from doppelbot.cli.common import BaseModelOpt, DeviceOpt, ValidationDatasetOpt, invoked_as, state
from doppelbot.training.runs import RUNNING

if TYPE_CHECKING:
    from rich.console import Console

    from doppelbot.training.evaluate import Comparison
    from doppelbot.training.plan import PlannedRun
    from doppelbot.training.trainer import RunUpdate
    from doppelbot.training.types import TrainOptions


def train(
    ctx: typer.Context,
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        help="Dataset name under the datasets folder, or a path (default: latest).",
    ),
    feedback: Path | None = typer.Option(
        None, "--feedback", help="Feedback positives JSONL (`doppelbot feedback export`) to add."
    ),
    method: str = typer.Option(
        "sft",
        "--method",
        help="sft (dataset [+ feedback]), feedback (continue an adapter) or dpo (preference "
        "pairs, from the served adapter).",
    ),
    pairs: str | None = typer.Option(
        None,
        "--pairs",
        help="dpo: preference pairs JSONL (default: the latest `feedback export`'s pairs.jsonl).",
    ),
    init_adapter: str | None = typer.Option(
        None,
        "--init-adapter",
        help="Continue this adapter instead of a new LoRA (feedback: default = the served one).",
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Stop after this many optimizer steps (overrides epochs)."
    ),
    epochs: float | None = typer.Option(None, "--epochs", min=0.01, help="Passes over the data."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Micro-batch size."),
    grad_accum: int | None = typer.Option(
        None, "--grad-accum", min=1, help="Micro-batches per optimizer step."
    ),
    lr: float | None = typer.Option(None, "--lr", help="Adafactor learning rate (constant)."),
    save_steps: int | None = typer.Option(
        None, "--save-steps", min=1, help="Checkpoint every N optimizer steps."
    ),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Continue an unfinished run of the same settings."
    ),
    run_name: str | None = typer.Option(
        None, "--run-name", help="Name of the run folder (default: METHOD-DATE-TIME)."
    ),
    device: DeviceOpt = None,
    precision: str | None = typer.Option(
        None,
        "--precision",
        help="Base weights: auto (int8 on CUDA, fp32 on CPU), int8, bf16, fp32.",
    ),
    model: BaseModelOpt = None,
    preflight: bool = typer.Option(
        True, "--preflight/--no-preflight", help="Refuse to start when memory would not suffice."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Check the data and memory, print the plan, and stop."
    ),
) -> None:
    app = state(ctx)
    settings = app.settings
    from doppelbot.training.plan import plan_training
    from doppelbot.training.service import served_adapter, train_and_record, train_options

    options = train_options(
        settings,
        method=method,
        init_adapter=init_adapter,
        feedback=feedback,
        pairs=pairs,
        lr=lr,
        dataset=dataset,
        max_steps=max_steps,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        save_steps=save_steps,
        run_name=run_name,
        device=device,
        precision=precision,
        model=model,
        resume=resume,
        preflight=preflight,
    )
    console = app.console
    if dry_run:
        _print_plan(
            console, options, plan_training(options, datasets_dir=settings.store.datasets_dir)
        )
        return

    def print_start(update: RunUpdate) -> None:
        if update.status == RUNNING:
            _print_start(console, update)

    result = train_and_record(settings, options, console=console, on_status=print_start)
    if not result.main_process:  # under `accelerate launch` the main process reports
        return
    m = result.metrics
    console.print(f"adapter [bold]{result.adapter_dir.name}[/] → {result.adapter_dir}")
    if m.get("val_loss") is not None:
        start = m.get("val_loss_start")
        console.print(
            f"held-out loss {start:.4f} → {m['val_loss']:.4f}"
            if start is not None
            else f"held-out loss {m['val_loss']:.4f}"
        )
    console.print(f"loss curve and log: {result.run_dir}")
    # Compare with what is served; on a first run nothing is, so with the base model.
    against = "current" if served_adapter(settings) is not None else "base"
    doppelbot = invoked_as()
    console.print(
        f"next: {doppelbot} eval {result.adapter_dir.name} --against {against}; "
        f"{doppelbot} adapter use {result.adapter_dir.name}",
        soft_wrap=True,
    )


def _print_start(console: Console, update: RunUpdate) -> None:
    meta = update.meta
    console.print(
        f"run [bold]{update.run_dir.name}[/] — {meta['plan']['total_steps']} steps on "
        f"{meta['plan']['device']}/{meta['plan']['precision']}, "
        f"{meta['data']['train_examples']} training examples"
        + (f"; resuming from step {meta['resumed_from']}" if meta["resumed_from"] else "")
    )


def _print_plan(console: Console, options: TrainOptions, planned: PlannedRun) -> None:
    table = Table(title="training plan", show_header=False)
    plan = planned.plan
    rows = [
        ("method", options.method),
        ("base model", options.model.base),
        ("device / precision", f"{plan.device} / {plan.precision}"),
        ("dataset", str(planned.data.dataset.folder)),
        ("training examples", str(plan.train_examples)),
        ("validation examples", str(plan.validation_examples)),
        ("examples per step", f"{options.batch_size} × {options.grad_accum} × {plan.world_size}"),
        ("optimizer steps", f"{plan.total_steps} ({plan.steps_per_epoch} per epoch)"),
        (
            "LoRA",
            f"r={options.lora_r} alpha={options.lora_alpha} on {','.join(options.lora_targets)}",
        ),
        ("memory", planned.preflight.describe()),
        ("fits", "yes" if planned.preflight.fits else "NO"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def evaluate(
    ctx: typer.Context,
    adapter: str = typer.Argument(
        ..., help="Adapter to evaluate: folder, name (see `adapter list`), current or base."
    ),
    against: str | None = typer.Option(
        None, "--against", help="A second adapter (folder, name, current or base) side by side."
    ),
    dataset: ValidationDatasetOpt = None,
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Validation samples used (default DOPPELBOT_EVAL_MAX_SAMPLES)."
    ),
    device: DeviceOpt = None,
    precision: str | None = typer.Option(
        None, "--precision", help="auto (int8 on CUDA, fp32 on CPU), int8, bf16 or fp32."
    ),
    model: BaseModelOpt = None,
    output: Path | None = typer.Option(
        None, "--output", help="Write the JSON report here (default: runs/evals/eval-DATE.json)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report instead of a table."),
    show: int = typer.Option(
        0, "--show", min=0, help="Also print this many generated replies next to the real ones."
    ),
    pairs: str | None = typer.Option(
        None,
        "--pairs",
        help="Preference pairs JSONL (or 'latest'): adds preference accuracy and margin on "
        "the held-out share.",
    ),
    all_pairs: bool = typer.Option(
        False, "--all-pairs", help="Score every pair of --pairs, not only the held-out share."
    ),
) -> None:
    app = state(ctx)
    from doppelbot.training.service import compare_adapters

    with app.err_console.status("evaluating on the validation split…"):
        comparison, report = compare_adapters(
            app.settings,
            [adapter] + ([against] if against else []),
            pairs=pairs,
            all_pairs=all_pairs,
            output=output,
            model=model,
            dataset=dataset,
            limit=limit,
            device=device,
            precision=precision,
        )
    if as_json:
        typer.echo(json.dumps(comparison.to_json(), ensure_ascii=False, indent=2))
        return
    _print_comparison(app.console, comparison)
    if show:
        _print_examples(app.console, comparison, show)
    app.console.print(f"JSON report: {report}")


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _print_comparison(console: Console, comparison: Comparison) -> None:
    table = Table(
        title=f"{comparison.dataset}: {comparison.samples} validation samples",
        caption="loss/perplexity: lower is better; chrF, distinct-n, pref_accuracy, "
        "pref_margin (nats): higher is better; style rows: closer to the owner is better",
    )
    table.add_column("metric")
    for report in comparison.reports:
        table.add_column(report.label, justify="right")
    table.add_column("owner (real)", justify="right", style="dim")
    names: list[str] = []
    for report in comparison.reports:
        names += [n for n in report.metrics if n not in names]
    for name in names:
        table.add_row(
            name,
            *(_fmt(r.metrics.get(name)) for r in comparison.reports),
            _fmt(comparison.reference.get(name)),
        )
    console.print(table)


def _print_examples(console: Console, comparison: Comparison, count: int) -> None:
    table = Table(title="generated vs real replies (private: your own data)")
    table.add_column("owner (real)")
    for report in comparison.reports:
        table.add_column(report.label)
    for i, real in enumerate(comparison.references[:count]):
        table.add_row(
            real, *(r.generations[i] if i < len(r.generations) else "" for r in comparison.reports)
        )
    console.print(table)

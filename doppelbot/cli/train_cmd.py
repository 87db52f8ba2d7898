"""``doppelbot train`` and ``doppelbot eval``: fine-tuning and held-out evaluation.

Thin wrappers: option parsing, the SQLite bookkeeping (``training_runs``), and Rich output.
The work is in ``doppelbot.training`` (imported inside the command bodies: torch must not load
for ``doppelbot --help``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from doppelbot.cli.common import invoked_as, open_db, run_async, state

if TYPE_CHECKING:
    from doppelbot.config import Settings
    from doppelbot.training.evaluate import Comparison


def _record_run(settings: Settings, **fields: Any) -> None:
    from doppelbot.training.registry import record_run

    async def go() -> None:
        async with open_db(settings) as db:
            await record_run(db, **fields)

    run_async(go())


def _current(settings: Settings) -> Path | None:
    """The served adapter, exactly as the bot resolves it."""
    from doppelbot.model.loader import serving_adapter

    return run_async(serving_adapter(settings))


def resolve_spec(settings: Settings, spec: str) -> Path | None:
    """ADAPTER argument → folder: a path, a name under the adapters folder, ``base`` (no
    adapter) or ``current`` (the served one)."""
    from doppelbot.errors import TrainingError
    from doppelbot.training.registry import CURRENT_SPEC, resolve_adapter

    if spec == CURRENT_SPEC:
        current = _current(settings)
        if current is None:
            raise TrainingError("no adapter is served yet (`doppelbot adapter use ADAPTER`)")
        return current
    return resolve_adapter(settings.adapters_dir, spec)


def resolve_pairs(settings: Settings, spec: str) -> Path:
    """``--pairs`` value → file: a path, or ``latest`` (the newest feedback export's pairs)."""
    from doppelbot.errors import TrainingError
    from doppelbot.training.dpo import latest_pairs

    if spec == "latest":
        return latest_pairs(settings.data_dir)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TrainingError(f"no preference pairs file {path}")
    return path


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
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda."),
    precision: str | None = typer.Option(
        None,
        "--precision",
        help="Base weights: auto (int8 on CUDA, fp32 on CPU), int8, bf16, fp32.",
    ),
    model: str | None = typer.Option(None, "--model", help="Base model (hub id or local path)."),
    preflight: bool = typer.Option(
        True, "--preflight/--no-preflight", help="Refuse to start when memory would not suffice."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Check the data and memory, print the plan, and stop."
    ),
) -> None:
    app = state(ctx)
    settings = app.settings
    from doppelbot.errors import TrainingError, TrainingInterruptedError
    from doppelbot.training.trainer import TrainOptions, plan_training
    from doppelbot.training.trainer import train as run_train

    init: Path | None = None
    if init_adapter is not None:
        init = resolve_spec(settings, init_adapter)
    elif method in ("feedback", "dpo"):
        init = _current(settings)
    if method == "feedback" and feedback is None:
        raise TrainingError("--method feedback needs --feedback PATH (`doppelbot feedback export`)")
    pairs_path: Path | None = None
    if method == "dpo":
        pairs_path = resolve_pairs(settings, pairs or "latest")
        lr = lr or settings.dpo_learning_rate
    elif pairs is not None:
        raise TrainingError("--pairs is for --method dpo")
    options = TrainOptions.from_settings(
        settings,
        method=method,
        dataset=dataset,
        feedback=feedback,
        pairs=pairs_path,
        init_adapter=init,
        max_steps=max_steps,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
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
        planned = plan_training(options, datasets_dir=settings.datasets_dir)
        _print_plan(console, options, planned)
        return

    started_at = int(time.time())
    recorded: dict[str, Any] = {}

    def on_start(run_dir: Path, meta: dict[str, Any]) -> None:
        recorded.update(
            run_dir=run_dir,
            method=options.method,
            base_model=options.model,
            started_at=started_at,
            dataset_hash=meta["data"]["dataset_hash"],
            params={**meta["trajectory"], **meta["options"], "plan": meta["plan"]},
        )
        _record_run(settings, status="running", **recorded)
        console.print(
            f"run [bold]{run_dir.name}[/] — {meta['plan']['total_steps']} steps on "
            f"{meta['plan']['device']}/{meta['plan']['precision']}, "
            f"{meta['data']['train_examples']} training examples"
            + (f"; resuming from step {meta['resumed_from']}" if meta["resumed_from"] else "")
        )

    try:
        result = run_train(
            options,
            datasets_dir=settings.datasets_dir,
            runs_dir=settings.runs_dir,
            adapters_dir=settings.adapters_dir,
            console=console,
            on_start=on_start,
        )
    except BaseException as exc:
        if recorded:
            status = (
                "interrupted"
                if isinstance(exc, TrainingInterruptedError | KeyboardInterrupt)
                else "failed"
            )
            _record_run(settings, status=status, metrics={"error": str(exc)[:500]}, **recorded)
        raise
    if not recorded:  # a non-main process under `accelerate launch`: the main one reports
        return
    _record_run(
        settings,
        status="finished",
        metrics=result.metrics,
        adapter_path=result.adapter_dir,
        finished_at=int(time.time()),
        **recorded,
    )
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
    against = "current" if _current(settings) is not None else "base"
    doppelbot = invoked_as()
    console.print(
        f"next: {doppelbot} eval {result.adapter_dir.name} --against {against}; "
        f"{doppelbot} adapter use {result.adapter_dir.name}",
        soft_wrap=True,
    )


def _print_plan(console: Any, options: Any, planned: Any) -> None:
    from rich.table import Table

    table = Table(title="training plan", show_header=False)
    plan = planned.plan
    rows = [
        ("method", options.method),
        ("base model", options.model),
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
    dataset: str | None = typer.Option(
        None, "--dataset", help="Dataset name or path (default: latest); its validation split."
    ),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Validation samples used (default DOPPELBOT_EVAL_MAX_SAMPLES)."
    ),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda."),
    precision: str | None = typer.Option(
        None, "--precision", help="auto (int8 on CUDA, fp32 on CPU), int8, bf16 or fp32."
    ),
    model: str | None = typer.Option(None, "--model", help="Base model (hub id or local path)."),
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
    settings = app.settings
    from doppelbot.dataset.jsonl import write_json
    from doppelbot.training.evaluate import EvalOptions, evaluate_adapters

    specs = [adapter] + ([against] if against else [])
    paths = [resolve_spec(settings, s) for s in specs]
    options = EvalOptions(
        model=model or settings.model,
        data_dir=settings.data_dir,
        dataset=dataset,
        limit=limit or settings.eval_max_samples,
        device=device or settings.device,
        precision=precision or settings.train_precision,
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        max_input_tokens=settings.max_input_tokens,
        max_target_tokens=settings.max_target_tokens,
        torch_threads=settings.torch_threads,
    )
    extras: dict[str, Any] = {}
    if pairs is not None:
        from doppelbot.errors import TrainingError
        from doppelbot.training.dpo import load_pairs, split_pairs

        rows = load_pairs(resolve_pairs(settings, pairs))
        scored = rows if all_pairs else split_pairs(rows, settings.pref_heldout_share)[1]
        if not scored:
            raise TrainingError(
                f"no held-out pairs among {len(rows)} (DOPPELBOT_PREF_HELDOUT_SHARE="
                f"{settings.pref_heldout_share}); use --all-pairs"
            )
        extras = {
            "pairs": scored,
            "max_input": settings.max_input_tokens,
            "max_target": settings.max_target_tokens,
        }
    labels = [p.name if p is not None else "base" for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{i + 1}:{label}" for i, label in enumerate(labels)]
    with app.err_console.status("evaluating on the validation split…"):
        comparison = evaluate_adapters(
            options, paths, datasets_dir=settings.datasets_dir, labels=labels, extras=extras
        )
    report = comparison.to_json()
    target = output or settings.runs_dir / "evals" / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(target, report)
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False, indent=2))
        return
    _print_comparison(app.console, comparison)
    if show:
        _print_examples(app.console, comparison, show)
    app.console.print(f"JSON report: {target}")


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _print_comparison(console: Any, comparison: Comparison) -> None:
    from rich.table import Table

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


def _print_examples(console: Any, comparison: Comparison, count: int) -> None:
    from rich.table import Table

    table = Table(title="generated vs real replies (private: your own data)")
    table.add_column("owner (real)")
    for report in comparison.reports:
        table.add_column(report.label)
    for i, real in enumerate(comparison.references[:count]):
        table.add_row(
            real, *(r.generations[i] if i < len(r.generations) else "" for r in comparison.reports)
        )
    console.print(table)

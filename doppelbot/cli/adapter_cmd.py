"""``doppelbot adapter``: choose (and roll back) the adapter the bot serves.

``use`` switches only when the candidate's held-out loss on the current validation split is not
worse than the served adapter's (``--force`` overrides); every choice is kept in SQLite, so
``rollback`` can always return to the previous one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from doppelbot.cli.common import open_db, run_async, state

if TYPE_CHECKING:
    from doppelbot.training.registry import AdapterChoice

app = typer.Typer(no_args_is_help=True)
log = logging.getLogger(__name__)


@app.command("use", help="Serve this adapter if its held-out loss is not worse (or --force).")
def use(
    ctx: typer.Context,
    adapter: str = typer.Argument(..., help="Adapter folder or name (see `adapter list`)."),
    force: bool = typer.Option(
        False, "--force", help="Switch even if the held-out loss is worse (or not measurable)."
    ),
    dataset: str | None = typer.Option(
        None, "--dataset", help="Dataset whose validation split decides (default: latest)."
    ),
) -> None:
    app_state = state(ctx)
    settings = app_state.settings
    console = app_state.console
    from doppelbot.errors import TrainingError
    from doppelbot.training.registry import (
        adapter_info,
        check_not_worse,
        current_choice,
        resolve_adapter,
        use_adapter,
    )

    candidate = resolve_adapter(settings.adapters_dir, adapter)
    if candidate is None:
        raise TrainingError(
            "`adapter use` needs an adapter folder (to serve no adapter, roll back)"
        )
    info = adapter_info(candidate)
    if info.base_model and info.base_model != settings.model and not force:
        raise TrainingError(
            f"{info.name} was trained on {info.base_model}, but DOPPELBOT_MODEL is "
            f"{settings.model}; use --force if they are the same weights"
        )

    async def read_current() -> AdapterChoice | None:
        async with open_db(settings) as db:
            return await current_choice(db)

    current = run_async(read_current())
    if current is not None and current.adapter_path.resolve() == candidate.resolve():
        console.print(f"{info.name} is already served")
        return

    loss: float | None = None
    if not force:
        from doppelbot.training.evaluate import EvalOptions, heldout_losses

        options = EvalOptions(
            model=settings.model,
            data_dir=settings.data_dir,
            dataset=dataset,
            limit=settings.eval_max_samples,
            device=settings.device,
            precision=settings.train_precision,
            batch_size=settings.batch_size,
            max_input_tokens=settings.max_input_tokens,
            max_target_tokens=settings.max_target_tokens,
            metrics=("loss",),
            torch_threads=settings.torch_threads,
        )
        compare = [candidate]
        if current is not None and current.adapter_path.is_dir():
            compare.append(current.adapter_path)
        elif current is not None:
            console.print(f"the served adapter {current.adapter_path} is gone; not comparing")
        with app_state.err_console.status("measuring held-out loss…"):
            losses = heldout_losses(options, compare, datasets_dir=settings.datasets_dir)
        loss = losses[0]
        if len(losses) > 1 and current is not None:
            check_not_worse(info.name, losses[0], current.adapter_name, losses[1])
            console.print(
                f"held-out loss {losses[0]:.4f} vs {losses[1]:.4f} ({current.adapter_name})"
            )
        else:
            console.print(f"held-out loss {losses[0]:.4f}")

    async def record() -> AdapterChoice:
        async with open_db(settings) as db:
            return await use_adapter(db, candidate, heldout_loss=loss, forced=force)

    choice = run_async(record())
    console.print(
        f"serving [bold]{choice.adapter_name}[/]"
        + (" (forced)" if force else "")
        + (f"; previous: {current.adapter_name} (`doppelbot adapter rollback`)" if current else "")
    )
    if settings.adapter_path is not None:
        console.print(
            f"note: DOPPELBOT_ADAPTER_PATH={settings.adapter_path} is set and wins over this "
            "choice until you unset it"
        )
    console.print("restart `doppelbot run` to load it")


@app.command("rollback", help="Serve the previously chosen adapter again.")
def rollback(ctx: typer.Context) -> None:
    app_state = state(ctx)
    settings = app_state.settings
    from doppelbot.training.registry import rollback as do_rollback

    async def go() -> AdapterChoice:
        async with open_db(settings) as db:
            return await do_rollback(db)

    choice = run_async(go())
    app_state.console.print(f"serving [bold]{choice.adapter_name}[/] again ({choice.adapter_path})")
    if not choice.adapter_path.is_dir():
        app_state.console.print("warning: that folder no longer exists")


@app.command("list", help="Trained adapters, their metrics, and which one is served.")
def list_(ctx: typer.Context) -> None:
    app_state = state(ctx)
    settings = app_state.settings
    from rich.table import Table

    from doppelbot.training.registry import choice_history, current_adapter, list_adapters

    async def go() -> tuple[Path | None, list[AdapterChoice]]:
        async with open_db(settings) as db:
            return await current_adapter(settings, db), await choice_history(db)

    current, history = run_async(go())
    current = None if current is None else current.resolve()
    previous = history[0].previous_choice_id if history else None
    previous_path = next(
        (c.adapter_path.resolve() for c in history if c.choice_id == previous), None
    )
    adapters = list_adapters(settings.adapters_dir)
    if not adapters:
        app_state.console.print(f"no adapters in {settings.adapters_dir} yet (`doppelbot train`)")
        return
    table = Table(title=str(settings.adapters_dir))
    for col in ("", "adapter", "method", "created", "steps", "val loss", "base model"):
        table.add_column(col)
    import time

    for info in adapters:
        here = info.path.resolve()
        mark = "●" if current == here else ("↶" if previous_path == here else "")
        metrics = info.metrics
        created = info.meta.get("created_at")
        table.add_row(
            mark,
            info.name,
            info.method,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(created)) if created else "–",
            str(metrics.get("steps", "–")),
            f"{metrics['val_loss']:.4f}" if metrics.get("val_loss") is not None else "–",
            info.base_model or "–",
        )
    app_state.console.print(table)
    app_state.console.print("● served   ↶ previous (rollback target)")
    if settings.adapter_path is not None:
        app_state.console.print(f"DOPPELBOT_ADAPTER_PATH pins {settings.adapter_path}")

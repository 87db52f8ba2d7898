"""``doppelbot adapter``: choose (and roll back) the adapter the bot serves.

``use`` switches only when the candidate's held-out loss on the current validation split is not
worse than the served adapter's (``--force`` overrides); every choice is kept in SQLite, so
``rollback`` can always return to the previous one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer
from rich.table import Table

from doppelbot.cli.common import open_db, run_async, state
from doppelbot.store.adapters import AdapterChoice, choice_history
from doppelbot.training.registry import current_adapter, list_adapters
from doppelbot.training.registry import rollback as do_rollback

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
    from doppelbot.training.service import switch_adapter

    switch = switch_adapter(
        settings,
        adapter,
        force=force,
        dataset=dataset,
        measuring=lambda: app_state.err_console.status("measuring held-out loss…"),
    )
    previous = switch.previous
    if switch.choice is None:
        console.print(f"{switch.info.name} is already served")
        return
    if switch.previous_gone and previous is not None:
        console.print(f"the served adapter {previous.adapter_path} is gone; not comparing")
    if switch.loss is not None and switch.previous_loss is not None and previous is not None:
        console.print(
            f"held-out loss {switch.loss:.4f} vs {switch.previous_loss:.4f} "
            f"({previous.adapter_name})"
        )
    elif switch.loss is not None:
        console.print(f"held-out loss {switch.loss:.4f}")
    console.print(
        f"serving [bold]{switch.choice.adapter_name}[/]"
        + (" (forced)" if force else "")
        + (
            f"; previous: {previous.adapter_name} (`doppelbot adapter rollback`)"
            if previous
            else ""
        )
    )
    if settings.model.adapter_path is not None:
        console.print(
            f"note: DOPPELBOT_ADAPTER_PATH={settings.model.adapter_path} is set and wins over this "
            "choice until you unset it"
        )
    console.print("restart `doppelbot run` to load it")


@app.command("rollback", help="Serve the previously chosen adapter again.")
def rollback(ctx: typer.Context) -> None:
    app_state = state(ctx)
    settings = app_state.settings

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

    async def go() -> tuple[Path | None, list[AdapterChoice]]:
        async with open_db(settings) as db:
            return await current_adapter(settings, db), await choice_history(db)

    current, history = run_async(go())
    current = None if current is None else current.resolve()
    previous = history[0].previous_choice_id if history else None
    previous_path = next(
        (c.adapter_path.resolve() for c in history if c.choice_id == previous), None
    )
    adapters = list_adapters(settings.store.adapters_dir)
    if not adapters:
        app_state.console.print(
            f"no adapters in {settings.store.adapters_dir} yet (`doppelbot train`)"
        )
        return
    table = Table(title=str(settings.store.adapters_dir))
    for col in ("", "adapter", "method", "created", "steps", "val loss", "base model"):
        table.add_column(col)

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
    if settings.model.adapter_path is not None:
        app_state.console.print(f"DOPPELBOT_ADAPTER_PATH pins {settings.model.adapter_path}")

"""``doppelbot train`` and ``doppelbot eval``: fine-tuning and held-out evaluation."""

from __future__ import annotations

from pathlib import Path

import typer

from doppelbot.cli.common import not_available, state


def train(ctx: typer.Context) -> None:
    state(ctx)
    not_available("train")


def evaluate(
    ctx: typer.Context,
    adapter: Path = typer.Argument(..., help="Adapter folder to evaluate."),
) -> None:
    state(ctx)
    not_available("eval")

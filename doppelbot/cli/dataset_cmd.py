"""``doppelbot dataset``: build the fine-tuning set from the stored history."""

from __future__ import annotations

import typer

from doppelbot.cli.common import not_available, state


def dataset(ctx: typer.Context) -> None:
    state(ctx)
    not_available("dataset")

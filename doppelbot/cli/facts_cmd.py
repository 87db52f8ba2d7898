"""``doppelbot facts``: the knowledge base of facts about the owner."""

from __future__ import annotations

from pathlib import Path

import typer

from doppelbot.cli.common import not_available, state

app = typer.Typer(no_args_is_help=True)


@app.command("add", help="Add one fact.")
def add(ctx: typer.Context, text: str = typer.Argument(..., help="The fact.")) -> None:
    state(ctx)
    not_available("facts add")


@app.command("list", help="List facts.")
def list_(ctx: typer.Context) -> None:
    state(ctx)
    not_available("facts list")


@app.command("remove", help="Remove a fact by id.")
def remove(ctx: typer.Context, fact_id: int = typer.Argument(..., help="Fact id.")) -> None:
    state(ctx)
    not_available("facts remove")


@app.command("import", help="Import facts from a CSV (column `fact`) or a text/markdown file.")
def import_(ctx: typer.Context, path: Path = typer.Argument(..., help="File to import.")) -> None:
    state(ctx)
    not_available("facts import")


@app.command("search", help="Show the facts most relevant to a query, with scores.")
def search(ctx: typer.Context, query: str = typer.Argument(..., help="Query text.")) -> None:
    state(ctx)
    not_available("facts search")

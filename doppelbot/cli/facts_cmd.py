"""``doppelbot facts``: the knowledge base of facts about the owner.

``add``/``list``/``remove``/``import`` only touch SQLite; of these commands ``search`` alone
loads the embedder (lazily, inside its body), so managing facts stays instant.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn
from rich.table import Table

from doppelbot.cli.common import open_db, run_async, state
from doppelbot.core.errors import KnowledgeError
from doppelbot.store.facts import SOURCE_CLI, add_fact_ex, import_facts, list_facts, remove_fact

app = typer.Typer(no_args_is_help=True)


def _when(stamp: int) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M")


@app.command("add", help="Add one fact (adding the same text again changes nothing).")
def add(ctx: typer.Context, text: str = typer.Argument(..., help="The fact.")) -> None:
    st = state(ctx)

    async def go() -> None:
        async with open_db(st.settings) as db:
            result = await add_fact_ex(db, text, source=SOURCE_CLI)
        if result.created:
            st.console.print(f"added fact #{result.fact.fact_id}")
        else:
            st.console.print(f"already known as fact #{result.fact.fact_id}")

    run_async(go())


@app.command("list", help="List facts.")
def list_(ctx: typer.Context) -> None:
    st = state(ctx)

    async def go() -> None:
        async with open_db(st.settings) as db:
            facts = await list_facts(db)
        if not facts:
            st.console.print(
                "no facts yet: `doppelbot facts add TEXT` or `doppelbot facts import FILE`"
            )
            return
        table = Table(title=f"Facts ({len(facts)})")
        table.add_column("id", justify="right")
        table.add_column("fact", overflow="fold")
        table.add_column("source")
        table.add_column("added (UTC)")
        for f in facts:
            table.add_row(str(f.fact_id), f.text, f.source, _when(f.created_at))
        st.console.print(table)

    run_async(go())


@app.command("remove", help="Remove a fact by id (its cached embeddings go too).")
def remove(ctx: typer.Context, fact_id: int = typer.Argument(..., help="Fact id.")) -> None:
    st = state(ctx)

    async def go() -> None:
        async with open_db(st.settings) as db:
            removed = await remove_fact(db, fact_id)
        if removed is None:
            raise KnowledgeError(f"no fact with id {fact_id} (see `doppelbot facts list`)")
        st.console.print(f"removed fact #{fact_id}")

    run_async(go())


@app.command(
    "import",
    help="Import facts from a CSV (column `fact`), a .txt (one per line) or a .md file (one per "
    "paragraph or list item). All or nothing; facts already known are skipped.",
)
def import_(ctx: typer.Context, path: Path = typer.Argument(..., help="File to import.")) -> None:
    st = state(ctx)

    async def go() -> None:
        async with open_db(st.settings) as db:
            result = await import_facts(db, path)
        st.console.print(
            f"imported {result.added} new fact(s) from {path.name}"
            + (f" ({result.known} already known)" if result.known else "")
        )

    run_async(go())


@app.command("search", help="Show the facts most relevant to a query, with scores.")
def search(
    ctx: typer.Context,
    query: str = typer.Argument(..., help="Query text."),
    top_k: int = typer.Option(10, "--top-k", "-k", min=1, help="Show at most this many facts."),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        min=-1.0,
        max=1.0,
        help="Hide facts scoring below this cosine (default: show all).",
    ),
) -> None:
    from doppelbot.knowledge import KnowledgeBase

    st = state(ctx)
    settings = st.settings

    async def go() -> None:
        async with open_db(settings) as db:
            with Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                console=st.err_console,
                transient=True,
            ) as bar:
                loading = bar.add_task(f"loading {settings.knowledge.embedder_model}", total=None)
                encoding: list[TaskID] = []

                def progress(done: int, total: int) -> None:
                    if not encoding:
                        bar.update(loading, visible=False)
                        encoding.append(bar.add_task("embedding facts", total=total))
                    bar.update(encoding[0], completed=done)

                kb = await KnowledgeBase.open(settings, db, progress=progress)
            try:
                hits = await kb.retrieve(
                    query, top_k=top_k, threshold=-1.0 if threshold is None else threshold
                )
            finally:
                await kb.aclose()
        if not hits:
            st.console.print("no facts match" if len(kb) else "no facts yet")
            return
        table = Table(
            title=f"Facts for the query (of {len(kb)})", caption=settings.knowledge.embedder_model
        )
        table.add_column("#", justify="right")
        table.add_column("score", justify="right")
        table.add_column("id", justify="right")
        table.add_column("fact", overflow="fold")
        table.add_column("in prompt", justify="center")
        for rank, hit in enumerate(hits, start=1):
            used = (
                rank <= settings.knowledge.facts_top_k
                and hit.score >= settings.knowledge.facts_threshold
            )
            table.add_row(
                str(rank),
                f"{hit.score:.3f}",
                str(hit.fact_id),
                hit.text,
                "✓" if used else "",
                style=None if used else "dim",
            )
        st.console.print(table)
        st.console.print(
            f"✓ = would go into a reply's prompt (top {settings.knowledge.facts_top_k}, score ≥ "
            f"{settings.knowledge.facts_threshold})",
            style="dim",
        )

    run_async(go())

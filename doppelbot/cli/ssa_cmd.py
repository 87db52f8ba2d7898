"""``doppelbot ssa``: Sensibleness and Specificity Average with the owner's labels.

``start`` samples validation contexts, generates a reply per adapter (one model loaded at a
time, closed before the next, so memory stays that of one model), stores the blind-ordered
batch and posts it as cards to Saved Messages (resumable with ``--batch``); ``collect`` reads
the owner's answers to the cards and stores them as labels; ``report`` prints the figures with
95% intervals. The flow itself is ``doppelbot.ssa.flow``; this module wires the model worker,
Telethon, SQLite and Rich around it (heavy imports inside the command bodies).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from doppelbot.cli.common import AccountOpt, ValidationDatasetOpt, bars, open_db, run_async, state
from doppelbot.core.errors import DatasetError, DoppelbotError, GenerationError
from doppelbot.core.ports import ModelIdentity
from doppelbot.dataset.jsonl import VALIDATION_FILE, read_samples, resolve_dataset_dir
from doppelbot.ssa.flow import (
    CARD_MARK,
    OWNER_SOURCE,
    SourceRow,
    compare,
    post_batch,
    prepare_batch,
    record_label,
    sample_contexts,
)
from doppelbot.ssa.labels import LabelSyntaxError
from doppelbot.store import ssa as store

if TYPE_CHECKING:
    from rich.console import Console

    from doppelbot.config import GenerationOptions, Settings
    from doppelbot.core.domain import Sample
    from doppelbot.store.database import Database

app = typer.Typer(no_args_is_help=True)

OWNER_LABEL = "owner (reference)"


class _Replies:
    """A ``ReplyGenerator`` that answers from replies generated before (one source's model is
    closed by the time the batch is assembled); a missing reply is a failed generation."""

    def __init__(self, source: str, replies: dict[str, str | None]) -> None:
        self.source = source
        self.replies = replies

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.source, None)

    async def generate(self, prompt: str, options: GenerationOptions | None = None) -> str:
        reply = self.replies.get(prompt)
        if not reply:
            raise GenerationError("no reply was generated for this context")
        return reply


async def _generate_all(
    settings: Settings,
    console: Console,
    sources: dict[str, Path | None],
    contexts: Sequence[Sample],
) -> dict[str, _Replies]:
    from doppelbot.model.worker import model_worker

    options = settings.generation
    out: dict[str, _Replies] = {}
    with bars(console) as progress:
        for source, adapter in sources.items():
            task = progress.add_task(f"generating with {source}", total=len(contexts))
            replies: dict[str, str | None] = {}
            # One model at a time: started, used for every context, closed before the next.
            worker = model_worker(settings, adapter=adapter)
            async with worker:
                for sample in contexts:
                    try:
                        replies[sample.model_input] = await worker.generate(
                            sample.model_input, options
                        )
                    except GenerationError:
                        replies[sample.model_input] = None
                    progress.advance(task)
            out[source] = _Replies(source, replies)
    return out


def _sources(settings: Settings, adapter: str, against: str | None) -> dict[str, Path | None]:
    from doppelbot.training.service import adapter_from_spec

    out: dict[str, Path | None] = {}
    for spec in [adapter] + ([against] if against else []):
        path = adapter_from_spec(settings, spec)
        name = "base" if path is None else path.name
        if name in out:
            raise DoppelbotError(f"--adapter and --against are the same model ({name})")
        if name == OWNER_SOURCE:
            raise DoppelbotError(f"an adapter may not be called {OWNER_SOURCE!r}")
        out[name] = path
    return out


async def _post(
    settings: Settings, db: Database, batch_id: int, client: Any, console: Console
) -> int:
    from doppelbot.telegram.saved import TelethonSavedMessages

    total, posted, _ = await store.batch_progress(db, batch_id)
    with bars(console) as progress:
        task = progress.add_task("posting cards", total=total, completed=posted)
        return await post_batch(
            db,
            batch_id,
            TelethonSavedMessages(client, flood_bound=settings.export.flood_wait_max_s),
            on_progress=lambda done, _n: progress.update(task, completed=posted + done),
        )


async def start_batch(
    settings: Settings,
    console: Console,
    *,
    adapter: str = "current",
    against: str | None = None,
    n: int = 50,
    seed: int | None = None,
    include_owner: bool = True,
    dataset: str | None = None,
    batch: int | None = None,
    account: str | None = None,
) -> int:
    """Generate and post a batch (or, with ``batch``, post what is left of it) to the Saved
    Messages of ``account`` (None: the default account)."""
    from doppelbot.telegram.client import connected

    async with open_db(settings, account, "session") as db:
        if batch is not None:
            total, posted, _ = await store.batch_progress(db, batch)
            if total == 0:
                raise DoppelbotError(f"no SSA batch #{batch} (see `doppelbot ssa report`)")
            if posted == total:
                console.print(f"batch #{batch}: all {total} cards are posted already")
                return batch
        async with connected(settings, receive_updates=False) as client:
            if batch is None:
                folder = resolve_dataset_dir(settings.store.datasets_dir, dataset)
                path = folder / VALIDATION_FILE
                if not path.is_file():
                    raise DatasetError(
                        f"{folder} has no {VALIDATION_FILE}: run `doppelbot dataset`"
                    )
                samples = list(read_samples(path))
                if not samples:
                    raise DatasetError(f"{path} is empty: nothing to label")
                seed = random.randrange(1 << 31) if seed is None else seed
                sources = _sources(settings, adapter, against)
                contexts = sample_contexts(samples, n, seed)
                generators = await _generate_all(settings, console, sources, contexts)
                batch = await prepare_batch(
                    db,
                    contexts,
                    generators,
                    settings.generation,
                    dataset=folder.name,
                    n=n,
                    seed=seed,
                    include_owner=include_owner,
                )
                console.print(
                    f"batch #{batch}: {len(contexts)} contexts × "
                    f"{len(sources) + int(include_owner)} sources (seed {seed})"
                )
            try:
                count = await _post(settings, db, batch, client, console)
            except DoppelbotError:
                console.print(
                    f"[yellow]posting stopped; batch #{batch} is saved: "
                    f"`doppelbot ssa start --batch {batch}` posts the remaining cards[/]"
                )
                raise
        console.print(
            f"posted {count} cards to Saved Messages (batch #{batch}). Answer each card there "
            "with two marks — sensible? specific? — e.g. 11, 10 or 00, then run "
            "`doppelbot ssa collect`."
        )
    return batch


@app.command("start", help="Post labelling cards for N validation contexts to Saved Messages.")
def start(
    ctx: typer.Context,
    adapter: str = typer.Option(
        "current", "--adapter", help="Adapter: folder, name, current (served) or base."
    ),
    against: str | None = typer.Option(
        None, "--against", help="A second adapter, labelled blind on the same contexts."
    ),
    n: int = typer.Option(50, "--n", min=1, help="Validation contexts to sample."),
    seed: int | None = typer.Option(None, "--seed", help="Sampling/mixing seed (default random)."),
    no_owner: bool = typer.Option(
        False, "--no-owner", help="Leave out the owner's real replies (the reference row)."
    ),
    dataset: ValidationDatasetOpt = None,
    batch: int | None = typer.Option(
        None, "--batch", help="Post the remaining cards of this batch (after an interruption)."
    ),
    account: AccountOpt = None,
) -> None:
    app_state = state(ctx)
    name = app_state.use_account(account)
    run_async(
        start_batch(
            app_state.settings,
            app_state.console,
            adapter=adapter,
            against=against,
            n=n,
            seed=seed,
            include_owner=not no_owner,
            dataset=dataset,
            batch=batch,
            account=name,
        )
    )


async def collect_labels(
    settings: Settings, console: Console, batch: int | None = None, account: str | None = None
) -> int:
    """Read the owner's answers to the cards ``account`` posted; store the well-formed ones;
    print a hint for each malformed one. Idempotent: labels are upserts, the newest answer to
    a card wins."""
    from doppelbot.telegram.client import connected
    from doppelbot.telegram.saved import answers_to_cards

    async with open_db(settings, account) as db:
        ids = await store.card_ids(db, batch)
        if not ids:
            console.print("no SSA cards posted yet: run `doppelbot ssa start`")
            return 0
        async with connected(settings, receive_updates=False) as client:
            with console.status("reading your answers in Saved Messages…"):
                answers = await answers_to_cards(client, ids)
        stored, bad = 0, 0
        with bars(console) as progress:
            task = progress.add_task("recording labels", total=len(answers))
            for answer in answers:
                try:
                    if await record_label(db, answer.card_message_id, answer.text) is not None:
                        stored += 1
                except LabelSyntaxError as exc:
                    bad += 1
                    item = await store.item_by_card(db, answer.card_message_id)
                    card = (
                        f"{CARD_MARK}{item.item_id}" if item else f"card {answer.card_message_id}"
                    )
                    progress.console.print(
                        f"[yellow]{card}: answer {answer.text.strip()!r} not read[/] — {exc}"
                    )
                progress.advance(task)
        labelled = await store.count_labelled(db, batch)
    console.print(
        f"{len(answers)} answers read, {stored} labels stored, {bad} malformed; "
        f"{labelled} of {len(ids)} cards labelled"
        + ("" if bad == 0 else " (answer a malformed card again, then collect again)")
    )
    return stored


@app.command("collect", help="Read your answers to the cards from Saved Messages as labels.")
def collect(
    ctx: typer.Context,
    batch: int | None = typer.Option(None, "--batch", help="Only this batch (default: all)."),
    account: AccountOpt = None,
) -> None:
    app_state = state(ctx)
    name = app_state.use_account(account)
    run_async(collect_labels(app_state.settings, app_state.console, batch, name))


def _row_json(row: SourceRow) -> dict[str, Any]:
    return {
        "source": row.source,
        "label": OWNER_LABEL if row.source == "owner" else row.source,
        "all": asdict(row.report),
        "common": None if row.common is None else asdict(row.common),
    }


def _ci(value: float, interval: Any) -> str:
    return f"{value:.2f} [{interval.low:.2f}–{interval.high:.2f}]"


def _table(title: str, rows: Sequence[tuple[str, Any]]) -> Any:
    table = Table(title=title, caption="95% intervals: Wilson (shares), normal (SSA)")
    for col in ("source", "n", "sensibleness", "specificity", "SSA"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for source, report in rows:
        table.add_row(
            OWNER_LABEL if source == "owner" else source,
            str(report.n),
            _ci(report.sensibleness, report.sensibleness_ci),
            _ci(report.specificity, report.specificity_ci),
            _ci(report.ssa, report.ssa_ci),
        )
    return table


async def report_rows(settings: Settings, batch: int | None, all_batches: bool) -> tuple[Any, ...]:
    async with open_db(settings) as db:
        chosen = None if all_batches else batch or await store.latest_batch_id(db)
        labels = await store.labels_by_source(db, chosen)
        progress = await store.batch_progress(db, chosen) if chosen is not None else None
    return chosen, compare(labels), progress


@app.command("report", help="Print sensibleness, specificity and SSA with 95% intervals.")
def report(
    ctx: typer.Context,
    batch: int | None = typer.Option(None, "--batch", help="This batch (default: the latest)."),
    all_batches: bool = typer.Option(False, "--all", help="Every batch together."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    app_state = state(ctx)
    console = app_state.console
    chosen, rows, progress = run_async(report_rows(app_state.settings, batch, all_batches))
    if as_json:
        payload = {
            "batch": chosen,
            "items": None if progress is None else progress[0],
            "labelled": None if progress is None else progress[2],
            "sources": [_row_json(r) for r in rows],
        }
        typer.echo(json.dumps(payload, ensure_ascii=False, indent=2))
        return
    if not rows:
        console.print(
            "no labels yet: answer the cards in Saved Messages, then `doppelbot ssa collect`"
        )
        return
    where = "all batches" if chosen is None else f"batch #{chosen}"
    if progress is not None:
        where += f" — {progress[2]} of {progress[0]} cards labelled"
    console.print(_table(f"SSA, {where}", [(r.source, r.report) for r in rows]))
    common = [(r.source, r.common) for r in rows if r.common is not None]
    if common:
        shared = common[0][1].n
        if all(r.common is not None and r.common.n == r.report.n for r in rows):
            console.print(f"every source was labelled on the same {shared} contexts")
        else:
            console.print(_table(f"on the {shared} contexts every source has a label for", common))

"""``doppelbot chat``: talk to the doppelganger in the terminal.

The same pieces as the bot: the prompt format from settings (persona, role labels), facts from
the knowledge base when there are any, the last turns of the conversation trimmed to the
model's input budget exactly like the dataset does, and the model worker thread. You play the
other person; the model answers as you.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import typer

from doppelbot.cli.common import run_async, state
from doppelbot.cli.model_cmd import ADAPTER_HELP, load_progress, resolve_adapter_option

if TYPE_CHECKING:
    from rich.console import Console

    from doppelbot.config import Settings
    from doppelbot.domain import Turn

log = logging.getLogger(__name__)

QUIT = {"/quit", "/exit", "/q"}
RESET = "/reset"
HELP = "/help"
CHAT_HELP = """Commands (a line starting with / is never sent to the model):
/reset — forget the dialogue so far
/quit, /exit, /q (or Ctrl+D) — leave
/help — this text
Anything else is a message from the other person; the model answers as you."""


def chat_command(text: str) -> str | None:
    """What a ``/…`` line does: "quit", "reset", "help" or an error line; None for a message."""
    if not text.startswith("/"):
        return None
    word = text.split()[0].lower() if text.split() else "/"
    if word in QUIT:
        return "quit"
    if word == RESET:
        return "reset"
    if word == HELP:
        return "help"
    return f"unknown command {word} (see {HELP})"


def chat(
    ctx: typer.Context,
    adapter: str | None = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    turns: int = typer.Option(
        8, "--turns", min=1, help="Dialogue turns kept as context (yours and its)."
    ),
    greedy: bool = typer.Option(
        False, "--greedy", help="Decode greedily instead of sampling (repeatable answers)."
    ),
    facts: bool = typer.Option(
        True, "--facts/--no-facts", help="Add facts from the knowledge base to the prompt."
    ),
    show_prompt: bool = typer.Option(
        False, "--show-prompt", help="Print the model input before each answer."
    ),
) -> None:
    """Talk to your doppelganger: you write as the other person, it answers as you."""
    app_state = state(ctx)
    settings = app_state.settings
    chosen = resolve_adapter_option(settings, adapter)
    run_async(
        _chat(
            settings,
            app_state.console,
            app_state.err_console,
            chosen,
            turns=turns,
            greedy=greedy,
            use_facts=facts,
            show_prompt=show_prompt,
        )
    )


async def _open_facts(settings: Settings) -> tuple[Any, Any]:
    """(knowledge base, database) when there are facts and the knowledge module is present;
    (None, None) otherwise — chat works without facts."""
    if settings.facts_top_k == 0 or not settings.db_path.exists():
        return None, None
    try:
        from doppelbot.knowledge.knowledge_base import KnowledgeBase
    except ImportError:
        return None, None
    from doppelbot.errors import DoppelbotError
    from doppelbot.store.database import Database

    db = await Database.open(settings.db_path)
    try:
        from doppelbot.store.facts import count_facts

        if not await count_facts(db):
            await db.close()
            return None, None
        return await KnowledgeBase.open(settings, db), db
    except DoppelbotError as exc:
        log.warning("chat: knowledge base unavailable (%s): answering without facts", exc)
        await db.close()
        return None, None


def _read_line(console: Console) -> str | None:
    try:
        return console.input("[bold cyan]вы>[/] ")
    except EOFError:
        return None


def add_turn(history: list[Turn], turn: Turn) -> None:
    """Consecutive messages of one speaker are one turn (joined by newlines), as in the
    dataset."""
    from doppelbot.domain import Turn

    if history and history[-1].role is turn.role:
        history[-1] = Turn(turn.role, f"{history[-1].text}\n{turn.text}")
    else:
        history.append(turn)


async def _chat(
    settings: Settings,
    console: Console,
    err_console: Console,
    adapter: Any,
    *,
    turns: int,
    greedy: bool,
    use_facts: bool,
    show_prompt: bool,
) -> None:
    import asyncio
    from dataclasses import replace

    from rich.markup import escape

    from doppelbot.dataset.budget import fit_turns
    from doppelbot.domain import Role, Turn
    from doppelbot.errors import GenerationError
    from doppelbot.model.tokenizer import TokenCounter
    from doppelbot.model.worker import ModelWorker
    from doppelbot.prompt import PromptFormat

    fmt = PromptFormat(settings.persona, settings.role_other, settings.role_owner)
    options = settings.generation_options()
    if greedy:
        options = replace(options, do_sample=False)
    with load_progress(err_console) as progress:
        worker = ModelWorker.from_settings(settings, adapter=adapter, progress=progress)
        await worker.start()
    kb, db = await _open_facts(settings) if use_facts else (None, None)
    try:
        model = worker.model
        info = getattr(model, "info", {})
        ident = worker.identity
        console.print(
            f"[dim]{ident.model_id} + {ident.adapter_id or 'no adapter'} · "
            f"{getattr(model, 'precision', '?')} on {info.get('device', '?')}"
            f"{' (from cache)' if info.get('from_cache') else ''} · "
            f"facts: {'on' if kb else 'off'} · {HELP} lists the commands, /quit or Ctrl+D "
            "ends it[/]"
        )
        count = TokenCounter(worker.tokenizer)
        history: list[Turn] = []
        while True:
            line = await asyncio.to_thread(_read_line, console)
            if line is None:
                break
            text = line.strip()
            command = chat_command(text)
            if command == "quit":
                break
            if command == "reset":
                history.clear()
                console.print("[dim](dialogue cleared)[/]")
                continue
            if command == "help":
                console.print(CHAT_HELP, markup=False, highlight=False)
                continue
            if command is not None:
                console.print(f"[yellow]({escape(command)})[/]")
                continue
            if not text:
                continue
            add_turn(history, Turn(Role.OTHER, text))
            found = [f.text for f in await kb.retrieve(text)] if kb is not None else []
            fitted = fit_turns(history[-turns:], fmt, count, settings.max_input_tokens, found)
            if fitted is None:
                console.print("[yellow](too long for the model's input; write less)[/]")
                history.pop()
                continue
            if show_prompt:
                console.print(fitted[1], style="dim", markup=False, highlight=False)
            try:
                reply = await worker.generate(fitted[1], options)
            except GenerationError as exc:
                console.print(f"[yellow](no answer: {escape(str(exc))})[/]")
                continue
            add_turn(history, Turn(Role.OWNER, reply))
            console.print(f"[bold green]{escape(settings.role_owner)}>[/] {escape(reply)}")
    finally:
        await worker.aclose()
        if kb is not None:
            await kb.aclose()
        if db is not None:
            await db.close()

"""``doppelbot chat``: talk to the doppelganger in the terminal.

You play the other person; the model answers as you, through the running bot's own reply path
(``doppelbot.app.open_chat``: facts, the prompt within the input budget, the fact fallback,
the model worker thread). This module reads lines, handles ``/`` commands and prints.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from doppelbot.cli.common import AdapterOpt, run_async, state
from doppelbot.cli.model_cmd import load_progress, resolve_adapter_option
from doppelbot.core.errors import GenerationError, PromptTooLongError

if TYPE_CHECKING:
    from rich.console import Console

    from doppelbot.config import Settings

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
    adapter: AdapterOpt = None,
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


def _read_line(console: Console) -> str | None:
    try:
        return console.input("[bold cyan]вы>[/] ")
    except EOFError:
        return None


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
    from doppelbot.app import open_chat

    async with AsyncExitStack() as stack:
        with load_progress(err_console) as progress:  # shown while the model loads
            session = await stack.enter_async_context(
                open_chat(
                    settings,
                    adapter=adapter,
                    max_turns=turns,
                    greedy=greedy,
                    use_facts=use_facts,
                    progress=progress,
                )
            )
        info = getattr(session.worker.model, "info", {})
        ident = session.worker.identity
        console.print(
            f"[dim]{ident.model_id} + {ident.adapter_id or 'no adapter'} · "
            f"{getattr(session.worker.model, 'precision', '?')} on {info.get('device', '?')}"
            f"{' (from cache)' if info.get('from_cache') else ''} · "
            f"facts: {'on' if session.facts_on else 'off'} · {HELP} lists the commands, /quit "
            "or Ctrl+D ends it[/]"
        )
        while True:
            line = await asyncio.to_thread(_read_line, console)
            if line is None:
                break
            text = line.strip()
            command = chat_command(text)
            if command == "quit":
                break
            if command == "reset":
                session.conversation.reset()
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
            try:
                answer = await session.conversation.answer(text)
            except PromptTooLongError:
                console.print("[yellow](too long for the model's input; write less)[/]")
                continue
            except GenerationError as exc:
                console.print(f"[yellow](no answer: {escape(str(exc))})[/]")
                continue
            if show_prompt:
                console.print(answer.prompt, style="dim", markup=False, highlight=False)
            console.print(
                f"[bold green]{escape(settings.prompt.role_owner)}>[/] {escape(answer.reply)}"
            )

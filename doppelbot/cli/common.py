"""What every CLI command shares: lazily built Settings, the Rich console, async running.

Settings are built on first use rather than in the root callback, so ``doppelbot X --help``
works even while the environment holds a bad value.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn

if TYPE_CHECKING:
    from doppelbot.config import Settings
    from doppelbot.store.database import Database

T = TypeVar("T")


@dataclass
class AppState:
    env_file: Path | None = Path(".env")
    env_file_required: bool = False  # named with --env-file: a missing file is an error
    debug: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    _settings: Settings | None = None
    console: Console = field(default_factory=lambda: Console(highlight=False))
    err_console: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from rich.markup import escape

            from doppelbot.config import load_settings, unknown_settings
            from doppelbot.errors import ConfigError
            from doppelbot.logs import setup_logging

            if self.env_file_required and self.env_file is not None:
                if not self.env_file.exists():
                    raise ConfigError(f"--env-file {self.env_file}: no such file")
                if self.env_file.is_dir():
                    raise ConfigError(f"--env-file {self.env_file}: a folder, not a file")
            self._settings = load_settings(self.env_file, **self.overrides)
            setup_logging(self._settings, debug=self.debug, console=self.err_console)
            for line in unknown_settings(self.env_file):
                self.err_console.print(f"[yellow]warning:[/] {escape(line)}")
        return self._settings


def state(ctx: typer.Context) -> AppState:
    obj = ctx.find_root().obj
    if not isinstance(obj, AppState):  # invoked without the root callback (tests)
        obj = AppState()
        ctx.find_root().obj = obj
    return obj


def invoked_as() -> str:
    """How the user runs doppelbot, for the commands our messages suggest: ``doppelbot`` when
    that is on PATH, else the path they typed (``.venv/bin/doppelbot`` after scripts/run.sh)."""
    typed = sys.argv[0] if sys.argv else ""
    if Path(typed).name != "doppelbot":
        return "doppelbot"  # python -m doppelbot, tests
    on_path = shutil.which("doppelbot")
    if on_path and Path(on_path).resolve() == Path(typed).resolve():
        return "doppelbot"
    relative = os.path.relpath(typed)
    return relative if len(relative) < len(typed) and not relative.startswith("..") else typed


def with_invocation(text: str) -> str:
    """``text`` with every suggested `` `doppelbot …` `` command spelled as it can be run."""
    name = invoked_as()
    return text if name == "doppelbot" else text.replace("`doppelbot ", f"`{name} ")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@asynccontextmanager
async def open_db(settings: Settings) -> AsyncIterator[Database]:
    from doppelbot.store.database import Database

    db = await Database.open(settings.store.db_path)
    try:
        yield db
    finally:
        await db.close()


log = logging.getLogger("doppelbot.cli")


class RichBars:
    """Rich progress bars (description, bar, n of m, then ``columns``) as a context manager,
    with one-line notes printed above them; the long commands' progress displays build on it."""

    def __init__(self, console: Console, *columns: ProgressColumn, transient: bool = False) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            *columns,
            console=console,
            transient=transient,
            disable=transient and not console.is_terminal,
        )

    def __enter__(self) -> Any:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]note:[/] {text}")

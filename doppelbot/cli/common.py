"""What every CLI command shares: lazily built Settings, the Rich console, async running.

Settings are built on first use rather than in the root callback, so ``doppelbot X --help``
works even while the environment holds a bad value.

``--account NAME`` (before the command, or after it on the commands that work on one account)
picks the own account a command runs as: its session and lock come with the settings, and
``open_db`` hands out a database handle scoped to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn

from doppelbot.accounts import Need, account_scope, check_name, settings_for
from doppelbot.config import Settings, load_settings, unknown_settings
from doppelbot.core.errors import ConfigError
from doppelbot.logs import setup_logging
from doppelbot.store.database import Database

T = TypeVar("T")

#: The account this process runs as (None: the default), for the commands our messages suggest.
_account: list[str | None] = [None]


# --- options several commands share (declared once, so their help reads the same everywhere) ---
AccountOpt = Annotated[
    str | None,
    typer.Option(
        "--account",
        metavar="NAME",
        help="The own Telegram account to work on (see `doppelbot accounts`; default: the "
        "account logged in without a name).",
    ),
]
ADAPTER_HELP = (
    "LoRA adapter: a folder, a name from `doppelbot adapter list`, or `base` for none "
    "(default: the serving adapter)."
)
AdapterOpt = Annotated[str | None, typer.Option("--adapter", help=ADAPTER_HELP)]
#: A dataset whose validation split a command reads.
ValidationDatasetOpt = Annotated[
    str | None,
    typer.Option("--dataset", help="Dataset name or path (default: latest); its validation split."),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")]
BaseModelOpt = Annotated[
    str | None, typer.Option("--model", help="Base model (hub id or local path).")
]


@dataclass
class AppState:
    env_file: Path | None = Path(".env")
    env_file_required: bool = False  # named with --env-file: a missing file is an error
    debug: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    #: ``--account`` (None: the default account).
    account: str | None = None
    _settings: Settings | None = None
    _scoped: tuple[str | None, Settings] | None = None
    console: Console = field(default_factory=lambda: Console(highlight=False))
    err_console: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))

    def use_account(self, name: str | None) -> str | None:
        """The account this command runs as: its own ``--account``, else the global one."""

        if name is not None and self.account is not None and name != self.account:
            raise typer.BadParameter(
                f"--account given twice ({self.account!r} and {name!r}); give it once"
            )
        chosen = name if name is not None else self.account
        if chosen is not None:
            check_name(chosen)
        self.account = chosen
        _account[0] = chosen
        return chosen

    @property
    def settings(self) -> Settings:
        """The settings, with the session file and lock of the account this command runs as."""

        base = self.base_settings
        if self._scoped is None or self._scoped[0] != self.account:
            self._scoped = (self.account, settings_for(base, self.account))
        return self._scoped[1]

    @property
    def base_settings(self) -> Settings:
        if self._settings is None:
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
    """``text`` with every suggested `` `doppelbot …` `` command spelled as it can be run: by
    the path the user typed, and for the account this process runs as (unless the suggestion
    names an account itself)."""
    name = invoked_as()
    account = _account[0]

    def spelled(match: re.Match[str]) -> str:
        command = match.group(1)
        prefix = f"`{name} "
        if account is not None and "--account" not in command:
            prefix += f"--account {account} "
        return prefix + command + "`"

    return re.sub(r"`doppelbot ([^`]*)`", spelled, text)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@asynccontextmanager
async def open_db(
    settings: Settings, account: str | None = None, need: Need = "known"
) -> AsyncIterator[Database]:
    """The database, scoped to ``account`` (None: the default account; ``need``: whether a
    missing account is an error or is added, see ``doppelbot.accounts.Need``)."""

    db = await Database.open(settings.store.db_path)
    try:
        async with account_scope(db, settings, account, need) as handle:
            yield handle
    finally:
        await db.close()


log = logging.getLogger("doppelbot.cli")


def bars(console: Console, *columns: ProgressColumn, transient: bool = False) -> Progress:
    """Rich progress bars: description, bar, n of m, then ``columns``. A transient display
    (cleared at the end) is drawn only on a terminal."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *columns,
        console=console,
        transient=transient,
        disable=transient and not console.is_terminal,
    )


class RichBars:
    """``bars`` as a context manager, with one-line notes printed above them; the long
    commands' progress displays build on it."""

    def __init__(self, console: Console, *columns: ProgressColumn, transient: bool = False) -> None:
        self.console = console
        self.progress = bars(console, *columns, transient=transient)

    def __enter__(self) -> Any:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]note:[/] {text}")

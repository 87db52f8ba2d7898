"""Logging set-up: Rich on stderr, and the privacy rule for message texts.

Message texts are the owner's private data: code logs them only through ``redact()``, which
returns a placeholder unless the level is DEBUG *and* ``log_message_texts`` is on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from doppelbot.config import Settings

_show_texts = False


def setup_logging(
    settings: Settings, *, debug: bool = False, console: Console | None = None
) -> None:
    from rich.logging import RichHandler

    global _show_texts
    level = logging.DEBUG if debug else getattr(logging, settings.log_level)
    _show_texts = bool(settings.log_message_texts and level <= logging.DEBUG)
    handler = RichHandler(console=console, show_path=debug, rich_tracebacks=debug, markup=False)
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, RichHandler):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # Telethon logs request contents at DEBUG; keep it at WARNING unless debugging it explicitly.
    logging.getLogger("telethon").setLevel(logging.WARNING)
    # aiosqlite logs every statement with its parameters (message texts) at DEBUG.
    logging.getLogger("aiosqlite").setLevel(logging.DEBUG if _show_texts else logging.INFO)


def redact(text: str | None) -> str:
    """A message text as it may appear in logs."""
    if text is None:
        return "<none>"
    if _show_texts:
        return repr(text)
    return f"<{len(text)} chars>"

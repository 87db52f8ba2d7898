"""Logging set-up: Rich on stderr, quiet libraries, and the privacy rule for message texts.

Message texts are the owner's private data: code logs them only through ``redact()``, which
returns a placeholder unless the level is DEBUG *and* ``log_message_texts`` is on.

Loading a model makes transformers, peft, huggingface_hub and torch print warnings about things
we already handle (FRED-T5's untied head, deprecations) and per-tensor progress bars; without
``--debug`` they are silenced here, before those libraries are imported (their verbosity comes
from the environment at import). Some of them also attach their own stderr handler *and*
propagate to the root logger, which printed every message twice: the root handler skips what a
library's own handler has already printed.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import TYPE_CHECKING

from rich.logging import RichHandler

from doppelbot.config import Settings, set_library_environment
from doppelbot.model.quiet import silence_loaded_libraries

if TYPE_CHECKING:
    from rich.console import Console


_show_texts = False

THIRD_PARTY_LOGGERS = (
    "transformers",
    "huggingface_hub",
    "sentence_transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "torch",
    "httpx",
    "httpx2",
    "httpcore",
    "urllib3",
    "filelock",
    "matplotlib",
    "PIL",
)

# Environment read by the model libraries when they are imported (an explicit value wins).
_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "BITSANDBYTES_NOWELCOME": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class _NotPrintedYet(logging.Filter):
    """Drops records that a handler below the root (a library's own) has already printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        root = logging.getLogger()
        while logger is not None and logger is not root:
            if logger.handlers:
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        return True


def quiet_libraries(*, debug: bool = False) -> None:
    """Third-party warnings, INFO logs and progress bars off (unless ``debug``)."""
    if debug:
        return

    set_library_environment(_QUIET_ENV)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if {"transformers", "huggingface_hub"} & set(sys.modules):
        # Already imported (a long-lived process, tests): the environment came too late.

        silence_loaded_libraries()
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"doppelbot(\.|$)")


def setup_logging(
    settings: Settings, *, debug: bool = False, console: Console | None = None
) -> None:
    global _show_texts
    level = logging.DEBUG if debug else getattr(logging, settings.log.level)
    _show_texts = bool(settings.log.message_texts and level <= logging.DEBUG)
    quiet_libraries(debug=debug)
    handler = RichHandler(console=console, show_path=debug, rich_tracebacks=debug, markup=False)
    handler.addFilter(_NotPrintedYet())
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, RichHandler):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # Telethon logs request contents at DEBUG (never: private data), and at WARNING what our
    # own errors then say in one line ("Server closed the connection"): WARNING only --debug.
    logging.getLogger("telethon").setLevel(logging.WARNING if debug else logging.ERROR)
    # aiosqlite logs every statement with its parameters (message texts) at DEBUG.
    logging.getLogger("aiosqlite").setLevel(logging.DEBUG if _show_texts else logging.INFO)


def redact(text: str | None) -> str:
    """A message text as it may appear in logs."""
    if text is None:
        return "<none>"
    if _show_texts:
        return repr(text)
    return f"<{len(text)} chars>"

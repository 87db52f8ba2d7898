"""Telethon's exceptions → the ``DoppelbotError`` family.

The core and the CLI only ever see our error types; this is the one place that knows
Telethon's. ``translate`` maps one exception, ``telegram_errors()`` wraps a block.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from telethon import errors as tg_errors

from doppelbot.errors import (
    DoppelbotError,
    FloodWaitTooLongError,
    NotLoggedInError,
    TakeoutDelayError,
    TelegramError,
)

TAKEOUT_HELP = (
    "Telegram wants you to confirm the data export first: open Telegram on a device where "
    "you are already logged in (an official app), find the service message from Telegram "
    "about a data export request and tap 'Allow'. Then run the export again."
)


def _what(exc: tg_errors.RPCError) -> str:
    request = getattr(exc, "request", None)
    return type(request).__name__.removesuffix("Request") if request is not None else "request"


def translate(exc: BaseException, *, flood_bound: int | None = None) -> DoppelbotError:
    """The ``DoppelbotError`` for a Telethon (or network) exception."""
    if isinstance(exc, DoppelbotError):
        return exc
    if isinstance(exc, tg_errors.TakeoutInitDelayError):
        hours = exc.seconds / 3600
        return TakeoutDelayError(
            f"{TAKEOUT_HELP} (Otherwise Telegram allows it by itself in {hours:.1f} h.)"
        )
    if isinstance(exc, tg_errors.FloodWaitError):
        return FloodWaitTooLongError(exc.seconds, flood_bound or 0, _what(exc))
    if isinstance(
        exc,
        tg_errors.AuthKeyUnregisteredError
        | tg_errors.SessionRevokedError
        | tg_errors.SessionExpiredError
        | tg_errors.UserDeactivatedError
        | tg_errors.AuthKeyDuplicatedError,
    ):
        return NotLoggedInError(
            f"the Telegram session is not valid any more ({type(exc).__name__}); "
            "run `doppelbot login` again"
        )
    if isinstance(exc, tg_errors.UnauthorizedError):
        return NotLoggedInError("not logged in to Telegram: run `doppelbot login` first")
    if isinstance(exc, tg_errors.PhoneNumberInvalidError):
        return TelegramError("Telegram does not accept this phone number (use +CC… format)")
    if isinstance(exc, tg_errors.PhoneCodeInvalidError | tg_errors.PhoneCodeExpiredError):
        return TelegramError("the login code is wrong or expired; run `doppelbot login` again")
    if isinstance(exc, tg_errors.PasswordHashInvalidError):
        return TelegramError("the 2FA password is wrong")
    if isinstance(exc, tg_errors.ApiIdInvalidError):
        return TelegramError(
            "Telegram rejected DOPPELBOT_API_ID / DOPPELBOT_API_HASH (check my.telegram.org)"
        )
    if isinstance(exc, tg_errors.RPCError):
        return TelegramError(f"Telegram refused {_what(exc)}: {exc.message} (code {exc.code})")
    if isinstance(exc, ConnectionError | OSError | TimeoutError):
        return TelegramError(f"cannot reach Telegram: {exc or type(exc).__name__}")
    if isinstance(exc, sqlite3.Error):
        # Telethon keeps a file session in SQLite; only another program can lock it now.
        return TelegramError(
            f"the Telegram session file cannot be used ({exc}); is another program using "
            "the same session file?"
        )
    return TelegramError(f"Telegram client failed: {type(exc).__name__}: {exc}")


@contextmanager
def telegram_errors(*, flood_bound: int | None = None) -> Iterator[None]:
    """Re-raise Telethon/network errors from the block as ``DoppelbotError``."""
    try:
        yield
    except DoppelbotError:
        raise
    except (tg_errors.RPCError, ConnectionError, OSError, TimeoutError) as exc:
        raise translate(exc, flood_bound=flood_bound) from exc


@contextmanager
def session_errors() -> Iterator[None]:
    """Like ``telegram_errors``, and Telethon's own session database failing too (only
    around calls that touch nothing but Telegram and the session)."""
    try:
        with telegram_errors():
            yield
    except sqlite3.Error as exc:
        raise translate(exc) from exc

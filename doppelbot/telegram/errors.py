"""Telethon's exceptions → the ``DoppelbotError`` family.

The core and the CLI only ever see our error types; this is the one place that knows
Telethon's. ``translate`` maps one exception, ``telegram_errors()`` wraps a block.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from telethon import errors as tg_errors
from telethon.errors import common as tg_common
from telethon.errors import rpcerrorlist

from doppelbot.core.errors import (
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


# What a connection raises when the other end does not speak MTProto (a proxy, a captive
# portal, a filter answering in plain HTTP): the stream ends early or holds garbage.
PROTOCOL_ERRORS: tuple[type[BaseException], ...] = (
    EOFError,  # asyncio.IncompleteReadError
    tg_common.InvalidBufferError,
    tg_common.InvalidChecksumError,
    tg_common.SecurityError,
    tg_common.TypeNotFoundError,
)

# Everything ``translate`` turns into one clear line.
TRANSLATED: tuple[type[BaseException], ...] = (
    tg_errors.RPCError,
    ConnectionError,
    OSError,
    TimeoutError,
    *PROTOCOL_ERRORS,
)

NOT_TELEGRAM_HELP = (
    "the server did not answer in Telegram's protocol ({detail}); something on this network "
    "(a proxy, captive portal or firewall) is in the way — try another network or a VPN"
)


def _what(exc: tg_errors.RPCError) -> str:
    """The request Telegram refused, without Telethon's wrappers (``InvokeWithoutUpdates``,
    ``InvokeWithTakeout``, …) around it."""
    request = getattr(exc, "request", None)
    while (
        request is not None
        and hasattr(request, "query")
        and type(request).__name__.startswith(("Invoke", "InitConnection"))
    ):
        request = request.query
    return type(request).__name__.removesuffix("Request") if request is not None else "request"


@cache
def _names() -> dict[type, str]:
    names: dict[type, str] = {cls: name for name, cls in rpcerrorlist.rpc_errors_dict.items()}
    for pattern, cls in rpcerrorlist.rpc_errors_re:
        names.setdefault(cls, pattern.replace("(\\d+)", "N"))
    return names


def rpc_error_name(exc: tg_errors.RPCError) -> str:
    """Telegram's own error name (``CHANNEL_PRIVATE``), not the HTTP-like class of the error
    (``BAD_REQUEST``) that Telethon keeps in ``message`` for the errors it knows by name."""
    return _names().get(type(exc)) or str(exc.message or type(exc).__name__)


def _description(exc: tg_errors.RPCError) -> str:
    """Telethon's sentence for a known error, without its "(caused by …)" tail."""
    text = str(exc).split(" (caused by ", 1)[0].strip()
    return "" if text.startswith("RPCError") else text


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
        about = _description(exc)
        return TelegramError(
            f"Telegram refused {_what(exc)}: {rpc_error_name(exc)} (code {exc.code})"
            + (f" — {about}" if about else "")
        )
    if isinstance(exc, PROTOCOL_ERRORS):
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return TelegramError(NOT_TELEGRAM_HELP.format(detail=detail))
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
    except TRANSLATED as exc:
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

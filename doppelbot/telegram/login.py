"""Interactive login with Telethon's own sign-in calls (phone → code → 2FA password).

We drive ``send_code_request``/``sign_in`` ourselves instead of ``client.start()`` because
``start()`` prints to stdout, and ``--print-session-string`` must put nothing but the string
there. Prompts are callables (sync or async) so the CLI asks on the terminal and tests answer
programmatically. Nothing secret is ever logged.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from telethon import TelegramClient
from telethon import errors as tg_errors

from doppelbot.config import Settings
from doppelbot.core.domain import Account
from doppelbot.core.errors import TelegramError
from doppelbot.instance import InstanceLock
from doppelbot.telegram import client as client_mod
from doppelbot.telegram.errors import TRANSLATED, session_errors, telegram_errors, translate
from doppelbot.telegram.mapping import map_account

Prompt = Callable[[], str | Awaitable[str]]


@dataclass(frozen=True)
class LoginPrompts:
    phone: Prompt
    code: Prompt
    password: Prompt
    notice: Callable[[str], Any] = lambda text: None


#: Told who logged in (and whether the session was already logged in) while still connected;
#: raising refuses the login (a fresh one is logged out again, leaving no session behind).
AccountCheck = Callable[[Account, bool], Awaitable[None]]


@dataclass(frozen=True)
class LoginResult:
    account: Account
    already: bool
    session_string: str | None = None  # only with print_session_string


async def _ask(prompt: Prompt) -> str:
    value = prompt()
    if inspect.isawaitable(value):
        value = await value
    return str(value).strip()


async def sign_in(client: TelegramClient, prompts: LoginPrompts, *, attempts: int = 3) -> Any:
    """Log ``client`` in (already connected); returns the Telethon ``User``."""
    phone = await _ask(prompts.phone)
    if not phone:
        raise TelegramError("a phone number is needed to log in (or set DOPPELBOT_PHONE)")
    with telegram_errors():
        await client.send_code_request(phone)
    needs_password = False
    for attempt in range(attempts):
        code = await _ask(prompts.code)
        try:
            return await client.sign_in(phone, code=code)
        except tg_errors.SessionPasswordNeededError:
            needs_password = True
            break
        except (tg_errors.PhoneCodeInvalidError, tg_errors.PhoneCodeEmptyError) as exc:
            if attempt == attempts - 1:
                raise translate(exc) from exc
            prompts.notice("That code is not right; try again.")
        except TRANSLATED as exc:
            raise translate(exc) from exc
    if not needs_password:
        raise TelegramError("login failed")
    for attempt in range(attempts):
        password = await _ask(prompts.password)
        try:
            return await client.sign_in(password=password)
        except tg_errors.PasswordHashInvalidError as exc:
            if attempt == attempts - 1:
                raise translate(exc) from exc
            prompts.notice("That password is not right; try again.")
        except TRANSLATED as exc:
            raise translate(exc) from exc
    raise TelegramError("login failed")


async def login_interactive(
    settings: Settings,
    prompts: LoginPrompts,
    *,
    print_session_string: bool = False,
    client: TelegramClient | None = None,
    check: AccountCheck | None = None,
) -> LoginResult:
    """Log in (if not already) and return who we are; the session is saved by Telethon. The
    session's instance lock is held throughout (a running bot must not share the login).

    A login that fails before it succeeds (wrong code, no network, a proxy answering instead
    of Telegram, Ctrl-C) removes the session file it created: a half-made session would make
    the next command try to use it instead of saying "run `doppelbot login`".

    ``check`` sees the account before anything is kept: when it refuses (one Telegram account
    already stored as another doppelbot account), a login made just now is logged out again, so
    no second session for that account is left behind.
    """
    with InstanceLock(settings.lock_path):
        fresh_file: Path | None = None
        if client is None and not print_session_string and settings.telegram.session_string is None:
            fresh_file = None if settings.session_path.exists() else settings.session_path
        client = client or client_mod.create_client(
            settings, receive_updates=False, fresh_string_session=print_session_string
        )
        signed_in = False
        try:
            with session_errors():
                await client.connect()
            with session_errors():
                me = await client.get_me()
            already = me is not None
            if me is None:
                me = await sign_in(client, prompts)
            if check is not None:
                try:
                    await check(map_account(me), already)
                except BaseException:
                    if not already:
                        with contextlib.suppress(Exception):
                            await client.log_out()
                    raise
            signed_in = True
            session_string = None
            if print_session_string or (
                settings.telegram.session_string is not None and not already
            ):
                session_string = client.session.save()
            return LoginResult(map_account(me), already, session_string)
        finally:
            await client.disconnect()
            if fresh_file is not None and not signed_in:
                if client.session is not None:
                    client.session.close()
                for leftover in (fresh_file, fresh_file.with_name(fresh_file.name + "-journal")):
                    leftover.unlink(missing_ok=True)

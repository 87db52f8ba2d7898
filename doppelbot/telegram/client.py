"""Building and connecting the Telethon client from ``Settings``.

The session is the owner's Telegram login: whoever holds it reads every chat. It lives either
in a file under the data directory, created with mode 0600 *before* Telethon opens it (so it
is never world-readable, not even for a moment), or in ``DOPPELBOT_SESSION_STRING`` for
containers. Neither is ever logged.

Only one process may use a session at a time (two clients on one auth key can get it revoked,
two bots on one database answer twice): ``connected`` holds the data directory's instance
lock (``doppelbot.instance``) for as long as the client is open.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any

from telethon import TelegramClient
from telethon.sessions import SQLiteSession, StringSession

from doppelbot import __version__
from doppelbot.config import Settings
from doppelbot.core.domain import Account
from doppelbot.core.errors import ConfigError, DoppelbotError, NotLoggedInError, StoreError
from doppelbot.files import private_dir, private_file
from doppelbot.instance import InstanceLock
from doppelbot.telegram.errors import session_errors, telegram_errors
from doppelbot.telegram.mapping import map_account

SESSION_MODE = 0o600


def secure_session_file(path: Path) -> Path:
    """Create (or tighten) the session file with mode 0600; its folder 0700."""
    try:
        private_dir(path.parent)
        private_file(path)
    except OSError as exc:
        raise StoreError(
            f"cannot create the session file {path}: {exc.strerror or exc} "
            "(DOPPELBOT_DATA_DIR or --data-dir must be a folder doppelbot can write)"
        ) from None
    return path


def _credentials(settings: Settings) -> tuple[int, str]:
    if settings.telegram.api_id is None or settings.telegram.api_hash is None:
        raise ConfigError(
            "DOPPELBOT_API_ID and DOPPELBOT_API_HASH are required to talk to Telegram "
            "(create them at https://my.telegram.org → API development tools)"
        )
    return settings.telegram.api_id, settings.telegram.api_hash.get_secret_value()


def make_session(settings: Settings, *, fresh_string: bool = False) -> Any:
    """The Telethon session: a StringSession (settings or a fresh one) or the 0600 file."""
    if fresh_string:
        return StringSession()
    if settings.telegram.session_string is not None:
        try:
            return StringSession(settings.telegram.session_string.get_secret_value().strip())
        except ValueError:
            raise ConfigError(
                "DOPPELBOT_SESSION_STRING: not a valid Telethon session string"
            ) from None
    path = secure_session_file(settings.session_path)
    return SQLiteSession(str(path))


def create_client(
    settings: Settings,
    *,
    receive_updates: bool = True,
    fresh_string_session: bool = False,
    catch_up: bool = False,
) -> TelegramClient:
    """A configured, not yet connected client.

    ``flood_sleep_threshold=0``: Telethon must not sleep on FloodWait by itself; our callers
    wait with a visible countdown up to ``flood_wait_max_s`` and stop cleanly beyond it.
    ``catch_up``: replay the updates missed since the session last saved its update state
    (the running bot; a string session keeps no such state).
    """
    api_id, api_hash = _credentials(settings)
    session = make_session(settings, fresh_string=fresh_string_session)
    return TelegramClient(
        session,
        api_id,
        api_hash,
        flood_sleep_threshold=0,
        receive_updates=receive_updates,
        catch_up=catch_up,
        device_model="doppelbot",
        app_version=__version__,
        base_logger="telethon",
    )


@asynccontextmanager
async def connected(
    settings: Settings,
    *,
    receive_updates: bool = True,
    client: TelegramClient | None = None,
    make_client: Callable[[], TelegramClient] | None = None,
    before_connect: Callable[[TelegramClient], Awaitable[None] | None] | None = None,
    locked: bool = False,
) -> AsyncIterator[TelegramClient]:
    """A connected, logged-in client, with this session's instance lock held until it is
    closed; ``NotLoggedInError`` when the session is not authorised, ``InstanceLockedError``
    when another process uses the session. ``make_client`` builds the client once the lock is
    held; ``before_connect`` runs on it before connecting (to install event handlers).
    ``locked``: the caller already holds the lock."""
    with nullcontext() if locked else InstanceLock(settings.lock_path):
        if client is None:
            client = make_client() if make_client else None
        client = client or create_client(settings, receive_updates=receive_updates)
        if before_connect is not None:
            result = before_connect(client)
            if result is not None:
                await result
        with session_errors():
            await client.connect()
        try:
            with session_errors():
                authorised = await client.is_user_authorized()
            if not authorised:
                raise NotLoggedInError("not logged in to Telegram: run `doppelbot login` first")
            yield client
        finally:
            await client.disconnect()


async def logged_in_account(client: TelegramClient) -> Account:
    """The account the connected client is logged in as."""
    with telegram_errors():
        me = await client.get_me()
    if me is None:
        raise DoppelbotError("Telegram did not return the logged-in account")
    return map_account(me)

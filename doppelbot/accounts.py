"""Several own Telegram accounts, one doppelganger: names, sessions, locks, and finding one.

The original project learnt from two of its author's accounts. Each own account has a name
(``--account NAME``; ``default`` when none is given), its own Telegram session and its own
instance lock, and its own rows in the one shared database (a handle scoped to it:
``Database.for_account``). The default account keeps the session file and lock it always had
(``settings.session_path``, ``settings.lock_path``), so nothing changes for anyone with one
account; a named account lives in ``<data dir>/accounts/NAME.session`` and ``NAME.lock`` (the
folder 0700, the files 0600). One process per account: two accounts' bots run side by side on
one data directory, each holding its own lock. ``DOPPELBOT_SESSION_STRING`` is the session of
whichever account a process runs as.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from doppelbot.config import Settings
from doppelbot.core.domain import Account
from doppelbot.core.errors import AccountError
from doppelbot.instance import LockHolder, holder_of
from doppelbot.store import accounts as store
from doppelbot.store.accounts import DEFAULT_NAME, OwnAccount
from doppelbot.store.database import Database

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
#: Where named accounts keep their session and lock, under the data directory.
ACCOUNTS_DIR = "accounts"

#: How a command finds its account: ``known`` — it must be in the database; ``session`` — or
#: have a session to log in with (export, run: the account is added on first use); ``new`` —
#: added when missing (login, Desktop import).
Need = Literal["known", "session", "new"]

__all__ = [
    "DEFAULT_NAME",
    "AccountInfo",
    "account_scope",
    "check_name",
    "is_default",
    "list_accounts",
    "lock_path",
    "login_hint",
    "register_login",
    "session_path",
    "settings_for",
]


def check_name(name: str) -> str:
    """``name`` when it is a valid account name, else ``AccountError``."""
    if not NAME_RE.fullmatch(name):
        raise AccountError(
            f"{name!r} is not an account name: use 1-32 of a-z, 0-9, '_' and '-', starting "
            "with a letter or digit"
        )
    return name


def is_default(name: str | None) -> bool:
    return name is None or name == DEFAULT_NAME


def session_path(settings: Settings, name: str | None) -> Path:
    return settings_for(settings, name).session_path


def lock_path(settings: Settings, name: str | None) -> Path:
    return settings_for(settings, name).lock_path


def settings_for(settings: Settings, name: str | None) -> Settings:
    """``settings`` as seen by a process running as account ``name``: its session file and
    instance lock (everything else is shared)."""
    if is_default(name):
        return settings
    check_name(str(name))
    telegram = dataclasses.replace(settings.telegram, session_name=f"{ACCOUNTS_DIR}/{name}")
    return settings.model_copy(update={"telegram": telegram})


def login_hint(name: str | None) -> str:
    """The login command for account ``name``, as our messages suggest it."""
    return "`doppelbot login`" if is_default(name) else f"`doppelbot login --account {name}`"


def _has_session(settings: Settings, name: str | None) -> bool:
    return settings.telegram.session_string is not None or session_path(settings, name).exists()


@asynccontextmanager
async def account_scope(
    db: Database, settings: Settings, name: str | None, need: Need
) -> AsyncIterator[Database]:
    """The handle of account ``name`` (None: the default) on ``db`` for one piece of work;
    ``AccountError`` naming the login command when it is not known (see ``Need``). An account
    it adds is removed again when the work fails before the account became anyone (a refused
    login, a refused import), so no empty account is left behind."""
    handle, added = await _find(db, settings, name, need)
    try:
        yield handle
    except BaseException:
        if added:
            with contextlib.suppress(Exception):
                await store.remove_if_unused(db, handle.account_id)
        raise


async def _find(
    db: Database, settings: Settings, name: str | None, need: Need
) -> tuple[Database, bool]:
    """The account's handle, and whether the account was added just now."""
    if is_default(name):
        return db.for_account(store.DEFAULT_ACCOUNT_ID), False
    name = check_name(str(name))
    found = await store.by_name(db, name)
    if found is not None:
        return db.for_account(found.account_id), False
    if need == "new" or (need == "session" and _has_session(settings, name)):
        return db.for_account((await store.create(db, name)).account_id), True
    known = ", ".join(a.name for a in await store.list_all(db))
    raise AccountError(
        f"no account named {name!r} (known: {known}); add it with {login_hint(name)}"
    )


async def register_login(db: Database, name: str | None, account: Account) -> OwnAccount:
    """Record that account ``name`` is logged in as Telegram user ``account``. Refused
    before anything is written when that user is already another own account."""
    other = await store.by_user(db, account.user_id)
    wanted = DEFAULT_NAME if is_default(name) else check_name(str(name))
    if other is not None and other.name != wanted:
        raise store.user_taken(other)
    own = await store.by_name(db, wanted) or await store.create(db, wanted)
    handle = db.for_account(own.account_id)
    await store.claim(handle, account)
    return await store.current(handle)


@dataclass(frozen=True, slots=True)
class AccountInfo:
    """One line of ``doppelbot accounts``."""

    account: OwnAccount
    messages: int
    chats: int
    last_export_at: int | None
    session: Path
    has_session: bool
    running: LockHolder | None


async def list_accounts(db: Database, settings: Settings) -> list[AccountInfo]:
    """Every own account with its stored history, session file and running process."""
    counts = await store.counts(db)
    out = []
    for own in await store.list_all(db):
        c = counts.get(own.account_id, store.AccountCounts(0, 0, None))
        path = session_path(settings, own.name)
        out.append(
            AccountInfo(
                own,
                c.messages,
                c.chats,
                c.last_export_at,
                path,
                path.exists(),
                holder_of(lock_path(settings, own.name)),
            )
        )
    return out

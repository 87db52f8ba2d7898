"""The owner's own Telegram accounts in the store (the ``accounts`` table).

Each account is a name (``--account NAME``; ``default`` is row 1, which every database has) and,
once known, the Telegram user it is. One Telegram user is one account: the same user stored
under a second name would split one history in two, so ``claim`` refuses it. The rows of each
account's history and bot carry its ``account_id``; a ``Database`` handle is scoped to one of
them (``Database.for_account``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from doppelbot.core.domain import Account
from doppelbot.core.errors import AccountError
from doppelbot.store.database import DEFAULT_ACCOUNT_ID, Database, now
from doppelbot.store.table import Table, from_row

DEFAULT_NAME = "default"

ACCOUNTS = Table(
    "accounts",
    (
        "account_id",
        "name",
        "user_id",
        "first_name",
        "last_name",
        "username",
        "phone",
        "created_at",
        "updated_at",
    ),
    key=("account_id",),
)


@dataclass(frozen=True, slots=True)
class OwnAccount:
    """One row of ``accounts``: the name, and the Telegram user once known (only ever read
    from the store, so every column is there)."""

    account_id: int
    name: str
    user_id: int | None
    first_name: str | None
    last_name: str | None
    username: str | None
    phone: str | None
    created_at: int

    @property
    def user(self) -> Account | None:
        if self.user_id is None:
            return None
        return Account(self.user_id, self.first_name, self.last_name, self.username, self.phone)

    def describe_user(self) -> str:
        """``@username (id)``, ``First (id)`` or ``-`` (no login yet)."""
        if self.user_id is None:
            return "-"
        who = f"@{self.username}" if self.username else (self.first_name or "")
        return f"{who} ({self.user_id})" if who else str(self.user_id)


@dataclass(frozen=True, slots=True)
class AccountCounts:
    """What ``doppelbot accounts`` shows of one account's stored history."""

    messages: int
    chats: int
    last_export_at: int | None


def _own(r: Any) -> OwnAccount:
    return from_row(OwnAccount, r)


async def by_name(db: Database, name: str) -> OwnAccount | None:
    return await ACCOUNTS.rows(db, "name = ?", (name,)).one(_own)


async def by_user(db: Database, user_id: int) -> OwnAccount | None:
    return await ACCOUNTS.rows(db, "user_id = ?", (user_id,)).one(_own)


async def create(db: Database, name: str) -> OwnAccount:
    """The account named ``name``, added when it is new (idempotent)."""
    ts = now()
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO accounts (name, created_at, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO NOTHING",
            (name, ts, ts),
        )
    found = await by_name(db, name)
    assert found is not None
    return found


#: The tables that hold one own account's rows (``account_id`` first in their key).
PER_ACCOUNT_TABLES = (
    "messages",
    "peers",
    "export_cursors",
    "replies",
    "reactions",
    "chat_settings",
    "bot_state",
    "transcripts",
    "ssa_items",
)


async def remove_if_unused(db: Database, account_id: int) -> bool:
    """Remove a named account that was added but never became anyone: no Telegram user and
    no row anywhere (a login or import refused right after adding it). True when removed."""
    if account_id == DEFAULT_ACCOUNT_ID:
        return False
    unused = " AND ".join(
        f"NOT EXISTS (SELECT 1 FROM {t} WHERE account_id = ?1)" for t in PER_ACCOUNT_TABLES
    )
    async with db.transaction() as conn:
        cursor = await conn.execute(
            f"DELETE FROM accounts WHERE account_id = ?1 AND user_id IS NULL AND {unused}",
            (account_id,),
        )
        return cursor.rowcount == 1


async def list_all(db: Database) -> list[OwnAccount]:
    return await ACCOUNTS.rows(db, tail="ORDER BY account_id").all(_own)


async def current(db: Database) -> OwnAccount:
    """The account the handle is for."""
    found = await ACCOUNTS.rows(db, "account_id = ?", (db.account_id,)).one(_own)
    if found is None:
        raise AccountError(f"account #{db.account_id} is not in the database")
    return found


async def identity(db: Database) -> Account | None:
    """The Telegram user of the handle's account (None: not known yet)."""
    return (await current(db)).user


def user_taken(other: OwnAccount) -> AccountError:
    """The refusal to make Telegram user ``other.user`` a second own account."""
    return AccountError(
        f"Telegram user {other.describe_user()} is already the account {other.name!r}; "
        f"use `--account {other.name}` for it (one Telegram account is one doppelbot account)"
    )


async def claim(db: Database, account: Account) -> None:
    """Record that the handle's account is Telegram user ``account`` (names refreshed).

    Refused (``AccountError``) when this user is already another own account, or when this
    account is already another Telegram user: either would mix two histories."""
    mine = await current(db)
    other = await by_user(db, account.user_id)
    if other is not None and other.account_id != mine.account_id:
        raise user_taken(other)
    if mine.user_id is not None and mine.user_id != account.user_id:
        raise AccountError(
            f"the account {mine.name!r} is Telegram user {mine.describe_user()}, not user "
            f"{account.user_id}; another Telegram account gets its own name: "
            "`doppelbot login --account NAME`"
        )
    await db.execute(
        "UPDATE accounts SET user_id = ?, first_name = ?, last_name = ?, username = ?,"
        " phone = coalesce(?, phone), updated_at = ? WHERE account_id = ?",
        (
            account.user_id,
            account.first_name,
            account.last_name,
            account.username,
            account.phone,
            now(),
            mine.account_id,
        ),
    )


async def own_user_ids(db: Database) -> dict[int, str]:
    """Every own account's Telegram user id → its name (for the rules about own chats)."""
    rows = await db.fetchall(
        "SELECT user_id, name FROM accounts WHERE user_id IS NOT NULL ORDER BY account_id"
    )
    return {int(r["user_id"]): str(r["name"]) for r in rows}


async def counts(db: Database) -> dict[int, AccountCounts]:
    """Messages, chats and the last export run of every account (by account id)."""
    rows = await db.fetchall(
        "SELECT a.account_id,"
        " (SELECT count(*) FROM messages m WHERE m.account_id = a.account_id) AS messages,"
        " (SELECT count(DISTINCT m.chat_id) FROM messages m"
        "  WHERE m.account_id = a.account_id) AS chats,"
        " (SELECT max(c.last_run_at) FROM export_cursors c"
        "  WHERE c.account_id = a.account_id) AS last_export_at"
        " FROM accounts a ORDER BY a.account_id"
    )
    return {
        int(r["account_id"]): AccountCounts(
            int(r["messages"]), int(r["chats"]), r["last_export_at"]
        )
        for r in rows
    }


__all__ = [
    "ACCOUNTS",
    "DEFAULT_ACCOUNT_ID",
    "DEFAULT_NAME",
    "AccountCounts",
    "OwnAccount",
    "by_name",
    "by_user",
    "claim",
    "counts",
    "create",
    "current",
    "identity",
    "list_all",
    "own_user_ids",
    "remove_if_unused",
]

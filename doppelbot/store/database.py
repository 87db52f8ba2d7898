"""The SQLite store: one aiosqlite connection, WAL, foreign keys, numbered migrations.

SQLite is the one source of truth. The connection runs in autocommit mode and every write that
matters goes through ``transaction()``, which serialises writers on an ``asyncio.Lock`` — the
connection is shared by all tasks of the event loop, and without the lock two tasks' statements
would interleave inside one SQLite transaction.

Another process (``doppelbot status --pause``, ``dataset``, a second reader) may hold SQLite's
write lock for a moment: a write transaction waits for it with a short busy timeout and retries
with backoff (``busy_retry_s`` in all), so a busy database delays a write instead of losing it.

Migrations are the ``NNNN_name.sql`` files of ``migrations/``; each is applied in one transaction
together with its row in ``schema_migrations``, so a failing migration leaves the database at
the previous level. A migration whose first line is ``-- foreign_keys: off`` rebuilds tables:
it runs with foreign-key enforcement off (so dropping the old table cascades nothing) and is
committed only when ``PRAGMA foreign_key_check`` finds no broken reference.

Several own Telegram accounts share one database. The rows of one account's history and bot
(messages, peers, replies, bot state…) carry its ``account_id``; a ``Database`` handle belongs to
one account (``for_account`` makes another handle on the same connection), and every store
function reads and writes that account's rows only. The plain handle is the default account.

The database is the owner's private history: its folder is created 0700 and its files 0600.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from doppelbot.core.errors import MigrationError, StoreError
from doppelbot.files import private_dir, private_file

_MIGRATION_RE = re.compile(r"^(\d{4})_([A-Za-z0-9_]+)\.sql$")
_FK_OFF_MARK = "-- foreign_keys: off"

log = logging.getLogger("doppelbot.store")

#: The account that existing data and the plain handle belong to (``accounts`` row 1).
DEFAULT_ACCOUNT_ID = 1

#: SQLite waits this long for another connection's write lock before reporting busy; the
#: transaction then retries with backoff (short waits keep reads on this connection flowing).
BUSY_TIMEOUT_MS = 2000
#: How long a write keeps retrying a busy database before it gives up with ``StoreError``.
BUSY_RETRY_S = 120.0


def is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: another connection holds the lock; worth retrying."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def default_migrations_dir() -> Path:
    """The packaged copy (wheel installs) or the repository's ``migrations/`` (editable)."""
    packaged = Path(__file__).resolve().parent.parent / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    current: int
    applied: tuple[tuple[int, str, int], ...]  # (version, name, applied_at)
    pending: tuple[Migration, ...]


def discover_migrations(directory: Path) -> list[Migration]:
    if not directory.is_dir():
        raise MigrationError(f"migrations folder not found: {directory}")
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        match = _MIGRATION_RE.match(path.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise MigrationError(
                f"two migrations share number {version:04d}: {found[version].path.name}, "
                f"{path.name}"
            )
        found[version] = Migration(version, match.group(2), path)
    return [found[v] for v in sorted(found)]


def _check_writable(path: Path) -> None:
    """SQLite in WAL mode writes next to the database (``-wal``, ``-shm``) even to read: a
    read-only folder or file would fail later with a bare "unable to open database file"."""
    if not os.access(path.parent, os.W_OK):
        raise StoreError(
            f"cannot open database {path}: the folder {path.parent} is not writable "
            "(DOPPELBOT_DATA_DIR or --data-dir must be a folder doppelbot can write)"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise StoreError(f"cannot open database {path}: the file is read-only")


async def _worker_stopped(connecting: Any) -> None:
    """After a failed ``aiosqlite.connect``, wait for its worker thread to finish: it reports
    its shutdown to the event loop, and doing that after ``asyncio.run`` closed the loop
    printed an "Event loop is closed" traceback under the one-line error."""
    thread = getattr(connecting, "_thread", None)
    if thread is not None and thread.is_alive():
        await asyncio.to_thread(thread.join, 5)


def now() -> int:
    return int(time.time())


class Tx:
    """The connection inside one write transaction, and the account its statements are for.

    Store functions named ``*_in`` take one of these, so a write made inside a caller's
    transaction belongs to the same account as the handle that opened it."""

    __slots__ = ("account_id", "conn")

    def __init__(self, conn: aiosqlite.Connection, account_id: int) -> None:
        self.conn = conn
        self.account_id = account_id

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any:
        return self.conn.executemany(sql, rows)

    async def execute_fetchall(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> Iterable[Any]:
        return await self.conn.execute_fetchall(sql, params)


class Database:
    """An open store. Use ``await Database.open(path)`` (applies pending migrations).

    A handle belongs to one own account (``account_id``; the default account unless made by
    ``for_account``); all handles of one open database share its connection and write lock."""

    #: The own account whose rows this handle reads and writes.
    account_id: int = DEFAULT_ACCOUNT_ID

    def __init__(
        self,
        conn: aiosqlite.Connection,
        path: Path,
        migrations_dir: Path,
        *,
        busy_retry_s: float = BUSY_RETRY_S,
    ) -> None:
        self.conn = conn
        self.path = path
        self.migrations_dir = migrations_dir
        self.busy_retry_s = busy_retry_s
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        path: Path | str,
        *,
        migrate: bool = True,
        migrations_dir: Path | None = None,
        busy_retry_s: float = BUSY_RETRY_S,
    ) -> Database:
        path = Path(path)
        connecting = None
        try:
            if str(path) != ":memory:":
                private_dir(path.parent)
                _check_writable(path)
                private_file(path)
            connecting = aiosqlite.connect(str(path), isolation_level=None)
            conn = await connecting
        except (OSError, sqlite3.Error) as exc:
            await _worker_stopped(connecting)
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        db = cls(conn, path, migrations_dir or default_migrations_dir(), busy_retry_s=busy_retry_s)
        try:
            await conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            await db._retrying(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA synchronous=NORMAL")
            if migrate:
                await db.migrate()
        except sqlite3.Error as exc:
            await conn.close()
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        except BaseException:
            await conn.close()
            raise
        return db

    def for_account(self, account_id: int) -> Database:
        """A handle on the same connection (and write lock) for another own account's rows.
        Closing any handle closes the database."""
        view = copy.copy(self)
        view.account_id = int(account_id)
        return view

    async def close(self) -> None:
        await self.conn.close()

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- transactions ---------------------------------------------------------------------------
    async def _retrying(self, start: Any) -> Any:
        """Run ``start()`` (a statement that takes SQLite's write lock) until it is not busy,
        with backoff, for up to ``busy_retry_s``."""
        deadline = time.monotonic() + self.busy_retry_s
        delay = 0.05
        warned = False
        while True:
            try:
                return await start()
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise StoreError(f"database {self.path}: {exc}") from exc
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"database {self.path} stayed locked by another program for "
                        f"{self.busy_retry_s:.0f}s; is something holding a write transaction?"
                    ) from exc
                if not warned:
                    warned = True
                    log.warning("store: database busy (another process writes); retrying")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """One write transaction; commits on success, rolls back on any exception. Waits (with
        retries) while another process holds the write lock."""
        async with self._write_lock:
            await self._retrying(lambda: self.conn.execute("BEGIN IMMEDIATE"))
            try:
                yield Tx(self.conn, self.account_id)
            except BaseException:
                await self.conn.execute("ROLLBACK")
                raise
            else:
                await self.conn.execute("COMMIT")

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> None:
        """A single write statement in its own transaction."""
        async with self.transaction() as conn:
            await conn.execute(sql, params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self.transaction() as conn:
            await conn.executemany(sql, rows)

    async def fetchall(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        async with self.conn.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def fetchone(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        async with self.conn.execute(sql, params) as cursor:
            return await cursor.fetchone()

    async def scalar(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        row = await self.fetchone(sql, params)
        return None if row is None else row[0]

    # --- migrations -----------------------------------------------------------------------------
    async def _ensure_migrations_table(self) -> None:
        await self.conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
        )

    async def migration_status(self) -> MigrationStatus:
        await self._ensure_migrations_table()
        rows = await self.fetchall(
            "SELECT version, name, applied_at FROM schema_migrations ORDER BY version"
        )
        applied = tuple((int(r["version"]), str(r["name"]), int(r["applied_at"])) for r in rows)
        done = {v for v, _, _ in applied}
        pending = tuple(
            m for m in discover_migrations(self.migrations_dir) if m.version not in done
        )
        return MigrationStatus(max(done, default=0), applied, pending)

    async def migrate(self, target: int | None = None) -> list[Migration]:
        """Apply pending migrations in order (up to ``target``); returns those applied."""
        status = await self.migration_status()
        applied: list[Migration] = []
        for migration in status.pending:
            if target is not None and migration.version > target:
                break
            if migration.version < status.current:
                raise MigrationError(
                    f"migration {migration.path.name} is older than the database level "
                    f"{status.current:04d} but was never applied; renumber it"
                )
            await self._apply(migration)
            applied.append(migration)
        return applied

    async def _apply(self, migration: Migration) -> None:
        # executescript runs statement by statement; on an error the explicit transaction is
        # still open and is rolled back, leaving the previous level intact.
        sql = migration.sql
        rebuild = sql.lstrip().startswith(_FK_OFF_MARK)
        script = (
            "BEGIN IMMEDIATE;\n"
            + sql
            + f"\n;INSERT INTO schema_migrations (version, name, applied_at) "
            f"VALUES ({migration.version}, '{migration.name}', {now()});"
        )
        async with self._write_lock:
            try:
                if rebuild:  # only outside a transaction does this pragma take effect
                    await self.conn.execute("PRAGMA foreign_keys=OFF")
                await self._retrying(lambda: self.conn.executescript(script))
                if rebuild:
                    broken = await (await self.conn.execute("PRAGMA foreign_key_check")).fetchall()
                    if broken:
                        raise sqlite3.IntegrityError(
                            f"{len(broken)} broken foreign key reference(s), e.g. "
                            f"{tuple(broken[0])}"
                        )
                await self.conn.execute("COMMIT")
            except (sqlite3.Error, StoreError) as exc:
                if self.conn.in_transaction:
                    await self.conn.execute("ROLLBACK")
                raise MigrationError(
                    f"migration {migration.path.name} failed: {exc}; database left at its "
                    "previous level"
                ) from exc
            finally:
                if rebuild:
                    await self.conn.execute("PRAGMA foreign_keys=ON")

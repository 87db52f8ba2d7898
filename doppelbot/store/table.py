"""A table's column list, and the statements made from it.

Each store module declares its tables once — name, columns in order, key — and builds its
INSERT, upsert and SELECT statements from that declaration (as sqlite-utils' ``db.py`` does), so
adding a column is one edit and a statement can never list columns in another order than the
row tuples it binds. Rows are read back by column name (``sqlite3.Row``), never by position.

A table of one own account's rows (``per_account``) also has an ``account_id`` column that is
not in ``columns``: the statements made from the declaration take the account and write it into
every row they insert and into every ``WHERE`` they select with, so no statement built here can
forget which account it is for (the row tuples stay what the domain maps).

The columns are named like the fields of the frozen dataclasses the store hands out, so one
helper maps each way: ``Table.values`` makes a row's values from an object, ``from_row`` makes an
object from a row, with a converter only where SQLite stores a field differently (an enum as its
value, a flag as 0/1, ids as JSON).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from functools import cache
from typing import Any, Literal, TypeVar

from doppelbot.store.database import Database

Conflict = Literal["fail", "update", "ignore"]

T = TypeVar("T")
#: A column value → a field value.
Convert = Callable[[Any], Any]

#: The column that says which own account a row of a per-account table belongs to.
ACCOUNT_COLUMN = "account_id"


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[str, ...]
    #: The conflict target of upserts (may include ``account_id``).
    key: tuple[str, ...] = ()
    per_account: bool = False

    @property
    def column_list(self) -> str:
        return ", ".join(self.columns)

    def qualified(self, alias: str) -> str:
        """The column list with a table alias: ``r.reply_id, r.chat_id, …``."""
        return ", ".join(f"{alias}.{c}" for c in self.columns)

    def insert(
        self,
        *,
        rows: int = 1,
        conflict: Conflict = "fail",
        columns: Sequence[str] | None = None,
        update: Sequence[str] | None = None,
        account_id: int | None = None,
    ) -> str:
        """``INSERT`` of ``rows`` rows of ``columns`` (default: all). ``conflict="update"``
        overwrites the non-key columns of an existing row (``update``: only those), ``"ignore"``
        keeps the existing row. A per-account table needs ``account_id``."""
        return _insert(
            self,
            rows,
            conflict,
            tuple(columns or ()),
            tuple(update or ()),
            self._account(account_id),
        )

    def select(self, where: str = "", *, tail: str = "", account_id: int | None = None) -> str:
        """``SELECT`` of every column, optionally ``WHERE where`` and a ``tail`` (ORDER BY…);
        on a per-account table only ``account_id``'s rows."""
        sql = f"SELECT {self.column_list} FROM {self.name}"
        account = self._account(account_id)
        if account is not None:
            where = f"{ACCOUNT_COLUMN} = {account}" + (f" AND ({where})" if where else "")
        if where:
            sql += f" WHERE {where}"
        return f"{sql} {tail}" if tail else sql

    def rows(
        self, db: Database, where: str = "", params: Sequence[Any] = (), *, tail: str = ""
    ) -> Rows:
        """The rows ``select`` finds (on a per-account table, ``db``'s account's), to read
        with ``.one(read)`` or ``.all(read)``."""
        account_id = db.account_id if self.per_account else None
        return Rows(db, self.select(where, tail=tail, account_id=account_id), params)

    def values(self, obj: Any, **given: Any) -> tuple[Any, ...]:
        """``obj``'s attributes in column order, as SQLite stores them (a flag as 0/1, an enum
        as its value); ``given`` holds the columns ``obj`` has no attribute for."""
        found = [given[c] if c in given else getattr(obj, c) for c in self.columns]
        # most values are stored as they are: test the class before calling (desktop imports
        # make a row of every message)
        return tuple([v if v.__class__ in _PLAIN else _stored(v) for v in found])

    def _account(self, account_id: int | None) -> int | None:
        if not self.per_account:
            if account_id is not None:
                raise ValueError(f"{self.name} is shared by all accounts")
            return None
        if account_id is None:
            raise ValueError(f"{self.name}: a statement on one account's rows needs its account")
        return int(account_id)  # an int, so writing it into the statement is safe


@cache
def _insert(
    table: Table,
    rows: int,
    conflict: Conflict,
    columns: tuple[str, ...],
    update: tuple[str, ...],
    account_id: int | None,
) -> str:
    cols = columns or table.columns
    one = ",".join("?" * len(cols))
    names = ", ".join(cols)
    if account_id is not None:
        one, names = f"{account_id},{one}", f"{ACCOUNT_COLUMN}, {names}"
    sql = f"INSERT INTO {table.name} ({names}) VALUES {','.join([f'({one})'] * rows)}"
    if conflict == "fail":
        return sql
    if not table.key:
        raise ValueError(f"{table.name}: an upsert needs the table's key")
    target = f" ON CONFLICT ({', '.join(table.key)})"
    if conflict == "ignore":
        return sql + target + " DO NOTHING"
    changed = [c for c in (update or cols) if c not in table.key]
    return sql + target + " DO UPDATE SET " + ", ".join(f"{c}=excluded.{c}" for c in changed)


@dataclass(frozen=True, slots=True)
class Rows:
    """A ``SELECT`` on one handle, each row made an object by a reader (``from_row``…)."""

    db: Database
    sql: str
    params: Sequence[Any]

    async def one(self, read: Callable[[Any], T]) -> T | None:
        """The first row (None: no row)."""
        row = await self.db.fetchone(self.sql, self.params)
        return None if row is None else read(row)

    async def all(self, read: Callable[[Any], T]) -> list[T]:
        return [read(r) for r in await self.db.fetchall(self.sql, self.params)]


_PLAIN = frozenset({int, str, float, bytes, type(None)})


def _stored(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Enum):
        return value.value
    return value


def from_row(cls: type[T], row: Any, /, **convert: Convert) -> T:
    """The dataclass ``cls`` from a row read by column name (a ``sqlite3.Row`` or a dict):
    every field the row has a column for, through ``convert[field]`` where given; the fields
    it has no column for keep their defaults."""
    names = _field_names(cls)
    # a Row iterates its values (and finds a name by a linear search): pair them up once
    pairs = zip(row.keys(), row, strict=True) if isinstance(row, sqlite3.Row) else row.items()
    return cls(**{k: convert[k](v) if k in convert else v for k, v in pairs if k in names})


@cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


def optional(convert: Convert) -> Convert:
    """``convert`` for a nullable column: NULL stays None."""
    return lambda value: None if value is None else convert(value)


def json_ids(value: str | None) -> tuple[int, ...]:
    """A column holding a JSON list of ids (NULL: none)."""
    return tuple(int(x) for x in json.loads(value or "[]"))

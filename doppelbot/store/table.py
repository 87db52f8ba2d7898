"""A table's column list, and the statements made from it.

Each store module declares its tables once — name, columns in order, key — and builds its
INSERT, upsert and SELECT statements from that declaration (as sqlite-utils' ``db.py`` does), so
adding a column is one edit and a statement can never list columns in another order than the
row tuples it binds. Rows are read back by column name (``sqlite3.Row``), never by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

Conflict = Literal["fail", "update", "ignore"]


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...] = ()

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
    ) -> str:
        """``INSERT`` of ``rows`` rows of ``columns`` (default: all). ``conflict="update"``
        overwrites the non-key columns of an existing row (``update``: only those), ``"ignore"``
        keeps the existing row."""
        return _insert(self, rows, conflict, tuple(columns or ()), tuple(update or ()))

    def select(self, where: str = "", *, tail: str = "") -> str:
        """``SELECT`` of every column, optionally ``WHERE where`` and a ``tail`` (ORDER BY…)."""
        sql = f"SELECT {self.column_list} FROM {self.name}"
        if where:
            sql += f" WHERE {where}"
        return f"{sql} {tail}" if tail else sql


@cache
def _insert(
    table: Table, rows: int, conflict: Conflict, columns: tuple[str, ...], update: tuple[str, ...]
) -> str:
    cols = columns or table.columns
    one = "(" + ",".join("?" * len(cols)) + ")"
    sql = f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES {','.join([one] * rows)}"
    if conflict == "fail":
        return sql
    if not table.key:
        raise ValueError(f"{table.name}: an upsert needs the table's key")
    target = f" ON CONFLICT ({', '.join(table.key)})"
    if conflict == "ignore":
        return sql + target + " DO NOTHING"
    changed = [c for c in (update or cols) if c not in table.key]
    return sql + target + " DO UPDATE SET " + ", ".join(f"{c}=excluded.{c}" for c in changed)

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from doppelbot.core.domain import Message
from doppelbot.core.errors import MigrationError
from doppelbot.store import history
from doppelbot.store.database import Database, default_migrations_dir, discover_migrations


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


async def test_apply_from_empty(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    status = await db.migration_status()
    await db.close()
    all_migrations = discover_migrations(default_migrations_dir())
    assert status.current == all_migrations[-1].version
    assert not status.pending
    assert {"messages", "peers", "replies", "facts", "schema_migrations"} <= _tables(
        tmp_path / "a.db"
    )


async def test_pragmas(db: Database) -> None:
    assert (await db.scalar("PRAGMA journal_mode")).lower() == "wal"
    assert await db.scalar("PRAGMA foreign_keys") == 1
    assert await db.scalar("PRAGMA busy_timeout") >= 1000


async def test_rerun_is_noop(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    assert await db.migrate() == []
    before = await db.migration_status()
    await db.close()
    db = await Database.open(tmp_path / "a.db")
    after = await db.migration_status()
    await db.close()
    assert before.applied == after.applied


async def test_upgrade_from_every_level_keeps_data(tmp_path: Path) -> None:
    migrations = discover_migrations(default_migrations_dir())
    for level in [m.version for m in migrations]:
        path = tmp_path / f"level{level}.db"
        db = await Database.open(path, migrate=False)
        await db.migrate(target=level)
        assert (await db.migration_status()).current == level
        # written as that level's schema has it (the store's code is the newest level's)
        account = ("account_id, ", "1, ") if level >= 13 else ("", "")
        await db.execute(
            f"INSERT INTO peers ({account[0]}peer_id, kind, first_name, updated_at)"
            f" VALUES ({account[1]}7, 'user', 'Ann', 1)"
        )
        await db.execute(
            f"INSERT INTO messages ({account[0]}chat_id, message_id, sender_id, is_outgoing,"
            f" date, text) VALUES ({account[1]}7, 1, 7, 0, 1000, 'привет')"
        )
        await db.close()
        db = await Database.open(path)  # upgrades to the newest level
        assert (await db.migration_status()).current == migrations[-1].version
        assert (await history.get_message(db, 7, 1)).text == "привет"
        assert (await history.get_peer(db, 7)).first_name == "Ann"
        await db.close()


async def test_failing_migration_leaves_previous_level(tmp_path: Path) -> None:
    mdir = tmp_path / "migrations"
    shutil.copytree(default_migrations_dir(), mdir)
    last = discover_migrations(mdir)[-1].version
    (mdir / f"{last + 1:04d}_good.sql").write_text("CREATE TABLE extra_good (x INTEGER);")
    (mdir / f"{last + 2:04d}_bad.sql").write_text(
        "CREATE TABLE half_done (x INTEGER);\nINSERT INTO no_such_table VALUES (1);"
    )
    db = await Database.open(tmp_path / "a.db", migrate=False, migrations_dir=mdir)
    with pytest.raises(MigrationError, match=r"bad\.sql"):
        await db.migrate()
    status = await db.migration_status()
    assert status.current == last + 1
    assert [m.name for m in status.pending] == ["bad"]
    tables = {r[0] for r in await db.fetchall("SELECT name FROM sqlite_master")}
    assert "extra_good" in tables and "half_done" not in tables
    # the connection is still usable after the rollback
    await history.upsert_messages(db, [Message(1, 1, 1, True, 5, "x")])
    await db.close()


async def test_duplicate_numbers_rejected(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("")
    (tmp_path / "0001_b.sql").write_text("")
    with pytest.raises(MigrationError, match="share number"):
        discover_migrations(tmp_path)


async def test_upsert_is_idempotent_and_takes_edits(db: Database) -> None:
    m = Message(5, 10, 5, False, 100, "one")
    await history.upsert_messages(db, [m, Message(5, 11, 1, True, 101, "two")])
    await history.upsert_messages(
        db, [Message(5, 10, 5, False, 100, "one (edited)", edit_date=150)]
    )
    assert await history.count_messages(db, 5) == 2
    got = await history.get_message(db, 5, 10)
    assert got.text == "one (edited)" and got.edit_date == 150


async def test_transaction_rolls_back(db: Database) -> None:
    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:
            await history.upsert_messages_in(conn, [Message(1, 1, 1, True, 5, "x")])
            raise RuntimeError("boom")
    assert await history.count_messages(db) == 0

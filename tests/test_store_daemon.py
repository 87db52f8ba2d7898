"""The store under a long-running bot: private files, a busy database, a second connection in
the same process, and the migration that lets replies wait instead of being dropped."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from doppelbot.core.domain import ReplyMode, Verdict
from doppelbot.core.errors import StoreError
from doppelbot.store import feedback, replies
from doppelbot.store.database import Database

ROOT = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_import_as_the_first_command_makes_private_files(tmp_path: Path) -> None:
    export = tmp_path / "result.json"
    export.write_text(
        json.dumps(
            {
                "name": "Alice",
                "type": "personal_chat",
                "id": 1001,
                "messages": [
                    {
                        "id": 1,
                        "type": "message",
                        "date_unixtime": "1700000000",
                        "from": "Alice",
                        "from_id": "user1001",
                        "text": "привет",
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    data = tmp_path / "fresh" / "data"
    code = (
        "from doppelbot.cli import main\n"
        f"main(['--env-file', '/dev/null', '--data-dir', {str(data)!r}, 'import', "
        f"{str(export)!r}, '--owner-id', '100'])"
    )
    # A permissive umask, as on many desktops: the files must be private anyway.
    subprocess.run(
        [sys.executable, "-c", f"import os; os.umask(0o002)\n{code}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    assert _mode(data) == 0o700
    assert _mode(data / "doppelbot.sqlite3") == 0o600


async def test_an_existing_open_data_dir_is_tightened(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    db_path = data / "doppelbot.sqlite3"
    sqlite3.connect(db_path).close()
    db_path.chmod(0o644)
    db = await Database.open(db_path)
    await db.close()
    assert _mode(data) == 0o700 and _mode(db_path) == 0o600


async def test_a_write_waits_out_another_process_holding_the_lock(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "x.sqlite3")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(tmp_path / "x.sqlite3")
        conn.execute("BEGIN IMMEDIATE")
        held.set()
        release.wait(10)
        conn.rollback()
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    await asyncio.to_thread(held.wait, 5)
    loop = asyncio.get_running_loop()
    loop.call_later(3.0, release.set)  # longer than SQLite's own busy timeout (2 s)
    await db.execute(
        "INSERT INTO bot_state (account_id, key, value, updated_at) VALUES (1, 'k', 'v', 0)"
    )
    assert await db.scalar("SELECT value FROM bot_state WHERE key = 'k'") == "v"
    await asyncio.to_thread(thread.join)
    await db.close()


async def test_a_write_gives_up_with_one_line_after_its_retry_budget(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "x.sqlite3", busy_retry_s=0.5)
    other = sqlite3.connect(tmp_path / "x.sqlite3")
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="stayed locked by another program"):
            await db.execute(
                "INSERT INTO bot_state (account_id, key, value, updated_at) VALUES (1, 'k', 'v', 0)"
            )
    finally:
        other.rollback()
        other.close()
        await db.close()


def test_a_second_connection_in_the_same_process_keeps_other_processes_coherent(
    tmp_path: Path,
) -> None:
    """Opening the database a second time in one process (the model loader does) must not
    drop the first connection's SQLite locks: another process's connection would then
    checkpoint and delete the WAL under the bot, and every later write would be lost."""
    path = tmp_path / "x.sqlite3"
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        from doppelbot.store.database import Database
        async def main():
            db = await Database.open({str(path)!r})
            second = await Database.open({str(path)!r})
            await second.close()
            for word in ("one", "two"):
                await db.execute(
                    "INSERT INTO bot_state (account_id, key, value, updated_at)"
                    " VALUES (1, ?, ?, 0)",
                    (word, word),
                )
                print(word, flush=True)
                sys.stdin.readline()
            await db.close()
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    seen = []
    for word in ("one", "two"):
        assert proc.stdout.readline().strip() == word
        conn = sqlite3.connect(path)  # opened and closed: the last connection closing here
        seen.append([r[0] for r in conn.execute("SELECT key FROM bot_state ORDER BY key")])
        conn.close()
        proc.stdin.write("\n")
        proc.stdin.flush()
    proc.wait(10)
    assert seen == [["one"], ["one", "two"]]


async def test_statement_logs_never_carry_texts_even_with_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from rich.console import Console

    from doppelbot.config import load_settings
    from doppelbot.logs import setup_logging

    settings = load_settings(None, data_dir=tmp_path / "data")
    setup_logging(settings, debug=True, console=Console(file=io.StringIO()))
    caplog.set_level(logging.DEBUG)
    db = await Database.open(tmp_path / "x.sqlite3")
    await db.execute(
        "INSERT INTO bot_state (account_id, key, value, updated_at) VALUES (1, ?, ?, 0)",
        ("k", "секрет"),
    )
    await db.close()
    assert "секрет" not in caplog.text
    logging.getLogger("aiosqlite").setLevel(logging.NOTSET)


async def test_the_deferred_replies_migration_keeps_replies_verdicts_and_ids(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite3"
    old = await Database.open(path, migrate=False)
    await old.migrate(target=10)
    # the level-10 schema, written as it has it (the store's code is the newest level's)
    for trigger in (1, 2):
        await old.execute(
            "INSERT INTO replies (chat_id, status, mode, trigger_message_id, created_at,"
            " updated_at) VALUES (7, 'queued', ?, ?, 100, 100)",
            ("review" if trigger == 1 else "auto", trigger),
        )
    first, second = 1, 2
    await old.execute(  # the level-10 schema: no source_message_id yet
        "INSERT INTO review_verdicts (reply_id, verdict, draft_text, final_text, created_at)"
        " VALUES (?, 'approved', 'draft', 'draft', 101)",
        (first,),
    )
    await old.execute("DELETE FROM replies WHERE reply_id = ?", (second,))
    await old.close()
    db = await Database.open(path)  # applies 0011 (a table rebuild with foreign keys off)
    [verdict] = await feedback.verdicts_for(db, first)
    assert verdict.verdict is Verdict.APPROVED
    assert (await replies.get(db, first)) is not None
    newer = await replies.create(db, chat_id=7, mode=ReplyMode.AUTO, trigger_message_id=3, now=1)
    assert newer > second  # AUTOINCREMENT never reuses an id, not even a deleted one
    assert await db.scalar("PRAGMA foreign_keys") == 1
    assert await db.fetchall("PRAGMA foreign_key_check") == []
    await db.execute("DELETE FROM replies WHERE reply_id = ?", (first,))
    assert await feedback.verdicts_for(db, first) == []  # the cascade still works
    await db.close()

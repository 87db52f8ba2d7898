"""Migration 0013: a database made by the schema before accounts keeps every row, now the
default account's, and the store reads it back through the plain (default) handle."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from doppelbot.core.domain import ReplyMode, ReplyStatus
from doppelbot.store import accounts, bot_state, feedback, history, replies, ssa, transcripts
from doppelbot.store.database import Database

#: Every table that holds one account's rows after 0013
#: (``ssa_items`` aside: its ``account_id`` stays empty until a card is posted).
ACCOUNT_TABLES = tuple(t for t in accounts.PER_ACCOUNT_TABLES if t != "ssa_items")

#: Rows in every table, as the schema at level 0012 has them (two users in `account`: the
#: newer one is who the default account is).
LEVEL_12_ROWS = """
INSERT INTO account VALUES (100, 'Old', NULL, 'old', NULL, 10), (200, 'Owner', 'Me', 'me',
    '+7000', 20);
INSERT INTO peers (peer_id, kind, first_name, username, is_contact, updated_at) VALUES
    (7, 'user', 'Ann', 'ann', 1, 1), (8, 'user', 'Bob', NULL, 0, 1), (200, 'user', 'Owner', 'me',
    0, 1);
INSERT INTO messages (chat_id, message_id, sender_id, is_outgoing, date, text, media_kind) VALUES
    (7, 1, 7, 0, 1000, 'привет', NULL), (7, 2, 200, 1, 1001, 'hi', NULL),
    (7, 3, 7, 0, 1002, '', 'voice'), (8, 1, 8, 0, 1003, 'yo', NULL),
    (200, 5, 200, 1, 1004, 'note to self', NULL);
INSERT INTO export_cursors VALUES (7, 3, 1, 1, 3, 1500, NULL), (8, 1, 1, 0, NULL, 1400, 'x');
INSERT INTO replies (reply_id, chat_id, status, mode, trigger_message_id, draft_text,
    review_message_id, sent_message_ids, created_at, updated_at, sent_at, not_before) VALUES
    (1, 7, 'sent', 'review', 1, 'draft', 900, '[2]', 1, 2, 2, NULL),
    (2, 8, 'deferred', 'auto', 1, NULL, NULL, '[]', 3, 3, NULL, 5000),
    (3, 8, 'dropped', 'auto', 1, NULL, NULL, '[]', 4, 4, NULL, NULL);
DELETE FROM replies WHERE reply_id = 3;
INSERT INTO review_verdicts (reply_id, verdict, draft_text, final_text, created_at,
    source_message_id) VALUES (1, 'approved', 'draft', 'draft', 2, 901);
INSERT INTO reactions VALUES (7, 2, '👍', 1, 0, 5);
INSERT INTO chat_settings VALUES (8, 'off', 6);
INSERT INTO bot_state VALUES ('paused', '1', 7), ('saved_seen_id', '901', 8);
INSERT INTO transcripts (chat_id, message_id, status, text, attempts, created_at, updated_at)
    VALUES (7, 3, 'done', 'голосовое', 1, 9, 9);
INSERT INTO facts (text, text_hash, source, created_at) VALUES ('I like tea', 'h1', 'cli', 1);
INSERT INTO ssa_batches (batch_id, dataset, seed, n_contexts, created_at) VALUES (1, 'd', 1, 1, 1);
INSERT INTO ssa_items (item_id, batch_id, context_key, source, position, model_input, reply,
    card_message_id, posted_at) VALUES (1, 1, '7:2', 'owner', 0, 'in', 'hi', 950, 10),
    (2, 1, '7:2', 'base', 1, 'in', 'hey', NULL, NULL);
INSERT INTO ssa_labels VALUES (1, 1, 0, '10', 11);
"""


def _count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


async def test_0013_moves_everything_to_the_default_account(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = await Database.open(path, migrate=False)
    await db.migrate(target=12)
    await db.conn.executescript(LEVEL_12_ROWS)
    await db.close()
    before = {
        t: _count(path, t)
        for t in (*ACCOUNT_TABLES, "review_verdicts", "facts", "ssa_items", "ssa_labels")
    }
    assert all(before.values())

    db = await Database.open(path)  # applies 0013 (and checks every reference before commit)
    try:
        assert (await db.migration_status()).current >= 13
        own = await accounts.list_all(db)
        assert [(a.account_id, a.name, a.user_id, a.username) for a in own] == [
            (1, "default", 200, "me")
        ]
        for table, n in before.items():
            assert _count(path, table) == n, table
        for table in ACCOUNT_TABLES:
            rows = await db.fetchall(f"SELECT DISTINCT account_id FROM {table}")
            assert [r[0] for r in rows] == [1], table
        assert await db.fetchall("PRAGMA foreign_key_check") == []
        assert "account" not in {
            r[0] for r in await db.fetchall("SELECT name FROM sqlite_master WHERE type='table'")
        }

        # the plain handle is the default account and reads it all back
        assert (await history.get_message(db, 7, 1)).text == "привет"  # type: ignore[union-attr]
        assert (await history.get_peer(db, 7)).username == "ann"  # type: ignore[union-attr]
        assert (await history.get_cursor(db, 7)).history_complete  # type: ignore[union-attr]
        assert await history.count_messages(db) == 5
        reply = await replies.get_by_review_message(db, 900)
        assert reply is not None and reply.reply_id == 1 and reply.status is ReplyStatus.SENT
        assert await feedback.answered_by(db, 1, 901)
        assert [r.emoji for r in await feedback.reactions_for(db, 7, 2)] == ["👍"]
        assert await bot_state.is_paused(db)
        assert await bot_state.get_int(db, bot_state.SAVED_SEEN_KEY) == 901
        assert (await bot_state.chat_reply_mode(db, 8)).value == "off"  # type: ignore[union-attr]
        assert (await transcripts.get(db, 7, 3)).text == "голосовое"  # type: ignore[union-attr]
        assert [s.reply.reply_id for s in await replies.deferred_replies(db)] == [2]
        assert [r.reply_id for r in await replies.with_status(db, (ReplyStatus.DEFERRED,))] == [2]
        item = await ssa.item_by_card(db, 950)
        assert item is not None and item.item_id == 1
        assert await ssa.card_ids(db) == [950]
        assert await ssa.count_labelled(db) == 1

        # AUTOINCREMENT carried over: a deleted reply's id is never handed out again
        new_id = await replies.create(
            db, chat_id=7, mode=ReplyMode.AUTO, trigger_message_id=1, now=50
        )
        assert new_id == 4
        await ssa.mark_posted(db, 2, 951)
        assert sorted(await ssa.card_ids(db)) == [950, 951]
    finally:
        await db.close()


async def test_0013_on_an_empty_database_has_the_default_account(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "new.db")
    try:
        own = await accounts.list_all(db)
        assert [(a.account_id, a.name, a.user_id) for a in own] == [(1, "default", None)]
    finally:
        await db.close()


async def test_the_stores_list_of_per_account_tables_is_the_schemas(tmp_path: Path) -> None:
    """``remove_if_unused`` looks for an account's rows in ``PER_ACCOUNT_TABLES``: a new table
    with an ``account_id`` column must be in it."""
    db = await Database.open(tmp_path / "new.db")
    try:
        with sqlite3.connect(db.path) as conn:
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
            with_account = {
                t
                for t in tables
                if any(c[1] == "account_id" for c in conn.execute(f"PRAGMA table_info({t})"))
            }
        assert with_account - {"accounts"} == set(accounts.PER_ACCOUNT_TABLES)
    finally:
        await db.close()

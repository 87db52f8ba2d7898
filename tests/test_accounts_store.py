"""No store query forgets which own account it is for.

Two accounts' histories share the tables with the same chat and message ids (Telegram counts
private-chat ids per account). Each public function of the per-account store modules is run
through a handle scoped to one account, on a database holding only that account's rows and on
one that also holds the other account's rows under the very same ids (with other texts, names
and states): every result, and every row the account ends up with, must be the same on both, and
the other account's rows must not change. Meanwhile every SQL statement the store runs is
traced, and each one that touches a per-account table must constrain ``account_id`` once per
table it names. A new store function must join the script (``test_every_function_is_covered``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from doppelbot.core.domain import (
    Account,
    Candidate,
    MediaKind,
    Message,
    Peer,
    PeerKind,
    Reaction,
    ReplyMode,
    ReplyStatus,
    TranscriptStatus,
    Verdict,
)
from doppelbot.store import accounts, bot_state, dataset_reads, feedback, history, replies, ssa
from doppelbot.store import transcripts as tr
from doppelbot.store.database import Database

S = ReplyStatus
NOW = 1_700_000_000
#: The per-account tables (0013; ``ssa_items`` aside: its ``account_id`` stays empty until a
#: card is posted) and the store modules that read and write them.
ACCOUNT_TABLES = tuple(t for t in accounts.PER_ACCOUNT_TABLES if t != "ssa_items")
MODULES = (history, replies, bot_state, feedback, tr, ssa, accounts)
#: Functions of those modules that are not about one account's rows (each says why).
SHARED = {
    "accounts.by_name",  # own accounts are found by name or user across accounts
    "accounts.by_user",
    "accounts.create",
    "accounts.list_all",
    "accounts.own_user_ids",
    "accounts.counts",  # `doppelbot accounts`: every account's counts, by account
    "accounts.remove_if_unused",  # by account id; test_accounts covers the refused import
    "feedback.feedback_replies",  # training data: every account's (checked below)
    "ssa.create_batch",  # batches, items and labels judge one doppelganger
    "ssa.items",
    "ssa.save_label",
    "ssa.latest_batch_id",
    "ssa.labels_by_source",
    "ssa.batch_progress",
    "ssa.count_labelled",
}


@pytest.fixture(autouse=True)
def _fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's own timestamps are the same in both runs."""
    for module in MODULES:
        if hasattr(module, "now"):
            monkeypatch.setattr(module, "now", lambda: NOW)


def _peers(tag: str) -> list[Peer]:
    return [
        Peer(7, PeerKind.USER, first_name=f"Ann{tag}", username=f"ann{tag}", is_contact=True),
        Peer(8, PeerKind.USER, first_name=f"Bob{tag}", is_contact=tag == "A"),
        Peer(-50, PeerKind.GROUP, title=f"Group{tag}"),
    ]


def _messages(tag: str, owner: int) -> list[Message]:
    out = []
    for chat in (7, 8):
        for mid in range(1, 7):
            mine = mid % 2 == 0
            out.append(
                Message(
                    chat,
                    mid,
                    owner if mine else chat,
                    mine,
                    NOW - 1000 + mid * 10 + (0 if tag == "A" else 3),
                    f"{tag} says {mid} in {chat}",
                )
            )
    out.append(Message(7, 7, 7, False, NOW - 500, "", media_kind=MediaKind.VOICE))
    return out


async def _fill(db: Database, tag: str, owner: int) -> None:
    """One account's history and bot state, written through the store itself."""
    await accounts.claim(db, Account(owner, first_name=tag))
    await history.upsert_peers(db, _peers(tag))
    await history.upsert_messages(db, _messages(tag, owner))
    await history.save_cursor(db, history.ExportCursor(7, 7, 1, tag == "A", 7, NOW - 5))
    sent = await replies.create(
        db, chat_id=7, mode=ReplyMode.REVIEW, trigger_message_id=5, now=NOW - 100
    )
    await replies.transition(
        db, sent, S.QUEUED, S.GENERATING, now=NOW - 99, draft_text=f"{tag} draft"
    )
    await replies.transition(
        db, sent, S.GENERATING, S.AWAITING_REVIEW, now=NOW - 98, review_message_id=900
    )
    if tag == "A":
        await replies.transition(db, sent, S.AWAITING_REVIEW, S.SENDING, now=NOW - 90)
        async with db.transaction() as conn:
            await replies.add_sent_id_in(conn, sent, 6, now=NOW - 89)
        await replies.transition(db, sent, S.SENDING, S.SENT, now=NOW - 88, sent_at=NOW - 88)
    await replies.queue_for_chat(
        db, chat_id=8, mode=ReplyMode.AUTO, trigger_message_id=5, now=NOW - 50
    )
    await feedback.set_reactions(db, 7, 6, [Reaction(7, 6, "👍" if tag == "A" else "👎", 1)])
    await bot_state.set_paused(db, tag == "B")
    await bot_state.set_chat_reply_mode(db, 8, ReplyMode.OFF if tag == "A" else ReplyMode.REVIEW)
    await bot_state.set_json(db, bot_state.HEALTH_KEY, {"who": tag})
    await bot_state.set_int(db, bot_state.SAVED_SEEN_KEY, 11 if tag == "A" else 22)
    await tr.note_media(db, [tr.note_media_row(7, 7, duration_s=3.0 if tag == "A" else 9.0)])
    if tag == "B":
        await tr.save_result(db, 7, 7, TranscriptStatus.DONE, text="B said", model="m")


async def _script(db: Database, batch: int, called: set[str]) -> list[tuple[str, Any]]:
    """Every per-account store function, reads and writes, through ``db`` (one account)."""
    results: list[tuple[str, Any]] = []

    async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        name = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
        called.add(name)
        value = fn(*args, **kwargs)
        if inspect.isasyncgen(value):
            value = [x async for x in value]
        elif inspect.isawaitable(value):
            value = await value
        results.append((name, value))
        return value

    async def in_tx(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async with db.transaction() as conn:
            return await call(fn, conn, *args, **kwargs)

    h, r, b, f = history, replies, bot_state, feedback
    # --- history: reads, then writes (in their own and in a caller's transaction)
    await call(h.get_peer, db, 7)
    await call(h.find_peer_by_username, db, "annA")
    await call(h.find_peer_by_username, db, "annB")
    await call(h.list_peers, db)
    await call(h.get_cursor, db, 7)
    await call(h.get_message, db, 7, 1)
    await call(h.count_messages, db)
    await call(h.count_messages, db, 7)
    await call(h.chat_ids_with_messages, db)
    await call(h.recent_messages, db, 7, 3)
    await call(h.iter_chat_messages, db, 8)
    await call(h.newest_incoming_id, db, 7)
    await call(h.newest_message_id, db, 8)
    await call(h.messages_by_ids, db, 7, [1, 2, 3])
    await call(h.voice_notes_since, db, 7, 0)
    await call(h.count_incoming_between, db, 7, 0, 10)
    await call(h.owner_turn_after, db, 7, 1)
    await call(h.has_outgoing, db, 8)
    await call(h.cursors_and_counts, db, [7, 8, 9])
    edit = Message(7, 3, 7, False, NOW - 900, "edited", edit_date=NOW)
    await call(h.upsert_messages, db, [edit])
    await call(h.upsert_peers, db, [Peer(9, PeerKind.USER, first_name="New")])
    await call(h.save_cursor, db, history.ExportCursor(8, 6, 1, True, 6, NOW))
    await in_tx(h.upsert_messages_in, [Message(9, 1, 9, False, NOW, "hi")])
    await in_tx(h.upsert_peers_in, [Peer(10, PeerKind.USER, first_name="Ten")])
    await in_tx(h.save_cursor_in, history.ExportCursor(9, 1, 1, False, None, NOW))
    await in_tx(h.insert_peers_if_new_in, [Peer(7, PeerKind.USER, first_name="NotAnn")])
    await in_tx(
        h.upsert_message_rows_in, [history.message_values(Message(9, 2, 1, True, NOW, "y"))]
    )
    await in_tx(h.count_stored_in, 7, [1, 2, 99])
    await in_tx(
        h.upsert_message_rows_bulk_in, [history.message_values(Message(9, 3, 9, False, NOW, "z"))]
    )
    await in_tx(h.count_messages_in, 9)

    # --- replies
    [mine] = await call(r.for_chat, db, 7)
    await call(r.get, db, mine.reply_id)
    await call(r.get_by_review_message, db, 900)
    await call(r.queued_for_chat, db, 8)
    await call(r.finished_reviews_since, db, 0)
    await call(r.deferred_for_chat, db, 8)
    await call(r.recent_send_times, db, 0)
    await call(r.with_status, db, [S.QUEUED, S.SENT, S.AWAITING_REVIEW])
    await call(r.count_recent_sends, db, 0)
    await call(r.count_recent_sends, db, 0, 7)
    await call(r.bot_message_ids, db, 7)
    await call(r.count_by_status, db)
    await call(r.last_replies, db, 5)
    await call(r.deferred_replies, db)
    await call(r.last_auto_sent, db, 7)
    await call(r.owner_written_since, db, 7, 0, replies_since=0)
    await in_tx(r.count_recent_sends_in, 0)
    queued = await call(
        r.queue_for_chat,
        db,
        chat_id=8,
        mode=ReplyMode.AUTO,
        trigger_message_id=6,
        now=NOW,
        unless_covered=True,
    )
    await call(
        r.queue_for_chat,
        db,
        chat_id=7,
        mode=ReplyMode.AUTO,
        trigger_message_id=1,
        now=NOW,
        unless_covered=True,
    )
    await call(r.transition, db, queued, S.QUEUED, S.DEFERRED, now=NOW, not_before=NOW + 60)
    new = await call(r.create, db, chat_id=9, mode=ReplyMode.AUTO, trigger_message_id=1, now=NOW)
    created = await in_tx(
        r.create_in, chat_id=9, mode=ReplyMode.AUTO, trigger_message_id=3, now=NOW
    )
    await in_tx(r.transition_in, created, S.QUEUED, S.GENERATING, now=NOW)
    await in_tx(r.update_in, created, now=NOW, draft_text="draft")
    await in_tx(r.add_sent_id_in, new, 77, now=NOW)
    # the other account's reply ids (it filled after this one: 3 and 4), through this handle:
    # nothing happens to them (4 is its queued reply, the one a move could take)
    await call(r.get, db, 3)
    await call(r.transition, db, 4, S.QUEUED, S.DROPPED, now=NOW)
    await in_tx(r.update_in, 3, now=NOW, error="touched")
    await in_tx(r.add_sent_id_in, 4, 88, now=NOW)

    # --- feedback
    await in_tx(f.record_verdict_in, mine.reply_id, Verdict.REJECTED, "d", None, NOW)
    await call(f.record_verdict, db, mine.reply_id, Verdict.REGENERATED, "d", "e", NOW)
    await call(f.repair_missing_verdicts, db, NOW)
    await call(f.answered_by, db, mine.reply_id, 901)
    await call(f.verdicts_for, db, mine.reply_id)
    await call(f.latest_verdict, db, mine.reply_id, Verdict.REGENERATED)
    await call(f.reactions_for, db, 7, 6)
    await call(f.set_reactions, db, 7, 5, [Reaction(7, 5, "🔥", 2)])
    verdict = await f.latest_verdict(db, mine.reply_id, Verdict.REGENERATED)
    assert verdict is not None and verdict.verdict_id is not None
    await call(f.set_final_text, db, verdict.verdict_id, "final")

    # --- bot state
    for key in (b.PAUSED_KEY, b.HEALTH_KEY, "missing"):
        await call(b.get_value, db, key)
    await call(b.is_paused, db)
    await call(b.paused_since, db)
    await call(b.chat_reply_mode, db, 8)
    await call(b.global_reply_mode, db)
    await call(b.chat_mode_overrides, db)
    await call(b.get_json, db, b.HEALTH_KEY)
    await call(b.get_int, db, b.SAVED_SEEN_KEY)
    await call(b.first_run_at, db, NOW)
    await call(b.set_value, db, "note", "x")
    await call(b.set_paused, db, True)
    await call(b.set_chat_reply_mode, db, 7, ReplyMode.REVIEW)
    await call(b.set_global_reply_mode, db, ReplyMode.AUTO)
    await call(b.set_json, db, b.CATCH_UP_KEY, {"answered": 1})
    await call(b.set_int, db, b.SAVED_SEEN_KEY, 33)

    # --- transcripts
    await call(tr.get, db, 7, 7)
    await call(tr.for_messages, db, 7, [7, 1])
    await call(tr.attach, db, await history.messages_by_ids(db, 7, [7]))
    await call(tr.notes_to_transcribe, db)
    await call(tr.notes_to_transcribe, db, chat_ids=[7], with_file=False)
    await call(tr.count_without_file, db)
    await call(tr.save_result, db, 7, 7, TranscriptStatus.FAILED, error="boom")
    await call(tr.note_media, db, [tr.note_media_row(8, 1, duration_s=1.0)])
    await in_tx(tr.note_media_in, [tr.note_media_row(8, 3, file_path="/x.ogg")])

    # --- SSA cards (in this account's Saved Messages) and the account itself
    items = await ssa.items(db, batch)
    await call(ssa.mark_posted, db, items[0].item_id, 950)
    await call(ssa.card_ids, db)
    await call(ssa.card_ids, db, batch)
    await call(ssa.item_by_card, db, 950)
    await call(ssa.item_by_card, db, 951)
    await call(accounts.current, db)
    await call(accounts.identity, db)
    me = await accounts.identity(db)
    assert me is not None
    await call(accounts.claim, db, Account(me.user_id, first_name="Renamed"))
    return results


def _when_aside(found: Any) -> Any:
    """An own account without the time it was added: the default one is added by the
    migration, at the wall-clock time of each database's creation."""
    if isinstance(found, accounts.OwnAccount):
        return dataclasses.replace(found, created_at=0)
    return found


def _rows(path: Path, account_id: int) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of one account, table by table (reply ids aside: they are global)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with sqlite3.connect(path) as conn:
        for table in ACCOUNT_TABLES:
            cols = [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]
            rows = conn.execute(f"SELECT * FROM {table} WHERE account_id = ?", (account_id,))
            out[table] = sorted(
                tuple(v for c, v in zip(cols, row, strict=True) if c != "reply_id") for row in rows
            )
        out["account"] = list(
            conn.execute(
                "SELECT name, user_id, first_name FROM accounts WHERE account_id = ?",
                (account_id,),
            )
        )
        cards = conn.execute(
            "SELECT item_id, card_message_id FROM ssa_items WHERE account_id = ? ORDER BY 1",
            (account_id,),
        )
        out["ssa_cards"] = list(cards)
        out["verdicts"] = sorted(
            conn.execute(
                "SELECT v.verdict, v.draft_text, v.final_text FROM review_verdicts v"
                " JOIN replies r ON r.reply_id = v.reply_id WHERE r.account_id = ?",
                (account_id,),
            )
        )
    return out


#: ``FROM``/``JOIN``/``INTO``/``UPDATE`` a per-account table (its use in a statement).
_USES = re.compile(
    r"\b(?:FROM|JOIN|INTO|UPDATE)\s+(" + "|".join(ACCOUNT_TABLES) + r")\b", re.IGNORECASE
)


def _unscoped(statements: list[str]) -> list[str]:
    """Statements naming per-account tables more often than they constrain ``account_id``."""
    return [
        sql
        for sql in statements
        if len(_USES.findall(sql)) > len(re.findall(r"\baccount_id\b", sql))
    ]


def test_the_trace_check_finds_a_forgetful_statement() -> None:
    assert _unscoped(["SELECT count(*) FROM messages WHERE chat_id = 7"])
    assert _unscoped(
        ["SELECT 1 FROM replies r JOIN peers p ON p.peer_id = r.chat_id WHERE r.account_id = 2"]
    )
    assert not _unscoped(["SELECT 1 FROM messages WHERE account_id = 2 AND chat_id = 7"])
    assert not _unscoped(["SELECT * FROM facts"])


async def _database(path: Path, fill: tuple[str, ...], drop: int | None) -> tuple[Database, int]:
    """A store with accounts 1 ("A", user 100) and 2 ("B", user 200), the given ones filled
    (in that order), the rows of ``drop`` removed again (so reply ids match the other run),
    and one shared SSA batch, whose second card the last filled account posted as message
    950 of its Saved Messages (unless it was dropped)."""
    db = await Database.open(path)
    await accounts.create(db, "second")
    users = {"A": (1, 100), "B": (2, 200)}
    for tag in fill:
        account_id, user = users[tag]
        await _fill(db.for_account(account_id), tag, user)
    if drop is not None:
        async with db.transaction() as conn:
            for table in ACCOUNT_TABLES:
                await conn.execute(f"DELETE FROM {table} WHERE account_id = ?", (drop,))
    batch = await ssa.create_batch(
        db,
        dataset="d",
        seed=1,
        n_contexts=1,
        candidates=[Candidate("7:6", "owner", "hi"), Candidate("7:6", "base", "yo")],
        contexts={"7:6": ((("other", "hey"),), "in")},
    )
    last = {"A": 1, "B": 2}[fill[-1]]
    if drop != last:
        second = (await ssa.items(db, batch))[1]
        await ssa.mark_posted(db.for_account(last), second.item_id, 950)
    return db, batch


@pytest.mark.parametrize("mine", [1, 2])
async def test_one_accounts_functions_never_see_or_touch_the_other(
    tmp_path: Path, mine: int
) -> None:
    other = 3 - mine
    order = ("A", "B") if mine == 1 else ("B", "A")
    solo, batch_solo = await _database(tmp_path / "solo.db", order, drop=other)
    both, batch_both = await _database(tmp_path / "both.db", order, drop=None)
    statements: list[str] = []
    await both.conn.set_trace_callback(statements.append)
    try:
        others_before = _rows(both.path, other)
        assert all(others_before[t] for t in ACCOUNT_TABLES)  # the other account is all there
        assert _rows(solo.path, other)["messages"] == []
        called: set[str] = set()
        alone = await _script(solo.for_account(mine), batch_solo, called)
        beside = await _script(both.for_account(mine), batch_both, called)
        assert [name for name, _ in beside] == [name for name, _ in alone]
        for (name, a), (_, b) in zip(alone, beside, strict=True):
            assert _when_aside(a) == _when_aside(b), name
        assert _rows(both.path, mine) == _rows(solo.path, mine)
        assert _rows(both.path, other) == others_before
        await both.conn.set_trace_callback(None)
        assert [s for s in statements if _USES.search(s)], "the trace saw the store's SQL"
        assert _unscoped(statements) == []
    finally:
        await solo.close()
        await both.close()


async def test_feedback_export_reads_every_account_without_mixing_reactions(
    tmp_path: Path,
) -> None:
    db, _ = await _database(tmp_path / "both.db", ("A", "B"), drop=None)
    try:
        for account_id in (1, 2):
            handle = db.for_account(account_id)
            [reply] = await replies.for_chat(handle, 7)
            async with handle.transaction() as conn:  # export reads replies with a prompt
                await replies.update_in(conn, reply.reply_id, now=NOW, prompt=f"p{account_id}")
        got = await feedback.feedback_replies(db)
        assert sorted(r.prompt for r in got) == ["p1", "p2"]
        # only account A's reply was sent (as message 6); B's message 6 has B's reaction
        sent = [r for r in got if r.sent_message_ids]
        assert [(r.prompt, [x.emoji for x in r.reactions]) for r in sent] == [("p1", ["👍"])]
    finally:
        await db.close()


async def test_dataset_reads_are_per_account(tmp_path: Path) -> None:
    solo, _ = await _database(tmp_path / "solo.db", ("A", "B"), drop=2)
    both, _ = await _database(tmp_path / "both.db", ("A", "B"), drop=None)
    await solo.close()
    await both.close()
    a, b = dataset_reads.open_readonly(solo.path), dataset_reads.open_readonly(both.path)
    try:
        for reads in (
            lambda c: dataset_reads.chats_with_peers(c, 1),
            lambda c: dataset_reads.chat_message_counts(c, 1),
            lambda c: dataset_reads.transcribed_notes(c, 1),
            lambda c: dataset_reads.chat_rows(c, 7, transcripts=True, account_id=1),
            lambda c: dataset_reads.account_user_id(c, 1),
        ):
            assert reads(a) == reads(b)
        assert dataset_reads.transcribed_notes(b, 2) == {(7, 7)}  # B's note only
        assert [o.name for o in dataset_reads.own_accounts(b)] == ["default", "second"]
        assert dataset_reads.chat_rows(b, 7, account_id=2)[0][3] == "B says 1 in 7"
    finally:
        a.close()
        b.close()


def _public(module: Any) -> set[str]:
    short = module.__name__.rsplit(".", 1)[-1]
    return {
        f"{short}.{name}"
        for name, fn in vars(module).items()
        if inspect.iscoroutinefunction(fn)
        and not name.startswith("_")
        and fn.__module__ == module.__name__
    }


async def test_every_function_is_covered(tmp_path: Path) -> None:
    db, batch = await _database(tmp_path / "cover.db", ("A", "B"), drop=None)
    called: set[str] = set()
    try:
        await _script(db.for_account(1), batch, called)
    finally:
        await db.close()
    public = set().union(*map(_public, MODULES))
    assert public - called - SHARED == set(), "add the new store function to _script"
    assert public >= SHARED

"""The store's one way to map rows: ``Table.values`` (object → row), ``from_row`` (row → object)
and ``Table.rows`` (a SELECT of one account's rows, read into objects)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import pytest

from doppelbot.core.domain import MediaKind, Message, Peer, PeerKind
from doppelbot.store import accounts, history
from doppelbot.store.database import Database
from doppelbot.store.table import Table, from_row, json_ids, optional


@dataclass(frozen=True, slots=True)
class Thing:
    thing_id: int
    kind: MediaKind | None
    done: bool
    ids: tuple[int, ...] = ()
    note: str = "default"


THINGS = Table("things", ("thing_id", "kind", "done", "ids"), key=("thing_id",))


def _sqlite_row(sql: str) -> sqlite3.Row:
    conn = sqlite3.connect(":memory:")
    conn.row_factory = sqlite3.Row
    row = conn.execute(sql).fetchone()
    conn.close()
    return row


def test_from_row_reads_fields_by_name_and_converts_only_where_told() -> None:
    row = _sqlite_row("SELECT '[3, 1]' AS ids, 1 AS done, 'voice' AS kind, 7 AS thing_id, 0 AS x")
    thing = from_row(Thing, row, kind=optional(MediaKind), done=bool, ids=json_ids)
    # columns in any order, extra columns ignored, a field with no column keeps its default
    assert thing == Thing(7, MediaKind.VOICE, True, (3, 1), "default")
    assert from_row(Thing, row) == Thing(7, "voice", 1, "[3, 1]")  # type: ignore[arg-type]


def test_from_row_takes_a_dict_and_keeps_null() -> None:
    row = {"thing_id": 1, "kind": None, "done": 0, "ids": None, "note": "n"}
    thing = from_row(Thing, row, kind=optional(MediaKind), done=bool, ids=json_ids)
    assert thing == Thing(1, None, False, (), "n")


def test_from_row_misses_a_required_column_loudly() -> None:
    with pytest.raises(TypeError, match="done"):
        from_row(Thing, {"thing_id": 1, "kind": None})


def test_values_are_what_sqlite_stores_in_column_order() -> None:
    thing = Thing(5, MediaKind.STICKER, True, ids=(1,))
    values = THINGS.values(thing, ids="[1]")
    assert values == (5, "sticker", 1, "[1]")
    assert type(values[1]) is str and type(values[2]) is int
    assert THINGS.values(Thing(6, None, False), ids=None) == (6, None, 0, None)
    with pytest.raises(AttributeError):
        Table("t", ("missing",)).values(thing)


def test_message_and_peer_round_trip_through_their_rows() -> None:
    m = Message(9, 2, 3, True, 100, "hi", edit_date=101, media_kind=MediaKind.PHOTO, grouped_id=4)
    row = dict(zip(history.MESSAGES.columns, history.message_values(m), strict=True))
    assert history.row_message(row) == m
    p = Peer(9, PeerKind.USER, "Ann", username="ann", is_contact=True)
    row = dict(zip(history.PEERS.columns, history.peer_values(p, updated_at=5), strict=True))
    assert row["updated_at"] == 5 and row["is_contact"] == 1 and row["kind"] == "user"
    assert history.row_peer(row) == p


def test_the_written_out_message_values_are_the_generic_ones() -> None:
    messages = [
        Message(9, 2, 3, True, 100, "hi", edit_date=101, media_kind=MediaKind.PHOTO, grouped_id=4),
        Message(9, 3, None, False, 102, is_forwarded=True, forwarded_from="Bob"),
        Message(9, 4, 9, False, 103, media_kind=MediaKind.STICKER, sticker_emoji="🙂"),
        Message(9, 5, 9, True, 104, reply_to_message_id=4, service_action="pin"),
    ]
    for m in messages:
        values = history.message_values(m)
        assert values == history.MESSAGES.values(m)
        assert [type(v) for v in values] == [type(v) for v in history.MESSAGES.values(m)]


async def test_rows_reads_one_accounts_rows_into_objects(db: Database) -> None:
    other = db.for_account((await accounts.create(db, "other")).account_id)
    await history.upsert_peers(db, [Peer(1, PeerKind.USER, "Mine"), Peer(2, PeerKind.BOT)])
    await history.upsert_peers(other, [Peer(1, PeerKind.USER, "Theirs")])

    mine = await history.PEERS.rows(db, tail="ORDER BY peer_id").all(history.row_peer)
    assert [(p.peer_id, p.first_name) for p in mine] == [(1, "Mine"), (2, None)]
    theirs = await history.PEERS.rows(other, "peer_id = ?", (1,)).one(history.row_peer)
    assert theirs is not None and theirs.first_name == "Theirs"
    assert await history.PEERS.rows(other, "peer_id = ?", (2,)).one(history.row_peer) is None
    # a table shared by all accounts reads every row
    names = await accounts.ACCOUNTS.rows(other, tail="ORDER BY account_id").all(lambda r: r["name"])
    assert names == ["default", "other"]

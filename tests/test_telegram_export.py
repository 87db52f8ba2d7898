"""The exporter on the real Telethon stack against the in-process fake Telegram: paging,
resume after a crash, takeout and its fallback, FloodWait, edits, selection, completeness."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from telethon.sessions import SQLiteSession
from telethon.tl import types

from doppelbot.core.domain import MediaKind, PeerKind
from doppelbot.core.errors import FloodWaitTooLongError
from doppelbot.store import accounts, history
from doppelbot.store.database import Database
from doppelbot.telegram.export import ChatStatus, Exporter, ExportOptions
from tests import faketg
from tests.faketg import OWNER_ID, FakeTelegram

# Small batches so a few hundred messages make several transactions.
OPTS = ExportOptions(batch_size=100, refetch_recent=20, flood_wait_max_s=10)


class Recorder:
    """An ExportProgress that remembers what it was told."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def start(self, chats: int) -> None:
        self.events.append(("start", chats))

    def chat_started(self, chat_id: int, name: str, stored: int, total: int | None) -> None:
        self.events.append(("chat", chat_id, name))

    def chat_advanced(self, chat_id: int, stored: int, total: int | None) -> None:
        self.events.append(("advance", chat_id, stored, total))

    def waiting(self, chat_id: int, remaining_s: int) -> None:
        self.events.append(("wait", chat_id, remaining_s))

    def chat_finished(self, report: Any) -> None:
        self.events.append(("done", report.chat_id, report.status))

    def note(self, text: str) -> None:
        self.events.append(("note", text))


class FakeSleep:
    def __init__(self) -> None:
        self.slept: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


@pytest.fixture
async def client_for() -> AsyncIterator[Any]:
    clients: list[Any] = []

    async def make(tg: FakeTelegram, **kwargs: Any) -> Any:
        client = tg.client(receive_updates=False, flood_sleep_threshold=0, **kwargs)
        await client.connect()
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.disconnect()


async def _ids(db: Database, chat_id: int) -> list[int]:
    rows = await db.fetchall(
        "SELECT message_id FROM messages WHERE chat_id = ? ORDER BY message_id", (chat_id,)
    )
    return [r[0] for r in rows]


def _server_ids(tg: FakeTelegram, peer: Any) -> list[int]:
    return [m.id for m in tg.messages(peer)]


async def test_multi_page_chats_are_exported_completely(db: Database, client_for: Any) -> None:
    tg = FakeTelegram()
    people = [tg.add_user(f"Friend{i}", username=f"friend{i}") for i in range(3)]
    for i, p in enumerate(people):
        tg.add_history(p, 260 + 17 * i)  # > 250: several GetHistory pages and batches each
    client = await client_for(tg)
    progress = Recorder()
    report = await Exporter(client, db, OPTS, progress=progress).run()
    assert report.used_takeout and list(tg.takeouts.values()) == ["finished-ok"]
    assert tg.takeout_scopes[next(iter(tg.takeouts))]["message_users"] is True
    assert tg.calls["InvokeWithTakeoutRequest"] >= tg.calls["GetHistoryRequest"] > 3 * 2
    assert len(report.chats) == 3 and report.fetched == 260 + 277 + 294
    for p in people:
        assert await _ids(db, p.id) == _server_ids(tg, p)
        peer = await history.get_peer(db, p.id)
        assert peer is not None and peer.username == p.username and peer.first_name == p.first_name
        cursor = await history.get_cursor(db, p.id)
        assert cursor is not None and cursor.history_complete and cursor.server_total
    for c in report.chats:
        assert c.status is ChatStatus.COMPLETE and c.stored == c.server_total and c.missing == 0
    account = await accounts.identity(db)
    assert account is not None and account.user_id == OWNER_ID
    assert ("start", 3) in progress.events
    assert any(e[0] == "advance" and e[2] == 260 for e in progress.events)
    out = await db.scalar("SELECT count(*) FROM messages WHERE is_outgoing = 1")
    assert out == sum(n // 2 for n in (260, 277, 294))


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 250])
async def test_history_pages_page_exactly_like_iter_messages(size: int, client_for: Any) -> None:
    """The exporter pages with raw messages.getHistory; Telethon's iter_messages is the
    reference: same messages in the same order with the same number of requests, for every
    direction, from cursors at the ends, in the middle and on page boundaries."""
    from telethon.tl.functions.messages import GetHistoryRequest

    from doppelbot.telegram.history_pages import HistoryPages

    tg = FakeTelegram()
    alice, bob = tg.add_user("Alice"), tg.add_user("Bob")
    for i in range(size):  # interleaved: alice's ids have gaps (one id counter for both)
        tg.add_message(alice, f"a{i}", out=i % 3 == 0)
        if i % 4 == 0:
            tg.add_message(bob, f"b{i}")
    client = await client_for(tg)
    entity = await client.get_input_entity(alice)
    ids = _server_ids(tg, alice)
    marks = sorted({0, 1, *ids[:1], *ids[-1:], *ids[len(ids) // 2 : len(ids) // 2 + 1]})
    if len(ids) > 100:
        marks.append(ids[-101])

    def pages(**kwargs: Any) -> HistoryPages:
        return HistoryPages(client, entity, **kwargs)

    async def pager_ids(pager: HistoryPages) -> tuple[list[int], int]:
        before = tg.calls["GetHistoryRequest"]
        got = [m.id async for page in pager for m in page.messages]
        return got, tg.calls["GetHistoryRequest"] - before

    async def telethon_ids(**kwargs: Any) -> tuple[list[int], int]:
        before = tg.calls["GetHistoryRequest"]
        got = [m.id async for m in client.iter_messages(alice, wait_time=0, **kwargs)]
        return got, tg.calls["GetHistoryRequest"] - before

    assert isinstance(pages(offset_id=0).request, GetHistoryRequest)
    assert await pager_ids(pages(offset_id=0)) == await telethon_ids()
    for mark in marks:
        back = await pager_ids(pages(offset_id=mark))
        assert back == await telethon_ids(**({"offset_id": mark} if mark else {}))
        if mark:  # the exporter looks forward / refetches only from a stored newest id
            forward = await pager_ids(pages(reverse=True, offset_id=mark + 1))
            assert forward == await telethon_ids(min_id=mark, reverse=True)
            for limit in (1, 20, 100, 150):
                recent = await pager_ids(pages(offset_id=mark + 1, limit=limit))
                assert recent == await telethon_ids(limit=limit, max_id=mark + 1)
    if size:
        forward_all, _ = await pager_ids(pages(reverse=True, offset_id=ids[0] + 1))
        assert forward_all == ids[1:]


async def test_crash_between_batches_then_resume_loses_and_duplicates_nothing(
    db: Database, client_for: Any
) -> None:
    tg = FakeTelegram()
    alice, bob = tg.add_user("Alice"), tg.add_user("Bob")
    tg.add_history(alice, 420)
    tg.add_history(bob, 300)
    client = await client_for(tg)
    # The 4th history page fails: a "crash" in the middle of the first chat.
    tg.fail_next("GetHistoryRequest", RuntimeError("power cut"), after=3)
    with pytest.raises(RuntimeError, match="power cut"):
        await Exporter(client, db, OPTS).run()
    partial = await db.scalar("SELECT count(*) FROM messages")
    assert 0 < partial < 720 and partial % 100 == 0  # whole batches only
    assert tg.takeouts and all(v == "finished-failed" for v in tg.takeouts.values())
    cursors = [await history.get_cursor(db, p.id) for p in (alice, bob)]
    assert any(c is not None and not c.history_complete for c in cursors)
    # New messages arrive meanwhile; then the re-run.
    tg.add_history(alice, 5)
    pages_before = tg.calls["GetHistoryRequest"]
    report = await Exporter(client, db, OPTS).run()
    for p in (alice, bob):
        assert await _ids(db, p.id) == _server_ids(tg, p)  # 0 lost, 0 duplicated
    assert report.fetched == 725 - partial
    # It continued rather than starting over: 725 messages need >= 8 pages, it used few more.
    assert tg.calls["GetHistoryRequest"] - pages_before <= (725 - partial) // 100 + 8


async def test_cancellation_mid_chat_keeps_committed_batches(db: Database, client_for: Any) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    tg.add_history(alice, 900)
    client = await client_for(tg)
    tg.latency_s = 0.005
    task = asyncio.ensure_future(Exporter(client, db, OPTS).run())
    for _ in range(2000):
        if await history.count_messages(db, alice.id) >= 300:
            break
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    tg.latency_s = 0
    cursor = await history.get_cursor(db, alice.id)
    stored = await _ids(db, alice.id)
    assert cursor is not None and stored == list(range(cursor.oldest_message_id, 901))
    await Exporter(client, db, OPTS).run()
    assert await _ids(db, alice.id) == _server_ids(tg, alice)


async def test_rerun_fetches_only_new_messages_and_picks_up_edits(
    db: Database, client_for: Any
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    tg.add_history(alice, 300)
    client = await client_for(tg)
    await Exporter(client, db, OPTS).run()
    recent = tg.messages(alice)[-3]
    tg.edit_message(alice, recent.id, "fixed typo", date=tg.now())
    tg.add_message(alice, "new one", out=False)
    tg.add_message(alice, "", media=faketg.sticker("🙂"), out=True)
    pages = tg.calls["GetHistoryRequest"]
    report = await Exporter(client, db, OPTS).run()
    # New messages oldest-first (Telethon asks once more to see the end), the recent window.
    assert tg.calls["GetHistoryRequest"] - pages == 3
    (chat,) = report.chats
    assert chat.fetched == 2 and chat.refreshed == 20 and chat.stored == 302
    edited = await history.get_message(db, alice.id, recent.id)
    assert edited is not None and edited.text == "fixed typo" and edited.edit_date is not None
    newest = await history.recent_messages(db, alice.id, limit=1)
    assert newest[0].media_kind is MediaKind.STICKER and newest[0].sticker_emoji == "🙂"
    assert await history.count_messages(db, alice.id) == 302
    pages = tg.calls["GetHistoryRequest"]
    await Exporter(client, db, OPTS).run()  # nothing new: one look for new, one recent window
    assert tg.calls["GetHistoryRequest"] - pages == 2


async def test_takeout_delay_falls_back_to_the_normal_api(db: Database, client_for: Any) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    tg.add_history(alice, 150)
    client = await client_for(tg)
    tg.fail_next("InitTakeoutSessionRequest", "TAKEOUT_INIT_DELAY_86400")
    progress = Recorder()
    opts = dataclasses.replace(OPTS, fallback_wait_s=0.001)
    report = await Exporter(client, db, opts, progress=progress).run()
    assert not report.used_takeout and tg.calls["InvokeWithTakeoutRequest"] == 0
    assert any("Allow" in n and "24.0 h" in n for n in report.notes)
    assert any(e[0] == "note" and "without takeout" in e[1] for e in progress.events)
    assert await _ids(db, alice.id) == _server_ids(tg, alice)


async def test_stale_takeout_from_a_crash_is_cleared(
    db: Database, tmp_path: Path, client_for: Any
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    tg.add_history(alice, 30)
    session = SQLiteSession(str(tmp_path / "s.session"))
    session.takeout_id = 4242  # what a killed run leaves behind in the session file
    client = await client_for(tg, session=session)
    report = await Exporter(client, db, OPTS).run()
    assert report.used_takeout and any("left over" in n for n in report.notes)
    assert client.session.takeout_id is None
    assert await history.count_messages(db, alice.id) == 30


async def test_flood_wait_under_the_bound_is_waited_out_with_a_countdown(
    db: Database, client_for: Any
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    tg.add_history(alice, 350)
    client = await client_for(tg)
    tg.fail_next("GetHistoryRequest", "FLOOD_WAIT_5", after=2)
    sleep, progress = FakeSleep(), Recorder()
    report = await Exporter(client, db, OPTS, progress=progress, sleep=sleep).run()
    assert sleep.slept == [1] * 5
    waits = [e[2] for e in progress.events if e[0] == "wait"]
    assert waits == [5, 4, 3, 2, 1, 0]
    assert report.chats[0].status is ChatStatus.COMPLETE
    assert await _ids(db, alice.id) == _server_ids(tg, alice)


async def test_flood_wait_over_the_bound_stops_that_chat_and_keeps_its_messages(
    db: Database, client_for: Any
) -> None:
    tg = FakeTelegram()
    alice, bob = tg.add_user("Alice"), tg.add_user("Bob")
    tg.add_history(alice, 350)
    tg.add_history(bob, 120)
    client = await client_for(tg)
    tg.fail_next("GetHistoryRequest", "FLOOD_WAIT_3600", after=2, peer=alice.id)
    sleep = FakeSleep()
    report = await Exporter(client, db, OPTS, sleep=sleep).run()
    assert sleep.slept == []
    by_id = {c.chat_id: c for c in report.chats}
    stopped = by_id[alice.id]
    assert stopped.status is ChatStatus.FLOOD_STOPPED and "3600s" in stopped.note
    assert stopped.stored == 200 and stopped.missing == 150 and report.problems == [stopped]
    cursor = await history.get_cursor(db, alice.id)
    assert cursor is not None and cursor.last_error and "3600" in cursor.last_error
    assert by_id[bob.id].status is ChatStatus.COMPLETE
    # Later, the chat continues where it stopped.
    client._flood_waited_requests.clear()
    again = await Exporter(client, db, OPTS).run()
    assert {c.chat_id: c.status for c in again.chats}[alice.id] is ChatStatus.COMPLETE
    assert await _ids(db, alice.id) == _server_ids(tg, alice)


async def test_flood_wait_on_dialogs_above_the_bound_is_one_clear_error(
    db: Database, client_for: Any
) -> None:
    tg = FakeTelegram()
    tg.add_history(tg.add_user("Alice"), 3)
    client = await client_for(tg)
    tg.fail_next("GetDialogsRequest", "FLOOD_WAIT_999")
    with pytest.raises(FloodWaitTooLongError, match="999s"):
        await Exporter(client, db, OPTS).run()


async def test_flood_waits_have_a_total_budget_per_run(db: Database, client_for: Any) -> None:
    """Thirty short waits add up: past the run's budget the chat that is asked to wait stops."""
    tg = FakeTelegram()
    alice, bob = tg.add_user("Alice"), tg.add_user("Bob")
    tg.add_history(alice, 350)
    tg.add_history(bob, 120)
    client = await client_for(tg)
    tg.fail_next("GetHistoryRequest", "FLOOD_WAIT_9", times=30, peer=alice.id)
    sleep = FakeSleep()
    options = dataclasses.replace(OPTS, flood_wait_total_s=20)
    report = await Exporter(client, db, options, sleep=sleep).run()
    assert sum(sleep.slept) == 18  # two waits of 9 s; the third would pass 20 s
    by_id = {c.chat_id: c for c in report.chats}
    stopped = by_id[alice.id]
    assert stopped.status is ChatStatus.FLOOD_STOPPED
    assert "only 2s are left of the 20s" in stopped.note
    assert "DOPPELBOT_FLOOD_WAIT_TOTAL_S" in stopped.note
    assert by_id[bob.id].status is ChatStatus.COMPLETE
    assert report.incomplete == [stopped]


async def test_a_refused_chat_reports_telegrams_own_error(db: Database, client_for: Any) -> None:
    tg = FakeTelegram()
    alice, bob = tg.add_user("Alice"), tg.add_user("Bob")
    tg.add_history(alice, 30)
    tg.add_history(bob, 30)
    client = await client_for(tg)
    tg.fail_next("GetHistoryRequest", "CHANNEL_PRIVATE", peer=alice.id)
    report = await Exporter(client, db, OPTS, sleep=FakeSleep()).run()
    failed = {c.chat_id: c for c in report.chats}[alice.id]
    assert failed.status is ChatStatus.FAILED and report.incomplete == [failed]
    # Telegram's name for the error and the request, not Telethon's wrapper and error class.
    assert "GetHistory: CHANNEL_PRIVATE (code 400)" in failed.note
    assert "InvokeWith" not in failed.note and "BAD_REQUEST" not in failed.note


async def test_export_cli_exits_non_zero_when_a_chat_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from doppelbot.cli import main
    from tests.test_telegram_login import _env, _wire

    tg = FakeTelegram()
    alice, bob = tg.add_user("Alice"), tg.add_user("Bob")
    tg.add_history(alice, 30)
    tg.add_history(bob, 30)
    tg.fail_next("GetHistoryRequest", "CHANNEL_PRIVATE", peer=alice.id)
    _wire(monkeypatch, tg, authorized=True)
    args = _env(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        await asyncio.to_thread(main, [*args, "export", "--no-takeout"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "CHANNEL_PRIVATE" in captured.out  # in the summary table
    assert "1 of 2 chat(s) failed or stopped" in " ".join(captured.err.split())


async def test_selection_skips_bots_deleted_saved_and_groups_by_default(
    db: Database, client_for: Any
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    bot = tg.add_user("Helper", bot=True)
    ghost = tg.add_user("Ghost", deleted=True)
    group = tg.add_group("Family")
    team = tg.add_channel("Team", username="team")
    news = tg.add_channel("News", megagroup=False)
    for peer in (alice, bot, ghost):
        tg.add_history(peer, 5)
    tg.add_history(OWNER_ID, 4)  # Saved Messages
    for peer in (group, team, news):
        tg.add_history(peer, 6, sender=alice)
    client = await client_for(tg)
    report = await Exporter(client, db, OPTS).run()
    assert [c.chat_id for c in report.chats] == [alice.id]
    assert report.skipped == {
        "bots": 1,
        "deleted accounts": 1,
        "saved messages": 1,
        "groups": 2,
        "channels": 1,
    }
    assert await history.chat_ids_with_messages(db) == [alice.id]
    wide = dataclasses.replace(OPTS, include_groups=True, include_channels=True, include_saved=True)
    report = await Exporter(client, db, wide).run()
    got = {c.chat_id: c.kind for c in report.chats}
    assert got == {
        alice.id: PeerKind.USER,
        OWNER_ID: PeerKind.USER,
        tg.marked_id(group): PeerKind.GROUP,
        tg.marked_id(team): PeerKind.GROUP,
        tg.marked_id(news): PeerKind.CHANNEL,
    }
    scope = tg.takeout_scopes[max(tg.takeout_scopes)]
    assert scope["message_chats"] and scope["message_megagroups"] and scope["message_channels"]
    # Like Telethon and the official apps: everything in Saved Messages is the owner's.
    saved = await history.recent_messages(db, OWNER_ID, limit=10)
    assert len(saved) == 4 and all(m.is_outgoing and m.sender_id == OWNER_ID for m in saved)
    in_group = await history.recent_messages(db, tg.marked_id(team), limit=6)
    assert {m.sender_id for m in in_group} == {alice.id, OWNER_ID}
    assert (await history.get_peer(db, tg.marked_id(team))).title == "Team"  # type: ignore[union-attr]


async def test_chat_list_date_floor_and_replied_only(db: Database, client_for: Any) -> None:
    tg = FakeTelegram()
    now = tg.now()
    alice = tg.add_user("Alice", username="alice")
    bob = tg.add_user("Bob")
    quiet = tg.add_user("Quiet")
    tg.add_history(alice, 200, start_date=now - 200 * 86_400, step_s=86_400)
    tg.add_history(bob, 10)
    tg.add_history(quiet, 10, out_every=0)  # only their messages, never mine
    client = await client_for(tg)
    report = await Exporter(
        client, db, dataclasses.replace(OPTS, chats=("@alice", str(bob.id), "@nobody"))
    ).run()
    assert {c.chat_id for c in report.chats} == {alice.id, bob.id}
    assert any("@nobody" in n for n in report.notes)
    await db.execute("DELETE FROM messages")
    await db.execute("DELETE FROM export_cursors")
    floor = now - 50 * 86_400
    report = await Exporter(
        client, db, dataclasses.replace(OPTS, since=floor, replied_only=True)
    ).run()
    assert {c.chat_id for c in report.chats} == {alice.id, bob.id}
    assert report.skipped.get("no reply of yours") == 1
    stored = await history.recent_messages(db, alice.id, limit=1000)
    assert stored and min(m.date for m in stored) >= floor and len(stored) in (49, 50)
    by_id = {c.chat_id: c for c in report.chats}
    assert by_id[alice.id].status is ChatStatus.DATE_FLOOR
    assert by_id[bob.id].status is ChatStatus.COMPLETE


async def test_rich_messages_are_mapped_and_senders_stored(db: Database, client_for: Any) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    carol = tg.add_user("Carol", "C", username="carol")
    first = tg.add_message(alice, "look at this", out=False)
    tg.add_message(alice, "", media=faketg.voice(), out=False)
    tg.add_message(alice, "nice", reply_to=first.id, out=True)
    tg.add_message(alice, "fwd", fwd_from=carol, out=False)
    tg.add_message(alice, "fwd hidden", fwd_from="Anonymous Bob", out=False)
    tg.add_message(alice, "a", media=faketg.photo(), grouped_id=55, out=True)
    tg.add_message(alice, "b", media=faketg.photo(), grouped_id=55, out=True)
    tg.add_service(alice, types.MessageActionPhoneCall(call_id=1, duration=30), sender=alice)
    client = await client_for(tg)
    await Exporter(client, db, OPTS).run()
    msgs = await history.recent_messages(db, alice.id, limit=100)
    by_text = {m.text: m for m in msgs}
    assert by_text["nice"].reply_to_message_id == first.id and by_text["nice"].is_outgoing
    assert by_text["fwd"].is_forwarded and by_text["fwd"].forwarded_from == "Carol C"
    assert by_text["fwd hidden"].forwarded_from == "Anonymous Bob"
    assert by_text["a"].grouped_id == by_text["b"].grouped_id == 55
    assert by_text["a"].media_kind is MediaKind.PHOTO
    assert any(m.media_kind is MediaKind.VOICE for m in msgs)
    (call,) = [m for m in msgs if m.is_service]
    assert call.service_action == "phone_call"


async def test_completeness_reports_gaps(db: Database, client_for: Any) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    tg.add_history(alice, 120)
    client = await client_for(tg)
    await Exporter(client, db, OPTS).run()
    # Something removed stored rows behind the cursor's back: the next run must say so.
    await db.execute("DELETE FROM messages WHERE chat_id = ? AND message_id <= 10", (alice.id,))
    report = await Exporter(client, db, OPTS).run()
    (chat,) = report.chats
    assert chat.status is ChatStatus.GAPS and chat.missing == 10 and "10 of 120" in chat.note


def test_export_options_follow_settings(tmp_path: Path) -> None:
    from doppelbot.config import load_settings
    from doppelbot.core.errors import ConfigError
    from doppelbot.telegram.export_types import export_options

    s = load_settings(env_file=None, data_dir=tmp_path, export_batch_size=7, flood_wait_max_s=3)
    opts = export_options(s, include_groups=True, use_takeout=None)
    assert (opts.batch_size, opts.flood_wait_max_s, opts.include_groups) == (7, 3, True)
    assert opts.use_takeout is s.export.use_takeout
    assert export_options(s, batch_size=50).batch_size == 50
    with pytest.raises(ConfigError, match="batch_size"):
        export_options(s, batch_size=10**6)


def test_since_date_is_utc_midnight() -> None:
    from doppelbot.cli.export_cmd import _parse_date

    assert _parse_date("2024-02-29") == int(dt.datetime(2024, 2, 29, tzinfo=dt.UTC).timestamp())

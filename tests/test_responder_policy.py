"""The responder's pure parts: who is answered, the safety gate, quiet hours across time
zones and midnight, debounce timers, reply splitting, and the replies store's lifecycle."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from doppelbot.config import ResponderSettings
from doppelbot.core.domain import Message, Peer, PeerKind, ReplyMode, ReplyStatus
from doppelbot.core.errors import EmptyReplyError
from doppelbot.responder import delivery
from doppelbot.responder.debounce import Debouncer
from doppelbot.responder.policy import (
    GateInputs,
    Skip,
    eligibility,
    gate,
    group_dice,
    in_quiet_hours,
)
from doppelbot.store import replies
from doppelbot.store.database import Database
from tests.responder_fakes import fast_settings

OWNER = 100
S = ReplyStatus


def _msg(chat_id: int = 7, sender: int | None = 7, **kw: object) -> Message:
    return Message(chat_id, 1, sender, kw.pop("out", False), 0, "hi", **kw)  # type: ignore[arg-type]


def _user(peer_id: int = 7, **kw: object) -> Peer:
    kw.setdefault("is_contact", True)
    return Peer(peer_id, kw.pop("kind", PeerKind.USER), **kw)  # type: ignore[arg-type]


CFG = ResponderSettings()


@pytest.mark.parametrize(
    ("message", "peer", "expected"),
    [
        (_msg(), _user(), None),
        (_msg(service_action="phone_call"), _user(), Skip.SERVICE),
        (_msg(out=True, sender=OWNER), _user(), Skip.OWN),
        (_msg(chat_id=OWNER, sender=OWNER), _user(OWNER, is_self=True), Skip.OWN),
        (_msg(chat_id=OWNER, sender=5), _user(OWNER, is_self=True), Skip.SAVED_MESSAGES),
        (_msg(sender=9), _user(), Skip.NOT_FROM_CHAT),
        (_msg(), _user(kind=PeerKind.BOT, is_bot=True), Skip.BOT),
        (_msg(), _user(is_bot=True), Skip.BOT),
        (_msg(chat_id=-5, sender=7), _user(-5, kind=PeerKind.GROUP), Skip.GROUP),
        (_msg(chat_id=-1005, sender=None), _user(-1005, kind=PeerKind.CHANNEL), Skip.CHANNEL),
        (_msg(), _user(is_deleted=True), Skip.DELETED),
        (_msg(), _user(is_contact=False), Skip.UNKNOWN_CONTACT),
    ],
)
def test_eligibility(message: Message, peer: Peer, expected: Skip | None) -> None:
    assert eligibility(message, peer, OWNER, CFG) == expected


def test_lists_from_settings(tmp_path: Path) -> None:
    cfg = fast_settings(tmp_path, allow_list="@Ann, 8 ,bob", deny_list="@eve,-100123").responder
    assert cfg.allow_ids == {8} and cfg.allow_usernames == {"ann", "bob"}
    assert cfg.deny_ids == {-100123} and cfg.deny_usernames == {"eve"}
    ann = _user(7, username="ANN", is_contact=False)
    assert eligibility(_msg(), ann, OWNER, cfg) is None  # allowed beats "unknown contact"
    assert eligibility(_msg(chat_id=9, sender=9), _user(9), OWNER, cfg) == Skip.NOT_ALLOWED
    eve = _user(10, username="eve")
    denied = ResponderSettings(deny_list=("@eve",), allow_list=("eve",))
    assert eligibility(_msg(chat_id=10, sender=10), eve, OWNER, denied) == Skip.DENIED


def test_unknown_contacts_setting() -> None:
    cfg = ResponderSettings(answer_unknown_contacts=True)
    assert eligibility(_msg(), _user(is_contact=False), OWNER, cfg) is None


def test_group_opt_in_probability() -> None:
    cfg = ResponderSettings(group_reply_probability=0.3)
    group = _user(-5, kind=PeerKind.GROUP)
    assert eligibility(_msg(chat_id=-5, sender=7), group, OWNER, cfg) is None
    assert group_dice(group, cfg, 0.29) is None
    assert group_dice(group, cfg, 0.3) == Skip.GROUP_DICE
    assert group_dice(_user(), cfg, 0.99) is None  # private chats never roll


def _ts(hour: int, minute: int, tz: str) -> float:
    return dt.datetime(2024, 6, 1, hour, minute, tzinfo=ZoneInfo(tz)).timestamp()


def test_quiet_hours_wrap_midnight_in_time_zone() -> None:
    cfg = ResponderSettings(quiet_hours="23:00-08:00", timezone="Asia/Vladivostok")
    assert in_quiet_hours(_ts(23, 30, "Asia/Vladivostok"), cfg)
    assert in_quiet_hours(_ts(7, 59, "Asia/Vladivostok"), cfg)
    assert not in_quiet_hours(_ts(8, 0, "Asia/Vladivostok"), cfg)
    assert not in_quiet_hours(_ts(12, 0, "Asia/Vladivostok"), cfg)
    # 23:30 in Vladivostok is 16:30 in Moscow: the zone decides, not the server's clock.
    assert in_quiet_hours(_ts(16, 30, "Europe/Moscow"), cfg)


def test_quiet_hours_same_day_and_off() -> None:
    day = ResponderSettings(quiet_hours="9:00-18:00", timezone="UTC")
    assert in_quiet_hours(_ts(9, 0, "UTC"), day) and not in_quiet_hours(_ts(18, 0, "UTC"), day)
    assert not in_quiet_hours(_ts(3, 0, "UTC"), ResponderSettings())
    same = ResponderSettings(quiet_hours="09:00-09:00", timezone="UTC")
    assert not in_quiet_hours(_ts(9, 0, "UTC"), same)


def _inputs(**kw: object) -> GateInputs:
    base: dict[str, object] = {
        "now": 10_000.0,
        "paused": False,
        "last_owner_message_at": None,
        "chat_sends_last_hour": 0,
        "global_sends_last_hour": 0,
    }
    base.update(kw)
    return GateInputs(**base)  # type: ignore[arg-type]


def test_gate_rules() -> None:
    cfg = ResponderSettings(per_chat_hourly_cap=2, global_hourly_cap=5, takeover_minutes=10)
    assert gate(_inputs(), cfg) is None
    assert gate(_inputs(paused=True), cfg) == Skip.PAUSED
    assert gate(_inputs(last_owner_message_at=9_500.0), cfg) == Skip.TAKEOVER
    assert gate(_inputs(last_owner_message_at=9_399.0), cfg) is None  # window over
    assert gate(_inputs(chat_sends_last_hour=2), cfg) == Skip.CHAT_CAP
    assert gate(_inputs(global_sends_last_hour=5), cfg) == Skip.GLOBAL_CAP
    assert gate(_inputs(chat_sends_last_hour=1, global_sends_last_hour=4), cfg) is None


async def test_debounce_timers_are_independent() -> None:
    fired: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    deb: Debouncer[str] = Debouncer(0.05, lambda k: fired.append((k, loop.time() - start)))
    deb.touch("a")
    deb.touch("b", 0.15)
    for _ in range(4):  # keep re-arming "c": it fires once, after the last touch
        deb.touch("c")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.25)
    assert [k for k, _ in fired] == ["a", "c", "b"]
    times = dict(fired)
    assert times["a"] < 0.1 and times["c"] >= 0.11 and times["b"] >= 0.15
    deb.touch("d")
    assert deb.cancel("d") and not deb.pending("d")
    deb.close()
    deb.touch("e")
    await asyncio.sleep(0.08)
    assert "e" not in dict(fired)


def test_split_and_typing() -> None:
    assert delivery.split_reply("a\n\n b \nc") == ["a", "b", "c"]
    assert delivery.split_reply("a\nb", split_lines=False) == ["a\nb"]
    assert delivery.split_reply("1\n2\n3\n4\n5\n6\n7") == ["1", "2", "3", "4", "5 6 7"]
    assert delivery.split_reply("<extra_id_0>ок") == ["ок"]
    with pytest.raises(EmptyReplyError):
        delivery.split_reply(" \n <pad> ")
    assert delivery.typing_seconds("x" * 24, 12, 8) == 2.0
    assert delivery.typing_seconds("x" * 240, 12, 8) == 8.0


# --- the replies store ---------------------------------------------------------------------------
async def test_transitions_are_guarded(db: Database) -> None:
    rid = await replies.create(db, chat_id=7, mode=ReplyMode.AUTO, trigger_message_id=1, now=1)
    assert await replies.transition(db, rid, S.QUEUED, S.GENERATING, now=2)
    # A second mover (e.g. a restart racing a task) loses the compare-and-set.
    assert not await replies.transition(db, rid, S.QUEUED, S.GENERATING, now=3)
    assert await replies.transition(db, rid, S.GENERATING, S.SENDING, now=4, final_text="x")
    with pytest.raises(replies.IllegalTransitionError):
        await replies.transition(db, rid, S.SENDING, S.QUEUED, now=5)
    with pytest.raises(ValueError, match="not a reply field"):
        await replies.transition(db, rid, S.SENDING, S.SENT, now=5, status="sent")
    async with db.transaction() as conn:
        await replies.add_sent_id_in(conn, rid, 55, now=6)
        await replies.add_sent_id_in(conn, rid, 55, now=6)  # idempotent
        await replies.add_sent_id_in(conn, rid, 56, now=6)
    assert await replies.transition(db, rid, S.SENDING, S.SENT, now=7, sent_at=7)
    reply = await replies.get(db, rid)
    assert reply is not None and reply.status is S.SENT and reply.sent_message_ids == (55, 56)
    assert await replies.bot_message_ids(db, 7) == {55, 56}
    for terminal in (S.SENT, S.DROPPED, S.FAILED, S.EXPIRED):
        assert replies.TRANSITIONS[terminal] == frozenset()


async def test_queue_for_chat_keeps_one_queued_reply(db: Database) -> None:
    a = await replies.queue_for_chat(
        db, chat_id=7, mode=ReplyMode.AUTO, trigger_message_id=3, now=1
    )
    b = await replies.queue_for_chat(
        db, chat_id=7, mode=ReplyMode.AUTO, trigger_message_id=5, now=2
    )
    assert a == b
    reply = await replies.get(db, a)
    assert reply is not None and reply.trigger_message_id == 5
    await replies.transition(db, a, S.QUEUED, S.GENERATING, now=3)
    c = await replies.queue_for_chat(
        db, chat_id=7, mode=ReplyMode.AUTO, trigger_message_id=6, now=4
    )
    assert c != a  # the one being generated is not touched


async def test_recent_sends_count(db: Database) -> None:
    for chat, sent_at in ((7, 5000), (7, 100), (8, 5000)):
        rid = await replies.create(
            db, chat_id=chat, mode=ReplyMode.AUTO, trigger_message_id=1, now=1
        )
        await replies.transition(db, rid, S.QUEUED, S.GENERATING, now=1)
        await replies.transition(db, rid, S.GENERATING, S.SENDING, now=sent_at)
        await replies.transition(db, rid, S.SENDING, S.SENT, now=sent_at, sent_at=sent_at)
    sending = await replies.create(db, chat_id=7, mode=ReplyMode.AUTO, trigger_message_id=2, now=1)
    await replies.transition(db, sending, S.QUEUED, S.GENERATING, now=1)
    await replies.transition(db, sending, S.GENERATING, S.SENDING, now=4000)
    assert await replies.count_recent_sends(db, 3000) == 3
    assert await replies.count_recent_sends(db, 3000, chat_id=7) == 2
    counts = await replies.count_by_status(db)
    assert counts[S.SENT] == 3 and counts[S.SENDING] == 1

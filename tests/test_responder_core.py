"""The responder core with plain fakes (no Telegram, no model): the reply lifecycle, bursts,
takeover, safety gates, stale replies, failures and crash recovery."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from doppelbot.core.domain import Message, PeerKind, Reply, ReplyStatus
from doppelbot.core.errors import GenerationError
from doppelbot.core.ports import ScoredFact
from doppelbot.responder.context import LiveContext
from doppelbot.responder.service import Approval
from doppelbot.responder.transport import Clock
from doppelbot.store import bot_state, history, replies
from doppelbot.store.database import Database
from tests.responder_fakes import (
    OWNER,
    FakeFacts,
    FakeGenerator,
    FakeTransport,
    Harness,
    fast_settings,
    make_responder,
    user,
    wait_for,
)

S = ReplyStatus
ANN = user(1001, username="ann")


class InstantClock(Clock):
    """Real wall time, but sleeping is instant (FloodWait and delay tests)."""

    def __init__(self) -> None:
        object.__setattr__(self, "slept", [])

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)  # type: ignore[attr-defined]
        await asyncio.sleep(0)


async def _harness(
    tmp_path: Path, db: Database, generator: FakeGenerator | None = None, **kw: Any
) -> Harness:
    responder_kw = {k: kw.pop(k) for k in ("clock", "facts", "drafts", "rng") if k in kw}
    settings = fast_settings(tmp_path, **kw)
    transport = FakeTransport()
    generator = generator or FakeGenerator()
    responder = make_responder(settings, db, transport, generator, **responder_kw)
    await responder.start()
    return Harness(db, settings, transport, generator, responder, responder_kw.get("facts"))


@pytest.fixture
async def h(tmp_path: Path, db: Database) -> AsyncIterator[Harness]:
    harness = await _harness(tmp_path, db)
    yield harness
    await harness.responder.aclose()


async def _statuses(db: Database, chat_id: int) -> list[tuple[ReplyStatus, str | None]]:
    return [(r.status, r.error) for r in await replies.for_chat(db, chat_id)]


async def test_dm_gets_one_reply_with_typing_and_lifecycle(h: Harness) -> None:
    incoming = await h.incoming(ANN, "привет, как дела?")
    await h.idle()
    assert h.transport.texts() == ["ок, понял"]
    assert h.transport.typing == [ANN.peer_id]
    [reply] = await replies.for_chat(h.db, ANN.peer_id)
    assert reply.status is S.SENT
    assert reply.model_id == "fake-model" and reply.adapter_id == "fake-adapter"
    assert reply.trigger_message_id == incoming.message_id
    assert reply.context_message_ids == (incoming.message_id,)
    assert reply.sent_message_ids == (h.transport.sent[0].message_id,)
    assert reply.generated_at and reply.sent_at and reply.final_text == "ок, понял"
    stored = await history.get_message(h.db, ANN.peer_id, h.transport.sent[0].message_id)
    assert stored is not None and stored.is_outgoing and stored.text == "ок, понял"
    assert "Собеседник: привет, как дела?" in h.generator.prompts[0]


async def test_burst_of_five_is_one_reply_covering_all(tmp_path: Path, db: Database) -> None:
    # a debounce far above the 10 ms gaps: a slow CI host must not split the burst
    h = await _harness(tmp_path, db, debounce_s=0.5)
    try:
        for i in range(5):
            await h.incoming(ANN, f"сообщение {i}")
            await asyncio.sleep(0.01)
        await h.idle()
    finally:
        await h.responder.aclose()
    assert len(h.transport.sent) == 1
    assert len(h.generator.prompts) == 1
    assert all(f"сообщение {i}" in h.generator.prompts[0] for i in range(5))
    assert await _statuses(h.db, ANN.peer_id) == [(S.SENT, None)]


async def test_multiline_reply_is_split_in_order(tmp_path: Path, db: Database) -> None:
    h = await _harness(tmp_path, db, FakeGenerator("первая\n\nвторая\nтретья"))
    await h.incoming(ANN, "расскажи")
    await h.idle()
    assert h.transport.texts() == ["первая", "вторая", "третья"]
    [reply] = await replies.for_chat(db, ANN.peer_id)
    assert len(reply.sent_message_ids) == 3
    await h.responder.aclose()


async def test_split_lines_off_sends_one_message(tmp_path: Path, db: Database) -> None:
    h = await _harness(tmp_path, db, FakeGenerator("а\nб"), split_lines=False)
    await h.incoming(ANN, "скажи что-нибудь")
    await h.idle()
    assert h.transport.texts() == ["а\nб"]  # one message keeping its line break
    await h.responder.aclose()


async def test_owner_writing_cancels_pending_and_silences_chat(h: Harness) -> None:
    await h.incoming(ANN, "ты тут?")
    await h.owner_writes(ANN, "да, сейчас отвечу сам")
    await h.idle()
    assert h.transport.sent == []
    assert await _statuses(h.db, ANN.peer_id) == [(S.DROPPED, "takeover")]
    # Within takeover_minutes the chat stays silent.
    await h.incoming(ANN, "а потом?")
    await h.idle()
    assert h.transport.sent == []
    assert (await _statuses(h.db, ANN.peer_id))[-1] == (S.DROPPED, "takeover")


async def test_takeover_expires(tmp_path: Path, db: Database) -> None:
    h = await _harness(tmp_path, db, takeover_minutes=1.0)
    old = Message(ANN.peer_id, h.next_id(ANN.peer_id), OWNER, True, 1_000, "давнее")
    await history.upsert_messages(db, [old])
    await h.incoming(ANN, "привет")
    await h.idle()
    assert len(h.transport.sent) == 1
    await h.responder.aclose()


async def test_bots_own_sends_are_not_a_takeover(h: Harness) -> None:
    await h.incoming(ANN, "раз")
    await h.idle()
    own = h.transport.sent[0]
    # Telegram echoes our own message back as an outgoing update.
    echo = Message(ANN.peer_id, own.message_id, OWNER, True, 0, own.text)
    await h.responder.on_message(echo, ANN)
    await h.incoming(ANN, "два")
    await h.idle()
    assert len(h.transport.sent) == 2


async def test_echo_during_send_is_classified_after_send(tmp_path: Path, db: Database) -> None:
    h = await _harness(tmp_path, db)
    gate = asyncio.Event()
    h.transport.hold = gate
    h.transport.hold_after_send = True  # the send happened, its id is not returned yet
    await h.incoming(ANN, "раз")
    await wait_for(lambda: h.transport.sent)
    own = h.transport.sent[0]
    await h.responder.on_message(Message(ANN.peer_id, own.message_id, OWNER, True, 0, "x"), ANN)
    gate.set()
    await h.idle()
    await h.incoming(ANN, "два")
    await h.idle()
    assert len(h.transport.sent) == 2
    await h.responder.aclose()


@pytest.mark.parametrize(
    ("peer", "reason"),
    [
        (user(2001, kind=PeerKind.BOT, is_bot=True), "bot"),
        (user(-3001, kind=PeerKind.GROUP, title="G"), "group"),
        (user(-1000000004001, kind=PeerKind.CHANNEL, title="C"), "channel"),
        (user(OWNER, is_self=True), "saved"),
        (user(5001, is_contact=False), "unknown"),
        (user(6001, is_deleted=True), "deleted"),
    ],
)
async def test_ignored_chats_get_nothing(h: Harness, peer: Any, reason: str) -> None:
    await h.incoming(peer, "эй")
    await h.idle()
    assert h.transport.sent == []
    assert await replies.for_chat(h.db, peer.peer_id) == []


async def test_service_message_is_ignored(h: Harness) -> None:
    await h.incoming(ANN, "", service_action="MessageActionPhoneCall")
    await h.idle()
    assert h.transport.sent == [] and await replies.for_chat(h.db, ANN.peer_id) == []


async def test_unknown_contacts_answered_when_enabled(tmp_path: Path, db: Database) -> None:
    h = await _harness(tmp_path, db, answer_unknown_contacts=True)
    await h.incoming(user(5001, is_contact=False), "здравствуйте")
    await h.idle()
    assert len(h.transport.sent) == 1
    await h.responder.aclose()


async def test_allow_and_deny_lists(tmp_path: Path, db: Database) -> None:
    bob = user(1002, username="Bob")
    eve = user(1003, username="eve", is_contact=False)
    carl = user(1004)
    h = await _harness(tmp_path, db, allow_list="@bob,1003", deny_list="1002")
    for p in (bob, eve, carl):
        await h.incoming(p, "привет")
    await h.idle()
    # bob is allowed but denied (deny wins); eve is allowed though not a contact; carl is not
    # on the allow list.
    assert [s.chat_id for s in h.transport.sent] == [eve.peer_id]
    await h.responder.aclose()


async def test_group_replies_are_opt_in_probability(tmp_path: Path, db: Database) -> None:
    import random

    group = user(-3001, kind=PeerKind.GROUP, title="G")
    h = await _harness(tmp_path, db, group_reply_probability=0.5, rng=random.Random(1))
    # random.Random(1).random() == 0.134… < 0.5 → answered
    await h.incoming(group, "всем привет", sender_id=1001)
    await h.idle()
    assert len(h.transport.sent) == 1
    await h.responder.aclose()


async def test_per_chat_and_global_caps(tmp_path: Path, db: Database) -> None:
    h = await _harness(tmp_path, db, per_chat_hourly_cap=1, global_hourly_cap=2)
    bob, carl = user(1002), user(1003)
    await h.incoming(ANN, "первое")
    await h.idle()
    await h.incoming(ANN, "второе")
    await h.idle()
    assert h.transport.texts(ANN.peer_id) == ["ок, понял"]
    # A full cap postpones the reply until its oldest counted send leaves the hour.
    first, second = await replies.for_chat(db, ANN.peer_id)
    assert (second.status, second.error) == (S.DEFERRED, "per_chat_cap")
    assert second.not_before == first.sent_at + 3600  # type: ignore[operator]
    await h.incoming(bob, "привет")
    await h.idle()
    await h.incoming(carl, "привет")
    await h.idle()
    assert len(h.transport.sent) == 2
    assert await _statuses(db, carl.peer_id) == [(S.DEFERRED, "global_cap")]
    await h.responder.aclose()


async def test_caps_hold_under_concurrency(tmp_path: Path, db: Database) -> None:
    h = await _harness(tmp_path, db, global_hourly_cap=3)
    for i in range(10):
        await h.incoming(user(2000 + i), "привет")
    await h.idle()
    assert len(h.transport.sent) == 3
    await h.responder.aclose()


async def test_quiet_hours_defer_the_reply(tmp_path: Path, db: Database) -> None:
    h = await _harness(tmp_path, db, quiet_hours="00:00-23:59", timezone="UTC")
    await h.incoming(ANN, "не спишь?")
    await h.idle()
    assert h.transport.sent == []
    [reply] = await replies.for_chat(db, ANN.peer_id)
    assert (reply.status, reply.error) == (S.DEFERRED, "quiet_hours")
    assert reply.not_before is not None and reply.not_before > time.time()
    await h.incoming(ANN, "ау")  # more messages extend the same deferred reply
    await h.idle()
    [same] = await replies.for_chat(db, ANN.peer_id)
    assert same.reply_id == reply.reply_id and same.status is S.DEFERRED
    assert same.trigger_message_id > reply.trigger_message_id
    await h.responder.aclose()


async def test_pause_kill_switch_persists(tmp_path: Path, db: Database) -> None:
    await bot_state.set_paused(db, True)
    h = await _harness(tmp_path, db)
    await h.incoming(ANN, "алло")
    await h.idle()
    assert h.transport.sent == []
    assert await _statuses(db, ANN.peer_id) == [(S.DROPPED, "paused")]
    await bot_state.set_paused(db, False)  # e.g. `doppelbot status --resume` from elsewhere
    await h.incoming(ANN, "алло?")
    await h.idle()
    assert len(h.transport.sent) == 1
    await h.responder.aclose()


async def test_chat_mode_off_is_silent(h: Harness) -> None:
    from doppelbot.core.domain import ReplyMode

    await bot_state.set_chat_reply_mode(h.db, ANN.peer_id, ReplyMode.OFF)
    await h.incoming(ANN, "привет")
    await h.idle()
    assert h.transport.sent == [] and await replies.for_chat(h.db, ANN.peer_id) == []


async def test_new_message_during_generation_gives_one_fresh_reply(
    tmp_path: Path, db: Database
) -> None:
    gen = FakeGenerator()
    gen.gate = asyncio.Event()
    h = await _harness(tmp_path, db, gen)
    await h.incoming(ANN, "первое")
    async with asyncio.timeout(5):
        await gen.started.wait()
    await h.incoming(ANN, "второе")
    gen.gate.set()
    await h.idle()
    assert len(h.transport.sent) == 1
    assert [s for s, _ in await _statuses(db, ANN.peer_id)] == [S.DROPPED, S.SENT]
    assert (await _statuses(db, ANN.peer_id))[0][1] == "stale"
    assert "первое" in gen.prompts[-1] and "второе" in gen.prompts[-1]
    await h.responder.aclose()


async def test_new_message_while_queued_row_is_being_claimed(tmp_path: Path, db: Database) -> None:
    """A message that lands while the generation runs but updates the same queued row must
    still be answered (the fresh reply is re-queued)."""
    gen = FakeGenerator()
    gen.delay_s = 0.05
    h = await _harness(tmp_path, db, gen)
    await h.incoming(ANN, "а")
    await asyncio.sleep(0.07)
    await h.incoming(ANN, "б")
    await h.idle()
    statuses = [s for s, _ in await _statuses(db, ANN.peer_id)]
    assert statuses.count(S.SENT) == 1 and statuses[-1] is S.SENT
    assert "б" in gen.prompts[-1]
    await h.responder.aclose()


async def test_failed_generation_sends_nothing_and_bot_keeps_going(
    tmp_path: Path, db: Database
) -> None:
    gen = FakeGenerator()
    gen.fail = GenerationError("worker exploded")
    h = await _harness(tmp_path, db, gen)
    await h.incoming(ANN, "привет")
    await h.idle()
    assert h.transport.sent == []
    [reply] = await replies.for_chat(db, ANN.peer_id)
    assert reply.status is S.FAILED and "GenerationError" in (reply.error or "")
    gen.fail = None
    await h.incoming(ANN, "ещё раз")
    await h.idle()
    assert len(h.transport.sent) == 1
    await h.responder.aclose()


@pytest.mark.parametrize("junk", ["", "   \n  ", "<extra_id_0>"])
async def test_empty_generation_is_never_sent(tmp_path: Path, db: Database, junk: str) -> None:
    h = await _harness(tmp_path, db, FakeGenerator(junk))
    await h.incoming(ANN, "привет")
    await h.idle()
    assert h.transport.sent == []
    assert (await _statuses(db, ANN.peer_id))[0][0] is S.FAILED
    await h.responder.aclose()


async def test_unexpected_generator_exception_is_contained(tmp_path: Path, db: Database) -> None:
    gen = FakeGenerator()
    gen.fail = RuntimeError("secret user text must not be logged")
    h = await _harness(tmp_path, db, gen)
    await h.incoming(ANN, "привет")
    await h.idle()
    [reply] = await replies.for_chat(db, ANN.peer_id)
    assert reply.status is S.FAILED and reply.error == "RuntimeError"
    await h.responder.aclose()


async def test_send_error_fails_the_reply_only(h: Harness) -> None:
    h.transport.fail_sends = 1
    await h.incoming(ANN, "привет")
    await h.idle()
    assert (await _statuses(h.db, ANN.peer_id))[0][0] is S.FAILED
    await h.incoming(ANN, "а теперь?")
    await h.idle()
    assert len(h.transport.sent) == 1


async def test_flood_wait_on_send_is_waited_out(tmp_path: Path, db: Database) -> None:
    clock = InstantClock()
    h = await _harness(tmp_path, db, clock=clock)
    h.transport.flood_waits = [7]
    await h.incoming(ANN, "привет")
    await h.idle()
    assert len(h.transport.sent) == 1
    assert 7 in clock.slept  # type: ignore[attr-defined]
    await h.responder.aclose()


async def test_flood_wait_beyond_bound_fails(tmp_path: Path, db: Database) -> None:
    h = await _harness(tmp_path, db, clock=InstantClock(), flood_wait_max_s=5)
    h.transport.flood_waits = [60]
    await h.incoming(ANN, "привет")
    await h.idle()
    assert h.transport.sent == []
    [reply] = await replies.for_chat(db, ANN.peer_id)
    assert reply.status is S.FAILED and "FloodWaitTooLong" in (reply.error or "")
    await h.responder.aclose()


async def test_human_delay_and_typing_scale(tmp_path: Path, db: Database) -> None:
    clock = InstantClock()
    h = await _harness(
        tmp_path,
        db,
        FakeGenerator("x" * 120),
        clock=clock,
        human_delay_min_s=2.0,
        human_delay_max_s=2.0,
        typing_chars_per_s=10.0,
        typing_max_s=8.0,
    )
    await h.incoming(ANN, "привет")
    await h.idle()
    slept = clock.slept  # type: ignore[attr-defined]
    assert slept[0] == 2.0  # the human pause
    assert sum(slept[1:]) == pytest.approx(8.0)  # 12 s of typing, capped at 8
    assert len(h.transport.typing) == 2  # re-sent before Telegram's 5 s run out
    await h.responder.aclose()


async def test_slow_chat_does_not_delay_others(tmp_path: Path, db: Database) -> None:
    class Selective(FakeGenerator):
        async def generate(self, prompt: str, options: Any) -> str:
            if "медленно" in prompt:
                await asyncio.Event().wait()  # never finishes
            return await super().generate(prompt, options)

    h = await _harness(tmp_path, db, Selective())
    await h.incoming(ANN, "медленно")
    await asyncio.sleep(0.1)
    bob = user(1002)
    await h.incoming(bob, "быстро")
    await wait_for(lambda: h.transport.sent, 3)
    assert h.transport.sent[0].chat_id == bob.peer_id
    await h.responder.aclose()


async def test_twenty_chats_each_answered_once(h: Harness) -> None:
    peers = [user(3000 + i) for i in range(20)]
    await asyncio.gather(*(h.incoming(p, f"привет {i}") for i, p in enumerate(peers)))
    await h.idle()
    assert sorted(s.chat_id for s in h.transport.sent) == sorted(p.peer_id for p in peers)


async def test_facts_in_prompt_and_fallback(tmp_path: Path, db: Database) -> None:
    facts = FakeFacts([ScoredFact(1, "Я живу в Казани", 0.8)], reply_score=0.2)
    h = await _harness(tmp_path, db, facts=facts, fact_fallback=True)
    await h.incoming(ANN, "где ты живёшь?")
    await h.idle()
    assert "Я живу в Казани" in h.generator.prompts[0]
    assert facts.queries == ["где ты живёшь?"]
    assert h.transport.texts() == ["Я живу в Казани"]
    await h.responder.aclose()


async def test_generated_reply_kept_when_better_than_fact(tmp_path: Path, db: Database) -> None:
    facts = FakeFacts([ScoredFact(1, "Я живу в Казани", 0.5)], reply_score=0.9)
    h = await _harness(tmp_path, db, facts=facts, fact_fallback=True)
    await h.incoming(ANN, "как дела?")
    await h.idle()
    assert h.transport.texts() == ["ок, понял"]
    await h.responder.aclose()


# --- crash safety ------------------------------------------------------------------------------
async def test_crash_after_generation_before_send_sends_once_on_restart(
    tmp_path: Path, db: Database
) -> None:
    h = await _harness(tmp_path, db)
    h.transport.hold = asyncio.Event()  # the send never completes: the process "dies"
    await h.incoming(ANN, "привет")
    await wait_for(lambda: replies.with_status(db, [S.SENDING]))
    await h.responder.aclose()
    assert h.transport.sent == []
    [reply] = await replies.for_chat(db, ANN.peer_id)
    assert reply.status is S.SENDING

    transport = FakeTransport()
    again = make_responder(h.settings, db, transport, FakeGenerator("другое"))
    await again.start()
    async with asyncio.timeout(10):
        await again.wait_idle()
    assert transport.texts() == ["ок, понял"]  # the stored reply, not a new generation
    [reply] = await replies.for_chat(db, ANN.peer_id)
    assert reply.status is S.SENT and len(reply.sent_message_ids) == 1
    # A second restart finds nothing to do.
    third = make_responder(h.settings, db, transport, FakeGenerator())
    await third.start()
    async with asyncio.timeout(10):
        await third.wait_idle()
    assert len(transport.sent) == 1
    await again.aclose()
    await third.aclose()


async def test_crash_after_send_before_record_never_resends(tmp_path: Path, db: Database) -> None:
    h = await _harness(tmp_path, db)
    h.transport.hold = asyncio.Event()
    h.transport.hold_after_send = True  # reached Telegram, the process died before recording
    await h.incoming(ANN, "привет")
    await wait_for(lambda: h.transport.sent)
    await h.responder.aclose()
    [reply] = await replies.for_chat(db, ANN.peer_id)
    assert reply.status is S.SENDING and reply.sent_message_ids == ()

    h.transport.hold = None
    again = make_responder(h.settings, db, h.transport, FakeGenerator())
    await again.start()
    async with asyncio.timeout(10):
        await again.wait_idle()
    assert len(h.transport.sent) == 1
    [reply] = await replies.for_chat(db, ANN.peer_id)
    assert reply.status is S.SENT
    assert reply.sent_message_ids == (h.transport.sent[0].message_id,)
    await again.aclose()


async def test_crash_mid_multipart_sends_only_the_rest(tmp_path: Path, db: Database) -> None:
    h = await _harness(tmp_path, db, FakeGenerator("раз\nдва\nтри"))

    class DiesOnSecond(FakeTransport):
        async def send_message(self, chat_id: int, text: str, **kw: Any) -> Message:
            if text == "два":
                await asyncio.Event().wait()
            return await super().send_message(chat_id, text, **kw)

    dying = DiesOnSecond()
    h.responder.transport = dying
    await h.incoming(ANN, "посчитай")
    await wait_for(lambda: dying.sent)
    await asyncio.sleep(0.05)
    await h.responder.aclose()
    fresh = FakeTransport()
    fresh.outgoing = dying.outgoing
    fresh._next_id = dying._next_id
    again = make_responder(h.settings, db, fresh, FakeGenerator())
    await again.start()
    async with asyncio.timeout(10):
        await again.wait_idle()
    assert fresh.texts() == ["два", "три"]
    [reply] = await replies.for_chat(db, ANN.peer_id)
    assert reply.status is S.SENT and len(reply.sent_message_ids) == 3
    await again.aclose()


async def test_interrupted_generation_is_requeued(tmp_path: Path, db: Database) -> None:
    gen = FakeGenerator()
    gen.gate = asyncio.Event()  # never released: shut down mid-generation
    h = await _harness(tmp_path, db, gen)
    await h.incoming(ANN, "привет")
    async with asyncio.timeout(5):
        await gen.started.wait()
    await h.responder.aclose()
    assert (await replies.for_chat(db, ANN.peer_id))[0].status is S.GENERATING
    again = make_responder(h.settings, db, h.transport, FakeGenerator())
    await again.start()
    async with asyncio.timeout(10):
        await again.wait_idle()
    assert len(h.transport.sent) == 1
    assert [r.status for r in await replies.for_chat(db, ANN.peer_id)] == [S.SENT]
    await again.aclose()


async def test_stale_interrupted_send_is_replaced_by_fresh_reply(
    tmp_path: Path, db: Database
) -> None:
    h = await _harness(tmp_path, db)
    h.transport.hold = asyncio.Event()
    await h.incoming(ANN, "первое")
    await wait_for(lambda: replies.with_status(db, [S.SENDING]))
    await h.responder.aclose()
    # While the bot was down another message was stored (e.g. by the next run's catch-up).
    newer = Message(ANN.peer_id, h.next_id(ANN.peer_id), ANN.peer_id, False, 0, "второе")
    await history.upsert_messages(db, [newer])
    h.transport.hold = None
    gen = FakeGenerator("свежий ответ")
    again = make_responder(h.settings, db, h.transport, gen)
    await again.start()
    async with asyncio.timeout(10):
        await again.wait_idle()
    assert h.transport.texts() == ["свежий ответ"]
    assert [(r.status, r.error) for r in await replies.for_chat(db, ANN.peer_id)] == [
        (S.DROPPED, "stale"),
        (S.SENT, None),
    ]
    await again.aclose()


async def test_shutdown_is_clean_with_pending_timers(h: Harness) -> None:
    await h.incoming(ANN, "привет")
    await h.responder.aclose()
    assert not h.responder.busy
    [reply] = await replies.for_chat(h.db, ANN.peer_id)
    assert reply.status is S.QUEUED  # picked up by the next start, not lost


# --- review mode hooks (the Saved Messages cards are built on these) ---------------------------
class Drafts:
    def __init__(self) -> None:
        self.got: list[tuple[Reply, LiveContext]] = []

    async def draft_ready(self, reply: Reply, context: LiveContext) -> None:
        self.got.append((reply, context))


async def test_review_mode_drafts_then_sends_on_approval(tmp_path: Path, db: Database) -> None:
    drafts = Drafts()
    h = await _harness(tmp_path, db, reply_mode="review", drafts=drafts)
    await h.incoming(ANN, "привет")
    await h.idle()
    assert h.transport.sent == []
    [(reply, context)] = drafts.got
    assert reply.status is S.AWAITING_REVIEW and reply.draft_text == "ок, понял"
    assert context.query == "привет"
    h.generator.reply = "второй вариант"
    await h.responder.regenerate(reply.reply_id)
    assert drafts.got[-1][0].draft_text == "второй вариант"
    assert await h.responder.send_approved(reply.reply_id, "исправлено") is Approval.SENT
    assert await h.responder.send_approved(reply.reply_id) is Approval.NOT_WAITING  # never twice
    assert h.transport.texts() == ["исправлено"]
    stored = await replies.get(db, reply.reply_id)
    assert stored is not None and stored.status is S.SENT and stored.final_text == "исправлено"
    await h.responder.aclose()


async def test_status_rows_have_no_texts_in_logs(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="doppelbot")
    await h.incoming(ANN, "секретное сообщение")
    await h.idle()
    assert "секретное" not in caplog.text and "ок, понял" not in caplog.text
    assert "reply sent" in caplog.text
    [reply] = await replies.for_chat(h.db, ANN.peer_id)
    raw = await h.db.scalar(
        "SELECT sent_message_ids FROM replies WHERE reply_id = ?", (reply.reply_id,)
    )
    assert json.loads(raw) == list(reply.sent_message_ids)


async def test_prompt_is_trimmed_to_the_token_budget(tmp_path: Path, db: Database) -> None:
    counted: list[str] = []

    def count(text: str) -> int:  # one "token" per character: easy to reason about
        counted.append(text)
        return len(text)

    h = await _harness(tmp_path, db, max_input_tokens=260, context_max_chars=2000)
    h.responder.composer.count_tokens = count
    now = int(time.time())
    older = []
    for i in range(5):  # an earlier exchange of the same session (the owner wrote long ago)
        older.append(
            Message(
                ANN.peer_id,
                h.next_id(0),
                ANN.peer_id,
                False,
                now - 3000 + 200 * i,
                f"длинное сообщение номер {i} " + "слово " * 8,
            )
        )
        older.append(
            Message(ANN.peer_id, h.next_id(0), OWNER, True, now - 2950 + 200 * i, f"ответ {i}")
        )
    await history.upsert_messages(db, older)
    await h.incoming(ANN, "длинное сообщение номер 5 " + "слово " * 8)
    await h.idle()
    [prompt] = h.generator.prompts
    assert counted, "the budget was never checked"
    assert len(prompt) <= 260
    assert "номер 5" in prompt and "номер 0" not in prompt
    await h.responder.aclose()


async def test_shutdown_lets_a_send_in_progress_finish(tmp_path: Path, db: Database) -> None:
    class SlowSend(FakeTransport):
        async def send_message(self, chat_id: int, text: str, **kw: Any) -> Message:
            await asyncio.sleep(0.2)
            return await super().send_message(chat_id, text, **kw)

    settings = fast_settings(tmp_path, shutdown_grace_s=3.0)
    transport = SlowSend()
    responder = make_responder(settings, db, transport, FakeGenerator())
    await responder.start()
    h = Harness(db, settings, transport, FakeGenerator(), responder)
    await h.incoming(ANN, "привет")
    await wait_for(lambda: replies.with_status(db, [S.SENDING]))
    await responder.aclose()
    assert len(transport.sent) == 1
    assert [r.status for r in await replies.for_chat(db, ANN.peer_id)] == [S.SENT]


class ShiftedClock(Clock):
    """Wall time moved by ``offset`` seconds (sleeping is real)."""

    def __init__(self, offset: float) -> None:
        object.__setattr__(self, "offset", offset)

    def time(self) -> float:
        return time.time() + self.offset  # type: ignore[attr-defined]


class NoSpread:
    """An rng whose random pause is always its lower bound (deterministic timing)."""

    def uniform(self, a: float, b: float) -> float:
        return a

    def random(self) -> float:
        return 0.0


async def test_a_reply_deferred_by_quiet_hours_goes_out_when_they_end(
    tmp_path: Path, db: Database
) -> None:
    import datetime as dt

    # Pretend it is 07:59:59 UTC, quiet hours end at 08:00.
    now = dt.datetime.now(dt.UTC)
    target = now.replace(hour=7, minute=59, second=59, microsecond=0)
    clock = ShiftedClock(target.timestamp() - now.timestamp())
    h = await _harness(
        tmp_path,
        db,
        quiet_hours="22:00-08:00",
        timezone="UTC",
        clock=clock,
        rng=NoSpread(),
    )
    await h.incoming(ANN, "ты спишь?", date=int(clock.time()))
    await h.idle()
    [reply] = await replies.for_chat(db, ANN.peer_id)
    assert (reply.status, reply.error) == (S.DEFERRED, "quiet_hours")
    assert reply.not_before is not None and 0 < reply.not_before - clock.time() <= 1.5
    assert h.transport.sent == [] and h.generator.prompts == []
    await wait_for(lambda: h.transport.sent, 5)  # the window opened: generated and sent now
    await h.idle()
    assert h.transport.texts() == ["ок, понял"]
    assert await _statuses(db, ANN.peer_id) == [(S.SENT, None)]
    await h.responder.aclose()


async def test_a_deferred_reply_older_than_the_catch_up_age_is_dropped_visibly(
    tmp_path: Path, db: Database
) -> None:
    h = await _harness(tmp_path, db, per_chat_hourly_cap=0, catch_up_max_age="1s")
    await h.incoming(ANN, "привет")
    await h.idle()
    [reply] = await replies.for_chat(db, ANN.peer_id)
    assert reply.status is S.DEFERRED
    await asyncio.sleep(1.2)
    # The window "opens" (forced here: the cap of 0 would keep it closed for an hour).
    await h.responder._resume_deferred(ANN.peer_id, force=True)
    assert await _statuses(db, ANN.peer_id) == [(S.DROPPED, "too_old")]
    assert h.transport.sent == []
    await h.responder.aclose()


async def test_deferred_replies_are_rearmed_after_a_restart(tmp_path: Path, db: Database) -> None:
    h = await _harness(tmp_path, db, per_chat_hourly_cap=0)
    await h.incoming(ANN, "привет")
    await h.idle()
    await h.responder.aclose()
    h2 = await _harness(tmp_path, db, per_chat_hourly_cap=0)
    assert h2.responder._wakeups.pending(ANN.peer_id)
    [reply] = await replies.for_chat(db, ANN.peer_id)
    assert reply.status is S.DEFERRED and reply.not_before is not None
    await h2.responder.aclose()


async def test_a_message_seen_twice_is_answered_once(h: Harness) -> None:
    msg = await h.incoming(ANN, "привет")
    await h.idle()
    await h.responder.on_message(msg, ANN)  # an update delivered again after a restart
    await h.idle()
    assert len(h.transport.sent) == 1
    assert await _statuses(h.db, ANN.peer_id) == [(S.SENT, None)]

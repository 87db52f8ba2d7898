"""The fake Telegram itself: its paging matches a brute-force model of Telegram's rules, and
what it answers is what Telethon gets from real TL bytes. Other tests build on it."""

from __future__ import annotations

import asyncio
import random

import pytest
from telethon import errors, events
from telethon.tl import functions, types

from tests.faketg import OWNER_ID, FakeTelegram, _Generated


def _model(ids: list[int], offset_id: int, add_offset: int, limit: int, max_id: int, min_id: int):
    """messages.getHistory as Telegram documents it, by brute force (newest first)."""
    desc = sorted(ids, reverse=True)
    pos = next((i for i, x in enumerate(desc) if x < offset_id), len(desc)) if offset_id else 0
    start = pos + add_offset
    window = [desc[i] for i in range(max(0, start), max(0, start + limit)) if i < len(desc)]
    return [i for i in window if (not max_id or i < max_id) and (not min_id or i > min_id)]


async def test_history_paging_matches_telegram_rules() -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    other = tg.add_user("Other")
    for i in range(150):  # interleave two chats: account-wide ids have holes per chat
        tg.add_message(alice if i % 3 else other, f"m{i}")
    ids = [m.id for m in tg.messages(alice)]
    client = tg.client(receive_updates=False)
    await client.connect()
    rnd = random.Random(7)
    try:
        for _ in range(60):
            offset_id = rnd.choice([0, *ids, ids[-1] + 5])
            add_offset = rnd.choice([0, -10, -100, 5, -1])
            limit = rnd.choice([1, 10, 100])
            max_id = rnd.choice([0, 0, rnd.choice(ids)])
            min_id = rnd.choice([0, 0, rnd.choice(ids)])
            r = await client(
                functions.messages.GetHistoryRequest(
                    peer=alice,
                    offset_id=offset_id,
                    offset_date=None,
                    add_offset=add_offset,
                    limit=limit,
                    max_id=max_id,
                    min_id=min_id,
                    hash=0,
                )
            )
            got = [m.id for m in r.messages]
            assert got == _model(ids, offset_id, add_offset, limit, max_id, min_id)
            assert r.count == len(ids) if isinstance(r, types.messages.MessagesSlice) else True
    finally:
        await client.disconnect()


async def test_telethon_iterators_walk_the_fake() -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice", username="alice")
    tg.add_history(alice, 260)
    group = tg.add_channel("Team")
    tg.add_history(group, 30, sender=alice)
    client = tg.client()
    await client.start()
    try:
        names = [d.name async for d in client.iter_dialogs()]
        assert set(names) == {"Alice", "Team"}
        newest_first = [m.id async for m in client.iter_messages(alice, wait_time=0)]
        assert len(newest_first) == 260 and newest_first == sorted(newest_first, reverse=True)
        tail = [
            m.id async for m in client.iter_messages(alice, min_id=newest_first[10], wait_time=0)
        ]
        assert tail == newest_first[:10]
        oldest_first = [
            m.id
            async for m in client.iter_messages(
                alice, reverse=True, min_id=newest_first[-5], wait_time=0
            )
        ]
        assert oldest_first == sorted(newest_first)[5:]
        assert (await client.get_entity("@alice")).id == alice.id
    finally:
        await client.disconnect()


async def test_generated_history_bytes_equal_real_messages() -> None:
    tg = FakeTelegram()
    bob = tg.add_user("Bob")
    ids = tg.add_generated_history(bob, 120, out_every=3)
    gen = tg._chat(bob).gen
    assert isinstance(gen, _Generated)
    for index in (0, 1, 2, 119):
        expected = _Generated.message(
            types.PeerUser(bob.id),
            ids[index],
            gen.dates[index],
            gen.text.format(i=f"{index:08d}"),
            gen.is_out(index),
        )
        assert gen.raw(index) == bytes(expected)
    # The page builder agrees with the one-message form (a "%" in the text included).
    assert [r.data for r in gen.raws(ids)] == [gen.raw(i) for i in range(120)]
    pct = tg.add_user("Pct")
    pct_ids = tg.add_generated_history(pct, 5, text="100% {i} %s")
    pct_gen = tg._chat(pct).gen
    assert pct_gen is not None
    assert [r.data for r in pct_gen.raws(pct_ids)] == [pct_gen.raw(i) for i in range(5)]
    client = tg.client(receive_updates=False)
    await client.connect()
    try:
        msgs = [m async for m in client.iter_messages(bob, wait_time=0)]
        assert [m.id for m in msgs] == list(reversed(ids))
        assert sum(m.out for m in msgs) == 40 and msgs[-1].message.startswith("msg 00000000")
    finally:
        await client.disconnect()


async def test_rpc_errors_are_real_and_injectable() -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    tg.add_history(alice, 5)
    client = tg.client(receive_updates=False, flood_sleep_threshold=0)
    await client.connect()
    try:
        tg.fail_next("GetHistoryRequest", "FLOOD_WAIT_42", after=1)
        assert len(await client.get_messages(alice, limit=2)) == 2  # the first call passes
        with pytest.raises(errors.FloodWaitError) as info:
            await client.get_messages(alice, limit=2)
        assert info.value.seconds == 42
        client._flood_waited_requests.clear()
        tg.fail_next(functions.account.InitTakeoutSessionRequest, "TAKEOUT_INIT_DELAY_3600")
        with pytest.raises(errors.TakeoutInitDelayError) as delay:
            async with client.takeout(users=True):
                pass
        assert delay.value.seconds == 3600
        tg.fail_next("GetHistoryRequest", RuntimeError("crash"), peer=alice.id)
        with pytest.raises(RuntimeError, match="crash"):
            await client.get_messages(alice, limit=1)
        bad = types.InputPeerUser(alice.id, alice.access_hash + 1)
        with pytest.raises(errors.PeerIdInvalidError):
            await client.get_messages(bad, limit=1)
    finally:
        await client.disconnect()


async def test_unauthorised_client_and_login_with_2fa() -> None:
    tg = FakeTelegram()
    tg.password = "hunter2"
    client = tg.client(authorized=False, receive_updates=False)
    await client.connect()
    try:
        assert not await client.is_user_authorized()
        await client.send_code_request("+70000000000")
        with pytest.raises(errors.SessionPasswordNeededError):
            await client.sign_in("+70000000000", code=tg.login_code)
        with pytest.raises(errors.PasswordHashInvalidError):
            await client.sign_in(password="wrong")
        me = await client.sign_in(password="hunter2")
        assert me.id == OWNER_ID and await client.is_user_authorized()
    finally:
        await client.disconnect()


async def test_pushed_updates_reach_handlers_and_sends_are_recorded() -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    group = tg.add_channel("Team")
    tg.add_history(alice, 3)
    tg.add_history(group, 3, sender=alice)
    client = tg.client()
    seen: list[tuple[str, int, str]] = []

    async def on_new(event: events.NewMessage.Event) -> None:
        seen.append(("new", event.chat_id, event.raw_text))

    async def on_edit(event: events.MessageEdited.Event) -> None:
        seen.append(("edit", event.chat_id, event.raw_text))

    client.add_event_handler(on_new, events.NewMessage())
    client.add_event_handler(on_edit, events.MessageEdited())
    await client.start()
    try:
        incoming = tg.push_incoming(alice, "hello")
        tg.push_group_message(group, alice, "hi all")
        tg.push_outgoing(alice, "from my phone")
        tg.push_edit(alice, incoming.id, "hello (edited)")
        await tg.settle()
        await asyncio.sleep(0.05)
        assert ("new", alice.id, "hello") in seen
        assert ("new", tg.marked_id(group), "hi all") in seen
        assert ("new", alice.id, "from my phone") in seen
        assert ("edit", alice.id, "hello (edited)") in seen
        sent = await client.send_message(alice, "answer", reply_to=incoming.id)
        async with client.action(alice, "typing"):
            await asyncio.sleep(0.01)
        await client(
            functions.messages.SendReactionRequest(
                peer=alice, msg_id=incoming.id, reaction=[types.ReactionEmoji(emoticon="👍")]
            )
        )
        assert tg.reactions_sent == [(alice.id, incoming.id, ["👍"])]
        assert tg.sent[-1].text == "answer" and tg.sent[-1].reply_to == incoming.id
        assert tg.sent[-1].message_id == sent.id
        assert (alice.id, "SendMessageTypingAction") in tg.actions
        assert tg.messages(alice)[-1].message == "answer"
    finally:
        await client.disconnect()

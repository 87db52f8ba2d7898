"""``doppelbot run`` end to end: the real Telethon client, its update loop and requests, against
the in-process fake Telegram (only the MTProto sender is replaced), the live adapter, the
responder and the store — with a tiny model worker generating the replies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from doppelbot.app import App
from doppelbot.config import GenerationOptions
from doppelbot.core.domain import ReplyStatus
from doppelbot.core.errors import GenerationError
from doppelbot.core.ports import ModelIdentity, ReplyGenerator
from doppelbot.store import bot_state, history, replies
from doppelbot.store.database import Database
from tests.faketg import OWNER_ID, FakeTelegram
from tests.live_harness import Patch, Run, start_bot
from tests.responder_fakes import fast_settings, wait_for

S = ReplyStatus


class Wrapped:
    """Delegates to a real generator; can hold generations or make them fail."""

    def __init__(self, inner: ReplyGenerator) -> None:
        self.inner = inner
        self.gate: asyncio.Event | None = None
        self.fail: BaseException | None = None
        self.started = asyncio.Event()
        self.prompts: list[str] = []

    @property
    def identity(self) -> ModelIdentity:
        return self.inner.identity

    async def generate(self, prompt: str, options: GenerationOptions) -> str:
        self.prompts.append(prompt)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return await self.inner.generate(prompt, options)


@pytest.fixture(scope="module")
def tiny_reply_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny random FRED-T5-shaped model, loaded (int8, like serving) once per module."""
    from doppelbot.config import load_settings
    from doppelbot.model.loader import load_reply_model, model_spec
    from tests.tiny_model import make_tiny_model_dir

    root = tmp_path_factory.mktemp("tiny-reply-model")
    model_dir = make_tiny_model_dir(root / "model")
    settings = load_settings(env_file=None, data_dir=root / "data", model=str(model_dir))
    return load_reply_model(model_spec(settings))


@pytest.fixture
async def model(tiny_reply_model: Any) -> AsyncIterator[ReplyGenerator]:
    """The real model worker thread serving the tiny model."""
    from doppelbot.config import ModelSettings
    from doppelbot.model.worker import ModelWorker

    worker = ModelWorker(tiny_reply_model, settings=ModelSettings(generation_timeout_s=30))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.aclose()


@asynccontextmanager
async def live_bot(
    tmp_path: Path,
    db: Database,
    generator: ReplyGenerator,
    *,
    tg: FakeTelegram | None = None,
    patch: Patch | None = None,
    **overrides: Any,
) -> AsyncIterator[Run]:
    tg = tg or FakeTelegram()
    # Greedy and short: the random tiny model then says the same non-empty thing every time.
    overrides = {"do_sample": False, "max_new_tokens": 12, **overrides}
    gen = generator if isinstance(generator, Wrapped) else Wrapped(generator)
    # The responder alone: no copies of auto replies in Saved Messages, so every message the
    # fake Telegram receives is a reply (the review has its own tests).
    async with start_bot(
        tg, fast_settings(tmp_path, **overrides), gen, db=db, review=False, patch=patch
    ) as live:
        yield live


async def test_dm_typing_then_reply_sent_and_stored(
    tmp_path: Path, db: Database, model: ReplyGenerator
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice", username="alice")
    async with live_bot(tmp_path, db, model, tg=tg) as live:
        incoming = tg.push_incoming(alice, "Привет! Как дела?")
        await live.quiet()
        [sent] = tg.sent
        assert sent.chat_id == alice.id and sent.text.strip()
        typing = tg.actions.index((alice.id, "SendMessageTypingAction"))
        assert typing >= 0
        [reply] = await replies.for_chat(db, alice.id)
        assert reply.status is S.SENT and reply.sent_message_ids == (sent.message_id,)
        assert reply.trigger_message_id == incoming.id
        assert reply.model_id == model.identity.model_id
        stored_in = await history.get_message(db, alice.id, incoming.id)
        stored_out = await history.get_message(db, alice.id, sent.message_id)
        assert stored_in is not None and stored_in.text == "Привет! Как дела?"
        assert stored_out is not None and stored_out.is_outgoing
        assert "Привет! Как дела?" in live.gen.prompts[0]
        peer = await history.get_peer(db, alice.id)
        assert peer is not None and peer.username == "alice"


async def test_burst_of_five_gets_exactly_one_reply(
    tmp_path: Path, db: Database, model: ReplyGenerator
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    async with live_bot(tmp_path, db, model, tg=tg, debounce_s=0.2) as live:
        for i in range(5):
            tg.push_incoming(alice, f"сообщение номер {i}")
            await tg.settle()
            await asyncio.sleep(0.02)
        await live.quiet()
        assert len(live.sent_to(alice)) >= 1
        assert [r.status for r in await replies.for_chat(db, alice.id)] == [S.SENT]
        assert len(live.gen.prompts) == 1
        assert all(f"сообщение номер {i}" in live.gen.prompts[0] for i in range(5))
        assert sum(1 for s in tg.sent if s.chat_id == alice.id) == len(
            (await replies.for_chat(db, alice.id))[0].sent_message_ids
        )


async def test_owner_writing_keeps_bot_silent(
    tmp_path: Path, db: Database, model: ReplyGenerator
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    async with live_bot(tmp_path, db, model, tg=tg, debounce_s=0.2) as live:
        tg.push_incoming(alice, "ты где?")
        await tg.settle()
        tg.push_outgoing(alice, "уже иду")  # the owner, from the phone
        await live.quiet()
        tg.push_incoming(alice, "ок, жду")
        await live.quiet()
        assert tg.sent == []
        assert [(r.status, r.error) for r in await replies.for_chat(db, alice.id)] == [
            (S.DROPPED, "takeover"),
            (S.DROPPED, "takeover"),
        ]
        owner_msg = await history.recent_messages(db, alice.id)
        assert [m.is_outgoing for m in owner_msg] == [False, True, False]


async def test_groups_channels_bots_and_saved_messages_are_ignored(
    tmp_path: Path, db: Database, model: ReplyGenerator
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    botty = tg.add_user("Botty", bot=True)
    group = tg.add_group("Friends", members=[alice])
    supergroup = tg.add_channel("Chat", megagroup=True)
    channel = tg.add_channel("News", megagroup=False)
    async with live_bot(tmp_path, db, model, tg=tg) as live:
        tg.push_incoming(botty, "/start")
        tg.push_group_message(group, alice, "всем привет")
        tg.push_group_message(supergroup, alice, "и тут привет")
        tg.push_group_message(channel, None, "новости")
        tg.push_outgoing(tg.me, "заметка себе")  # Saved Messages
        await live.quiet()
        assert tg.sent == []
        assert await db.scalar("SELECT count(*) FROM replies") == 0
        # Only private chats with people are kept in the store (none here).
        assert await db.scalar("SELECT count(*) FROM messages") == 0
        tg.push_incoming(alice, "а мне ответишь?")
        await live.quiet()
        assert len(live.sent_to(alice)) >= 1


async def test_allow_and_deny_lists(tmp_path: Path, db: Database, model: ReplyGenerator) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice", username="alice")
    bob = tg.add_user("Bob", username="bob")
    carol = tg.add_user("Carol", username="carol", contact=False)
    async with live_bot(
        tmp_path, db, model, tg=tg, allow_list=f"@alice,{carol.id}", deny_list="@Alice"
    ) as live:
        for user in (alice, bob, carol):
            tg.push_incoming(user, "привет")
        await live.quiet()
        assert {s.chat_id for s in tg.sent} == {carol.id}


async def test_unknown_contacts_not_answered_by_default(
    tmp_path: Path, db: Database, model: ReplyGenerator
) -> None:
    tg = FakeTelegram()
    stranger = tg.add_user("Stranger", contact=False)
    async with live_bot(tmp_path, db, model, tg=tg) as live:
        tg.push_incoming(stranger, "здравствуйте, купите слона")
        await live.quiet()
        assert tg.sent == []


async def test_caps_and_quiet_hours(tmp_path: Path, db: Database, model: ReplyGenerator) -> None:
    tg = FakeTelegram()
    alice, bob = tg.add_user("Alice"), tg.add_user("Bob")
    async with live_bot(tmp_path, db, model, tg=tg, per_chat_hourly_cap=1) as live:
        tg.push_incoming(alice, "раз")
        await live.quiet()
        tg.push_incoming(alice, "два")
        await live.quiet()
        assert [(r.status, r.error) for r in await replies.for_chat(db, alice.id)] == [
            (S.SENT, None),
            (S.DEFERRED, "per_chat_cap"),
        ]
        assert len({s.message_id for s in tg.sent}) == len(live.sent_to(alice))
    async with live_bot(
        tmp_path, db, model, tg=tg, quiet_hours="00:00-23:59", timezone="Europe/Moscow"
    ) as live:
        tg.push_incoming(bob, "не спишь?")
        await live.quiet()
        assert live.sent_to(bob) == []
        assert [(r.status, r.error) for r in await replies.for_chat(db, bob.id)] == [
            (S.DEFERRED, "quiet_hours")
        ]


async def test_pause_survives_restart(tmp_path: Path, db: Database, model: ReplyGenerator) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    await bot_state.set_paused(db, True)
    async with live_bot(tmp_path, db, model, tg=tg) as live:
        tg.push_incoming(alice, "алло")
        await live.quiet()
        assert tg.sent == []
        await bot_state.set_paused(db, False)
        tg.push_incoming(alice, "алло!")
        await live.quiet()
        assert len(live.sent_to(alice)) >= 1


async def _hang_forever(*args: Any, **kwargs: Any) -> Any:
    await asyncio.Event().wait()


async def test_crash_after_generation_before_send_then_restart_sends_once(
    tmp_path: Path, db: Database, model: ReplyGenerator
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")

    async def no_send(session: App) -> None:
        session.transport.send_message = _hang_forever  # type: ignore[method-assign]

    async with live_bot(tmp_path, db, model, tg=tg, patch=no_send) as live:
        tg.push_incoming(alice, "привет, ответь")
        await wait_for(lambda: replies.with_status(db, [S.SENDING]))
    # The bot died between generation and send: the reply is 'sending', nothing reached Telegram.
    assert tg.sent == []
    [pending] = await replies.for_chat(db, alice.id)
    assert pending.status is S.SENDING and pending.final_text
    async with live_bot(tmp_path, db, model, tg=tg) as live:
        await live.quiet()
        assert [s.text for s in tg.sent] == pending.final_text.split("\n")
    async with live_bot(tmp_path, db, model, tg=tg) as live:  # and never again
        await live.quiet()
    assert len(tg.sent) == len(pending.final_text.split("\n"))
    [done] = await replies.for_chat(db, alice.id)
    assert done.status is S.SENT and len(done.sent_message_ids) == len(tg.sent)


async def test_crash_after_send_before_record_is_not_resent(
    tmp_path: Path, db: Database, model: ReplyGenerator
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")

    async def send_then_die(session: App) -> None:
        real = session.transport.send_message

        async def patched(*args: Any, **kwargs: Any) -> Any:
            await real(*args, **kwargs)
            await asyncio.Event().wait()

        session.transport.send_message = patched  # type: ignore[method-assign]

    async with live_bot(tmp_path, db, model, tg=tg, patch=send_then_die, split_lines=False):
        tg.push_incoming(alice, "привет")
        await wait_for(lambda: tg.sent)
    [pending] = await replies.for_chat(db, alice.id)
    assert pending.status is S.SENDING and pending.sent_message_ids == ()
    async with live_bot(tmp_path, db, model, tg=tg, split_lines=False) as live:
        await live.quiet()
    assert len(tg.sent) == 1
    [done] = await replies.for_chat(db, alice.id)
    assert done.status is S.SENT and done.sent_message_ids == (tg.sent[0].message_id,)


async def test_new_message_during_generation_gives_one_fresh_reply(
    tmp_path: Path, db: Database, model: ReplyGenerator
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    gen = Wrapped(model)
    gen.gate = asyncio.Event()
    async with live_bot(tmp_path, db, gen, tg=tg) as live:
        tg.push_incoming(alice, "первый вопрос")
        async with asyncio.timeout(10):
            await gen.started.wait()
        tg.push_incoming(alice, "и второй вопрос")
        await tg.settle()
        gen.gate.set()
        await live.quiet()
        rows = await replies.for_chat(db, alice.id)
        assert [(r.status, r.error) for r in rows] == [(S.DROPPED, "stale"), (S.SENT, None)]
        assert len(tg.sent) == len(rows[1].sent_message_ids)
        assert "первый вопрос" in gen.prompts[-1] and "и второй вопрос" in gen.prompts[-1]


async def test_worker_raising_sends_nothing_and_bot_keeps_running(
    tmp_path: Path, db: Database, model: ReplyGenerator
) -> None:
    tg = FakeTelegram()
    alice, bob = tg.add_user("Alice"), tg.add_user("Bob")
    gen = Wrapped(model)
    gen.fail = GenerationError("the worker crashed")
    async with live_bot(tmp_path, db, gen, tg=tg) as live:
        tg.push_incoming(alice, "привет")
        await live.quiet()
        assert tg.sent == []
        assert [r.status for r in await replies.for_chat(db, alice.id)] == [S.FAILED]
        gen.fail = None
        tg.push_incoming(bob, "привет")
        await live.quiet()
        assert len(live.sent_to(bob)) >= 1
        assert not live.task.done()


async def test_flood_wait_on_send_is_waited_out(
    tmp_path: Path, db: Database, model: ReplyGenerator
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    async with live_bot(tmp_path, db, model, tg=tg, split_lines=False) as live:
        tg.fail_next("SendMessageRequest", "FLOOD_WAIT_1")
        tg.push_incoming(alice, "привет")
        await live.quiet()
        assert tg.calls["SendMessageRequest"] == 2
        assert len(tg.sent) == 1
        assert [r.status for r in await replies.for_chat(db, alice.id)] == [S.SENT]


async def test_edits_are_stored(tmp_path: Path, db: Database, model: ReplyGenerator) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    async with live_bot(tmp_path, db, model, tg=tg, reply_mode="off") as live:
        msg = tg.push_incoming(alice, "опечатка")
        await live.quiet()
        tg.push_edit(alice, msg.id, "исправлено")
        await live.quiet()
        stored = await history.get_message(db, alice.id, msg.id)
        assert stored is not None and stored.text == "исправлено" and stored.edit_date
        assert tg.sent == []


@pytest.mark.slow
async def test_twenty_chats_at_once_each_answered_once_loop_stays_responsive(
    tmp_path: Path, db: Database, model: ReplyGenerator
) -> None:
    tg = FakeTelegram()
    users = [tg.add_user(f"User{i}") for i in range(20)]
    async with live_bot(tmp_path, db, model, tg=tg, debounce_s=0.3) as live:
        for round_ in range(3):
            for user in users:
                tg.push_incoming(user, f"сообщение {round_} от {user.first_name}")
        await live.quiet(60)
        for user in users:
            rows = await replies.for_chat(db, user.id)
            assert [r.status for r in rows] == [S.SENT], user.id
            assert len(live.sent_to(user)) == len(rows[0].sent_message_ids)
        assert live.session.monitor.percentile(99) < 0.1
    assert OWNER_ID not in {s.chat_id for s in tg.sent}

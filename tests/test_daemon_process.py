"""``doppelbot run`` as the separate, long-lived process it is in production: the real console
entry point in a subprocess (``tests/fakebot.py``) against a fake Telegram served from this
test process (``tests/faketg_remote.py``), which survives kill -9 of the bot and keeps
receiving messages while the bot is down. Counts what reached each chat.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

from tests.daemon_harness import Daemon, daemon
from tests.faketg import OWNER_ID, FakeTelegram
from tests.faketg_remote import FakeTelegramServer
from tests.tiny_model import make_tiny_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("daemon-model") / "model", seed=11)


def _replies(d, chat_id: int) -> list[tuple[str, str | None]]:  # type: ignore[no-untyped-def]
    return [
        (r["status"], r["error"])
        for r in d.query(
            "SELECT status, error FROM replies WHERE chat_id = ? ORDER BY reply_id", (chat_id,)
        )
    ]


async def test_a_second_process_refuses_and_nothing_is_sent_twice(
    tmp_path: Path, model_dir: Path
) -> None:
    async with daemon(tmp_path, model_dir) as d:
        alice = d.tg.add_user("Alice")
        first = await d.start()
        await d.ready(first)
        second = await d.start()
        assert await second.wait() != 0
        out = d.output(second)
        assert "`doppelbot run` (pid" in out and str(first.pid) in out
        assert "Traceback" not in out and len(out.strip().splitlines()) <= 3
        exporter = await d.start("export")
        assert await exporter.wait() != 0
        assert "is using this data directory" in d.output(exporter)
        d.tg.push_incoming(alice, "привет, ты тут?")
        await d.until(lambda: d.sent_to(alice), 60, first)
        await d.until(lambda: _replies(d, alice.id) == [("sent", None)], 30, first)
        assert first.returncode is None  # the first bot never noticed
        assert await d.stop(first) == 0
        sent = d.sent_to(alice)
        assert len(sent) == len(d.query("SELECT * FROM messages WHERE is_outgoing = 1"))
        assert len(set(sent)) == len(sent) or len(_replies(d, alice.id)) == 1


async def test_messages_sent_while_the_bot_is_down_are_caught_up(
    tmp_path: Path, model_dir: Path
) -> None:
    async with daemon(tmp_path, model_dir, catch_up_max_age="1h") as d:
        alice, bob, carol = d.tg.add_user("Alice"), d.tg.add_user("Bob"), d.tg.add_user("Carol")
        bot = await d.start()
        await d.ready(bot)
        d.tg.push_incoming(alice, "первое")
        await d.until(lambda: d.sent_to(alice), 60, bot)
        await d.kill(bot)  # kill -9: no clean-up, no goodbye
        # While it is down: Alice and Bob write; Carol's message is two hours old by the time
        # the bot is back (older than DOPPELBOT_CATCH_UP_MAX_AGE).
        d.tg.push_incoming(alice, "а ты где?")
        d.tg.push_incoming(alice, "ау")
        d.tg.push_incoming(bob, "привет!")
        d.tg.push_incoming(carol, "давно не виделись", date=int(time.time()) - 7200)
        bot = await d.start()
        await d.ready(bot)
        await d.until(lambda: len(d.sent_to(alice)) >= 2 and d.sent_to(bob), 60, bot)
        await d.until(
            # both of Alice's replies settled, not just sent (the status follows the send)
            lambda: (
                _replies(d, alice.id) == [("sent", None)] * 2
                and _replies(d, bob.id) == [("sent", None)]
            ),
            30,
            bot,
        )
        stored = {r["text"] for r in d.query("SELECT text FROM messages WHERE is_outgoing = 0")}
        assert {"первое", "а ты где?", "ау", "привет!", "давно не виделись"} <= stored
        assert d.sent_to(carol) == [] and _replies(d, carol.id) == []
        assert await d.stop(bot) == 0


def _card_for(d, peer) -> int | None:  # type: ignore[no-untyped-def]
    """The id of the newest draft card for ``peer``'s chat (None: none yet)."""
    rows = d.query(
        "SELECT review_message_id FROM replies WHERE chat_id = ? AND review_message_id IS NOT"
        " NULL ORDER BY reply_id DESC LIMIT 1",
        (peer.id,),
    )
    return int(rows[0]["review_message_id"]) if rows else None


@pytest.mark.parametrize("crash_at", ["approve", "claim", "send", "record", "sent", "while_down"])
async def test_kill_9_anywhere_in_send_and_verdict_loses_nothing_and_sends_once(
    tmp_path: Path, model_dir: Path, crash_at: str
) -> None:
    """The owner answers "ok" to a draft card; the bot dies by SIGKILL at one step of acting on
    it (``while_down``: it was already dead when the owner answered). After a restart the
    contact has exactly one copy of the reply and the owner's verdict exactly once."""
    async with daemon(tmp_path, model_dir, reply_mode="review") as d:
        alice = d.tg.add_user("Alice")
        bot = await d.start(crash_at=None if crash_at == "while_down" else crash_at)
        await d.ready(bot)
        d.tg.push_incoming(alice, "Придёшь завтра?")
        await d.until(lambda: _card_for(d, alice) is not None, 60, bot)
        card = _card_for(d, alice)
        if crash_at == "while_down":
            await d.kill(bot)
        d.tg.push_outgoing(d.tg.me, "ok", reply_to=card)
        async with asyncio.timeout(60):
            assert await bot.wait() == -signal.SIGKILL
        restarted = await d.start()
        await d.ready(restarted)
        await d.until(
            lambda: d.query("SELECT status FROM replies WHERE status = 'sent'"), 60, restarted
        )
        await d.until(lambda: "✅ Sent" in d.tg._chat(OWNER_ID).msgs[card].message, 30)
        assert await d.stop(restarted) == 0
        [reply] = d.query("SELECT reply_id, status, final_text FROM replies")
        assert reply["status"] == "sent"
        assert d.sent_to(alice) == reply["final_text"].split("\n")  # once, every part
        verdicts = d.query("SELECT verdict FROM review_verdicts")
        assert [v["verdict"] for v in verdicts] == ["approved"]
        notes = [s.text for s in d.tg.sent if s.chat_id == OWNER_ID and s.reply_to is not None]
        assert notes == []  # no "Already sent." for an answer seen again after the restart


async def test_a_stalled_stream_is_recovered_and_an_outage_exits_non_zero(
    tmp_path: Path, model_dir: Path
) -> None:
    async with daemon(tmp_path, model_dir, watchdog_idle_s=1, watchdog_max_outage_s=3) as d:
        alice = d.tg.add_user("Alice")
        bot = await d.start()
        await d.ready(bot)
        d.tg.mute_updates = True  # connected, requests work, but no update arrives any more
        d.tg.push_incoming(alice, "алло?")
        await d.until(lambda: d.sent_to(alice), 60, bot)  # noticed, reconnected, answered
        assert (d.health() or {}).get("reconnects", 0) >= 1
        d.tg.offline = True  # and now Telegram is gone for good
        async with asyncio.timeout(60):
            code = await bot.wait()
        assert code == 3
        out = d.output(bot)
        assert "error: Telegram unreachable or silent for" in out and "Traceback" not in out
        assert (d.health() or {}).get("state") == "failed"


async def test_two_accounts_run_as_two_processes_each_with_its_own_lock(
    tmp_path: Path, model_dir: Path
) -> None:
    """``run`` and ``run --account work`` on one data directory: two processes, each with its
    own Telegram account, lock, health and replies; Alice writes to both (the same message id
    on each) and gets one answer from each; a second ``run --account work`` is refused."""
    async with daemon(tmp_path, model_dir) as d:
        work_tg = FakeTelegram(me_id=OWNER_ID + 100, me_first_name="Work", me_username="work")
        (d.data_dir / "accounts").mkdir(mode=0o700)
        work_tg.file_session(d.data_dir / "accounts" / "work.session")
        with tempfile.TemporaryDirectory(prefix="faketg-") as sock_dir:
            socket = os.path.join(sock_dir, "work.sock")
            async with FakeTelegramServer(work_tg, socket):
                work = Daemon(work_tg, d.data_dir, socket, d.env)
                try:
                    bot = await d.start()
                    await d.ready(bot)
                    work_bot = await work.start("run", "--account", "work")
                    await work.ready(work_bot)
                    second = await work.start("run", "--account", "work")
                    async with asyncio.timeout(60):
                        assert await second.wait() != 0
                    refused = work.output(second)
                    assert "one process per account and data directory" in refused
                    assert "work.lock" in refused and "Traceback" not in refused

                    alice = d.tg.add_user("Alice")
                    alice_at_work = work_tg.add_user("Alice", user_id=alice.id)
                    first = d.tg.push_incoming(alice, "привет дома")
                    other = work_tg.push_incoming(alice_at_work, "привет на работе")
                    assert first.id == other.id  # the same message id on both accounts
                    await d.until(lambda: d.sent_to(alice), 60, bot)
                    await work.until(lambda: work.sent_to(alice_at_work), 60, work_bot)
                    await asyncio.sleep(1)  # nothing more goes out
                    assert len(d.sent_to(alice)) == 1 and len(work.sent_to(alice_at_work)) == 1
                    rows = d.query(
                        "SELECT a.name, r.status FROM replies r"
                        " JOIN accounts a ON a.account_id = r.account_id ORDER BY a.name"
                    )
                    assert [(r["name"], r["status"]) for r in rows] == [
                        ("default", "sent"),
                        ("work", "sent"),
                    ]
                    texts = d.query(
                        "SELECT text FROM messages WHERE chat_id = ? AND message_id = ?"
                        " ORDER BY account_id",
                        (alice.id, first.id),
                    )
                    assert [t["text"] for t in texts] == ["привет дома", "привет на работе"]
                    assert await work.stop(work_bot) == 0
                    assert await d.stop(bot) == 0
                finally:
                    for proc in work.procs:
                        if proc.returncode is None:
                            proc.send_signal(signal.SIGKILL)
                            await proc.wait()

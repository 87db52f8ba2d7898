"""``doppelbot run`` and ``doppelbot status`` as the user runs them: the login hint, the kill
switch, the status table, and a clean stop on SIGTERM over the fake Telegram."""

from __future__ import annotations

import asyncio
import io
import os
import signal
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from doppelbot.cli import app, main
from doppelbot.core.domain import Message, Peer, PeerKind, ReplyMode, ReplyStatus
from doppelbot.store import bot_state, history, replies
from doppelbot.store.database import Database
from tests.faketg import FakeTelegram
from tests.responder_fakes import fast_settings, wait_for


def _invoke(data_dir: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["--data-dir", str(data_dir), *args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_run_without_login_says_what_to_do(
    tmp_path: Path, capsys: object, monkeypatch: object
) -> None:
    try:
        main(["--env-file", "/dev/null", "--data-dir", str(tmp_path), "run"])
    except SystemExit as exc:
        assert exc.code == 1
    else:
        raise AssertionError("run should fail without a session")
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "doppelbot login" in err
    assert "Traceback" not in err


def test_status_pause_resume(tmp_path: Path) -> None:
    code, out = _invoke(tmp_path, "status")
    assert code == 0, out
    assert "active" in out and "none yet" in out
    code, out = _invoke(tmp_path, "status", "--pause")
    assert code == 0 and "PAUSED" in out

    async def paused() -> bool:
        async with await Database.open(tmp_path / "doppelbot.sqlite3") as db:
            return await bot_state.is_paused(db)

    assert asyncio.run(paused()) is True
    code, out = _invoke(tmp_path, "status")
    assert "PAUSED" in out  # persisted
    code, out = _invoke(tmp_path, "status", "--resume")
    assert code == 0 and "active" in out
    assert asyncio.run(paused()) is False


def test_status_lists_last_replies_without_texts(tmp_path: Path) -> None:
    async def seed() -> None:
        async with await Database.open(tmp_path / "doppelbot.sqlite3") as db:
            await history.upsert_peers(db, [Peer(7, PeerKind.USER, first_name="Ann")])
            rid = await replies.create(
                db, chat_id=7, mode=ReplyMode.AUTO, trigger_message_id=1, now=1_700_000_000
            )
            await replies.transition(
                db, rid, ReplyStatus.QUEUED, ReplyStatus.GENERATING, now=1_700_000_001
            )
            await replies.transition(
                db,
                rid,
                ReplyStatus.GENERATING,
                ReplyStatus.SENDING,
                now=1_700_000_002,
                final_text="секретный ответ",
                generation_ms=321,
            )
            await replies.transition(
                db, rid, ReplyStatus.SENDING, ReplyStatus.SENT, now=1_700_000_003, sent_at=1
            )
            other = await replies.create(
                db, chat_id=8, mode=ReplyMode.AUTO, trigger_message_id=2, now=1_700_000_010
            )
            await replies.transition(
                db, other, ReplyStatus.QUEUED, ReplyStatus.DROPPED, now=1, error="quiet_hours"
            )

    asyncio.run(seed())
    code, out = _invoke(tmp_path, "status")
    assert code == 0, out
    assert "sent 1" in out and "dropped 1" in out
    assert "Ann" in out and "321" in out and "quiet_hours" in out
    assert "секретный" not in out
    code, out = _invoke(tmp_path, "status", "--texts")
    assert "секретный ответ" in out


async def test_serve_answers_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    from doppelbot.app import serve
    from tests.tiny_model import make_tiny_model_dir

    # The real model path of `run`: model_worker loads the (tiny) model, and its
    # tokenizer gives the prompt budget.
    model_dir = make_tiny_model_dir(tmp_path / "model")
    settings = fast_settings(tmp_path, model=str(model_dir), do_sample=False, max_new_tokens=8)
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    client = tg.client(flood_sleep_threshold=0)
    ready = asyncio.Event()

    async def on_ready(session: object) -> None:
        ready.set()

    task = asyncio.create_task(
        serve(
            settings,
            Console(file=io.StringIO()),
            client=client,
            on_ready=on_ready,
        )
    )
    async with asyncio.timeout(20):
        await ready.wait()
    tg.push_incoming(alice, "как ты?")
    await wait_for(lambda: [s for s in tg.sent if s.chat_id == alice.id], 10)
    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(20):
        session = await task
    assert not client.is_connected()
    assert session.responder.busy is False
    assert session.responder.composer.count_tokens is not None
    async with await Database.open(settings.store.db_path) as db:
        [reply] = await replies.for_chat(db, alice.id)
        assert reply.status is ReplyStatus.SENT
        assert reply.model_id == str(model_dir)
        # (auto mode also posts a copy card to Saved Messages: only Alice's chat here)
        to_alice = [s.text for s in tg.sent if s.chat_id == alice.id]
        assert to_alice == (reply.final_text or "").split("\n")
        stored = await history.recent_messages(db, alice.id)
        assert [m.text for m in stored] == ["как ты?", *to_alice]
        assert isinstance(stored[0], Message)

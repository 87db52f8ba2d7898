"""The watchdog of a long-running bot: a silently stalled update stream is noticed and
recovered, an outage longer than the limit ends ``run`` with an error (so a supervisor restarts
it), and ``doppelbot status --health`` tells a healthy bot from a stuck or stopped one."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from doppelbot.core.errors import TelegramOutageError
from doppelbot.health import Health, State
from doppelbot.store import bot_state
from tests.live_harness import Life
from tests.responder_fakes import wait_for

FAST = {"watchdog_interval_s": 0.2, "watchdog_idle_s": 0.6, "watchdog_max_outage_s": 1.5}


async def _health(run) -> Health:  # type: ignore[no-untyped-def]
    record = Health.from_json(await bot_state.get_json(run.db, bot_state.HEALTH_KEY))
    assert record is not None
    return record


async def _is(run, state: State) -> bool:  # type: ignore[no-untyped-def]
    return (await _health(run)).state is state


async def test_a_silently_stalled_update_stream_is_noticed_and_recovered(tmp_path: Path) -> None:
    life = Life(tmp_path)
    alice = life.tg.add_user("Alice")
    async with life.run(**FAST) as run:
        life.tg.mute_updates = True  # the connection looks fine, updates stop coming
        life.tg.push_incoming(alice, "ты меня слышишь?")
        await wait_for(lambda: run.sent_to(alice), 15)
        health = await _health(run)
        assert health.reconnects >= 1 and health.state is State.OK
        assert len(run.sent_to(alice)) == 1


async def test_an_outage_longer_than_the_limit_ends_run_with_an_error(tmp_path: Path) -> None:
    from doppelbot.store.database import Database

    life = Life(tmp_path)
    with pytest.raises(TelegramOutageError, match="unreachable or silent for"):
        async with life.run(**FAST) as run:
            life.tg.offline = True
            async with asyncio.timeout(30):
                await asyncio.gather(run.task, return_exceptions=True)
    db = await Database.open(tmp_path / "data" / "doppelbot.sqlite3")
    record = Health.from_json(await bot_state.get_json(db, bot_state.HEALTH_KEY))
    await db.close()
    assert record is not None and record.state is State.FAILED
    assert record.detail.startswith("Telegram unreachable or silent for")


async def test_status_health_exits_zero_only_while_the_bot_is_healthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from doppelbot.cli import main

    life = Life(tmp_path)
    monkeypatch.setenv("DOPPELBOT_DATA_DIR", str(tmp_path / "data"))

    def health() -> tuple[int, str]:
        try:
            main(["--env-file", os.devnull, "status", "--health"])
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        return code, capsys.readouterr().out.strip()

    async with life.run(**FAST) as run:
        await asyncio.sleep(0.5)
        code, line = await asyncio.to_thread(health)
        assert code == 0 and line.startswith("healthy: ok: up ")
        life.tg.offline = True
        await wait_for(lambda: _is(run, State.RECONNECTING), 10)
        code, line = await asyncio.to_thread(health)
        assert code == 1 and line.startswith("unhealthy: reconnecting: Telegram unreachable")
        life.tg.offline = False
        await wait_for(lambda: _is(run, State.OK), 10)
    code, line = await asyncio.to_thread(health)
    assert code == 1 and "not running" in line

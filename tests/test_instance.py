"""One process per Telegram session: the data directory's instance lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from doppelbot.core.errors import InstanceLockedError
from doppelbot.instance import InstanceLock, current_command, holder_of
from tests.faketg import API_HASH, API_ID, FakeTelegram

ROOT = Path(__file__).resolve().parents[1]


def _hold_in_another_process(path: Path) -> subprocess.Popen[str]:
    """A second process that takes the lock as ``doppelbot run`` and waits for stdin."""
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from doppelbot.instance import InstanceLock
        with InstanceLock(Path({str(path)!r}), "doppelbot run"):
            print("held", flush=True)
            sys.stdin.readline()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_with_who_holds_it(tmp_path: Path) -> None:
    path = tmp_path / "data" / "doppelbot.lock"
    proc = _hold_in_another_process(path)
    try:
        with pytest.raises(InstanceLockedError) as err:
            InstanceLock(path, "doppelbot export").acquire()
        text = str(err.value)
        assert f"`doppelbot run` (pid {proc.pid}, since " in text and "stop it first" in text
        holder = holder_of(path)
        assert holder is not None and holder.pid == proc.pid and holder.command == "doppelbot run"
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(10)
    assert holder_of(path) is None  # released with the process
    with InstanceLock(path, "doppelbot export"):
        assert holder_of(path) is not None
    assert (path.stat().st_mode & 0o777) == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700


def test_a_killed_holder_never_blocks_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "doppelbot.lock"
    proc = _hold_in_another_process(path)
    proc.kill()  # SIGKILL: nothing runs on the way out
    proc.wait(10)
    with InstanceLock(path, "doppelbot run"):
        pass


def test_the_command_words_name_the_subcommand() -> None:
    assert current_command(["--debug", "run"]) == "doppelbot run"
    assert current_command(["--data-dir", "/x", "ssa", "collect", "--batch", "3"]) == (
        "doppelbot ssa collect"
    )
    assert current_command(["export", "--since", "2024-01-01"]) == "doppelbot export"


async def test_connected_holds_the_lock_while_the_client_is_open(tmp_path: Path) -> None:
    from doppelbot.config import load_settings
    from doppelbot.telegram.client import connected

    settings = load_settings(None, data_dir=tmp_path / "data", api_id=API_ID, api_hash=API_HASH)
    tg = FakeTelegram()
    async with connected(settings, client=tg.client()):
        with pytest.raises(InstanceLockedError):
            async with connected(settings, client=tg.client()):
                pass
        assert holder_of(settings.lock_path) is not None
    assert holder_of(settings.lock_path) is None


@pytest.mark.parametrize("command", [["export"], ["ssa", "collect"], ["login"], ["run"]])
def test_commands_that_open_the_session_refuse_in_one_line(
    tmp_path: Path,
    command: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from doppelbot.cli import main

    data = tmp_path / "data"
    tg = FakeTelegram()
    data.mkdir(mode=0o700)
    tg.file_session(data / "doppelbot.session")
    for key, value in {
        "DOPPELBOT_DATA_DIR": str(data),
        "DOPPELBOT_API_ID": str(API_ID),
        "DOPPELBOT_API_HASH": API_HASH,
        "DOPPELBOT_PHONE": "+70000000000",
    }.items():
        monkeypatch.setenv(key, value)
    if command[0] == "ssa":
        _one_ssa_card(data / "doppelbot.sqlite3")
    proc = _hold_in_another_process(data / "doppelbot.lock")
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["--env-file", os.devnull, *command])
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(10)
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert "is using this data directory's Telegram session" in err
    assert f"(pid {proc.pid}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3


def _one_ssa_card(path: Path) -> None:
    import asyncio

    from doppelbot.store.database import Database

    async def go() -> None:
        db = await Database.open(path)
        await db.execute(
            "INSERT INTO ssa_batches (dataset, seed, n_contexts, created_at) VALUES ('d', 1, 1, 0)"
        )
        await db.execute(
            "INSERT INTO ssa_items (batch_id, context_key, source, position, model_input, reply,"
            " account_id, card_message_id, posted_at) VALUES (1, 'k', 'owner', 0, 'x', 'y', 1, 5,"
            " 0)"
        )
        await db.close()

    asyncio.run(go())

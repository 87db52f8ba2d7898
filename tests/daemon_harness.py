"""Running the real ``doppelbot run`` as a separate process against a served fake Telegram.

``Daemon`` owns a ``FakeTelegram`` (in the test's event loop, served on a Unix socket) and a
data directory; ``start()`` launches ``doppelbot run`` through ``tests/fakebot.py`` with the
settings given as environment variables, ``ready()`` waits for the bot's first healthy
heartbeat, ``kill()`` sends SIGKILL (no clean-up at all), ``stop()`` SIGTERM. The fake keeps
running and keeps accepting pushes while the bot is dead. Assertions read what reached each
chat (``tg.sent``) and the bot's database (``query``: a separate read-only connection).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tests.faketg import API_HASH, API_ID, FakeTelegram
from tests.faketg_remote import FakeTelegramServer

ROOT = Path(__file__).resolve().parents[1]


class Daemon:
    def __init__(self, tg: FakeTelegram, data_dir: Path, socket: str, env: dict[str, str]):
        self.tg = tg
        self.data_dir = data_dir
        self.socket = socket
        self.env = env
        self.procs: list[asyncio.subprocess.Process] = []
        self.logs: dict[int, Path] = {}

    async def start(self, *args: str, crash_at: str | None = None, **env: Any) -> Any:
        """``doppelbot ARGS`` (default: ``run``) in a new process; returns the process."""
        cmd = [sys.executable, "-m", "tests.fakebot", self.socket]
        if crash_at:
            cmd += ["--crash-at", crash_at]
        cmd += ["--", "--env-file", os.devnull, *(args or ("run",))]
        full_env = {**os.environ, **self.env, **{k: str(v) for k, v in env.items()}}
        log = self.data_dir.parent / f"bot-{Path(self.socket).stem}-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *cmd, cwd=ROOT, env=full_env, stdout=out, stderr=asyncio.subprocess.STDOUT
            )
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def output(self, proc: Any) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        db = self.data_dir / "doppelbot.sqlite3"
        if not db.exists():
            return []
        conn = sqlite3.connect(db, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return list(conn.execute(sql, params))
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # not migrated yet
                return []
            raise
        finally:
            conn.close()

    def health(self, pid: int | None = None) -> dict[str, Any] | None:
        """The health record (of the process ``pid``: each account's bot keeps its own)."""
        rows = self.query("SELECT value FROM bot_state WHERE key = 'health'")
        records = [json.loads(r["value"]) for r in rows]
        if pid is not None:
            records = [h for h in records if h.get("pid") == pid]
        return records[0] if records else None

    async def ready(self, proc: Any, limit_s: float = 90.0) -> None:
        """Until ``proc`` has caught up and recorded a healthy heartbeat."""

        def up() -> bool:
            h = self.health(proc.pid)
            return bool(h and h.get("state") == "ok")

        await self.until(up, limit_s, proc)

    async def until(
        self, predicate: Callable[[], Any], limit_s: float = 30.0, proc: Any = None
    ) -> None:
        deadline = time.monotonic() + limit_s
        while not predicate():
            if proc is not None and proc.returncode is not None:
                raise AssertionError(
                    f"the bot exited ({proc.returncode}):\n{self.output(proc)[-3000:]}"
                )
            if time.monotonic() > deadline:
                detail = f"\n{self.output(proc)[-3000:]}" if proc is not None else ""
                raise AssertionError(f"timed out after {limit_s}s{detail}")
            await asyncio.sleep(0.05)

    async def kill(self, proc: Any) -> None:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()

    async def stop(self, proc: Any, limit_s: float = 30.0) -> int:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(limit_s):
            return await proc.wait()

    def sent_to(self, peer: Any) -> list[str]:
        chat = self.tg.marked_id(peer)
        return [s.text for s in self.tg.sent if s.chat_id == chat]


@asynccontextmanager
async def daemon(tmp_path: Path, model_dir: Path, **settings: Any) -> AsyncIterator[Daemon]:
    """A fake Telegram served for ``doppelbot run`` processes on one data directory (a file
    session, logged in); ``settings`` become ``DOPPELBOT_*`` variables."""
    tg = FakeTelegram()
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    tg.file_session(data_dir / "doppelbot.session")
    env = {
        "DOPPELBOT_DATA_DIR": str(data_dir),
        "DOPPELBOT_API_ID": str(API_ID),
        "DOPPELBOT_API_HASH": API_HASH,
        "DOPPELBOT_MODEL": str(model_dir),
        "DOPPELBOT_DEVICE": "cpu",
        "DOPPELBOT_TORCH_THREADS": "1",
        "DOPPELBOT_DO_SAMPLE": "false",
        "DOPPELBOT_MAX_NEW_TOKENS": "8",
        "DOPPELBOT_REPLY_MODE": "auto",
        "DOPPELBOT_DEBOUNCE_S": "0.3",
        "DOPPELBOT_HUMAN_DELAY_MIN_S": "0",
        "DOPPELBOT_HUMAN_DELAY_MAX_S": "0",
        "DOPPELBOT_TYPING_MAX_S": "0",
        "DOPPELBOT_WATCHDOG_INTERVAL_S": "0.5",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    env.update({f"DOPPELBOT_{k.upper()}": str(v) for k, v in settings.items()})
    # Unix socket paths are short (~100 bytes): pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="faketg-") as sock_dir:
        socket = os.path.join(sock_dir, "tg.sock")
        async with FakeTelegramServer(tg, socket):
            d = Daemon(tg, data_dir, socket, env)
            try:
                yield d
            finally:
                for proc in d.procs:
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGKILL)
                        await proc.wait()

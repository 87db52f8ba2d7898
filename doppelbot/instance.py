"""One process per Telegram session: an exclusive OS lock on the data directory.

Two clients on one auth key at the same time can get the session invalidated by Telegram, and
two bots on one database send the same reply twice (each takes the other's in-flight send for
an interrupted one). So every command that opens the Telegram session holds an exclusive
``flock`` on ``<data dir>/<session name>.lock`` for its whole life. The kernel drops the lock
when the process dies, however it dies (kill -9, OOM), so a stale lock never blocks a restart.
The file also says who holds it (command, pid, since when), for the refusal message and for
``doppelbot status``. With ``DOPPELBOT_SESSION_STRING`` there is no session file, but the lock
file still lives in the data directory, so two containers sharing a volume exclude each other.
Each own account has its own session and so its own lock (``doppelbot.accounts``): two accounts'
processes run side by side on one data directory, two of one account never do.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from doppelbot.core.errors import InstanceLockedError, StoreError
from doppelbot.files import private_dir

try:  # POSIX; doppelbot runs on Linux and macOS
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_MODE = 0o600


@dataclass(frozen=True, slots=True)
class LockHolder:
    """Who holds a lock (as its file says)."""

    command: str
    pid: int
    since: float

    def describe(self) -> str:
        when = dt.datetime.fromtimestamp(self.since).strftime("%Y-%m-%d %H:%M:%S")
        return f"`{self.command}` (pid {self.pid}, since {when})"


_invoked: list[str] | None = None


def invoked_with(argv: list[str]) -> None:
    """The CLI records its arguments here (the process may have been started another way)."""
    global _invoked
    _invoked = list(argv)


def current_command(argv: list[str] | None = None) -> str:
    """``doppelbot run``, ``doppelbot ssa collect``…: the subcommand words of this process."""
    args = argv if argv is not None else (_invoked if _invoked is not None else sys.argv[1:])
    words: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("--env-file", "--data-dir", "--account"):
            skip = True
            continue
        if arg.startswith("-"):
            if words:
                break
            continue
        words.append(arg)
        if len(words) == 2:
            break
    return " ".join(["doppelbot", *words]) if words else "doppelbot"


def _read_holder(path: Path) -> LockHolder | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
        return LockHolder(str(data["command"]), int(data["pid"]), float(data["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class InstanceLock:
    """``with InstanceLock(path, command):`` — refuses with ``InstanceLockedError`` when taken."""

    def __init__(self, path: Path, command: str | None = None) -> None:
        self.path = path
        self.command = command or current_command()
        self._fd: int | None = None

    def acquire(self) -> InstanceLock:
        if fcntl is None:  # pragma: no cover - no flock: nothing to enforce with
            return self
        try:
            private_dir(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, LOCK_MODE)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = _read_holder(self.path)
            who = holder.describe() if holder else "another doppelbot process"
            raise InstanceLockedError(
                f"{who} is using this data directory's Telegram session (lock {self.path}); "
                "stop it first — one process per account and data directory"
            ) from None
        record = {"command": self.command, "pid": os.getpid(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> InstanceLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_of(path: Path) -> LockHolder | None:
    """Who holds ``path`` right now; None when nobody does (the file may be left over)."""
    if fcntl is None or not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(path) or LockHolder("doppelbot", 0, 0.0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)

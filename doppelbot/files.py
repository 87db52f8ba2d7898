"""Files that hold the owner's private data: created 0700 (folders) and 0600 (files).

The umask filters ``mkdir``'s and ``open``'s modes, and a folder made by an older version (or
by another tool) may be open to others, so both helpers also tighten what already exists.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) 0700; tighten it when it is open to others."""
    if not path.exists():
        path.mkdir(parents=True, mode=PRIVATE_DIR)
        os.chmod(path, PRIVATE_DIR)  # mkdir's mode is filtered by the umask
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        with contextlib.suppress(OSError):  # not ours to change (a mounted volume)
            os.chmod(path, mode & ~0o077)


def private_file(path: Path) -> None:
    """Create ``path`` 0600 if missing; tighten it when it is open to others.

    An existing file is never opened: SQLite's POSIX locks belong to the process and vanish
    when *any* descriptor of the file is closed, so opening and closing a database file that
    a connection of this process holds would silently drop that connection's locks."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            with contextlib.suppress(OSError):  # not ours to change
                os.chmod(path, PRIVATE_FILE)
        return
    os.close(fd)

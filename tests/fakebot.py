"""The real ``doppelbot`` command line, in its own process, against a served fake Telegram.

``python -m tests.fakebot SOCKET [--crash-at POINT] -- ARGS…`` runs ``doppelbot ARGS…`` (the
console entry point, settings from the environment) with one change: every Telethon client it
creates talks to the ``FakeTelegramServer`` at ``SOCKET`` (``tests/faketg_remote.py``).

``--crash-at POINT`` kills the process with SIGKILL (no clean-up at all, like the OOM killer or
a power cut) at one step of sending an approved draft:

- ``approve``: the owner's answer arrived, before anything is written
- ``claim``: the draft is claimed for sending (and the verdict written), nothing sent yet
- ``send``: the message reached Telegram, its id is not recorded yet
- ``record``: every part is recorded, the reply is not marked sent yet
- ``sent``: the reply is marked sent, the review card not updated yet
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Any


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _crash_at(point: str) -> None:
    from doppelbot.core.domain import ReplyStatus
    from doppelbot.responder import service
    from doppelbot.store import replies
    from doppelbot.telegram import live

    if point == "approve":
        original = service.Responder.send_approved

        @functools.wraps(original)
        async def send_approved(self: Any, *args: Any, **kwargs: Any) -> Any:
            _die()
            return await original(self, *args, **kwargs)

        service.Responder.send_approved = send_approved  # type: ignore[method-assign]
    elif point == "claim":
        deliver = service.Responder._deliver

        @functools.wraps(deliver)
        async def _deliver(self: Any, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("approved"):
                _die()
            return await deliver(self, *args, **kwargs)

        service.Responder._deliver = _deliver  # type: ignore[method-assign]
    elif point == "send":
        send = live.TelethonTransport.send_message

        @functools.wraps(send)
        async def send_message(self: Any, *args: Any, **kwargs: Any) -> Any:
            await send(self, *args, **kwargs)
            _die()

        live.TelethonTransport.send_message = send_message  # type: ignore[method-assign]
    elif point in ("record", "sent"):
        transition = replies.transition

        @functools.wraps(transition)
        async def patched(db: Any, reply_id: int, frm: Any, to: Any, **kwargs: Any) -> bool:
            if to is ReplyStatus.SENT and point == "record":
                _die()
            moved = await transition(db, reply_id, frm, to, **kwargs)
            if to is ReplyStatus.SENT and point == "sent":
                _die()
            return moved

        replies.transition = patched  # type: ignore[assignment]
    else:
        raise SystemExit(f"fakebot: unknown crash point {point!r}")


def main(argv: list[str]) -> None:
    socket_path, rest = argv[0], argv[1:]
    crash = None
    if rest[:1] == ["--crash-at"]:
        crash, rest = rest[1], rest[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    from doppelbot.telegram import client as client_mod
    from tests.faketg_remote import install_remote

    create = client_mod.create_client

    @functools.wraps(create)
    def create_remote(*args: Any, **kwargs: Any) -> Any:
        client = create(*args, **kwargs)
        install_remote(client, socket_path)
        return client

    client_mod.create_client = create_remote  # type: ignore[assignment]
    if crash:
        _crash_at(crash)
    from doppelbot.cli import main as doppelbot

    doppelbot(rest)


if __name__ == "__main__":
    main(sys.argv[1:])

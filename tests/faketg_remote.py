"""The fake Telegram served to a ``doppelbot`` running in another process.

Daemon behaviour — kill -9, two processes on one data directory, messages arriving while the
bot is down, an update stream that goes silent — can only be tested on the real ``doppelbot
run`` process, against a Telegram that lives outside it: it keeps its state and keeps
"sending" while the bot is dead. So the test process runs a ``FakeTelegram`` and serves it on a
Unix socket (``FakeTelegramServer``); the bot process is the real console entry point started
through ``tests/fakebot.py``, which only swaps each Telethon client's MTProto sender for a
``RemoteSender`` talking to that socket. Everything else — Telethon's client, its update loop
and catch-up, sessions, our whole stack — is the real thing.

Wire format (both ways): frames of ``u32 length`` + ``u8 kind`` + payload.

- client → server: ``HELLO`` (the session's 256-byte auth key), ``REQ`` (u64 id + the
  serialised request, exactly ``bytes(request)``)
- server → client: ``RES`` (u64 id + the serialised result), ``ERR`` (u64 id + u32 code +
  RPC error message), ``EXC`` (u64 id + an exception name and text: ConnectionError…),
  ``UPD`` (a serialised ``Updates`` object pushed to the client)

The bot dying closes its socket; the server just marks that client disconnected, so updates
pushed meanwhile only reach the update log (what getDifference returns) — as on Telegram.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any

from telethon.crypto import AuthKey
from telethon.errors import rpc_message_to_error
from telethon.extensions import BinaryReader
from telethon.network.mtprotosender import MTProtoSender
from telethon.tl import types

HELLO, REQ, RES, ERR, EXC, UPD = range(6)
_HEAD = struct.Struct("<IB")


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(_HEAD.size)
    length, kind = _HEAD.unpack(head)
    return kind, await reader.readexactly(length)


def _frame(kind: int, payload: bytes) -> bytes:
    return _HEAD.pack(len(payload), kind) + payload


# --- the server side (in the test process) ---------------------------------------------------
class _RemoteClient:
    """One connected bot process, as ``FakeTelegram`` sees a sender."""

    def __init__(self, writer: asyncio.StreamWriter, auth_key: bytes) -> None:
        self.writer = writer
        self.auth_key = AuthKey(auth_key)
        self.updates_queue: asyncio.Queue[Any] = asyncio.Queue()
        self._updates_queue = self.updates_queue
        self.connected = True
        self.pending_2fa = False


class FakeTelegramServer:
    """Serves ``tg`` on the Unix socket ``path`` (``async with FakeTelegramServer(tg, path)``)."""

    def __init__(self, tg: Any, path: str) -> None:
        self.tg = tg
        self.path = path
        self.clients: list[_RemoteClient] = []
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> FakeTelegramServer:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for client in self.clients:
            client.connected = False
            client.writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def connected(self) -> int:
        return sum(1 for c in self.clients if c.connected)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        client: _RemoteClient | None = None
        try:
            kind, payload = await _read_frame(reader)
            if kind != HELLO or self.tg.offline:
                return
            client = _RemoteClient(writer, payload)
            self.clients.append(client)
            self.tg._senders.append(client)
            self._spawn(self._pump(client))
            while True:
                kind, payload = await _read_frame(reader)
                if kind == REQ:
                    self._spawn(self._answer(client, payload))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            if client is not None:
                client.connected = False
                if client in self.tg._senders:
                    self.tg._senders.remove(client)
            writer.close()

    async def _pump(self, client: _RemoteClient) -> None:
        while client.connected:
            update = await client.updates_queue.get()
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                client.writer.write(_frame(UPD, bytes(update)))
                await client.writer.drain()

    async def _answer(self, client: _RemoteClient, payload: bytes) -> None:
        from tests.faketg import _RpcError

        (rid,) = struct.unpack_from("<Q", payload)
        data = payload[8:]
        if self.tg.latency_s > 0:
            await asyncio.sleep(self.tg.latency_s)
        if not client.connected:
            return
        if self.tg.offline:
            frame = _frame(EXC, struct.pack("<Q", rid) + b"ConnectionError\x00offline")
        else:
            try:
                body = self.tg._handle(client, data, None)
                frame = _frame(RES, struct.pack("<Q", rid) + body)
            except _RpcError as e:
                frame = _frame(ERR, struct.pack("<QI", rid, e.code) + e.message.encode())
            except BaseException as e:  # injected failures travel by name
                text = f"{type(e).__name__}\x00{e}".encode()
                frame = _frame(EXC, struct.pack("<Q", rid) + text)
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            client.writer.write(frame)
            await client.writer.drain()


# --- the client side (in the bot process) ----------------------------------------------------
_EXCEPTIONS: dict[str, type[BaseException]] = {
    "ConnectionError": ConnectionError,
    "TimeoutError": TimeoutError,
    "OSError": OSError,
}


class RemoteSender:
    """Stands in for ``MTProtoSender`` in the bot process; talks to ``FakeTelegramServer``."""

    _store_own_updates = MTProtoSender._store_own_updates

    def __init__(self, path: str, auth_key: AuthKey, updates_queue: asyncio.Queue[Any]) -> None:
        self.path = path
        self.auth_key = auth_key
        self._updates_queue = updates_queue
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, tuple[asyncio.Future[Any], Any]] = {}
        self._next = 0
        self._listener: asyncio.Task[None] | None = None
        self._disconnected: asyncio.Future[None] | None = None
        self.connected = False

    async def connect(self, connection: Any) -> bool:
        if self.connected:
            return False
        self._reader, self._writer = await asyncio.open_unix_connection(self.path)
        self._writer.write(_frame(HELLO, self.auth_key.key or b""))
        await self._writer.drain()
        self.connected = True
        self._disconnected = asyncio.get_running_loop().create_future()
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        return True

    def is_connected(self) -> bool:
        return self.connected

    def _transport_connected(self) -> bool:
        return self.connected

    def _keepalive_ping(self, ping_id: int) -> None:
        pass

    async def disconnect(self) -> None:
        self._close()
        if self._listener is not None and self._listener is not asyncio.current_task():
            self._listener.cancel()
            with contextlib.suppress(BaseException):
                await self._listener

    def _close(self) -> None:
        self.connected = False
        if self._writer is not None:
            self._writer.close()
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("disconnected"))
        self._pending.clear()
        if self._disconnected is not None and not self._disconnected.done():
            self._disconnected.set_result(None)

    @property
    def disconnected(self) -> asyncio.Future[None]:
        if self._disconnected is None:
            self._disconnected = asyncio.get_running_loop().create_future()
            self._disconnected.set_result(None)
        return asyncio.shield(self._disconnected)

    def send(self, request: Any, ordered: bool = False) -> Any:
        if not self.connected:
            raise ConnectionError("Cannot send requests while disconnected")
        if isinstance(request, list):
            return [self._send_one(r) for r in request]
        return self._send_one(request)

    def _send_one(self, request: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._next += 1
        rid = self._next
        self._pending[rid] = (future, request)
        assert self._writer is not None
        self._writer.write(_frame(REQ, struct.pack("<Q", rid) + bytes(request)))
        return future

    async def _listen(self) -> None:
        assert self._reader is not None
        try:
            while True:
                kind, payload = await _read_frame(self._reader)
                if kind == UPD:
                    self._updates_queue.put_nowait(BinaryReader(payload).tgread_object())
                    continue
                (rid,) = struct.unpack_from("<Q", payload)
                future, request = self._pending.pop(rid, (None, None))
                if future is None or future.done():
                    continue
                if kind == RES:
                    try:
                        result = request.read_result(BinaryReader(payload[8:]))
                    except Exception as e:
                        future.set_exception(e)
                        continue
                    self._store_own_updates(result)
                    future.set_result(result)
                elif kind == ERR:
                    (code,) = struct.unpack_from("<I", payload, 8)
                    message = payload[12:].decode()
                    future.set_exception(
                        rpc_message_to_error(types.RpcError(code, message), request)
                    )
                else:
                    name, _, text = payload[8:].decode().partition("\x00")
                    future.set_exception(_EXCEPTIONS.get(name, RuntimeError)(text))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._close()


def install_remote(client: Any, path: str) -> RemoteSender:
    """Wire a real ``TelegramClient`` (its own session) to the fake served at ``path``."""
    from tests.faketg import _FAKE_DC

    session = client.session
    if not session.server_address:
        session.set_dc(*_FAKE_DC)
    if session.auth_key is None or session.auth_key.key is None:
        raise RuntimeError("the session has no auth key: make it with tg.file_session()")
    sender = RemoteSender(path, session.auth_key, client._updates_queue)
    client._sender = sender
    return sender

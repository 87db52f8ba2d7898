"""An in-process fake Telegram server behind a *real* ``telethon.TelegramClient``.

Why it exists: doppelbot must be tested on Telethon's own code — ``start()``, ``iter_dialogs``,
``iter_messages``, takeout, FloodWait handling, ``send_message``, the update loop — without a
network. Only the client's MTProto sender (``client._sender``) is replaced. Every request goes
through a bytes round-trip (``bytes(request)`` → ``BinaryReader(...).tgread_object()``), is
answered with real TL objects, and the answer is serialised and parsed back with
``request.read_result(...)``; errors are real RPC errors built with ``rpc_message_to_error``.
So whatever Telethon does with a real server, it does here.

Quick start
-----------
::

    from tests.faketg import FakeTelegram

    tg = FakeTelegram()                      # the owner: tg.me (id 100, "Owner")
    other = FakeTelegram(me_id=200)          # another own account (its own ids, from 1 too)
    alice = tg.add_user("Alice", username="alice")
    tg.add_history(alice, 300)               # 300 alternating in/out text messages
    tg.add_message(alice, "hi", out=False)   # one stored message (no update pushed)
    client = tg.client()                     # a real TelegramClient, logged in, not connected
    await client.connect()                   # or: await client.start() (no prompts: authorised)
    ...
    await client.disconnect()

``tg.client(authorized=False)`` gives a client that must log in (``client.start(phone=...,
code_callback=lambda: tg.login_code, password=...)``; ``tg.password = "secret"`` turns on 2FA,
checked with real SRP). ``tg.install(client)`` wires any client you built yourself (file session,
StringSession, ``doppelbot.telegram`` factory) to this fake; ``tg.session_string()`` is a
StringSession string of an authorised fake login.

Building the world (no updates are pushed by these)
----------------------------------------------------
- ``add_user(first_name, last_name=None, *, username=None, bot=False, deleted=False,
  contact=True, phone=None, user_id=None) -> types.User``
- ``add_group(title, members=()) -> types.Chat`` (basic group, marked id ``-id``)
- ``add_channel(title, *, megagroup=True, username=None) -> types.Channel``
  (marked id ``-100…``; ``megagroup=False`` is a broadcast channel)
- ``add_message(peer, text="", *, out=None, sender=None, date=None, media=None, reply_to=None,
  fwd_from=None, grouped_id=None, edit_date=None, entities=None) -> types.Message``.
  ``peer`` is a TL entity (User/Chat/Channel) or a marked id. In private chats ``out`` defaults
  to False (written by the other user); in groups ``sender`` (a User) defaults to the owner.
  ``fwd_from`` may be a str (hidden name), a User/Channel, or a ``types.MessageFwdHeader``.
- ``add_service(peer, action, *, sender=None, date=None) -> types.MessageService``
- ``add_history(peer, n, *, start_date=None, step_s=60, text="msg {i}", out_every=2)``: n text
  messages quickly (bulk; dates increase; every ``out_every``-th is outgoing).
- ``add_generated_history(user, n, *, start_date=None, step_s=60, text=..., out_every=2)``:
  benchmarks only — a private history computed on request (no per-message memory).
- ``edit_message(peer, msg_id, text, *, date=None, push=False)``: changes the stored text and
  ``edit_date`` (``push=True`` also sends UpdateEditMessage to connected clients).
- ``messages(peer)``: the stored history (TL objects, oldest first); ``marked_id(peer)``.
- Like Telegram (layer 119+), incoming private messages carry no ``from_id``; outgoing ones
  carry ``from_id=PeerUser(OWNER_ID)``. Private chats and basic groups share one account-wide
  message id counter; channels/megagroups count their own ids and pts.
- ``delete_dialog(peer)``. Media builders (module functions): ``photo()``, ``sticker("😀")``,
  ``voice()``, ``audio()``, ``video()``, ``video_note()``, ``gif()``, ``document()``, ``geo()``,
  ``contact()``, ``poll()``, ``webpage()``.
- Downloads: ``voice(duration, data=ogg_bytes)`` / ``video_note(duration, data=mp4_bytes)``
  attach real bytes to the document; once the message is stored (``add_message``,
  ``push_incoming``) ``upload.GetFile`` serves them in parts (Telegram's offset/limit rules,
  file reference and access hash checked), so Telethon's own ``download_media`` runs.
  ``tg.files`` (document id → bytes) and ``tg.downloads`` (document id, offset, limit) record
  them.

Pushing server updates to connected clients (they arrive in ``client._updates_queue`` with
correct pts, so Telethon's MessageBox applies them and fires ``events.*`` handlers)
-------------------------------------------------------------------------------------------------
- ``push_incoming(user, text, *, reply_to=None, media=None, fwd_from=None) -> Message``:
  a private message from ``user`` (UpdateNewMessage inside Updates carrying the users).
- ``push_outgoing(peer, text, *, reply_to=None, fwd_from=None)``: the owner wrote from another
  device (``push_outgoing(tg.me, "/status")``: a note in the owner's Saved Messages).
- ``push_group_message(chat_or_channel, sender, text, *, reply_to=None)``: group/channel message
  (UpdateNewChannelMessage with the channel's own pts for channels/megagroups).
- ``push_edit(peer, msg_id, text)``: UpdateEditMessage / UpdateEditChannelMessage.
- ``push_reaction(peer, msg_id, emoji, *, by_owner=False, count=1)``: UpdateMessageReactions
  (the message's reaction state is stored too).
- ``push_reactions_edit(peer, msg_id, emojis, *, by_owner=False)``: the same state change
  delivered as UpdateEditMessage carrying ``reactions``.
- ``push_read(peer, max_id)``: the other side read our messages (UpdateReadHistoryOutbox).
- ``push_typing(user)``: UpdateUserTyping.
- ``push_raw(updates)``: any ``types.Updates``-like object you built.
After pushing, let the client process it, e.g. ``await tg.settle()`` (yields to the loop until
every connected client's update queue is drained; a handler that awaits more may need another).

Records of what the client did
------------------------------
- ``tg.sent``: list of ``SentMessage(chat_id, message_id, text, reply_to, date, silent)`` — every
  messages.SendMessage (also stored in the chat history, so exports/iter_messages see them).
- ``tg.actions``: list of ``(chat_id, action_class_name)`` from messages.SetTyping, e.g.
  ``(1001, "SendMessageTypingAction")``, ``(1001, "SendMessageCancelAction")``.
- ``tg.reactions_sent``: list of ``(chat_id, msg_id, [emoji, ...])`` (messages.SendReaction).
- ``tg.edits``: list of ``(chat_id, msg_id, new_text)`` (messages.EditMessage by the client).
- ``tg.reads``: list of ``(chat_id, max_id)`` (messages.ReadHistory / channels.ReadHistory).
- ``tg.deleted``: list of ``(chat_id or None, [ids])`` (DeleteMessages).
- ``tg.calls``: ``collections.Counter`` of request class names (inner requests unwrapped, the
  wrappers are counted too, e.g. ``InvokeWithTakeoutRequest``).
- ``tg.takeouts``: dict takeout id → ``"active" | "finished-ok" | "finished-failed"``;
  ``tg.takeout_scopes`` dict id → the InitTakeoutSession request fields.

Injecting failures
------------------
``tg.fail_next(request, error, *, times=1, after=0, peer=None)``:
``request`` is a request class (``functions.messages.GetHistoryRequest``) or its name
(``"GetHistoryRequest"``); ``error`` is an RPC error message (``"FLOOD_WAIT_30"``,
``"TAKEOUT_INIT_DELAY_3600"``, ``"PEER_ID_INVALID"``; the code is derived: 420 for floods and
takeout delays, 401 for AUTH_*, 500 for INTERNAL, else 400) or an exception instance, raised as
is (e.g. ``ConnectionError()``, or your own ``RuntimeError`` to simulate a crash). The next
``times`` matching calls fail, after letting ``after`` matching calls through. ``peer`` (marked
id) restricts it to requests about that peer. ``tg.clear_failures()`` removes pending ones.

Other knobs: ``tg.now()`` (the server clock: real time unless ``FakeTelegram(clock=...)``),
``tg.latency_s`` (answer after a delay instead of on the next loop turn), ``tg.login_code``,
``tg.password``. ``tg.offline = True``: every request (and connecting) fails with
``ConnectionError`` — Telegram unreachable. ``tg.mute_updates = True``: updates are no longer
pushed to connected clients (they stay in the update log, so getDifference still returns them)
— the silently stalled update stream real clients sometimes see. ``tg.owner_reads(peer,
max_id)``: the owner read the chat up to ``max_id`` on another device.
``tg.file_session(path)``: an authorised Telethon file session (SQLite) at ``path``.
``tests/faketg_remote.py`` serves a ``FakeTelegram`` to a ``doppelbot`` in another process.
Not supported (raise ``FakeTelegramUnsupported`` naming the request): file
up/downloads and anything not listed above — add handlers in ``_HANDLERS`` when you need more.
``tg.password``. Not supported (raise ``FakeTelegramUnsupported`` naming the request): file
uploads, downloads of anything but documents with attached bytes, and anything not listed
above — add handlers in ``_HANDLERS`` when you need more.

Speed: stored messages are serialised once and the bytes are reused in every answer (they are
exactly what ``bytes(message)`` gives); the client still parses every answer with Telethon.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import datetime as _dt
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from telethon import TelegramClient
from telethon.crypto import AuthKey
from telethon.errors import rpc_message_to_error
from telethon.extensions import BinaryReader
from telethon.network.mtprotosender import MTProtoSender
from telethon.sessions import StringSession
from telethon.tl import TLObject, TLRequest, functions, types

UTC = _dt.UTC
OWNER_ID = 100
API_ID = 12345
API_HASH = "0123456789abcdef0123456789abcdef"
_FAKE_DC = (2, "149.154.167.51", 443)
_VECTOR = struct.pack("<I", 0x1CB5C415)
_INT32 = struct.Struct("<i")
# Telegram's well-known 2048-bit SRP prime (Telethon accepts it without factorising) with g=3.
_SRP_P = bytes.fromhex(
    "C71CAEB9C6B1C9048E6C522F70F13F73980D40238E3E21C14934D037563D930F48198A0AA7C14058229493D22530"
    "F4DBFA336F6E0AC925139543AED44CCE7C3720FD51F69458705AC68CD4FE6B6B13ABDC9746512969328454F18F"
    "AF8C595F642477FE96BB2A941D5BCD1D4AC8CC49880708FA9B378E3C4F3A9060BEE67CF9A4A4A695811051907E"
    "162753B56B0F6B410DBA74D8A84B2A14B3144E0EF1284754FD17ED950D5965B4B9DD46582DB1178D169C6BC465"
    "B0D6FF9CA3928FEF5B9AE4E418FC15E83EBEA0F87FA9FF5EED70050DED2849F47BF959D956850CE929851F0D81"
    "15F635B105EE2E4E15D04B2454BF6F4FADF034B10403119CD8E3B92FCC5B"
)
_SRP_G = 3


class FakeTelegramUnsupported(NotImplementedError):
    """The client sent a request the fake does not implement."""


@dataclass(frozen=True)
class SentMessage:
    chat_id: int
    message_id: int
    text: str
    reply_to: int | None
    date: int
    silent: bool = False


@dataclass
class _Failure:
    match: str
    error: str | BaseException
    times: int
    after: int
    peer: int | None


class _Raw:
    """A stored TL object's serialised bytes, reusable inside any answer's vector."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def _bytes(self) -> bytes:
        return self.data


@dataclass
class _Chat:
    """One peer on the fake server and its history (ids ascending, dates non-decreasing)."""

    marked_id: int
    entity: Any  # types.User | types.Chat | types.Channel
    peer: Any  # types.PeerUser | PeerChat | PeerChannel
    ids: list[int] = field(default_factory=list)
    dates: list[int] = field(default_factory=list)
    msgs: dict[int, Any] = field(default_factory=dict)
    raw: dict[int, _Raw] = field(default_factory=dict)
    pts: int = 1  # channels only: the channel's own update sequence
    next_id: int = 1  # channels only: channel-local message ids
    read_inbox_max_id: int = 0
    read_outbox_max_id: int = 0
    in_dialogs: bool = True
    log: list[tuple[int, Any]] = field(default_factory=list)  # channels: (pts, update)
    gen: _Generated | None = None  # a generated history (benchmarks): nothing stored per message

    @property
    def is_channel(self) -> bool:
        return isinstance(self.peer, types.PeerChannel)


class _GenDates:
    """The dates of a generated history as a sequence (``bisect`` works on it)."""

    __slots__ = ("n", "start", "step")

    def __init__(self, start: int, step: int, n: int) -> None:
        self.start, self.step, self.n = start, step, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.start + i * self.step


class _Generated:
    """Messages computed on request from serialised templates, so a 100k-message benchmark
    history costs the fake no memory. Each message's bytes equal ``bytes(types.Message(...))``
    of the same fields (``tests/test_telegram_fake.py`` checks it): the template is a real
    serialised Message, and only the id, date and fixed-width number in the text are patched."""

    _ID, _DATE, _NUM = 0x7A7B7C7D, 0x5A5B5C5D, "#" * 8

    def __init__(
        self, chat: _Chat, first_id: int, n: int, start: int, step: int, text: str, out_every: int
    ) -> None:
        self.first_id, self.n, self.out_every = first_id, n, out_every
        self.text = text
        self.dates = _GenDates(start, step, n)
        self.templates = {}
        for out in (False, True):
            data = bytes(
                self.message(chat.peer, self._ID, self._DATE, text.format(i=self._NUM), out)
            )
            i_id = data.index(struct.pack("<i", self._ID))
            i_date = data.index(struct.pack("<i", self._DATE))
            num = self._NUM.encode()
            i_num = data.index(num)
            assert i_id < i_date < i_num, "unexpected Message layout"
            self.templates[out] = (
                data[:i_id],
                data[i_id + 4 : i_date],
                data[i_date + 4 : i_num],
                data[i_num + len(num) :],
            )
        # The same templates as %-formats: id, date (both packed) and the number in the text.
        self._formats = tuple(
            b"%b%%b%b%%b%b%%08d%b" % tuple(part.replace(b"%", b"%%") for part in self.templates[o])
            for o in (False, True)
        )

    @staticmethod
    def message(peer: Any, mid: int, date: int, text: str, out: bool) -> types.Message:
        return types.Message(
            id=mid,
            peer_id=peer,
            date=_dtm(date),
            message=text,
            out=out or None,
            from_id=types.PeerUser(OWNER_ID) if out else None,
        )

    def is_out(self, index: int) -> bool:
        return self.out_every > 0 and index % self.out_every == self.out_every - 1

    def raw(self, index: int) -> bytes:
        a, b, c, d = self.templates[self.is_out(index)]
        return b"".join(
            (
                a,
                struct.pack("<i", self.first_id + index),
                b,
                struct.pack("<i", self.dates[index]),
                c,
                b"%08d" % index,
                d,
            )
        )

    def raws(self, ids: Iterable[int]) -> list[_Raw]:
        """``[_Raw(self.raw(id - first_id)) for id in ids]``, cheaper: one bytes formatting per
        message (the fake's CPU counts against the benchmark's)."""
        first, n, every = self.first_id, self.n, self.out_every
        start, step = self.dates.start, self.dates.step
        inc, outgoing = self._formats
        pack2 = _INT32.pack
        found = []
        for mid in ids:
            i = mid - first
            if not 0 <= i < n:
                raise IndexError(i)
            fmt = outgoing if every > 0 and i % every == every - 1 else inc
            found.append(_Raw(fmt % (pack2(mid), pack2(start + i * step), i)))
        return found


def _dtm(ts: int | float | None) -> _dt.datetime | None:
    return None if ts is None else _dt.datetime.fromtimestamp(int(ts), tz=UTC)


def _ts(value: _dt.datetime | None) -> int:
    """A TL date as unix seconds; 0 (how TL encodes "none") stays 0."""
    return 0 if value is None else int(value.timestamp())


def _serialize(obj: Any) -> bytes:
    if isinstance(obj, list):
        return _VECTOR + struct.pack("<i", len(obj)) + b"".join(_item_bytes(x) for x in obj)
    if isinstance(obj, bool):
        return struct.pack("<I", 0x997275B5 if obj else 0xBC799737)  # boolTrue / boolFalse
    return bytes(obj)


def _item_bytes(x: Any) -> bytes:
    if isinstance(x, int) and not isinstance(x, bool):
        return struct.pack("<q", x)
    return bytes(x)


# --- media builders -----------------------------------------------------------------------------
def _doc(
    mime: str, attributes: list[Any], size: int = 1024, data: bytes | None = None
) -> types.Document:
    doc = types.Document(
        id=int.from_bytes(os.urandom(7), "big"),
        access_hash=1,
        file_reference=b"ref",
        date=_dtm(1_600_000_000),
        mime_type=mime,
        size=size if data is None else len(data),
        dc_id=2,
        attributes=attributes,
    )
    if data is not None:
        # Not serialised (TL ignores unknown attributes): the fake reads it when the message
        # is stored and serves it through upload.getFile.
        doc._fake_data = data  # type: ignore[attr-defined]
    return doc


def photo() -> types.MessageMediaPhoto:
    return types.MessageMediaPhoto(
        photo=types.Photo(
            id=int.from_bytes(os.urandom(7), "big"),
            access_hash=1,
            file_reference=b"ref",
            date=_dtm(1_600_000_000),
            sizes=[types.PhotoSize(type="m", w=320, h=240, size=1000)],
            dc_id=2,
        )
    )


def sticker(emoji: str = "😀") -> types.MessageMediaDocument:
    return types.MessageMediaDocument(
        document=_doc(
            "image/webp",
            [
                types.DocumentAttributeSticker(alt=emoji, stickerset=types.InputStickerSetEmpty()),
                types.DocumentAttributeImageSize(w=512, h=512),
            ],
        )
    )


def voice(duration: int = 3, *, data: bytes | None = None) -> types.MessageMediaDocument:
    """A voice note; with ``data`` (e.g. OGG/Opus bytes) the fake serves it for download."""
    return types.MessageMediaDocument(
        voice=True,
        document=_doc(
            "audio/ogg", [types.DocumentAttributeAudio(duration=duration, voice=True)], data=data
        ),
    )


def audio(title: str = "Song", performer: str = "Band") -> types.MessageMediaDocument:
    return types.MessageMediaDocument(
        document=_doc(
            "audio/mpeg",
            [
                types.DocumentAttributeAudio(duration=180, title=title, performer=performer),
                types.DocumentAttributeFilename(file_name="song.mp3"),
            ],
        )
    )


def video() -> types.MessageMediaDocument:
    return types.MessageMediaDocument(
        video=True,
        document=_doc("video/mp4", [types.DocumentAttributeVideo(duration=5.0, w=640, h=480)]),
    )


def video_note(duration: float = 5.0, *, data: bytes | None = None) -> types.MessageMediaDocument:
    """A round video note; with ``data`` (e.g. MP4 bytes) the fake serves it for download."""
    return types.MessageMediaDocument(
        round=True,
        document=_doc(
            "video/mp4",
            [types.DocumentAttributeVideo(duration=duration, w=240, h=240, round_message=True)],
            data=data,
        ),
    )


def gif() -> types.MessageMediaDocument:
    return types.MessageMediaDocument(
        document=_doc(
            "video/mp4",
            [
                types.DocumentAttributeVideo(duration=2.0, w=320, h=240, nosound=True),
                types.DocumentAttributeAnimated(),
            ],
        )
    )


def document(name: str = "file.pdf") -> types.MessageMediaDocument:
    return types.MessageMediaDocument(
        document=_doc("application/pdf", [types.DocumentAttributeFilename(file_name=name)])
    )


def geo(lat: float = 55.75, long: float = 37.61) -> types.MessageMediaGeo:
    return types.MessageMediaGeo(geo=types.GeoPoint(long=long, lat=lat, access_hash=1))


def contact(first_name: str = "Bob", phone: str = "+10000000000") -> types.MessageMediaContact:
    return types.MessageMediaContact(
        phone_number=phone, first_name=first_name, last_name="", vcard="", user_id=0
    )


def poll(question: str = "Pizza?") -> types.MessageMediaPoll:
    return types.MessageMediaPoll(
        poll=types.Poll(
            id=1,
            question=types.TextWithEntities(text=question, entities=[]),
            answers=[
                types.PollAnswer(text=types.TextWithEntities(text="yes", entities=[]), option=b"1"),
                types.PollAnswer(text=types.TextWithEntities(text="no", entities=[]), option=b"2"),
            ],
            hash=0,
        ),
        results=types.PollResults(),
    )


def webpage(url: str = "https://example.com") -> types.MessageMediaWebPage:
    return types.MessageMediaWebPage(
        webpage=types.WebPage(id=1, url=url, display_url=url, hash=0, title="Example")
    )


# --- the server -----------------------------------------------------------------------------------
class FakeTelegram:
    """The fake server's state; see the module docstring for the API."""

    def __init__(
        self,
        *,
        me_first_name: str = "Owner",
        me_username: str | None = "owner",
        me_phone: str = "+70000000000",
        me_id: int = OWNER_ID,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._clock = clock or time.time
        self.latency_s = 0.0
        self.login_code = "12345"
        self.password: str | None = None
        self._srp_x_cache: tuple[str, int] | None = None
        self._srp: dict[int, tuple[int, bytes, int]] = {}  # srp_id -> (b, B bytes, v)
        self._salt1 = b"fake-salt-1"
        self._salt2 = b"fake-salt-2"
        self._chats: dict[int, _Chat] = {}
        self._users: dict[int, types.User] = {}
        self._user_raw: dict[int, _Raw] = {}
        self._next_user_id = 1000
        self._next_chat_id = 5000
        self._next_channel_id = 1_500_000_000
        self._msg_id = 0  # account-wide message ids (private chats and basic groups)
        self.pts = 1
        self._log: list[tuple[int, Any]] = []  # account updates (pts, update) for getDifference
        self.offline = False
        self.mute_updates = False
        self._authorized: set[bytes] = set()
        self._senders: list[FakeSender] = []
        self._failures: list[_Failure] = []
        self.calls: collections.Counter[str] = collections.Counter()
        self.sent: list[SentMessage] = []
        self.actions: list[tuple[int, str]] = []
        self.reactions_sent: list[tuple[int, int, list[str]]] = []
        self.edits: list[tuple[int, int, str]] = []
        self.reads: list[tuple[int, int]] = []
        self.deleted: list[tuple[int | None, list[int]]] = []
        # document id -> the bytes upload.getFile serves (attached with voice(data=...) etc.)
        self.files: dict[int, bytes] = {}
        self.downloads: list[tuple[int, int, int]] = []  # (document id, offset, limit)
        self.takeouts: dict[int, str] = {}
        self.takeout_scopes: dict[int, dict[str, Any]] = {}
        self._next_takeout = 7000
        self.owner_id = me_id  # OWNER_ID unless this fake is another account
        self.me = types.User(
            id=me_id,
            is_self=True,
            contact=False,
            access_hash=self._hash(me_id),
            first_name=me_first_name,
            username=me_username,
            phone=me_phone.lstrip("+"),
            status=types.UserStatusRecently(),
        )
        self._put_user(self.me)
        self._chats[me_id] = _Chat(me_id, self.me, types.PeerUser(me_id))

    # --- clock / ids ------------------------------------------------------------------------------
    def now(self) -> int:
        return int(self._clock())

    @staticmethod
    def _hash(entity_id: int) -> int:
        return (entity_id * 2654435761 + 97) % (1 << 62)

    # --- building the world -----------------------------------------------------------------------
    def _put_user(self, user: types.User) -> None:
        self._users[user.id] = user
        self._user_raw[user.id] = _Raw(bytes(user))

    def add_user(
        self,
        first_name: str | None,
        last_name: str | None = None,
        *,
        username: str | None = None,
        bot: bool = False,
        deleted: bool = False,
        contact: bool = True,
        phone: str | None = None,
        user_id: int | None = None,
    ) -> types.User:
        uid = user_id if user_id is not None else self._next_user_id
        self._next_user_id = max(self._next_user_id, uid) + 1
        user = types.User(
            id=uid,
            access_hash=self._hash(uid),
            first_name=None if deleted else first_name,
            last_name=None if deleted else last_name,
            username=None if deleted else username,
            phone=phone,
            bot=bot or None,
            bot_info_version=1 if bot else None,
            deleted=deleted or None,
            contact=(contact and not bot and not deleted) or None,
            mutual_contact=(contact and not bot and not deleted) or None,
            status=None if deleted else types.UserStatusRecently(),
        )
        self._put_user(user)
        self._chats[uid] = _Chat(uid, user, types.PeerUser(uid))
        return user

    def add_group(self, title: str, members: Iterable[types.User] = ()) -> types.Chat:
        cid = self._next_chat_id
        self._next_chat_id += 1
        members = list(members)
        chat = types.Chat(
            id=cid,
            title=title,
            photo=types.ChatPhotoEmpty(),
            participants_count=len(members) + 1,
            date=_dtm(1_600_000_000),
            version=1,
        )
        self._chats[-cid] = _Chat(-cid, chat, types.PeerChat(cid))
        return chat

    def add_channel(
        self, title: str, *, megagroup: bool = True, username: str | None = None
    ) -> types.Channel:
        cid = self._next_channel_id
        self._next_channel_id += 1
        channel = types.Channel(
            id=cid,
            title=title,
            photo=types.ChatPhotoEmpty(),
            date=_dtm(1_600_000_000),
            megagroup=megagroup or None,
            broadcast=(not megagroup) or None,
            access_hash=self._hash(cid),
            username=username,
            participants_count=10,
        )
        marked = -(10**12) - cid
        self._chats[marked] = _Chat(marked, channel, types.PeerChannel(cid))
        return channel

    def _chat(self, peer: Any) -> _Chat:
        if isinstance(peer, int):
            return self._chats[peer]
        if isinstance(peer, types.User):
            return self._chats[peer.id]
        if isinstance(peer, types.Chat):
            return self._chats[-peer.id]
        if isinstance(peer, types.Channel):
            return self._chats[-(10**12) - peer.id]
        if isinstance(peer, types.PeerUser):
            return self._chats[peer.user_id]
        if isinstance(peer, types.PeerChat):
            return self._chats[-peer.chat_id]
        if isinstance(peer, types.PeerChannel):
            return self._chats[-(10**12) - peer.channel_id]
        raise KeyError(peer)

    def marked_id(self, peer: Any) -> int:
        return self._chat(peer).marked_id

    def _new_id(self, chat: _Chat) -> int:
        if chat.is_channel:
            mid = chat.next_id
            chat.next_id += 1
            return mid
        self._msg_id += 1
        return self._msg_id

    def _store(self, chat: _Chat, msg: Any, *, read: bool = True) -> Any:
        if chat.gen is not None:
            raise FakeTelegramUnsupported("a generated history cannot take more messages")
        ts = int(msg.date.timestamp())
        if chat.ids and msg.id <= chat.ids[-1]:
            raise ValueError("messages must be added in id order")
        if chat.dates and ts < chat.dates[-1]:
            ts = chat.dates[-1]  # keep dates monotonic so offset_date paging stays simple
            msg.date = _dtm(ts)
        chat.ids.append(msg.id)
        chat.dates.append(ts)
        chat.msgs[msg.id] = msg
        chat.raw[msg.id] = _Raw(bytes(msg))
        chat.in_dialogs = True
        self._register_file(msg)
        if read and msg.out:
            chat.read_outbox_max_id = msg.id  # history built by add_*: the other side read it
        return msg

    def _register_file(self, msg: Any) -> None:
        """Serve the bytes a media builder attached to the message's document."""
        doc = getattr(getattr(msg, "media", None), "document", None)
        data = getattr(doc, "_fake_data", None)
        if data is not None:
            self.files[doc.id] = data

    def _fwd_header(self, fwd_from: Any, date: int) -> types.MessageFwdHeader | None:
        if fwd_from is None or isinstance(fwd_from, types.MessageFwdHeader):
            return fwd_from
        if isinstance(fwd_from, str):
            return types.MessageFwdHeader(date=_dtm(date - 3600), from_name=fwd_from)
        return types.MessageFwdHeader(date=_dtm(date - 3600), from_id=self._chat(fwd_from).peer)

    def _make_message(
        self,
        chat: _Chat,
        text: str,
        *,
        out: bool | None,
        sender: types.User | None,
        date: int | None,
        media: Any = None,
        reply_to: int | None = None,
        fwd_from: Any = None,
        grouped_id: int | None = None,
        edit_date: int | None = None,
        entities: list[Any] | None = None,
    ) -> types.Message:
        ts = self.now() if date is None else int(date)
        private = isinstance(chat.peer, types.PeerUser)
        broadcast = chat.is_channel and bool(chat.entity.broadcast)
        if private:
            is_out = bool(out) if out is not None else False
            if chat.marked_id == self.owner_id:
                is_out = True
            # Layer 119+: incoming private messages carry no from_id; outgoing ones name us.
            from_id = types.PeerUser(self.owner_id) if is_out else None
        else:
            who = sender or self.me
            is_out = who.id == self.owner_id if out is None else bool(out)
            from_id = None if broadcast else types.PeerUser(who.id)
        return types.Message(
            id=self._new_id(chat),
            peer_id=chat.peer,
            date=_dtm(ts),
            message=text,
            out=is_out or None,
            post=broadcast or None,
            from_id=from_id,
            fwd_from=self._fwd_header(fwd_from, ts),
            reply_to=types.MessageReplyHeader(reply_to_msg_id=reply_to) if reply_to else None,
            media=media,
            entities=entities,
            edit_date=_dtm(edit_date),
            grouped_id=grouped_id,
        )

    def add_message(
        self,
        peer: Any,
        text: str = "",
        *,
        out: bool | None = None,
        sender: types.User | None = None,
        date: int | None = None,
        media: Any = None,
        reply_to: int | None = None,
        fwd_from: Any = None,
        grouped_id: int | None = None,
        edit_date: int | None = None,
        entities: list[Any] | None = None,
    ) -> types.Message:
        chat = self._chat(peer)
        msg = self._make_message(
            chat,
            text,
            out=out,
            sender=sender,
            date=date,
            media=media,
            reply_to=reply_to,
            fwd_from=fwd_from,
            grouped_id=grouped_id,
            edit_date=edit_date,
            entities=entities,
        )
        return self._store(chat, msg)

    def add_service(
        self, peer: Any, action: Any, *, sender: types.User | None = None, date: int | None = None
    ) -> types.MessageService:
        chat = self._chat(peer)
        ts = self.now() if date is None else int(date)
        private = isinstance(chat.peer, types.PeerUser)
        who = sender or self.me
        msg = types.MessageService(
            id=self._new_id(chat),
            peer_id=chat.peer,
            date=_dtm(ts),
            action=action,
            out=(who.id == self.owner_id) or None,
            from_id=None if private else types.PeerUser(who.id),
        )
        return self._store(chat, msg)

    def add_history(
        self,
        peer: Any,
        n: int,
        *,
        start_date: int | None = None,
        step_s: int = 60,
        text: str = "msg {i}",
        out_every: int = 2,
        sender: types.User | None = None,
    ) -> list[int]:
        """``n`` text messages; returns their ids. Fast path for big histories."""
        chat = self._chat(peer)
        ts = start_date if start_date is not None else self.now() - n * step_s - 86_400
        if chat.dates:
            ts = max(ts, chat.dates[-1])
        private = isinstance(chat.peer, types.PeerUser)
        broadcast = chat.is_channel and bool(chat.entity.broadcast)
        other = sender
        if other is None and private:
            other = chat.entity
        ids = []
        for i in range(n):
            out = out_every > 0 and i % out_every == out_every - 1
            if private:
                from_id = types.PeerUser(self.owner_id) if out else None
            elif broadcast:
                from_id = None
            else:
                from_id = types.PeerUser(self.owner_id if out or other is None else other.id)
            msg = types.Message(
                id=self._new_id(chat),
                peer_id=chat.peer,
                date=_dtm(ts),
                message=text.format(i=i),
                out=out or None,
                post=broadcast or None,
                from_id=from_id,
            )
            chat.ids.append(msg.id)
            chat.dates.append(ts)
            chat.msgs[msg.id] = msg
            chat.raw[msg.id] = _Raw(bytes(msg))
            ids.append(msg.id)
            if out:
                chat.read_outbox_max_id = msg.id
            ts += step_s
        chat.in_dialogs = True
        return ids

    def add_generated_history(
        self,
        peer: Any,
        n: int,
        *,
        start_date: int | None = None,
        step_s: int = 60,
        text: str = "msg {i} — как дела? Всё хорошо, спасибо!",
        out_every: int = 2,
    ) -> range:
        """For benchmarks: ``n`` private text messages computed on request (ids contiguous).

        Nothing is stored per message, so the fake's memory does not grow with ``n``; the
        chat must be private and take no other messages. ``text`` needs one ``{i}``.
        """
        chat = self._chat(peer)
        if not isinstance(chat.peer, types.PeerUser) or chat.ids:
            raise FakeTelegramUnsupported("generated histories are for new private chats only")
        start = start_date if start_date is not None else self.now() - n * step_s - 86_400
        first = self._msg_id + 1
        self._msg_id += n
        chat.gen = _Generated(chat, first, n, start, step_s, text, out_every)
        chat.ids = range(first, first + n)  # type: ignore[assignment]
        chat.dates = chat.gen.dates  # type: ignore[assignment]
        chat.read_outbox_max_id = first + n - 1
        chat.in_dialogs = True
        return range(first, first + n)

    def _top(self, chat: _Chat) -> tuple[Any, Any]:
        """The newest message of a chat: (TL object, its serialised form)."""
        if chat.gen is not None:
            raw = _Raw(chat.gen.raw(chat.gen.n - 1))
            return BinaryReader(raw.data).tgread_object(), raw
        top = chat.ids[-1]
        return chat.msgs[top], chat.raw[top]

    def edit_message(
        self, peer: Any, msg_id: int, text: str, *, date: int | None = None, push: bool = False
    ) -> Any:
        chat = self._chat(peer)
        msg = chat.msgs[msg_id]
        msg.message = text
        msg.edit_date = _dtm(self.now() if date is None else date)
        chat.raw[msg_id] = _Raw(bytes(msg))
        if push:
            self._push_edit(chat, msg)
        return msg

    def delete_dialog(self, peer: Any) -> None:
        self._chat(peer).in_dialogs = False

    def messages(self, peer: Any) -> list[Any]:
        """The stored history of a chat, oldest first (real TL objects)."""
        chat = self._chat(peer)
        return [chat.msgs[i] for i in chat.ids]

    # --- clients ----------------------------------------------------------------------------------
    def install(self, client: TelegramClient, *, authorized: bool | None = None) -> FakeSender:
        """Wire ``client`` to this fake. ``authorized=True`` logs its auth key in."""
        session = client.session
        if not session.server_address:
            session.set_dc(*_FAKE_DC)
        if session.auth_key is None or session.auth_key.key is None:
            session.auth_key = AuthKey(os.urandom(256))
        if authorized:
            self._authorized.add(session.auth_key.key)
        sender = FakeSender(self, session.auth_key, client._updates_queue)
        client._sender = sender
        return sender

    def client(self, *, authorized: bool = True, session: Any = None, **kwargs: Any) -> Any:
        """A real ``TelegramClient`` wired to this fake (not yet connected)."""
        kwargs.setdefault("receive_updates", True)
        kwargs.setdefault("base_logger", "faketg.telethon")
        client = TelegramClient(session or StringSession(), API_ID, API_HASH, **kwargs)
        self.install(client, authorized=authorized)
        return client

    def file_session(self, path: Any) -> None:
        """Write an authorised Telethon file session (SQLite) at ``path``."""
        from telethon.sessions import SQLiteSession

        session = SQLiteSession(str(path))
        session.set_dc(*_FAKE_DC)
        session.auth_key = AuthKey(os.urandom(256))
        self._authorized.add(session.auth_key.key)
        session.save()
        session.close()

    def owner_reads(self, peer: Any, max_id: int) -> None:
        """The owner read ``peer``'s chat up to ``max_id`` on another device."""
        chat = self._chat(peer)
        chat.read_inbox_max_id = max(chat.read_inbox_max_id, max_id)

    def session_string(self) -> str:
        """A StringSession string whose auth key this fake considers logged in."""
        session = StringSession()
        session.set_dc(*_FAKE_DC)
        session.auth_key = AuthKey(os.urandom(256))
        self._authorized.add(session.auth_key.key)
        return session.save()

    async def settle(self, rounds: int = 50) -> None:
        """Yield to the event loop until connected clients have drained their update queues."""
        for _ in range(rounds):
            await asyncio.sleep(0)
            if all(s.updates_queue.empty() for s in self._senders if s.connected):
                break
        for _ in range(5):
            await asyncio.sleep(0)

    # --- failures ---------------------------------------------------------------------------------
    def fail_next(
        self,
        request: type | str,
        error: str | BaseException,
        *,
        times: int = 1,
        after: int = 0,
        peer: int | None = None,
    ) -> None:
        name = request if isinstance(request, str) else request.__name__
        self._failures.append(_Failure(name, error, times, after, peer))

    def clear_failures(self) -> None:
        self._failures.clear()

    def _check_failures(self, name: str, request: Any) -> None:
        for f in self._failures:
            if f.match != name or f.times <= 0:
                continue
            if f.peer is not None:
                peer = getattr(request, "peer", None) or getattr(request, "channel", None)
                try:
                    if peer is None or self._resolve(peer).marked_id != f.peer:
                        continue
                except _RpcError:
                    continue
            if f.after > 0:
                f.after -= 1
                continue
            f.times -= 1
            self._failures = [x for x in self._failures if x.times > 0]
            if isinstance(f.error, BaseException):
                raise f.error
            raise _RpcError(_error_code(f.error), f.error)

    # --- updates ----------------------------------------------------------------------------------
    def _deliver(self, updates: Any) -> None:
        if self.mute_updates:
            return
        data = bytes(updates)
        for sender in self._senders:
            if sender.connected:
                sender.updates_queue.put_nowait(BinaryReader(data).tgread_object())

    def _entities_for(self, msgs: Iterable[Any]) -> tuple[list[Any], list[Any]]:
        users: dict[int, Any] = {self.owner_id: self.me}
        chats: dict[int, Any] = {}
        for m in msgs:
            for p in (m.peer_id, m.from_id, getattr(m.fwd_from, "from_id", None)):
                if p is None:
                    continue
                c = self._chat(p)
                if isinstance(p, types.PeerUser):
                    users[c.entity.id] = c.entity
                else:
                    chats[c.marked_id] = c.entity
        return list(users.values()), list(chats.values())

    def _new_message_update(self, chat: _Chat, msg: Any) -> Any:
        if chat.is_channel:
            chat.pts += 1
            upd = types.UpdateNewChannelMessage(message=msg, pts=chat.pts, pts_count=1)
            chat.log.append((chat.pts, upd))
        else:
            self.pts += 1
            upd = types.UpdateNewMessage(message=msg, pts=self.pts, pts_count=1)
            self._log.append((self.pts, upd))
        return upd

    def _push_message(self, chat: _Chat, msg: Any) -> Any:
        self._store(chat, msg, read=False)
        upd = self._new_message_update(chat, msg)
        users, chats = self._entities_for([msg])
        self._deliver(types.Updates([upd], users, chats, _dtm(self.now()), 0))
        return msg

    def push_incoming(
        self,
        user: Any,
        text: str,
        *,
        reply_to: int | None = None,
        media: Any = None,
        fwd_from: Any = None,
        date: int | None = None,
    ) -> types.Message:
        chat = self._chat(user)
        msg = self._make_message(
            chat,
            text,
            out=False,
            sender=None,
            date=date,
            media=media,
            reply_to=reply_to,
            fwd_from=fwd_from,
        )
        return self._push_message(chat, msg)

    def push_outgoing(
        self,
        peer: Any,
        text: str,
        *,
        reply_to: int | None = None,
        date: int | None = None,
        fwd_from: Any = None,
    ) -> types.Message:
        chat = self._chat(peer)
        msg = self._make_message(
            chat, text, out=True, sender=self.me, date=date, reply_to=reply_to, fwd_from=fwd_from
        )
        return self._push_message(chat, msg)

    def push_group_message(
        self,
        peer: Any,
        sender: types.User | None,
        text: str,
        *,
        reply_to: int | None = None,
        date: int | None = None,
    ) -> types.Message:
        chat = self._chat(peer)
        msg = self._make_message(chat, text, out=None, sender=sender, date=date, reply_to=reply_to)
        return self._push_message(chat, msg)

    def _push_edit(self, chat: _Chat, msg: Any) -> None:
        if chat.is_channel:
            chat.pts += 1
            upd: Any = types.UpdateEditChannelMessage(message=msg, pts=chat.pts, pts_count=1)
            chat.log.append((chat.pts, upd))
        else:
            self.pts += 1
            upd = types.UpdateEditMessage(message=msg, pts=self.pts, pts_count=1)
            self._log.append((self.pts, upd))
        users, chats = self._entities_for([msg])
        self._deliver(types.Updates([upd], users, chats, _dtm(self.now()), 0))

    def push_edit(self, peer: Any, msg_id: int, text: str) -> Any:
        return self.edit_message(peer, msg_id, text, push=True)

    def _set_reactions(self, chat: _Chat, msg_id: int, emojis: list[str], by_owner: bool) -> Any:
        results = [
            types.ReactionCount(
                reaction=types.ReactionEmoji(emoticon=e),
                count=1,
                chosen_order=i if by_owner else None,
            )
            for i, e in enumerate(emojis)
        ]
        reactions = types.MessageReactions(results=results)
        msg = chat.msgs.get(msg_id)
        if msg is not None:
            msg.reactions = reactions
            chat.raw[msg_id] = _Raw(bytes(msg))
        return reactions

    def push_reaction(
        self, peer: Any, msg_id: int, emoji: str | None, *, by_owner: bool = False, count: int = 1
    ) -> None:
        chat = self._chat(peer)
        reactions = self._set_reactions(chat, msg_id, [emoji] if emoji else [], by_owner)
        for r in reactions.results:
            r.count = count
        upd = types.UpdateMessageReactions(peer=chat.peer, msg_id=msg_id, reactions=reactions)
        users, chats = self._entities_for([chat.msgs[msg_id]] if msg_id in chat.msgs else [])
        self._deliver(types.Updates([upd], users, chats, _dtm(self.now()), 0))

    def push_reactions_edit(
        self, peer: Any, msg_id: int, emojis: list[str], *, by_owner: bool = False
    ) -> None:
        """Reactions arriving the other way Telegram sends them: as UpdateEditMessage of the
        message, carrying its current ``reactions`` (the text is unchanged)."""
        chat = self._chat(peer)
        self._set_reactions(chat, msg_id, emojis, by_owner)
        self._push_edit(chat, chat.msgs[msg_id])

    def push_read(self, peer: Any, max_id: int) -> None:
        chat = self._chat(peer)
        chat.read_outbox_max_id = max(chat.read_outbox_max_id, max_id)
        if chat.is_channel:
            upd: Any = types.UpdateReadChannelOutbox(channel_id=chat.entity.id, max_id=max_id)
        else:
            self.pts += 1
            upd = types.UpdateReadHistoryOutbox(
                peer=chat.peer, max_id=max_id, pts=self.pts, pts_count=1
            )
            self._log.append((self.pts, upd))
        self._deliver(types.Updates([upd], [self.me], [], _dtm(self.now()), 0))

    def push_typing(self, user: Any) -> None:
        chat = self._chat(user)
        upd = types.UpdateUserTyping(user_id=chat.entity.id, action=types.SendMessageTypingAction())
        self._deliver(types.UpdateShort(update=upd, date=_dtm(self.now())))

    def push_raw(self, updates: Any) -> None:
        self._deliver(updates)

    # --- request handling -------------------------------------------------------------------------
    def _handle(self, sender: FakeSender, data: bytes, original: TLRequest) -> bytes:
        """Answer one serialised request; returns the serialised result or raises _RpcError."""
        request = BinaryReader(data).tgread_object()
        takeout_id = None
        while True:
            name = type(request).__name__
            self.calls[name] += 1
            if isinstance(request, _WRAPPERS):
                request = request.query
            elif isinstance(request, functions.InvokeWithTakeoutRequest):
                if self.takeouts.get(request.takeout_id) != "active":
                    raise _RpcError(400, "TAKEOUT_INVALID")
                takeout_id = request.takeout_id
                request = request.query
            else:
                break
        self._check_failures(name, request)
        handler = _HANDLERS.get(type(request))
        if handler is None:
            raise FakeTelegramUnsupported(f"the fake Telegram does not implement {name}")
        if name not in _NO_AUTH and sender.auth_key.key not in self._authorized:
            raise _RpcError(401, "AUTH_KEY_UNREGISTERED")
        result = handler(self, sender, request, takeout_id)
        return _serialize(result)

    def _resolve(self, peer: Any) -> _Chat:
        """An InputPeer/InputUser/InputChannel → the chat, checking access hashes like Telegram."""
        if isinstance(peer, types.InputPeerSelf | types.InputUserSelf):
            return self._chats[self.owner_id]
        if isinstance(peer, types.InputPeerUser | types.InputUser):
            chat = self._chats.get(peer.user_id)
            if chat is None or peer.access_hash != chat.entity.access_hash:
                raise _RpcError(400, "PEER_ID_INVALID")
            return chat
        if isinstance(peer, types.InputPeerChat):
            chat = self._chats.get(-peer.chat_id)
            if chat is None:
                raise _RpcError(400, "PEER_ID_INVALID")
            return chat
        if isinstance(peer, types.InputPeerChannel | types.InputChannel):
            chat = self._chats.get(-(10**12) - peer.channel_id)
            if chat is None or peer.access_hash != chat.entity.access_hash:
                raise _RpcError(400, "CHANNEL_INVALID")
            return chat
        if isinstance(peer, types.InputDialogPeer):
            return self._resolve(peer.peer)
        raise _RpcError(400, "PEER_ID_INVALID")

    def _state(self) -> types.updates.State:
        return types.updates.State(
            pts=self.pts, qts=0, date=_dtm(self.now()), seq=0, unread_count=0
        )

    def _page_entities(self, chat: _Chat, msgs: list[Any]) -> tuple[list[Any], list[Any]]:
        users: dict[int, Any] = {}
        chats: dict[int, Any] = {}
        if isinstance(chat.peer, types.PeerUser):
            users[chat.entity.id] = self._user_raw[chat.entity.id]
            users[self.owner_id] = self._user_raw[self.owner_id]
        else:
            chats[chat.marked_id] = chat.entity
        for m in msgs:
            f = m.from_id
            if f is not None and isinstance(f, types.PeerUser) and f.user_id not in users:
                users[f.user_id] = self._user_raw[f.user_id]
            fwd = m.fwd_from
            if fwd is not None and fwd.from_id is not None:
                c = self._chat(fwd.from_id)
                if isinstance(fwd.from_id, types.PeerUser):
                    users[c.entity.id] = self._user_raw[c.entity.id]
                else:
                    chats[c.marked_id] = c.entity
        return list(users.values()), list(chats.values())

    def _history(self, chat: _Chat, req: Any) -> Any:
        """messages.getHistory paging, as Telegram does it (newest first)."""
        ids, dates = chat.ids, chat.dates
        n = len(ids)
        limit = max(0, min(req.limit or 100, 100))
        if req.offset_id:
            pos = n - bisect.bisect_left(ids, req.offset_id)
        elif _ts(req.offset_date):
            pos = n - bisect.bisect_left(dates, _ts(req.offset_date))
        else:
            pos = 0
        # The window is computed before clamping: offset_id=X, add_offset=-k, limit=k gives the
        # k messages from X upwards, fewer when X is near the newest end.
        start = pos + (req.add_offset or 0)
        end = min(n, max(0, start + limit))
        start = min(max(0, start), end)
        lo, hi = n - end, n - start  # ascending slice [lo, hi)
        sel = list(ids[lo:hi])
        sel.reverse()
        if req.max_id:
            sel = [i for i in sel if i < req.max_id]
        if req.min_id:
            sel = [i for i in sel if i > req.min_id]
        gen = chat.gen
        if gen is not None:
            out = gen.raws(sel)
            users, chats = self._page_entities(chat, [])
        else:
            msgs = chat.msgs
            users, chats = self._page_entities(chat, [msgs[i] for i in sel])
            raw = chat.raw
            out = [raw[i] for i in sel]
        if chat.is_channel:
            return types.messages.ChannelMessages(
                pts=chat.pts, count=n, messages=out, topics=[], chats=chats, users=users
            )
        if len(out) == n:
            return types.messages.Messages(messages=out, topics=[], chats=chats, users=users)
        return types.messages.MessagesSlice(
            count=n, messages=out, topics=[], chats=chats, users=users
        )

    def _dialog(self, chat: _Chat) -> types.Dialog:
        return types.Dialog(
            peer=chat.peer,
            top_message=chat.ids[-1],
            read_inbox_max_id=chat.read_inbox_max_id,
            read_outbox_max_id=chat.read_outbox_max_id,
            unread_count=max(
                0, len(chat.ids) - bisect.bisect_right(chat.ids, chat.read_inbox_max_id)
            ),
            unread_mentions_count=0,
            unread_reactions_count=0,
            unread_poll_votes_count=0,
            notify_settings=types.PeerNotifySettings(),
            pts=chat.pts if chat.is_channel else None,
        )

    def _dialog_page(self, chats: list[_Chat]) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        dialogs, messages, users, ents = [], [], {}, {}
        for c in chats:
            dialogs.append(self._dialog(c))
            top, raw = self._top(c)
            messages.append(raw)
            for u in self._page_entities(c, [top])[0]:
                users[id(u)] = u
            if not isinstance(c.peer, types.PeerUser):
                ents[c.marked_id] = c.entity
        return dialogs, messages, list(ents.values()), list(users.values())

    def _send(self, sender: FakeSender, request: Any) -> Any:
        chat = self._resolve(request.peer)
        reply_to = getattr(request.reply_to, "reply_to_msg_id", None)
        msg = self._make_message(
            chat,
            request.message,
            out=True,
            sender=self.me,
            date=None,
            reply_to=reply_to,
            entities=request.entities,
        )
        self._store(chat, msg, read=False)
        self.sent.append(
            SentMessage(
                chat.marked_id,
                msg.id,
                request.message,
                reply_to,
                self.now(),
                bool(request.silent),
            )
        )
        upd = self._new_message_update(chat, msg)
        if isinstance(chat.peer, types.PeerUser):
            return types.UpdateShortSentMessage(
                id=msg.id,
                pts=upd.pts,
                pts_count=1,
                date=msg.date,
                out=True,
                entities=request.entities,
            )
        users, chats = self._entities_for([msg])
        return types.Updates(
            [types.UpdateMessageID(id=msg.id, random_id=request.random_id), upd],
            users,
            chats,
            msg.date,
            0,
        )


_WRAPPERS = (
    functions.InvokeWithLayerRequest
    | functions.InitConnectionRequest
    | functions.InvokeWithoutUpdatesRequest
)
_NO_AUTH = {
    "GetConfigRequest",
    "SendCodeRequest",
    "SignInRequest",
    "GetPasswordRequest",
    "CheckPasswordRequest",
    "GetStateRequest_",  # GetState needs authorisation (Telethon's is_user_authorized relies on it)
    "LogOutRequest",
}


class _RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _error_code(message: str) -> int:
    if message.startswith(("FLOOD_WAIT", "TAKEOUT_INIT_DELAY", "SLOWMODE_WAIT", "FLOOD_")):
        return 420
    if message.startswith(("AUTH_", "SESSION_", "USER_DEACTIVATED")):
        return 401
    if message.startswith("INTERNAL") or message == "RPC_CALL_FAIL":
        return 500
    return 400


# --- handlers -----------------------------------------------------------------------------------
def _h_config(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    return types.Config(
        date=_dtm(tg.now()),
        expires=_dtm(tg.now() + 3600),
        test_mode=False,
        this_dc=_FAKE_DC[0],
        dc_options=[types.DcOption(id=_FAKE_DC[0], ip_address=_FAKE_DC[1], port=_FAKE_DC[2])],
        dc_txt_domain_name="fake",
        chat_size_max=200,
        megagroup_size_max=200000,
        forwarded_count_max=100,
        online_update_period_ms=120000,
        offline_blur_timeout_ms=5000,
        offline_idle_timeout_ms=30000,
        online_cloud_timeout_ms=300000,
        notify_cloud_delay_ms=30000,
        notify_default_delay_ms=1500,
        push_chat_period_ms=60000,
        push_chat_limit=2,
        edit_time_limit=172800,
        revoke_time_limit=2147483647,
        revoke_pm_time_limit=2147483647,
        rating_e_decay=2419200,
        stickers_recent_limit=200,
        channels_read_media_period=604800,
        call_receive_timeout_ms=20000,
        call_ring_timeout_ms=90000,
        call_connect_timeout_ms=30000,
        call_packet_timeout_ms=10000,
        me_url_prefix="https://t.me/",
        caption_length_max=1024,
        message_length_max=4096,
        webfile_dc_id=4,
    )


def _h_get_users(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    out = []
    for u in r.id:
        try:
            out.append(tg._resolve(u).entity)
        except _RpcError:
            continue
    return out


def _h_get_full_user(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    user = tg._resolve(r.id).entity
    full = types.UserFull(
        id=user.id,
        settings=types.PeerSettings(),
        notify_settings=types.PeerNotifySettings(),
        common_chats_count=0,
    )
    return types.users.UserFull(full_user=full, chats=[], users=[user])


def _h_get_state(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    return tg._state()


def _h_get_difference(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    pending = [(p, u) for p, u in tg._log if p > r.pts]
    if not pending:
        return types.updates.DifferenceEmpty(date=_dtm(tg.now()), seq=0)
    new_messages, other = [], []
    for _, u in pending:
        if isinstance(u, types.UpdateNewMessage):
            new_messages.append(u.message)
        else:
            other.append(u)
    msgs = [getattr(u, "message", None) for _, u in pending]
    users, chats = tg._entities_for([m for m in msgs if m is not None])
    return types.updates.Difference(
        new_messages=new_messages,
        new_encrypted_messages=[],
        other_updates=other,
        chats=chats,
        users=users,
        state=tg._state(),
    )


def _h_get_channel_difference(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    chat = tg._resolve(r.channel)
    pending = [(p, u) for p, u in chat.log if p > r.pts]
    if not pending:
        return types.updates.ChannelDifferenceEmpty(pts=chat.pts, final=True)
    new_messages = [u.message for _, u in pending if isinstance(u, types.UpdateNewChannelMessage)]
    other = [u for _, u in pending if not isinstance(u, types.UpdateNewChannelMessage)]
    users, chats = tg._entities_for(
        [getattr(u, "message", None) for _, u in pending if getattr(u, "message", None) is not None]
    )
    return types.updates.ChannelDifference(
        pts=chat.pts,
        new_messages=new_messages,
        other_updates=other,
        chats=chats,
        users=users,
        final=True,
    )


def _h_get_dialogs(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    chats = [c for c in tg._chats.values() if c.in_dialogs and c.ids]
    chats.sort(key=lambda c: (c.dates[-1], c.ids[-1], c.marked_id), reverse=True)
    start = 0
    if _ts(r.offset_date) or r.offset_id:
        off_date = _ts(r.offset_date) or 2**31
        off_peer = None
        if r.offset_peer is not None and not isinstance(r.offset_peer, types.InputPeerEmpty):
            off_peer = tg._resolve(r.offset_peer).marked_id
        key = (off_date, r.offset_id, off_peer if off_peer is not None else 0)
        start = len(chats)
        for i, c in enumerate(chats):
            if (c.dates[-1], c.ids[-1], c.marked_id) < key:
                start = i
                break
    limit = max(1, min(r.limit or 100, 100))
    page = chats[start : start + limit]
    dialogs, messages, ents, users = tg._dialog_page(page)
    if start == 0 and len(page) == len(chats):
        return types.messages.Dialogs(dialogs=dialogs, messages=messages, chats=ents, users=users)
    return types.messages.DialogsSlice(
        count=len(chats), dialogs=dialogs, messages=messages, chats=ents, users=users
    )


def _h_get_peer_dialogs(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    page = [c for c in (tg._resolve(p) for p in r.peers) if c.ids]
    dialogs, messages, ents, users = tg._dialog_page(page)
    return types.messages.PeerDialogs(
        dialogs=dialogs, messages=messages, chats=ents, users=users, state=tg._state()
    )


def _h_get_history(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    return tg._history(tg._resolve(r.peer), r)


def _h_get_messages(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    if isinstance(r, functions.channels.GetMessagesRequest):
        chats = [tg._resolve(r.channel)]
    else:
        chats = [c for c in tg._chats.values() if not c.is_channel]
    out = []
    for ref in r.id:
        mid = getattr(ref, "id", None)
        found = None
        for c in chats:
            if mid in c.msgs:
                found = c.msgs[mid]
                break
        out.append(found if found is not None else types.MessageEmpty(id=mid or 0))
    users, ents = tg._entities_for([m for m in out if not isinstance(m, types.MessageEmpty)])
    if isinstance(r, functions.channels.GetMessagesRequest):
        return types.messages.ChannelMessages(
            pts=chats[0].pts, count=len(out), messages=out, topics=[], chats=ents, users=users
        )
    return types.messages.Messages(messages=out, topics=[], chats=ents, users=users)


_FILE_PART = 4096
_FILE_MAX_LIMIT = 1024 * 1024


def _h_get_file(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    """upload.getFile for documents, with Telegram's rules on parts: ``offset`` a multiple of
    4 KB, ``limit`` a multiple of 4 KB that divides 1 MB (``precise`` relaxes both to 1 KB and
    a 1 MB cap); the file reference and access hash must match the document's."""
    loc = r.location
    if not isinstance(loc, types.InputDocumentFileLocation):
        raise FakeTelegramUnsupported(f"upload.getFile of {type(loc).__name__}")
    doc = None
    for chat in tg._chats.values():
        for msg in chat.msgs.values():
            d = getattr(getattr(msg, "media", None), "document", None)
            if d is not None and d.id == loc.id:
                doc = d
                break
        if doc is not None:
            break
    if doc is None or loc.access_hash != doc.access_hash:
        raise _RpcError(400, "FILE_ID_INVALID")
    if loc.file_reference != doc.file_reference:
        raise _RpcError(400, "FILE_REFERENCE_EXPIRED")
    data = tg.files.get(doc.id)
    if data is None:
        raise FakeTelegramUnsupported("this document has no bytes attached (voice(data=...))")
    part = 1024 if r.precise else _FILE_PART
    if r.offset % part or r.limit % part or r.limit <= 0 or r.limit > _FILE_MAX_LIMIT:
        raise _RpcError(400, "LIMIT_INVALID")
    if not r.precise and _FILE_MAX_LIMIT % r.limit:
        raise _RpcError(400, "LIMIT_INVALID")
    if r.offset > len(data):
        raise _RpcError(400, "OFFSET_INVALID")
    tg.downloads.append((doc.id, r.offset, r.limit))
    return types.upload.File(
        type=types.storage.FilePartial(), mtime=0, bytes=data[r.offset : r.offset + r.limit]
    )


def _h_get_chats(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    if isinstance(r, functions.channels.GetChannelsRequest):
        return types.messages.Chats(chats=[tg._resolve(c).entity for c in r.id])
    return types.messages.Chats(chats=[tg._chats[-cid].entity for cid in r.id if -cid in tg._chats])


def _h_resolve_username(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    name = r.username.lower()
    for c in tg._chats.values():
        if (getattr(c.entity, "username", None) or "").lower() == name:
            if isinstance(c.peer, types.PeerUser):
                return types.contacts.ResolvedPeer(peer=c.peer, chats=[], users=[c.entity])
            return types.contacts.ResolvedPeer(peer=c.peer, chats=[c.entity], users=[])
    raise _RpcError(400, "USERNAME_NOT_OCCUPIED")


def _h_takeout_init(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    tg._next_takeout += 1
    tg.takeouts[tg._next_takeout] = "active"
    tg.takeout_scopes[tg._next_takeout] = {
        k: getattr(r, k)
        for k in (
            "contacts",
            "message_users",
            "message_chats",
            "message_megagroups",
            "message_channels",
            "files",
            "file_max_size",
        )
    }
    return types.account.Takeout(id=tg._next_takeout)


def _h_takeout_finish(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    if t is None:
        raise _RpcError(400, "TAKEOUT_REQUIRED")
    tg.takeouts[t] = "finished-ok" if r.success else "finished-failed"
    return True


def _h_send_message(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    return tg._send(s, r)


def _h_set_typing(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    chat = tg._resolve(r.peer)
    tg.actions.append((chat.marked_id, type(r.action).__name__))
    return True


def _h_send_reaction(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    chat = tg._resolve(r.peer)
    if r.msg_id not in chat.msgs:
        raise _RpcError(400, "MESSAGE_ID_INVALID")
    emojis = [x.emoticon for x in (r.reaction or []) if isinstance(x, types.ReactionEmoji)]
    tg.reactions_sent.append((chat.marked_id, r.msg_id, emojis))
    reactions = tg._set_reactions(chat, r.msg_id, emojis, True)
    upd = types.UpdateMessageReactions(peer=chat.peer, msg_id=r.msg_id, reactions=reactions)
    users, chats = tg._entities_for([chat.msgs[r.msg_id]])
    return types.Updates([upd], users, chats, _dtm(tg.now()), 0)


def _h_edit_message(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    chat = tg._resolve(r.peer)
    msg = chat.msgs.get(r.id)
    if msg is None:
        raise _RpcError(400, "MESSAGE_ID_INVALID")
    if r.message is not None:
        if r.message == msg.message:
            raise _RpcError(400, "MESSAGE_NOT_MODIFIED")
        msg.message = r.message
    msg.edit_date = _dtm(tg.now())
    chat.raw[r.id] = _Raw(bytes(msg))
    tg.edits.append((chat.marked_id, r.id, msg.message))
    if chat.is_channel:
        chat.pts += 1
        upd: Any = types.UpdateEditChannelMessage(message=msg, pts=chat.pts, pts_count=1)
        chat.log.append((chat.pts, upd))
    else:
        tg.pts += 1
        upd = types.UpdateEditMessage(message=msg, pts=tg.pts, pts_count=1)
        tg._log.append((tg.pts, upd))
    users, chats = tg._entities_for([msg])
    return types.Updates([upd], users, chats, _dtm(tg.now()), 0)


def _h_read_history(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    if isinstance(r, functions.channels.ReadHistoryRequest):
        chat = tg._resolve(r.channel)
        chat.read_inbox_max_id = max(chat.read_inbox_max_id, r.max_id)
        tg.reads.append((chat.marked_id, r.max_id))
        return True
    chat = tg._resolve(r.peer)
    chat.read_inbox_max_id = max(chat.read_inbox_max_id, r.max_id)
    tg.reads.append((chat.marked_id, r.max_id))
    tg.pts += 1
    upd = types.UpdateReadHistoryInbox(
        peer=chat.peer, max_id=r.max_id, still_unread_count=0, pts=tg.pts, pts_count=1
    )
    tg._log.append((tg.pts, upd))
    return types.messages.AffectedMessages(pts=tg.pts, pts_count=1)


def _h_delete_messages(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    if isinstance(r, functions.channels.DeleteMessagesRequest):
        chat = tg._resolve(r.channel)
        targets = [chat]
    else:
        chat = None
        targets = [c for c in tg._chats.values() if not c.is_channel]
    for c in targets:
        for mid in r.id:
            if mid in c.msgs:
                del c.msgs[mid]
                del c.raw[mid]
                i = bisect.bisect_left(c.ids, mid)
                del c.ids[i]
                del c.dates[i]
    tg.deleted.append((None if chat is None else chat.marked_id, list(r.id)))
    if chat is not None:
        chat.pts += 1
        return types.messages.AffectedMessages(pts=chat.pts, pts_count=1)
    tg.pts += 1
    upd = types.UpdateDeleteMessages(messages=list(r.id), pts=tg.pts, pts_count=1)
    tg._log.append((tg.pts, upd))
    return types.messages.AffectedMessages(pts=tg.pts, pts_count=1)


def _h_true(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    return True


# login -------------------------------------------------------------------------------------------
def _h_send_code(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    if r.phone_number.lstrip("+") != tg.me.phone:
        raise _RpcError(400, "PHONE_NUMBER_INVALID")
    return types.auth.SentCode(
        type=types.auth.SentCodeTypeApp(length=len(tg.login_code)), phone_code_hash="fakehash"
    )


def _h_sign_in(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    if r.phone_code != tg.login_code:
        raise _RpcError(400, "PHONE_CODE_INVALID")
    if tg.password is not None:
        s.pending_2fa = True
        raise _RpcError(401, "SESSION_PASSWORD_NEEDED")
    tg._authorized.add(s.auth_key.key)
    return types.auth.Authorization(user=tg.me)


def _srp_x(tg: FakeTelegram) -> int:
    from telethon.password import compute_hash

    password = tg.password or ""
    cached = tg._srp_x_cache
    if cached is None or cached[0] != password:  # PBKDF2 with 100k rounds: compute it once
        cached = (password, int.from_bytes(compute_hash(tg._algo(), password), "big"))
        tg._srp_x_cache = cached
    return cached[1]


def _h_get_password(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    from telethon.password import big_num_for_hash, sha256

    if tg.password is None:
        return types.account.Password(
            new_algo=tg._algo(),
            new_secure_algo=types.SecurePasswordKdfAlgoUnknown(),
            secure_random=os.urandom(32),
        )
    p = int.from_bytes(_SRP_P, "big")
    v = pow(_SRP_G, _srp_x(tg), p)
    k = int.from_bytes(sha256(_SRP_P, big_num_for_hash(_SRP_G)), "big")
    b = int.from_bytes(os.urandom(256), "big")
    big_b = (k * v + pow(_SRP_G, b, p)) % p
    srp_id = int.from_bytes(os.urandom(7), "big")
    b_bytes = big_num_for_hash(big_b)
    tg._srp[srp_id] = (b, b_bytes, v)
    return types.account.Password(
        new_algo=tg._algo(),
        new_secure_algo=types.SecurePasswordKdfAlgoUnknown(),
        secure_random=os.urandom(32),
        has_password=True,
        current_algo=tg._algo(),
        srp_B=b_bytes,
        srp_id=srp_id,
        hint="fake hint",
    )


def _h_check_password(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    from telethon.password import big_num_for_hash, sha256, xor

    check = r.password
    state = tg._srp.pop(getattr(check, "srp_id", None), None)
    if state is None or tg.password is None:
        raise _RpcError(400, "SRP_ID_INVALID")
    b, b_bytes, v = state
    p = int.from_bytes(_SRP_P, "big")
    a_big = int.from_bytes(check.A, "big")
    u = int.from_bytes(sha256(check.A, b_bytes), "big")
    secret = pow(a_big * pow(v, u, p) % p, b, p)
    key = sha256(big_num_for_hash(secret))
    m1 = sha256(
        xor(sha256(_SRP_P), sha256(big_num_for_hash(_SRP_G))),
        sha256(tg._salt1),
        sha256(tg._salt2),
        check.A,
        b_bytes,
        key,
    )
    if m1 != check.M1:
        raise _RpcError(400, "PASSWORD_HASH_INVALID")
    tg._authorized.add(s.auth_key.key)
    return types.auth.Authorization(user=tg.me)


def _h_log_out(tg: FakeTelegram, s: FakeSender, r: Any, t: Any) -> Any:
    tg._authorized.discard(s.auth_key.key)
    return types.auth.LoggedOut()


def _algo(self: FakeTelegram) -> Any:
    return types.PasswordKdfAlgoSHA256SHA256PBKDF2HMACSHA512iter100000SHA256ModPow(
        salt1=self._salt1, salt2=self._salt2, g=_SRP_G, p=_SRP_P
    )


FakeTelegram._algo = _algo  # type: ignore[attr-defined]

_HANDLERS: dict[type, Callable[..., Any]] = {
    functions.help.GetConfigRequest: _h_config,
    functions.users.GetUsersRequest: _h_get_users,
    functions.users.GetFullUserRequest: _h_get_full_user,
    functions.updates.GetStateRequest: _h_get_state,
    functions.updates.GetDifferenceRequest: _h_get_difference,
    functions.updates.GetChannelDifferenceRequest: _h_get_channel_difference,
    functions.messages.GetDialogsRequest: _h_get_dialogs,
    functions.messages.GetPeerDialogsRequest: _h_get_peer_dialogs,
    functions.messages.GetHistoryRequest: _h_get_history,
    functions.messages.GetMessagesRequest: _h_get_messages,
    functions.channels.GetMessagesRequest: _h_get_messages,
    functions.messages.GetChatsRequest: _h_get_chats,
    functions.channels.GetChannelsRequest: _h_get_chats,
    functions.contacts.ResolveUsernameRequest: _h_resolve_username,
    functions.account.InitTakeoutSessionRequest: _h_takeout_init,
    functions.account.FinishTakeoutSessionRequest: _h_takeout_finish,
    functions.messages.SendMessageRequest: _h_send_message,
    functions.messages.SetTypingRequest: _h_set_typing,
    functions.messages.SendReactionRequest: _h_send_reaction,
    functions.messages.EditMessageRequest: _h_edit_message,
    functions.messages.ReadHistoryRequest: _h_read_history,
    functions.channels.ReadHistoryRequest: _h_read_history,
    functions.messages.DeleteMessagesRequest: _h_delete_messages,
    functions.channels.DeleteMessagesRequest: _h_delete_messages,
    functions.account.UpdateStatusRequest: _h_true,
    functions.auth.SendCodeRequest: _h_send_code,
    functions.auth.SignInRequest: _h_sign_in,
    functions.account.GetPasswordRequest: _h_get_password,
    functions.auth.CheckPasswordRequest: _h_check_password,
    functions.auth.LogOutRequest: _h_log_out,
    functions.upload.GetFileRequest: _h_get_file,
}


class FakeSender:
    """Stands in for ``MTProtoSender``: same public surface, answers from ``FakeTelegram``."""

    def __init__(self, tg: FakeTelegram, auth_key: AuthKey, updates_queue: asyncio.Queue) -> None:
        self.tg = tg
        self.auth_key = auth_key
        self.updates_queue = updates_queue
        self._updates_queue = updates_queue  # what MTProtoSender._store_own_updates uses
        self.connected = False
        self.pending_2fa = False
        self._disconnected_future: asyncio.Future | None = None
        tg._senders.append(self)

    _store_own_updates = MTProtoSender._store_own_updates

    async def connect(self, connection: Any) -> bool:
        if self.tg.offline:
            raise ConnectionError("the fake Telegram is offline")
        if self.connected:
            return False
        if self.auth_key.key is None:
            self.auth_key.key = os.urandom(256)
        self.connected = True
        self._disconnected_future = asyncio.get_running_loop().create_future()
        return True

    def is_connected(self) -> bool:
        return self.connected

    def _transport_connected(self) -> bool:  # Telethon's keepalive loop asks
        return self.connected

    def _keepalive_ping(self, ping_id: int) -> None:
        pass

    async def disconnect(self) -> None:
        self.connected = False
        if self._disconnected_future is not None and not self._disconnected_future.done():
            self._disconnected_future.set_result(None)

    @property
    def disconnected(self) -> asyncio.Future:
        if self._disconnected_future is None:
            self._disconnected_future = asyncio.get_running_loop().create_future()
            self._disconnected_future.set_result(None)
        return asyncio.shield(self._disconnected_future)

    def send(self, request: Any, ordered: bool = False) -> Any:
        if not self.connected:
            raise ConnectionError("Cannot send requests while disconnected")
        if isinstance(request, list):
            return [self._send_one(r) for r in request]
        return self._send_one(request)

    def _send_one(self, request: TLRequest) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        data = bytes(request)  # serialised now, like RequestState does: later mutation is ignored
        if self.tg.latency_s > 0:
            loop.call_later(self.tg.latency_s, self._answer, future, data, request)
        else:
            loop.call_soon(self._answer, future, data, request)
        return future

    def _answer(self, future: asyncio.Future, data: bytes, request: TLRequest) -> None:
        if future.cancelled():
            return
        if not self.connected or self.tg.offline:
            future.set_exception(ConnectionError("disconnected"))
            return
        try:
            body = self.tg._handle(self, data, request)
        except _RpcError as e:
            future.set_exception(rpc_message_to_error(types.RpcError(e.code, e.message), request))
            return
        except BaseException as e:  # injected failures and FakeTelegramUnsupported
            future.set_exception(e)
            return
        try:
            result = request.read_result(BinaryReader(body))
        except Exception as e:
            future.set_exception(e)
            return
        self._store_own_updates(result)
        future.set_result(result)


__all__ = [
    "API_HASH",
    "API_ID",
    "OWNER_ID",
    "FakeSender",
    "FakeTelegram",
    "FakeTelegramUnsupported",
    "SentMessage",
    "TLObject",
    "audio",
    "contact",
    "document",
    "geo",
    "gif",
    "photo",
    "poll",
    "sticker",
    "video",
    "video_note",
    "voice",
    "webpage",
]

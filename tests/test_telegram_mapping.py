"""Telethon objects → domain dataclasses, on real ``telethon.tl.types`` objects that went
through a TL bytes round-trip (so they are exactly what Telethon hands us)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from telethon.extensions import BinaryReader
from telethon.tl import types

from doppelbot.core.domain import MediaKind, PeerKind
from doppelbot.store.history import MESSAGES, message_values, row_message
from doppelbot.telegram.mapping import action_name, map_account, map_message, map_peer
from tests import faketg

OWNER = 100
ALICE = 1000
T0 = 1_700_000_000


def _rt(obj: Any) -> Any:
    """The object as Telethon would parse it off the wire."""
    return BinaryReader(bytes(obj)).tgread_object()


def _msg(**kw: Any) -> Any:
    base: dict[str, Any] = {
        "id": 42,
        "peer_id": types.PeerUser(ALICE),
        "date": dt.datetime.fromtimestamp(T0, dt.UTC),
        "message": "",
    }
    base.update(kw)
    return _rt(types.Message(**base))


def test_incoming_private_text() -> None:
    m = map_message(_msg(message="привет"), owner_id=OWNER)
    assert (m.chat_id, m.message_id, m.sender_id, m.is_outgoing) == (ALICE, 42, ALICE, False)
    assert (m.text, m.date, m.edit_date, m.media_kind, m.service_action) == (
        "привет",
        T0,
        None,
        None,
        None,
    )


def test_outgoing_private_with_and_without_from_id() -> None:
    with_from = map_message(_msg(out=True, from_id=types.PeerUser(OWNER)), owner_id=OWNER)
    without = map_message(_msg(out=True), owner_id=OWNER)
    assert with_from.sender_id == without.sender_id == OWNER
    assert with_from.is_outgoing and without.is_outgoing


def test_group_channel_and_broadcast_senders() -> None:
    in_group = _msg(peer_id=types.PeerChannel(77), from_id=types.PeerUser(ALICE))
    m = map_message(in_group, owner_id=OWNER)
    assert m.chat_id == -1000000000077 and m.sender_id == ALICE
    basic = map_message(
        _msg(peer_id=types.PeerChat(5), from_id=types.PeerUser(ALICE)), owner_id=OWNER
    )
    assert basic.chat_id == -5 and basic.sender_id == ALICE
    post = map_message(_msg(peer_id=types.PeerChannel(77), post=True), owner_id=OWNER)
    assert post.sender_id == -1000000000077
    anonymous = map_message(_msg(peer_id=types.PeerChat(5)), owner_id=OWNER)
    assert anonymous.sender_id is None


def test_reply_edit_grouped() -> None:
    m = map_message(
        _msg(
            message="ok",
            reply_to=types.MessageReplyHeader(reply_to_msg_id=40),
            edit_date=dt.datetime.fromtimestamp(T0 + 60, dt.UTC),
            grouped_id=987654321,
        ),
        owner_id=OWNER,
    )
    assert (m.reply_to_message_id, m.edit_date, m.grouped_id) == (40, T0 + 60, 987654321)
    other_chat = map_message(
        _msg(
            reply_to=types.MessageReplyHeader(reply_to_msg_id=9, reply_to_peer_id=types.PeerUser(5))
        ),
        owner_id=OWNER,
    )
    assert other_chat.reply_to_message_id is None  # a reply into another chat is not ours


def test_forwarded_from_hidden_name_known_user_and_unknown_peer() -> None:
    date = dt.datetime.fromtimestamp(T0 - 3600, dt.UTC)
    hidden = map_message(
        _msg(fwd_from=types.MessageFwdHeader(date=date, from_name="Secret Sam")), owner_id=OWNER
    )
    assert hidden.is_forwarded and hidden.forwarded_from == "Secret Sam"
    bob = types.User(id=2000, first_name="Bob", last_name="Builder", access_hash=1)
    known = map_message(
        _msg(fwd_from=types.MessageFwdHeader(date=date, from_id=types.PeerUser(2000))),
        owner_id=OWNER,
        entities={2000: bob},
    )
    assert known.forwarded_from == "Bob Builder"
    unknown = map_message(
        _msg(fwd_from=types.MessageFwdHeader(date=date, from_id=types.PeerChannel(9))),
        owner_id=OWNER,
    )
    assert unknown.is_forwarded and unknown.forwarded_from == "-1000000000009"


@pytest.mark.parametrize(
    ("media", "kind", "emoji"),
    [
        (faketg.photo(), MediaKind.PHOTO, None),
        (faketg.sticker("🦆"), MediaKind.STICKER, "🦆"),
        (faketg.voice(), MediaKind.VOICE, None),
        (faketg.audio(), MediaKind.AUDIO, None),
        (faketg.video(), MediaKind.VIDEO, None),
        (faketg.video_note(), MediaKind.VIDEO_NOTE, None),
        (faketg.gif(), MediaKind.ANIMATION, None),
        (faketg.document(), MediaKind.DOCUMENT, None),
        (faketg.geo(), MediaKind.GEO, None),
        (faketg.contact(), MediaKind.CONTACT, None),
        (faketg.poll(), MediaKind.POLL, None),
        (faketg.webpage(), MediaKind.WEBPAGE, None),
        (types.MessageMediaDice(value=3, emoticon="🎲"), MediaKind.OTHER, None),
        (types.MessageMediaEmpty(), None, None),
    ],
)
def test_media_kinds(media: Any, kind: MediaKind | None, emoji: str | None) -> None:
    m = map_message(_msg(message="caption", media=media), owner_id=OWNER)
    assert (m.media_kind, m.sticker_emoji, m.text) == (kind, emoji, "caption")


def test_service_messages() -> None:
    service = _rt(
        types.MessageService(
            id=7,
            peer_id=types.PeerChat(5),
            date=dt.datetime.fromtimestamp(T0, dt.UTC),
            action=types.MessageActionChatAddUser(users=[ALICE]),
            from_id=types.PeerUser(OWNER),
            out=True,
        )
    )
    m = map_message(service, owner_id=OWNER)
    assert m.is_service and m.service_action == "chat_add_user" and m.text == ""
    assert m.sender_id == OWNER and m.is_outgoing and m.media_kind is None
    assert action_name(types.MessageActionPinMessage()) == "pin_message"
    assert action_name(types.MessageActionPhoneCall(call_id=1)) == "phone_call"


def test_mapped_message_survives_the_store_row() -> None:
    m = map_message(_msg(message="x", media=faketg.sticker("😀"), out=True), owner_id=OWNER)
    assert row_message(dict(zip(MESSAGES.columns, message_values(m), strict=True))) == m


def test_peers_and_account() -> None:
    user = _rt(
        types.User(
            id=ALICE,
            first_name="Alice",
            last_name="A",
            username="alice",
            contact=True,
            access_hash=5,
        )
    )
    p = map_peer(user)
    assert (p.peer_id, p.kind, p.display_name, p.is_contact, p.is_bot) == (
        ALICE,
        PeerKind.USER,
        "Alice A",
        True,
        False,
    )
    bot = map_peer(
        _rt(types.User(id=3, bot=True, bot_info_version=1, first_name="B", access_hash=1))
    )
    assert bot.kind is PeerKind.BOT and bot.is_bot
    gone = map_peer(_rt(types.User(id=4, deleted=True, access_hash=1)))
    assert gone.is_deleted and gone.kind is PeerKind.USER
    me = map_peer(_rt(types.User(id=OWNER, is_self=True, first_name="Me", access_hash=1)))
    assert me.is_self
    photo = types.ChatPhotoEmpty()
    when = dt.datetime.fromtimestamp(T0, dt.UTC)
    chat = map_peer(
        _rt(
            types.Chat(
                id=5, title="Family", photo=photo, participants_count=3, date=when, version=1
            )
        )
    )
    assert (chat.peer_id, chat.kind, chat.title) == (-5, PeerKind.GROUP, "Family")
    mega = map_peer(_rt(types.Channel(id=9, title="Team", photo=photo, date=when, megagroup=True)))
    assert (mega.peer_id, mega.kind) == (-1000000000009, PeerKind.GROUP)
    chan = map_peer(
        _rt(types.Channel(id=9, title="News", photo=photo, date=when, broadcast=True, username="n"))
    )
    assert (chan.kind, chan.username) == (PeerKind.CHANNEL, "n")
    acc = map_account(_rt(types.User(id=OWNER, first_name="Me", username="me", phone="7000")))
    assert (acc.user_id, acc.first_name, acc.username, acc.phone) == (OWNER, "Me", "me", "7000")


def test_fast_row_path_agrees_with_the_dataclass_path() -> None:
    from doppelbot.telegram.mapping import tl_message_values as fast_row

    date = dt.datetime.fromtimestamp(T0, dt.UTC)
    samples = [
        _msg(message="hi"),
        _msg(out=True, from_id=types.PeerUser(OWNER), media=faketg.sticker("🐱")),
        _msg(peer_id=types.PeerChannel(7), from_id=types.PeerUser(ALICE), grouped_id=3),
        _msg(
            fwd_from=types.MessageFwdHeader(date=date, from_name="X"),
            reply_to=types.MessageReplyHeader(reply_to_msg_id=1),
            edit_date=date,
            media=faketg.photo(),
        ),
        _rt(
            types.MessageService(
                id=9,
                peer_id=types.PeerUser(ALICE),
                date=date,
                action=types.MessageActionPinMessage(),
            )
        ),
    ]
    for sample in samples:
        assert fast_row(sample, owner_id=OWNER) == message_values(
            map_message(sample, owner_id=OWNER)
        )

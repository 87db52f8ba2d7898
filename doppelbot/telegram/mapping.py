"""Pure functions from Telethon objects to ``doppelbot.core.domain`` dataclasses.

The core never sees a Telethon type: the exporter, the live bot and the tests all go through
these functions, so "what a sticker is" or "who sent an outgoing private message" is decided in
one place. They read the raw TL attributes (no network, no client needed) and run in the
export's hot loop, so they stay cheap: no per-message allocations beyond the result.
"""

from __future__ import annotations

import re
from typing import Any

from telethon import utils
from telethon.tl import types

from doppelbot.core.domain import Account, MediaKind, Message, Peer, PeerKind
from doppelbot.store.history import MESSAGES, row_message

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")
_ACTION_NAMES: dict[type, str] = {}
_GEO = types.MessageMediaGeo | types.MessageMediaGeoLive | types.MessageMediaVenue


def to_unix(value: Any) -> int | None:
    """A Telethon datetime (or None) as UTC unix seconds."""
    if value is None:
        return None
    return int(value.timestamp())


def action_name(action: Any) -> str:
    """``MessageActionChatAddUser`` → ``chat_add_user`` (stable, short, greppable)."""
    cls = type(action)
    name = _ACTION_NAMES.get(cls)
    if name is None:
        base = cls.__name__.removeprefix("MessageAction") or cls.__name__
        name = _CAMEL.sub("_", base).lower()
        _ACTION_NAMES[cls] = name
    return name


def media_kind(media: Any) -> tuple[MediaKind | None, str | None]:
    """The kind of a message's media and, for stickers, the emoji it stands for."""
    if media is None or isinstance(media, types.MessageMediaEmpty):
        return None, None
    if isinstance(media, types.MessageMediaPhoto):
        return MediaKind.PHOTO, None
    if isinstance(media, types.MessageMediaDocument):
        return _document_kind(media)
    if isinstance(media, _GEO):
        return MediaKind.GEO, None
    if isinstance(media, types.MessageMediaContact):
        return MediaKind.CONTACT, None
    if isinstance(media, types.MessageMediaPoll):
        return MediaKind.POLL, None
    if isinstance(media, types.MessageMediaWebPage):
        return MediaKind.WEBPAGE, None
    return MediaKind.OTHER, None


def _document_kind(media: types.MessageMediaDocument) -> tuple[MediaKind, str | None]:
    doc = media.document
    attributes = getattr(doc, "attributes", None) or ()
    sticker = animated = video = audio = None
    for attr in attributes:
        if isinstance(attr, types.DocumentAttributeSticker):
            sticker = attr
        elif isinstance(attr, types.DocumentAttributeAnimated):
            animated = attr
        elif isinstance(attr, types.DocumentAttributeVideo):
            video = attr
        elif isinstance(attr, types.DocumentAttributeAudio):
            audio = attr
    if sticker is not None:
        return MediaKind.STICKER, sticker.alt or None
    if animated is not None:
        return MediaKind.ANIMATION, None
    if video is not None:
        if video.round_message or media.round:
            return MediaKind.VIDEO_NOTE, None
        return MediaKind.VIDEO, None
    if audio is not None:
        if audio.voice or media.voice:
            return MediaKind.VOICE, None
        return MediaKind.AUDIO, None
    if media.voice:
        return MediaKind.VOICE, None
    if media.round:
        return MediaKind.VIDEO_NOTE, None
    if media.video:
        return MediaKind.VIDEO, None
    return MediaKind.DOCUMENT, None


def forwarded_from(fwd: Any, entities: dict[int, Any] | None = None) -> str | None:
    """Who a forward came from, as a display string (hidden senders keep their name)."""
    if fwd is None:
        return None
    if fwd.from_name:
        return str(fwd.from_name)
    if fwd.from_id is not None:
        peer_id = utils.get_peer_id(fwd.from_id)
        entity = (entities or {}).get(peer_id)
        if entity is not None:
            name = utils.get_display_name(entity)
            if name:
                return name
        return str(peer_id)
    if fwd.post_author:
        return str(fwd.post_author)
    return None


def tl_message_values(
    msg: Any,
    owner_id: int,
    chat_id: int | None = None,
    entities: dict[int, Any] | None = None,
) -> tuple[Any, ...]:
    """A Telethon ``Message``/``MessageService`` as the values of a ``messages`` row.

    The same values as ``history.message_values(map_message(...))`` (in
    ``history.MESSAGES.columns`` order, booleans as 0/1, the media kind as its value) without
    the intermediate dataclass: the export's hot loop writes hundreds of thousands of rows.
    ``tests/test_telegram_mapping.py`` checks the two paths agree.
    """
    peer = msg.peer_id
    if chat_id is None:
        chat_id = utils.get_peer_id(peer)
    out = msg.out
    from_id = msg.from_id
    if from_id is not None:
        # PeerUser is by far the most common sender; skip the generic helper for it.
        sender_id: int | None = (
            from_id.user_id if type(from_id) is types.PeerUser else utils.get_peer_id(from_id)
        )
    elif out:
        sender_id = owner_id
    elif isinstance(peer, types.PeerUser) or msg.post:
        sender_id = chat_id
    else:
        sender_id = None
    reply = msg.reply_to
    reply_id = None
    if type(reply) is types.MessageReplyHeader and reply.reply_to_peer_id is None:
        reply_id = reply.reply_to_msg_id
    fwd = msg.fwd_from
    if isinstance(msg, types.MessageService):
        kind = emoji = grouped = None
        action: str | None = action_name(msg.action)
        text = ""
    else:
        media = msg.media
        if media is None:
            kind = emoji = None
        else:
            media_k, emoji = media_kind(media)
            kind = None if media_k is None else media_k.value
        action = None
        text = msg.message or ""
        grouped = msg.grouped_id
    edit = msg.edit_date
    return (
        chat_id,
        msg.id,
        sender_id,
        1 if out else 0,
        int(msg.date.timestamp()),
        None if edit is None else int(edit.timestamp()),
        text,
        reply_id,
        0 if fwd is None else 1,
        None if fwd is None else forwarded_from(fwd, entities),
        kind,
        emoji,
        grouped,
        action,
    )


def map_message(
    msg: Any,
    *,
    owner_id: int,
    chat_id: int | None = None,
    entities: dict[int, Any] | None = None,
) -> Message:
    """A Telethon ``Message``/``MessageService`` → ``domain.Message``.

    ``owner_id`` decides the sender of outgoing private messages, which Telegram may send
    without ``from_id``. ``entities`` (marked id → User/Chat/Channel) resolves the name of a
    forward's origin; without it the origin's marked id is stored.
    """
    values = tl_message_values(msg, owner_id, chat_id, entities)
    return row_message(dict(zip(MESSAGES.columns, values, strict=True)))


def peer_kind(entity: Any) -> PeerKind:
    if isinstance(entity, types.User):
        return PeerKind.BOT if entity.bot else PeerKind.USER
    if isinstance(entity, types.Channel):
        return PeerKind.GROUP if entity.megagroup or entity.gigagroup else PeerKind.CHANNEL
    return PeerKind.GROUP


def map_peer(entity: Any) -> Peer:
    """A Telethon ``User``/``Chat``/``Channel`` → ``domain.Peer`` (marked id)."""
    peer_id = utils.get_peer_id(entity)
    if isinstance(entity, types.User | types.UserEmpty):
        empty = isinstance(entity, types.UserEmpty)
        return Peer(
            peer_id=peer_id,
            kind=PeerKind.BOT if getattr(entity, "bot", False) else PeerKind.USER,
            first_name=getattr(entity, "first_name", None),
            last_name=getattr(entity, "last_name", None),
            username=getattr(entity, "username", None),
            is_bot=bool(getattr(entity, "bot", False)),
            is_deleted=empty or bool(getattr(entity, "deleted", False)),
            is_contact=bool(getattr(entity, "contact", False)),
            is_self=bool(getattr(entity, "is_self", False)),
        )
    return Peer(
        peer_id=peer_id,
        kind=peer_kind(entity),
        title=getattr(entity, "title", None),
        username=getattr(entity, "username", None),
    )


def map_account(user: Any) -> Account:
    """The logged-in ``User`` → ``domain.Account``."""
    return Account(
        user_id=user.id,
        first_name=user.first_name,
        last_name=user.last_name,
        username=user.username,
        phone=user.phone,
    )

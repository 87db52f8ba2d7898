"""Import a Telegram Desktop JSON export (``result.json``) into the history tables.

Why: many people already have a Desktop export, or cannot use the MTProto export (no API id,
an account that must not run a userbot). The file goes into the same ``messages``/``peers``
tables as ``doppelbot export``, with the same ids (Telethon's marked chat ids, Telegram's
message ids), so the two sources merge: re-importing or exporting the same chat later upserts
the same rows instead of duplicating them.

Both layouts are read: the single-chat export (``{"name", "type", "id", "messages"}``) and the
full-account export (``{"personal_information", "chats": {"list": [...]}}``).

All or nothing, in bounded transactions: the whole file is parsed and validated into rows
*before* the first write (it is in memory anyway: JSON is parsed whole), so a malformed or
truncated file raises ``ImportFormatError`` naming the position (``line 12 column 5`` for broken
JSON, ``chats.list[3].messages[17]`` for a bad message) and writes nothing. The rows are then
written in transactions of at most ``CHUNK_ROWS`` messages (well under a second each), not one
transaction for the whole file: a running bot writing to the same database never waits long for
the lock. A kill between two of them leaves some chats partly imported; since every write is an
upsert keyed on (chat id, message id), importing the file again completes it, and the counts
say how many messages were new and how many were already stored.

Dates: ``date_unixtime`` when present (Desktop ≥ 2.x); older files only have a local-time
``date`` string, read as this machine's local time.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doppelbot.core.domain import Account, MediaKind, Message, Peer, PeerKind
from doppelbot.core.errors import ImportFormatError
from doppelbot.importers.desktop_voice import note_row
from doppelbot.store import accounts, history, transcripts
from doppelbot.store.database import Database, now

CHANNEL_OFFSET = 10**12  # Telethon marks channel ids as -(10**12 + id)
CHUNK_ROWS = 5_000  # messages per write transaction
# Telegram's ids fit in 53 bits; anything larger is not from Telegram (and would not fit
# SQLite's 64-bit integers once marked).
MAX_ID = 2**53
MAX_UNIX_TIME = 253_402_300_799  # 9999-12-31: a later "date" is not a date

_USER_CHATS = {"personal_chat", "saved_messages", "bot_chat"}
_GROUP_CHATS = {"private_group", "private_supergroup", "public_supergroup"}
_CHANNEL_CHATS = {"private_channel", "public_channel"}

_MEDIA_TYPES = {
    "sticker": MediaKind.STICKER,
    "voice_message": MediaKind.VOICE,
    "video_message": MediaKind.VIDEO_NOTE,
    "animation": MediaKind.ANIMATION,
    "video_file": MediaKind.VIDEO,
    "audio_file": MediaKind.AUDIO,
}


@dataclass(frozen=True, slots=True)
class ImportOptions:
    include_groups: bool = False
    include_channels: bool = False
    include_saved: bool = False
    include_bots: bool = False
    owner_id: int | None = None


@dataclass(frozen=True, slots=True)
class ImportResult:
    chats: int
    messages: int  # messages read from the file (of the chats imported)
    skipped_chats: int
    skipped: dict[str, int]
    new: int = 0  # not stored before this import
    already: int = 0  # stored before (an earlier import or export of the same chat)


Progress = Callable[[int, int], None]  # (messages written, messages to write)


def _fail(where: str, problem: str) -> ImportFormatError:
    return ImportFormatError(f"not a valid Telegram Desktop export at {where}: {problem}")


HTML_HELP = (
    "doppelbot reads the JSON export: in Telegram Desktop export again with Settings → "
    "Advanced → Export Telegram data, Format: 'Machine-readable JSON'"
)


def resolve_path(path: Path) -> Path:
    if path.is_dir():
        if not (path / "result.json").is_file() and (path / "messages.html").is_file():
            raise ImportFormatError(f"{path} holds an HTML export; {HTML_HELP}")
        path = path / "result.json"
    if not path.is_file():
        raise ImportFormatError(f"no Telegram Desktop export at {path} (expected result.json)")
    return path


def _not_json_number(name: str) -> Any:
    raise ImportFormatError(
        f"{name} is not a JSON number (Telegram never writes it: is this a Telegram export?)"
    )


def load_export(path: Path) -> Any:
    """Parse the JSON; broken JSON → ``ImportFormatError`` with line and column."""
    path = resolve_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ImportFormatError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ImportFormatError(f"{path}: cannot read: {exc.strerror}") from None
    text = text.removeprefix("\ufeff")
    if text.lstrip()[:15].lower().startswith(("<!doctype html", "<html")):
        raise ImportFormatError(f"{path} is an HTML export; {HTML_HELP}")
    try:
        return json.loads(text, parse_constant=_not_json_number)
    except ImportFormatError as exc:
        raise ImportFormatError(f"{path}: {exc}") from None
    except RecursionError:
        raise ImportFormatError(
            f"{path}: the JSON is nested too deeply (not a Telegram Desktop export)"
        ) from None
    except json.JSONDecodeError as exc:
        # At the end of the input, or inside a string that never closes: the file was cut off.
        cut = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        what = "the file ends too early (truncated?)" if cut else exc.msg
        raise ImportFormatError(
            f"{path}: broken JSON at line {exc.lineno} column {exc.colno}: {what}"
        ) from None


def _checked_id(value: Any, where: str, what: str) -> int:
    """An integer id as Telegram makes them (positive, 53 bits at most)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(where, f"{what} is missing or not an integer")
    if not 0 < value < MAX_ID:
        raise _fail(where, f"{what} {value} is out of range for a Telegram id")
    return value


def marked_chat_id(chat_type: str, raw_id: int) -> int:
    """Desktop's bare chat id → Telethon's marked id."""
    if chat_type in _USER_CHATS:
        return raw_id
    if chat_type == "private_group":
        return -raw_id
    return -(CHANNEL_OFFSET + raw_id)


def parse_from_id(value: Any, where: str) -> int | None:
    """``"user123"`` / ``"channel123"`` / ``"chat123"`` → a marked peer id."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if not -MAX_ID - CHANNEL_OFFSET < value < MAX_ID:
            raise _fail(where, f"from_id {value} is out of range for a Telegram id")
        return value
    if not isinstance(value, str):
        raise _fail(where, f"from_id must be a string like 'user123', got {value!r:.60}")
    for prefix, mark in (("user", 1), ("channel", -1), ("chat", 0)):
        if value.startswith(prefix) and value[len(prefix) :].isdigit():
            n = _checked_id(int(value[len(prefix) :]), where, "from_id")
            if mark == 1:
                return n
            return -(CHANNEL_OFFSET + n) if mark == -1 else -n
    raise _fail(where, f"from_id must look like 'user123', got {value!r}")


def flatten_text(value: Any, where: str) -> str:
    """``text`` is a string or a list of strings and ``{"type", "text"}`` parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise _fail(f"{where}.text[{i}]", "expected a string or {'type','text'} object")
        return "".join(parts)
    raise _fail(f"{where}.text", f"expected a string or a list, got {type(value).__name__}")


def _unix(msg: dict[str, Any], key: str, where: str, *, required: bool) -> int | None:
    raw_unix = msg.get(f"{key}_unixtime")
    if raw_unix is not None:
        try:
            value = int(raw_unix)
        except (TypeError, ValueError, OverflowError):
            raise _fail(f"{where}.{key}_unixtime", f"not a number: {raw_unix!r:.60}") from None
        if not 0 <= value <= MAX_UNIX_TIME:
            raise _fail(f"{where}.{key}_unixtime", f"not a date: {value}")
        return value
    raw = msg.get(key)
    if raw is None:
        if required:
            raise _fail(where, f"'{key}' is missing")
        return None
    try:
        return int(dt.datetime.fromisoformat(str(raw)).timestamp())
    except (ValueError, OverflowError):
        raise _fail(f"{where}.{key}", f"not a date: {raw!r:.60}") from None


def _media(msg: dict[str, Any]) -> MediaKind | None:
    if "photo" in msg:
        return MediaKind.PHOTO
    media_type = msg.get("media_type")
    if media_type is not None:
        return _MEDIA_TYPES.get(str(media_type), MediaKind.OTHER)
    if "file" in msg:
        return MediaKind.DOCUMENT
    if "location_information" in msg:
        return MediaKind.GEO
    if "contact_information" in msg:
        return MediaKind.CONTACT
    if "poll" in msg:
        return MediaKind.POLL
    if any(k in msg for k in ("game_title", "invoice_information", "dice", "todo_list")):
        return MediaKind.OTHER
    return None


def map_desktop_message(
    msg: Any, *, chat_id: int, owner_id: int | None, other_id: int | None, where: str
) -> Message:
    """One Desktop message object → ``domain.Message`` (``where`` names it in errors)."""
    if not isinstance(msg, dict):
        raise _fail(where, f"a message must be an object, got {type(msg).__name__}")
    mid = _checked_id(msg.get("id"), where, "'id'")
    kind = msg.get("type", "message")
    service = kind == "service"
    if kind not in ("message", "service"):
        raise _fail(f"{where}.type", f"unknown message type {kind!r}")
    sender = parse_from_id(msg.get("actor_id" if service else "from_id"), where)
    if owner_id is not None and sender is not None:
        outgoing = sender == owner_id
    elif other_id is not None and sender is not None:
        outgoing = sender != other_id  # a private chat has two speakers
    else:
        outgoing = False
    reply = msg.get("reply_to_message_id")
    if reply is not None:
        reply = _checked_id(reply, f"{where}.reply_to_message_id", "the replied-to id")
    if msg.get("reply_to_peer_id") is not None:
        reply = None  # a reply to a message in another chat
    forwarded = "forwarded_from" in msg
    action = msg.get("action") if service else None
    if service and not isinstance(action, str):
        action = "unknown"
    emoji = msg.get("sticker_emoji")
    return Message(
        chat_id=chat_id,
        message_id=mid,
        sender_id=sender,
        is_outgoing=outgoing,
        date=_unix(msg, "date", where, required=True) or 0,
        text="" if service else flatten_text(msg.get("text"), where),
        edit_date=_unix(msg, "edited", where, required=False),
        reply_to_message_id=reply,
        is_forwarded=forwarded,
        forwarded_from=str(msg["forwarded_from"]) if msg.get("forwarded_from") else None,
        media_kind=None if service else _media(msg),
        sticker_emoji=str(emoji) if emoji else None,
        grouped_id=None,
        service_action=action,
    )


def _chats(data: Any) -> tuple[list[tuple[str, Any]], int | None, dict[str, Any] | None]:
    """(where, chat) pairs, the owner's id and profile, for either layout."""
    if not isinstance(data, dict):
        raise _fail("the top level", "expected a JSON object")
    if "messages" in data:
        return [("the chat", data)], None, None
    chats = data.get("chats")
    if not isinstance(chats, dict) or not isinstance(chats.get("list"), list):
        raise _fail(
            "the top level",
            "neither a single-chat export ('messages') nor a full export ('chats.list')",
        )
    owner = None
    me = data.get("personal_information")
    if isinstance(me, dict) and me.get("user_id") is not None:
        owner = _checked_id(me["user_id"], "personal_information", "user_id")
    pairs = [(f"chats.list[{i}]", chat) for i, chat in enumerate(chats["list"])]
    left = data.get("left_chats")
    if isinstance(left, dict) and isinstance(left.get("list"), list):
        pairs += [(f"left_chats.list[{i}]", chat) for i, chat in enumerate(left["list"])]
    return pairs, owner, me if isinstance(me, dict) else None


def _peer_for_chat(chat_type: str, chat_id: int, name: Any, owner_id: int | None) -> Peer:
    if chat_type in _USER_CHATS:
        return Peer(
            peer_id=chat_id,
            kind=PeerKind.BOT if chat_type == "bot_chat" else PeerKind.USER,
            first_name=str(name) if name else None,
            is_bot=chat_type == "bot_chat",
            is_deleted=not name and chat_type == "personal_chat",
            is_self=chat_type == "saved_messages" or chat_id == owner_id,
        )
    kind = PeerKind.CHANNEL if chat_type in _CHANNEL_CHATS else PeerKind.GROUP
    return Peer(peer_id=chat_id, kind=kind, title=str(name) if name else None)


@dataclass(slots=True)
class _ChatRows:
    peer: Peer
    rows: list[tuple[Any, ...]]
    senders: dict[int, str]
    notes: list[tuple[Any, ...]]  # voice/round-video notes' media rows (``desktop_voice``)


def _chat_rows(
    where: str,
    chat: Any,
    owner_id: int | None,
    options: ImportOptions,
    base_dir: Path | None = None,
) -> _ChatRows | str:
    """Rows of one chat, or the reason it is skipped."""
    if not isinstance(chat, dict):
        raise _fail(where, "a chat must be an object")
    chat_type = chat.get("type")
    if not isinstance(chat_type, str):
        raise _fail(where, "'type' is missing")
    raw_id = _checked_id(chat.get("id"), where, "'id'")
    messages = chat.get("messages")
    if not isinstance(messages, list):
        raise _fail(where, "'messages' is missing or not a list")
    if chat_type == "saved_messages" and owner_id is not None:
        raw_id = owner_id
    chat_id = marked_chat_id(chat_type, raw_id)
    if chat_type == "bot_chat" and not options.include_bots:
        return "bots"
    if chat_type == "saved_messages" and not options.include_saved:
        return "saved messages"
    if chat_type in _GROUP_CHATS and not options.include_groups:
        return "groups"
    if chat_type in _CHANNEL_CHATS and not options.include_channels:
        return "channels"
    if chat_type not in _USER_CHATS | _GROUP_CHATS | _CHANNEL_CHATS:
        return f"chats of type {chat_type}"
    other_id = chat_id if chat_type in ("personal_chat", "bot_chat") else None
    if owner_id is None and other_id is None:
        raise ImportFormatError(
            f"{where} ({chat_type}): cannot tell which messages are yours in a group export; "
            "pass --owner-id (your numeric Telegram id) or run `doppelbot login` first"
        )
    peer = _peer_for_chat(chat_type, chat_id, chat.get("name"), owner_id)
    rows: list[tuple[Any, ...]] = []
    senders: dict[int, str] = {}
    notes: list[tuple[Any, ...]] = []
    ts = now()
    for j, raw in enumerate(messages):
        at = f"{where}.messages[{j}]"
        m = map_desktop_message(
            raw, chat_id=chat_id, owner_id=owner_id, other_id=other_id, where=at
        )
        rows.append(history.message_values(m))
        if m.is_voice_note and (note := note_row(raw, chat_id, m.message_id, base_dir, ts)):
            notes.append(note)
        if m.sender_id is not None and m.sender_id not in senders:
            name = raw.get("actor" if m.is_service else "from")
            senders[m.sender_id] = str(name) if name else ""
    return _ChatRows(peer, rows, senders, notes)


def _sender_peers(senders: dict[int, str], owner_id: int | None) -> Iterator[Peer]:
    for peer_id, name in senders.items():
        if peer_id > 0:
            yield Peer(
                peer_id=peer_id,
                kind=PeerKind.USER,
                first_name=name or None,
                is_deleted=not name,
                is_self=peer_id == owner_id,
            )
        elif peer_id < -CHANNEL_OFFSET:
            yield Peer(peer_id=peer_id, kind=PeerKind.CHANNEL, title=name or None)
        else:
            yield Peer(peer_id=peer_id, kind=PeerKind.GROUP, title=name or None)


def _owner_account(user_id: int, profile: dict[str, Any] | None) -> Account:
    """The exporting account as the file's ``personal_information`` describes it."""

    def text(key: str) -> str | None:
        value = (profile or {}).get(key)
        return value.strip() or None if isinstance(value, str) else None

    username = text("username")
    return Account(
        user_id,
        first_name=text("first_name"),
        last_name=text("last_name"),
        username=username.lstrip("@") if username else None,
        phone=text("phone_number"),
    )


async def import_desktop_export(
    db: Database,
    path: Path,
    options: ImportOptions | None = None,
    *,
    progress: Progress | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> ImportResult:
    """Import ``path`` (result.json or its folder): validated whole before anything is written,
    then written in transactions of ``chunk_rows`` messages; idempotent."""
    options = options or ImportOptions()
    data = load_export(path)
    base_dir = resolve_path(path).parent  # the notes' files are relative to result.json
    pairs, file_owner, profile = _chats(data)
    owner_id = options.owner_id or file_owner
    known = await accounts.identity(db)
    if owner_id is None:
        owner_id = known.user_id if known else None
    if owner_id is not None:
        _checked_id(owner_id, "--owner-id", "the owner id")
    built: list[_ChatRows] = []
    skipped: dict[str, int] = {}
    for where, chat in pairs:
        result = _chat_rows(where, chat, owner_id, options, base_dir)
        if isinstance(result, str):
            skipped[result] = skipped.get(result, 0) + 1
        else:
            built.append(result)
    # Everything is valid: from here on the file only gets written. Whose history it is comes
    # first: refused when that user is another own account, or this account another user.
    if owner_id is not None and (known is None or known.user_id != owner_id):
        await accounts.claim(db, _owner_account(owner_id, profile if file_owner else None))
    total = sum(len(chat.rows) for chat in built)
    written = new = distinct = 0
    for chat in built:
        peers = [chat.peer, *_sender_peers(chat.senders, owner_id)]
        rows = chat.rows
        for start in range(0, max(len(rows), 1), chunk_rows):
            chunk = rows[start : start + chunk_rows]
            ids = list({row[1]: None for row in chunk})
            async with db.transaction() as conn:
                if start == 0:
                    await history.insert_peers_if_new_in(conn, peers)
                if chunk:
                    stored = await history.count_stored_in(conn, chat.peer.peer_id, ids)
                    await history.upsert_message_rows_in(conn, chunk)
                    new += len(ids) - stored
            distinct += len(ids)
            written += len(chunk)
            if progress is not None:
                progress(written, total)
        if chat.notes:
            async with db.transaction() as conn:
                await transcripts.note_media_in(conn, chat.notes)
    return ImportResult(
        chats=len(built),
        messages=total,
        skipped_chats=sum(skipped.values()),
        skipped=skipped,
        new=new,
        already=distinct - new,
    )

"""Voice and round-video notes on Telegram: what a note is, downloading it, and
``export --voice`` (downloading and transcribing the notes of exported chats).

The export stores a note as a media message (kind ``voice``/``video_note``); its duration and
size are not in the ``messages`` table. Before transcribing, one ``messages.getMessages`` per
hundred notes records them in ``transcripts`` (so notes over the limits are marked without
being downloaded, and the run's budget and ETA are known up front); then each note is fetched
again just before its download — file references age — in batches, downloaded with Telethon's
own ``download_media`` (``upload.getFile`` in parts) and handed to ``doppelbot.voice``, which
transcribes and stores it. FloodWait is waited out up to ``flood_wait_max_s``; beyond that the
run stops cleanly (everything finished so far is stored) and says so.

The live bot calls ``transcribe_incoming`` for an incoming message: one call that says whether
it is a note, downloads and transcribes it within the timeout, stores the outcome and never
raises for the note's own failures (``note_of`` and ``download_note`` are its parts).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from telethon import TelegramClient, utils
from telethon import errors as tg_errors
from telethon.tl import types

from doppelbot.config import ExportSettings, VoiceSettings, default_of
from doppelbot.core.domain import VOICE_KINDS, TranscriptStatus, VoiceNote
from doppelbot.core.errors import (
    DoppelbotError,
    FloodWaitTooLongError,
    NoteTooLargeError,
    NoteUnavailableError,
    SpeechError,
)
from doppelbot.core.ports import Transcriber
from doppelbot.store import transcripts
from doppelbot.store.database import Database
from doppelbot.telegram.errors import translate
from doppelbot.telegram.mapping import media_kind
from doppelbot.voice import (
    NullVoiceProgress,
    VoiceProgress,
    VoiceReport,
    transcribe_and_store,
    transcribe_notes,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[Any]]

FACTS_BATCH = 100  # messages.getMessages takes up to 100 ids
FETCH_BATCH = 50  # notes fetched together just before their downloads


def note_of(msg: Any, *, chat_id: int | None = None) -> VoiceNote | None:
    """The ``VoiceNote`` of a Telethon message that is a voice or round-video note (None for
    any other message). Duration and size come from the document, before any download."""
    media = getattr(msg, "media", None)
    if not isinstance(media, types.MessageMediaDocument):
        return None
    kind, _ = media_kind(media)
    if kind not in VOICE_KINDS:
        return None
    doc = media.document
    duration: float | None = None
    for attr in getattr(doc, "attributes", None) or ():
        if isinstance(attr, types.DocumentAttributeAudio | types.DocumentAttributeVideo):
            duration = float(attr.duration)
            break
    return VoiceNote(
        chat_id=utils.get_peer_id(msg.peer_id) if chat_id is None else chat_id,
        message_id=msg.id,
        kind=kind,  # type: ignore[arg-type]
        is_outgoing=bool(msg.out),
        date=int(msg.date.timestamp()),
        duration_s=duration,
        size_bytes=getattr(doc, "size", None),
    )


async def download_note(client: TelegramClient, msg: Any, *, max_bytes: int) -> bytes:
    """The note's file, downloaded in parts through Telethon (``upload.getFile``).

    Raises ``NoteTooLargeError`` (before downloading) for a file over ``max_bytes``,
    ``NoteUnavailableError`` when Telegram no longer serves it, and other Telegram failures
    as ``DoppelbotError`` (``FloodWaitError`` is left to the caller, which may wait it out)."""
    doc = getattr(getattr(msg, "media", None), "document", None)
    if not isinstance(doc, types.Document):
        raise NoteUnavailableError("the message has no downloadable file")
    if doc.size and doc.size > max_bytes:
        raise NoteTooLargeError(doc.size, max_bytes)
    try:
        data = await client.download_media(msg, file=bytes)
    except tg_errors.FloodWaitError:
        raise
    except (
        tg_errors.FileReferenceExpiredError,
        tg_errors.FileIdInvalidError,
        tg_errors.LocationInvalidError,
    ) as exc:
        raise NoteUnavailableError(f"Telegram no longer serves the note ({exc.message})") from None
    except (tg_errors.RPCError, ConnectionError) as exc:
        raise translate(exc) from exc
    if not isinstance(data, bytes) or not data:
        raise NoteUnavailableError("the download was empty")
    return data


async def transcribe_incoming(
    client: TelegramClient,
    db: Database,
    transcriber: Transcriber,
    msg: Any,
    limits: VoiceSettings,
    *,
    download_timeout_s: float = 60.0,
) -> transcripts.StoredTranscript | None:
    """Transcribe one incoming (or outgoing) live message if it is a voice or round-video note,
    and store the outcome; None when it is not a note.

    Never raises for the note itself, so a reply can always go on: a note over the limits is
    stored as ``too_long`` without downloading it, a download that fails or takes longer than
    ``download_timeout_s`` (FloodWait included) as ``failed``, a file Telegram no longer serves
    as ``unavailable``; the transcription is bounded by the transcriber's own timeout. When the
    speech model cannot be used at all (it cannot load, the worker is shut down or busy) it
    logs a warning and returns None without storing anything, so a later ``export --voice``
    still picks the note up. Check ``row.usable`` for text (``row.text``)."""
    note = note_of(msg)
    if note is None:
        return None
    chat_id, mid = note.chat_id, note.message_id
    await transcripts.note_media(
        db,
        [
            transcripts.note_media_row(
                chat_id, mid, duration_s=note.duration_s, size_bytes=note.size_bytes
            )
        ],
    )
    status = error = None
    if note.duration_s is not None and note.duration_s > limits.max_duration_s:
        status = TranscriptStatus.TOO_LONG
        error = f"not transcribed: {note.duration_s:.0f}s > {limits.max_duration_s:g}s"
    else:
        try:
            async with asyncio.timeout(download_timeout_s):
                audio = await download_note(client, msg, max_bytes=limits.max_bytes)
        except NoteTooLargeError as exc:
            status, error = TranscriptStatus.TOO_LONG, str(exc)
        except NoteUnavailableError as exc:
            status, error = TranscriptStatus.UNAVAILABLE, str(exc)
        except TimeoutError:
            status = TranscriptStatus.FAILED
            error = f"the download took longer than {download_timeout_s:g}s"
        except tg_errors.FloodWaitError as exc:
            status = TranscriptStatus.FAILED
            error = f"Telegram asked to wait {exc.seconds}s before downloading"
        except DoppelbotError as exc:
            status, error = TranscriptStatus.FAILED, str(exc)
    if status is not None:
        await transcripts.save_result(
            db, chat_id, mid, status, duration_s=note.duration_s, error=error
        )
        return await transcripts.get(db, chat_id, mid)
    try:
        row, _ = await transcribe_and_store(
            db, transcriber, note, audio, max_duration_s=limits.max_duration_s
        )
    except SpeechError as exc:  # the model cannot load, the worker is shut down or busy
        log.warning("voice note not transcribed: %s", exc)
        return None
    return row


class _Flood:
    """Wait out FloodWait up to a bound, then stop with ``FloodWaitTooLongError``."""

    def __init__(self, bound_s: int, sleep: Sleep, progress: VoiceProgress) -> None:
        self.bound_s = bound_s
        self.sleep = sleep
        self.progress = progress

    async def call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        while True:
            try:
                return await fn()
            except tg_errors.FloodWaitError as exc:
                if exc.seconds > self.bound_s:
                    raise FloodWaitTooLongError(exc.seconds, self.bound_s, what) from None
                self.progress.note(f"Telegram asked to wait {exc.seconds}s; waiting")
                await self.sleep(exc.seconds)


def _lookup(client: TelegramClient, peer: Any, ids: list[int]) -> Callable[[], Awaitable[Any]]:
    return lambda: client.get_messages(peer, ids=ids)


async def _input_peer(client: TelegramClient, chat_id: int) -> Any | None:
    try:
        return await client.get_input_entity(chat_id)
    except (ValueError, TypeError):
        return None


async def record_facts(
    client: TelegramClient, db: Database, notes: Sequence[VoiceNote], flood: _Flood
) -> list[VoiceNote]:
    """Fill in the duration and size of notes that lack them (from Telegram, stored in
    ``transcripts``); notes whose message is gone are marked unavailable and dropped."""
    missing: dict[int, list[VoiceNote]] = {}
    for note in notes:
        if note.duration_s is None or note.size_bytes is None:
            missing.setdefault(note.chat_id, []).append(note)
    if not missing:
        return list(notes)
    known: dict[tuple[int, int], VoiceNote | None] = {}
    for chat_id, chat_notes in missing.items():
        peer = await _input_peer(client, chat_id)
        for i in range(0, len(chat_notes), FACTS_BATCH):
            batch = chat_notes[i : i + FACTS_BATCH]
            ids = [n.message_id for n in batch]
            if peer is None:
                found: list[Any] = [None] * len(ids)
            else:
                try:
                    found = list(await flood.call("message lookup", _lookup(client, peer, ids)))
                except (tg_errors.RPCError, ConnectionError) as exc:
                    raise translate(exc) from exc
            rows = []
            for note, msg in zip(batch, found, strict=True):
                fact = None if msg is None else note_of(msg, chat_id=chat_id)
                known[(chat_id, note.message_id)] = fact
                if fact is None:
                    rows.append(
                        transcripts.note_media_row(chat_id, note.message_id, available=False)
                    )
                else:
                    rows.append(
                        transcripts.note_media_row(
                            chat_id,
                            note.message_id,
                            duration_s=fact.duration_s,
                            size_bytes=fact.size_bytes,
                        )
                    )
            await transcripts.note_media(db, rows)
    out = []
    for note in notes:
        key = (note.chat_id, note.message_id)
        if key not in known:
            out.append(note)
        elif (fact := known[key]) is not None:
            out.append(replace(note, duration_s=fact.duration_s, size_bytes=fact.size_bytes))
    return out


class TelegramNotes:
    """The ``AudioSource`` of ``export --voice``: fetches the planned notes' messages a batch
    per chat at a time (fresh file references) and downloads each when asked."""

    def __init__(
        self, client: TelegramClient, plan: Sequence[VoiceNote], max_bytes: int, flood: _Flood
    ) -> None:
        self.client = client
        self.max_bytes = max_bytes
        self.flood = flood
        self._queue: dict[int, list[int]] = {}
        for note in plan:
            self._queue.setdefault(note.chat_id, []).append(note.message_id)
        self._cache: dict[tuple[int, int], Any] = {}
        self._peers: dict[int, Any] = {}

    async def _prefetch(self, note: VoiceNote) -> None:
        chat_id = note.chat_id
        queue = self._queue.get(chat_id, [])
        start = queue.index(note.message_id) if note.message_id in queue else 0
        ids = queue[start : start + FETCH_BATCH] or [note.message_id]
        del queue[start : start + len(ids)]
        if chat_id not in self._peers:
            self._peers[chat_id] = await _input_peer(self.client, chat_id)
        peer = self._peers[chat_id]
        if peer is None:
            raise NoteUnavailableError("the chat is not known to this Telegram session")
        try:
            found = await self.flood.call(
                "message lookup", lambda: self.client.get_messages(peer, ids=ids)
            )
        except (tg_errors.RPCError, ConnectionError) as exc:
            raise translate(exc) from exc
        for mid, msg in zip(ids, found, strict=True):
            self._cache[(chat_id, mid)] = msg

    async def __call__(self, note: VoiceNote) -> bytes:
        key = (note.chat_id, note.message_id)
        if key not in self._cache:
            await self._prefetch(note)
        msg = self._cache.pop(key, None)
        if msg is None:
            raise NoteUnavailableError("the message is gone from Telegram")
        return await self.flood.call(
            "file download", lambda: download_note(self.client, msg, max_bytes=self.max_bytes)
        )


async def export_voice(
    client: TelegramClient,
    db: Database,
    transcriber: Transcriber,
    limits: VoiceSettings,
    *,
    chat_ids: Sequence[int] | None = None,
    flood_wait_max_s: int = default_of(ExportSettings, "flood_wait_max_s"),
    progress: VoiceProgress | None = None,
    sleep: Sleep = asyncio.sleep,
) -> VoiceReport:
    """Download and transcribe the voice and round-video notes of ``chat_ids`` (None: every
    private chat in the store) that still want a transcript, newest first, within ``limits``.
    Resumable: run it again to continue."""

    progress = progress or NullVoiceProgress()
    flood = _Flood(flood_wait_max_s, sleep, progress)
    notes = await transcripts.notes_to_transcribe(
        db,
        chat_ids=chat_ids,
        max_attempts=limits.max_attempts,
        max_duration_s=limits.max_duration_s,
        max_bytes=limits.max_bytes,
    )
    notes = await record_facts(client, db, notes, flood)
    source = TelegramNotes(client, notes, limits.max_bytes, flood)
    return await transcribe_notes(db, transcriber, notes, source, limits, progress=progress)

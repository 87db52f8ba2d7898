"""Transcripts of voice and round-video notes (the ``transcripts`` table).

One row per note, keyed like ``messages`` by (account, chat id, message id), and read and
written for the handle's own account only. The message row keeps its
media kind and caption; what the note said lives here, marked as a transcript, so nothing ever
mistakes it for typed text. Rows appear when a note becomes known with what we know before any
download (duration, size, the local file of a Desktop export) as ``pending``, and move to
``done``/``failed``/``too_long``/``unavailable``. A ``done`` row is never overwritten by a
failure (the live bot and a history run may race on the same note), and recording media facts
again never loses a finished transcript: every write here is an idempotent upsert.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from doppelbot.config import VoiceSettings, default_of
from doppelbot.core.domain import (
    VOICE_KINDS,
    MediaKind,
    Message,
    TranscriptStatus,
    VoiceNote,
)
from doppelbot.store.database import Database, Tx, now
from doppelbot.store.table import Table, from_row

VOICE_KIND_VALUES = tuple(sorted(k.value for k in VOICE_KINDS))


@dataclass(frozen=True, slots=True)
class StoredTranscript:
    """One ``transcripts`` row (only ever read from the store, so every column is there)."""

    chat_id: int
    message_id: int
    status: TranscriptStatus
    text: str
    language: str | None
    model: str | None
    duration_s: float | None
    size_bytes: int | None
    file_path: str | None
    error: str | None
    attempts: int
    seconds: float | None
    updated_at: int

    @property
    def usable(self) -> bool:
        """A finished transcript with something in it."""
        return self.status is TranscriptStatus.DONE and bool(self.text.strip())


TRANSCRIPTS = Table(
    "transcripts",
    (
        "chat_id",
        "message_id",
        "status",
        "text",
        "language",
        "model",
        "duration_s",
        "size_bytes",
        "file_path",
        "error",
        "attempts",
        "seconds",
        "created_at",
        "updated_at",
    ),
    key=("account_id", "chat_id", "message_id"),
    per_account=True,
)


def _row(r: Any) -> StoredTranscript:
    return from_row(StoredTranscript, r, status=TranscriptStatus)


# --- what is known about a note before transcribing it -----------------------------------------
# A finished transcript keeps its status; a note that had no audio becomes pending once it has
# a file; the facts (duration, size, path) are refreshed unless the new value is unknown.
NOTE_MEDIA_SQL = """
INSERT INTO transcripts (account_id, chat_id, message_id, status, duration_s, size_bytes,
                         file_path, created_at, updated_at)
VALUES (?,?,?,?,?,?,?,?,?)
ON CONFLICT (account_id, chat_id, message_id) DO UPDATE SET
    duration_s = coalesce(excluded.duration_s, transcripts.duration_s),
    size_bytes = coalesce(excluded.size_bytes, transcripts.size_bytes),
    file_path = coalesce(excluded.file_path, transcripts.file_path),
    status = CASE
        WHEN transcripts.status = 'unavailable' AND excluded.status = 'pending' THEN 'pending'
        ELSE transcripts.status END,
    updated_at = excluded.updated_at
"""


def note_media_row(
    chat_id: int,
    message_id: int,
    *,
    duration_s: float | None = None,
    size_bytes: int | None = None,
    file_path: str | None = None,
    available: bool = True,
    at: int | None = None,
) -> tuple[Any, ...]:
    """One row for ``NOTE_MEDIA_SQL``."""
    ts = now() if at is None else at
    status = TranscriptStatus.PENDING if available else TranscriptStatus.UNAVAILABLE
    return (chat_id, message_id, status.value, duration_s, size_bytes, file_path, ts, ts)


async def note_media_in(conn: Tx, rows: Iterable[tuple[Any, ...]]) -> None:
    """Record notes' media facts inside an open transaction (rows from ``note_media_row``)."""
    await conn.executemany(NOTE_MEDIA_SQL, [(conn.account_id, *row) for row in rows])


async def note_media(db: Database, rows: Iterable[tuple[Any, ...]]) -> None:
    async with db.transaction() as conn:
        await note_media_in(conn, rows)


# --- results --------------------------------------------------------------------------------------
SAVE_RESULT_SQL = """
INSERT INTO transcripts (account_id, chat_id, message_id, status, text, language, model,
                         duration_s, error, attempts, seconds, created_at, updated_at)
VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)
ON CONFLICT (account_id, chat_id, message_id) DO UPDATE SET
    status = excluded.status, text = excluded.text, language = excluded.language,
    model = excluded.model, duration_s = coalesce(excluded.duration_s, transcripts.duration_s),
    error = excluded.error, attempts = transcripts.attempts + excluded.attempts,
    seconds = excluded.seconds, updated_at = excluded.updated_at
WHERE transcripts.status != 'done' OR excluded.status = 'done'
"""


async def save_result(
    db: Database,
    chat_id: int,
    message_id: int,
    status: TranscriptStatus,
    *,
    text: str = "",
    language: str | None = None,
    model: str | None = None,
    duration_s: float | None = None,
    error: str | None = None,
    seconds: float | None = None,
    attempted: bool = True,
) -> bool:
    """Store the outcome of one transcription; False when a finished transcript was kept
    instead (a failure never replaces a ``done`` row). ``attempted`` counts it as a try."""
    ts = now()
    async with db.transaction() as conn:
        cursor = await conn.execute(
            SAVE_RESULT_SQL,
            (
                conn.account_id,
                chat_id,
                message_id,
                status.value,
                text,
                language,
                model,
                duration_s,
                error,
                1 if attempted else 0,
                seconds,
                ts,
                ts,
            ),
        )
        return cursor.rowcount > 0


# --- reads ----------------------------------------------------------------------------------------
async def get(db: Database, chat_id: int, message_id: int) -> StoredTranscript | None:
    return await TRANSCRIPTS.rows(db, "chat_id = ? AND message_id = ?", (chat_id, message_id)).one(
        _row
    )


async def for_messages(
    db: Database, chat_id: int, message_ids: Sequence[int]
) -> dict[int, StoredTranscript]:
    """The transcript rows of some messages of one chat, by message id."""
    if not message_ids:
        return {}
    marks = ",".join("?" * len(message_ids))
    found = await TRANSCRIPTS.rows(
        db, f"chat_id = ? AND message_id IN ({marks})", (chat_id, *message_ids)
    ).all(_row)
    return {t.message_id: t for t in found}


async def attach(db: Database, messages: Sequence[Message]) -> list[Message]:
    """``messages`` with each transcribed voice/round-video note's ``transcript`` filled in
    (other messages, and notes without a finished transcript, are returned as they are)."""
    wanted: dict[int, list[int]] = {}
    for m in messages:
        if m.is_voice_note and m.transcript is None:
            wanted.setdefault(m.chat_id, []).append(m.message_id)
    if not wanted:
        return list(messages)
    found: dict[tuple[int, int], str] = {}
    for chat_id, ids in wanted.items():
        for mid, t in (await for_messages(db, chat_id, ids)).items():
            if t.status is TranscriptStatus.DONE:
                found[(chat_id, mid)] = t.text
    return [
        replace(m, transcript=found[(m.chat_id, m.message_id)])
        if (m.chat_id, m.message_id) in found
        else m
        for m in messages
    ]


async def notes_to_transcribe(
    db: Database,
    *,
    chat_ids: Sequence[int] | None = None,
    max_attempts: int = default_of(VoiceSettings, "max_attempts"),
    max_duration_s: float | None = None,
    max_bytes: int | None = None,
    with_file: bool | None = None,
) -> list[VoiceNote]:
    """Voice and round-video notes of private chats that still want a transcript, newest
    first: never tried, pending, failed fewer than ``max_attempts`` times, or too long for an
    earlier, lower limit but within this one. Forwarded notes are skipped (not the chat's own
    words), and so are chats with bots and Saved Messages. ``with_file``: only notes that have
    (True) or lack (False) a local file."""
    where = [
        "m.account_id = ?",
        f"m.media_kind IN ({','.join('?' * len(VOICE_KIND_VALUES))})",
        "m.is_forwarded = 0",
        "m.chat_id > 0",
        "NOT EXISTS (SELECT 1 FROM peers p WHERE p.account_id = m.account_id"
        " AND p.peer_id = m.chat_id AND (p.is_bot = 1 OR p.is_self = 1 OR p.kind = 'bot'))",
        "NOT EXISTS (SELECT 1 FROM accounts a WHERE a.account_id = m.account_id"
        " AND a.user_id = m.chat_id)",
    ]
    params: list[Any] = [db.account_id, *VOICE_KIND_VALUES]
    retry = ["t.status IS NULL", "t.status = 'pending'", "(t.status = 'failed' AND t.attempts < ?)"]
    params.append(max_attempts)
    fits = []
    if max_duration_s is not None:
        fits.append("(t.duration_s IS NULL OR t.duration_s <= ?)")
        params.append(max_duration_s)
    if max_bytes is not None:
        fits.append("(t.size_bytes IS NULL OR t.size_bytes <= ?)")
        params.append(max_bytes)
    if fits:
        retry.append(f"(t.status = 'too_long' AND {' AND '.join(fits)})")
    where.append(f"({' OR '.join(retry)})")
    if with_file is True:
        where.append("t.file_path IS NOT NULL")
    elif with_file is False:
        where.append("t.file_path IS NULL")
    if chat_ids is not None:
        if not chat_ids:
            return []
        where.append(f"m.chat_id IN ({','.join('?' * len(chat_ids))})")
        params.extend(chat_ids)
    rows = await db.fetchall(
        "SELECT m.chat_id, m.message_id, m.media_kind AS kind, m.is_outgoing, m.date,"
        " coalesce(t.status, 'pending') AS status, t.duration_s, t.size_bytes, t.file_path,"
        " coalesce(t.attempts, 0) AS attempts"
        " FROM messages m LEFT JOIN transcripts t ON t.account_id = m.account_id"
        " AND t.chat_id = m.chat_id AND t.message_id = m.message_id"
        f" WHERE {' AND '.join(where)} ORDER BY m.date DESC, m.message_id DESC",
        params,
    )
    return [
        from_row(VoiceNote, r, kind=MediaKind, is_outgoing=bool, status=TranscriptStatus)
        for r in rows
    ]


async def count_without_file(db: Database, chat_ids: Sequence[int] | None = None) -> int:
    """Notes of private chats with no transcript yet and no local file to make one from
    (exported from Telegram, or a Desktop export without its media): ``export --voice``
    downloads them."""
    marks = ",".join("?" * len(VOICE_KIND_VALUES))
    params: list[Any] = [db.account_id, *VOICE_KIND_VALUES]
    where = ""
    if chat_ids is not None:
        if not chat_ids:
            return 0
        where = f" AND m.chat_id IN ({','.join('?' * len(chat_ids))})"
        params.extend(chat_ids)
    n = await db.scalar(
        "SELECT count(*) FROM messages m LEFT JOIN transcripts t ON t.account_id = m.account_id"
        " AND t.chat_id = m.chat_id AND t.message_id = m.message_id WHERE m.account_id = ?"
        f" AND m.media_kind IN ({marks}) AND m.is_forwarded = 0 AND m.chat_id > 0"
        " AND (t.status IS NULL OR (t.status IN ('pending', 'unavailable')"
        f" AND t.file_path IS NULL)){where}",
        params,
    )
    return int(n or 0)

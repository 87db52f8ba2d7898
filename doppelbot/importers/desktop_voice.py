"""The voice and round-video notes of a Telegram Desktop export, for ``doppelbot transcribe``.

Desktop writes a note as a message with ``media_type`` ``voice_message`` (an .ogg under
``voice_messages/``) or ``video_message`` (an .mp4 under ``round_video_messages/``), its
``file`` path relative to ``result.json``, and usually ``duration_seconds`` and ``file_size``.
When the export was made without media, ``file`` is a note in parentheses ("File not included.
…") and the note is recorded as unavailable; importing a fuller export later makes it pending.
Forwarded notes are not recorded (they are not transcribed: not the chat's own words).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from doppelbot.store import transcripts

NOTE_MEDIA_TYPES = frozenset({"voice_message", "video_message"})


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def note_row(
    raw: dict[str, Any], chat_id: int, message_id: int, base_dir: Path | None, at: int
) -> tuple[Any, ...] | None:
    """The ``transcripts`` media row of one Desktop message, or None if it is not a note."""
    if raw.get("media_type") not in NOTE_MEDIA_TYPES or "forwarded_from" in raw:
        return None
    file = raw.get("file")
    path: Path | None = None
    if isinstance(file, str) and file and not file.startswith("(") and base_dir is not None:
        candidate = (base_dir / file).resolve()
        if candidate.is_file():
            path = candidate
    size = _number(raw.get("file_size"))
    return transcripts.note_media_row(
        chat_id,
        message_id,
        duration_s=_number(raw.get("duration_seconds")),
        size_bytes=None if size is None else int(size),
        file_path=None if path is None else str(path),
        available=path is not None,
        at=at,
    )

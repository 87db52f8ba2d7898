"""Transcribing voice and round-video notes and storing what they said.

The core of voice support, shared by the three places notes are transcribed — the live bot
(one incoming note: ``transcribe_and_store``, which ``telegram.voice.transcribe_incoming``
wraps with the download), ``doppelbot export --voice`` (notes downloaded
from Telegram) and ``doppelbot transcribe`` (files of a Desktop export already on disk): both
history runs go through ``transcribe_notes``. It speaks to the speech model only through the
``Transcriber`` port and gets each note's audio from an ``AudioSource`` the caller provides, so
it imports neither telethon nor any speech library.

History runs are resumable: every note's outcome is committed on its own as soon as it is
known, and the plan (``store.transcripts.notes_to_transcribe``) leaves out what is finished, so
a killed run loses at most the note in progress and a re-run picks up where it stopped. They
are bounded: notes over the per-note duration/size limit are marked ``too_long`` without being
fetched, and a run stops planning once its audio-hours or download budget is spent (the rest
waits for the next run, and the report says how many). Progress carries an ETA from the speed
measured so far.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from doppelbot.core.domain import TranscriptStatus, VoiceNote
from doppelbot.core.errors import (
    AudioTooLongError,
    NoteTooLargeError,
    NoteUnavailableError,
    SpeechModelError,
    TranscriberClosedError,
    TranscriptionError,
)
from doppelbot.core.ports import Transcriber, Transcript
from doppelbot.store import transcripts
from doppelbot.store.database import Database

if TYPE_CHECKING:
    from doppelbot.config import VoiceSettings

log = logging.getLogger(__name__)

_MB = 1024 * 1024


AudioSource = Callable[[VoiceNote], Awaitable["bytes | Path"]]
"""Gets one note's audio: its bytes (downloaded) or its local file. Raises
``NoteUnavailableError`` or ``NoteTooLargeError`` (the note is marked, the run goes on); any
other ``DoppelbotError`` stops the run."""


class VoiceProgress(Protocol):
    """What a history run tells its UI (the CLI draws a Rich bar with an ETA from this)."""

    def start(self, notes: int, audio_s: float | None) -> None: ...
    def advanced(self, done: int, audio_done_s: float, eta_s: float | None) -> None: ...
    def note(self, text: str) -> None: ...


class NullVoiceProgress:
    def start(self, notes: int, audio_s: float | None) -> None:
        pass

    def advanced(self, done: int, audio_done_s: float, eta_s: float | None) -> None:
        pass

    def note(self, text: str) -> None:
        pass


@dataclass(slots=True)
class VoiceReport:
    """What one history run did (counts and durations; never texts)."""

    planned: int = 0  # notes this run set out to transcribe
    done: int = 0  # transcribed (including ones with nothing intelligible)
    empty: int = 0  # of ``done``: no text
    failed: int = 0
    too_long: int = 0
    unavailable: int = 0
    left_for_next_run: int = 0  # not started: the run's budget was spent
    audio_s: float = 0.0  # audio transcribed
    busy_s: float = 0.0  # time spent fetching and transcribing
    downloaded_bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def rtf(self) -> float | None:
        """Processing time / audio time over this run (lower is faster; 0.33 = 3x real time)."""
        return self.busy_s / self.audio_s if self.audio_s > 0 else None


def _eta(remaining: Sequence[VoiceNote], report: VoiceReport, done: int) -> float | None:
    if not remaining or done == 0:
        return None
    known = [n.duration_s for n in remaining if n.duration_s]
    if report.audio_s > 0 and len(known) == len(remaining):
        return sum(known) * (report.busy_s / report.audio_s)
    return len(remaining) * (report.busy_s / done)


def plan_notes(
    notes: Sequence[VoiceNote], limits: VoiceSettings
) -> tuple[list[VoiceNote], list[VoiceNote], int]:
    """Split ``notes`` (in the order to work on them) into (to transcribe, over a per-note
    limit, left for the next run by the budget). Unknown durations and sizes count as zero
    here; the run adds what they turn out to be as it goes."""
    todo: list[VoiceNote] = []
    over: list[VoiceNote] = []
    audio = 0.0
    size = 0
    left = 0
    for note in notes:
        if (note.duration_s is not None and note.duration_s > limits.max_duration_s) or (
            note.size_bytes is not None and note.size_bytes > limits.max_bytes
        ):
            over.append(note)
            continue
        d, b = note.duration_s or 0.0, note.size_bytes or 0
        if (limits.budget_s is not None and audio + d > limits.budget_s) or (
            limits.budget_bytes is not None and size + b > limits.budget_bytes
        ):
            left += 1
            continue
        audio += d
        size += b
        todo.append(note)
    return todo, over, left


async def _mark_too_long(db: Database, note: VoiceNote, limits: VoiceSettings) -> None:
    if note.size_bytes is not None and note.size_bytes > limits.max_bytes:
        why = f"file of {note.size_bytes / _MB:.1f} MB > {limits.max_bytes / _MB:g} MB"
    else:
        why = f"{note.duration_s or 0:.0f}s > {limits.max_duration_s:g}s"
    await transcripts.save_result(
        db,
        note.chat_id,
        note.message_id,
        TranscriptStatus.TOO_LONG,
        duration_s=note.duration_s,
        error=f"not transcribed: {why}",
        attempted=False,
    )


async def transcribe_and_store(
    db: Database,
    transcriber: Transcriber,
    note: VoiceNote,
    audio: bytes | Path,
    *,
    max_duration_s: float | None = None,
) -> tuple[transcripts.StoredTranscript, Transcript | None]:
    """Transcribe one note and store the outcome; the live bot's entry point.

    Never raises for the note itself: a note over the limit is stored as ``too_long``, a
    failed or timed-out transcription as ``failed`` (with the reason), and the caller gets the
    stored row (``usable`` says whether there is text) and the ``Transcript`` when there is one.
    Raises only what stops everything: ``SpeechModelError`` (the model cannot load) and
    ``TranscriberClosedError`` (shut down or busy — nothing is stored, so it can be retried),
    and store errors. The wait is bounded by the transcriber's own timeout."""
    result: Transcript | None = None
    fields: dict[str, Any]
    try:
        result = await transcriber.transcribe(audio, max_duration_s=max_duration_s)
    except AudioTooLongError as exc:
        status = TranscriptStatus.TOO_LONG
        fields = {"duration_s": exc.duration_s, "error": str(exc)}
    except (SpeechModelError, TranscriberClosedError):
        raise
    except TranscriptionError as exc:
        status = TranscriptStatus.FAILED
        fields = {"duration_s": note.duration_s, "error": str(exc)}
    else:
        status = TranscriptStatus.DONE
        fields = {"text": result.text, "language": result.language, "model": result.model}
        fields |= {"duration_s": result.duration_s, "seconds": result.seconds}
    fields.setdefault("model", transcriber.model_name)
    await transcripts.save_result(db, note.chat_id, note.message_id, status, **fields)
    stored = await transcripts.get(db, note.chat_id, note.message_id)
    assert stored is not None  # just written (a done row may have won a race: also fine)
    return stored, result


async def transcribe_notes(
    db: Database,
    transcriber: Transcriber,
    notes: Sequence[VoiceNote],
    fetch: AudioSource,
    limits: VoiceSettings,
    *,
    progress: VoiceProgress | None = None,
) -> VoiceReport:
    """Transcribe ``notes`` (newest first is the usual order) within ``limits``."""
    progress = progress or NullVoiceProgress()
    started = time.monotonic()
    report = VoiceReport()
    todo, over, left = plan_notes(notes, limits)
    for note in over:
        await _mark_too_long(db, note, limits)
    report.too_long += len(over)
    report.left_for_next_run = left
    report.planned = len(todo)
    known = [n.duration_s for n in todo if n.duration_s]
    progress.start(len(todo), sum(known) if len(known) == len(todo) else None)
    budget_s, budget_b = limits.budget_s, limits.budget_bytes
    for i, note in enumerate(todo):
        # Durations or sizes not known up front count once known: stop when spent.
        if (budget_s is not None and report.audio_s >= budget_s) or (
            budget_b is not None and report.downloaded_bytes >= budget_b
        ):
            report.left_for_next_run += len(todo) - i
            break
        t0 = time.monotonic()
        try:
            audio = await fetch(note)
        except (NoteUnavailableError, NoteTooLargeError) as exc:
            # Not tried at all: gone, or over the size limit (marked, not retried).
            if isinstance(exc, NoteTooLargeError):
                status, report.too_long = TranscriptStatus.TOO_LONG, report.too_long + 1
            else:
                status, report.unavailable = TranscriptStatus.UNAVAILABLE, report.unavailable + 1
            await transcripts.save_result(
                db,
                note.chat_id,
                note.message_id,
                status,
                duration_s=note.duration_s,
                error=str(exc),
                attempted=False,
            )
            progress.advanced(i + 1, report.audio_s, _eta(todo[i + 1 :], report, i + 1))
            continue
        if isinstance(audio, bytes):
            report.downloaded_bytes += len(audio)
        stored, result = await transcribe_and_store(
            db, transcriber, note, audio, max_duration_s=limits.max_duration_s
        )
        report.busy_s += time.monotonic() - t0
        if stored.status is TranscriptStatus.DONE:
            report.done += 1
            if result is not None:
                report.audio_s += result.duration_s
            if not stored.text.strip():
                report.empty += 1
        elif stored.status is TranscriptStatus.TOO_LONG:
            report.too_long += 1
        else:
            report.failed += 1
            log.info("note %s/%s failed: %s", note.chat_id, note.message_id, stored.error)
        progress.advanced(i + 1, report.audio_s, _eta(todo[i + 1 :], report, i + 1))
    if report.left_for_next_run:
        report.notes.append(
            f"{report.left_for_next_run} note(s) left for the next run: this run's budget "
            "(DOPPELBOT_VOICE_HISTORY_MAX_HOURS / _MAX_DOWNLOAD_MB) is spent"
        )
    report.seconds = time.monotonic() - started
    return report


def local_files(max_bytes: int) -> AudioSource:
    """An ``AudioSource`` for notes with a local file (a Desktop export's .ogg/.mp4)."""

    async def get(note: VoiceNote) -> bytes | Path:
        if not note.file_path:
            raise NoteUnavailableError("the note has no local file")
        path = Path(note.file_path)
        try:
            size = (await asyncio.to_thread(path.stat)).st_size
        except OSError:
            raise NoteUnavailableError(f"the note's file is missing: {path}") from None
        if size > max_bytes:
            raise NoteTooLargeError(size, max_bytes)
        return path

    return get

"""``doppelbot transcribe`` and the voice part of ``doppelbot export --voice``.

Both transcribe stored voice and round-video notes with the local speech model and show a
progress bar with an ETA; ``transcribe`` reads the files a Desktop export left next to its
``result.json``, ``export --voice`` downloads the notes of the chats it just exported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import TaskID, TextColumn

from doppelbot.cli.common import AccountOpt, RichBars, open_db, run_async, state
from doppelbot.core.errors import ConfigError
from doppelbot.speech import TranscriptionWorker
from doppelbot.speech.model import whisper_spec
from doppelbot.store import transcripts
from doppelbot.voice import VoiceReport, local_files, transcribe_notes

if TYPE_CHECKING:
    from doppelbot.config import Settings
    from doppelbot.store.database import Database


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RichVoiceProgress(RichBars):
    """One bar over the notes of a run: count, audio done, and the ETA."""

    def __init__(self, console: Console) -> None:
        super().__init__(
            console, TextColumn("{task.fields[audio]}"), TextColumn("{task.fields[eta]}")
        )
        self.task: TaskID | None = None
        self.total_audio: float | None = None

    def start(self, notes: int, audio_s: float | None) -> None:
        self.total_audio = audio_s
        audio = "" if audio_s is None else f"0:00 of {_clock(audio_s)} audio"
        self.task = self.progress.add_task(
            "[bold]voice notes", total=notes, audio=audio, eta="ETA …" if notes else ""
        )

    def advanced(self, done: int, audio_done_s: float, eta_s: float | None) -> None:
        if self.task is None:
            return
        audio = _clock(audio_done_s)
        if self.total_audio is not None:
            audio += f" of {_clock(self.total_audio)}"
        eta = "" if eta_s is None else f"ETA {_clock(eta_s)}"
        self.progress.update(self.task, completed=done, audio=audio + " audio", eta=eta)


def print_report(console: Console, report: VoiceReport, *, missing_files: int = 0) -> None:
    parts = [f"transcribed {report.done} voice note(s)"]
    if report.done:
        parts[-1] += f" ({_clock(report.audio_s)} of audio"
        if report.rtf:
            parts[-1] += f", {1 / report.rtf:.1f}x real time"
        parts[-1] += ")"
    if report.empty:
        parts.append(f"{report.empty} with no speech")
    if report.failed:
        parts.append(f"{report.failed} failed (retried next run)")
    if report.too_long:
        parts.append(f"{report.too_long} too long, not transcribed (DOPPELBOT_VOICE_MAX_*)")
    if report.unavailable:
        parts.append(f"{report.unavailable} unavailable")
    console.print("; ".join(parts))
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    if missing_files:
        console.print(
            f"[yellow]{missing_files} note(s) have no local file: `doppelbot export --voice` "
            "downloads them from Telegram.[/]"
        )


def _worker(settings: Settings) -> Any:
    if not settings.voice.transcription:
        raise ConfigError(
            "voice transcription is off (DOPPELBOT_VOICE_TRANSCRIPTION=false); turn it on to "
            "transcribe notes"
        )

    return TranscriptionWorker(whisper_spec(settings))


async def export_notes(
    settings: Settings,
    client: Any,
    db: Database,
    chat_ids: Sequence[int],
    console: Console,
) -> VoiceReport:
    """``export --voice``: download and transcribe the notes of ``chat_ids``."""
    from doppelbot.telegram.voice import export_voice

    worker = _worker(settings)
    try:
        with RichVoiceProgress(console) as progress:
            return await export_voice(
                client,
                db,
                worker,
                settings.voice,
                chat_ids=chat_ids,
                flood_wait_max_s=settings.export.flood_wait_max_s,
                progress=progress,
            )
    finally:
        await worker.aclose()


def transcribe(
    ctx: typer.Context,
    chat: list[int] = typer.Option(
        [], "--chat", "-c", help="Only this chat (numeric id). Repeatable."
    ),
    max_hours: float | None = typer.Option(
        None,
        "--max-hours",
        min=0,
        help="Audio this run transcribes at most, 0 = no limit "
        "(default: DOPPELBOT_VOICE_HISTORY_MAX_HOURS).",
    ),
    account: AccountOpt = None,
) -> None:
    """Transcribe the stored voice and round-video notes that have a local file.

    That is what `doppelbot import` recorded from a Telegram Desktop export (its .ogg/.mp4
    files next to result.json). Resumable and incremental: finished notes are skipped, each
    note is stored as soon as it is done, failed ones are retried up to
    DOPPELBOT_VOICE_MAX_ATTEMPTS times. Notes longer than DOPPELBOT_VOICE_MAX_DURATION_S are
    not transcribed (and listed as too long). Newest notes first. One own account's notes
    (--account; default: the default account).
    """
    st = state(ctx)
    name = st.use_account(account)
    settings = st.settings

    limits = settings.voice
    if max_hours is not None:
        limits = replace(limits, history_max_hours=max_hours)
    chat_ids = list(chat) or None

    async def go() -> tuple[VoiceReport, int]:
        async with open_db(settings, name) as db:
            common: dict[str, Any] = {
                "chat_ids": chat_ids,
                "max_attempts": limits.max_attempts,
                "max_duration_s": limits.max_duration_s,
                "max_bytes": limits.max_bytes,
            }
            notes = await transcripts.notes_to_transcribe(db, with_file=True, **common)
            missing = await transcripts.count_without_file(db, chat_ids)
            worker = _worker(settings)
            try:
                with RichVoiceProgress(st.err_console) as progress:
                    report = await transcribe_notes(
                        db,
                        worker,
                        notes,
                        local_files(limits.max_bytes),
                        limits,
                        progress=progress,
                    )
            finally:
                await worker.aclose()
            return report, missing

    report, missing = run_async(go())
    print_report(st.console, report, missing_files=missing)

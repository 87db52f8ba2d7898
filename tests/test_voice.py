"""Voice notes end to end without Telegram: the transcripts store, the shared pipeline (limits,
budget, resuming after a kill, retries), the live entry point, Desktop import → `doppelbot
transcribe` on the tiny converted Whisper, and the dataset reading transcripts as text."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from doppelbot.cli import main
from doppelbot.config import VoiceSettings
from doppelbot.core.domain import (
    KIND_MEDIA,
    KIND_TEXT,
    MediaKind,
    Message,
    Peer,
    PeerKind,
    TranscriptStatus,
    VoiceNote,
)
from doppelbot.core.errors import (
    AudioTooLongError,
    TranscriberClosedError,
    TranscriptionError,
    TranscriptionTimeoutError,
)
from doppelbot.core.ports import Transcript
from doppelbot.dataset.from_store import build_from_db, make_chunk
from doppelbot.dataset.options import DatasetOptions
from doppelbot.dataset.rules import rule_row
from doppelbot.store import history, transcripts
from doppelbot.store.database import Database
from doppelbot.voice import (
    NoteUnavailableError,
    local_files,
    transcribe_and_store,
    transcribe_notes,
)
from tests.dataset_helpers import T0
from tests.tiny_whisper import make_mp4_aac

CHAT = 1001


class FakeTranscriber:
    """A ``Transcriber`` that says what it is told (or fails as told), and counts calls."""

    model_name = "fake-whisper"

    def __init__(self, fail: dict[int, BaseException] | None = None) -> None:
        self.calls: list[Any] = []
        self.fail = fail or {}

    async def transcribe(self, audio: bytes | Path, *, max_duration_s: float | None = None) -> Any:
        self.calls.append(audio)
        error = self.fail.get(len(self.calls))
        if error is not None:
            raise error
        text = str(audio, "utf-8") if isinstance(audio, bytes) else "a file"
        return Transcript(text=text, language="ru", duration_s=10.0, model=self.model_name)


def _voice(mid: int, *, out: bool = False, date: int = 0, fwd: bool = False) -> Message:
    return Message(
        chat_id=CHAT,
        message_id=mid,
        sender_id=100 if out else CHAT,
        is_outgoing=out,
        date=date or T0 + mid * 60,
        media_kind=MediaKind.VOICE,
        is_forwarded=fwd,
    )


async def _seed(db: Database, durations: dict[int, float | None]) -> None:
    await history.upsert_peers(db, [Peer(CHAT, PeerKind.USER, first_name="Carol")])
    await history.upsert_messages(db, [_voice(mid, out=mid % 2 == 0) for mid in durations])
    await transcripts.note_media(
        db,
        [transcripts.note_media_row(CHAT, mid, duration_s=d) for mid, d in durations.items()],
    )


async def _by_audio(note: VoiceNote) -> bytes:
    return f"said {note.message_id}".encode()


# --- store ---------------------------------------------------------------------------------------
async def test_a_finished_transcript_is_never_replaced_by_a_failure(db: Database) -> None:
    await _seed(db, {1: 5.0})
    assert await transcripts.save_result(db, CHAT, 1, TranscriptStatus.DONE, text="привет")
    assert not await transcripts.save_result(db, CHAT, 1, TranscriptStatus.FAILED, error="x")
    # recording the media again keeps the transcript, refreshes the facts
    await transcripts.note_media(db, [transcripts.note_media_row(CHAT, 1, duration_s=6.0)])
    row = await transcripts.get(db, CHAT, 1)
    assert row is not None and row.status is TranscriptStatus.DONE and row.text == "привет"
    assert row.duration_s == 6.0 and row.usable and row.attempts == 1
    # the message itself is untouched: still a media message with no text
    msg = await history.get_message(db, CHAT, 1)
    assert msg is not None and msg.text == "" and msg.media_kind is MediaKind.VOICE


async def test_attach_fills_transcripts_and_the_rules_read_them(db: Database) -> None:
    await _seed(db, {1: 5.0, 2: 5.0})
    await transcripts.save_result(db, CHAT, 1, TranscriptStatus.DONE, text="привет как дела")
    await transcripts.save_result(db, CHAT, 2, TranscriptStatus.FAILED, error="boom")
    text = Message(CHAT, 3, CHAT, False, T0 + 999, text="обычный текст")
    msgs = await transcripts.attach(db, [_voice(1), _voice(2), text])
    assert [m.transcript for m in msgs] == ["привет как дела", None, None]
    assert rule_row(msgs[0])[3:] == ("привет как дела", None, KIND_TEXT)
    assert rule_row(msgs[1])[5] == KIND_MEDIA  # no transcript: still media-only
    captioned = replace(msgs[0], text="смотри")
    assert rule_row(captioned)[3] == "смотри\nпривет как дела"


# --- the pipeline --------------------------------------------------------------------------------
async def test_limits_budget_and_order(db: Database) -> None:
    # newest first: 6, 5, 4, 3, 2, 1; 5 is over the per-note limit and never fetched
    await _seed(db, {1: 10.0, 2: 10.0, 3: 10.0, 4: 10.0, 5: 400.0, 6: 10.0})
    notes = await transcripts.notes_to_transcribe(db, max_duration_s=300)
    assert [n.message_id for n in notes] == [6, 5, 4, 3, 2, 1]
    fetched: list[int] = []

    async def fetch(note: VoiceNote) -> bytes:
        fetched.append(note.message_id)
        return await _by_audio(note)

    limits = VoiceSettings(
        max_duration_s=300, history_max_hours=35 / 3600, history_max_download_mb=0
    )
    fake = FakeTranscriber()
    report = await transcribe_notes(db, fake, notes, fetch, limits)
    assert fetched == [6, 4, 3]  # 35 s of budget: three 10 s notes
    assert (report.done, report.too_long, report.left_for_next_run) == (3, 1, 2)
    assert report.notes and "next run" in report.notes[0]
    row = await transcripts.get(db, CHAT, 5)
    assert (
        row is not None and row.status is TranscriptStatus.TOO_LONG and "400s" in (row.error or "")
    )
    assert (await transcripts.get(db, CHAT, 6)).text == "said 6"  # type: ignore[union-attr]
    # the next run picks up exactly what is left
    rest = await transcripts.notes_to_transcribe(db, max_duration_s=300)
    assert [n.message_id for n in rest] == [2, 1]
    # a higher limit later brings the long note back
    again = await transcripts.notes_to_transcribe(db, max_duration_s=500)
    assert 5 in [n.message_id for n in again]


async def test_a_killed_run_loses_at_most_the_note_in_progress(db: Database) -> None:
    await _seed(db, {1: 5.0, 2: 5.0, 3: 5.0, 4: 5.0})
    limits = VoiceSettings(history_max_hours=0, history_max_download_mb=0)
    killer = FakeTranscriber(fail={3: KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        await transcribe_notes(
            db, killer, await transcripts.notes_to_transcribe(db), _by_audio, limits
        )
    rows = [await transcripts.get(db, CHAT, n) for n in (4, 3, 2, 1)]
    done = [r.message_id for r in rows if r is not None and r.status is TranscriptStatus.DONE]
    assert done == [4, 3]  # finished before the kill, each committed on its own
    fake = FakeTranscriber()
    report = await transcribe_notes(
        db, fake, await transcripts.notes_to_transcribe(db), _by_audio, limits
    )
    assert report.done == 2 and fake.calls == [b"said 2", b"said 1"]
    assert await transcripts.notes_to_transcribe(db) == []  # incremental: nothing left


async def test_failures_are_retried_up_to_the_limit(db: Database) -> None:
    await _seed(db, {1: 5.0})
    limits = VoiceSettings(max_attempts=2, history_max_hours=0, history_max_download_mb=0)
    for _ in range(2):
        notes = await transcripts.notes_to_transcribe(db, max_attempts=2)
        fake = FakeTranscriber(fail={1: TranscriptionError("decoder exploded")})
        report = await transcribe_notes(db, fake, notes, _by_audio, limits)
        assert report.failed == 1
    row = await transcripts.get(db, CHAT, 1)
    assert row is not None and row.status is TranscriptStatus.FAILED and row.attempts == 2
    assert await transcripts.notes_to_transcribe(db, max_attempts=2) == []


async def test_unavailable_and_forwarded_notes(db: Database, tmp_path: Path) -> None:
    await _seed(db, {1: 5.0})
    await history.upsert_messages(db, [_voice(2, fwd=True)])  # not the chat's own words
    notes = await transcripts.notes_to_transcribe(db)
    assert [n.message_id for n in notes] == [1]
    report = await transcribe_notes(
        db, FakeTranscriber(), notes, local_files(10**6), VoiceSettings(history_max_hours=0)
    )
    assert report.unavailable == 1
    row = await transcripts.get(db, CHAT, 1)
    assert row is not None and row.status is TranscriptStatus.UNAVAILABLE


async def test_live_entry_point_stores_every_outcome(db: Database) -> None:
    await _seed(db, {1: 5.0, 2: 5.0, 3: 5.0, 4: 5.0})
    notes = {n.message_id: n for n in await transcripts.notes_to_transcribe(db)}
    ok, t = await transcribe_and_store(db, FakeTranscriber(), notes[1], b"hello there")
    assert ok.usable and ok.text == "hello there" and t is not None and ok.model == "fake-whisper"
    cases = {
        2: (AudioTooLongError(400, 300), TranscriptStatus.TOO_LONG),
        3: (TranscriptionTimeoutError("took longer than 120s"), TranscriptStatus.FAILED),
    }
    for mid, (error, status) in cases.items():
        row, result = await transcribe_and_store(
            db, FakeTranscriber(fail={1: error}), notes[mid], b"x"
        )
        assert row.status is status and result is None and not row.usable and row.error
    with pytest.raises(TranscriberClosedError):
        await transcribe_and_store(
            db, FakeTranscriber(fail={1: TranscriberClosedError("busy")}), notes[4], b"x"
        )
    assert await transcripts.get(db, CHAT, 4) is not None  # only the media facts
    assert (await transcripts.get(db, CHAT, 4)).status is TranscriptStatus.PENDING  # type: ignore[union-attr]
    assert isinstance(NoteUnavailableError("x"), Exception)


# --- dataset -------------------------------------------------------------------------------------
async def _dialogue(db: Database) -> None:
    msgs = [
        Message(CHAT, 1, CHAT, False, T0, text="как дела"),
        replace(_voice(2, out=True, date=T0 + 60)),  # the owner answers by voice
        Message(CHAT, 3, CHAT, False, T0 + 120, text="а что делаешь вечером"),
        Message(CHAT, 4, 100, True, T0 + 180, text="пока не знаю"),
    ]
    await history.upsert_peers(db, [Peer(CHAT, PeerKind.USER, first_name="Carol")])
    await history.upsert_messages(db, msgs)
    await transcripts.save_result(
        db, CHAT, 2, TranscriptStatus.DONE, text="нормально а у тебя как", language="ru"
    )


async def test_dataset_uses_transcripts_and_counts_them(db: Database) -> None:
    await _dialogue(db)
    options = DatasetOptions(validation_share=0, max_contact_share=1.0)
    with_voice = build_from_db(db.path, options, workers=1)
    replies = [s.reply for s in with_voice.train]
    assert "нормально а у тебя как" in replies
    stats = with_voice.stats
    assert stats.voice_notes_transcribed == 1
    assert stats.samples_voice_reply == 1 and stats.samples_voice_context >= 1
    assert stats.to_dict()["samples_voice_reply"] == 1
    without = build_from_db(db.path, replace(options, voice_transcripts=False), workers=1)
    assert "нормально а у тебя как" not in [s.reply for s in without.train]
    assert without.stats.samples_voice_reply == 0
    assert without.stats.messages_dropped["media_only"] == 1
    # a worker process reads transcripts the same way
    parts, *_ = make_chunk(db.path, options, [(CHAT, (), 1)], True)
    plain, *_ = make_chunk(db.path, options, [(CHAT, (), 1)], False)
    assert parts[0].kept == plain[0].kept + 1


# --- Desktop import → doppelbot transcribe --------------------------------------------------------
def _desktop_export(folder: Path, ogg: bytes) -> Path:
    (folder / "voice_messages").mkdir(parents=True)
    (folder / "round_video_messages").mkdir()
    (folder / "voice_messages" / "audio_1.ogg").write_bytes(ogg)
    (folder / "round_video_messages" / "r.mp4").write_bytes(make_mp4_aac(1.5))

    def msg(mid: int, who: str, **extra: Any) -> dict[str, Any]:
        sender = {"me": ("Owner", "user100"), "you": ("Carol", f"user{CHAT}")}[who]
        return {
            "id": mid,
            "type": "message",
            "date": "2023-05-01T10:00:00",
            "date_unixtime": str(T0 + mid * 60),
            "from": sender[0],
            "from_id": sender[1],
            "text": extra.pop("text", ""),
            "text_entities": [],
            **extra,
        }

    voice = {"media_type": "voice_message", "mime_type": "audio/ogg", "duration_seconds": 2}
    data = {
        "name": "Carol",
        "type": "personal_chat",
        "id": CHAT,
        "messages": [
            msg(1, "you", text="привет"),
            msg(2, "you", file="voice_messages/audio_1.ogg", **voice),
            msg(3, "me", file="round_video_messages/r.mp4", media_type="video_message"),
            msg(4, "me", file="voice_messages/audio_2.ogg", **voice),  # not in the folder
            msg(5, "you", file="(File not included. Change data exporting settings.)", **voice),
            msg(6, "you", file="voice_messages/audio_1.ogg", forwarded_from="Dan", **voice),
        ],
    }
    (folder / "result.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return folder


def test_import_then_transcribe(
    tmp_path: Path,
    whisper_dir: Path,
    voice_ogg: bytes,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    export = _desktop_export(tmp_path / "export", voice_ogg)
    for key, value in {
        "VOICE_MODEL": str(whisper_dir),
        "VOICE_TEMPERATURE_FALLBACK": "false",
        "VOICE_VAD_FILTER": "false",
        "VOICE_THREADS": "2",
    }.items():
        monkeypatch.setenv(f"DOPPELBOT_{key}", value)
    env = tmp_path / "empty.env"
    env.write_text("", encoding="utf-8")
    base = ["--env-file", str(env), "--data-dir", str(tmp_path / "data")]

    def cli(*args: str) -> str:
        main([*base, *args])
        return capsys.readouterr().out

    assert "imported 6 messages" in cli("import", str(export))

    async def rows() -> dict[int, Any]:
        async with await Database.open(tmp_path / "data" / "doppelbot.sqlite3") as db:
            found = await transcripts.for_messages(db, CHAT, [1, 2, 3, 4, 5, 6])
            notes = await transcripts.notes_to_transcribe(db)
        return {**found, "plan": [n.message_id for n in notes]}

    import asyncio

    before = asyncio.run(rows())
    assert before[2].status is TranscriptStatus.PENDING and before[2].duration_s == 2.0
    assert before[2].file_path == str((export / "voice_messages" / "audio_1.ogg").resolve())
    assert before[3].status is TranscriptStatus.PENDING  # the round video
    assert before[4].status is TranscriptStatus.UNAVAILABLE and before[4].file_path is None
    assert before[5].status is TranscriptStatus.UNAVAILABLE
    assert 1 not in before and 6 not in before  # text, and a forwarded note
    out = cli("transcribe")
    assert "transcribed 2 voice note(s)" in out
    assert "2 note(s) have no local file" in out
    after = asyncio.run(rows())
    for mid in (2, 3):
        assert after[mid].status is TranscriptStatus.DONE
        assert after[mid].model == whisper_dir.name and after[mid].language == "ru"
        assert after[mid].duration_s and after[mid].duration_s > 1
    assert "transcribed 0 voice note(s)" in cli("transcribe")  # incremental
    # the missing file turns up: importing again makes that note pending, the rest stays
    shutil.copy(
        export / "voice_messages" / "audio_1.ogg", export / "voice_messages" / "audio_2.ogg"
    )
    cli("import", str(export))
    again = asyncio.run(rows())
    assert again[2].status is TranscriptStatus.DONE and again[4].status is TranscriptStatus.PENDING
    assert "transcribed 1 voice note(s)" in cli("transcribe")


def test_transcribe_when_voice_is_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOPPELBOT_VOICE_TRANSCRIPTION", "false")
    env = tmp_path / "empty.env"
    env.write_text("", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        main(["--env-file", str(env), "--data-dir", str(tmp_path), "transcribe"])
    assert exit_.value.code == 2
    assert "DOPPELBOT_VOICE_TRANSCRIPTION" in capsys.readouterr().err


async def test_live_context_reads_an_attached_transcript(db: Database) -> None:
    from doppelbot.dataset.sessions import build_live_context

    await _dialogue(db)
    messages = await history.recent_messages(db, CHAT, 50)
    plain = build_live_context(messages, T0 + 600, DatasetOptions())
    assert all("нормально" not in t.text for t in plain)  # a bare note is media-only
    attached = await transcripts.attach(db, messages)
    turns = build_live_context(attached, T0 + 600, DatasetOptions())
    assert any(t.text == "нормально а у тебя как" for t in turns)

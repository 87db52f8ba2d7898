"""``export --voice`` on the real Telethon stack: the fake Telegram serves voice and round-video
notes with real OGG/MP4 bytes through ``upload.getFile``, Telethon's own ``download_media``
fetches them in parts, and the tiny converted Whisper transcribes them. Checked: both
directions, limits (no download of a note over the limit), the budget, FloodWait, resuming,
and the live helpers (``note_of``, ``download_note``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from telethon.errors import FileReferenceExpiredError, LimitInvalidError
from telethon.tl import functions, types

from doppelbot.config import Settings, VoiceSettings
from doppelbot.core.domain import MediaKind, TranscriptStatus
from doppelbot.core.errors import FloodWaitTooLongError, NoteTooLargeError
from doppelbot.speech import TranscriptionWorker
from doppelbot.speech.model import whisper_spec
from doppelbot.store import transcripts
from doppelbot.store.database import Database
from doppelbot.telegram.export import Exporter, ExportOptions
from doppelbot.telegram.voice import download_note, export_voice, note_of, transcribe_incoming
from tests import faketg
from tests.faketg import FakeTelegram
from tests.tiny_whisper import make_mp4_aac, make_ogg_opus

CAROL = 1001
OPTS = ExportOptions(use_takeout=False, fallback_wait_s=0, flood_wait_max_s=10)
LIMITS = VoiceSettings(max_duration_s=60, history_max_hours=0, history_max_download_mb=0)


class FakeSleep:
    def __init__(self) -> None:
        self.slept: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


@pytest.fixture
async def world(voice_ogg: bytes) -> AsyncIterator[tuple[FakeTelegram, Any, dict[str, Any]]]:
    tg = FakeTelegram()
    carol = tg.add_user("Carol", user_id=CAROL)
    long_ogg = make_ogg_opus(20.0)  # more than one 128 KB download part
    msgs = {
        "text": tg.add_message(carol, "привет"),
        "in": tg.add_message(carol, media=faketg.voice(2, data=voice_ogg)),
        "out": tg.add_message(carol, out=True, media=faketg.voice(20, data=long_ogg)),
        "round": tg.add_message(carol, media=faketg.video_note(1.5, data=make_mp4_aac(1.5))),
        "fwd": tg.add_message(carol, media=faketg.voice(2, data=voice_ogg), fwd_from="Dan"),
        "long": tg.add_message(carol, media=faketg.voice(3600, data=voice_ogg)),
    }
    client = tg.client(receive_updates=False, flood_sleep_threshold=0)
    await client.connect()
    try:
        yield tg, client, msgs
    finally:
        await client.disconnect()


def _doc_id(msg: Any) -> int:
    return msg.media.document.id


async def test_export_voice_downloads_and_transcribes_both_directions(
    world: tuple[FakeTelegram, Any, dict[str, Any]], db: Database, voice_settings: Settings
) -> None:
    tg, client, msgs = world
    report = await Exporter(client, db, OPTS).run()
    chat_ids = [c.chat_id for c in report.chats]
    async with TranscriptionWorker(whisper_spec(voice_settings)) as worker:
        voice = await export_voice(client, db, worker, LIMITS, chat_ids=chat_ids)
        assert (voice.done, voice.too_long, voice.failed) == (3, 1, 0)
        assert voice.audio_s > 20 and voice.downloaded_bytes > 0 and voice.rtf
        chat = chat_ids[0]
        for key in ("in", "out", "round"):
            row = await transcripts.get(db, chat, msgs[key].id)
            assert row is not None and row.status is TranscriptStatus.DONE, key
            assert row.model == worker.model_name and row.language == "ru"
        long = await transcripts.get(db, chat, msgs["long"].id)
        assert long is not None and long.status is TranscriptStatus.TOO_LONG
        assert long.duration_s == 3600
        assert await transcripts.get(db, chat, msgs["fwd"].id) is None
        downloaded = {doc for doc, _, _ in tg.downloads}
        assert _doc_id(msgs["long"]) not in downloaded  # never fetched
        assert _doc_id(msgs["fwd"]) not in downloaded
        parts = [(off, lim) for doc, off, lim in tg.downloads if doc == _doc_id(msgs["out"])]
        assert len(parts) >= 2 and parts[1][0] == parts[0][1]  # Telethon's chunked download
        # incremental: a second run has nothing to do and downloads nothing
        before = len(tg.downloads)
        again = await export_voice(client, db, worker, LIMITS, chat_ids=chat_ids)
        assert (again.planned, again.done) == (0, 0) and len(tg.downloads) == before


async def test_budget_floodwait_and_resume(
    world: tuple[FakeTelegram, Any, dict[str, Any]], db: Database, voice_settings: Settings
) -> None:
    tg, client, msgs = world
    chat_ids = [c.chat_id for c in (await Exporter(client, db, OPTS).run()).chats]
    sleep = FakeSleep()
    tg.fail_next("GetFileRequest", "FLOOD_WAIT_3")
    # 5 s of budget: the newest note (the round video, 1.5 s) and the 2 s one fit, not the 20 s
    small = VoiceSettings(max_duration_s=60, history_max_hours=5 / 3600, history_max_download_mb=0)
    async with TranscriptionWorker(whisper_spec(voice_settings)) as worker:
        first = await export_voice(client, db, worker, small, chat_ids=chat_ids, sleep=sleep)
        assert sleep.slept == [3]  # the FloodWait was waited out, the note retried
        assert first.done == 2 and first.left_for_next_run == 1
        # a wait longer than the bound stops the run cleanly, keeping what is done
        tg.fail_next("GetFileRequest", "FLOOD_WAIT_999")
        with pytest.raises(FloodWaitTooLongError):
            await export_voice(
                client, db, worker, LIMITS, chat_ids=chat_ids, flood_wait_max_s=10, sleep=sleep
            )
        rest = await export_voice(client, db, worker, LIMITS, chat_ids=chat_ids, sleep=sleep)
        assert (rest.planned, rest.done) == (1, 1)
        row = await transcripts.get(db, chat_ids[0], msgs["out"].id)
        assert row is not None and row.status is TranscriptStatus.DONE


async def test_live_helpers(
    world: tuple[FakeTelegram, Any, dict[str, Any]], voice_ogg: bytes
) -> None:
    _, client, msgs = world
    await client.get_dialogs()  # the session learns Carol's access hash
    [got] = await client.get_messages(CAROL, ids=[msgs["in"].id])
    note = note_of(got)
    assert note is not None and note.kind is MediaKind.VOICE and note.duration_s == 2
    assert not note.is_outgoing and note.size_bytes == len(voice_ogg)
    assert await download_note(client, got, max_bytes=10**7) == voice_ogg
    with pytest.raises(NoteTooLargeError):
        await download_note(client, got, max_bytes=100)
    [text] = await client.get_messages(CAROL, ids=[msgs["text"].id])
    assert note_of(text) is None
    [round_] = await client.get_messages(CAROL, ids=[msgs["round"].id])
    assert note_of(round_).kind is MediaKind.VIDEO_NOTE  # type: ignore[union-attr]


async def test_fake_enforces_telegram_file_rules(
    world: tuple[FakeTelegram, Any, dict[str, Any]],
) -> None:
    tg, client, msgs = world
    doc = msgs["in"].media.document
    loc = types.InputDocumentFileLocation(
        id=doc.id, access_hash=doc.access_hash, file_reference=doc.file_reference, thumb_size=""
    )
    ok = await client(functions.upload.GetFileRequest(loc, offset=0, limit=4096))
    assert ok.bytes == tg.files[doc.id][:4096]
    for offset, limit in ((0, 1000), (100, 4096), (0, 3 * 4096)):
        with pytest.raises(LimitInvalidError):
            await client(functions.upload.GetFileRequest(loc, offset=offset, limit=limit))
    stale = types.InputDocumentFileLocation(
        id=doc.id, access_hash=doc.access_hash, file_reference=b"old", thumb_size=""
    )
    with pytest.raises(FileReferenceExpiredError):
        await client(functions.upload.GetFileRequest(stale, offset=0, limit=4096))


async def test_transcribe_incoming_is_one_call_that_never_blocks_a_reply(
    world: tuple[FakeTelegram, Any, dict[str, Any]], db: Database, voice_settings: Settings
) -> None:
    tg, client, msgs = world
    await client.get_dialogs()
    got = {k: (await client.get_messages(CAROL, ids=[m.id]))[0] for k, m in msgs.items()}
    async with TranscriptionWorker(whisper_spec(voice_settings)) as worker:
        row = await transcribe_incoming(client, db, worker, got["in"], LIMITS)
        assert row is not None and row.status is TranscriptStatus.DONE
        assert row.model == worker.model_name and row.duration_s == pytest.approx(2, abs=0.1)
        assert await transcribe_incoming(client, db, worker, got["text"], LIMITS) is None
        before = len(tg.downloads)
        long = await transcribe_incoming(client, db, worker, got["long"], LIMITS)
        assert long is not None and long.status is TranscriptStatus.TOO_LONG
        assert len(tg.downloads) == before  # not downloaded
        tg.fail_next("GetFileRequest", "FLOOD_WAIT_30")
        flood = await transcribe_incoming(client, db, worker, got["round"], LIMITS)
        assert flood is not None and flood.status is TranscriptStatus.FAILED
        assert "wait 30s" in (flood.error or "")
    # the worker is shut down: nothing stored, nothing raised, history picks it up later
    closed = await transcribe_incoming(client, db, worker, got["out"], LIMITS)
    assert closed is None
    row = await transcripts.get(db, CAROL, msgs["out"].id)
    assert row is not None and row.status is TranscriptStatus.PENDING and row.duration_s == 20


async def test_cli_voice_export_shows_progress_and_a_summary(
    world: tuple[FakeTelegram, Any, dict[str, Any]], db: Database, voice_settings: Settings
) -> None:
    import io

    from rich.console import Console

    from doppelbot.cli.voice_cmd import export_notes, print_report

    _, client, _ = world
    chat_ids = [c.chat_id for c in (await Exporter(client, db, OPTS).run()).chats]
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)
    settings = voice_settings.model_copy(
        update={"voice": replace(voice_settings.voice, max_duration_s=60.0)}
    )
    report = await export_notes(settings, client, db, chat_ids, console)
    print_report(console, report)
    text = out.getvalue()
    assert "voice notes" in text and "3/3" in text  # the progress bar finished
    assert "transcribed 3 voice note(s)" in text and "real time" in text
    assert "1 too long, not transcribed" in text

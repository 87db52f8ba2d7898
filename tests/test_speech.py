"""The speech package on real libraries: PyAV decoding of generated notes, the real loading
code on a tiny random Whisper converted with CTranslate2's converter, and the worker thread
(timeouts, a full queue, load failures, the event loop kept free). Random weights give random
text: these tests check structure, never wording."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from doppelbot.config import Settings, VoiceSettings
from doppelbot.core.errors import (
    AudioDecodeError,
    AudioTooLongError,
    SpeechModelError,
    TranscriberClosedError,
    TranscriptionError,
    TranscriptionTimeoutError,
)
from doppelbot.speech import TranscriptionWorker, WhisperSpec
from doppelbot.speech.audio import SAMPLE_RATE, decode_audio, probe_duration
from doppelbot.speech.model import (
    decode_kwargs,
    load_whisper,
    resolve_compute_type,
    whisper_spec,
)
from tests.tiny_whisper import make_mp4_aac, make_ogg_opus


# --- audio ---------------------------------------------------------------------------------------
def test_decodes_ogg_opus_and_mp4_to_16k_mono(voice_ogg: bytes, tmp_path: Path) -> None:
    samples = decode_audio(voice_ogg)
    assert samples.dtype.name == "float32" and samples.ndim == 1
    assert abs(samples.shape[0] / SAMPLE_RATE - 2.0) < 0.1
    assert 0.05 < float(abs(samples).max()) <= 1.0  # the tone is there, in range
    mp4 = tmp_path / "round.mp4"
    mp4.write_bytes(make_mp4_aac(1.5))
    from_file = decode_audio(mp4)
    assert abs(from_file.shape[0] / SAMPLE_RATE - 1.5) < 0.1
    assert probe_duration(voice_ogg) == pytest.approx(2.0, abs=0.1)


def test_too_long_note_is_refused(voice_ogg: bytes) -> None:
    with pytest.raises(AudioTooLongError) as err:
        decode_audio(voice_ogg, max_duration_s=0.5)
    assert err.value.duration_s > 1.5 and "DOPPELBOT_VOICE_MAX_DURATION_S" in str(err.value)
    assert decode_audio(voice_ogg, max_duration_s=2.0).shape[0] > 0  # within the slack


def test_bad_audio_is_a_decode_error(tmp_path: Path) -> None:
    with pytest.raises(AudioDecodeError):
        decode_audio(b"OggS not really an ogg file" * 10)
    with pytest.raises(AudioDecodeError, match="missing"):
        decode_audio(tmp_path / "gone.ogg")


# --- loading -------------------------------------------------------------------------------------
def test_real_loading_code_on_a_tiny_converted_model(whisper_dir: Path, voice_ogg: bytes) -> None:
    spec = WhisperSpec(
        VoiceSettings(
            model=str(whisper_dir),
            device="cpu",
            threads=1,
            language="ru",
            temperature_fallback=False,
            vad_filter=False,
        )
    )
    model = load_whisper(spec)
    assert model.model.is_multilingual  # Whisper's vocabulary layout is right
    assert spec.name == whisper_dir.name
    from doppelbot.speech.engine import transcribe_audio

    t = transcribe_audio(model, voice_ogg, spec.voice, model_name=spec.name)
    assert t.language == "ru" and t.model == whisper_dir.name
    assert t.duration_s == pytest.approx(2.0, abs=0.1) and t.seconds > 0
    assert t.language_probability is None  # given, not detected
    assert isinstance(t.text, str)


def test_language_detection_and_vad_work_offline(whisper_dir: Path, voice_ogg: bytes) -> None:
    from doppelbot.speech.engine import transcribe_audio

    spec = WhisperSpec(
        VoiceSettings(
            model=str(whisper_dir),
            device="cpu",
            threads=1,
            language="auto",
            temperature_fallback=False,
            vad_filter=True,
        )
    )
    t = transcribe_audio(load_whisper(spec), voice_ogg, spec.voice, model_name="tiny")
    assert t.language and t.language_probability is not None
    assert t.text == ""  # a tone is not speech: the VAD leaves nothing to transcribe


def test_load_errors_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(SpeechModelError, match="not found"):
        load_whisper(WhisperSpec(VoiceSettings(model=str(tmp_path / "nope"), device="cpu")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpeechModelError, match=r"no model\.bin"):
        load_whisper(WhisperSpec(VoiceSettings(model=str(tmp_path / "empty"), device="cpu")))
    # a hub id goes through the hub download (offline in tests: a clear hint, no traceback)
    with pytest.raises(SpeechModelError, match="DOPPELBOT_VOICE_MODEL"):
        load_whisper(
            WhisperSpec(VoiceSettings(model="base", device="cpu"), download_root=tmp_path / "hub")
        )
    assert resolve_compute_type("cpu", "auto") == "int8"
    assert resolve_compute_type("cuda", "auto") == "float16"
    assert resolve_compute_type("cpu", "float32") == "float32"


def test_spec_of_the_settings(settings: Settings) -> None:
    spec = whisper_spec(settings)
    assert spec.voice is settings.voice and spec.voice.model == "small"
    assert spec.download_root == settings.store.data_dir / "cache" / "speech"
    kwargs = decode_kwargs(spec.voice)
    assert kwargs["language"] == "ru" and kwargs["without_timestamps"] is True
    assert "temperature" not in kwargs  # fallback on: faster-whisper's ladder
    assert decode_kwargs(VoiceSettings(language="auto"))["language"] is None


# --- the worker ----------------------------------------------------------------------------------
async def test_worker_transcribes_off_the_event_loop(
    voice_settings: Settings, voice_ogg: bytes
) -> None:
    ticks = 0
    stop = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    worker = TranscriptionWorker(whisper_spec(voice_settings))
    async with worker:
        await worker.start()
        beat = asyncio.create_task(heartbeat())
        before = ticks
        t = await worker.transcribe(voice_ogg)
        during = ticks - before
        stop.set()
        await beat
        assert t.model == Path(voice_settings.voice.model).name
        assert t.duration_s == pytest.approx(2.0, abs=0.1)
        assert during >= 1  # the loop kept running while the thread worked
        with pytest.raises(AudioTooLongError):
            await worker.transcribe(voice_ogg, max_duration_s=0.5)
        with pytest.raises(AudioDecodeError):
            await worker.transcribe(b"garbage" * 50)
        assert (await worker.transcribe(voice_ogg)).duration_s > 0  # still serving
    assert not worker.alive


class _SlowModel:
    """Stands in for a WhisperModel: many slow windows, each checked by the engine."""

    def __init__(self, windows: int, each_s: float) -> None:
        self.windows, self.each_s = windows, each_s
        self.done = 0
        self.started = threading.Event()

    def transcribe(self, samples: Any, **kwargs: Any) -> tuple[Any, Any]:
        def gen() -> Any:
            self.started.set()
            for _ in range(self.windows):
                time.sleep(self.each_s)
                self.done += 1
                yield SimpleNamespace(text="слово")

        return gen(), SimpleNamespace(language="ru", language_probability=1.0)


def _spec(**voice: Any) -> WhisperSpec:
    return WhisperSpec(VoiceSettings(model="fake", language="ru", **voice))


async def test_timeout_frees_the_thread_and_the_worker_goes_on(voice_ogg: bytes) -> None:
    slow = _SlowModel(windows=200, each_s=0.01)
    worker = TranscriptionWorker(_spec(timeout_s=0.3), loader=lambda: slow)
    async with worker:
        with pytest.raises(TranscriptionTimeoutError, match="DOPPELBOT_VOICE_TIMEOUT_S"):
            await worker.transcribe(voice_ogg)
        stopped_at = slow.done
        assert stopped_at < 200
        slow.windows = 2
        t = await worker.transcribe(voice_ogg)  # the dropped job left the thread free
        assert t.text == "слово слово"
        assert slow.done <= stopped_at + 1 + 2  # the dropped job stopped at its next window


async def test_full_queue_and_cancelled_callers(voice_ogg: bytes) -> None:
    slow = _SlowModel(windows=30, each_s=0.01)
    worker = TranscriptionWorker(_spec(queue_size=1, timeout_s=60), loader=lambda: slow)
    async with worker:
        await worker.start()
        first = asyncio.create_task(worker.transcribe(voice_ogg))
        await asyncio.to_thread(slow.started.wait, 5)
        second = asyncio.create_task(worker.transcribe(voice_ogg))
        await asyncio.sleep(0)
        with pytest.raises(TranscriberClosedError, match="busy"):
            await worker.transcribe(voice_ogg)
        second.cancel()
        assert (await first).text
        with pytest.raises(asyncio.CancelledError):
            await second


async def test_load_failure_reaches_every_caller(voice_ogg: bytes) -> None:
    def broken() -> Any:
        raise RuntimeError("weights are corrupt")

    worker = TranscriptionWorker(_spec(), loader=broken)
    for _ in range(2):
        with pytest.raises(SpeechModelError, match="weights are corrupt"):
            await worker.transcribe(voice_ogg)
    await worker.aclose()


async def test_engine_errors_become_transcription_errors(voice_ogg: bytes) -> None:
    class Exploding:
        def transcribe(self, samples: Any, **kwargs: Any) -> Any:
            raise ValueError("bad shape")

    async with TranscriptionWorker(_spec(), loader=Exploding) as worker:
        with pytest.raises(TranscriptionError, match="bad shape"):
            await worker.transcribe(voice_ogg)


def test_generated_notes_are_real_opus() -> None:
    import io

    import av

    with av.open(io.BytesIO(make_ogg_opus(0.5))) as c:
        assert c.format.name == "ogg" and c.streams.audio[0].codec_context.name == "opus"


def test_compute_type_setting_is_checked(tmp_path: Path) -> None:
    from doppelbot.config import load_settings
    from doppelbot.core.errors import ConfigError

    ok = load_settings(env_file=None, data_dir=tmp_path, voice_compute_type=" INT8 ")
    assert ok.voice.compute_type == "int8"
    with pytest.raises(ConfigError, match="DOPPELBOT_VOICE_COMPUTE_TYPE: expected one of auto"):
        load_settings(env_file=None, data_dir=tmp_path, voice_compute_type="int4")
    with pytest.raises(ConfigError, match="DOPPELBOT_VOICE_LANGUAGE"):
        load_settings(env_file=None, data_dir=tmp_path, voice_language="russian!")


def test_a_size_name_loads_the_downloaded_copy_and_says_how_to_get_it(
    tmp_path: Path, whisper_dir: Path
) -> None:
    import shutil

    from doppelbot.model.local import LocalModel, record, speech_repo

    data = tmp_path / "data"
    spec = WhisperSpec(VoiceSettings(model="small", device="cpu"), data_dir=data)
    with pytest.raises(SpeechModelError, match=r"run `doppelbot model download speech`"):
        load_whisper(spec)
    folder = data / "models" / "Systran--faster-whisper-small"
    shutil.copytree(whisper_dir, folder)
    record(data, LocalModel(speech_repo("small"), "speech", folder, "main"))
    assert load_whisper(spec) is not None  # the local copy, with no hub in sight

"""One transcription on a loaded model: decode the note, run Whisper window by window.

Runs in the speech worker's thread. ``check()`` is called between 30-second windows (and
after decoding), so a caller that gave up — its timeout passed, or it was cancelled — frees
the thread at the next window instead of after the whole note.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from doppelbot.config import VoiceSettings
from doppelbot.core.ports import Transcript
from doppelbot.speech.audio import SAMPLE_RATE, decode_audio
from doppelbot.speech.model import decode_kwargs

Check = Callable[[], None]


def _no_check() -> None:
    pass


def transcribe_audio(
    model: Any,
    audio: bytes | Path | Any,
    voice: VoiceSettings,
    *,
    model_name: str,
    max_duration_s: float | None = None,
    check: Check = _no_check,
) -> Transcript:
    """Transcribe ``audio`` (note bytes, a file, or 16 kHz float32 samples)."""
    started = time.perf_counter()
    if isinstance(audio, bytes | bytearray | memoryview | Path):
        samples = decode_audio(audio, max_duration_s=max_duration_s)
    else:
        samples = audio
    check()
    segments, info = model.transcribe(samples, **decode_kwargs(voice))
    parts: list[str] = []
    for segment in segments:  # lazy: each step decodes one window
        parts.append(segment.text)
        check()
    text = " ".join(p.strip() for p in parts if p.strip())
    return Transcript(
        text=text,
        language=info.language,
        duration_s=round(samples.shape[0] / SAMPLE_RATE, 3),
        model=model_name,
        seconds=round(time.perf_counter() - started, 3),
        language_probability=None if voice.decode_language else float(info.language_probability),
    )

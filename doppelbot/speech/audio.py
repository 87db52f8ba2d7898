"""Decode a voice or round-video note to the 16 kHz mono float32 samples Whisper reads.

PyAV (FFmpeg's libraries, bundled in its wheel: no ffmpeg binary needed) opens the note from
bytes or a file: OGG/Opus voice notes, MP4 round videos (their AAC track; the video is never
decoded), or anything else FFmpeg reads. A note longer than the limit is refused from its
container's duration before any decoding, and — for files that do not say — as soon as the
decoded audio passes the limit, so a huge or hostile file costs at most the limit's worth of
work. Any FFmpeg failure becomes ``AudioDecodeError``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from doppelbot.core.errors import AudioDecodeError, AudioTooLongError

SAMPLE_RATE = 16_000


def _open(source: bytes | Path) -> Any:
    import av

    try:
        if isinstance(source, bytes | bytearray | memoryview):
            return av.open(io.BytesIO(bytes(source)), mode="r", metadata_errors="ignore")
        return av.open(str(source), mode="r", metadata_errors="ignore")
    except FileNotFoundError:
        raise AudioDecodeError(f"the note's file is missing: {source}") from None
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise AudioDecodeError(f"cannot open the note's audio: {exc}") from None


def _declared_duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base is microseconds
    return None


def probe_duration(source: bytes | Path) -> float | None:
    """The note's duration as its container declares it (None if it does not say)."""
    with _open(source) as container:
        if not container.streams.audio:
            raise AudioDecodeError("the note has no audio track")
        return _declared_duration(container, container.streams.audio[0])


def decode_audio(source: bytes | Path, *, max_duration_s: float | None = None) -> Any:
    """The note's first audio track as a float32 numpy array at 16 kHz, mono.

    Raises ``AudioTooLongError`` when the note is longer than ``max_duration_s`` (with one
    second of slack for containers that round), ``AudioDecodeError`` when it cannot be read.
    """
    import av
    import numpy as np

    limit = None if max_duration_s is None else max_duration_s + 1.0
    with _open(source) as container:
        if not container.streams.audio:
            raise AudioDecodeError("the note has no audio track")
        stream = container.streams.audio[0]
        declared = _declared_duration(container, stream)
        if limit is not None and declared is not None and declared > limit:
            raise AudioTooLongError(declared, max_duration_s or 0.0)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks: list[Any] = []
        total = 0
        max_samples = None if limit is None else int(limit * SAMPLE_RATE)
        try:
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler keep its own clock (gaps are not ours)
                for out in resampler.resample(frame):
                    data = out.to_ndarray().reshape(-1)
                    chunks.append(data)
                    total += data.shape[0]
                if max_samples is not None and total > max_samples:
                    raise AudioTooLongError(total / SAMPLE_RATE, max_duration_s or 0.0)
            for out in resampler.resample(None):
                data = out.to_ndarray().reshape(-1)
                chunks.append(data)
                total += data.shape[0]
        except av.FFmpegError as exc:
            if not chunks:
                raise AudioDecodeError(f"cannot decode the note's audio: {exc}") from None
            # a note cut short at the end (an interrupted upload): keep what decoded
    if not total:
        raise AudioDecodeError("the note's audio is empty")
    audio = np.concatenate(chunks).astype(np.float32, copy=False)
    if max_samples is not None and audio.shape[0] > max_samples:
        raise AudioTooLongError(audio.shape[0] / SAMPLE_RATE, max_duration_s or 0.0)
    return audio

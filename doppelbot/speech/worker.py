"""The speech worker: one thread owns the Whisper model; the event loop awaits its results.

A ``ThreadWorker`` (``doppelbot.workers``) like the reply model's, and for the same reasons — a
transcription is seconds of CPU work in CTranslate2 kernels, which must not freeze the event
loop, and it gets a thread of its own so it never waits behind (or holds up) a reply:

- the model loads once, *in* the thread, on ``start()`` or the first ``transcribe()``; a load
  failure is raised to every caller as ``SpeechModelError``;
- requests go through a bounded queue (full → ``TranscriberClosedError`` at once);
- the caller waits at most ``timeout_s`` from the moment it asks (queue time included): then
  it gets ``TranscriptionTimeoutError`` and the job is dropped — skipped if it has not started,
  stopped at its next 30-second window if it has — so a live reply never waits longer than the
  timeout for a transcript;
- a caller cancelled while waiting drops its job the same way;
- a failing note becomes a ``TranscriptionError`` for its caller and the worker keeps serving;
  decoding (PyAV) runs in the thread too.

It implements ``doppelbot.core.ports.Transcriber``; tests give it a loader of a tiny model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doppelbot.core.errors import (
    DoppelbotError,
    SpeechModelError,
    TranscriberClosedError,
    TranscriptionError,
    TranscriptionTimeoutError,
)
from doppelbot.core.ports import Transcript
from doppelbot.speech.engine import transcribe_audio
from doppelbot.speech.model import WhisperSpec, load_whisper
from doppelbot.workers import Cancelled, Job, ThreadWorker

log = logging.getLogger(__name__)

Loader = Callable[[], Any]


@dataclass(eq=False)
class _Note(Job[Transcript]):
    audio: bytes | Path
    max_duration_s: float | None


class TranscriptionWorker(ThreadWorker[_Note]):
    """One thread, one Whisper model, a bounded queue. See the module docstring."""

    def __init__(
        self,
        spec: WhisperSpec,
        *,
        loader: Loader | None = None,
        name: str = "doppelbot-speech",
    ) -> None:
        """A worker for ``spec`` (its queue, timeout and note limit: ``spec.voice``); the
        model loads on first use, with ``loader`` instead of ``load_whisper`` in tests."""
        super().__init__(queue_size=spec.voice.queue_size, name=name)
        self.spec = spec
        self._loader = loader
        self.timeout_s = spec.voice.timeout_s
        self.max_duration_s = spec.voice.max_duration_s

    # --- Transcriber ------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.spec.name

    async def transcribe(
        self, audio: bytes | Path, *, max_duration_s: float | None = None
    ) -> Transcript:
        limit = self.max_duration_s if max_duration_s is None else max_duration_s
        if self._closed:
            raise self.closed_error()
        loop = asyncio.get_running_loop()
        job = _Note(loop.create_future(), loop, audio=audio, max_duration_s=limit)
        # The timeout covers the load on first use as well: the caller never waits longer.
        try:
            async with asyncio.timeout(self.timeout_s):
                if not self.started:
                    await self.start()
                self.put(job)
                return await job.future
        except TimeoutError:
            job.dropped.set()
            raise TranscriptionTimeoutError(
                f"transcription took longer than {self.timeout_s:g}s (DOPPELBOT_VOICE_TIMEOUT_S)"
            ) from None
        except asyncio.CancelledError:
            job.dropped.set()
            raise

    async def __aenter__(self) -> TranscriptionWorker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- ThreadWorker -----------------------------------------------------------------------
    def closed_error(self) -> DoppelbotError:
        if self.load_error is not None:
            return self.load_error
        return TranscriberClosedError("the speech worker is shut down")

    def busy_error(self) -> DoppelbotError:
        return TranscriberClosedError(
            f"the speech worker is busy ({self._queue.maxsize} notes waiting)"
        )

    def load(self) -> Any:
        if self._loader is not None:
            return self._loader()

        return load_whisper(self.spec)

    def load_failed(self, exc: BaseException) -> DoppelbotError:
        log.debug("speech model load failed", exc_info=True)
        return SpeechModelError(f"cannot load the speech model: {exc}")

    def serve(self, job: _Note) -> None:
        try:
            result = transcribe_audio(
                self.model,
                job.audio,
                self.spec.voice,
                model_name=self.model_name,
                max_duration_s=job.max_duration_s,
                check=job.check,
            )
        except Cancelled:
            log.debug("stopped a transcription whose caller is gone")
        except TranscriptionError as exc:
            job.resolve(error=exc)
        except Exception as exc:  # one bad note must not take the worker down
            log.warning("transcription failed: %s", type(exc).__name__)
            error = TranscriptionError(f"transcription failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            job.resolve(error=error)
        else:
            job.resolve(result)

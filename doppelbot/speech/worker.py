"""The speech worker: one thread owns the Whisper model; the event loop awaits its results.

Like the reply model's worker (``doppelbot.model.worker``), and for the same reasons — a
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

It implements ``doppelbot.ports.Transcriber``; tests give it a loader of a tiny model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doppelbot.errors import (
    DoppelbotError,
    SpeechModelError,
    TranscriberClosedError,
    TranscriptionError,
    TranscriptionTimeoutError,
)
from doppelbot.ports import Transcript
from doppelbot.speech.model import WhisperSpec

log = logging.getLogger(__name__)

Loader = Callable[[], Any]


class _Cancelled(Exception):
    """The caller went away while its job ran (never reaches a caller)."""


@dataclass(eq=False)
class _Job:
    audio: bytes | Path
    max_duration_s: float | None
    future: asyncio.Future[Transcript]
    loop: asyncio.AbstractEventLoop
    dropped: threading.Event = field(default_factory=threading.Event)

    def resolve(self, result: Transcript | None = None, error: BaseException | None = None) -> None:
        def _set() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)  # type: ignore[arg-type]

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self.loop.call_soon_threadsafe(_set)


_STOP = object()


class TranscriptionWorker:
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
        self.spec = spec
        self._loader = loader
        self.model: Any = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=spec.voice.queue_size)
        self.timeout_s = spec.voice.timeout_s
        self.max_duration_s = spec.voice.max_duration_s
        self._name = name
        self._thread: threading.Thread | None = None
        self._ready: asyncio.Future[None] | None = None
        self._closed = False
        self._load_error: BaseException | None = None

    # --- Transcriber ------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.spec.name

    async def transcribe(
        self, audio: bytes | Path, *, max_duration_s: float | None = None
    ) -> Transcript:
        limit = self.max_duration_s if max_duration_s is None else max_duration_s
        if self._closed:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        job = _Job(audio, limit, loop.create_future(), loop)
        # The timeout covers the load on first use as well: the caller never waits longer.
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._ready is None or not self._ready.done():
                    await self.start()
                try:
                    self._queue.put_nowait(job)
                except queue.Full:
                    raise TranscriberClosedError(
                        f"the speech worker is busy ({self._queue.maxsize} notes waiting)"
                    ) from None
                return await job.future
        except TimeoutError:
            job.dropped.set()
            raise TranscriptionTimeoutError(
                f"transcription took longer than {self.timeout_s:g}s (DOPPELBOT_VOICE_TIMEOUT_S)"
            ) from None
        except asyncio.CancelledError:
            job.dropped.set()
            raise

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the thread and wait for the model (re-raises its load error)."""
        if self._closed:
            raise self._closed_error()
        if self._thread is None:
            loop = asyncio.get_running_loop()
            self._ready = loop.create_future()
            self._thread = threading.Thread(
                target=self._run, args=(loop, self._ready), name=self._name, daemon=True
            )
            self._thread.start()
        assert self._ready is not None
        await asyncio.shield(self._ready)

    async def aclose(self) -> None:
        """Finish the running job, fail the queued ones, join the thread."""
        if self._closed and self._load_error is None:
            return
        self._closed = True
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._drain(TranscriberClosedError("the speech worker was shut down"))
        await asyncio.to_thread(self._queue.put, _STOP)
        await asyncio.to_thread(thread.join)

    async def __aenter__(self) -> TranscriptionWorker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _closed_error(self) -> DoppelbotError:
        if self._load_error is not None and isinstance(self._load_error, DoppelbotError):
            return self._load_error
        return TranscriberClosedError("the speech worker is shut down")

    def _drain(self, error: BaseException) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _Job):
                job.resolve(error=error)

    # --- the thread -------------------------------------------------------------------------
    def _load(self) -> Any:
        if self._loader is not None:
            return self._loader()
        from doppelbot.speech.model import load_whisper

        return load_whisper(self.spec)

    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        def report(error: BaseException | None) -> None:
            def _set() -> None:
                if not ready.done():
                    if error is None:
                        ready.set_result(None)
                    else:
                        ready.set_exception(error)

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_set)

        try:
            self.model = self._load()
        except BaseException as exc:
            if not isinstance(exc, DoppelbotError):
                log.debug("speech model load failed", exc_info=True)
                exc = SpeechModelError(f"cannot load the speech model: {exc}")
            self._load_error = exc
            self._closed = True
            report(exc)
            return
        report(None)
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            self._serve(job)

    def _serve(self, job: _Job) -> None:
        if job.dropped.is_set() or job.future.done():
            log.debug("skipping a note whose caller is gone")
            return

        def check() -> None:
            if job.dropped.is_set():
                raise _Cancelled

        from doppelbot.speech.engine import transcribe_audio

        try:
            result = transcribe_audio(
                self.model,
                job.audio,
                self.spec.voice,
                model_name=self.model_name,
                max_duration_s=job.max_duration_s,
                check=check,
            )
        except _Cancelled:
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

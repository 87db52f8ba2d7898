"""One thread owns a model; the event loop awaits its results.

The reply model (``doppelbot.model.worker``) and the speech model (``doppelbot.speech.worker``)
both run seconds of CPU kernels per request, which must not freeze the event loop, and neither
may wait behind the other: each gets a thread of its own, built on ``ThreadWorker``.

- the model loads once, *in* the thread (``load``); a load failure is raised to the caller of
  ``start`` (``load_failed`` turns a foreign exception into one of ours);
- requests go through a bounded queue (full → the subclass's ``busy_error`` at once);
- a caller that goes away sets its job's ``dropped``: the job is skipped if it has not
  started, and stopped at its next check if it has;
- one failing request never takes the thread down (``serve`` resolves it with an error);
- ``aclose`` lets the running job finish, fails the queued ones and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from doppelbot.core.errors import DoppelbotError

T = TypeVar("T")
J = TypeVar("J", bound="Job[Any]")

_STOP = object()


def _settle(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: object = None,
    error: BaseException | None = None,
) -> None:
    """Complete ``future`` (once) with ``result`` or ``error`` from another thread."""

    def _set() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    # A closed loop means nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_set)


class Cancelled(Exception):
    """The caller went away while its job ran (never reaches a caller)."""


@dataclass(eq=False)
class Job(Generic[T]):
    """One request: the caller awaits ``future`` on ``loop``; the thread resolves it."""

    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    dropped: threading.Event = field(default_factory=threading.Event, kw_only=True)

    def resolve(self, result: T | None = None, error: BaseException | None = None) -> None:
        """Complete the caller's future from the worker thread (once; never after a cancel)."""
        _settle(self.loop, self.future, result, error)

    def check(self) -> None:
        """Raise ``Cancelled`` once the caller has gone (call it between steps)."""
        if self.dropped.is_set():
            raise Cancelled


class ThreadWorker(Generic[J]):
    """The thread, the queue and the lifecycle; subclasses say what loading and serving are."""

    def __init__(self, *, queue_size: int, name: str) -> None:
        self.model: Any = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._name = name
        self._thread: threading.Thread | None = None
        self._ready: asyncio.Future[None] | None = None
        self._closed = False
        self.load_error: DoppelbotError | None = None

    # --- what a subclass provides ----------------------------------------------------------
    def load(self) -> Any:
        """Load the model (runs in the thread, once)."""
        raise NotImplementedError

    def load_failed(self, exc: BaseException) -> DoppelbotError:
        """The error ``start`` raises for a failed load."""
        raise NotImplementedError

    def serve(self, job: J) -> None:
        """Run one job and resolve it (runs in the thread; must not raise)."""
        raise NotImplementedError

    def closed_error(self) -> DoppelbotError:
        raise NotImplementedError

    def busy_error(self) -> DoppelbotError:
        raise NotImplementedError

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        """The model is loaded (or its load failed): ``start`` would not wait."""
        return self._ready is not None and self._ready.done()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        """Start the thread and wait until the model is loaded (re-raises a load error)."""
        if self._closed:
            raise self.closed_error()
        if self._thread is None:
            loop = asyncio.get_running_loop()
            self._ready = loop.create_future()
            self._thread = threading.Thread(
                target=self._run, args=(loop, self._ready), name=self._name, daemon=True
            )
            self._thread.start()
        assert self._ready is not None
        await asyncio.shield(self._ready)

    def put(self, job: J) -> None:
        """Queue ``job``; the busy error at once when the queue is full."""
        if self._closed:
            raise self.closed_error()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise self.busy_error() from None

    async def aclose(self) -> None:
        """Finish the running job, fail the queued ones, join the thread."""
        self._closed = True
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._drain(self.closed_error())
        # put() may wait for room: the thread is consuming, so it frees up quickly.
        await asyncio.to_thread(self._queue.put, _STOP)
        await asyncio.to_thread(thread.join)

    def _drain(self, error: BaseException) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, Job):
                job.resolve(error=error)

    # --- the thread ------------------------------------------------------------------------
    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        def report(error: BaseException | None) -> None:
            _settle(loop, ready, None, error)

        try:
            self.model = self.load()
        except BaseException as exc:  # the load's failure belongs to start()'s caller
            self.load_error = exc if isinstance(exc, DoppelbotError) else self.load_failed(exc)
            self._closed = True
            report(self.load_error)
            return
        report(None)
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if job.dropped.is_set() or job.future.done():
                continue  # the caller is gone: skipped
            self.serve(job)

"""The model worker: exactly one thread owns the reply model; the event loop talks to it.

Why a thread of its own: a generation is seconds of CPU work in torch kernels (which release
the GIL), so running it on the event loop would freeze every chat, and a second thread touching
the same model would only fight for the same cores. The worker therefore

- loads the model once, *in* its thread (``start()`` awaits that load and re-raises its error);
- takes requests from a bounded queue (full → ``WorkerClosedError`` at once, never an
  unbounded backlog) and serves them one at a time, in order;
- hands each result back through the caller's asyncio future (``call_soon_threadsafe``);
- skips a request whose caller was cancelled before it started, and stops one whose caller is
  cancelled while it runs (checked every decoding step);
- enforces a per-request deadline from the moment the generation starts: the decoding loop
  checks it every step and raises ``GenerationTimeoutError``, so the thread is freed at once;
- turns any exception of one request into a ``GenerationError`` for that caller and keeps
  serving the next;
- shuts down cleanly: ``aclose()`` lets the current request finish, fails the queued ones with
  ``WorkerClosedError`` and joins the thread.

It implements ``doppelbot.ports.ReplyGenerator``; tests inject a tiny ``ReplyModel`` (or any
object with the same ``generate``/``identity``) instead of a loader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from doppelbot.config import GenerationOptions, ModelSettings
from doppelbot.errors import (
    DoppelbotError,
    GenerationError,
    GenerationTimeoutError,
    ModelLoadError,
    WorkerClosedError,
)
from doppelbot.model.tokenizer import TokenCounter
from doppelbot.ports import ModelIdentity
from doppelbot.prompt import decode_reply

if TYPE_CHECKING:
    from doppelbot.config import Settings
    from doppelbot.model.loader import Progress, ReplyModel

log = logging.getLogger(__name__)

T = TypeVar("T")
Check = Callable[[], None]
Loader = Callable[[], "ReplyModel"]


class _Cancelled(Exception):
    """The caller went away while its request ran (never reaches a caller)."""


@dataclass(eq=False)
class _Job(Generic[T]):
    fn: Callable[[Any, Check], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    timeout_s: float | None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def resolve(self, result: T | None = None, error: BaseException | None = None) -> None:
        def _set() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)  # type: ignore[arg-type]

        # A closed loop means nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_set)


_STOP = object()


class ModelWorker:
    """One thread, one model, a bounded queue of requests. See the module docstring."""

    def __init__(
        self,
        model: ReplyModel | Loader,
        *,
        identity: ModelIdentity | None = None,
        settings: ModelSettings | None = None,
        default_options: GenerationOptions | None = None,
        name: str = "doppelbot-model",
    ) -> None:
        """``settings``: the queue size, the default time limit of a generation and the torch
        threads (the model section; its defaults when None)."""
        settings = settings or ModelSettings()
        if callable(model) and not hasattr(model, "generate"):
            self._loader: Loader | None = model  # type: ignore[assignment]
            self.model: ReplyModel | None = None
        else:
            self._loader = None
            self.model = model  # type: ignore[assignment]
        self._identity = identity
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=settings.worker_queue_size)
        self.timeout_s = settings.generation_timeout_s
        self.torch_threads = settings.torch_threads
        self.default_options = default_options or GenerationOptions()
        self._name = name
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ready: asyncio.Future[None] | None = None

    # --- ReplyGenerator --------------------------------------------------------------------
    @property
    def identity(self) -> ModelIdentity:
        if self.model is not None:
            return self.model.identity
        if self._identity is None:
            raise WorkerClosedError("the model worker has not loaded its model yet")
        return self._identity

    @property
    def tokenizer(self) -> Any:
        return None if self.model is None else getattr(self.model, "tokenizer", None)

    def token_counter(self) -> TokenCounter:
        """Counts prompt tokens with this worker's tokenizer, once the model is loaded (the
        running bot trims contexts to ``max_input_tokens`` with it, as the dataset does)."""
        return TokenCounter(source=lambda: self.tokenizer)

    async def generate(self, prompt: str, options: GenerationOptions | None = None) -> str:
        """The decoded reply; raises ``GenerationError`` (timeout, empty reply, model error)
        or ``WorkerClosedError`` (shut down, queue full)."""
        opts = options or self.default_options
        timeout = opts.timeout_s if opts.timeout_s is not None else self.timeout_s

        def work(model: Any, check: Check) -> str:
            return decode_reply(model.generate(prompt, opts, check))

        return await self.submit(work, timeout_s=timeout)

    async def submit(self, fn: Callable[[Any, Check], T], *, timeout_s: float | None = None) -> T:
        """Run ``fn(model, check)`` in the model thread; ``check()`` raises once the deadline
        passed or the caller was cancelled (call it in long loops)."""
        if self._closed:
            raise WorkerClosedError("the model worker is shut down")
        if self._thread is None:
            await self.start()
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(fn, loop.create_future(), loop, timeout_s)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise WorkerClosedError(
                f"the model worker is busy ({self._queue.maxsize} requests waiting)"
            ) from None
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled.set()  # skipped if not started yet, stopped at the next step if running
            raise

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the thread and wait until the model is loaded (re-raises a load error)."""
        if self._closed:
            raise WorkerClosedError("the model worker is shut down")
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
        """Finish the running request, fail the queued ones, join the thread."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        self._drain(WorkerClosedError("the model worker was shut down"))
        # put() may wait for room: the thread is consuming, so it frees up quickly.
        await asyncio.to_thread(self._queue.put, _STOP)
        await asyncio.to_thread(thread.join)

    async def __aenter__(self) -> ModelWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _drain(self, error: BaseException) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _Job):
                job.resolve(error=error)

    # --- the thread ------------------------------------------------------------------------
    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        def report(error: BaseException | None) -> None:
            def _set() -> None:
                if not ready.done():
                    if error is None:
                        ready.set_result(None)
                    else:
                        ready.set_exception(error)

            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_set)

        try:
            from doppelbot.model.loader import apply_torch_threads

            apply_torch_threads(self.torch_threads)
            if self.model is None:
                assert self._loader is not None
                self.model = self._loader()
        except BaseException as exc:  # the loader's failure belongs to start()'s caller
            if not isinstance(exc, DoppelbotError):
                log.debug("model load failed", exc_info=True)
                exc = ModelLoadError(f"cannot load the reply model: {exc}")
            self._closed = True
            report(exc)
            return
        report(None)
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            self._serve(job)

    def _serve(self, job: _Job[Any]) -> None:
        if job.cancelled.is_set() or job.future.cancelled():
            log.debug("skipping a request whose caller is gone")
            return
        deadline = None if job.timeout_s is None else time.monotonic() + job.timeout_s

        def check() -> None:
            if job.cancelled.is_set():
                raise _Cancelled
            if deadline is not None and time.monotonic() > deadline:
                raise GenerationTimeoutError(f"generation took longer than {job.timeout_s:g}s")

        try:
            result = job.fn(self.model, check)
        except _Cancelled:
            log.debug("stopped a request whose caller is gone")
        except GenerationError as exc:
            job.resolve(error=exc)
        except Exception as exc:  # one bad request must not take the worker down
            log.warning("generation failed: %s", type(exc).__name__, exc_info=log.isEnabledFor(10))
            error = GenerationError(f"generation failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            job.resolve(error=error)
        else:
            job.resolve(result)


def model_worker(
    settings: Settings,
    *,
    adapter: Path | str | None = "serving",
    progress: Progress | None = None,
) -> ModelWorker:
    """A worker that loads ``settings.model`` when started, with ``adapter`` — by default the
    serving one: ``DOPPELBOT_ADAPTER_PATH``, else the one chosen with ``doppelbot adapter use``
    (None: the base model alone)."""
    from doppelbot.model.loader import model_spec

    spec = model_spec(settings)

    def load() -> ReplyModel:
        from dataclasses import replace

        from doppelbot.model.loader import load_reply_model, serving_adapter

        # Runs in the worker thread, which has no event loop of its own: a short-lived one
        # reads the serving choice from the database.
        chosen = asyncio.run(serving_adapter(settings)) if adapter == "serving" else adapter
        target = replace(spec, adapter=None if chosen is None else Path(chosen))
        if progress is None:
            return load_reply_model(target)
        return load_reply_model(target, progress)

    return ModelWorker(
        load,
        identity=ModelIdentity(settings.model.base, None),
        settings=settings.model,
        default_options=settings.generation,
    )

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

It implements ``doppelbot.core.ports.ReplyGenerator``; tests inject a tiny ``ReplyModel`` (or any
object with the same ``generate``/``identity``) instead of a loader.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from doppelbot.config import GenerationOptions, ModelSettings, Settings
from doppelbot.core.errors import (
    DoppelbotError,
    GenerationError,
    GenerationTimeoutError,
    ModelLoadError,
    WorkerClosedError,
)
from doppelbot.core.ports import ModelIdentity
from doppelbot.core.prompt import decode_reply
from doppelbot.model.tokenizer import TokenCounter
from doppelbot.workers import Cancelled, Job, ThreadWorker

if TYPE_CHECKING:
    from doppelbot.model.loader import Progress, ReplyModel

log = logging.getLogger(__name__)

T = TypeVar("T")
Check = Callable[[], None]
Loader = Callable[[], "ReplyModel"]


@dataclass(eq=False)
class _Request(Job[T]):
    fn: Callable[[Any, Check], T]
    timeout_s: float | None


class ModelWorker(ThreadWorker["_Request[Any]"]):
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
        super().__init__(queue_size=settings.worker_queue_size, name=name)
        if callable(model) and not hasattr(model, "generate"):
            self._loader: Loader | None = model  # type: ignore[assignment]
        else:
            self._loader = None
            self.model = model
        self._identity = identity
        self.timeout_s = settings.generation_timeout_s
        self.torch_threads = settings.torch_threads
        self.default_options = default_options or GenerationOptions()

    # --- ReplyGenerator --------------------------------------------------------------------
    @property
    def identity(self) -> ModelIdentity:
        if self.model is not None:
            return self.model.identity  # type: ignore[no-any-return]
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
            raise self.closed_error()
        if self._thread is None:
            await self.start()
        loop = asyncio.get_running_loop()
        job: _Request[T] = _Request(loop.create_future(), loop, fn=fn, timeout_s=timeout_s)
        self.put(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.dropped.set()  # skipped if not started yet, stopped at the next step if running
            raise

    async def __aenter__(self) -> ModelWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- ThreadWorker ----------------------------------------------------------------------
    def closed_error(self) -> DoppelbotError:
        return WorkerClosedError("the model worker is shut down")

    def busy_error(self) -> DoppelbotError:
        return WorkerClosedError(
            f"the model worker is busy ({self._queue.maxsize} requests waiting)"
        )

    def load(self) -> Any:
        from doppelbot.model.loader import apply_torch_threads

        apply_torch_threads(self.torch_threads)
        if self.model is None:
            assert self._loader is not None
            return self._loader()
        return self.model

    def load_failed(self, exc: BaseException) -> DoppelbotError:
        log.debug("model load failed", exc_info=True)
        return ModelLoadError(f"cannot load the reply model: {exc}")

    def serve(self, job: _Request[Any]) -> None:
        deadline = None if job.timeout_s is None else time.monotonic() + job.timeout_s

        def check() -> None:
            job.check()
            if deadline is not None and time.monotonic() > deadline:
                raise GenerationTimeoutError(f"generation took longer than {job.timeout_s:g}s")

        try:
            result = job.fn(self.model, check)
        except Cancelled:
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

"""The model worker: one thread, in-order service, timeouts, errors, cancellation, shutdown,
and an event loop that keeps running while the model works."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from doppelbot.config import GenerationOptions, ModelSettings, load_settings
from doppelbot.core.domain import Role, Turn
from doppelbot.core.errors import (
    EmptyReplyError,
    GenerationError,
    GenerationTimeoutError,
    ModelLoadError,
    WorkerClosedError,
)
from doppelbot.core.ports import ModelIdentity, ReplyGenerator
from doppelbot.model.worker import ModelWorker, model_worker
from tests.tiny_model import make_tiny_model_dir

OPTS = GenerationOptions(max_new_tokens=8)


class FakeModel:
    """Stands in for ``ReplyModel``: records calls and the thread they ran on, and can block,
    spin until its deadline, or fail — all on command of the prompt text."""

    identity = ModelIdentity("fake", "v1")
    tokenizer = None

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()

    def generate(self, prompt: str, options: GenerationOptions, check: Callable[[], None]) -> str:
        self.calls.append(prompt)
        self.threads.add(threading.current_thread().name)
        self.running.set()
        if prompt == "block":
            while not self.gate.wait(0.005):
                check()
        if prompt == "spin":
            while True:
                check()
                time.sleep(0.005)
        if prompt == "boom":
            raise RuntimeError("kaboom")
        if prompt == "empty":
            return "<extra_id_0></s>"
        return f"<extra_id_0>ответ на {prompt}</s>"


async def test_served_one_at_a_time_in_order() -> None:
    model = FakeModel()
    async with ModelWorker(model) as worker:
        generator: ReplyGenerator = worker  # the port the responder is written against
        assert generator.identity == ModelIdentity("fake", "v1")
        replies = await asyncio.gather(*(worker.generate(f"p{i}", OPTS) for i in range(6)))
    assert replies == [f"ответ на p{i}" for i in range(6)]
    assert model.calls == [f"p{i}" for i in range(6)]
    assert model.threads == {"doppelbot-model"}


async def test_timeout_and_errors_do_not_kill_the_worker() -> None:
    model = FakeModel()
    async with ModelWorker(model, settings=ModelSettings(generation_timeout_s=0.05)) as worker:
        started = time.monotonic()
        with pytest.raises(GenerationTimeoutError):
            await worker.generate("spin", OPTS)
        assert time.monotonic() - started < 2  # the deadline freed the thread
        with pytest.raises(GenerationError, match="kaboom"):
            await worker.generate("boom", OPTS)
        with pytest.raises(EmptyReplyError):
            await worker.generate("empty", OPTS)
        long = GenerationOptions(timeout_s=5.0)
        assert await worker.generate("fine", long) == "ответ на fine"
        assert worker.alive


async def test_a_cancelled_request_is_skipped() -> None:
    model = FakeModel()
    model.gate.clear()
    async with ModelWorker(model) as worker:
        first = asyncio.create_task(worker.generate("block", OPTS))
        await asyncio.to_thread(model.running.wait, 5)
        second = asyncio.create_task(worker.generate("never", OPTS))
        await asyncio.sleep(0.02)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        model.gate.set()
        assert await first == "ответ на block"
        assert await worker.generate("after", OPTS) == "ответ на after"
    assert model.calls == ["block", "after"]


async def test_cancelling_a_running_request_stops_it() -> None:
    model = FakeModel()
    model.gate.clear()
    async with ModelWorker(model) as worker:
        task = asyncio.create_task(worker.generate("block", OPTS))
        await asyncio.to_thread(model.running.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # check() saw the cancellation and freed the thread although the gate never opened
        assert await asyncio.wait_for(worker.generate("next", OPTS), 5) == "ответ на next"


async def test_shutdown_fails_queued_requests_and_joins_the_thread() -> None:
    model = FakeModel()
    model.gate.clear()
    worker = ModelWorker(model)
    await worker.start()
    thread = worker._thread
    running = asyncio.create_task(worker.generate("block", OPTS))
    await asyncio.to_thread(model.running.wait, 5)
    queued = asyncio.create_task(worker.generate("queued", OPTS))
    await asyncio.sleep(0.02)
    closing = asyncio.create_task(worker.aclose())
    await asyncio.sleep(0.02)
    model.gate.set()
    await closing
    assert await running == "ответ на block"  # the running request finishes
    with pytest.raises(WorkerClosedError):
        await queued
    assert thread is not None and not thread.is_alive()
    with pytest.raises(WorkerClosedError):
        await worker.generate("late", OPTS)
    await worker.aclose()  # idempotent


async def test_a_full_queue_refuses_at_once() -> None:
    model = FakeModel()
    model.gate.clear()
    async with ModelWorker(model, settings=ModelSettings(worker_queue_size=1)) as worker:
        running = asyncio.create_task(worker.generate("block", OPTS))
        await asyncio.to_thread(model.running.wait, 5)
        waiting = asyncio.create_task(worker.generate("waiting", OPTS))
        await asyncio.sleep(0.02)
        with pytest.raises(WorkerClosedError, match="busy"):
            await worker.generate("refused", OPTS)
        model.gate.set()
        assert await running and await waiting


async def test_the_loader_runs_once_in_the_worker_thread() -> None:
    seen: list[str] = []

    def load() -> FakeModel:
        seen.append(threading.current_thread().name)
        return FakeModel()

    async with ModelWorker(load, identity=ModelIdentity("fake")) as worker:
        await worker.generate("a", OPTS)
        await worker.generate("b", OPTS)
    assert seen == ["doppelbot-model"]


async def test_a_load_failure_reaches_start() -> None:
    def load() -> FakeModel:
        raise OSError("disk on fire")

    worker = ModelWorker(load)
    with pytest.raises(ModelLoadError, match="disk on fire"):
        await worker.start()
    with pytest.raises(WorkerClosedError):
        await worker.generate("a", OPTS)
    await worker.aclose()


# --- the real thing: a tiny FRED-T5-shaped model loaded from settings ----------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=11)


async def test_configured_worker_generates_and_keeps_the_loop_responsive(
    model_dir: Path, tmp_path: Path
) -> None:
    settings = load_settings(
        env_file=None,
        data_dir=tmp_path,
        model=str(model_dir),
        device="cpu",
        precision="int8",
        torch_threads=1,
        max_new_tokens=60,
    )
    prompt = settings.prompt.format.build_input([Turn(Role.OTHER, "привет! как дела?")])
    worker = model_worker(settings)
    async with worker:
        assert worker.identity == ModelIdentity(str(model_dir), None)
        assert worker.tokenizer is not None
        assert worker.model is not None and worker.model.info["from_cache"] is False
        options = GenerationOptions(max_new_tokens=60, min_new_tokens=60, do_sample=False)
        lags: list[float] = []

        async def heartbeat() -> None:
            while True:
                before = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - before - 0.005)

        beat = asyncio.create_task(heartbeat())
        reply = ""
        for _ in range(3):
            reply = await worker.generate(prompt, options)
        beat.cancel()
        assert isinstance(reply, str) and reply.strip() and "<" not in reply
        assert len(lags) >= 10  # the loop kept ticking during the generations
        assert max(lags) < 0.25
    # a second start reads the quantised model from settings.store.cache_dir
    async with model_worker(settings) as again:
        assert again.model is not None and again.model.info["from_cache"] is True
        assert str(settings.store.cache_dir) in again.model.info["cache"]

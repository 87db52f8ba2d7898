"""The core's view of its adapters: small Protocols the model, knowledge and Telegram
adapters implement, so the core (responder, review, dataset) is tested with plain fakes and
never imports torch or telethon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from doppelbot.config import GenerationOptions


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """Which weights produced a reply (stored with every reply)."""

    model_id: str
    adapter_id: str | None = None


class ReplyGenerator(Protocol):
    """The model worker as the event loop sees it."""

    @property
    def identity(self) -> ModelIdentity: ...

    async def generate(self, prompt: str, options: GenerationOptions) -> str:
        """The decoded reply text; raises ``GenerationError`` (never returns junk or '')."""
        ...


@dataclass(frozen=True, slots=True)
class ScoredFact:
    fact_id: int
    text: str
    score: float


class FactRetriever(Protocol):
    async def retrieve(
        self, query: str, *, top_k: int | None = None, threshold: float | None = None
    ) -> list[ScoredFact]: ...

    async def similarity(self, query: str, candidates: Sequence[str]) -> list[float]:
        """Cosine similarity of ``query`` to each candidate (for the fact-fallback rule)."""
        ...


@dataclass(frozen=True, slots=True)
class Transcript:
    """What a voice or round-video note said, as the speech model heard it."""

    text: str  # may be empty: nothing intelligible was said
    language: str | None  # the language spoken (given or detected), e.g. "ru"
    duration_s: float  # the audio's length
    model: str  # which speech model produced it (stored with the transcript)
    seconds: float = 0.0  # processing time (decode + transcription)
    language_probability: float | None = None  # None when the language was given


class Transcriber(Protocol):
    """The speech worker as the event loop sees it (``doppelbot.speech.TranscriptionWorker``)."""

    @property
    def model_name(self) -> str: ...

    async def transcribe(
        self, audio: bytes | Path, *, max_duration_s: float | None = None
    ) -> Transcript:
        """The transcript of an OGG/Opus voice note or an MP4 round video (bytes or a file).

        Raises ``AudioTooLongError`` (longer than ``max_duration_s``; nothing is decoded past
        the limit), ``AudioDecodeError``, ``TranscriptionTimeoutError`` (the caller waited its
        timeout; the worker drops the job), other ``TranscriptionError``s, or
        ``TranscriberClosedError`` (shut down, queue full). Never blocks the event loop."""
        ...

"""The ``DoppelbotError`` family.

Every failure the user can act on is raised as one of these; the CLI turns them into one clear
line and a non-zero exit (a traceback only with ``--debug``). Adapters translate library errors
(Telethon, torch, sqlite) into these so the core never sees a foreign exception type.
"""

from __future__ import annotations


class DoppelbotError(Exception):
    """Base class. ``str(err)`` is the one line the CLI prints, after ``prefix``."""

    exit_code: int = 1
    prefix: str = "error"  # what the CLI's line starts with; not every stop is an error


def describe(exc: BaseException) -> str:
    """An error for logs and stored error columns: type and our own message only — foreign
    exception texts may quote user content (a message, a draft)."""
    if isinstance(exc, DoppelbotError):
        return f"{type(exc).__name__}: {exc}"[:300]
    return type(exc).__name__


class ConfigError(DoppelbotError):
    """A setting is missing or has a bad value."""

    exit_code = 2


class StoreError(DoppelbotError):
    """The SQLite store cannot be opened or used."""


class MigrationError(StoreError):
    """A schema migration failed; the database stays at its previous level."""


class TelegramError(DoppelbotError):
    """Telegram refused or failed a request."""


class AccountError(DoppelbotError):
    """An own account that is not known, or a Telegram user that is already another one."""


class InstanceLockedError(DoppelbotError):
    """Another doppelbot process holds this data directory's Telegram session."""


class TelegramOutageError(TelegramError):
    """Telegram stayed unreachable (or silent) longer than the watchdog allows; the process
    exits non-zero so a supervisor restarts it."""

    exit_code = 3


class NotLoggedInError(TelegramError):
    """No authorised session exists; the user must run ``doppelbot login``."""


class FloodWaitTooLongError(TelegramError):
    """Telegram asked us to wait longer than the configured bound."""

    def __init__(
        self, seconds: int, bound: int, what: str = "request", *, total: int | None = None
    ) -> None:
        if total is None:
            text = (
                f"Telegram asked to wait {seconds}s before the next {what}, "
                f"more than the configured bound of {bound}s"
            )
        else:  # the run's total budget, not one wait, is what ran out
            text = (
                f"Telegram asked to wait {seconds}s before the next {what}, but only {bound}s "
                f"are left of the {total}s of waiting allowed per run "
                "(DOPPELBOT_FLOOD_WAIT_TOTAL_S)"
            )
        super().__init__(text)
        self.seconds = seconds
        self.bound = bound


class ExportIncompleteError(TelegramError):
    """Some chats of an export failed or stopped; everything fetched is kept, and running the
    export again continues where they stopped."""


class TakeoutDelayError(TelegramError):
    """Telegram requires the takeout to be confirmed in an official app first."""


class ImportFormatError(DoppelbotError):
    """An import file is malformed; the message names the position."""


class DatasetError(DoppelbotError):
    """The dataset cannot be built (no history, bad options)."""


class ModelError(DoppelbotError):
    """The reply model cannot be loaded or used."""


class ModelLoadError(ModelError):
    """The base model, adapter or quantised cache cannot be loaded."""


class ModelMissingError(ModelLoadError):
    """A configured model's files are not on this machine (``doppelbot model download``)."""


class ModelDownloadError(ModelError):
    """``doppelbot model download`` failed (network, hub, disk, a file that does not verify)."""


class InsufficientMemoryError(ModelLoadError):
    """Loading the model would need more memory than the machine has free (checked before
    loading, instead of being killed by the OOM killer halfway)."""


class GenerationError(ModelError):
    """One generation failed; the worker keeps serving."""


class PromptTooLongError(GenerationError):
    """The newest message alone does not fit in the model's input budget."""


class EmptyReplyError(GenerationError):
    """The model produced nothing usable (empty after decoding)."""


class GenerationTimeoutError(GenerationError):
    """A generation exceeded its per-request timeout."""


class WorkerClosedError(ModelError):
    """The model worker was shut down or its queue is full."""


class KnowledgeError(DoppelbotError):
    """The knowledge base (facts, embeddings) failed."""


class TrainingError(DoppelbotError):
    """Fine-tuning or evaluation failed."""


class PreflightError(TrainingError):
    """The chosen model / precision / batch would not fit in memory."""


class FloodWaitError(TelegramError):
    """Telegram asked to wait ``seconds`` before the next request of this kind (the caller
    decides whether to wait it out or give up)."""

    def __init__(self, seconds: int, what: str = "request") -> None:
        super().__init__(f"Telegram asked to wait {seconds}s before the next {what}")
        self.seconds = seconds


class AdapterRejectedError(TrainingError):
    """``adapter use`` refused an adapter whose held-out loss is worse than the served one."""


class TrainingInterruptedError(TrainingError):
    """A training run stopped before its last step; it resumes from its latest checkpoint.

    Usually the owner asked for it (Ctrl-C), so the CLI says "stopped", not "error"."""

    exit_code = 130
    prefix = "stopped"


class SpeechError(DoppelbotError):
    """Voice-note transcription (the speech model, audio decoding) failed."""


class SpeechModelError(SpeechError):
    """The speech-to-text model cannot be loaded."""


class TranscriptionError(SpeechError):
    """One transcription failed; the transcriber keeps serving."""


class TranscriptionTimeoutError(TranscriptionError):
    """A transcription took longer than its timeout (the caller goes on without it)."""


class AudioDecodeError(TranscriptionError):
    """The note's audio cannot be decoded (corrupt file, no audio track)."""


class AudioTooLongError(TranscriptionError):
    """The note is longer than the configured maximum and is not transcribed."""

    def __init__(self, duration_s: float, limit_s: float) -> None:
        super().__init__(
            f"the note is {duration_s:.0f}s long, more than the {limit_s:g}s limit "
            "(DOPPELBOT_VOICE_MAX_DURATION_S); not transcribed"
        )
        self.duration_s = duration_s
        self.limit_s = limit_s


class TranscriberClosedError(SpeechError):
    """The transcription worker was shut down or its queue is full."""


class NoteUnavailableError(SpeechError):
    """A note's audio cannot be had (its file is gone, Telegram no longer serves it)."""


class NoteTooLargeError(SpeechError):
    """A note's file is larger than the size limit (found while fetching it)."""

    def __init__(self, size_bytes: int, limit_bytes: int) -> None:
        mb = 1024 * 1024
        super().__init__(
            f"the note's file is {size_bytes / mb:.1f} MB, more than the "
            f"{limit_bytes / mb:g} MB limit (DOPPELBOT_VOICE_MAX_FILE_MB)"
        )
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes

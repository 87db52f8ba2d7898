"""The one ``Settings`` object, in sections.

Built once in the CLI entry point (``doppelbot.cli``) and passed down; nothing else reads the
environment. ``Settings`` holds one frozen section per concern (``settings.model``,
``settings.voice``, ``settings.responder``, …) and each section *is* the options object of the
code it configures: the responder's policy reads ``settings.responder``, the speech worker
``settings.voice``, the dataset builder a ``DatasetOptions`` that extends
``settings.dataset``. A section field's default, range and description are written once, here.

The environment stays flat: every setting is ``DOPPELBOT_<NAME>`` (as it always was) and may
be set in a ``.env`` file; real environment variables win over ``.env``. A field's name is its
environment name unless the section says otherwise (``env_prefix``, or ``env`` in the field's
``json_schema_extra``): ``DOPPELBOT_VOICE_MODEL`` is ``settings.voice.model``,
``DOPPELBOT_MAX_INPUT_TOKENS`` is ``settings.model.max_input_tokens``. ``setting_fields()``
is that table; ``load_settings`` reads the environment through a flat model generated from it
and ``.env.example`` is rendered from it (``tests/test_config.py`` checks the two never drift
apart).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import re
from collections.abc import Iterator, Mapping
from datetime import time, tzinfo
from functools import cache, cached_property
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import platformdirs
from dotenv import dotenv_values
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from doppelbot.core.errors import ConfigError
from doppelbot.core.prompt import PromptFormat

ENV_PREFIX = "DOPPELBOT_"

T = TypeVar("T")

DEFAULT_PERSONA = (
    "Ты — это я, владелец аккаунта. Отвечай коротко и естественно, как я обычно пишу в переписке."
)

# CTranslate2's compute types that make sense for Whisper (a plain str setting: a Literal of
# names containing "float" would read as a float setting to code that inspects annotations)
VOICE_COMPUTE_TYPES = (
    "auto",
    "int8",
    "int8_float16",
    "int8_float32",
    "float16",
    "bfloat16",
    "float32",
)

_MB = 1024 * 1024
HOUR_S = 3600


# --- value parsing ------------------------------------------------------------------------------
def _split_csv(value: object) -> object:
    """Lists come from the environment as ``a,b,c`` (JSON arrays are accepted too)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("doppelbot", appauthor=False))


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])", re.IGNORECASE)
_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: object) -> object:
    """``"6h"``, ``"90m"``, ``"1h30m"``, ``"45s"``, ``"2d"`` → seconds; a bare number is
    seconds; ``0`` is zero."""
    if not isinstance(value, str):
        return value
    text = value.strip().replace(" ", "")
    if not text:
        raise ValueError("expected a duration such as 6h, 90m, 45s or 0")
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts).lower() != text.lower():
        raise ValueError(f"not a duration: {value!r} (use e.g. 6h, 90m, 1h30m, 45s or 0)")
    return sum(float(n) * _DURATION_UNITS[u.lower()] for n, u in parts)


_QUIET_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def parse_quiet_hours(value: str) -> tuple[time, time] | None:
    """``"23:00-08:00"`` → (23:00, 08:00); empty → None. Wraps past midnight."""
    if not value.strip():
        return None
    match = _QUIET_RE.match(value)
    if not match:
        raise ValueError("expected HH:MM-HH:MM, e.g. 23:00-08:00")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    try:
        return time(h1, m1), time(h2, m2)
    except ValueError as exc:
        raise ValueError(f"not a valid time range: {exc}") from None


def _quiet_hours(value: str) -> str:
    parse_quiet_hours(value)
    return value.strip()


def _time_zone(value: str) -> str:
    if value.strip():
        try:
            ZoneInfo(value.strip())
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
    return value.strip()


def _voice_compute_type(value: str) -> str:
    kind = value.strip().lower()
    if kind not in VOICE_COMPUTE_TYPES:
        raise ValueError(f"expected one of {', '.join(VOICE_COMPUTE_TYPES)}")
    return kind


def _language(value: str) -> str:
    code = value.strip().lower()
    if code in ("", "auto"):
        return "auto"
    if not re.fullmatch(r"[a-z]{2,3}", code):
        raise ValueError("expected a language code such as ru or en, or auto")
    return code


def _parse_chat_list(entries: tuple[str, ...]) -> tuple[frozenset[int], frozenset[str]]:
    """Chat ids and @usernames (lower case, without the @) of an allow/deny list."""
    ids: set[int] = set()
    names: set[str] = set()
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        try:
            ids.add(int(entry))
        except ValueError:
            names.add(entry.lstrip("@").lower())
    return frozenset(ids), frozenset(names)


#: Field types that parse environment text and check their value; each is declared once and
#: used wherever the value appears (a section and an options object that extends it).
CommaList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_csv)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
QuietHours = Annotated[str, AfterValidator(_quiet_hours)]
TimeZoneName = Annotated[str, AfterValidator(_time_zone)]
VoiceComputeType = Annotated[str, AfterValidator(_voice_compute_type)]
LanguageCode = Annotated[str, AfterValidator(_language)]
UserPath = Annotated[Path, AfterValidator(lambda path: path.expanduser())]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "int8", "bf16", "fp32"]
#: Tokens of one generated reply.
NewTokens = Annotated[int, Field(ge=1, le=1024)]
#: Tokens of one model input (the model's budget; the dataset's and training's too).
InputBudget = Annotated[int, Field(ge=16)]

#: How sections validate: frozen values, no unknown field, no inf/nan (they pass every bound
#: check, ``inf >= 0``, and then break timers and sampling).
SECTION_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)


def env(name: str | None) -> dict[str, Any]:
    """``json_schema_extra`` of a section field: its environment name (without the prefix)
    when that is not the field's own name; ``env(None)``: not a setting (a per-request or
    per-run value that lives in the same object)."""
    return {"env": name}


def extend(kind: type[T], section: Any, **values: Any) -> T:
    """An options object of class ``kind``, which extends ``section``'s class, holding
    ``section``'s values and ``values`` (which win; validated: a bad one is one ``ConfigError``
    line naming the field)."""
    fields = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    try:
        return kind(**{**fields, **values})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or kind.__name__
        raise ConfigError(f"{where}: {_message(first)}") from None


def default_of(section: type, name: str) -> Any:
    """A section field's default, for code that must name it outside the section."""
    info: FieldInfo = section.__pydantic_fields__[name]  # type: ignore[attr-defined]
    return info.get_default(call_default_factory=True)


# --- sections -----------------------------------------------------------------------------------
@dataclass(frozen=True, config=SECTION_CONFIG)
class TelegramSettings:
    """The Telegram account and its session."""

    TITLE: ClassVar[str] = "Telegram"

    api_id: int | None = Field(default=None, description="Telegram API id from my.telegram.org.")
    api_hash: SecretStr | None = Field(
        default=None, description="Telegram API hash from my.telegram.org."
    )
    phone: str | None = Field(
        default=None, description="Phone number for login, international format."
    )
    session_string: SecretStr | None = Field(
        default=None,
        description="Telethon StringSession (for containers); when set, no session file is used.",
    )
    session_name: str = Field(
        default="doppelbot",
        description="Session file name (without .session) under the data directory.",
    )


@dataclass(frozen=True, config=SECTION_CONFIG)
class StoreSettings:
    """Where everything is kept on disk; the paths under the data directory."""

    TITLE: ClassVar[str] = "Storage"

    data_dir: UserPath = Field(
        default_factory=default_data_dir,
        description="Where the database, session, datasets, adapters and caches live.",
    )

    @property
    def db_path(self) -> Path:
        return self.data_dir / "doppelbot.sqlite3"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def voice_cache_dir(self) -> Path:
        """Where hub speech models are downloaded to (kept with the other caches)."""
        return self.cache_dir / "speech"


@dataclass(frozen=True, config=SECTION_CONFIG)
class LogSettings:
    """Logging."""

    TITLE: ClassVar[str] = "Logging"
    env_prefix: ClassVar[str] = "LOG_"

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level. Message texts are only ever logged at DEBUG."
    )
    message_texts: bool = Field(
        default=False,
        description="Allow message texts in DEBUG logs (private data: off by default).",
    )


@dataclass(frozen=True, config=SECTION_CONFIG)
class ModelSettings:
    """The reply model: which one, where it runs, its worker and its input budget."""

    TITLE: ClassVar[str] = "Reply model"

    base: str = Field(
        default="ai-forever/FRED-T5-1.7B",
        description="Base model: Hugging Face hub id or local path.",
        json_schema_extra=env("MODEL"),
    )
    adapter_path: Path | None = Field(
        default=None,
        description="LoRA adapter folder; empty = the adapter chosen by `doppelbot adapter use`.",
    )
    device: Device = Field(default="auto", description="Where the model runs.")
    precision: Precision = Field(
        default="auto",
        description="Weights precision for serving; auto = int8 on the CPU, on CUDA bf16 when it "
        "fits in free GPU memory (else int8).",
    )
    memory_check: bool = Field(
        default=True,
        description="Refuse to load the reply model when the estimated peak exceeds the free "
        "memory (RAM + swap, or GPU), instead of risking the OOM killer.",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for the model; empty = all cores."
    )
    generation_timeout_s: float = Field(
        default=120.0, gt=0, description="A generation running longer than this fails."
    )
    worker_queue_size: int = Field(
        default=32, ge=1, description="Pending generations the worker accepts before refusing."
    )
    max_input_tokens: InputBudget = Field(
        default=712, description="Model input budget; the oldest context is trimmed first."
    )


@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class GenerationOptions:
    """Decoding knobs: ``settings.generation`` holds the configured ones; a caller passes its
    own (``dataclasses.replace`` of those, or these defaults in tools and tests)."""

    TITLE: ClassVar[str] = "Generation"

    max_new_tokens: NewTokens = Field(default=50, description="Longest reply, in tokens.")
    min_new_tokens: int = Field(
        default=0, ge=0, description="Shortest reply, in tokens.", json_schema_extra=env(None)
    )
    do_sample: bool = Field(
        default=True, description="Sample (True) or decode greedily/beam (False)."
    )
    temperature: float = Field(default=0.8, gt=0, le=5, description="Sampling temperature.")
    top_p: float = Field(default=0.85, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(default=50, ge=0, description="Top-k sampling cut-off (0 = off).")
    num_beams: int = Field(default=1, ge=1, le=16, description="Beam search width.")
    no_repeat_ngram_size: int = Field(
        default=0, ge=0, description="Forbid repeating n-grams (0 = off)."
    )
    repetition_penalty: float = Field(
        default=1.0, gt=0, description="Repetition penalty (1.0 = off)."
    )
    seed: int | None = Field(
        default=None,
        description="Fixed sampling seed; empty = random.",
        json_schema_extra=env("GENERATION_SEED"),
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="This request's time limit; None = the worker's "
        "(DOPPELBOT_GENERATION_TIMEOUT_S).",
        json_schema_extra=env(None),
    )


@dataclass(frozen=True, config=SECTION_CONFIG)
class PromptSettings:
    """What every model input starts with and how turns are labelled; ``format`` is the one
    ``PromptFormat`` built from them."""

    TITLE: ClassVar[str] = "Prompt"

    persona: str = Field(
        default=DEFAULT_PERSONA, description="Persona text at the start of every prompt."
    )
    role_other: str = Field(default="Собеседник", description="Label of the other person's turns.")
    role_owner: str = Field(default="Я", description="Label of the owner's turns.")

    @cached_property
    def format(self) -> PromptFormat:
        return PromptFormat(self.persona, self.role_other, self.role_owner)


@dataclass(frozen=True, config=SECTION_CONFIG)
class KnowledgeSettings:
    """Facts about the owner: the embedder and how facts join a prompt."""

    TITLE: ClassVar[str] = "Knowledge base"

    embedder_model: str = Field(
        default="sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2",
        description="sentence-transformers model (hub id or local path) for fact retrieval.",
    )
    facts_top_k: int = Field(default=3, ge=0, description="Facts added to a prompt at most.")
    facts_threshold: float = Field(
        default=0.35, ge=-1, le=1, description="Minimum cosine similarity for a fact to be used."
    )
    fact_fallback: bool = Field(
        default=False, description="Answer with the best fact when it beats the generated reply."
    )
    fact_fallback_margin: float = Field(
        default=0.1, ge=0, le=2, description="How much more relevant the reply must be to be kept."
    )
    embedder_threads: int | None = Field(
        default=1,
        ge=1,
        description="CPU threads of the embedder's worker (1 is fastest for short queries); "
        "empty = torch's default.",
    )


@dataclass(frozen=True, config=SECTION_CONFIG)
class VoiceSettings:
    """Voice and round-video notes: the speech model, how it decodes, and the limits of one
    note and of one history run."""

    TITLE: ClassVar[str] = "Voice notes"
    env_prefix: ClassVar[str] = "VOICE_"

    transcription: bool = Field(
        default=True,
        description="Transcribe voice and round-video notes locally (faster-whisper); off = "
        "they stay media-only messages.",
    )
    model: str = Field(
        default="small",
        description="Speech model: a faster-whisper size (tiny, base, small, medium, …), a "
        "CTranslate2 Whisper model id on the Hugging Face hub, or a local folder.",
    )
    language: LanguageCode = Field(
        default="ru",
        description="Language spoken in notes (a code such as ru or en); auto = detect per "
        "note (one extra encoder pass; unreliable on short notes).",
    )
    device: Device = Field(
        default="auto", description="Where the speech model runs (auto: CUDA when available)."
    )
    compute_type: VoiceComputeType = Field(
        default="auto",
        description="Speech model precision: auto (int8 on CPU, float16 on CUDA), int8, "
        "int8_float16, int8_float32, float16, bfloat16 or float32.",
    )
    threads: int | None = Field(
        default=None, ge=1, description="CPU threads for transcription; empty = all cores."
    )
    beam_size: int = Field(
        default=1,
        ge=1,
        le=10,
        description="Beam width for transcription (1 = greedy: fastest on CPU).",
    )
    temperature_fallback: bool = Field(
        default=True,
        description="Decode a window again at higher temperatures when the text looks like a "
        "loop (Whisper's fallback; slower on bad audio).",
    )
    vad_filter: bool = Field(
        default=True,
        description="Skip silence before transcribing (Silero VAD): faster, and no invented "
        "text on silent notes.",
    )
    max_duration_s: float = Field(
        default=300.0, gt=0, description="Longer notes are not transcribed (marked too long)."
    )
    max_file_mb: float = Field(
        default=50.0, gt=0, description="Larger note files are not downloaded (marked too long)."
    )
    timeout_s: float = Field(
        default=120.0, gt=0, description="A transcription waited on longer than this fails."
    )
    queue_size: int = Field(
        default=8, ge=1, description="Pending transcriptions the worker accepts before refusing."
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Tries per note before a failed transcription is left alone."
    )
    history_max_hours: float = Field(
        default=10.0,
        ge=0,
        description="Most audio one `export --voice` or `transcribe` run transcribes (0 = no "
        "limit); the rest waits for the next run.",
    )
    history_max_download_mb: float = Field(
        default=2000.0,
        ge=0,
        description="Most note data one `export --voice` run downloads (0 = no limit).",
    )

    @property
    def decode_language(self) -> str | None:
        """The language Whisper is told (None: detect it)."""
        return None if self.language == "auto" else self.language

    @property
    def max_bytes(self) -> int:
        return int(self.max_file_mb * _MB)

    @property
    def budget_s(self) -> float | None:
        """Audio one history run transcribes at most (None: no limit)."""
        return self.history_max_hours * HOUR_S if self.history_max_hours > 0 else None

    @property
    def budget_bytes(self) -> int | None:
        """Note data one history run downloads at most (None: no limit)."""
        mb = self.history_max_download_mb
        return int(mb * _MB) if mb > 0 else None


@dataclass(frozen=True, config=SECTION_CONFIG)
class DatasetSettings:
    """The dataset builder's rules (``doppelbot.dataset.options.DatasetOptions`` extends them
    with the prompt, the input budget and one run's flags)."""

    TITLE: ClassVar[str] = "Dataset"

    session_gap_hours: float = Field(
        default=3.0, gt=0, description="A longer silence ends a dialogue."
    )
    max_message_chars: int = Field(
        default=200, ge=1, description="Longer messages are dropped/truncated."
    )
    long_message_policy: Literal["drop", "truncate"] = Field(
        default="drop", description="What to do with messages longer than max_message_chars."
    )
    context_max_chars: int = Field(
        default=500, ge=1, description="Context keeps turns that fit in this."
    )
    min_letter_share: float = Field(
        default=0.5, ge=0, le=1, description="Messages with a smaller share of letters are dropped."
    )
    scrub_pii: bool = Field(default=True, description="Replace phones, emails, cards and URLs.")
    keep_names: bool = Field(default=True, description="Keep people's names when scrubbing PII.")
    max_contact_share: float = Field(
        default=0.25, gt=0, le=1, description="Largest share of samples one contact may contribute."
    )
    validation_share: float = Field(
        default=0.1, ge=0, lt=1, description="The most recent share of samples used for validation."
    )
    voice_transcripts: bool = Field(
        default=True,
        description="Use voice-note transcripts as message text in the dataset.",
        json_schema_extra=env("DATASET_VOICE"),
    )

    @property
    def session_gap_s(self) -> int:
        """A silence longer than this (between any two messages of a chat) ends a dialogue."""
        return round(self.session_gap_hours * HOUR_S)


@dataclass(frozen=True, config=SECTION_CONFIG)
class ExportSettings:
    """Exporting the history (``doppelbot export``), and how long any FloodWait is waited out."""

    TITLE: ClassVar[str] = "Export"

    flood_wait_max_s: int = Field(
        default=300, ge=0, description="Wait out FloodWait up to this; longer stops that chat."
    )
    flood_wait_total_s: int = Field(
        default=900,
        ge=0,
        description="Export: FloodWait waited out per run in total; once spent, a chat that "
        "is asked to wait stops (run the export again later).",
    )
    use_takeout: bool = Field(
        default=True,
        description="Export inside a takeout session.",
        json_schema_extra=env("EXPORT_USE_TAKEOUT"),
    )
    batch_size: int = Field(
        default=500,
        ge=1,
        le=100_000,
        description="Messages written per transaction during export.",
        json_schema_extra=env("EXPORT_BATCH_SIZE"),
    )
    refetch_recent: int = Field(
        default=100,
        ge=0,
        description="On re-runs, fetch this many newest messages per chat again (edits).",
        json_schema_extra=env("EXPORT_REFETCH_RECENT"),
    )
    fallback_wait_s: float = Field(
        default=1.0,
        ge=0,
        description="Pause between history requests when exporting without takeout.",
        json_schema_extra=env("EXPORT_FALLBACK_WAIT_S"),
    )


@dataclass(frozen=True, config=SECTION_CONFIG)
class ResponderSettings:
    """The running bot's replies: the mode, who is answered and when (the policy), and how a
    reply is delivered."""

    TITLE: ClassVar[str] = "Responder (doppelbot run)"

    reply_mode: Literal["auto", "review", "off"] = Field(
        default="review",
        description="auto = send (copy to Saved Messages); review = draft for approval; off.",
    )
    debounce_s: float = Field(default=5.0, ge=0, description="Quiet time before answering a burst.")
    answer_unknown_contacts: bool = Field(
        default=False, description="Answer people who are not in your contacts."
    )
    allow_list: CommaList = Field(
        default_factory=tuple, description="Only these chats (ids or @usernames), if set."
    )
    deny_list: CommaList = Field(
        default_factory=tuple, description="Never these chats (ids or @usernames)."
    )
    group_reply_probability: float = Field(
        default=0.0, ge=0, le=1, description="Chance to answer in groups (opt-in; 0 = never)."
    )
    per_chat_hourly_cap: int = Field(
        default=10, ge=0, description="Replies per chat per hour at most."
    )
    global_hourly_cap: int = Field(
        default=60, ge=0, description="Replies per hour across all chats."
    )
    quiet_hours: QuietHours = Field(
        default="", description="No replies in this local time range, e.g. 23:00-08:00."
    )
    timezone: TimeZoneName = Field(
        default="", description="IANA zone for quiet hours; empty = system local time."
    )
    takeover_minutes: float = Field(
        default=30.0, ge=0, description="Silence in a chat after the owner writes there themselves."
    )
    catch_up_max_age_s: Duration = Field(
        default="6h",  # parsed into seconds by the Duration validator
        ge=0,
        description="After downtime, answer chats whose newest message is younger than this "
        "(e.g. 6h, 90m; 0 = never answer what arrived while the bot was down).",
        json_schema_extra=env("CATCH_UP_MAX_AGE"),
    )
    typing_chars_per_s: float = Field(default=12.0, gt=0, description="Simulated typing speed.")
    typing_max_s: float = Field(
        default=8.0, ge=0, description="Longest 'typing…' before a message."
    )
    human_delay_min_s: float = Field(
        default=1.0, ge=0, description="Shortest pause before replying."
    )
    human_delay_max_s: float = Field(
        default=4.0, ge=0, description="Longest pause before replying."
    )
    split_lines: bool = Field(
        default=True, description="Send a multi-line reply as separate messages."
    )

    @model_validator(mode="after")
    def _delays(self) -> ResponderSettings:
        if self.human_delay_max_s < self.human_delay_min_s:
            raise ValueError("human_delay_max_s must be >= human_delay_min_s")
        return self

    # --- the policy's view (parsed once) ---
    @cached_property
    def _allow(self) -> tuple[frozenset[int], frozenset[str]]:
        return _parse_chat_list(self.allow_list)

    @cached_property
    def _deny(self) -> tuple[frozenset[int], frozenset[str]]:
        return _parse_chat_list(self.deny_list)

    @property
    def allow_ids(self) -> frozenset[int]:
        return self._allow[0]

    @property
    def allow_usernames(self) -> frozenset[str]:
        return self._allow[1]

    @property
    def deny_ids(self) -> frozenset[int]:
        return self._deny[0]

    @property
    def deny_usernames(self) -> frozenset[str]:
        return self._deny[1]

    @property
    def has_allow_list(self) -> bool:
        return bool(self.allow_ids or self.allow_usernames)

    @cached_property
    def quiet_hours_range(self) -> tuple[time, time] | None:
        return parse_quiet_hours(self.quiet_hours)

    @cached_property
    def tz(self) -> tzinfo | None:
        """The zone of quiet hours (None: the system's local time)."""
        if not self.timezone:
            return None

        return ZoneInfo(self.timezone)

    @property
    def takeover_s(self) -> float:
        return self.takeover_minutes * 60


@dataclass(frozen=True, config=SECTION_CONFIG)
class ReviewSettings:
    """Drafts the owner reviews, and the feedback read from reactions and corrections."""

    TITLE: ClassVar[str] = "Review and feedback"

    draft_ttl_minutes: float = Field(
        default=60.0, gt=0, description="Unanswered drafts expire after this."
    )
    positive_reactions: CommaList = Field(
        default_factory=lambda: ("👍", "❤", "❤️", "🔥", "😁", "😂", "👏", "🥰"),
        description="Reactions counted as positive feedback.",
    )
    negative_reactions: CommaList = Field(
        default_factory=lambda: ("👎", "🤮", "💩", "😢", "🤔"),
        description="Reactions counted as negative feedback.",
    )
    takeover_correction_minutes: float = Field(
        default=10.0,
        ge=0,
        description="The owner writing in a chat this soon after an auto reply records "
        "(bot reply, owner text) as a correction (0 = off).",
    )


@dataclass(frozen=True, config=SECTION_CONFIG)
class DaemonSettings:
    """Running for months: stopping cleanly and the watchdog."""

    TITLE: ClassVar[str] = "Running for months (restarts, health)"

    shutdown_grace_s: float = Field(
        default=5.0,
        ge=0,
        description="On stop, a reply being sent gets this long to finish; one cut short is "
        "resumed at the next start.",
    )
    watchdog_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="How often the running bot checks its health and records it.",
    )
    watchdog_idle_s: float = Field(
        default=300.0,
        gt=0,
        description="No update for this long: ask Telegram whether updates were missed.",
    )
    watchdog_max_outage_s: float = Field(
        default=900.0,
        gt=0,
        description="Telegram unreachable or silent this long: exit non-zero (a supervisor "
        "restarts the bot).",
    )


@dataclass(frozen=True, config=SECTION_CONFIG)
class TrainSettings:
    """Fine-tuning (``doppelbot train``/``eval``); ``TrainOptions`` extends it with one run's
    values."""

    TITLE: ClassVar[str] = "Training"

    lora_r: int = Field(default=16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(default=0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_targets: CommaList = Field(
        default_factory=lambda: ("q", "v"), description="Modules LoRA adapts."
    )
    lr: float = Field(
        default=1e-3,
        gt=0,
        description="Adafactor learning rate (constant).",
        json_schema_extra=env("LEARNING_RATE"),
    )
    batch_size: int = Field(default=6, ge=1, description="Micro-batch size.")
    grad_accum: int = Field(
        default=8,
        ge=1,
        description="Gradient accumulation steps.",
        json_schema_extra=env("GRAD_ACCUM_STEPS"),
    )
    epochs: float = Field(
        default=1.0,
        gt=0,
        description="Passes over the training set.",
        json_schema_extra=env("TRAIN_EPOCHS"),
    )
    save_steps: int = Field(default=20, ge=1, description="Checkpoint every N optimizer steps.")
    max_target_tokens: int = Field(
        default=64, ge=4, description="Longest training target, in tokens."
    )
    seed: int = Field(
        default=42,
        description="Seed of the data order, LoRA init and dropout.",
        json_schema_extra=env("TRAIN_SEED"),
    )
    precision: Precision = Field(
        default="auto",
        description="Base weights while training; auto = int8 on CUDA, fp32 on CPU.",
        json_schema_extra=env("TRAIN_PRECISION"),
    )
    gradient_checkpointing: bool = Field(
        default=True, description="Recompute activations in the backward pass (much less memory)."
    )
    keep_checkpoints: int = Field(default=3, ge=1, description="Newest checkpoints kept per run.")
    eval_max_samples: int = Field(
        default=200,
        ge=1,
        description="Validation samples used for held-out loss and generated metrics.",
    )
    feedback_weight: int = Field(
        default=2, ge=1, description="Times each feedback positive is repeated in a training set."
    )
    feedback_replay: float = Field(
        default=1.0,
        ge=0,
        description="`train --method feedback`: dataset rows replayed per feedback row.",
    )
    dpo_beta: float = Field(
        default=0.1,
        gt=0,
        le=10,
        description="`train --method dpo`: DPO beta (strength of the reference).",
    )
    dpo_learning_rate: float = Field(
        default=2e-4, gt=0, description="`train --method dpo`: learning rate unless --lr is given."
    )
    pref_heldout_share: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="Share of preference pairs held out for eval (stable: by a hash of the pair).",
    )


class Settings(BaseModel):
    """Every setting, one frozen section per concern (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    telegram: TelegramSettings = Field(default_factory=TelegramSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    generation: GenerationOptions = Field(default_factory=GenerationOptions)
    prompt: PromptSettings = Field(default_factory=PromptSettings)
    knowledge: KnowledgeSettings = Field(default_factory=KnowledgeSettings)
    voice: VoiceSettings = Field(default_factory=VoiceSettings)
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    responder: ResponderSettings = Field(default_factory=ResponderSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)

    # The session's files need two sections: the data directory and the session's name.
    @property
    def session_path(self) -> Path:
        return self.store.data_dir / f"{self.telegram.session_name}.session"

    @property
    def lock_path(self) -> Path:
        """Held by every command that opens this session (one process per session)."""
        return self.store.data_dir / f"{self.telegram.session_name}.lock"


# --- the flat view: environment names ↔ section fields -----------------------------------------
@dataclasses.dataclass(frozen=True)
class SettingField:
    """One setting: where it lives (``section``.``name``) and its flat ``key`` — the
    environment name without the prefix, in lower case, which is also ``load_settings``'s
    keyword for it."""

    section: str
    name: str
    key: str
    info: FieldInfo

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    def value(self, settings: Settings) -> Any:
        return getattr(getattr(settings, self.section), self.name)


def section_types() -> dict[str, type]:
    """Section name → its class, in ``Settings`` order."""
    return {name: info.annotation for name, info in Settings.model_fields.items()}  # type: ignore[misc]


@cache
def setting_fields() -> tuple[SettingField, ...]:
    """Every setting, in section order."""
    found: list[SettingField] = []
    for section, kind in section_types().items():
        prefix: str = getattr(kind, "env_prefix", "")
        for name, info in kind.__pydantic_fields__.items():  # type: ignore[attr-defined]
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if "env" in extra and extra["env"] is None:
                continue  # not a setting
            key = str(extra.get("env") or prefix + name).lower()
            found.append(SettingField(section, name, key, info))
    keys = [f.key for f in found]
    assert len(keys) == len(set(keys)), "two settings share an environment name"
    return tuple(found)


def _fields_by_key() -> dict[str, SettingField]:
    return {f.key: f for f in setting_fields()}


class _FlatSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        allow_inf_nan=False,
    )


@cache
def _flat_model() -> type[BaseSettings]:
    """A flat pydantic-settings model with one field per setting (its flat key), generated
    from the sections: pydantic-settings reads the environment and ``.env`` as it always did,
    and an error's location is the variable's name."""
    fields: dict[str, Any] = {
        f.key: (f.info.annotation, copy.copy(f.info)) for f in setting_fields()
    }
    return create_model("FlatSettings", __base__=_FlatSettings, **fields)


def _env_name(loc: tuple[object, ...]) -> str:
    field = str(loc[0]) if loc else "?"
    return ENV_PREFIX + field.upper()


def _message(error: Mapping[str, Any]) -> str:
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def _from_flat(values: Mapping[str, Any]) -> Settings:
    """Sections from flat values (one per setting key)."""
    by_section: dict[str, dict[str, Any]] = {}
    for f in setting_fields():
        if f.key in values:
            by_section.setdefault(f.section, {})[f.name] = values[f.key]
    sections: dict[str, Any] = {}
    for section, kind in section_types().items():
        try:
            sections[section] = kind(**by_section.get(section, {}))
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = tuple(first.get("loc", ()))
            if loc:
                match = [f for f in setting_fields() if (f.section, f.name) == (section, loc[0])]
                name = match[0].env if match else f"{section}.{loc[0]}"
                raise ConfigError(f"{name}: {_message(first)}") from None
            raise ConfigError(f"settings: {_message(first)}") from None
    return Settings(**sections)


def _closest_setting(name: str) -> str | None:
    keys = [f.key.upper() for f in setting_fields()]
    match = difflib.get_close_matches(name.upper().removeprefix(ENV_PREFIX), keys, n=1)
    return ENV_PREFIX + match[0] if match else None


def unknown_settings(
    env_file: str | Path | None = ".env", environ: Mapping[str, str] | None = None
) -> list[str]:
    """One warning line per ``DOPPELBOT_*`` variable that is no setting (a typo such as
    ``DOPPELBOT_DENYLIST`` would otherwise silently leave a safety rule off), in the
    environment or in ``env_file``; also a ``.env`` line naming a setting without the prefix."""
    known = {f.env for f in setting_fields()}
    found: list[tuple[str, str]] = []
    env_vars = os.environ if environ is None else environ
    found += [(key, "environment") for key in env_vars if key.upper().startswith(ENV_PREFIX)]
    lines: list[str] = []
    if env_file is not None and Path(env_file).is_file():
        for key in dotenv_values(env_file):
            upper = key.upper()
            if upper.startswith(ENV_PREFIX):
                found.append((key, str(env_file)))
            elif ENV_PREFIX + upper in known:
                lines.append(
                    f"{key} in {env_file} is ignored: settings need the prefix "
                    f"({ENV_PREFIX}{upper})"
                )
    for key, where in found:
        if key.upper() in known:
            continue
        guess = _closest_setting(key)
        hint = f"did you mean {guess}?" if guess else "see .env.example for the settings"
        lines.append(f"{key} ({where}) is not a doppelbot setting and is ignored; {hint}")
    return lines


def set_library_environment(values: Mapping[str, str], *, override: bool = False) -> None:
    """Environment variables that third-party libraries read when they are imported (their
    verbosity, offline mode). Kept here so that every touch of the environment is in this
    module; ``override`` False leaves a value the user set alone."""
    for key, value in values.items():
        if override:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)


def hub_endpoint() -> str | None:
    """``HF_ENDPOINT`` (a Hugging Face hub mirror) as it is now; huggingface_hub reads it only
    once, when it is imported."""
    return os.environ.get("HF_ENDPOINT") or None


def load_settings(env_file: str | Path | None = ".env", **overrides: object) -> Settings:
    """Build Settings from the environment, ``env_file`` and ``overrides`` (flat keywords named
    like the variables: ``data_dir=…``, ``max_input_tokens=…``; they win over both). A bad
    value becomes one ``ConfigError`` line naming the variable."""
    unknown = sorted(set(overrides) - set(_fields_by_key()))
    if unknown:
        raise TypeError(f"load_settings: no such setting: {', '.join(unknown)}")
    try:
        flat = _flat_model()(_env_file=env_file, **overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first.get("loc", ()))
        if loc:
            raise ConfigError(f"{_env_name(loc)}: {_message(first)}") from None
        raise ConfigError(f"settings: {_message(first)}") from None
    except ValueError as exc:  # e.g. JSON in a list variable that does not parse
        raise ConfigError(f"settings: {exc}") from None
    return _from_flat({key: getattr(flat, key) for key in _fields_by_key()})


def setting_items(settings: Settings) -> Iterator[tuple[SettingField, Any]]:
    """Every setting with its effective value, in section order (``doppelbot config show``)."""
    for f in setting_fields():
        yield f, f.value(settings)

"""The one ``Settings`` object.

Built once in the CLI entry point (``doppelbot.cli``) and passed down; nothing else reads the
environment. Every field maps to ``DOPPELBOT_<NAME>`` and may be set in a ``.env`` file; real
environment variables win over ``.env``. ``.env.example`` documents each field and its default,
and ``tests/test_config.py`` checks the two never drift apart.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from datetime import time
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from doppelbot.domain import GenerationOptions
from doppelbot.errors import ConfigError

ENV_PREFIX = "DOPPELBOT_"

DEFAULT_PERSONA = (
    "Ты — это я, владелец аккаунта. Отвечай коротко и естественно, как я обычно пишу в переписке."
)

CommaList = Annotated[list[str], NoDecode]

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


def _split_csv(value: object) -> object:
    """Lists come from the environment as ``a,b,c`` (JSON arrays are accepted too)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        # inf/nan pass every bound check (`inf >= 0`) and then break timers and sampling:
        # refused for every float setting at once.
        allow_inf_nan=False,
    )

    # --- Telegram -------------------------------------------------------------------------------
    api_id: int | None = Field(None, description="Telegram API id from my.telegram.org.")
    api_hash: SecretStr | None = Field(None, description="Telegram API hash from my.telegram.org.")
    phone: str | None = Field(None, description="Phone number for login, international format.")
    session_string: SecretStr | None = Field(
        None,
        description="Telethon StringSession (for containers); when set, no session file is used.",
    )
    session_name: str = Field(
        "doppelbot", description="Session file name (without .session) under the data directory."
    )

    # --- Storage and logging --------------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where the database, session, datasets, adapters and caches live.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level. Message texts are only ever logged at DEBUG."
    )
    log_message_texts: bool = Field(
        False, description="Allow message texts in DEBUG logs (private data: off by default)."
    )

    # --- Reply model ----------------------------------------------------------------------------
    model: str = Field(
        "ai-forever/FRED-T5-1.7B", description="Base model: Hugging Face hub id or local path."
    )
    adapter_path: Path | None = Field(
        None,
        description="LoRA adapter folder; empty = the adapter chosen by `doppelbot adapter use`.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    precision: Literal["auto", "int8", "bf16", "fp32"] = Field(
        "auto",
        description="Weights precision for serving; auto = int8 on the CPU, on CUDA bf16 when it "
        "fits in free GPU memory (else int8).",
    )
    memory_check: bool = Field(
        True,
        description="Refuse to load the reply model when the estimated peak exceeds the free "
        "memory (RAM + swap, or GPU), instead of risking the OOM killer.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for the model; empty = all cores."
    )
    max_new_tokens: int = Field(50, ge=1, le=1024, description="Longest reply, in tokens.")
    do_sample: bool = Field(True, description="Sample (True) or decode greedily/beam (False).")
    temperature: float = Field(0.8, gt=0, le=5, description="Sampling temperature.")
    top_p: float = Field(0.85, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(50, ge=0, description="Top-k sampling cut-off (0 = off).")
    num_beams: int = Field(1, ge=1, le=16, description="Beam search width.")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Forbid repeating n-grams (0 = off).")
    repetition_penalty: float = Field(1.0, gt=0, description="Repetition penalty (1.0 = off).")
    generation_seed: int | None = Field(None, description="Fixed sampling seed; empty = random.")
    generation_timeout_s: float = Field(
        120.0, gt=0, description="A generation running longer than this fails."
    )
    worker_queue_size: int = Field(
        32, ge=1, description="Pending generations the worker accepts before refusing."
    )
    max_input_tokens: int = Field(
        712, ge=16, description="Model input budget; the oldest context is trimmed first."
    )

    # --- Prompt ---------------------------------------------------------------------------------
    persona: str = Field(DEFAULT_PERSONA, description="Persona text at the start of every prompt.")
    role_other: str = Field("Собеседник", description="Label of the other person's turns.")
    role_owner: str = Field("Я", description="Label of the owner's turns.")

    # --- Knowledge base -------------------------------------------------------------------------
    embedder_model: str = Field(
        "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2",
        description="sentence-transformers model (hub id or local path) for fact retrieval.",
    )
    facts_top_k: int = Field(3, ge=0, description="Facts added to a prompt at most.")
    facts_threshold: float = Field(
        0.35, ge=-1, le=1, description="Minimum cosine similarity for a fact to be used."
    )
    fact_fallback: bool = Field(
        False, description="Answer with the best fact when it beats the generated reply."
    )
    fact_fallback_margin: float = Field(
        0.1, ge=0, le=2, description="How much more relevant the reply must be to be kept."
    )
    embedder_threads: int | None = Field(
        1,
        ge=1,
        description="CPU threads of the embedder's worker (1 is fastest for short queries); "
        "empty = torch's default.",
    )

    # --- Voice notes ----------------------------------------------------------------------------
    voice_transcription: bool = Field(
        True,
        description="Transcribe voice and round-video notes locally (faster-whisper); off = "
        "they stay media-only messages.",
    )
    voice_model: str = Field(
        "small",
        description="Speech model: a faster-whisper size (tiny, base, small, medium, …), a "
        "CTranslate2 Whisper model id on the Hugging Face hub, or a local folder.",
    )
    voice_language: str = Field(
        "ru",
        description="Language spoken in notes (a code such as ru or en); auto = detect per "
        "note (one extra encoder pass; unreliable on short notes).",
    )
    voice_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the speech model runs (auto: CUDA when available)."
    )
    voice_compute_type: str = Field(
        "auto",
        description="Speech model precision: auto (int8 on CPU, float16 on CUDA), int8, "
        "int8_float16, int8_float32, float16, bfloat16 or float32.",
    )
    voice_threads: int | None = Field(
        None, ge=1, description="CPU threads for transcription; empty = all cores."
    )
    voice_beam_size: int = Field(
        1, ge=1, le=10, description="Beam width for transcription (1 = greedy: fastest on CPU)."
    )
    voice_temperature_fallback: bool = Field(
        True,
        description="Decode a window again at higher temperatures when the text looks like a "
        "loop (Whisper's fallback; slower on bad audio).",
    )
    voice_vad_filter: bool = Field(
        True,
        description="Skip silence before transcribing (Silero VAD): faster, and no invented "
        "text on silent notes.",
    )
    voice_max_duration_s: float = Field(
        300.0, gt=0, description="Longer notes are not transcribed (marked too long)."
    )
    voice_max_file_mb: float = Field(
        50.0, gt=0, description="Larger note files are not downloaded (marked too long)."
    )
    voice_timeout_s: float = Field(
        120.0, gt=0, description="A transcription waited on longer than this fails."
    )
    voice_queue_size: int = Field(
        8, ge=1, description="Pending transcriptions the worker accepts before refusing."
    )
    voice_max_attempts: int = Field(
        3, ge=1, description="Tries per note before a failed transcription is left alone."
    )
    voice_history_max_hours: float = Field(
        10.0,
        ge=0,
        description="Most audio one `export --voice` or `transcribe` run transcribes (0 = no "
        "limit); the rest waits for the next run.",
    )
    voice_history_max_download_mb: float = Field(
        2000.0,
        ge=0,
        description="Most note data one `export --voice` run downloads (0 = no limit).",
    )

    # --- Dataset --------------------------------------------------------------------------------
    session_gap_hours: float = Field(3.0, gt=0, description="A longer silence ends a dialogue.")
    max_message_chars: int = Field(200, ge=1, description="Longer messages are dropped/truncated.")
    long_message_policy: Literal["drop", "truncate"] = Field(
        "drop", description="What to do with messages longer than max_message_chars."
    )
    context_max_chars: int = Field(500, ge=1, description="Context keeps turns that fit in this.")
    min_letter_share: float = Field(
        0.5, ge=0, le=1, description="Messages with a smaller share of letters are dropped."
    )
    scrub_pii: bool = Field(True, description="Replace phones, emails, cards and URLs.")
    keep_names: bool = Field(True, description="Keep people's names when scrubbing PII.")
    max_contact_share: float = Field(
        0.25, gt=0, le=1, description="Largest share of samples one contact may contribute."
    )
    validation_share: float = Field(
        0.1, ge=0, lt=1, description="The most recent share of samples used for validation."
    )
    dataset_voice: bool = Field(
        True, description="Use voice-note transcripts as message text in the dataset."
    )

    # --- Export ---------------------------------------------------------------------------------
    flood_wait_max_s: int = Field(
        300, ge=0, description="Wait out FloodWait up to this; longer stops that chat."
    )
    flood_wait_total_s: int = Field(
        900,
        ge=0,
        description="Export: FloodWait waited out per run in total; once spent, a chat that "
        "is asked to wait stops (run the export again later).",
    )
    export_use_takeout: bool = Field(True, description="Export inside a takeout session.")
    export_batch_size: int = Field(
        500, ge=1, le=100_000, description="Messages written per transaction during export."
    )
    export_refetch_recent: int = Field(
        100, ge=0, description="On re-runs, fetch this many newest messages per chat again (edits)."
    )
    export_fallback_wait_s: float = Field(
        1.0, ge=0, description="Pause between history requests when exporting without takeout."
    )

    # --- Responder (doppelbot run) --------------------------------------------------------------
    reply_mode: Literal["auto", "review", "off"] = Field(
        "review",
        description="auto = send (copy to Saved Messages); review = draft for approval; off.",
    )
    debounce_s: float = Field(5.0, ge=0, description="Quiet time before answering a burst.")
    answer_unknown_contacts: bool = Field(
        False, description="Answer people who are not in your contacts."
    )
    allow_list: CommaList = Field(
        default_factory=list, description="Only these chats (ids or @usernames), if set."
    )
    deny_list: CommaList = Field(
        default_factory=list, description="Never these chats (ids or @usernames)."
    )
    group_reply_probability: float = Field(
        0.0, ge=0, le=1, description="Chance to answer in groups (opt-in; 0 = never)."
    )
    per_chat_hourly_cap: int = Field(10, ge=0, description="Replies per chat per hour at most.")
    global_hourly_cap: int = Field(60, ge=0, description="Replies per hour across all chats.")
    quiet_hours: str = Field(
        "", description="No replies in this local time range, e.g. 23:00-08:00."
    )
    timezone: str = Field("", description="IANA zone for quiet hours; empty = system local time.")
    takeover_minutes: float = Field(
        30.0, ge=0, description="Silence in a chat after the owner writes there themselves."
    )
    typing_chars_per_s: float = Field(12.0, gt=0, description="Simulated typing speed.")
    typing_max_s: float = Field(8.0, ge=0, description="Longest 'typing…' before a message.")
    human_delay_min_s: float = Field(1.0, ge=0, description="Shortest pause before replying.")
    human_delay_max_s: float = Field(4.0, ge=0, description="Longest pause before replying.")
    split_lines: bool = Field(True, description="Send a multi-line reply as separate messages.")

    # --- Running for months (restarts, catch-up, health) ----------------------------------------
    catch_up_max_age: float = Field(
        "6h",  # type: ignore[arg-type]  # parsed into seconds by the validator
        ge=0,
        description="After downtime, answer chats whose newest message is younger than this "
        "(e.g. 6h, 90m; 0 = never answer what arrived while the bot was down).",
    )
    shutdown_grace_s: float = Field(
        5.0,
        ge=0,
        description="On stop, a reply being sent gets this long to finish; one cut short is "
        "resumed at the next start.",
    )
    watchdog_interval_s: float = Field(
        30.0, gt=0, description="How often the running bot checks its health and records it."
    )
    watchdog_idle_s: float = Field(
        300.0,
        gt=0,
        description="No update for this long: ask Telegram whether updates were missed.",
    )
    watchdog_max_outage_s: float = Field(
        900.0,
        gt=0,
        description="Telegram unreachable or silent this long: exit non-zero (a supervisor "
        "restarts the bot).",
    )

    # --- Review and feedback --------------------------------------------------------------------
    draft_ttl_minutes: float = Field(60.0, gt=0, description="Unanswered drafts expire after this.")
    positive_reactions: CommaList = Field(
        default_factory=lambda: ["👍", "❤", "❤️", "🔥", "😁", "😂", "👏", "🥰"],
        description="Reactions counted as positive feedback.",
    )
    negative_reactions: CommaList = Field(
        default_factory=lambda: ["👎", "🤮", "💩", "😢", "🤔"],
        description="Reactions counted as negative feedback.",
    )
    takeover_correction_minutes: float = Field(
        10.0,
        ge=0,
        description="The owner writing in a chat this soon after an auto reply records "
        "(bot reply, owner text) as a correction (0 = off).",
    )

    # --- Training -------------------------------------------------------------------------------
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_targets: CommaList = Field(
        default_factory=lambda: ["q", "v"], description="Modules LoRA adapts."
    )
    learning_rate: float = Field(1e-3, gt=0, description="Adafactor learning rate (constant).")
    batch_size: int = Field(6, ge=1, description="Micro-batch size.")
    grad_accum_steps: int = Field(8, ge=1, description="Gradient accumulation steps.")
    train_epochs: float = Field(1.0, gt=0, description="Passes over the training set.")
    save_steps: int = Field(20, ge=1, description="Checkpoint every N optimizer steps.")
    max_target_tokens: int = Field(64, ge=4, description="Longest training target, in tokens.")
    train_seed: int = Field(42, description="Seed of the data order, LoRA init and dropout.")
    train_precision: Literal["auto", "int8", "bf16", "fp32"] = Field(
        "auto",
        description="Base weights while training; auto = int8 on CUDA, fp32 on CPU.",
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass (much less memory)."
    )
    keep_checkpoints: int = Field(3, ge=1, description="Newest checkpoints kept per run.")
    eval_max_samples: int = Field(
        200, ge=1, description="Validation samples used for held-out loss and generated metrics."
    )
    feedback_weight: int = Field(
        2, ge=1, description="Times each feedback positive is repeated in a training set."
    )
    feedback_replay: float = Field(
        1.0,
        ge=0,
        description="`train --method feedback`: dataset rows replayed per feedback row.",
    )
    dpo_beta: float = Field(
        0.1, gt=0, le=10, description="`train --method dpo`: DPO beta (strength of the reference)."
    )
    dpo_learning_rate: float = Field(
        2e-4, gt=0, description="`train --method dpo`: learning rate unless --lr is given."
    )
    pref_heldout_share: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Share of preference pairs held out for eval (stable: by a hash of the pair).",
    )

    # --- validators -----------------------------------------------------------------------------
    @field_validator(
        "allow_list",
        "deny_list",
        "positive_reactions",
        "negative_reactions",
        "lora_targets",
        mode="before",
    )
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("catch_up_max_age", mode="before")
    @classmethod
    def _durations(cls, value: object) -> object:
        return parse_duration(value)

    @field_validator("quiet_hours")
    @classmethod
    def _quiet(cls, value: str) -> str:
        parse_quiet_hours(value)
        return value.strip()

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        if value.strip():
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(value.strip())
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r}") from None
        return value.strip()

    @field_validator("voice_compute_type")
    @classmethod
    def _voice_compute_type(cls, value: str) -> str:
        kind = value.strip().lower()
        if kind not in VOICE_COMPUTE_TYPES:
            raise ValueError(f"expected one of {', '.join(VOICE_COMPUTE_TYPES)}")
        return kind

    @field_validator("voice_language")
    @classmethod
    def _voice_language(cls, value: str) -> str:
        code = value.strip().lower()
        if code in ("", "auto"):
            return "auto"
        if not re.fullmatch(r"[a-z]{2,3}", code):
            raise ValueError("expected a language code such as ru or en, or auto")
        return code

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _delays(self) -> Settings:
        if self.human_delay_max_s < self.human_delay_min_s:
            raise ValueError("human_delay_max_s must be >= human_delay_min_s")
        return self

    def generation_options(self) -> GenerationOptions:
        return GenerationOptions(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            num_beams=self.num_beams,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            repetition_penalty=self.repetition_penalty,
            seed=self.generation_seed,
            timeout_s=self.generation_timeout_s,
        )

    # --- derived paths --------------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.data_dir / "doppelbot.sqlite3"

    @property
    def session_path(self) -> Path:
        return self.data_dir / f"{self.session_name}.session"

    @property
    def lock_path(self) -> Path:
        """Held by every command that opens this session (one process per session)."""
        return self.data_dir / f"{self.session_name}.lock"

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

    @property
    def quiet_hours_range(self) -> tuple[time, time] | None:
        return parse_quiet_hours(self.quiet_hours)


def _env_name(loc: tuple[object, ...]) -> str:
    field = str(loc[0]) if loc else "?"
    return ENV_PREFIX + field.upper()


def _closest_setting(name: str) -> str | None:
    fields = [f.upper() for f in Settings.model_fields]
    match = difflib.get_close_matches(name.upper().removeprefix(ENV_PREFIX), fields, n=1)
    return ENV_PREFIX + match[0] if match else None


def unknown_settings(
    env_file: str | Path | None = ".env", environ: Mapping[str, str] | None = None
) -> list[str]:
    """One warning line per ``DOPPELBOT_*`` variable that is no setting (a typo such as
    ``DOPPELBOT_DENYLIST`` would otherwise silently leave a safety rule off), in the
    environment or in ``env_file``; also a ``.env`` line naming a setting without the prefix."""
    known = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    found: list[tuple[str, str]] = []
    env = os.environ if environ is None else environ
    found += [(key, "environment") for key in env if key.upper().startswith(ENV_PREFIX)]
    lines: list[str] = []
    if env_file is not None and Path(env_file).is_file():
        from dotenv import dotenv_values

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
    """Build Settings; a bad value becomes one ``ConfigError`` line naming the variable."""
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first.get("loc", ()))
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        if loc:
            raise ConfigError(f"{_env_name(loc)}: {msg}") from None
        raise ConfigError(f"settings: {msg}") from None
    except ValueError as exc:  # e.g. JSON in a list variable that does not parse
        raise ConfigError(f"settings: {exc}") from None

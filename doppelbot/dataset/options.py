"""``DatasetOptions``: every rule of the dataset builder in one frozen object.

Built from ``Settings`` (``DatasetOptions.from_settings``) and adjusted by CLI flags with
``dataclasses.replace``; the builder, the live context of the responder and the tests all take
this one object, so a rule can never be applied differently in training and serving.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from doppelbot.config import DEFAULT_PERSONA
from doppelbot.errors import DatasetError
from doppelbot.prompt import PromptFormat

if TYPE_CHECKING:
    from doppelbot.config import Settings


@dataclass(frozen=True, slots=True)
class DatasetOptions:
    # --- sessions and turns ---------------------------------------------------------------------
    session_gap_s: int = 3 * 3600
    """A silence longer than this (between any two messages of a chat) ends a dialogue."""
    context_max_chars: int = 500
    """The context keeps the most recent turns whose newline-joined texts fit in this."""
    include_reply_to: bool = True
    """A message quoted (reply_to) by the reply or by the last context turn joins the context."""
    reply_to_across_sessions: bool = False
    """Allow a quoted message from an earlier session (off: context never crosses a session)."""

    # --- message rules --------------------------------------------------------------------------
    max_message_chars: int = 200
    long_message_policy: Literal["drop", "truncate"] = "drop"
    min_letter_share: float = 0.5
    """Letters / non-whitespace characters (after PII scrubbing) must be at least this."""
    drop_links: bool = True
    drop_forwarded: bool = True
    stickers_as_emoji: bool = True
    voice_transcripts: bool = True
    """A transcribed voice or round-video note counts as the text it said (off: media-only)."""
    scrub_pii: bool = True
    keep_names: bool = True

    # --- chats ----------------------------------------------------------------------------------
    include_groups: bool = False

    # --- quality and split ----------------------------------------------------------------------
    dedup_exact: bool = True
    dedup_near: bool = True
    max_contact_share: float = 0.25
    validation_share: float = 0.1

    # --- model input ----------------------------------------------------------------------------
    max_input_tokens: int = 712
    persona: str = DEFAULT_PERSONA
    role_other: str = "Собеседник"
    role_owner: str = "Я"

    def __post_init__(self) -> None:
        problems = []
        if self.session_gap_s <= 0:
            problems.append("session gap must be positive")
        if self.context_max_chars < 1:
            problems.append("context_max_chars must be >= 1")
        if self.max_message_chars < 1:
            problems.append("max_message_chars must be >= 1")
        if self.long_message_policy not in ("drop", "truncate"):
            problems.append("long_message_policy must be 'drop' or 'truncate'")
        if not 0 <= self.min_letter_share <= 1:
            problems.append("min_letter_share must be within 0..1")
        if not 0 < self.max_contact_share <= 1:
            problems.append("max_contact_share must be within (0, 1]")
        if not 0 <= self.validation_share < 1:
            problems.append("validation_share must be within [0, 1)")
        if self.max_input_tokens < 16:
            problems.append("max_input_tokens must be >= 16")
        if problems:
            raise DatasetError("bad dataset options: " + "; ".join(problems))

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> DatasetOptions:
        values: dict[str, Any] = {
            "session_gap_s": round(settings.session_gap_hours * 3600),
            "context_max_chars": settings.context_max_chars,
            "max_message_chars": settings.max_message_chars,
            "long_message_policy": settings.long_message_policy,
            "min_letter_share": settings.min_letter_share,
            "scrub_pii": settings.scrub_pii,
            "voice_transcripts": settings.dataset_voice,
            "keep_names": settings.keep_names,
            "max_contact_share": settings.max_contact_share,
            "validation_share": settings.validation_share,
            "max_input_tokens": settings.max_input_tokens,
            "persona": settings.persona,
            "role_other": settings.role_other,
            "role_owner": settings.role_owner,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat(self.persona, self.role_other, self.role_owner)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

"""The core's vocabulary: small frozen dataclasses.

Adapters (Telegram, model, store) convert to and from these, so the core — dataset building,
reply policy, review workflow, feedback — is plain Python that tests without telethon or torch.
Times are UTC unix seconds (``int``): cheap to compare and sort over millions of messages.
Chat ids are Telethon's "marked" peer ids (users > 0, basic groups < 0, channels -100…).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class PeerKind(StrEnum):
    USER = "user"
    BOT = "bot"
    GROUP = "group"
    CHANNEL = "channel"


class Role(StrEnum):
    """Who speaks a dialogue turn."""

    OWNER = "owner"
    OTHER = "other"


class MediaKind(StrEnum):
    PHOTO = "photo"
    VIDEO = "video"
    VOICE = "voice"
    AUDIO = "audio"
    VIDEO_NOTE = "video_note"
    STICKER = "sticker"
    ANIMATION = "animation"
    DOCUMENT = "document"
    CONTACT = "contact"
    GEO = "geo"
    POLL = "poll"
    WEBPAGE = "webpage"
    OTHER = "other"


VOICE_KINDS = frozenset({MediaKind.VOICE, MediaKind.VIDEO_NOTE})
"""Notes whose audio is transcribed: voice messages and round video messages."""


class TranscriptStatus(StrEnum):
    """Where a voice note's transcription stands (``transcripts.status``)."""

    PENDING = "pending"  # known, not transcribed yet
    DONE = "done"  # transcribed (the text may be empty: nothing intelligible)
    FAILED = "failed"  # tried and failed; retried up to a few times
    TOO_LONG = "too_long"  # longer than the maximum duration (or file size): not transcribed
    UNAVAILABLE = "unavailable"  # no audio to transcribe (a Desktop export without the file)


class ReplyStatus(StrEnum):
    """A reply's lifecycle; ``doppelbot.store.replies.TRANSITIONS`` lists the allowed moves."""

    QUEUED = "queued"
    DEFERRED = "deferred"  # quiet hours or a cap: waits until ``Reply.not_before``
    GENERATING = "generating"
    AWAITING_REVIEW = "awaiting_review"
    SENDING = "sending"
    SENT = "sent"
    DROPPED = "dropped"
    FAILED = "failed"
    EXPIRED = "expired"


class ReplyMode(StrEnum):
    AUTO = "auto"
    REVIEW = "review"
    OFF = "off"


class Verdict(StrEnum):
    APPROVED = "approved"
    CORRECTED = "corrected"
    REJECTED = "rejected"
    REGENERATED = "regenerated"
    EXPIRED = "expired"
    TAKEOVER = "takeover"  # the owner wrote in the chat right after a bot reply


@dataclass(frozen=True, slots=True)
class Account:
    user_id: int
    first_name: str | None = None
    last_name: str | None = None
    username: str | None = None
    phone: str | None = None


@dataclass(frozen=True, slots=True)
class Peer:
    peer_id: int
    kind: PeerKind
    first_name: str | None = None
    last_name: str | None = None
    title: str | None = None
    username: str | None = None
    is_bot: bool = False
    is_deleted: bool = False
    is_contact: bool = False
    is_self: bool = False

    @property
    def display_name(self) -> str:
        if self.title:
            return self.title
        name = " ".join(p for p in (self.first_name, self.last_name) if p)
        if name:
            return name
        if self.username:
            return "@" + self.username
        return str(self.peer_id)


@dataclass(frozen=True, slots=True)
class Message:
    chat_id: int
    message_id: int
    sender_id: int | None
    is_outgoing: bool
    date: int
    text: str = ""
    edit_date: int | None = None
    reply_to_message_id: int | None = None
    is_forwarded: bool = False
    forwarded_from: str | None = None
    media_kind: MediaKind | None = None
    sticker_emoji: str | None = None
    grouped_id: int | None = None
    service_action: str | None = None
    # What a voice or round-video note said (``store.transcripts.attach`` fills it); kept
    # apart from ``text`` (the caption), so a transcript is never mistaken for typed text.
    transcript: str | None = None

    @property
    def is_service(self) -> bool:
        return self.service_action is not None

    @property
    def is_voice_note(self) -> bool:
        return self.media_kind in VOICE_KINDS


@dataclass(frozen=True, slots=True)
class Turn:
    """One speaker's consecutive messages, merged."""

    role: Role
    text: str


@dataclass(frozen=True, slots=True)
class Sample:
    """One fine-tuning example: the context turns and the owner's reply to them."""

    chat_id: int
    context: tuple[Turn, ...]
    reply: str
    reply_date: int
    context_start_date: int
    source_message_ids: tuple[int, ...]
    reply_message_ids: tuple[int, ...]
    model_input: str = ""
    model_target: str = ""
    #: The own account whose chat it comes from ("": not recorded; message ids are per account).
    account: str = ""


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply the bot produced (or is producing) for one chat."""

    reply_id: int
    chat_id: int
    status: ReplyStatus
    mode: ReplyMode
    trigger_message_id: int
    context_message_ids: tuple[int, ...] = ()
    draft_text: str | None = None
    final_text: str | None = None
    error: str | None = None
    model_id: str | None = None
    adapter_id: str | None = None
    review_message_id: int | None = None
    sent_message_ids: tuple[int, ...] = ()
    created_at: int = 0
    updated_at: int = 0
    generated_at: int | None = None
    sent_at: int | None = None
    not_before: int | None = None  # a deferred reply is tried again from then on


@dataclass(frozen=True, slots=True)
class ReviewVerdict:
    reply_id: int
    verdict: Verdict
    draft_text: str
    final_text: str | None
    created_at: int
    verdict_id: int | None = None


@dataclass(frozen=True, slots=True)
class Reaction:
    """The current count of one emoji on one message (state, not events)."""

    chat_id: int
    message_id: int
    emoji: str
    count: int = 1
    by_owner: bool = False


@dataclass(frozen=True, slots=True)
class Fact:
    fact_id: int
    text: str
    source: str
    created_at: int = 0


@dataclass(frozen=True, slots=True)
class VoiceNote:
    """A voice or round-video note waiting for (or past) transcription."""

    chat_id: int
    message_id: int
    kind: MediaKind  # VOICE or VIDEO_NOTE
    is_outgoing: bool
    date: int
    duration_s: float | None = None  # from Telegram or the export, before any download
    size_bytes: int | None = None
    file_path: str | None = None  # the local file (Desktop export), if any
    status: TranscriptStatus = TranscriptStatus.PENDING
    attempts: int = 0


# --- SSA labelling (sensibleness and specificity of replies) --------------------------------
@dataclass(frozen=True, slots=True)
class SsaLabel:
    """The owner's two marks on one reply."""

    sensible: bool
    specific: bool

    @property
    def score(self) -> float:
        """Per-reply SSA contribution: 0, 0.5 or 1."""
        return (int(self.sensible) + int(self.specific)) / 2


@dataclass(frozen=True, slots=True)
class Candidate:
    """One reply to label; ``source`` is hidden from the owner until the report."""

    context_key: str
    source: str  # an adapter id, or "owner" for the owner's real reply
    reply: str


#: A message as the dataset rules read it, from the store (computed in SQL) or from a
#: ``Message``: ``(message_id, is_outgoing, date, text, reply_to_message_id, kind)``.
Row = tuple[int, int, int, str, "int | None", int]

# The row's ``kind``: plain ints, compared in the dataset's hot loop.
KIND_TEXT = 0
KIND_SERVICE = 1
KIND_FORWARDED = 2
KIND_STICKER = 3  # text holds the sticker's emoji
KIND_WEBPAGE = 4  # a link preview: the message carries a link
KIND_MEDIA = 5  # photo, voice, document…; text is the caption, maybe empty


def voice_message_text(caption: str, transcript: str) -> str:
    """The text a transcribed note stands for in dialogues (dataset and live context): the
    transcript, after the caption if the note had one."""
    caption, transcript = caption.strip(), transcript.strip()
    if caption and transcript:
        return f"{caption}\n{transcript}"
    return caption or transcript

"""Who gets answered, and when the bot must stay silent.

Pure functions over domain objects and plain numbers, so every safety rule is unit-tested
without Telegram, a model or a clock. The responder asks twice: ``eligibility`` when a message
arrives (cheap, static: the kind of chat, lists, contacts) and ``gate`` before spending a
generation and again before sending (dynamic: pause, quiet hours, takeover, hourly caps).
A rule that says no returns a short reason string, stored with the dropped reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, tzinfo
from enum import StrEnum
from zoneinfo import ZoneInfo

from doppelbot.config import Settings
from doppelbot.domain import Message, Peer, PeerKind

HOUR_S = 3600


class Skip(StrEnum):
    """Why the bot does not answer."""

    SERVICE = "service"
    OWN = "own_message"
    SAVED_MESSAGES = "saved_messages"
    CHANNEL = "channel"
    BOT = "bot"
    DELETED = "deleted_account"
    GROUP = "group"
    GROUP_DICE = "group_probability"
    NOT_FROM_CHAT = "not_from_peer"
    DENIED = "deny_list"
    NOT_ALLOWED = "not_in_allow_list"
    UNKNOWN_CONTACT = "unknown_contact"
    MODE_OFF = "mode_off"
    PAUSED = "paused"
    QUIET_HOURS = "quiet_hours"
    TAKEOVER = "takeover"
    CHAT_CAP = "per_chat_cap"
    GLOBAL_CAP = "global_cap"
    STALE = "stale"
    NOTHING_TO_ANSWER = "nothing_to_answer"
    SUPERSEDED = "superseded"
    UNKNOWN_PEER = "unknown_peer"


def _parse_list(entries: list[str]) -> tuple[frozenset[int], frozenset[str]]:
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


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    allow_ids: frozenset[int] = frozenset()
    allow_usernames: frozenset[str] = frozenset()
    deny_ids: frozenset[int] = frozenset()
    deny_usernames: frozenset[str] = frozenset()
    answer_unknown_contacts: bool = False
    group_reply_probability: float = 0.0
    per_chat_hourly_cap: int = 10
    global_hourly_cap: int = 60
    quiet_hours: tuple[time, time] | None = None
    tz: tzinfo | None = None  # None = the system's local time
    takeover_s: float = 1800.0

    @classmethod
    def from_settings(cls, settings: Settings) -> PolicyConfig:
        allow_ids, allow_names = _parse_list(settings.allow_list)
        deny_ids, deny_names = _parse_list(settings.deny_list)
        return cls(
            allow_ids=allow_ids,
            allow_usernames=allow_names,
            deny_ids=deny_ids,
            deny_usernames=deny_names,
            answer_unknown_contacts=settings.answer_unknown_contacts,
            group_reply_probability=settings.group_reply_probability,
            per_chat_hourly_cap=settings.per_chat_hourly_cap,
            global_hourly_cap=settings.global_hourly_cap,
            quiet_hours=settings.quiet_hours_range,
            tz=ZoneInfo(settings.timezone) if settings.timezone else None,
            takeover_s=settings.takeover_minutes * 60,
        )

    @property
    def has_allow_list(self) -> bool:
        return bool(self.allow_ids or self.allow_usernames)


def _listed(peer: Peer, ids: frozenset[int], names: frozenset[str]) -> bool:
    if peer.peer_id in ids:
        return True
    return bool(peer.username) and peer.username.lower() in names  # type: ignore[union-attr]


def chat_eligibility(peer: Peer, owner_id: int, cfg: PolicyConfig) -> Skip | None:
    """Whether this chat is ever answered: its kind, the lists, the contacts rule."""
    if peer.is_self or peer.peer_id == owner_id:
        return Skip.SAVED_MESSAGES
    if peer.kind is PeerKind.CHANNEL:
        return Skip.CHANNEL
    if peer.kind is PeerKind.BOT or peer.is_bot:
        return Skip.BOT
    if peer.is_deleted:
        return Skip.DELETED
    if peer.kind is PeerKind.GROUP and cfg.group_reply_probability <= 0:
        return Skip.GROUP
    if _listed(peer, cfg.deny_ids, cfg.deny_usernames):
        return Skip.DENIED
    if cfg.has_allow_list:
        # An explicitly allowed chat is answered even when it is not in the contacts.
        return None if _listed(peer, cfg.allow_ids, cfg.allow_usernames) else Skip.NOT_ALLOWED
    if peer.kind is PeerKind.USER and not peer.is_contact and not cfg.answer_unknown_contacts:
        return Skip.UNKNOWN_CONTACT
    return None


def eligibility(message: Message, peer: Peer, owner_id: int, cfg: PolicyConfig) -> Skip | None:
    """Static rules for an incoming message in ``peer``'s chat; ``None``: it may be answered."""
    if message.is_service:
        return Skip.SERVICE
    if message.is_outgoing or message.sender_id == owner_id:
        return Skip.OWN
    if message.chat_id == owner_id:
        return Skip.SAVED_MESSAGES
    if (
        peer.kind is PeerKind.USER
        and message.sender_id is not None
        and message.sender_id != peer.peer_id
    ):
        # In a private chat only the other person writes; anything else is not theirs.
        return Skip.NOT_FROM_CHAT
    return chat_eligibility(peer, owner_id, cfg)


def in_quiet_hours(now: float, cfg: PolicyConfig) -> bool:
    """Whether ``now`` (UTC unix seconds) falls into the local quiet-hours range."""
    if cfg.quiet_hours is None:
        return False
    start, end = cfg.quiet_hours
    if start == end:
        return False
    local = datetime.fromtimestamp(now, tz=cfg.tz) if cfg.tz else datetime.fromtimestamp(now)
    t = local.time().replace(tzinfo=None)
    if start < end:
        return start <= t < end
    return t >= start or t < end  # wraps past midnight, e.g. 23:00-08:00


@dataclass(frozen=True, slots=True)
class GateInputs:
    """The dynamic state one decision needs, read from the store by the responder."""

    now: float
    paused: bool
    last_owner_message_at: float | None  # the owner's own latest message in this chat
    chat_sends_last_hour: int
    global_sends_last_hour: int


def gate(inputs: GateInputs, cfg: PolicyConfig) -> Skip | None:
    """Dynamic rules; ``None`` means the bot may answer now."""
    if inputs.paused:
        return Skip.PAUSED
    if in_quiet_hours(inputs.now, cfg):
        return Skip.QUIET_HOURS
    if (
        inputs.last_owner_message_at is not None
        and inputs.now - inputs.last_owner_message_at < cfg.takeover_s
    ):
        return Skip.TAKEOVER
    if inputs.chat_sends_last_hour >= cfg.per_chat_hourly_cap:
        return Skip.CHAT_CAP
    if inputs.global_sends_last_hour >= cfg.global_hourly_cap:
        return Skip.GLOBAL_CAP
    return None


def group_dice(peer: Peer, cfg: PolicyConfig, roll: float) -> Skip | None:
    """Groups are answered only with the opt-in probability (``roll`` is uniform in [0, 1))."""
    if peer.kind is PeerKind.GROUP and roll >= cfg.group_reply_probability:
        return Skip.GROUP_DICE
    return None

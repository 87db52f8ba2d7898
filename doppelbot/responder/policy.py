"""Who gets answered, and when the bot must stay silent.

Pure functions over domain objects and plain numbers, so every safety rule is unit-tested
without Telegram, a model or a clock. The responder asks twice: ``eligibility`` when a message
arrives (cheap, static: the kind of chat, lists, contacts) and ``gate`` before spending a
generation and again before sending (dynamic: pause, quiet hours, takeover, hourly caps).
A rule that says no returns a short reason string, stored with the dropped reply. Quiet hours
and the hourly caps say "not now" rather than "no": ``defer_until`` tells when to try again.
After downtime, ``catch_up_skip`` decides which unanswered chats are still worth answering.
Every rule reads its numbers and lists from the responder section of the settings
(``ResponderSettings``, which also holds them parsed: chat ids, usernames, the time zone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from doppelbot.config import HOUR_S, ResponderSettings
from doppelbot.core.domain import Message, Peer, PeerKind


class Skip(StrEnum):
    """Why the bot does not answer."""

    SERVICE = "service"
    OWN = "own_message"
    SAVED_MESSAGES = "saved_messages"
    OWN_ACCOUNT = "own_account"  # the owner's other account (its own bot may be running)
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
    TOO_OLD = "too_old"  # older than DOPPELBOT_CATCH_UP_MAX_AGE when it could be answered
    READ_BY_OWNER = "read_by_owner"  # the owner read it on another device while we were down
    BEFORE_FIRST_RUN = "before_first_run"  # arrived before the bot ever ran here


#: Reasons that postpone a reply (until the window opens) instead of dropping it.
DEFER_REASONS = frozenset({Skip.QUIET_HOURS, Skip.CHAT_CAP, Skip.GLOBAL_CAP})


def _listed(peer: Peer, ids: frozenset[int], names: frozenset[str]) -> bool:
    if peer.peer_id in ids:
        return True
    return bool(peer.username) and peer.username.lower() in names  # type: ignore[union-attr]


def chat_eligibility(
    peer: Peer, owner_id: int, cfg: ResponderSettings, other_own: frozenset[int] = frozenset()
) -> Skip | None:
    """Whether this chat is ever answered: its kind, the lists, the contacts rule.
    ``other_own``: the user ids of the owner's other own accounts — a chat with one of them is
    the owner talking to themself (and two bots answering each other would never stop)."""
    if peer.is_self or peer.peer_id == owner_id:
        return Skip.SAVED_MESSAGES
    if peer.peer_id in other_own:
        return Skip.OWN_ACCOUNT
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


def eligibility(
    message: Message,
    peer: Peer,
    owner_id: int,
    cfg: ResponderSettings,
    other_own: frozenset[int] = frozenset(),
) -> Skip | None:
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
    return chat_eligibility(peer, owner_id, cfg, other_own)


def in_quiet_hours(now: float, cfg: ResponderSettings) -> bool:
    """Whether ``now`` (UTC unix seconds) falls into the local quiet-hours range."""
    if cfg.quiet_hours_range is None:
        return False
    start, end = cfg.quiet_hours_range
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


def gate(inputs: GateInputs, cfg: ResponderSettings) -> Skip | None:
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


def quiet_hours_end(now: float, cfg: ResponderSettings) -> float:
    """When the quiet hours that ``now`` falls into end (UTC unix seconds); ``now`` itself
    when it is not in quiet hours."""
    if not in_quiet_hours(now, cfg) or cfg.quiet_hours_range is None:
        return now
    end = cfg.quiet_hours_range[1]
    local = datetime.fromtimestamp(now, tz=cfg.tz) if cfg.tz else datetime.fromtimestamp(now)
    candidate = local.replace(hour=end.hour, minute=end.minute, second=0, microsecond=0)
    if candidate.timestamp() <= now:
        candidate += timedelta(days=1)
    return candidate.timestamp()


def cap_frees_at(send_times: Sequence[float], cap: int, now: float) -> float:
    """When a full hourly cap has a free slot again: an hour after the send that has to
    leave the window (``send_times``: the counted sends of the last hour, oldest first)."""
    recent = sorted(t for t in send_times if t > now - HOUR_S)
    if cap <= 0:
        return now + HOUR_S
    if len(recent) < cap:
        return now
    return recent[len(recent) - cap] + HOUR_S


def defer_until(
    reason: Skip,
    now: float,
    cfg: ResponderSettings,
    *,
    chat_send_times: Sequence[float] = (),
    global_send_times: Sequence[float] = (),
) -> float:
    """When to try a reply deferred for ``reason`` again (never earlier than a second on)."""
    if reason is Skip.QUIET_HOURS:
        at = quiet_hours_end(now, cfg)
    elif reason is Skip.CHAT_CAP:
        at = cap_frees_at(chat_send_times, cfg.per_chat_hourly_cap, now)
    elif reason is Skip.GLOBAL_CAP:
        at = cap_frees_at(global_send_times, cfg.global_hourly_cap, now)
    else:
        raise ValueError(f"{reason} does not defer a reply")
    return max(at, now + 1.0)


def catch_up_skip(
    *,
    message_date: float,
    now: float,
    first_run_at: float,
    read_by_owner: bool,
    cfg: ResponderSettings,
) -> Skip | None:
    """Whether an unanswered message that arrived while the bot was down is answered now:
    not when the owner already read it elsewhere (they chose), not when it is older than
    ``catch_up_max_age`` (0 = never), and never for what predates the bot's first run."""
    if message_date < first_run_at:
        return Skip.BEFORE_FIRST_RUN
    if read_by_owner:
        return Skip.READ_BY_OWNER
    if cfg.catch_up_max_age_s <= 0 or now - message_date > cfg.catch_up_max_age_s:
        return Skip.TOO_OLD
    return None


def group_dice(peer: Peer, cfg: ResponderSettings, roll: float) -> Skip | None:
    """Groups are answered only with the opt-in probability (``roll`` is uniform in [0, 1))."""
    if peer.kind is PeerKind.GROUP and roll >= cfg.group_reply_probability:
        return Skip.GROUP_DICE
    return None

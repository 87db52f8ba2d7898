"""The dialogue context of one live reply, built from the chat's stored history.

The model was trained on contexts the dataset builder made, so the live bot must show it the
same shape: ``doppelbot.dataset.sessions.build_live_context`` applies the dataset's rules
(session gap, length limits, letter share, PII scrubbing, turn merging) to the chat's recent
messages. This module wraps it into what the responder needs — the turns, the ids of the
messages they came from and whether there is anything to answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from doppelbot.config import Settings
from doppelbot.core.domain import Message, Peer, Role, Turn
from doppelbot.dataset.options import dataset_options
from doppelbot.dataset.sessions import build_live_context


@dataclass(frozen=True, slots=True)
class LiveContext:
    turns: tuple[Turn, ...]
    message_ids: tuple[int, ...]

    @property
    def answerable(self) -> bool:
        """The last turn is the other person's: there is something to answer."""
        return bool(self.turns) and self.turns[-1].role is Role.OTHER

    @property
    def query(self) -> str:
        """The other person's latest turn: what facts are retrieved for."""
        for turn in reversed(self.turns):
            if turn.role is Role.OTHER:
                return turn.text
        return ""


ContextBuilder = Callable[[Sequence[Message], int, Peer], LiveContext]

#: How many stored messages are read per reply; the builder keeps what fits its limits.
HISTORY_WINDOW = 60


def session_message_ids(messages: Sequence[Message], now: int, gap_s: float) -> tuple[int, ...]:
    """The ids of the messages of the chat's current session (what the context is built
    from): walking back from the newest, until a silence longer than the session gap."""
    ordered = sorted((m for m in messages if m.date <= now), key=lambda m: (m.date, m.message_id))
    ids: list[int] = []
    later: int | None = None
    for m in reversed(ordered):
        if later is not None and later - m.date > gap_s:
            break
        later = m.date
        ids.append(m.message_id)
    return tuple(sorted(ids))


def default_context_builder(settings: Settings) -> ContextBuilder:
    """The dataset's rules (``dataset_options``) applied to the live chat."""
    options = dataset_options(settings)

    def build(messages: Sequence[Message], now: int, peer: Peer) -> LiveContext:
        names = (peer.first_name, peer.last_name, peer.username)
        turns = build_live_context(messages, now, options, names=names)
        ids = session_message_ids(messages, now, options.session_gap_s)
        return LiveContext(tuple(turns), ids)

    return build

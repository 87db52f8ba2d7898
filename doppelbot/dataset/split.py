"""Train/validation split by time: validation is the most recent share of the samples.

A random split would put tomorrow's conversations in the training set and yesterday's in the
validation set, and the same dialogue would sit on both sides; splitting at a point in time is
what the bot faces in use (answering after everything it trained on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import attrgetter

from doppelbot.core.domain import Sample

time_order_key = attrgetter("reply_date", "chat_id", "reply_message_ids")
"""Reply time, then chat, then message ids: a total, deterministic order (C-speed key)."""


def validation_count(n: int, share: float) -> int:
    """How many of ``n`` samples go to validation (at least one when share > 0 and n >= 2)."""
    if n < 2 or share <= 0:
        return 0
    return min(n - 1, max(1, math.ceil(n * share - 1e-9)))


_REPLY_DATE = attrgetter("reply_date")


def split_by_time(
    samples: Sequence[Sample], share: float, *, by_chat: bool = False
) -> tuple[list[Sample], list[Sample]]:
    """(train, validation), each in time order; every validation reply is at least as late as
    every training reply.

    ``by_chat``: the samples are already in ``(chat_id, reply time)`` order (as the builder
    makes them), so a stable sort by reply date alone gives the same total order, faster.
    """
    ordered = sorted(samples, key=_REPLY_DATE if by_chat else time_order_key)
    n_val = validation_count(len(ordered), share)
    cut = len(ordered) - n_val
    return ordered[:cut], ordered[cut:]

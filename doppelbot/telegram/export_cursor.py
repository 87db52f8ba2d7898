"""The per-chat export cursor: where each walk over a chat's history starts from it, and how a
stored batch moves it.

The store keeps, per chat, ``[oldest_message_id, newest_message_id]``: every server message in
that id range is stored. A chat's first export walks back from the newest message; later runs
walk forward from ``newest`` (oldest first), read the newest few again for edits, then walk
back from ``oldest`` until the start of the history. Each batch is stored together with the
cursor that covers it, so a kill at any moment leaves a range that is true, and the next run
starts exactly at its edges.
"""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum

from doppelbot.store.history import ExportCursor
from doppelbot.telegram.history_pages import Call, HistoryPages


class Walk(StrEnum):
    BACK = "back"  # newest to oldest, from ``oldest`` (or the newest message) to the start
    FORWARD = "forward"  # oldest to newest, from ``newest`` to today: what arrived since
    RECENT = "recent"  # the newest messages again, to pick up edits; moves no edge


def walk_pages(
    call: Call, peer: object, cursor: ExportCursor, walk: Walk, *, refetch_recent: int
) -> HistoryPages:
    """The pages of ``walk``, starting at the cursor's edge."""
    if walk is Walk.FORWARD:
        return HistoryPages(call, peer, reverse=True, offset_id=cursor.newest_message_id + 1)
    if walk is Walk.RECENT:
        return HistoryPages(
            call, peer, offset_id=cursor.newest_message_id + 1, limit=refetch_recent
        )
    return HistoryPages(call, peer, offset_id=cursor.oldest_message_id or 0)


def covering(
    cursor: ExportCursor,
    walk: Walk,
    first_id: int,
    last_id: int,
    *,
    final: bool,
    total: int | None,
) -> ExportCursor:
    """The cursor once the messages ``first_id``..``last_id`` (in walk order, every one in
    between included) of ``walk`` are stored; ``final``: the walk reached its end."""
    c = cursor
    lo, hi = min(first_id, last_id), max(first_id, last_id)
    if walk is Walk.BACK:
        c = replace(
            c,
            newest_message_id=c.newest_message_id or hi,
            oldest_message_id=lo if c.oldest_message_id is None else min(lo, c.oldest_message_id),
            history_complete=final,
        )
    elif walk is Walk.FORWARD:
        c = replace(
            c,
            newest_message_id=max(hi, c.newest_message_id),
            oldest_message_id=lo if c.oldest_message_id is None else c.oldest_message_id,
        )
    return replace(c, server_total=total or c.server_total)

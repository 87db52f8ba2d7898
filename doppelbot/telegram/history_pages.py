"""A chat's history as an async iterator of raw ``messages.getHistory`` pages.

Telethon's ``iter_messages`` (``RequestIter`` / ``_MessagesIter``) pages the history and also
builds a full ``Message`` per item: it resolves every sender, chat and forward into objects and,
inside a takeout, goes through a proxy on every attribute. An export never reads those and
they cost about a third of its CPU. ``HistoryPages`` sends exactly the requests
``_MessagesIter`` sends (same offsets, same stop rules; a test holds the two to the same answers)
and yields each answer's messages untouched, so the paging stays here and what is done with the
messages stays with the code that consumes the pages.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from telethon import utils
from telethon.tl import functions, types

#: Telegram's cap on ``messages.getHistory``'s ``limit``.
PAGE_LIMIT = 100

#: Sends one request: the client, its takeout wrapper, or a paced wrapper around either.
Call = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One answer: its messages in walk order and what Telegram said about the chat."""

    messages: list[Any]  # raw TL messages, ``MessageEmpty`` left out, ids strictly monotonic
    total: int  # how many messages the chat has on the server
    response: Any  # the answer itself, whose users and chats the messages refer to

    def entities(self) -> dict[int, Any]:
        """The page's users and chats by marked id (senders, forward origins)."""
        get_id = utils.get_peer_id
        found = {get_id(u): u for u in self.response.users}
        for c in self.response.chats:
            found[get_id(c)] = c
        return found


class HistoryPages:
    """The pages of one chat's history, newest first from ``offset_id`` (exclusive), or with
    ``reverse`` oldest first from ``offset_id`` (inclusive: each page is the window above it,
    ``add_offset=-limit``); at most ``limit`` messages.

    Iteration ends on Telethon's stop rules: an answer that is not a slice, an empty page, an
    id out of order, ids already down to the page size, or ``limit`` messages yielded. A page
    may be empty (its ``total`` still counts). A request that raises (FloodWait, a dropped
    connection) leaves the iterator where it was; ``total`` is the last answer's count.
    """

    __slots__ = ("_call", "done", "last_id", "left", "request", "reverse", "total")

    def __init__(
        self,
        call: Call,
        peer: Any,
        *,
        offset_id: int,
        reverse: bool = False,
        limit: int | None = None,
    ) -> None:
        self._call = call
        self.reverse = reverse
        self.left: float = math.inf if limit is None else max(limit, 0)
        self.last_id: float = 0 if reverse else math.inf
        self.total: int | None = None
        self.done = self.left <= 0
        page = int(min(self.left, PAGE_LIMIT))
        self.request = functions.messages.GetHistoryRequest(
            peer=peer,
            offset_id=offset_id,
            offset_date=None,
            add_offset=-page if reverse else 0,
            limit=page,
            max_id=0,
            min_id=0,
            hash=0,
        )

    def __aiter__(self) -> HistoryPages:
        return self

    async def __anext__(self) -> HistoryPage:
        if self.done:
            raise StopAsyncIteration
        response = await self._call(self.request)
        self.total = total = getattr(response, "count", len(response.messages))
        return HistoryPage(self._take(response), total, response)

    def _take(self, response: Any) -> list[Any]:
        """The messages of ``response`` to yield, in order; moves the request to the next page
        or sets ``done``."""
        request, reverse = self.request, self.reverse
        raw = response.messages
        kept: list[Any] = []
        last_id = self.last_id
        for msg in reversed(raw) if reverse else raw:
            if isinstance(msg, types.MessageEmpty):
                continue
            mid = msg.id
            if (mid <= last_id) if reverse else (mid >= last_id):
                self.done = True
                break
            last_id = mid
            kept.append(msg)
        self.last_id = last_id
        if len(kept) >= self.left:
            del kept[int(self.left) :]
            self.done = True
        self.left -= len(kept)
        if self.done:
            return kept
        if (
            isinstance(response, types.messages.Messages)
            or not raw
            or (not reverse and raw[0].id <= request.limit)
            or not kept
        ):
            self.done = True
            return kept
        last = kept[-1]
        request.offset_id = last.id + 1 if reverse else last.id
        request.offset_date = last.date
        page = int(min(self.left, PAGE_LIMIT))
        request.limit = page
        if reverse:
            request.add_offset = -page
        return kept

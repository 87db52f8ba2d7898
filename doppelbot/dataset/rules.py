"""The per-message rules: what a message becomes in the dataset, or why it is dropped.

One message is either dropped (service, forwarded, media-only, empty, link, too few letters,
too long) or cleaned: a sticker becomes its emoji, PII is scrubbed, a long message may be
truncated. The same cleaner serves the dataset builder (over a million rows, so its hot path
is a closure over plain tuples with the cheap tests first) and the responder's live context.

Rows are ``(message_id, is_outgoing, date, text, reply_to_message_id, kind)``; ``kind`` is one
of the ``KIND_*`` codes, computed in SQL for stored history (``store.dataset_reads``, from these
codes) and by ``rule_row`` for ``domain.Message`` objects.
A transcribed voice or round-video note is a text row holding what it said
(``domain.voice_message_text``), in both paths.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from doppelbot.core.domain import (
    KIND_FORWARDED,
    KIND_MEDIA,
    KIND_SERVICE,
    KIND_STICKER,
    KIND_TEXT,
    KIND_WEBPAGE,
    MediaKind,
    Message,
    Peer,
    PeerKind,
    Row,
    voice_message_text,
)
from doppelbot.dataset.scrub import Scrubber, has_link

if TYPE_CHECKING:
    from doppelbot.dataset.options import DatasetOptions


def rule_row(m: Message) -> Row:
    """A ``domain.Message`` as the row the rules read (the Python twin of the store's SQL,
    ``store.dataset_reads.KIND_SQL``/``TEXT_SQL``)."""
    if m.service_action is not None:
        kind = KIND_SERVICE
    elif m.is_forwarded:
        kind = KIND_FORWARDED
    elif m.media_kind is MediaKind.STICKER:
        kind = KIND_STICKER
    elif m.media_kind is MediaKind.WEBPAGE:
        kind = KIND_WEBPAGE
    elif m.media_kind is not None:
        kind = KIND_MEDIA
    else:
        kind = KIND_TEXT
    text = (m.sticker_emoji or "") if kind == KIND_STICKER else (m.text or "")
    if kind == KIND_MEDIA and m.transcript and m.is_voice_note:
        # as ``dataset_reads.chat_rows`` reads a transcribed note from the store
        kind, text = KIND_TEXT, voice_message_text(text, m.transcript)
    return (m.message_id, int(m.is_outgoing), m.date, text, m.reply_to_message_id, kind)


# --- drop reasons and counters (indexes into one list: cheap to bump in the hot loop) ---------
SERVICE = 0
FORWARDED = 1
MEDIA_ONLY = 2
EMPTY = 3
LINK = 4
LOW_LETTERS = 5
TOO_LONG = 6
TRUNCATED = 7
STICKER_EMOJI = 8

DROP_REASONS = {
    SERVICE: "service",
    FORWARDED: "forwarded",
    MEDIA_ONLY: "media_only",
    EMPTY: "empty",
    LINK: "link",
    LOW_LETTERS: "low_letter_share",
    TOO_LONG: "too_long",
}
N_COUNTERS = 9


def new_counters() -> list[int]:
    return [0] * N_COUNTERS


_NONLETTER_RE = re.compile(r"[\W\d_]+")


def letter_share(text: str) -> float:
    """Letters / non-whitespace characters (1.0 for a text of letters; 0.0 for blank)."""
    nonspace = len("".join(text.split()))
    if not nonspace:
        return 0.0
    return len(_NONLETTER_RE.sub("", text)) / nonspace


def truncate_text(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters at a word boundary, never inside a placeholder."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    if space >= limit // 2:
        cut = cut[:space]
    lt = cut.rfind("<")
    if lt > cut.rfind(">"):
        cut = cut[:lt]
    return cut.rstrip()


Cleaner = Callable[[str, int], "tuple[str, str] | None"]


def make_cleaner(
    options: DatasetOptions, counters: list[int], scrubber: Scrubber | None
) -> Cleaner:
    """``clean(text, kind) -> (text, norm) | None``; bumps ``counters`` for every drop.

    ``norm`` is the text's letters, lower-cased: the near-duplicate key. Messages of plain
    words and common punctuation (most chat lines) take a fast path that needs no regex: if
    removing spaces and punctuation leaves only letters, the text holds no digits, ``@`` or
    links, so there is nothing to scrub and the letter share is a ratio of two lengths.
    """
    max_chars = options.max_message_chars
    truncate = options.long_message_policy == "truncate"
    drop_links = options.drop_links
    drop_forwarded = options.drop_forwarded
    stickers = options.stickers_as_emoji
    share = options.min_letter_share
    # the fast path skips the scrubber: only sound when it would change nothing
    fast_ok = scrubber is None or scrubber.names is None
    dot_fast = drop_links or scrubber is None or not scrubber.urls
    nonletter_sub = _NONLETTER_RE.sub
    c = counters

    def clean(text: str, kind: int) -> tuple[str, str] | None:
        if kind:
            if kind == KIND_SERVICE:
                c[SERVICE] += 1
                return None
            if kind == KIND_FORWARDED:
                if drop_forwarded:
                    c[FORWARDED] += 1
                    return None
            elif kind == KIND_STICKER:
                if stickers and text:
                    c[STICKER_EMOJI] += 1
                    return text, text
                c[MEDIA_ONLY] += 1
                return None
            elif kind == KIND_WEBPAGE and drop_links:
                c[LINK] += 1
                return None
            if not text:
                c[MEDIA_ONLY] += 1
                return None
        elif not text:
            c[EMPTY] += 1
            return None
        long = len(text) > max_chars
        if long and not truncate:
            c[TOO_LONG] += 1
            return None
        if fast_ok and not long:
            core = text.replace(" ", "")
            if core.isalpha():  # words and spaces: no dot, no "://", so no link either
                return text, core.lower()
        if drop_links and ("." in text or "://" in text) and has_link(text):
            c[LINK] += 1
            return None
        if fast_ok and not long:
            # the punctuation of most chat lines; rarer symbols take the regex path below
            letters = core.replace(",", "").replace("?", "").replace("!", "").replace(")", "")
            if dot_fast:
                letters = letters.replace(".", "")
            if letters.isalpha():
                if len(letters) < share * len(core):
                    c[LOW_LETTERS] += 1
                    return None
                return text, letters.lower()
        if scrubber is not None:
            text = scrubber(text)
        if long:
            text = truncate_text(text, max_chars)
            c[TRUNCATED] += 1
        letters = nonletter_sub("", text)
        nonspace = len("".join(text.split()))
        if not nonspace:
            c[EMPTY] += 1
            return None
        if len(letters) < share * nonspace:
            c[LOW_LETTERS] += 1
            return None
        return text, (letters.lower() or text)

    return clean


def make_scrubber(options: DatasetOptions) -> Scrubber | None:
    if not options.scrub_pii:
        return None
    return Scrubber(urls=not options.drop_links)


def chat_skip_reason(
    chat_id: int,
    peer: Peer | None,
    account_id: int | None,
    include_groups: bool,
    other_own: frozenset[int] = frozenset(),
) -> str | None:
    """Why a chat is left out of the dataset (``None``: it is used).

    By default only private chats with people: not bots, not deleted accounts, not Saved
    Messages (everything there is the owner's own), not chats with the owner's other own
    accounts (``other_own``: their user ids; both sides are the owner). A chat without a peer
    row is judged by its marked id (positive = a user).
    """
    if account_id is not None and chat_id == account_id:
        return "saved_messages"
    if chat_id in other_own:
        return "own_account"
    if peer is None:
        return None if chat_id > 0 or include_groups else "group"
    if peer.is_self:
        return "saved_messages"
    if peer.kind is PeerKind.BOT or peer.is_bot:
        return "bot"
    if peer.kind in (PeerKind.GROUP, PeerKind.CHANNEL):
        return None if include_groups else peer.kind.value
    if peer.is_deleted:
        return "deleted"
    return None

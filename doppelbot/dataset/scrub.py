"""PII scrubbing: phone numbers, emails, card numbers, URLs (and optionally names) become
typed placeholders such as ``<PHONE>``.

The training set must not teach the model anybody's phone number or card, and it must not keep
them on disk in a second place. Each kind has its own pattern, applied in an order that keeps
them from eating each other (emails before URLs, URLs before digits, cards before phones), and
each pass is guarded by a cheap character test so ordinary chat lines cost almost nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PHONE = "<PHONE>"
EMAIL = "<EMAIL>"
CARD = "<CARD>"
URL = "<URL>"
NAME = "<NAME>"

PLACEHOLDERS = (PHONE, EMAIL, CARD, URL, NAME)

# Common top-level domains for links written without a scheme ("vk.com/id1", "ya.ru").
_TLDS = (
    "ru|com|org|net|io|me|su|ua|by|kz|uz|am|ge|az|md|kg|tj|рф|рус|info|biz|co|uk|de|fr|it|es|"
    "pl|nl|be|ch|at|cz|tv|fm|app|dev|ai|gg|ly|to|cc|xyz|online|site|store|shop|pro|edu|gov|us|"
    "eu|ca|jp|cn|in|link|club|top|space|tech|website|live|news|page|im|sh|so|ws|gl|ms"
)

URL_RE = re.compile(
    r"\b[a-z][a-z0-9+.\-]{1,15}://[^\s<>\"']+"
    r"|\bwww\.[^\s<>\"']+"
    rf"|(?<![@.\w\-])(?:[\w\-]+\.)+(?:{_TLDS})(?![\w\-])(?:[/?#][^\s<>\"']*)?",
    re.IGNORECASE,
)
_TLD_VARIANTS = "|".join(
    dict.fromkeys(v for t in _TLDS.split("|") for v in (t, t.upper(), t.capitalize()))
)
# a cheap pre-test for bare domains: a literal dot first lets the regex engine skip ahead
_DOT_TLD_RE = re.compile(rf"\.(?:{_TLD_VARIANTS})(?![\w\-])")
# cheaper still: every TLD starts with a letter, so a text whose dots are all followed by a
# space, punctuation or the end ("ну.", "да...") cannot match ``_DOT_TLD_RE`` at all
_DOT_LETTER_RE = re.compile(r"\.[^\W\d_]")
EMAIL_RE = re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+")
_DIGIT_RE = re.compile(r"\d")
# 13–19 digits with optional single space/dash separators; validated in ``_card``.
_CARD_RE = re.compile(r"(?<!\d)\d(?:[ \-]?\d){12,18}(?!\d)")
_CARD_GROUPS_RE = re.compile(
    r"\d{4}(?:[ \-]\d{4}){2,3}(?:[ \-]\d{1,7})?"  # 4-4-4-4(-x)
    r"|\d{4}[ \-]\d{6}[ \-]\d{4,5}"  # 4-6-5 (Amex) and 4-6-4 (Diners)
)
_PHONE_RE = re.compile(
    # Russian numbers with a country/trunk prefix: +7 (916) 123-45-67, 8 916 1234567, 79161234567
    r"(?<![\d+])(?:\+\s?7|8|7)[\s\-]?\(?\s?\d{3}\s?\)?[\s\-]?\d{3}[\s\-]?\d{2}[\s\-]?\d{2}(?!\d)"
    # international with + or 00: +44 20 7946 0958, +1 (415) 555-2671, 0049 30 1234567
    r"|(?<![\d+])(?:\+|00)\s?\d{1,3}(?:[\s\-.]?\(?\d{1,5}\)?){1,6}(?!\d)"
    # ten digits with an area/mobile code: (916) 123-45-67, 495 123 45 67
    r"|(?<!\d)\(?[3-9]\d{2}\)?[\s\-]?\d{3}[\s\-]?\d{2}[\s\-]?\d{2}(?!\d)"
    # local seven-digit numbers written the usual way: 123-45-67
    r"|(?<!\d)\d{3}-\d{2}-\d{2}(?!\d)"
)

# Russian names decline ("Маша", "Маши", "Машей"): match the stem and any ending.
_STEM_ENDINGS = "аяеоуыиьйюэ"


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(ch for ch in text if "0" <= ch <= "9")


def has_link(text: str) -> bool:
    """Whether ``text`` contains a URL or a bare domain link (the "links" drop rule).

    Most lines have no ``://``, ``www.`` or ``.<tld>`` at all; those are ruled out by substring
    tests and one case-sensitive regex anchored on the dot, before the full ``URL_RE``.
    """
    if "://" in text or "www." in text or "WWW." in text:
        return URL_RE.search(text) is not None
    if "." not in text:
        return False
    # dots that only end the text ("ну.", "да...") are followed by nothing
    trimmed = text.rstrip(".")
    if "." not in trimmed or _DOT_LETTER_RE.search(trimmed) is None:
        return False
    if _DOT_TLD_RE.search(text) is None:
        return False
    return URL_RE.search(text) is not None


def name_pattern(names: Iterable[str | None]) -> re.Pattern[str] | None:
    """A pattern for a person's first/last names (declined forms too) and @username."""
    alternatives: set[str] = set()
    for raw in names:
        if not raw:
            continue
        for part in re.split(r"[\s\-]+", raw.strip().lstrip("@")):
            if len(part) < 2 or not any(ch.isalpha() for ch in part):
                continue
            low = part.lower()
            if len(low) >= 4 and low[-1] in _STEM_ENDINGS:
                alternatives.add(re.escape(low[:-1]) + r"\w*")
            elif len(low) >= 3:
                alternatives.add(re.escape(low) + r"\w*")
            else:
                alternatives.add(re.escape(low) + r"(?!\w)")
    if not alternatives:
        return None
    body = "|".join(sorted(alternatives, key=lambda a: (-len(a), a)))
    return re.compile(rf"(?<![\w@])@?(?:{body})", re.IGNORECASE)


class Scrubber:
    """Replaces PII in one text; counts what it replaced (for the dataset stats).

    ``urls=False`` skips the URL pass: the builder drops messages with links before scrubbing,
    so it would find nothing there.
    """

    __slots__ = ("counts", "names", "urls")

    def __init__(self, *, urls: bool = True, names: re.Pattern[str] | None = None) -> None:
        self.urls = urls
        self.names = names
        self.counts = {"email": 0, "url": 0, "card": 0, "phone": 0, "name": 0}

    def with_names(self, names: re.Pattern[str] | None) -> Scrubber:
        """A scrubber sharing this one's counters, for one chat's names."""
        other = Scrubber(urls=self.urls, names=names)
        other.counts = self.counts
        return other

    def __call__(self, text: str) -> str:
        counts = self.counts
        if "@" in text:
            text, n = EMAIL_RE.subn(EMAIL, text)
            counts["email"] += n
        if self.urls and ("://" in text or "." in text):
            text, n = URL_RE.subn(URL, text)
            counts["url"] += n
        if _DIGIT_RE.search(text) is not None:
            text = _CARD_RE.sub(self._card, text)
            text = _PHONE_RE.sub(self._phone, text)
        if self.names is not None:
            text, n = self.names.subn(NAME, text)
            counts["name"] += n
        return text

    def _card(self, match: re.Match[str]) -> str:
        found = match.group()
        digits = _digits(found)
        if luhn_ok(digits) or _CARD_GROUPS_RE.fullmatch(found):
            self.counts["card"] += 1
            return CARD
        return found

    def _phone(self, match: re.Match[str]) -> str:
        found = match.group()
        digits = len(_digits(found)) - (2 if found.startswith("00") else 0)  # 00 = "+"
        if not 7 <= digits <= 15:
            return found
        self.counts["phone"] += 1
        return PHONE


def scrub(text: str, *, urls: bool = True, names: re.Pattern[str] | None = None) -> str:
    """One-off scrubbing of ``text`` (see ``Scrubber`` for repeated use)."""
    return Scrubber(urls=urls, names=names)(text)

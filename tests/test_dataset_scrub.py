"""PII scrubbing: hand-made cases and generated phones, emails and card numbers."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from doppelbot.dataset.scrub import Scrubber, has_link, luhn_ok, name_pattern, scrub


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("звони +7 (916) 123-45-67", "звони <PHONE>"),
        ("звони 8 916 123 45 67!", "звони <PHONE>!"),
        ("89161234567 или 8-916-123-45-67", "<PHONE> или <PHONE>"),
        ("+79161234567,9161234567", "<PHONE>,<PHONE>"),
        ("тел:123-45-67", "тел:<PHONE>"),
        ("London +44 20 7946 0958", "London <PHONE>"),
        ("US +1 (415) 555-2671", "US <PHONE>"),
        ("0049 30 1234567", "<PHONE>"),
        ("карта 4111 1111 1111 1111", "карта <CARD>"),
        ("карта 4111-1111-1111-1111.", "карта <CARD>."),
        ("5500000000000004", "<CARD>"),
        ("4276 1234 5678 9012", "<CARD>"),  # grouped like a card (Luhn fails)
        ("почта ivan.petrov+x@mail.ru ок", "почта <EMAIL> ок"),
        ("см https://t.me/joinchat/abc и vk.com/id1", "см <URL> и <URL>"),
        ("в 2023 году, 12.05.2023, стоило 1 500 000", None),  # dates and sums stay
        ("заказ 1234567890123", None),  # 13 digits, neither Luhn nor grouped
        ("в 10:30 у дома 15", None),
    ],
)
def test_scrub_cases(text: str, expected: str | None) -> None:
    assert scrub(text) == (text if expected is None else expected)


def test_counts_and_url_switch() -> None:
    s = Scrubber(urls=False)
    assert s("ya.ru и a@b.ru и +7 916 123 45 67") == "ya.ru и <EMAIL> и <PHONE>"
    assert s.counts == {"email": 1, "url": 0, "card": 0, "phone": 1, "name": 0}


def test_has_link() -> None:
    assert has_link("https://example.com")
    assert has_link("ЗАХОДИ НА SITE.RU")
    assert has_link("www.example.org/path")
    assert not has_link("привет. как дела?")
    assert not has_link("пиши на ivan@mail.ru")
    assert not has_link("версия 1.2.3")


def test_names() -> None:
    pattern = name_pattern(["Мария", "Петрова", "masha_p", None])
    s = Scrubber(names=pattern)
    assert s("Мария, привет! Марии нет, @masha_p в курсе, Петровой тоже") == (
        "<NAME>, привет! <NAME> нет, <NAME> в курсе, <NAME> тоже"
    )
    assert s("марафон") == "марафон"
    assert name_pattern([None, ""]) is None
    assert Scrubber(names=name_pattern(["Ян"]))("Ян и Яна, январь") == "<NAME> и Яна, январь"


def test_luhn() -> None:
    assert luhn_ok("4111111111111111")
    assert not luhn_ok("4111111111111112")


# --- generated PII never survives --------------------------------------------------------------
_WORDS = st.lists(
    st.text(alphabet="абвгдежзиклмнопрстуфхцчшщэюяabcdefxyz", min_size=1, max_size=8),
    min_size=0,
    max_size=4,
).map(" ".join)
_D = st.integers(0, 9).map(str)


def _digits(n: int) -> st.SearchStrategy[str]:
    return st.lists(_D, min_size=n, max_size=n).map("".join)


@st.composite
def ru_phone(draw: st.DrawFn) -> str:
    code = draw(st.sampled_from(["9", "4", "8", "3"])) + draw(_digits(2))
    num = draw(_digits(7))
    a, b, c = num[:3], num[3:5], num[5:]
    fmt = draw(st.integers(0, 6))
    return [
        f"+7{code}{num}",
        f"8{code}{num}",
        f"+7 ({code}) {a}-{b}-{c}",
        f"8 ({code}) {a}-{b}-{c}",
        f"8-{code}-{a}-{b}-{c}",
        f"+7 {code} {a} {b} {c}",
        f"{code} {a}-{b}-{c}" if code[0] != "8" else f"8{code}{num}",
    ][fmt]


@st.composite
def intl_phone(draw: st.DrawFn) -> str:
    cc = draw(st.sampled_from(["1", "44", "49", "33", "380", "375", "86"]))
    groups = draw(st.lists(st.integers(2, 4), min_size=2, max_size=4))
    parts = [draw(_digits(n)) for n in groups]
    sep = draw(st.sampled_from([" ", "-", ""]))
    prefix = draw(st.sampled_from(["+", "00"]))
    digits = len(cc) + sum(groups)
    if digits < 8:
        parts.append(draw(_digits(8 - digits)))
    if len(cc) + sum(len(p) for p in parts) > 15:
        parts = parts[:2]
    return f"{prefix}{cc} " + sep.join(parts)


@st.composite
def card(draw: st.DrawFn) -> str:
    length = draw(st.integers(13, 19))
    body = draw(_digits(length - 1))
    check = next(d for d in "0123456789" if luhn_ok(body + d))
    number = body + check
    if length == 16 and draw(st.booleans()):
        sep = draw(st.sampled_from([" ", "-"]))
        return sep.join(number[i : i + 4] for i in range(0, 16, 4))
    return number


@st.composite
def email(draw: st.DrawFn) -> str:
    user = draw(
        st.text(alphabet="abcxyz019._+-", min_size=1, max_size=12).filter(lambda u: u[0].isalnum())
    )
    host = draw(
        st.text(alphabet="abcdefghxyz019-", min_size=1, max_size=10).filter(
            lambda h: h[0].isalnum()
        )
    )
    tld = draw(st.sampled_from(["ru", "com", "org", "рф", "io"]))
    return f"{user}@{host}.{tld}"


@settings(max_examples=150, deadline=None)
@given(
    before=_WORDS,
    after=_WORDS,
    pii=st.one_of(ru_phone(), intl_phone(), card()),
    glue=st.sampled_from([" ", ": ", " — ", ", "]),
)
def test_generated_numbers_never_survive(before: str, after: str, pii: str, glue: str) -> None:
    text = f"{before}{glue}{pii} {after}"
    out = scrub(text)
    assert not re.search(r"\d", out), (text, out)


@settings(max_examples=100, deadline=None)
@given(before=_WORDS, after=_WORDS, address=email())
def test_generated_emails_never_survive(before: str, after: str, address: str) -> None:
    out = scrub(f"{before} {address} {after}")
    assert "@" not in out and address not in out

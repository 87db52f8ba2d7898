"""Per-message rules of the dataset builder, one hand-made case per rule."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from doppelbot.config import DatasetSettings, load_settings
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
)
from doppelbot.core.errors import DatasetError
from doppelbot.dataset import rules
from doppelbot.dataset.options import DatasetOptions, dataset_options
from doppelbot.dataset.rules import (
    chat_skip_reason,
    letter_share,
    make_cleaner,
    make_scrubber,
    new_counters,
    rule_row,
    truncate_text,
)

OPTS = DatasetOptions()


def cleaner(options: DatasetOptions = OPTS):
    counters = new_counters()
    return make_cleaner(options, counters, make_scrubber(options)), counters


def reason(counters: list[int]) -> str | None:
    hit = [rules.DROP_REASONS[i] for i in rules.DROP_REASONS if counters[i]]
    assert len(hit) <= 1
    return hit[0] if hit else None


@pytest.mark.parametrize(
    ("text", "kind", "why"),
    [
        ("звонок", KIND_SERVICE, "service"),
        ("пересланное", KIND_FORWARDED, "forwarded"),
        ("", KIND_MEDIA, "media_only"),
        ("", KIND_STICKER, "media_only"),  # a sticker without an emoji
        ("смотри", KIND_WEBPAGE, "link"),
        ("", KIND_TEXT, "empty"),
        ("   ", KIND_TEXT, "empty"),
        ("глянь https://example.com/a", KIND_TEXT, "link"),
        ("глянь www.example.org", KIND_TEXT, "link"),
        ("вот vk.com/id1 мой", KIND_TEXT, "link"),
        ("сайт ya.ru", KIND_TEXT, "link"),
        ("))))", KIND_TEXT, "low_letter_share"),
        ("123 456 789", KIND_TEXT, "low_letter_share"),
        ("😂😂😂", KIND_TEXT, "low_letter_share"),
        ("ок!!!!!", KIND_TEXT, "low_letter_share"),
        ("а" * 201, KIND_TEXT, "too_long"),
    ],
)
def test_drop_rules(text: str, kind: int, why: str) -> None:
    clean, counters = cleaner()
    assert clean(text, kind) is None
    assert reason(counters) == why


@pytest.mark.parametrize(
    "text",
    [
        "привет как дела",
        "привет, как дела? что нового!",
        "ну да. а ты как",
        "давай в 7",  # 5 letters of 7 non-space characters
        "ок)",
        "Hello there, General Kenobi",
        "а" * 200,
        "почта ivan.petrov@mail.ru",  # an email is scrubbed, not a link
    ],
)
def test_kept(text: str) -> None:
    clean, counters = cleaner()
    kept = clean(text, KIND_TEXT)
    assert kept is not None
    assert reason(counters) is None


def test_sticker_becomes_its_emoji_and_media_caption_is_text() -> None:
    clean, counters = cleaner()
    assert clean("😂", KIND_STICKER) == ("😂", "😂")
    assert counters[rules.STICKER_EMOJI] == 1
    kept = clean("фото с моря", KIND_MEDIA)
    assert kept is not None and kept[0] == "фото с моря"
    no_stickers, _ = cleaner(replace(OPTS, stickers_as_emoji=False))
    assert no_stickers("😂", KIND_STICKER) is None


def test_letter_share_is_letters_over_non_whitespace() -> None:
    assert letter_share("абв где") == 1.0
    assert letter_share("аб 12") == 0.5
    assert letter_share("   ") == 0.0
    assert letter_share("ok!!") == 0.5
    clean, _ = cleaner()
    assert clean("аб 12", KIND_TEXT) is not None  # exactly the threshold is kept
    assert clean("аб 123", KIND_TEXT) is None
    strict, _ = cleaner(replace(OPTS, min_letter_share=0.9))
    assert strict("привет, как дела?", KIND_TEXT) is None


def test_letter_share_counts_scrubbed_text() -> None:
    # a phone would drag the share under 0.5; the placeholder does not
    clean, _ = cleaner()
    kept = clean("мой номер +7 916 123-45-67", KIND_TEXT)
    assert kept is not None and kept[0] == "мой номер <PHONE>"


def test_long_messages_truncate_at_a_word_boundary() -> None:
    opts = replace(OPTS, long_message_policy="truncate", max_message_chars=20)
    clean, counters = cleaner(opts)
    kept = clean("раз два три четыре пять шесть семь", KIND_TEXT)
    assert kept is not None
    assert kept[0] == "раз два три четыре"
    assert counters[rules.TRUNCATED] == 1
    assert truncate_text("abc", 10) == "abc"
    assert truncate_text("aaaa <PHONE>", 9) == "aaaa"  # never half a placeholder
    assert len(truncate_text("x" * 50, 10)) == 10


def test_links_kept_when_rule_off_are_scrubbed() -> None:
    clean, _ = cleaner(replace(OPTS, drop_links=False))
    kept = clean("глянь https://example.com/a и ya.ru", KIND_TEXT)
    assert kept is not None and kept[0] == "глянь <URL> и <URL>"
    raw, _ = cleaner(replace(OPTS, drop_links=False, scrub_pii=False))
    assert raw("глянь ya.ru", KIND_TEXT) == ("глянь ya.ru", "гляньyaru")


def test_forwarded_kept_when_rule_off() -> None:
    clean, _ = cleaner(replace(OPTS, drop_forwarded=False))
    assert clean("пересланное", KIND_FORWARDED) == ("пересланное", "пересланное")


def test_norm_ignores_case_punctuation_and_digits() -> None:
    clean, _ = cleaner()
    a = clean("Привет, как дела?", KIND_TEXT)
    b = clean("привет как дела", KIND_TEXT)
    c = clean("привет как дела 2", KIND_TEXT)
    assert a is not None and b is not None and c is not None
    assert a[1] == b[1] == c[1] == "приветкакдела"


def test_message_row_matches_the_sql_kinds() -> None:
    base = Message(chat_id=1, message_id=5, sender_id=1, is_outgoing=True, date=10, text="x")
    assert rule_row(base) == (5, 1, 10, "x", None, KIND_TEXT)
    assert rule_row(replace(base, service_action="call"))[5] == KIND_SERVICE
    assert rule_row(replace(base, is_forwarded=True))[5] == KIND_FORWARDED
    sticker = replace(base, text="", media_kind=MediaKind.STICKER, sticker_emoji="🔥")
    assert rule_row(sticker)[3:] == ("🔥", None, KIND_STICKER)
    assert rule_row(replace(base, media_kind=MediaKind.WEBPAGE))[5] == KIND_WEBPAGE
    assert rule_row(replace(base, media_kind=MediaKind.PHOTO))[5] == KIND_MEDIA
    assert rule_row(replace(base, reply_to_message_id=3))[4] == 3


def test_chat_selection() -> None:
    def peer(kind: PeerKind = PeerKind.USER, **kw: object) -> Peer:
        return Peer(peer_id=5, kind=kind, **kw)  # type: ignore[arg-type]

    assert chat_skip_reason(5, peer(), None, False) is None
    assert chat_skip_reason(5, peer(is_bot=True), None, False) == "bot"
    assert chat_skip_reason(5, peer(PeerKind.BOT), None, False) == "bot"
    assert chat_skip_reason(5, peer(is_deleted=True), None, False) == "deleted"
    assert chat_skip_reason(5, peer(is_self=True), None, False) == "saved_messages"
    assert chat_skip_reason(5, peer(), 5, False) == "saved_messages"
    assert chat_skip_reason(-5, peer(PeerKind.GROUP), None, False) == "group"
    assert chat_skip_reason(-5, peer(PeerKind.GROUP), None, True) is None
    assert chat_skip_reason(-1005, peer(PeerKind.CHANNEL), None, False) == "channel"
    assert chat_skip_reason(7, None, None, False) is None
    assert chat_skip_reason(-7, None, None, False) == "group"


def test_options_validate() -> None:
    with pytest.raises(DatasetError, match="validation_share"):
        DatasetOptions(validation_share=1.5)
    with pytest.raises(DatasetError, match="long_message_policy"):
        DatasetOptions(long_message_policy="shorten")  # type: ignore[arg-type]


def test_options_of_the_settings(tmp_path: Path) -> None:
    settings = load_settings(
        env_file=None, data_dir=tmp_path, session_gap_hours=2.5, max_input_tokens=300
    )
    opts = dataset_options(settings, include_groups=True)
    assert isinstance(opts, DatasetSettings) and opts.session_gap_s == 9000
    assert opts.max_message_chars == 200 and opts.context_max_chars == 500
    assert opts.min_letter_share == 0.5 and opts.long_message_policy == "drop"
    assert opts.max_input_tokens == settings.model.max_input_tokens == 300
    assert opts.prompt is settings.prompt and opts.include_groups
    assert opts.prompt_format is settings.prompt.format  # built once
    with pytest.raises(DatasetError, match="max_input_tokens"):
        dataset_options(settings, max_input_tokens=8)

"""Property tests of the dataset builder over random conversations (hypothesis)."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from doppelbot.config import PromptSettings
from doppelbot.core.domain import MediaKind, Message, Role, Turn
from doppelbot.dataset.builder import build_dataset
from doppelbot.dataset.options import DatasetOptions
from doppelbot.dataset.render import MemoPromptFormat
from tests.dataset_helpers import T0, assert_stats_describe_the_samples, source

H = 3600
FRAGMENTS = [
    "привет",
    "как дела",
    "да",
    "нет",
    "ок)",
    "пойдём в кино?",
    "слушай, а ты где",
    "см https://x.ru",
    "ya.ru",
    "+7 916 123-45-67",
    "ivan@mail.ru",
    "4111 1111 1111 1111",
    "12345",
    "😂",
    "<extra_id_0>",
    "  ",
    "а" * 120,
    "дом\nкот",
]
GAPS = st.sampled_from([1, 30, 600, 3 * H, 3 * H + 1, 20 * H])


@st.composite
def chat(draw: st.DrawFn, chat_id: int) -> list[Message]:
    n = draw(st.integers(1, 40))
    date = T0 + draw(st.integers(0, 10**6))
    out = []
    for i in range(1, n + 1):
        date += draw(GAPS)
        text = " ".join(draw(st.lists(st.sampled_from(FRAGMENTS), min_size=0, max_size=3)))
        kind = draw(st.sampled_from(["text"] * 8 + ["sticker", "photo", "fwd", "service"]))
        extra: dict[str, object] = {}
        if kind == "sticker":
            extra = {"media_kind": MediaKind.STICKER, "sticker_emoji": "🔥"}
            text = ""
        elif kind == "photo":
            extra = {"media_kind": MediaKind.PHOTO}
        elif kind == "fwd":
            extra = {"is_forwarded": True}
        elif kind == "service":
            extra = {"service_action": "call"}
        if i > 1 and draw(st.integers(0, 9)) == 0:
            extra["reply_to_message_id"] = draw(st.integers(1, n))
        out.append(
            Message(
                chat_id=chat_id,
                message_id=i,
                sender_id=None,
                is_outgoing=draw(st.booleans()),
                date=date,
                text=text,
                **extra,  # type: ignore[arg-type]
            )
        )
    return out


CHATS = st.lists(st.integers(1, 10**6), min_size=1, max_size=4, unique=True).flatmap(
    lambda ids: st.tuples(*(chat(i) for i in ids))
)
OPTIONS = st.builds(
    DatasetOptions,
    context_max_chars=st.sampled_from([20, 80, 500]),
    max_message_chars=st.sampled_from([50, 200]),
    long_message_policy=st.sampled_from(["drop", "truncate"]),
    max_contact_share=st.sampled_from([0.3, 0.5, 1.0]),
    validation_share=st.sampled_from([0.0, 0.2]),
    keep_names=st.booleans(),
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(chats=CHATS, options=OPTIONS)
def test_invariants(chats: tuple[list[Message], ...], options: DatasetOptions) -> None:
    result = build_dataset([source(c, names=("Маша",)) for c in chats], options)
    samples = [*result.train, *result.validation]
    by_id = {(m.chat_id, m.message_id): m for c in chats for m in c}
    fmt = options.prompt_format
    for s in samples:
        replies = [by_id[s.chat_id, i] for i in s.reply_message_ids]
        sources = [by_id[s.chat_id, i] for i in s.source_message_ids]
        # every reply is the owner's, and no context message is the other side's reply
        assert replies and all(m.is_outgoing for m in replies)
        assert not set(s.reply_message_ids) & set(s.source_message_ids)
        # nothing after the reply leaks into its context
        assert all(m.date <= s.reply_date for m in sources)
        assert s.reply_date == replies[0].date
        assert s.context_start_date == min(m.date for m in sources)
        # no context crosses a silence longer than the gap
        history = sorted(
            (
                m
                for m in chats_of(chats, s.chat_id)
                if s.context_start_date <= m.date <= s.reply_date
            ),
            key=lambda m: (m.date, m.message_id),
        )
        assert all(b.date - a.date <= options.session_gap_s for a, b in pairwise(history))
        # limits hold
        assert len("\n".join(t.text for t in s.context)) <= options.context_max_chars
        if options.long_message_policy == "drop":
            assert all(len(m.text) <= options.max_message_chars for m in replies + sources)
        assert s.context and s.context[-1].role is Role.OTHER
        assert s.model_input == fmt.build_input(s.context)
        assert s.model_target == fmt.build_target(s.reply)
        for text in [s.reply, *(t.text for t in s.context)]:
            assert "ivan@mail.ru" not in text and "916" not in text and "4111" not in text
            assert "https://" not in text
            if not options.keep_names:
                assert "Маша" not in text
    # the time split and the contact cap
    if result.train and result.validation:
        assert max(x.reply_date for x in result.train) <= min(
            x.reply_date for x in result.validation
        )
    if samples and not result.stats.contact_cap_unsatisfiable:
        per: dict[int, int] = {}
        for s in samples:
            per[s.chat_id] = per.get(s.chat_id, 0) + 1
        assert max(per.values()) <= options.max_contact_share * len(samples) + 1e-9
    # the stats describe the samples that came out
    assert_stats_describe_the_samples(result)
    # deterministic
    again = build_dataset([source(c, names=("Маша",)) for c in reversed(chats)], options)
    assert again.train == result.train and again.validation == result.validation


def chats_of(chats: tuple[list[Message], ...], chat_id: int) -> list[Message]:
    return next(c for c in chats if c[0].chat_id == chat_id)


@SETTINGS
@given(
    texts=st.lists(st.text(max_size=30), min_size=0, max_size=6),
    persona=st.sampled_from(["", "Ты — это я.", "  <SC1> персона  "]),
)
def test_memo_format_renders_exactly_like_prompt_format(texts: list[str], persona: str) -> None:
    turns = tuple(Turn(Role.OWNER if i % 2 else Role.OTHER, t) for i, t in enumerate(texts))
    plain = PromptSettings(persona=persona).format
    memo = MemoPromptFormat.of(plain)
    for _ in range(2):  # the second round is served from the memo
        assert memo.build_input(turns) == plain.build_input(turns)
        assert memo.build_input(turns[1:]) == plain.build_input(turns[1:])
    assert memo.build_input(turns, ["факт"]) == plain.build_input(turns, ["факт"])
    assert memo.build_target("ответ") == plain.build_target("ответ")

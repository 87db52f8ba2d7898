"""The dataset builder on hand-made conversations: sessions, turns, context, quality, split."""

from __future__ import annotations

from dataclasses import replace

import pytest

from doppelbot.config import PromptSettings
from doppelbot.core.domain import Role, Sample, Turn
from doppelbot.dataset.builder import build_dataset
from doppelbot.dataset.options import DatasetOptions
from doppelbot.dataset.quality import cap_unsatisfiable, contact_cap, evenly_spaced
from doppelbot.dataset.sessions import build_live_context
from doppelbot.dataset.split import split_by_time, validation_count
from tests.dataset_helpers import T0, conv, source

OPTS = DatasetOptions(validation_share=0.0, max_contact_share=1.0)
H = 3600


def build(*chats, options: DatasetOptions = OPTS, **kw) -> list[Sample]:  # type: ignore[no-untyped-def]
    result = build_dataset([source(c) for c in chats], options, **kw)
    return [*result.train, *result.validation]


def turns(*pairs: tuple[str, str]) -> tuple[Turn, ...]:
    return tuple(Turn(Role.OWNER if who == "me" else Role.OTHER, text) for who, text in pairs)


def test_one_sample_per_owner_turn_with_the_shared_prompt() -> None:
    chat = conv(
        10,
        ("you", "привет"),
        ("me", "привет!"),
        ("you", "как дела?"),
        ("me", "норм, работаю"),
    )
    samples = build(chat)
    assert [s.reply for s in samples] == ["привет!", "норм, работаю"]
    first, second = samples
    assert first.context == turns(("you", "привет"))
    assert second.context == turns(("you", "привет"), ("me", "привет!"), ("you", "как дела?"))
    fmt = OPTS.prompt_format
    assert second.model_input == fmt.build_input(second.context)
    assert second.model_target == fmt.build_target("норм, работаю")
    assert second.source_message_ids == (1, 2, 3)
    assert second.reply_message_ids == (4,)
    assert second.reply_date == chat[3].date
    assert second.context_start_date == chat[0].date
    assert all(s.chat_id == 10 for s in samples)


def test_consecutive_messages_merge_into_turns() -> None:
    chat = conv(10, ("you", "а"), ("you", "бэ"), ("me", "вэ"), ("me", "гэ"), ("you", "дэ"))
    (sample,) = build(chat)
    assert sample.context == turns(("you", "а\nбэ"))
    assert sample.reply == "вэ\nгэ"
    assert sample.source_message_ids == (1, 2) and sample.reply_message_ids == (3, 4)


def test_a_dropped_message_between_same_speaker_messages_does_not_split_a_turn() -> None:
    chat = conv(
        10, ("you", "первое"), ("me", "ссылка https://x.ru"), ("you", "второе"), ("me", "ответ")
    )
    (sample,) = build(chat)
    assert sample.context == turns(("you", "первое\nвторое"))


def test_owner_turn_without_a_question_gives_no_sample() -> None:
    chat = conv(10, ("me", "ты тут?"), ("you", "да"), ("me", "отлично"))
    assert [s.reply for s in build(chat)] == ["отлично"]


def test_sessions_split_at_gaps() -> None:
    chat = conv(
        10,
        ("you", "утро"),
        ("me", "доброе"),
        ("you", "вечер", 3 * H + 1),  # a new session
        ("me", "добрый"),
        ("you", "ночь", 3 * H),  # exactly the gap: same session
        ("me", "спокойной"),
    )
    samples = build(chat)
    assert [s.context for s in samples] == [
        turns(("you", "утро")),
        turns(("you", "вечер")),
        turns(("you", "вечер"), ("me", "добрый"), ("you", "ночь")),
    ]
    hours = replace(OPTS, session_gap_hours=10)
    assert len(build(chat, options=hours)[1].context) == 3


def test_owner_turn_opening_a_session_gives_no_sample() -> None:
    chat = conv(10, ("you", "вопрос"), ("me", "ответ через день", 24 * H), ("you", "ок"))
    assert build(chat) == []


def test_silence_is_measured_over_all_messages() -> None:
    # the photo (dropped) is activity: the session goes on
    chat = conv(
        10,
        ("you", "смотри"),
        ("you", "", 2 * H, {"media_kind": "photo"}),
        ("me", "красиво", 2 * H),
    )
    (sample,) = build(chat)
    assert sample.context == turns(("you", "смотри"))


def test_context_keeps_the_most_recent_turns_that_fit() -> None:
    opts = replace(OPTS, context_max_chars=25)
    chat = conv(
        10,
        ("you", "раз раз раз"),  # 11
        ("me", "два два два"),  # 11
        ("you", "три три три"),  # 11
        ("me", "четыре"),
    )
    sample = build(chat, options=opts)[-1]
    assert sample.context == turns(("me", "два два два"), ("you", "три три три"))
    assert sample.source_message_ids == (2, 3)
    exact = replace(OPTS, context_max_chars=35)  # 11 + 1 + 11 + 1 + 11
    assert len(build(chat, options=exact)[-1].context) == 3


def test_a_too_long_last_turn_keeps_its_newest_messages() -> None:
    opts = replace(OPTS, context_max_chars=25)
    chat = conv(10, ("you", "а" * 20), ("you", "бб"), ("you", "вв"), ("me", "ответ"))
    (sample,) = build(chat, options=opts)
    assert sample.context == turns(("you", "бб\nвв"))
    assert sample.source_message_ids == (2, 3)
    assert sample.context_start_date == chat[1].date
    too_long = conv(10, ("you", "а" * 30), ("me", "ответ"))
    result = build_dataset([source(too_long)], opts)
    assert result.train == [] and result.stats.samples_dropped["context_too_long"] == 1


def _quote_chat() -> list:
    filler = [("you" if i % 2 else "me", f"реплика номер {i}") for i in range(8)]
    return conv(
        10,
        ("you", "поедешь в отпуск?"),
        *filler,
        ("me", "да, в августе", 60, {"reply_to_message_id": 1}),
    )


def test_the_quoted_message_joins_the_context() -> None:
    opts = replace(OPTS, context_max_chars=60)
    chat = _quote_chat()
    sample = build(chat, options=opts)[-1]
    assert sample.reply == "да, в августе"
    assert sample.context[0] == Turn(Role.OTHER, "поедешь в отпуск?")
    assert sample.source_message_ids[0] == 1
    assert sample.context_start_date == chat[0].date
    assert len("\n".join(t.text for t in sample.context)) <= 60
    no_quotes = build(chat, options=replace(opts, include_reply_to=False))[-1]
    assert no_quotes.context[0].text != "поедешь в отпуск?"


def test_a_quote_from_an_earlier_session_needs_the_option() -> None:
    chat = conv(
        10,
        ("you", "поедешь в отпуск?"),
        ("me", "подумаю"),
        ("you", "ну что?", 10 * H),
        ("me", "да, в августе", 60, {"reply_to_message_id": 1}),
    )
    assert build(chat)[-1].context == turns(("you", "ну что?"))
    across = replace(OPTS, reply_to_across_sessions=True)
    assert build(chat, options=across)[-1].context == turns(
        ("you", "поедешь в отпуск?"), ("you", "ну что?")
    )


def test_nothing_after_the_reply_leaks() -> None:
    chat = conv(
        10,
        ("you", "а"),
        ("me", "бэ"),
        ("you", "вэ", 60, {"reply_to_message_id": 5}),  # quotes a *later* message
        ("me", "гэ"),
        ("you", "дэ"),
    )
    for sample in build(chat):
        assert max(sample.source_message_ids) < min(sample.reply_message_ids)
        assert 5 not in sample.source_message_ids


def test_exact_and_near_duplicates_are_dropped() -> None:
    a = conv(10, ("you", "С днём рождения!"), ("me", "Спасибо!"))
    b = conv(11, ("you", "с днём рождения"), ("me", "спасибо)"))
    c = conv(12, ("you", "С днём рождения!"), ("me", "Спасибо!"))
    result = build_dataset([source(x) for x in (c, b, a)], OPTS)
    assert [s.chat_id for s in result.train] == [10]  # the first chat (id order) wins
    assert result.stats.samples_dropped["duplicate_exact"] == 1
    assert result.stats.samples_dropped["duplicate_near"] == 1
    kept = build_dataset([source(x) for x in (a, b, c)], replace(OPTS, dedup_near=False))
    assert len(kept.train) == 2
    everything = replace(OPTS, dedup_near=False, dedup_exact=False)
    assert len(build_dataset([source(x) for x in (a, b, c)], everything).train) == 3


def test_contact_cap() -> None:
    assert contact_cap({1: 40, 2: 10, 3: 10, 4: 10, 5: 10}, 0.25) == 13
    assert contact_cap({1: 10, 2: 10, 3: 10, 4: 10}, 0.25) is None
    assert contact_cap({1: 100, 2: 1}, 0.25) is None
    assert cap_unsatisfiable({1: 100, 2: 1}, 0.25)
    assert evenly_spaced(10, 3) == [0, 3, 6]
    assert evenly_spaced(3, 5) == [0, 1, 2]

    def chat(cid: int, n: int) -> list:
        specs = []
        for i in range(n):
            tag = "абвгд"[cid - 1] * (i + 1)
            specs += [("you", f"вопрос {tag}"), ("me", f"ответ {tag}")]
        return conv(cid, *specs)

    chats = [chat(1, 40), chat(2, 10), chat(3, 10), chat(4, 10), chat(5, 10)]
    result = build_dataset([source(c) for c in chats], replace(OPTS, max_contact_share=0.25))
    samples = result.train
    per = {cid: sum(1 for s in samples if s.chat_id == cid) for cid in range(1, 6)}
    assert per == {1: 13, 2: 10, 3: 10, 4: 10, 5: 10}
    assert max(per.values()) <= 0.25 * len(samples)
    assert result.stats.samples_dropped["contact_cap"] == 27
    kept_dates = [s.reply_date for s in samples if s.chat_id == 1]
    assert kept_dates[0] == chats[0][1].date  # thinned evenly, from the start


def test_split_by_time() -> None:
    specs = []
    for i in range(20):
        specs += [("you", f"вопрос {'а' * i}"), ("me", f"ответ {'б' * i}")]
    result = build_dataset([source(conv(10, *specs))], replace(OPTS, validation_share=0.1))
    assert len(result.validation) == 2 and len(result.train) == 18
    assert max(s.reply_date for s in result.train) <= min(s.reply_date for s in result.validation)
    assert result.stats.validation_from_date == result.validation[0].reply_date
    assert validation_count(1, 0.5) == 0 and validation_count(3, 0.01) == 1
    assert validation_count(10, 0.0) == 0 and validation_count(2, 0.99) == 1
    train, val = split_by_time(result.train, 0.5)
    assert [s.reply_date for s in [*train, *val]] == sorted(s.reply_date for s in result.train)


def test_stats_count_every_rule() -> None:
    chat = conv(
        10,
        ("you", "привет"),
        ("you", "звонок", 60, {"service_action": "call"}),
        ("you", "фв", 60, {"is_forwarded": True}),
        ("you", "", 60, {"media_kind": "sticker", "sticker_emoji": "😂"}),
        ("you", "", 60, {"media_kind": "voice"}),
        ("me", "https://x.ru"),
        ("me", "))))"),
        ("me", "я" * 300),
        ("me", "мой +7 916 123 45 67"),
    )
    result = build_dataset([source(chat, name="Маша")], OPTS)
    st = result.stats
    assert st.messages_read == 9 and st.messages_kept == 3
    assert st.messages_dropped == {
        "service": 1,
        "forwarded": 1,
        "media_only": 1,
        "empty": 0,
        "link": 1,
        "low_letter_share": 1,
        "too_long": 1,
    }
    assert st.stickers_as_emoji == 1 and st.pii_replaced["phone"] == 1
    (sample,) = result.train
    assert sample.context == turns(("you", "привет\n😂")) and sample.reply == "мой <PHONE>"
    assert st.per_chat[10].samples == 1 and st.per_chat[10].name == "Маша"
    data = st.to_dict()
    assert data["per_chat"][0]["chat_id"] == 10 and data["samples"] == 1
    assert st.rich_tables()  # renders without error


def test_names_are_scrubbed_on_request() -> None:
    chat = conv(10, ("you", "это Маша"), ("me", "привет, Маша! как Петров?"))
    src = source(chat, names=("Маша", "Петрова"))
    kept = build_dataset([src], OPTS).train[0]
    assert kept.reply == "привет, Маша! как Петров?"
    scrubbed = build_dataset([src], replace(OPTS, keep_names=False)).train[0]
    assert scrubbed.context == turns(("you", "это <NAME>"))
    assert scrubbed.reply == "привет, <NAME>! как <NAME>?"


def test_token_budget_with_the_real_tokenizer(tokenizer_dir) -> None:  # type: ignore[no-untyped-def]
    from doppelbot.model.tokenizer import TokenCounter, load_tokenizer

    counter = TokenCounter(load_tokenizer(tokenizer_dir))
    opts = replace(OPTS, max_input_tokens=70, prompt=PromptSettings(persona="Ты — это я."))
    long_turn = "длинное сообщение про всякое разное " * 4
    chat = conv(
        10,
        ("you", long_turn),
        ("me", long_turn),
        ("you", long_turn),
        ("me", "ок"),
        ("you", "зачем? " * 28),  # alone over the budget
        ("me", "затем"),
    )
    result = build_dataset([source(chat)], opts, count_tokens=counter)
    samples = result.train
    assert samples, "some samples must fit"
    for s in samples:
        assert counter(s.model_input) <= 70
        assert s.model_input == opts.prompt_format.build_input(s.context)
    trimmed = [s for s in samples if s.reply == "ок"]
    assert trimmed and len(trimmed[0].context) == 2  # 3 turns are 91 tokens, 2 are 66
    assert trimmed[0].source_message_ids == (2, 3)
    assert trimmed[0].context_start_date == chat[1].date
    assert result.stats.token_trimmed >= 1
    assert result.stats.samples_dropped["input_too_long"] == 1
    assert "затем" not in [s.reply for s in samples]
    no_budget = build_dataset([source(chat)], opts)
    assert any(counter(s.model_input) > 70 for s in no_budget.train)


def test_live_context_uses_the_same_rules() -> None:
    chat = conv(
        10,
        ("you", "старое"),
        ("me", "давно было"),
        ("you", "привет", 5 * H),
        ("me", "привет"),
        ("you", "смотри https://x.ru"),
        ("you", "мой номер +7 916 123 45 67"),
        ("you", "ещё одно", 60, {"date": T0 + 10**6}),  # "in the future"
    )
    now = chat[5].date + 5
    live = build_live_context(chat, now, OPTS)
    assert live == turns(("you", "привет"), ("me", "привет"), ("you", "мой номер <PHONE>"))
    # the dataset sees the same context for the same moment
    reply = conv(10, ("me", "ок", 0, {"date": now, "message_id": 99}))
    (sample,) = [s for s in build(chat[:6] + reply) if s.reply == "ок"]
    assert sample.context == live
    assert build_live_context([], now, OPTS) == ()
    assert build_live_context(chat, chat[0].date - 1, OPTS) == ()


def test_live_context_quotes_and_names() -> None:
    chat = conv(
        10,
        ("you", "Маша спрашивает про отпуск"),
        *[("me" if i % 2 else "you", f"реплика {i} " + "х" * 30) for i in range(6)],
        ("you", "так что?", 60, {"reply_to_message_id": 1}),
    )
    opts = replace(OPTS, context_max_chars=120, keep_names=False)
    live = build_live_context(chat, chat[-1].date, opts, names=["Маша"])
    assert live[0] == Turn(Role.OTHER, "<NAME> спрашивает про отпуск")
    assert live[-1] == Turn(Role.OTHER, "так что?")


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_build_is_deterministic(share: float) -> None:
    specs = []
    for i in range(30):
        specs += [("you", f"вопрос {i % 7}"), ("me", f"ответ {i % 5}", 600 * (i % 3 + 1))]
    chats = [conv(cid, *specs) for cid in (3, 1, 2)]
    opts = replace(OPTS, validation_share=share, max_contact_share=0.4)
    a = build_dataset([source(c) for c in chats], opts)
    b = build_dataset([source(c) for c in reversed(chats)], opts)
    assert a.train == b.train and a.validation == b.validation


def test_gc_state_is_restored() -> None:
    import gc

    chat = conv(10, ("you", "а"), ("me", "б"))
    assert gc.isenabled()
    build(chat)
    assert gc.isenabled()
    gc.disable()
    try:
        build(chat)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_split_by_chat_order_equals_the_full_key() -> None:
    import random

    rng = random.Random(5)
    samples = []
    for chat_id in (3, 7, 9, 12):
        date, mid = T0, 0
        for _ in range(60):
            date += rng.choice((0, 0, 1, 60))  # ties within and across chats
            mid += rng.randint(1, 3)
            samples.append(
                Sample(chat_id, turns(("you", "а")), "б", date, date, (mid - 1,), (mid,))
            )
    for share in (0.0, 0.1, 0.5):
        assert split_by_time(samples, share, by_chat=True) == split_by_time(samples, share)
        shuffled = samples[:]
        rng.shuffle(shuffled)
        assert split_by_time(shuffled, share) == split_by_time(samples, share)


def test_a_speaker_label_inside_a_message_never_becomes_a_turn() -> None:
    chat = conv(
        12,
        ("you", "привет\nЯ: я отдам тебе всё\n собеседник : правда?"),
        ("me", "привет"),
        ("you", "ну\nи как"),  # an ordinary multi-line turn keeps its line break
        ("me", "нормально"),
    )
    first, second = build(chat)
    fmt = OPTS.prompt_format
    dialog = first.model_input.split("Ваш прошлый диалог: \n", 1)[1]
    assert dialog.count("\n") == 0 and dialog.startswith("Собеседник: привет Я: я отдам")
    assert first.model_input == fmt.build_input(first.context)
    assert "Собеседник: ну\nи как" in second.model_input
    assert second.model_input == fmt.build_input(second.context)

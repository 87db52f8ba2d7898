"""Review in Saved Messages end to end: ``doppelbot run``'s own wiring (``serve``) on the real
Telethon client and update loop against the in-process fake Telegram — draft cards, the owner's
answers and reactions, expiry, restarts, owner commands, feedback capture and its export, and
SSA labels given while the bot runs. The model is a scripted generator: these tests are about
the review, and the responder's tests already cover the real model worker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from doppelbot.config import Settings
from doppelbot.core.domain import Reaction, ReplyMode, ReplyStatus, Verdict
from doppelbot.review.commands import HELP_TEXT
from doppelbot.review.drafts import OUTCOME_EXPIRED
from doppelbot.store import bot_state, facts, replies
from doppelbot.store import feedback as fstore
from doppelbot.store.database import Database
from tests.faketg import OWNER_ID, FakeTelegram
from tests.live_harness import Run, Scripted, start_bot
from tests.responder_fakes import fast_settings, wait_for

S = ReplyStatus


@asynccontextmanager
async def review_bot(
    tmp_path: Path, tg: FakeTelegram, gen: Scripted, *, review: bool = True, **overrides: Any
) -> AsyncIterator[Run]:
    """``doppelbot run`` (``serve``) with the review, or — ``review=False`` — the bare
    responder of a run without it (``run_live``), to leave drafts without cards behind."""
    settings = fast_settings(tmp_path, **{"reply_mode": "review", **overrides})
    async with start_bot(tg, settings, gen, review=review, until="quiet") as bot:
        yield bot


async def _one_reply(bot: Run, chat_id: int) -> Any:
    [reply] = await replies.for_chat(bot.db, chat_id)
    return reply


async def test_draft_card_then_ok_sends_once(tmp_path: Path) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice", "Smith")
    async with review_bot(tmp_path, tg, Scripted("да, приду")) as bot:
        tg.push_incoming(alice, "Привет!")
        tg.push_incoming(alice, "Придёшь завтра?")
        await bot.quiet()
        assert bot.sent_to(alice) == []
        [card] = bot.cards()
        reply = await _one_reply(bot, alice.id)
        assert reply.status is S.AWAITING_REVIEW and reply.review_message_id == card.message_id
        assert card.text.splitlines()[:4] == [
            f"🤖 Draft #{reply.reply_id} — Alice Smith",
            "› Привет!",
            "› Придёшь завтра?",
            "",
        ]
        assert "✍️ Draft: да, приду" in card.text and "Expires in 60 min" in card.text

        status = await bot.owner_says("/status", reply_to=card.message_id)  # not a correction
        assert bot.sent_to(alice) == []
        assert bot.answers_to(status)[0].startswith("▶️ Active\nDefault mode: review")

        await bot.owner_says("ok", reply_to=card.message_id)
        assert bot.sent_to(alice) == ["да, приду"]
        assert (await replies.get(bot.db, reply.reply_id)).status is S.SENT  # type: ignore[union-attr]
        assert bot.card_text(card.message_id).endswith("✅ Sent.")
        [verdict] = await fstore.verdicts_for(bot.db, reply.reply_id)
        assert (verdict.verdict, verdict.draft_text, verdict.final_text) == (
            Verdict.APPROVED,
            "да, приду",
            "да, приду",
        )
        again = await bot.owner_says("+", reply_to=card.message_id)
        assert bot.sent_to(alice) == ["да, приду"]  # never twice
        assert bot.answers_to(again) == ["Already sent."]


async def test_a_draft_made_stale_by_newer_messages_is_refused_with_the_reason(
    tmp_path: Path,
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    async with review_bot(tmp_path, tg, Scripted("да, приду", "хорошо")) as bot:
        tg.push_incoming(alice, "Придёшь завтра?")
        await bot.quiet()
        [old_card] = bot.cards()
        tg.push_incoming(alice, "ok")  # the other person's "ok" approves nothing …
        await bot.quiet()
        assert bot.sent_to(alice) == []
        old_reply, new_reply = await replies.for_chat(bot.db, alice.id)
        assert new_reply.status is S.AWAITING_REVIEW  # … it is a new message: a new draft
        await bot.owner_says("ok", reply_to=old_card.message_id)
        assert bot.sent_to(alice) == []  # the old draft does not answer "ok": refused
        after = await replies.get(bot.db, old_reply.reply_id)
        assert after is not None and (after.status, after.error) == (S.DROPPED, "stale")
        assert "wrote again after this draft" in bot.card_text(old_card.message_id)
        [verdict] = await fstore.verdicts_for(bot.db, old_reply.reply_id)
        assert verdict.verdict is Verdict.APPROVED  # the owner's judgement is still data
        new_card = bot.cards()[-1]
        assert new_card.message_id == new_reply.review_message_id
        await bot.owner_says("ok", reply_to=new_card.message_id)
        assert bot.sent_to(alice) == ["хорошо"]


async def test_other_text_is_sent_instead_and_the_pair_recorded(tmp_path: Path) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    async with review_bot(tmp_path, tg, Scripted("не знаю")) as bot:
        tg.push_incoming(alice, "во сколько будешь?")
        await bot.quiet()
        [card] = bot.cards()
        await bot.owner_says("буду в восемь", reply_to=card.message_id)
        assert bot.sent_to(alice) == ["буду в восемь"]
        reply = await _one_reply(bot, alice.id)
        assert reply.status is S.SENT and reply.final_text == "буду в восемь"
        [verdict] = await fstore.verdicts_for(bot.db, reply.reply_id)
        assert (verdict.verdict, verdict.draft_text, verdict.final_text) == (
            Verdict.CORRECTED,
            "не знаю",
            "буду в восемь",
        )
        assert "✅ Sent your text instead:\nбуду в восемь" in bot.card_text(card.message_id)


async def test_no_drops_the_draft(tmp_path: Path) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    async with review_bot(tmp_path, tg, Scripted("бред")) as bot:
        tg.push_incoming(alice, "что думаешь?")
        await bot.quiet()
        [card] = bot.cards()
        await bot.owner_says("no", reply_to=card.message_id)
        late = await bot.owner_says("ok", reply_to=card.message_id)
        assert bot.sent_to(alice) == []
        reply = await _one_reply(bot, alice.id)
        assert (reply.status, reply.error) == (S.DROPPED, "rejected")
        assert [v.verdict for v in await fstore.verdicts_for(bot.db, reply.reply_id)] == [
            Verdict.REJECTED
        ]
        assert bot.card_text(card.message_id).endswith("🗑 Dropped — nothing was sent.")
        assert bot.answers_to(late) == ["This draft was dropped — nothing was sent."]


async def test_again_makes_a_new_draft_card(tmp_path: Path) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    gen = Scripted("первый вариант", "второй вариант")
    async with review_bot(tmp_path, tg, gen) as bot:
        tg.push_incoming(alice, "как дела?")
        await bot.quiet()
        [old] = bot.cards()
        await bot.owner_says("again", reply_to=old.message_id)
        old_card, new = bot.cards()
        assert old_card.message_id == old.message_id
        assert "✍️ Draft: второй вариант" in new.text and "› как дела?" in new.text
        assert bot.card_text(old.message_id).endswith("🔄 Replaced by a new draft (below).")
        reply = await _one_reply(bot, alice.id)
        assert reply.review_message_id == new.message_id and reply.draft_text == "второй вариант"
        stale = await bot.owner_says("ok", reply_to=old.message_id)  # the replaced card
        assert bot.sent_to(alice) == []
        assert bot.answers_to(stale) == [
            "This card was replaced by a newer draft — answer the newest card."
        ]
        await bot.owner_says("ok", reply_to=new.message_id)
        assert bot.sent_to(alice) == ["второй вариант"]
        verdicts = await fstore.verdicts_for(bot.db, reply.reply_id)
        assert [(v.verdict, v.draft_text) for v in verdicts] == [
            (Verdict.REGENERATED, "первый вариант"),
            (Verdict.APPROVED, "второй вариант"),
        ]


async def test_drafts_expire_and_a_late_ok_says_so(tmp_path: Path) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    async with review_bot(tmp_path, tg, Scripted("ага"), draft_ttl_minutes=0.005) as bot:
        tg.push_incoming(alice, "ты тут?")
        await bot.quiet()
        [card] = bot.cards()
        await wait_for(lambda: replies.with_status(bot.db, [S.EXPIRED]), 5)
        # The sweep edits the card right after the move (it runs on its own timer).
        await wait_for(lambda: bot.card_text(card.message_id).endswith(OUTCOME_EXPIRED), 5)
        late = await bot.owner_says("ok", reply_to=card.message_id)
        assert bot.sent_to(alice) == []
        assert bot.answers_to(late) == ["⌛ This draft expired — nothing was sent."]
        reply = await _one_reply(bot, alice.id)
        [verdict] = await fstore.verdicts_for(bot.db, reply.reply_id)
        assert verdict.verdict is Verdict.EXPIRED and verdict.draft_text == "ага"


async def test_restart_keeps_drafts_answerable(tmp_path: Path) -> None:
    tg = FakeTelegram()
    alice, bob = tg.add_user("Alice"), tg.add_user("Bob")
    # A run without the review leaves Bob's draft without a card ...
    async with review_bot(tmp_path, tg, Scripted("привет, Боб"), review=False) as bot:
        tg.push_incoming(bob, "привет")
        await bot.quiet()
        assert bot.saved() == []
    # ... a run with it gets Alice's card, then stops ...
    async with review_bot(tmp_path, tg, Scripted("привет, Алиса")) as bot:
        [bob_card] = bot.cards()  # posted at start for the draft left without one
        assert "✍️ Draft: привет, Боб" in bob_card.text
        tg.push_incoming(alice, "привет")
        await bot.quiet()
        alice_card = bot.cards()[-1]
    # ... and after a restart both cards still work.
    async with review_bot(tmp_path, tg, Scripted("-")) as bot:
        assert len(bot.cards()) == 2  # nothing posted twice
        await bot.owner_says("ok", reply_to=alice_card.message_id)
        await bot.owner_says("👍", reply_to=bob_card.message_id)
        assert bot.sent_to(alice) == ["привет, Алиса"]
        assert bot.sent_to(bob) == ["привет, Боб"]


async def test_reaction_on_a_card_approves_it(tmp_path: Path) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    async with review_bot(tmp_path, tg, Scripted("давай")) as bot:
        tg.push_incoming(alice, "созвонимся?")
        await bot.quiet()
        [card] = bot.cards()
        tg.push_reaction(tg.me, card.message_id, "👍", by_owner=True)
        await bot.quiet()
        tg.push_reaction(tg.me, card.message_id, "👍", by_owner=True)  # the same state again
        await bot.quiet()
        assert bot.sent_to(alice) == ["давай"]
        assert len(bot.saved()) == 1  # a repeated reaction is not answered


async def test_owner_commands_work_and_a_strangers_words_do_nothing(tmp_path: Path) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice", username="alice")
    stranger = tg.add_user("Mallory", contact=False)
    # facts_top_k=0: no knowledge base here (test_fact_is_used_without_a_restart covers it).
    async with review_bot(tmp_path, tg, Scripted("ок"), reply_mode="auto", facts_top_k=0) as bot:
        for words in ("/pause", "/mode @alice off", "/fact Я живу в Москве", "/mode off"):
            tg.push_incoming(stranger, words)
            tg.push_incoming(alice, words)
        await bot.quiet()
        assert not await bot_state.is_paused(bot.db)
        assert await bot_state.chat_reply_mode(bot.db, alice.id) is None
        assert await bot_state.global_reply_mode(bot.db) is None
        assert await facts.count_facts(bot.db) == 0
        assert not bot.sent_to(stranger)  # not a contact: not answered at all
        assert all(s.text == "ок" for s in tg.sent if s.chat_id == alice.id)
        assert all(s.text.startswith("🤖 Draft #") for s in bot.saved())  # copies, no answers
        # A command forwarded into Saved Messages is someone else's words too.
        tg.push_outgoing(tg.me, "/pause", fwd_from=stranger)
        await bot.quiet()
        assert not await bot_state.is_paused(bot.db)

        pause = await bot.owner_says("/pause")
        assert await bot_state.is_paused(bot.db)
        assert bot.answers_to(pause) == ["⏸ Paused: no replies anywhere until /resume."]
        status = await bot.owner_says("/status")
        [text] = bot.answers_to(status)
        assert text.startswith("⏸ Paused") and "Default mode: auto" in text
        await bot.owner_says("/resume")
        assert not await bot_state.is_paused(bot.db)

        mode = await bot.owner_says("/mode @Alice review")
        assert await bot_state.chat_reply_mode(bot.db, alice.id) is ReplyMode.REVIEW
        assert bot.answers_to(mode) == ["Mode for Alice: review."]
        await bot.owner_says("/mode off")
        assert await bot_state.global_reply_mode(bot.db) is ReplyMode.OFF
        bad = await bot.owner_says("/mode @nobody off")
        assert bot.answers_to(bad)[0].startswith("⚠️ unknown chat '@nobody'")
        usage = await bot.owner_says("/mode")
        assert bot.answers_to(usage)[0].startswith("⚠️ usage: /mode CHAT")

        fact = await bot.owner_says("/fact Я живу в Казани")
        assert [f.text for f in await facts.list_facts(bot.db)] == ["Я живу в Казани"]
        assert bot.answers_to(fact)[0].startswith("📌 Fact #")
        helped = await bot.owner_says("/help")
        assert bot.answers_to(helped) == [HELP_TEXT]
        note = await bot.owner_says("купить молоко")  # an ordinary note: left alone
        assert bot.answers_to(note) == []

        # The modes are obeyed: Alice's chat is in review now, the default is off.
        before = len(bot.sent_to(alice))
        tg.push_incoming(alice, "ты тут?")
        await bot.quiet()
        assert len(bot.sent_to(alice)) == before
        assert (await replies.for_chat(bot.db, alice.id))[-1].status is S.AWAITING_REVIEW


async def test_reactions_on_sent_replies_are_stored_once_with_the_latest_state(
    tmp_path: Path,
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    async with review_bot(tmp_path, tg, Scripted("ахах"), reply_mode="auto") as bot:
        incoming = tg.push_incoming(alice, "смешно же")
        await bot.quiet()
        [sent] = [s for s in tg.sent if s.chat_id == alice.id]
        mid = sent.message_id
        tg.push_reaction(alice, mid, "👍")
        tg.push_reaction(alice, mid, "👍")  # the same update twice
        await bot.quiet()
        assert await fstore.reactions_for(bot.db, alice.id, mid) == [
            Reaction(alice.id, mid, "👍", 1, False)
        ]
        tg.push_reactions_edit(alice, mid, ["❤"])  # changed, delivered as an edit
        await bot.quiet()
        assert await fstore.reactions_for(bot.db, alice.id, mid) == [
            Reaction(alice.id, mid, "❤", 1, False)
        ]
        tg.push_reaction(alice, incoming.id, "🔥")  # not the bot's message: not feedback
        await bot.quiet()
        assert await fstore.reactions_for(bot.db, alice.id, incoming.id) == []
        assert await bot.db.scalar("SELECT count(*) FROM reactions") == 1


async def test_takeover_and_auto_copy_corrections_are_recorded(tmp_path: Path) -> None:
    tg = FakeTelegram()
    alice, bob = tg.add_user("Alice"), tg.add_user("Bob")
    async with review_bot(
        tmp_path, tg, Scripted("может быть"), reply_mode="auto", takeover_minutes=0
    ) as bot:
        tg.push_incoming(alice, "придёшь?")
        await bot.quiet()
        assert bot.sent_to(alice) == ["может быть"]
        [copy] = bot.cards()  # auto mode: a copy of what was sent
        assert "✅ Sent: может быть" in copy.text
        tg.push_outgoing(alice, "точно нет")  # the owner, right after the bot
        tg.push_outgoing(alice, "извини")
        await bot.quiet()
        reply = await _one_reply(bot, alice.id)
        [takeover] = await fstore.verdicts_for(bot.db, reply.reply_id)
        assert (takeover.verdict, takeover.draft_text, takeover.final_text) == (
            Verdict.TAKEOVER,
            "может быть",
            "точно нет\nизвини",
        )
        # Bob answered the bot first: the owner's later message is a new turn, no correction.
        tg.push_incoming(bob, "привет")
        await bot.quiet()
        await bot_state.set_chat_reply_mode(bot.db, bob.id, ReplyMode.OFF)
        tg.push_incoming(bob, "ясно")
        await bot.quiet()
        tg.push_outgoing(bob, "давай потом")
        await bot.quiet()
        bob_reply = (await replies.for_chat(bot.db, bob.id))[0]
        assert await fstore.verdicts_for(bot.db, bob_reply.reply_id) == []
        # A better text as an answer to the copy: a correction, nothing is sent.
        await bot.owner_says("нет, не приду", reply_to=copy.message_id)
        assert bot.sent_to(alice) == ["может быть"]
        verdicts = await fstore.verdicts_for(bot.db, reply.reply_id)
        assert (verdicts[-1].verdict, verdicts[-1].final_text) == (
            Verdict.CORRECTED,
            "нет, не приду",
        )
        assert "✏️ Correction recorded" in bot.card_text(copy.message_id)
        # A 👍 on the copy marks the sent reply good — once, however often the state repeats.
        tg.push_reaction(tg.me, copy.message_id, "👍", by_owner=True)
        tg.push_reactions_edit(tg.me, copy.message_id, ["👍"], by_owner=True)
        await bot.quiet()
        verdicts = await fstore.verdicts_for(bot.db, reply.reply_id)
        assert [v.verdict for v in verdicts].count(Verdict.APPROVED) == 1
        assert bot.sent_to(alice) == ["может быть"]


async def test_feedback_export_from_a_review_session(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from doppelbot.cli import main

    tg = FakeTelegram()
    users = [tg.add_user(name) for name in ("Ann", "Ben", "Cat", "Dan")]
    gen = Scripted("черновик")
    async with review_bot(tmp_path, tg, gen) as bot:
        for user in users:
            tg.push_incoming(user, f"привет от {user.first_name}")
        await bot.quiet()
        cards = {c.text.split(" — ")[1].split("\n")[0]: c.message_id for c in bot.cards()}
        await bot.owner_says("ok", reply_to=cards["Ann"])
        await bot.owner_says("мой ответ", reply_to=cards["Ben"])
        await bot.owner_says("no", reply_to=cards["Cat"])
        gen.texts = ["второй черновик"]
        await bot.owner_says("again", reply_to=cards["Dan"])
        await bot.owner_says("ok", reply_to=bot.cards()[-1].message_id)
        ann_sent = [s.message_id for s in tg.sent if s.chat_id == users[0].id]
        tg.push_reaction(users[0], ann_sent[0], "❤")
        await bot.quiet()
        settings = bot.settings
    out = tmp_path / "fb"
    base = ["--env-file", "/dev/null", "--data-dir", str(settings.store.data_dir)]
    # The CLI runs its own event loop: a thread, as from a second terminal.
    await asyncio.to_thread(main, [*base, "feedback", "export", "--out", str(out)])

    def rows(name: str) -> set[tuple[str, ...]]:
        lines = (out / name).read_text(encoding="utf-8").splitlines()
        return {
            (r["kind"], r.get("reply") or f"{r['rejected']} → {r['chosen']}")
            for r in map(json.loads, lines)
        }

    # Ann's ❤ confirms a text already approved: one positive row, the reaction is counted.
    assert rows("positives.jsonl") == {
        ("approved", "черновик"),
        ("corrected", "мой ответ"),
        ("approved", "второй черновик"),
    }
    assert rows("pairs.jsonl") == {
        ("corrected", "черновик → мой ответ"),
        ("regenerated", "черновик → второй черновик"),
    }
    assert rows("negatives.jsonl") == {
        ("corrected_away", "черновик"),
        ("rejected", "черновик"),
        ("regenerated_away", "черновик"),
    }
    first = json.loads((out / "positives.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert "привет от" in first["model_input"]  # the exact prompt the draft came from
    capsys.readouterr()
    await asyncio.to_thread(main, [*base, "feedback", "stats", "--json"])
    stats = json.loads(capsys.readouterr().out)
    assert stats["reactions.positive"] == 1 and stats["verdicts.regenerated"] == 1


async def test_ssa_card_answers_are_labels_while_the_bot_runs(tmp_path: Path) -> None:
    from doppelbot.ssa.labels import Candidate
    from doppelbot.store import ssa as ssa_store

    tg = FakeTelegram()
    async with review_bot(tmp_path, tg, Scripted("ок")) as bot:
        card = tg.add_message(tg.me, "🧪 SSA #1 …")  # posted by `doppelbot ssa` meanwhile
        batch = await ssa_store.create_batch(
            bot.db,
            dataset="d",
            seed=1,
            n_contexts=1,
            candidates=[Candidate("1:1", "owner", "ответ")],
            contexts={"1:1": ((("other", "вопрос"),), "<SC1>вопрос")},
        )
        [item] = await ssa_store.items(bot.db, batch)
        await ssa_store.mark_posted(bot.db, item.item_id, card.id)
        bad = await bot.owner_says("ok", reply_to=card.id)
        [hint] = bot.answers_to(bad)
        assert hint.startswith("⚠️ ") and "two marks" in hint
        good = await bot.owner_says("10", reply_to=card.id)
        assert bot.answers_to(good) == []
        row = await bot.db.fetchone(
            "SELECT sensible, specific, raw FROM ssa_labels WHERE item_id = ?", (item.item_id,)
        )
        assert tuple(row) == (1, 0, "10")  # type: ignore[arg-type]
        assert await replies.for_chat(bot.db, OWNER_ID) == []


class FakeKnowledgeBase:
    opened = 0

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.closed = False

    @classmethod
    async def open(cls, settings: Settings, db: Database) -> FakeKnowledgeBase:
        cls.opened += 1
        return cls([f.text for f in await facts.list_facts(db)])

    async def retrieve(self, query: str, **kw: Any) -> list[Any]:
        from doppelbot.core.ports import ScoredFact

        return [ScoredFact(1, text, 0.9) for text in self.texts]

    async def similarity(self, query: str, candidates: Any) -> list[float]:
        return [0.5 for _ in candidates]

    async def aclose(self) -> None:
        self.closed = True


async def test_fact_is_used_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No facts at start: no knowledge base is loaded; the first /fact is used by the next
    reply (the knowledge base opens then, once)."""
    import doppelbot.knowledge.knowledge_base as kb_module

    monkeypatch.setattr(kb_module, "KnowledgeBase", FakeKnowledgeBase)
    FakeKnowledgeBase.opened = 0
    tg = FakeTelegram()
    alice = tg.add_user("Alice")
    gen = Scripted("ок")
    async with review_bot(tmp_path, tg, gen, reply_mode="auto") as bot:
        tg.push_incoming(alice, "где живёшь?")
        await bot.quiet()
        assert FakeKnowledgeBase.opened == 0 and "Казан" not in gen.prompts[-1]
        await bot.owner_says("/fact Я живу в Казани")
        tg.push_incoming(alice, "а точно?")
        await bot.quiet()
        tg.push_incoming(alice, "ну ладно")
        await bot.quiet()
        assert FakeKnowledgeBase.opened == 1
        assert "Я живу в Казани" in gen.prompts[-2] and "Я живу в Казани" in gen.prompts[-1]

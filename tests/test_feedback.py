from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from doppelbot.cli import main
from doppelbot.core.domain import Reaction, ReplyMode, ReplyStatus, Verdict
from doppelbot.feedback.export import build_feedback
from doppelbot.store import feedback as fstore
from doppelbot.store.database import Database

POS = ["👍", "❤"]
NEG = ["👎"]


async def _reply(
    db: Database,
    chat: int,
    status: str,
    mode: str,
    draft: str,
    final: str | None,
    sent: list[int],
    prompt: str = "<SC1>p",
) -> int:
    async with db.transaction() as conn:
        cur = await conn.execute(
            "INSERT INTO replies (account_id, chat_id, status, mode, trigger_message_id, prompt,"
            " draft_text, final_text, sent_message_ids, created_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (conn.account_id, chat, status, mode, 1, prompt, draft, final, json.dumps(sent), 1, 1),
        )
        return int(cur.lastrowid)


async def test_reactions_are_state_not_events(db: Database) -> None:
    rid = await _reply(db, 5, "sent", "auto", "hi", "hi", [100])
    assert rid
    await fstore.set_reactions(db, 5, 100, [Reaction(5, 100, "👍", 1)])
    await fstore.set_reactions(db, 5, 100, [Reaction(5, 100, "👍", 1)])  # same update again
    assert await fstore.reactions_for(db, 5, 100) == [Reaction(5, 100, "👍", 1)]
    await fstore.set_reactions(db, 5, 100, [Reaction(5, 100, "👎", 1)])  # changed their mind
    assert await fstore.reactions_for(db, 5, 100) == [Reaction(5, 100, "👎", 1)]
    await fstore.set_reactions(db, 5, 100, [])
    assert await fstore.reactions_for(db, 5, 100) == []


async def _scenario(db: Database) -> dict[str, int]:
    ids = {}
    ids["approved"] = await _reply(db, 1, "sent", "review", "да, приду", "да, приду", [11])
    await fstore.record_verdict(db, ids["approved"], Verdict.APPROVED, "да, приду", "да, приду")
    ids["corrected"] = await _reply(db, 2, "sent", "review", "не знаю", "приду к восьми", [21])
    await fstore.record_verdict(
        db, ids["corrected"], Verdict.CORRECTED, "не знаю", "приду к восьми"
    )
    ids["rejected"] = await _reply(db, 3, "dropped", "review", "бред", None, [])
    await fstore.record_verdict(db, ids["rejected"], Verdict.REJECTED, "бред", None)
    ids["regen"] = await _reply(db, 4, "sent", "review", "второй", "второй", [41])
    await fstore.record_verdict(db, ids["regen"], Verdict.REGENERATED, "первый", None)
    await fstore.record_verdict(db, ids["regen"], Verdict.APPROVED, "второй", "второй")
    ids["liked"] = await _reply(db, 5, "sent", "auto", "ахах", "ахах", [51])
    await fstore.set_reactions(db, 5, 51, [Reaction(5, 51, "❤", 1)])
    ids["disliked"] = await _reply(db, 6, "sent", "auto", "фу", "фу", [61])
    await fstore.set_reactions(db, 6, 61, [Reaction(6, 61, "👎", 1)])
    ids["plain"] = await _reply(db, 7, "sent", "auto", "ок", "ок", [71])
    ids["takeover"] = await _reply(db, 8, "sent", "auto", "может быть", "может быть", [81])
    await fstore.record_verdict(db, ids["takeover"], Verdict.TAKEOVER, "может быть", "точно нет")
    return ids


async def test_export_rows(db: Database) -> None:
    ids = await _scenario(db)
    result = build_feedback(
        await fstore.feedback_replies(db), positive_emoji=POS, negative_emoji=NEG
    )
    pos = {(p["reply_id"], p["kind"], p["reply"], p["weight"]) for p in result.positives}
    assert pos == {
        (ids["approved"], "approved", "да, приду", 1.0),
        (ids["corrected"], "corrected", "приду к восьми", 1.0),
        (ids["regen"], "approved", "второй", 1.0),
        (ids["liked"], "reaction", "ахах", 1.0),
        (ids["plain"], "sent_unedited", "ок", 0.3),
    }
    assert all(p["model_target"] == f"<extra_id_0>{p['reply']}</s>" for p in result.positives)
    pairs = {(p["reply_id"], p["kind"], p["rejected"], p["chosen"]) for p in result.pairs}
    assert pairs == {
        (ids["corrected"], "corrected", "не знаю", "приду к восьми"),
        (ids["regen"], "regenerated", "первый", "второй"),
        (ids["takeover"], "takeover", "может быть", "точно нет"),
    }
    neg = {(n["reply_id"], n["kind"]) for n in result.negatives}
    assert neg == {
        (ids["corrected"], "corrected_away"),
        (ids["rejected"], "rejected"),
        (ids["regen"], "regenerated_away"),
        (ids["disliked"], "negative_reaction"),
        (ids["takeover"], "taken_over"),
    }
    counts = result.counts()
    assert counts["verdicts.approved"] == 2 and counts["reactions.negative"] == 1


def test_cli_export_and_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"

    async def setup() -> None:
        db = await Database.open(data / "doppelbot.sqlite3")
        await _scenario(db)
        await db.close()

    asyncio.run(setup())
    out = tmp_path / "fb"
    base = ["--env-file", "/dev/null", "--data-dir", str(data)]
    main([*base, "feedback", "export", "--out", str(out)])
    assert "5 positives, 3 preference pairs" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["chosen"] for r in rows} == {"приду к восьми", "второй", "точно нет"}
    assert (data / "feedback" / "latest.txt").read_text().strip() == str(out.resolve())
    main([*base, "feedback", "stats", "--json"])
    stats = json.loads(capsys.readouterr().out)
    assert stats["pairs"] == 3 and stats["positives.sent_unedited"] == 1


def test_statuses_exist() -> None:  # the strings feedback export relies on
    assert ReplyStatus.SENT.value == "sent" and ReplyMode.AUTO.value == "auto"


async def test_export_feeds_the_trainer_and_dpo(db: Database, tmp_path: Path) -> None:
    """The files `feedback export` writes are exactly what `train --method feedback|dpo` reads."""
    from doppelbot.config import PromptSettings
    from doppelbot.dataset.jsonl import write_jsonl
    from doppelbot.training.data import load_feedback
    from doppelbot.training.dpo import load_pairs

    await _scenario(db)
    result = build_feedback(
        await fstore.feedback_replies(db), positive_emoji=POS, negative_emoji=NEG
    )
    write_jsonl(tmp_path / "positives.jsonl", result.positives)
    write_jsonl(tmp_path / "pairs.jsonl", result.pairs)
    write_jsonl(tmp_path / "negatives.jsonl", result.negatives)
    rows, _ = load_feedback(tmp_path / "positives.jsonl", PromptSettings(persona="x").format)
    assert sorted(r.reply for r in rows) == sorted(p["reply"] for p in result.positives)
    assert all(r.model_target.startswith("<extra_id_0>") for r in rows)
    negatives, _ = load_feedback(tmp_path / "negatives.jsonl", PromptSettings(persona="x").format)
    assert negatives == []  # nothing the owner rejected is ever imitated
    pairs = load_pairs(tmp_path / "pairs.jsonl")
    assert {(p.rejected, p.chosen) for p in pairs} == {
        (p["rejected"], p["chosen"]) for p in result.pairs
    }

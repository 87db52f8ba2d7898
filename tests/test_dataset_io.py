"""Dataset files (JSONL, latest pointer), reading the SQLite store, and `doppelbot dataset`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from doppelbot.cli import main
from doppelbot.config import ModelSettings, default_of
from doppelbot.core.domain import Account, MediaKind, Message, Peer, PeerKind, Role, Sample, Turn
from doppelbot.core.errors import DatasetError, StoreError
from doppelbot.dataset import jsonl
from doppelbot.dataset.from_store import build_from_db
from doppelbot.dataset.options import DatasetOptions
from doppelbot.store.accounts import claim
from doppelbot.store.database import Database
from doppelbot.store.history import upsert_messages, upsert_peers
from tests.dataset_helpers import conv

SAMPLE = Sample(
    chat_id=42,
    context=(Turn(Role.OTHER, "привет\nкак ты"), Turn(Role.OWNER, "норм")),
    reply="а ты?",
    reply_date=1_700_000_100,
    context_start_date=1_700_000_000,
    source_message_ids=(1, 2, 3),
    reply_message_ids=(4,),
    model_input="<SC1>…",
    model_target="<extra_id_0>а ты?</s>",
)


def test_jsonl_round_trip_and_field_names(tmp_path: Path) -> None:
    path = tmp_path / "d" / "train.jsonl"
    assert jsonl.write_samples(path, [SAMPLE, replace(SAMPLE, chat_id=7)]) == 2
    assert list(jsonl.read_samples(path)) == [SAMPLE, replace(SAMPLE, chat_id=7)]
    row = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert tuple(row) == jsonl.FIELDS
    assert row["context"] == [
        {"role": "other", "text": "привет\nкак ты"},
        {"role": "owner", "text": "норм"},
    ]
    assert "привет" in path.read_text(encoding="utf-8")  # UTF-8, not \u escapes
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temp files left


def test_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    jsonl.write_samples(path, [SAMPLE])

    def broken():  # type: ignore[no-untyped-def]
        yield SAMPLE
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        jsonl.write_samples(path, broken())
    assert list(jsonl.read_samples(path)) == [SAMPLE]  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]


def test_bad_rows_and_latest(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chat_id": 1}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1"):
        list(jsonl.read_samples(bad))
    with pytest.raises(DatasetError, match="cannot read"):
        list(jsonl.read_samples(tmp_path / "missing.jsonl"))
    with pytest.raises(DatasetError, match="doppelbot dataset"):
        jsonl.latest_dataset_dir(tmp_path)
    jsonl.write_samples(tmp_path / "one" / jsonl.TRAIN_FILE, [SAMPLE])
    jsonl.set_latest(tmp_path, "one")
    assert jsonl.latest_dataset_dir(tmp_path) == tmp_path / "one"
    assert jsonl.resolve_dataset_dir(tmp_path) == tmp_path / "one"
    assert jsonl.resolve_dataset_dir(tmp_path, "one") == tmp_path / "one"
    assert jsonl.resolve_dataset_dir(tmp_path, tmp_path / "one") == tmp_path / "one"
    with pytest.raises(DatasetError):
        jsonl.resolve_dataset_dir(tmp_path, "two")


async def _fill(db: Database) -> None:
    me = 1
    await claim(db, Account(user_id=me, first_name="Я"))
    await upsert_peers(
        db,
        [
            Peer(10, PeerKind.USER, first_name="Маша"),
            Peer(11, PeerKind.BOT, first_name="Бот", is_bot=True),
            Peer(-12, PeerKind.GROUP, title="Группа"),
            Peer(13, PeerKind.USER, first_name="Удалён", is_deleted=True),
            Peer(me, PeerKind.USER, first_name="Я", is_self=True),
        ],
    )
    dialog = [("you", "привет"), ("me", "привет!"), ("you", "как дела?"), ("me", "норм")]
    msgs = conv(10, *dialog)
    # ids out of time order: the reader must sort by date
    msgs.append(Message(10, 100, 10, False, msgs[0].date - 10, "самое первое"))
    msgs.append(
        Message(
            10,
            101,
            None,
            True,
            msgs[3].date + 5,
            "",
            media_kind=MediaKind.STICKER,
            sticker_emoji="👍",
        )
    )
    for chat in (11, -12, 13, me, 14):
        msgs += conv(chat, *dialog)
    await upsert_messages(db, msgs)


async def test_build_from_the_store(db: Database) -> None:
    await _fill(db)
    opts = DatasetOptions(validation_share=0.0, max_contact_share=1.0)
    result = build_from_db(db.path, opts)
    stats = result.stats
    assert stats.chats_total == 6
    assert stats.chats_skipped == {"bot": 1, "group": 1, "deleted": 1, "saved_messages": 1}
    assert sorted({s.chat_id for s in result.train}) == [10, 14]  # 14: no peer row, a user
    masha = [s for s in result.train if s.chat_id == 10]
    assert masha[0].context == (Turn(Role.OTHER, "самое первое\nпривет"),)
    assert masha[0].source_message_ids == (100, 1)
    assert stats.per_chat[10].name == "Маша" and stats.per_chat[10].messages == 6
    groups = build_from_db(db.path, replace(opts, include_groups=True))
    assert -12 in {s.chat_id for s in groups.train}


async def test_empty_store_and_missing_db(db: Database, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="export"):
        build_from_db(db.path, DatasetOptions())
    with pytest.raises(StoreError, match="no database"):
        build_from_db(tmp_path / "nope.sqlite3", DatasetOptions())


def test_cli_dataset(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"

    async def fill() -> None:
        async with await Database.open(data / "doppelbot.sqlite3") as db:
            await _fill(db)

    asyncio.run(fill())
    base = ["--env-file", "/dev/null", "--data-dir", str(data), "dataset"]
    main([*base, "--name", "first", "--tokenizer", str(tokenizer_dir), "--max-contact-share", "1"])
    out = capsys.readouterr().out
    assert "samples" in out and "wrote" in out
    folder = data / "datasets" / "first"
    assert jsonl.latest_dataset_dir(data / "datasets") == folder
    rows = [
        *jsonl.read_samples(folder / "train.jsonl"),
        *jsonl.read_samples(folder / "validation.jsonl"),
    ]
    assert len(rows) == 4 and all(r.model_input.startswith("<SC1>") for r in rows)
    stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    assert stats["stats"]["samples"] == 4 and stats["token_budget"] is True
    budget = default_of(ModelSettings, "max_input_tokens")
    assert stats["options"]["max_input_tokens"] == budget
    assert stats["stats"]["input_tokens_counted"]["max"] <= budget

    with pytest.raises(SystemExit) as exc:
        main([*base, "--name", "first", "--no-token-budget"])
    assert exc.value.code == 1
    assert "already exists" in capsys.readouterr().err
    main([*base, "--name", "first", "--no-token-budget", "--overwrite", "--scrub-names"])
    assert "token budget skipped" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        main([*base, "--tokenizer", str(tmp_path / "no-tokenizer")])
    err = capsys.readouterr().err
    assert "no such folder" in err and "--no-token-budget" in err
    # An empty folder "loads" as a one-token tokenizer: refused, not a silent 0-token budget.
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([*base, "--tokenizer", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert "does not hold FRED-T5's tokenizer" in err and "--tokenizer PATH" in err
    # No --tokenizer: DOPPELBOT_MODEL's hub id, not downloaded here.
    with pytest.raises(SystemExit):
        main([*base])
    err = capsys.readouterr().err
    assert "not downloaded" in err and "doppelbot model download" in err

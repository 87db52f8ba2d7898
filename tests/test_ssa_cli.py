"""``doppelbot ssa start/collect/report`` end to end: a tiny model, the fake Telegram.

The real CLI runs (CliRunner); only the Telethon client factory is pointed at the in-process
fake server, so posting the cards and reading the owner's answers go through Telethon's own
code. The owner's answers are added to Saved Messages as outgoing replies to the cards.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from doppelbot.cli import app
from doppelbot.ssa.flow import CARD_MARK, OWNER_SOURCE
from doppelbot.ssa.labels import SsaLabel, ssa_report, wilson_interval
from doppelbot.store import ssa as store
from doppelbot.store.database import Database
from tests.faketg import OWNER_ID, FakeTelegram
from tests.tiny_model import make_tiny_lora_dir, make_tiny_model_dir
from tests.training_helpers import write_persona_dataset


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("ssa-model") / "model", seed=3)


@pytest.fixture
def env(model_dir: Path, tmp_path: Path) -> dict[str, str]:
    data = tmp_path / "data"
    write_persona_dataset(data / "datasets", n_train=4, n_val=10)
    make_tiny_lora_dir(data / "adapters" / "v0001-sft", model_dir)
    return {
        "DOPPELBOT_MODEL": str(model_dir),
        "DOPPELBOT_DEVICE": "cpu",
        "DOPPELBOT_DATA_DIR": str(data),
        "DOPPELBOT_TORCH_THREADS": "1",
        "DOPPELBOT_MAX_NEW_TOKENS": "5",
        "DOPPELBOT_API_ID": "1",
        "DOPPELBOT_API_HASH": "x",
        "COLUMNS": "200",
    }


@pytest.fixture
def tg(monkeypatch: pytest.MonkeyPatch) -> FakeTelegram:
    fake = FakeTelegram()
    monkeypatch.setattr(
        "doppelbot.telegram.client.create_client", lambda settings, **kw: fake.client()
    )
    return fake


def _invoke(env: dict[str, str], *args: str) -> Any:
    return CliRunner().invoke(app, ["--env-file", "/dev/null", *args], env=env)


def _items(env: dict[str, str]) -> dict[int, store.SsaItem]:
    async def go() -> dict[int, store.SsaItem]:
        db = await Database.open(Path(env["DOPPELBOT_DATA_DIR"]) / "doppelbot.sqlite3")
        try:
            batch = await store.latest_batch_id(db)
            assert batch is not None
            return {i.card_message_id: i for i in await store.items(db, batch)}  # type: ignore[misc]
        finally:
            await db.close()

    return asyncio.run(go())


LABELS = {OWNER_SOURCE: "11", "base": "1 0", "v0001-sft": "нн"}


@pytest.mark.slow
def test_start_collect_report_round_trip(env: dict[str, str], tg: FakeTelegram) -> None:
    # Posting breaks after 5 cards: the batch is kept and `--batch` posts the rest.
    tg.fail_next("SendMessageRequest", ConnectionError("network down"), after=5)
    result = _invoke(
        env,
        "ssa",
        "start",
        "--adapter",
        "base",
        "--against",
        "v0001-sft",
        "--n",
        "4",
        "--seed",
        "7",
    )
    assert result.exit_code != 0
    assert "ssa start --batch 1" in result.output
    assert len(tg.sent) == 5
    result = _invoke(env, "ssa", "start", "--batch", "1")
    assert result.exit_code == 0, result.output
    # 4 contexts × (owner + 2 adapters), each card posted exactly once, to Saved Messages
    assert len(tg.sent) == 12
    assert {s.chat_id for s in tg.sent} == {OWNER_ID}
    assert all(s.text.startswith(CARD_MARK) and "Answer with two marks" in s.text for s in tg.sent)
    items = _items(env)
    assert sorted(items) == sorted(s.message_id for s in tg.sent)
    assert {i.source for i in items.values()} == set(LABELS)
    # blind: the card never names its source
    assert not any("v0001" in s.text or "base" in s.text for s in tg.sent)

    # The owner answers every card; two answers are malformed.
    malformed = {}
    for card_id, item in sorted(items.items()):
        text = LABELS[item.source]
        if item.source == "v0001-sft" and len(malformed) < 2:
            text = "1" if not malformed else "01"
            malformed[card_id] = text
        tg.add_message(tg.me, text, out=True, reply_to=card_id)
    tg.add_message(tg.me, "unrelated note", out=True)

    result = _invoke(env, "ssa", "collect")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "12 answers read, 10 labels stored, 2 malformed" in out
    assert out.count("not read") == 2
    assert "expected two marks" in out  # the "1" answer
    assert "cannot be specific" in out  # the "01" answer
    assert "Answer with two marks" in out  # the syntax hint
    # idempotent: collecting again stores the same labels, nothing doubles
    again = _invoke(env, "ssa", "collect")
    assert "10 of 12 cards labelled" in again.output

    # The owner fixes the malformed ones by answering again; the newest answer wins.
    for card_id in malformed:
        tg.add_message(tg.me, "00", out=True, reply_to=card_id)
    result = _invoke(env, "ssa", "collect")
    assert "12 of 12 cards labelled" in result.output

    result = _invoke(env, "ssa", "report", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["batch"] == 1 and report["items"] == 12 and report["labelled"] == 12
    rows = {r["source"]: r for r in report["sources"]}
    assert [r["source"] for r in report["sources"]] == ["base", "v0001-sft", OWNER_SOURCE]
    assert rows[OWNER_SOURCE]["label"] == "owner (reference)"
    base = rows["base"]["all"]
    assert base["n"] == 4 and base["sensibleness"] == 1 and base["specificity"] == 0
    assert base["ssa"] == 0.5
    low = wilson_interval(0, 4)
    assert base["specificity_ci"] == {"low": low.low, "high": low.high}
    assert rows["v0001-sft"]["all"]["ssa"] == 0 and rows[OWNER_SOURCE]["all"]["ssa"] == 1
    expected = ssa_report([SsaLabel(True, True)] * 4)
    assert rows[OWNER_SOURCE]["all"]["sensibleness_ci"]["low"] == pytest.approx(
        expected.sensibleness_ci.low
    )
    assert rows["base"]["common"]["n"] == 4

    table = _invoke(env, "ssa", "report")
    assert table.exit_code == 0
    assert "owner (reference)" in table.output and "12 of 12 cards labelled" in table.output
    assert "0.50 [" in table.output and "labelled on the same 4 contexts" in table.output


def test_report_and_collect_before_any_batch(env: dict[str, str], tg: FakeTelegram) -> None:
    result = _invoke(env, "ssa", "report")
    assert result.exit_code == 0 and "no labels yet" in result.output
    result = _invoke(env, "ssa", "collect")
    assert result.exit_code == 0 and "ssa start" in result.output
    result = _invoke(env, "ssa", "start", "--adapter", "base", "--against", "base")
    assert result.exit_code != 0

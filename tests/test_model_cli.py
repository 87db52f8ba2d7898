"""``doppelbot chat`` and ``doppelbot model check`` end to end with a tiny model on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from doppelbot.cli import app
from doppelbot.config import PromptSettings
from doppelbot.core.domain import Role, Sample, Turn
from doppelbot.dataset.jsonl import write_samples
from doppelbot.model.check import compare, load_pairs
from tests.tiny_model import make_tiny_model_dir

FMT = PromptSettings(persona="Я.").format


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=5)


@pytest.fixture
def env(model_dir: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "DOPPELBOT_MODEL": str(model_dir),
        "DOPPELBOT_DEVICE": "cpu",
        "DOPPELBOT_DATA_DIR": str(tmp_path / "data"),
        "DOPPELBOT_TORCH_THREADS": "1",
        "DOPPELBOT_MAX_NEW_TOKENS": "6",
    }


def _invoke(args: list[str], env: dict[str, str], stdin: str | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["--env-file", "/dev/null", *args], input=stdin, env=env)


def test_chat_answers_and_keeps_context(env: dict[str, str]) -> None:
    result = _invoke(
        ["chat", "--greedy", "--show-prompt", "--turns", "3"],
        env,
        "привет\n/help\nкак дела?\n/oops\n/reset\nну что?\n/quit\n",
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("Я>") == 3  # one answer per message; /help and /oops never reach it
    assert "/reset — forget the dialogue so far" in out
    assert "unknown command /oops (see /help)" in out
    assert "/help" not in out.split("Собеседник:", 1)[1].split("Твой ответ:")[0]
    assert "(dialogue cleared)" in out
    # the second prompt carries the first exchange as context, the one after /reset does not
    assert out.count("Твой ответ:") == 3
    before, after = out.split("(dialogue cleared)")
    assert before.count("Собеседник: привет") == 2 and "\nЯ: " in before
    assert "привет" not in after and "Собеседник: ну что?" in after
    assert "no adapter" in out and "int8 on cpu" in out


def test_model_check_reports_int8_against_fp32(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "validation.jsonl"
    samples = []
    for i in range(5):
        context = (Turn(Role.OTHER, f"вопрос номер {i}"),)
        samples.append(
            Sample(
                chat_id=1,
                context=context,
                reply=f"ответ {i}",
                reply_date=1000 + i,
                context_start_date=990 + i,
                source_message_ids=(i,),
                reply_message_ids=(100 + i,),
                model_input=FMT.build_input(context),
                model_target=FMT.build_target(f"ответ {i}"),
            )
        )
    write_samples(path, samples)  # the dataset's own row format
    result = _invoke(["model", "check", "--dataset", str(path), "--samples", "3", "--json"], env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["samples"] == 3 and report["tokens"] >= 3 * 4
    assert 0 <= report["top1_agreement"] <= 1 and report["mean_kl"] > 0  # int8 ≠ fp32
    assert report["loss_delta"] == pytest.approx(
        report["loss_candidate"] - report["loss_reference"]
    )
    table = _invoke(["model", "check", "--dataset", str(path), "--samples", "2"], env)
    assert table.exit_code == 0 and "top-1 agreement" in table.output


def test_model_check_refuses_fp32_and_missing_data(env: dict[str, str], tmp_path: Path) -> None:
    result = _invoke(["model", "check", "--dataset", str(tmp_path)], env)
    assert result.exit_code != 0
    fp32 = _invoke(["model", "check"], {**env, "DOPPELBOT_PRECISION": "fp32"})
    assert fp32.exit_code != 0 and "no quantisation" in str(fp32.exception or fp32.output)


def test_compare_is_zero_for_identical_models(tmp_path: Path) -> None:
    logp = [torch.log_softmax(torch.randn(4, 10), -1) for _ in range(2)]
    targets = [[1, 2, 3, 4], [5, 6, 7, 8]]
    same = compare(logp, logp, targets)
    assert same.top1_agreement == 1 and same.mean_kl == pytest.approx(0, abs=1e-6)
    assert same.loss_delta == 0 and same.tokens == 8
    flat = [torch.log_softmax(torch.zeros(4, 10), -1)] * 2
    worse = compare(logp, flat, targets)
    assert worse.mean_kl > 0 and worse.loss_candidate == pytest.approx(
        torch.log(torch.tensor(10.0)).item()
    )
    path = tmp_path / "d.jsonl"
    write_samples(
        path,
        [
            Sample(1, (), f"r{i}", i, i, (), (), model_input=f"i{i}", model_target=f"t{i}")
            for i in range(10)
        ],
    )
    assert [p.model_input for p in load_pairs(path, 3)] == ["i0", "i3", "i6"]

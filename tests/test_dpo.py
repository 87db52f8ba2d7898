"""Preference tuning (DPO) and the preference metrics, on a tiny FRED-T5-shaped model.

The starting policy is a short real SFT run that learned the persona rule of
``training_helpers`` (the reply is a word chosen by the first word of the last message). The
synthetic pairs are the owner's "corrections": for each key the chosen reply is the next key's
word and the rejected one is the word SFT taught, so DPO must move away from its reference.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from doppelbot.config import ModelSettings, PromptSettings
from doppelbot.core.errors import TrainingError, TrainingInterruptedError
from doppelbot.training.dpo import (
    PairRow,
    PreferenceExample,
    collate_pairs,
    dpo_loss,
    load_pairs,
    split_pairs,
)
from doppelbot.training.evaluate import EvalOptions, evaluate_adapters
from doppelbot.training.registry import META_FILE
from doppelbot.training.trainer import TrainResult
from doppelbot.training.trainer import train as run_train
from doppelbot.training.types import IGNORE_INDEX, TrainOptions
from tests.training_helpers import (
    PERSONA,
    RULES,
    TAILS,
    build_tiny_model,
    write_persona_dataset,
)

# --- pure units ---------------------------------------------------------------------------------


def test_dpo_loss_matches_a_hand_computed_value() -> None:
    import torch

    # pair 1: β((−1 − −2) − (−3 − −2)) = 0.5·(1 + 1) = 1   → −log σ(1)  = log(1 + e^−1)
    # pair 2: β((−4 − −3) − (−2 − −3)) = 0.5·(−1 − 1) = −1 → −log σ(−1) = log(1 + e)
    loss, margins = dpo_loss(
        torch.tensor([-1.0, -4.0]),
        torch.tensor([-3.0, -2.0]),
        torch.tensor([-2.0, -3.0]),
        torch.tensor([-2.0, -3.0]),
        beta=0.5,
    )
    assert margins.tolist() == pytest.approx([1.0, -1.0])
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.813262, abs=1e-6)


def test_collate_pairs_puts_chosen_then_rejected_with_references() -> None:
    a = PreferenceExample((5, 6, 7), (8, 2), (9, 9, 2), ref_chosen=-1.5, ref_rejected=-2.5)
    b = PreferenceExample((5,), (4, 2), (3, 2), ref_chosen=-0.5, ref_rejected=-0.25)
    batch = collate_pairs([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0], [5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    pad = IGNORE_INDEX
    assert batch["labels"].tolist() == [[8, 2, pad], [4, 2, pad], [9, 9, 2], [3, 2, pad]]
    assert batch["ref"].tolist() == [-1.5, -0.5, -2.5, -0.25]


def test_load_pairs_skips_useless_rows_and_rejects_broken_ones(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"model_input": "p1", "chosen": "да", "rejected": "нет", "kind": "correction"},
        {"model_input": "p2", "chosen": "same", "rejected": " same "},  # teaches nothing
        {"model_input": "", "chosen": "a", "rejected": "b"},  # no prompt
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "\n")
    assert load_pairs(path) == [PairRow("p1", "да", "нет", "correction")]
    path.write_text('{"model_input": "p", "chosen": "a"}\n')
    with pytest.raises(TrainingError, match="needs model_input, chosen and rejected"):
        load_pairs(path)


def test_heldout_split_is_stable_when_pairs_are_added() -> None:
    rows = [PairRow(f"prompt {i}", f"c{i}", f"r{i}") for i in range(200)]
    train, held = split_pairs(rows, 0.2)
    assert 20 <= len(held) <= 60 and len(train) + len(held) == 200
    assert not {r.key for r in train} & {r.key for r in held}
    more = rows + [PairRow(f"new {i}", "c", "r") for i in range(50)]
    _, held_more = split_pairs(more, 0.2)
    assert {r.key for r in held} <= {r.key for r in held_more}
    # tiny sets still hold one pair out; share 0 holds none
    assert len(split_pairs(rows[:4], 0.0001)[1]) == 1
    assert split_pairs(rows, 0.0) == (rows, [])


# --- DPO on a tiny model ------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    root: Path
    model: Path
    init_adapter: Path
    pairs: Path

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    def options(self, **overrides: object) -> TrainOptions:
        base = TrainOptions(
            model=ModelSettings(base=str(self.model), device="cpu", torch_threads=1),
            prompt=PromptSettings(persona=PERSONA),
            method="dpo",
            pairs=self.pairs,
            init_adapter=self.init_adapter,
            batch_size=8,
            grad_accum=1,
            lr=3e-3,
            dpo_beta=0.1,
            pref_heldout_share=0.25,
            save_steps=4,
            max_steps=24,
            gradient_checkpointing=False,
            lora_dropout=0.0,
        )
        return replace(base, **overrides)

    def train(self, options: TrainOptions, **kwargs: object) -> TrainResult:
        return run_train(
            options,
            datasets_dir=self.datasets_dir,
            runs_dir=self.root / "runs",
            adapters_dir=self.root / "adapters",
            **kwargs,  # type: ignore[arg-type]
        )


KEYS = list(RULES)
CORRECTED = {k: RULES[KEYS[(i + 1) % len(KEYS)]] for i, k in enumerate(KEYS)}


def _write_pairs(path: Path, n: int, seed: int = 3) -> list[PairRow]:
    from doppelbot.core.domain import Role, Turn

    rng = random.Random(seed)
    prompt = PromptSettings(persona=PERSONA).format
    rows = []
    for _ in range(n):
        key = rng.choice(list(RULES))
        text = prompt.build_input([Turn(Role.OTHER, f"{key} {rng.choice(TAILS)}")])
        # The owner corrects the rule SFT taught: the next key's word is now the right one.
        rows.append(PairRow(text, CORRECTED[key], RULES[key], "correction"))
    unique = list({r.key: r for r in rows}.values())
    path.write_text(
        "".join(
            json.dumps(
                {"model_input": r.model_input, "chosen": r.chosen, "rejected": r.rejected},
                ensure_ascii=False,
            )
            + "\n"
            for r in unique
        )
    )
    return unique


def _sha(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> World:
    root = tmp_path_factory.mktemp("dpo")
    model = build_tiny_model(root / "model", tokenizer_dir)
    write_persona_dataset(root / "datasets", n_train=60, n_val=12)
    # The starting point is a real (short) SFT run that has learned the persona rule.
    sft = run_train(
        TrainOptions(
            model=ModelSettings(base=str(model), device="cpu", torch_threads=1),
            prompt=PromptSettings(persona=PERSONA),
            batch_size=12,
            grad_accum=1,
            lr=5e-3,
            max_steps=15,
            save_steps=15,
            gradient_checkpointing=False,
        ),
        datasets_dir=root / "datasets",
        runs_dir=root / "runs",
        adapters_dir=root / "adapters",
    )
    pairs = root / "pairs.jsonl"
    _write_pairs(pairs, 60)
    return World(root, model, sft.adapter_dir, pairs)


@pytest.fixture(scope="module")
def dpo_run(world: World) -> tuple[TrainResult, str]:
    before = _sha(world.init_adapter)
    return world.train(world.options()), before


def _pref_eval(world: World, adapters: list[Path | None], pairs: list[PairRow]) -> list[dict]:
    comparison = evaluate_adapters(
        EvalOptions(  # on the CPU, like the runs whose figures it must reproduce
            model=ModelSettings(base=str(world.model), device="cpu", torch_threads=1),
            eval_max_samples=4,
            metrics=("preference",),
            batch_size=16,
        ),
        adapters,
        datasets_dir=world.datasets_dir,
        extras={
            "pairs": pairs,
            "max_input": world.options().model.max_input_tokens,
            "max_target": world.options().max_target_tokens,
        },
    )
    return [r.metrics for r in comparison.reports]


@pytest.mark.slow
def test_dpo_raises_heldout_margin_and_accuracy(world: World, dpo_run) -> None:  # type: ignore[no-untyped-def]
    result, _ = dpo_run
    m = result.metrics
    assert m["steps"] == 24
    assert m["pref_pairs"] == m["pref_pairs_start"] >= 5
    assert m["pref_margin"] > m["pref_margin_start"] + 1.0, m
    assert m["pref_accuracy"] > m["pref_accuracy_start"], m
    assert m["pref_accuracy_start"] <= 0.5 and m["pref_accuracy"] >= 0.8, m
    assert m["reward_margin"] > 0 and m["reward_margin_start"] == pytest.approx(0, abs=1e-4)

    # `doppelbot eval --pairs` measures the same held-out figures from the saved adapters.
    _, held = split_pairs(load_pairs(world.pairs), 0.25)
    start, end = _pref_eval(world, [world.init_adapter, result.adapter_dir], held)
    assert start["pref_margin"] == pytest.approx(m["pref_margin_start"], abs=1e-3)
    assert end["pref_margin"] == pytest.approx(m["pref_margin"], abs=1e-3)
    assert end["pref_accuracy"] == pytest.approx(m["pref_accuracy"])
    meta = json.loads((result.adapter_dir / META_FILE).read_text())
    assert meta["method"] == "dpo" and meta["settings"]["dpo_beta"] == 0.1


@pytest.mark.slow
def test_reference_stays_frozen(world: World, dpo_run) -> None:  # type: ignore[no-untyped-def]
    result, before = dpo_run
    # The SFT adapter the run started from is untouched on disk…
    assert _sha(world.init_adapter) == before
    assert _sha(result.adapter_dir) != before
    # …and the reference log-probs the loss used are that adapter's, not the base model's nor
    # the trained policy's.
    train_rows, _ = split_pairs(load_pairs(world.pairs), 0.25)
    init, base, trained = _pref_eval(
        world, [world.init_adapter, None, result.adapter_dir], train_rows
    )
    ref_margin = result.metrics["ref_chosen_mean"] - result.metrics["ref_rejected_mean"]
    assert init["pref_margin"] == pytest.approx(ref_margin, abs=1e-3)
    assert abs(base["pref_margin"] - ref_margin) > 1e-2
    assert trained["pref_margin"] > ref_margin + 1.0


@pytest.mark.slow
def test_resumed_dpo_keeps_the_starting_reference(world: World, dpo_run) -> None:  # type: ignore[no-untyped-def]
    straight, _ = dpo_run
    options = world.options(max_steps=6, save_steps=3, run_name="dpo-resume")

    def stop_at_3(event) -> bool:  # type: ignore[no-untyped-def]
        return event.step == 3

    with pytest.raises(TrainingInterruptedError):
        world.train(options, callbacks=[stop_at_3])
    resumed = world.train(options)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    # The reference is recomputed from the starting adapter, not from the restored checkpoint.
    for key in ("ref_chosen_mean", "ref_rejected_mean"):
        assert resumed.metrics[key] == pytest.approx(straight.metrics[key], abs=1e-5)
    assert resumed.metrics["pref_margin_start"] == pytest.approx(
        straight.metrics["pref_margin_start"], abs=1e-5
    )


def test_dpo_without_pairs_is_a_clear_error(world: World) -> None:
    with pytest.raises(TrainingError, match="--pairs"):
        world.train(world.options(pairs=None))


@pytest.mark.slow
def test_eval_cli_adds_preference_metrics(world: World, dpo_run) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from doppelbot.cli import app

    result, _ = dpo_run
    env = {
        "DOPPELBOT_MODEL": str(world.model),
        "DOPPELBOT_DEVICE": "cpu",
        "DOPPELBOT_TORCH_THREADS": "1",
        "DOPPELBOT_EVAL_MAX_SAMPLES": "4",
        "DOPPELBOT_MAX_NEW_TOKENS": "3",
        "DOPPELBOT_PREF_HELDOUT_SHARE": "0.25",
    }
    args = ["--env-file", "/dev/null", "--data-dir", str(world.root), "eval"]
    out = CliRunner().invoke(
        app, [*args, str(result.adapter_dir), "--pairs", str(world.pairs), "--json"], env=env
    )
    assert out.exit_code == 0, out.output
    report = json.loads(out.output[out.output.index("{") :])
    metrics = report["reports"][0]["metrics"]
    assert metrics["pref_accuracy"] == pytest.approx(result.metrics["pref_accuracy"])
    assert metrics["pref_margin"] == pytest.approx(result.metrics["pref_margin"], abs=1e-3)
    assert "loss" in metrics


def test_train_cli_dpo_needs_a_feedback_export(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from doppelbot.cli import app

    args = ["--env-file", "/dev/null", "--data-dir", str(tmp_path), "train"]
    out = CliRunner().invoke(app, [*args, "--method", "dpo"])
    assert out.exit_code != 0 and "feedback export" in str(out.exception)
    out = CliRunner().invoke(app, [*args, "--pairs", str(tmp_path / "p.jsonl")])
    assert out.exit_code != 0 and "--method dpo" in str(out.exception)

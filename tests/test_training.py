"""Fine-tuning end to end on a tiny FRED-T5-shaped model with the real tokenizer.

One module-scoped run learns the persona rule (see ``training_helpers``); the other tests reuse
its model, dataset and adapter. Runs that must be compared step by step (crash, resume) are
short and use their own run folders.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from doppelbot.config import ModelSettings, PromptSettings, StoreSettings
from doppelbot.core.errors import PreflightError, TrainingError, TrainingInterruptedError
from doppelbot.training import checkpoint as ckpt
from doppelbot.training.data import load_dataset
from doppelbot.training.evaluate import METRICS, EvalOptions, evaluate_adapters
from doppelbot.training.registry import META_FILE, heldout_key, read_json
from doppelbot.training.runs import LOG_FILE, PLOT_FILE, RUN_FILE
from doppelbot.training.trainer import TrainResult
from doppelbot.training.trainer import train as run_train
from doppelbot.training.types import TrainOptions
from tests.training_helpers import PERSONA, build_tiny_model, rule_for, write_persona_dataset

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class World:
    data_dir: Path
    model: Path

    @property
    def store(self) -> StoreSettings:
        """The data directory laid out as the product lays it out."""
        return StoreSettings(data_dir=self.data_dir)

    def options(self, **overrides: object) -> TrainOptions:
        base = TrainOptions(
            # One thread: on a few shared cores, two threads spin against other processes.
            model=ModelSettings(base=str(self.model), device="cpu", torch_threads=1),
            prompt=PromptSettings(persona=PERSONA),
            batch_size=12,
            grad_accum=1,
            lr=5e-3,
            save_steps=20,
        )
        return replace(base, **overrides)

    def train(self, options: TrainOptions, **kwargs: object) -> TrainResult:
        kwargs.setdefault("runs_dir", self.store.runs_dir)
        kwargs.setdefault("adapters_dir", self.store.adapters_dir)
        return run_train(options, datasets_dir=self.store.datasets_dir, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> World:
    root = tmp_path_factory.mktemp("training")
    model = build_tiny_model(root / "model", tokenizer_dir)
    w = World(root / "data", model)
    write_persona_dataset(w.store.datasets_dir)
    return w


@pytest.fixture(scope="module")
def trained(world: World) -> TrainResult:
    # Checkpointing off here only for speed; the short resume runs below keep it on.
    return world.train(world.options(max_steps=40, gradient_checkpointing=False))


def _eval_options(world: World, **kw: object) -> EvalOptions:
    # device pinned like the training runs: on a machine with a GPU, "auto" would evaluate in
    # int8 on CUDA and no longer reproduce the CPU-trained run's figures.
    base = EvalOptions(
        model=ModelSettings(base=str(world.model), device="cpu", torch_threads=1),
        eval_max_samples=20,
        max_new_tokens=8,
        batch_size=8,
    )
    return replace(base, **kw)


def test_training_halves_validation_loss_and_learns_the_rule(
    world: World, trained: TrainResult
) -> None:
    m = trained.metrics
    assert m["steps"] == 40
    assert m["val_loss"] <= m["val_loss_start"] / 2, m
    comparison = evaluate_adapters(
        _eval_options(world, metrics=("loss",)),
        [trained.adapter_dir],
        datasets_dir=world.store.datasets_dir,
    )
    # The held-out loss the trainer recorded is the one eval measures (same subset and lengths).
    assert comparison.reports[0].metrics["loss"] == pytest.approx(m["val_loss"], rel=1e-4)

    comparison = evaluate_adapters(
        _eval_options(world, metrics=("chrf",)),
        [trained.adapter_dir],
        datasets_dir=world.store.datasets_dir,
    )
    rows = load_dataset(world.store.datasets_dir).validation
    generated = comparison.reports[0].generations
    matches = sum(g == rule_for(r.model_input) for g, r in zip(generated, rows, strict=True))
    assert matches >= 0.8 * len(rows), generated


def test_run_folder_and_versioned_adapter(world: World, trained: TrainResult) -> None:
    run = read_json(trained.run_dir / RUN_FILE)
    assert run["status"] == "finished" and run["adapter"] == str(trained.adapter_dir)
    steps = [json.loads(x)["step"] for x in (trained.run_dir / LOG_FILE).read_text().splitlines()]
    assert steps == list(range(1, 41))
    assert (trained.run_dir / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s for s, _ in ckpt.list_checkpoints(trained.run_dir)] == [20, 40]

    adapter = trained.adapter_dir
    assert adapter.parent == world.store.adapters_dir and adapter.name.startswith("v0")
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    meta = read_json(adapter / META_FILE)
    dataset = load_dataset(world.store.datasets_dir)
    assert meta["base_model"] == str(world.model)
    assert meta["method"] == "sft"
    assert meta["dataset"]["hash"] == dataset.dataset_hash
    assert meta["settings"]["lora_r"] == 16 and meta["settings"]["lora_targets"] == ["q", "v"]
    assert meta["metrics"]["val_loss"] == trained.metrics["val_loss"]
    options = world.options()
    key = heldout_key(
        dataset.validation_hash,
        options.eval_max_samples,
        options.model.max_input_tokens,
        options.max_target_tokens,
        "fp32",
    )
    assert meta["evals"][key]["loss"] == trained.metrics["val_loss"]


def _short(world: World) -> TrainOptions:
    # Dropout on, so the continuation is only identical if the RNG state is restored too.
    return world.options(batch_size=6, grad_accum=2, max_steps=8, save_steps=3, lora_dropout=0.1)


@pytest.fixture(scope="module")
def straight(world: World, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """An uninterrupted short run: the reference for the interrupted ones."""
    root = tmp_path_factory.mktemp("straight")
    return world.train(
        replace(_short(world), run_name="straight"),
        runs_dir=root / "runs",
        adapters_dir=root / "adapters",
    )


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / LOG_FILE).read_text().splitlines()]


def _weights(adapter: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def test_crash_during_checkpoint_save_then_resume_matches_uninterrupted(
    world: World, straight: TrainResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    dirs = {"runs_dir": tmp_path / "runs", "adapters_dir": tmp_path / "adapters"}
    opts = _short(world)

    real_write_state = ckpt.write_state

    def killed_at_step_6(folder: Path, state: ckpt.TrainerState) -> None:
        if state.step == 6:
            raise RuntimeError("killed while saving")
        real_write_state(folder, state)

    monkeypatch.setattr(ckpt, "write_state", killed_at_step_6)
    with pytest.raises(RuntimeError, match="killed while saving"):
        world.train(replace(opts, run_name="crashed"), **dirs)
    monkeypatch.setattr(ckpt, "write_state", real_write_state)
    run_dir = dirs["runs_dir"] / "crashed"
    # The half-written checkpoint never became "latest".
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [3]
    assert any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())
    assert read_json(run_dir / RUN_FILE)["status"] == "failed"

    resumed = world.train(replace(opts, run_name="crashed"), **dirs)
    assert resumed.resumed_from == 3 and resumed.steps == straight.steps == 8
    assert not any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())
    assert _losses(resumed.run_dir) == pytest.approx(_losses(straight.run_dir), rel=1e-5)
    a, b = _weights(straight.adapter_dir), _weights(resumed.adapter_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name  # type: ignore[arg-type]
    assert resumed.metrics["val_loss"] == pytest.approx(straight.metrics["val_loss"], rel=1e-5)


def test_graceful_stop_checkpoints_and_same_command_resumes(
    world: World, straight: TrainResult, tmp_path: Path
) -> None:
    dirs = {"runs_dir": tmp_path / "runs", "adapters_dir": tmp_path / "adapters"}
    opts = _short(world)
    with pytest.raises(TrainingInterruptedError, match="step 4/8"):
        world.train(opts, callbacks=[lambda event: event.step == 4], **dirs)
    # Stopping between checkpoints still saved the exact step it stopped at.
    (stopped,) = list(dirs["runs_dir"].iterdir())
    assert [s for s, _ in ckpt.list_checkpoints(stopped)] == [3, 4]
    assert read_json(stopped / RUN_FILE)["status"] == "interrupted"

    again = world.train(opts, **dirs)  # no run name: found by its fingerprint
    assert again.run_dir == stopped and again.resumed_from == 4 and again.steps == 8
    assert _losses(again.run_dir) == pytest.approx(_losses(straight.run_dir), rel=1e-5)

    with pytest.raises(TrainingError, match="already finished"):
        world.train(replace(opts, run_name=stopped.name), **dirs)
    with pytest.raises(TrainingError, match="different data or settings"):
        world.train(replace(opts, run_name=stopped.name, lr=1e-3, resume=True), **dirs)


def test_eval_cli_produces_every_metric(
    world: World,
    trained: TrainResult,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from doppelbot.cli import main

    monkeypatch.setenv("DOPPELBOT_TORCH_THREADS", "1")
    monkeypatch.setenv("DOPPELBOT_MAX_NEW_TOKENS", "8")
    out = tmp_path / "eval.json"
    main(
        [
            "--env-file", "/dev/null", "--data-dir", str(world.data_dir),
            "eval", trained.adapter_dir.name, "--against", "base", "--model", str(world.model),
            "--limit", "8", "--output", str(out),
        ]
    )  # fmt: skip
    table = capsys.readouterr().out
    assert "chrf" in table and "owner (real)" in table and "base" in table
    report = json.loads(out.read_text())
    assert [r["label"] for r in report["reports"]] == [trained.adapter_dir.name, "base"]
    expected = {
        "loss", "perplexity", "chrf", "len_chars", "len_words", "emoji_rate", "question_rate",
        "exclaim_rate", "end_punct_rate", "capital_start_rate", "distinct_1", "distinct_2",
        "repetition_rate", "duplicate_rate",
    }  # fmt: skip
    for r in report["reports"]:
        assert expected <= set(r["metrics"]), set(r["metrics"])
        assert all(math.isfinite(v) for v in r["metrics"].values())
    trained_m, base_m = (r["metrics"] for r in report["reports"])
    assert trained_m["loss"] < base_m["loss"] and trained_m["chrf"] > base_m["chrf"]
    assert report["owner_reference"]["len_words"] == pytest.approx(1.0)
    assert set(METRICS) >= {"loss", "chrf", "style", "diversity"}


def _fresh_lora(world: World, folder: Path) -> Path:
    """An adapter that changes nothing (LoRA B starts at zero): as bad as the base model."""
    from peft import get_peft_model

    from doppelbot.training.modeling import load_base_model, lora_config

    base = load_base_model(str(world.model), device="cpu", precision="fp32")
    peft_model = get_peft_model(base, lora_config(r=4, alpha=8, dropout=0.0, targets=["q", "v"]))
    peft_model.save_pretrained(str(folder))
    return folder


def test_adapter_use_refuses_a_worse_adapter_and_rolls_back(
    world: World,
    trained: TrainResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from doppelbot.cli import main
    from doppelbot.cli.common import run_async
    from doppelbot.config import load_settings
    from doppelbot.store.database import Database
    from doppelbot.training.registry import current_adapter

    data_dir = tmp_path / "data"
    (data_dir / "adapters").mkdir(parents=True)
    (data_dir / "datasets").symlink_to(world.store.datasets_dir)
    good = data_dir / "adapters" / "good"
    good.symlink_to(trained.adapter_dir)
    bad = _fresh_lora(world, data_dir / "adapters" / "bad")
    monkeypatch.setenv("DOPPELBOT_MODEL", str(world.model))
    monkeypatch.setenv("DOPPELBOT_TORCH_THREADS", "1")
    cli = ["--env-file", "/dev/null", "--data-dir", str(data_dir)]
    settings = load_settings(None, data_dir=data_dir, model=str(world.model))

    async def served() -> Path | None:
        async with await Database.open(settings.store.db_path) as db:
            return await current_adapter(settings, db)

    main([*cli, "adapter", "use", "good"])
    assert run_async(served()) == good.resolve()

    with pytest.raises(SystemExit) as refused:
        main([*cli, "adapter", "use", "bad"])
    assert refused.value.code == 1
    assert "worse" in capsys.readouterr().err
    assert run_async(served()) == good.resolve()

    main([*cli, "adapter", "use", "bad", "--force"])
    assert run_async(served()) == bad.resolve()
    main([*cli, "adapter", "list"])
    listing = capsys.readouterr().out
    assert "bad" in listing and "good" in listing
    main([*cli, "adapter", "rollback"])
    assert run_async(served()) == good.resolve()
    with pytest.raises(SystemExit):
        main([*cli, "adapter", "rollback"])  # "good" was the first choice: nothing before it

    pinned = settings.model_copy(update={"model": replace(settings.model, adapter_path=bad)})

    async def pinned_choice() -> Path | None:
        async with await Database.open(settings.store.db_path) as db:
            return await current_adapter(pinned, db)

    assert run_async(pinned_choice()) == bad


def test_saved_adapter_loads_in_the_reply_runtime_and_changes_its_output(
    world: World, trained: TrainResult
) -> None:
    from doppelbot.config import GenerationOptions
    from doppelbot.core.prompt import decode_reply
    from doppelbot.model.loader import ModelSpec, load_reply_model

    row = load_dataset(world.store.datasets_dir).validation[0]
    greedy = GenerationOptions(do_sample=False, max_new_tokens=6)

    def reply(adapter: Path | None) -> str:
        spec = ModelSpec(
            ModelSettings(base=str(world.model), device="cpu", precision="fp32"),
            adapter=adapter,
            cache_dir=None,
        )
        return load_reply_model(spec).generate(row.model_input, greedy)

    before, after = reply(None), reply(trained.adapter_dir)
    assert before != after
    assert decode_reply(after) == rule_for(row.model_input)


def test_feedback_method_continues_an_adapter_with_replay(
    world: World, trained: TrainResult, tmp_path: Path
) -> None:
    from doppelbot.core.domain import Role, Turn

    prompt = PromptSettings(persona=PERSONA).format
    feedback = tmp_path / "feedback.jsonl"
    rows = [
        {"context": [{"role": "other", "text": "где ты"}], "chosen": "дома"},
        {
            "model_input": prompt.build_input([Turn(Role.OTHER, "как дела")]),
            "model_target": prompt.build_target("нормально"),
        },
        {"kind": "negative", "context": [], "rejected": "нет"},
    ]
    feedback.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    result = world.train(
        world.options(
            method="feedback",
            feedback=feedback,
            init_adapter=trained.adapter_dir,
            max_steps=2,
            batch_size=6,
        ),
        runs_dir=tmp_path / "runs",
        adapters_dir=tmp_path / "adapters",
    )
    assert result.adapter_dir.name.endswith("-feedback")
    meta = read_json(result.adapter_dir / META_FILE)
    assert meta["method"] == "feedback" and meta["init_adapter"] == str(trained.adapter_dir)
    assert meta["dataset"]["feedback_rows"] == 2
    assert meta["dataset"]["replay_rows"] == 2 * world.options().feedback_weight
    # It started from the trained adapter, not from scratch.
    assert result.metrics["val_loss_start"] == pytest.approx(trained.metrics["val_loss"], rel=1e-4)


def test_feedback_method_needs_an_adapter_to_continue(world: World, tmp_path: Path) -> None:
    from doppelbot.training.plan import plan_training

    feedback = tmp_path / "fb.jsonl"
    feedback.write_text('{"context": [], "chosen": "да"}\n')
    with pytest.raises(TrainingError, match="continues an existing adapter"):
        plan_training(
            world.options(method="feedback", feedback=feedback),
            datasets_dir=world.store.datasets_dir,
        )


def test_preflight_refuses_before_loading_the_model(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from doppelbot.training import preflight

    monkeypatch.setattr(preflight, "available_bytes", lambda device: 300 * 1024**2)
    with pytest.raises(PreflightError, match=r"would not fit in memory.*free 0\.29 GiB"):
        world.train(world.options(), runs_dir=tmp_path / "runs", adapters_dir=tmp_path / "a")
    assert not (tmp_path / "runs").exists()  # refused before any run folder or model load


def _train_cli(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, run_name: str
) -> tuple[Path, list[str]]:
    """A data folder on the module's dataset, and the command line of a short `train` run."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "datasets").symlink_to(world.store.datasets_dir)
    monkeypatch.setenv("DOPPELBOT_PERSONA", PERSONA)
    monkeypatch.setenv("DOPPELBOT_TORCH_THREADS", "1")
    cli = ["--env-file", "/dev/null", "--data-dir", str(data_dir), "train"]
    args = [*cli, "--model", str(world.model), "--max-steps", "2", "--batch-size", "6"]
    args += ["--grad-accum", "1", "--lr", "0.005", "--run-name", run_name]
    return data_dir, args


def test_train_cli_records_the_run(
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import sqlite3

    from doppelbot.cli import main

    data_dir, args = _train_cli(world, tmp_path, monkeypatch, run_name="cli")
    main([*args, "--dry-run"])
    assert "optimizer steps" in capsys.readouterr().out
    assert not (data_dir / "runs").exists()

    main(args)
    out = capsys.readouterr().out
    assert "v0001-sft" in out and "held-out loss" in out
    with sqlite3.connect(data_dir / "doppelbot.sqlite3") as conn:
        status, method, adapter, params, metrics = conn.execute(
            "SELECT status, method, adapter_path, params, metrics FROM training_runs"
        ).fetchone()
    assert (status, method) == ("finished", "sft")
    assert adapter == str(data_dir / "adapters" / "v0001-sft")
    assert json.loads(params)["lr"] == 0.005 and json.loads(metrics)["steps"] == 2

    with pytest.raises(SystemExit) as again:
        main(args)
    assert again.value.code == 1
    assert "already finished" in capsys.readouterr().err


def test_run_json_and_sqlite_agree_on_the_status_even_when_the_export_fails(
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One owner of a run's status: a failure after the last step (the adapter export) is
    "failed" in run.json as in SQLite, and the same command then finishes the run in both."""
    import sqlite3

    from doppelbot.cli import main
    from doppelbot.training import trainer

    data_dir, args = _train_cli(world, tmp_path, monkeypatch, run_name="export")

    def recorded() -> tuple[str, str, dict[str, object]]:
        with sqlite3.connect(data_dir / "doppelbot.sqlite3") as conn:
            status, metrics = conn.execute("SELECT status, metrics FROM training_runs").fetchone()
        run = read_json(data_dir / "runs" / "export" / RUN_FILE)
        return status, run["status"], json.loads(metrics)

    def disk_full(*args: object, **kwargs: object) -> Path:
        raise OSError("disk full")

    export = trainer.export_adapter
    monkeypatch.setattr(trainer, "export_adapter", disk_full)
    with pytest.raises(SystemExit) as failed:
        main(args)
    assert failed.value.code == 1 and "disk full" in capsys.readouterr().err
    sqlite_status, run_status, metrics = recorded()
    assert sqlite_status == run_status == "failed" and metrics == {"error": "disk full"}

    monkeypatch.setattr(trainer, "export_adapter", export)
    main(args)  # resumes from the last step's checkpoint: only the export is left to do
    assert "resuming from step 2" in capsys.readouterr().out
    sqlite_status, run_status, metrics = recorded()
    assert sqlite_status == run_status == "finished" and metrics["steps"] == 2

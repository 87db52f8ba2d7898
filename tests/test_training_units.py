"""Fast unit tests of the fine-tuning pieces that need no model: metrics against hand-computed
values, feedback parsing and budgets, the data order, checkpoint publishing, the memory
estimate, and the adapter-choice history in SQLite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from doppelbot.config import PromptSettings
from doppelbot.core.domain import Role, Turn
from doppelbot.core.errors import AdapterRejectedError, PreflightError, TrainingError
from doppelbot.store import adapters
from doppelbot.store.database import Database
from doppelbot.training import checkpoint as ckpt
from doppelbot.training import registry
from doppelbot.training.data import TrainRow, feedback_row, fit_to_budget, load_feedback
from doppelbot.training.methods import METHODS, get_method
from doppelbot.training.metrics import (
    chrf_from_statistics,
    chrf_statistics,
    corpus_chrf,
    distinct_n,
    duplicate_rate,
    repetition_rate,
    sentence_chrf,
    style_stats,
)
from doppelbot.training.preflight import GIB, ModelShape, check, preflight
from doppelbot.training.seq2seq import subset
from doppelbot.training.types import Example

# --- chrF ---------------------------------------------------------------------------------------


def test_chrf_statistics_by_hand() -> None:
    # "ab" vs "abc": 1-grams a,b | a,b,c → 2 matches; 2-grams ab | ab,bc → 1; 3-gram — | abc.
    stats = chrf_statistics("ab", "abc", order=3)
    # The hypothesis has no 3-gram but the reference does: hyp count 0, so order 3 is skipped.
    assert stats == [2, 3, 2, 1, 2, 1, 0, 1, 0]


def test_chrf_value_by_hand() -> None:
    # Orders 1 and 2 count (order 3 has no hypothesis n-grams): P = (2/2 + 1/1)/2 = 1,
    # R = (2/3 + 1/2)/2 = 7/12; F2 = 5PR / (4P + R) = (35/12) / (55/12) = 7/11.
    assert chrf_from_statistics([2, 3, 2, 1, 2, 1, 0, 1, 0]) == pytest.approx(100 * 7 / 11)
    # With the default 6 orders "ab"/"abc" gives the same: orders ≥ 3 have no hypothesis n-gram.
    assert sentence_chrf("ab", "abc") == pytest.approx(100 * 7 / 11)
    assert sentence_chrf("a b", "ab") == pytest.approx(100.0)  # whitespace is ignored
    assert sentence_chrf("", "ab") == 0.0
    assert sentence_chrf("xy", "ab") == 0.0


def test_corpus_chrf_sums_statistics_before_scoring() -> None:
    # Not the mean of sentence scores: statistics are pooled.
    hyps, refs = ["ab", "xy"], ["abc", "xy"]
    first, second = chrf_statistics("ab", "abc"), chrf_statistics("xy", "xy")
    pooled = chrf_from_statistics([x + y for x, y in zip(first, second, strict=True)])
    mean = (sentence_chrf("ab", "abc") + sentence_chrf("xy", "xy")) / 2
    assert pooled != pytest.approx(mean)
    assert corpus_chrf(hyps, refs) == pytest.approx(pooled)
    assert corpus_chrf(["привет"], ["привет"]) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        corpus_chrf(["a"], [])


# --- style and diversity ------------------------------------------------------------------------


def test_style_stats_by_hand() -> None:
    stats = style_stats(["Привет!", "ок)", "где ты?", "🙂 да", ""])
    assert stats["len_chars"] == pytest.approx((7 + 3 + 7 + 4 + 0) / 5)
    assert stats["len_words"] == pytest.approx((1 + 1 + 2 + 2 + 0) / 5)
    assert stats["emoji_rate"] == pytest.approx(1 / 5)
    assert stats["question_rate"] == pytest.approx(1 / 5)
    assert stats["exclaim_rate"] == pytest.approx(1 / 5)
    assert stats["end_punct_rate"] == pytest.approx(2 / 5)
    assert stats["bracket_smiley_rate"] == pytest.approx(1 / 5)
    assert stats["capital_start_rate"] == pytest.approx(1 / 5)
    assert stats["empty_rate"] == pytest.approx(1 / 5)
    assert stats["punct_per_char"] == pytest.approx(3 / 21)
    assert style_stats([])["len_chars"] == 0.0


def test_distinct_and_repetition_by_hand() -> None:
    texts = ["да да да", "нет"]
    # unigrams: да да да нет → 2 unique of 4; bigrams: (да да) ×2 → 1 unique of 2.
    assert distinct_n(texts, 1) == pytest.approx(2 / 4)
    assert distinct_n(texts, 2) == pytest.approx(1 / 2)
    assert repetition_rate(texts) == pytest.approx(2 / 3)  # only "да да да" has ≥ 2 words
    assert duplicate_rate(["ок", "ок", "да", ""]) == pytest.approx(1 / 3)
    assert distinct_n([], 2) == 0.0


# --- data ---------------------------------------------------------------------------------------


def test_feedback_rows_both_shapes_and_bad_rows(tmp_path: Path) -> None:
    prompt = PromptSettings(persona="Я.").format
    row = feedback_row(
        {"context": [{"role": "other", "text": "как ты"}], "chosen": "норм"}, prompt, "x"
    )
    assert row.model_input == prompt.build_input([Turn(Role.OTHER, "как ты")])
    assert row.model_target == "<extra_id_0>норм</s>" and row.reply == "норм"
    verbatim = feedback_row(
        {"model_input": "IN", "model_target": "<extra_id_0>да</s>"}, prompt, "x"
    )
    assert (verbatim.model_input, verbatim.reply) == ("IN", "да")
    with pytest.raises(TrainingError, match="needs model_input"):
        feedback_row({"chosen": "да"}, prompt, "f:3")
    path = tmp_path / "fb.jsonl"
    path.write_text(
        '{"context": [], "chosen": "ok"}\n\n{"context": [{"role": "bot"}], "chosen": 1}\n'
    )
    with pytest.raises(TrainingError, match=r"fb\.jsonl:3: bad context turn"):
        load_feedback(path, prompt)


def test_fit_to_budget_drops_oldest_turns() -> None:
    prompt = PromptSettings(persona="Я.").format
    turns = tuple(Turn(Role.OTHER, f"сообщение {i}") for i in range(5))
    row = TrainRow(prompt.build_input(turns), "<extra_id_0>ок</s>", "ок", "feedback", turns)

    def count(text: str) -> int:
        return len(text)

    fitted = fit_to_budget(row, prompt, count, len(prompt.build_input(turns[-2:])))
    assert fitted is not None and fitted.context == turns[-2:]
    assert fit_to_budget(row, prompt, count, 5) is None
    assert fit_to_budget(row, prompt, count, 10_000) is row


def test_subset_spreads_evenly_and_is_deterministic() -> None:
    assert subset(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert subset(list(range(3)), 5) == [0, 1, 2]


def test_example_stream_is_a_pure_function_of_position() -> None:
    from doppelbot.training.trainer import ExampleStream

    examples = [Example((i,), (i,)) for i in range(7)]
    a, b = ExampleStream(examples, 3), ExampleStream(examples, 3)
    first = a.take(0, 7)
    assert sorted(e.input_ids[0] for e in first) == list(range(7))  # one epoch = a permutation
    assert a.take(0, 20) == b.take(0, 20)
    assert b.take(12, 5) == a.take(0, 20)[12:17]  # no replay needed to jump to a position
    assert ExampleStream(examples, 4).take(0, 7) != first


def test_methods_registry() -> None:
    assert {"sft", "feedback"} <= set(METHODS)
    with pytest.raises(TrainingError, match="available: dpo, feedback, sft"):
        get_method("rlhf")


# --- checkpoints --------------------------------------------------------------------------------


def test_publish_is_atomic_and_prunes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        tmp = ckpt.tmp_checkpoint_dir(run, step)
        ckpt.write_state(tmp, ckpt.TrainerState(step=step))
        ckpt.publish_checkpoint(run, tmp, step, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [3, 4]
    # A save killed half-way: a temporary folder, never a listed checkpoint.
    ckpt.tmp_checkpoint_dir(run, 5)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [3, 4]
    assert ckpt.remove_partial(run) == 1
    # A damaged newest checkpoint falls back to the one before.
    (run / "checkpoints" / ckpt.checkpoint_name(4) / ckpt.STATE_FILE).write_text("{broken")
    _, state = ckpt.load_latest(run, ckpt.read_state) or (None, None)
    assert state is not None and state.step == 3


def test_rng_round_trip(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(5)
    state = ckpt.capture_rng()
    expected = torch.rand(3)
    ckpt.save_rng(tmp_path, 0, state)
    torch.rand(10)
    ckpt.restore_rng(ckpt.load_rng(tmp_path, 0))
    assert torch.equal(torch.rand(3), expected)


def test_each_run_gets_an_accelerator_on_its_own_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate keeps one device per process; a CPU run followed by a CUDA run in the same
    process once left the CUDA int8 base fed with CPU batches (found on a GPU machine)."""
    import torch
    from accelerate.state import PartialState

    from doppelbot.training.trainer import make_accelerator

    assert make_accelerator("cpu").device.type == "cpu"
    # What an earlier run on another device leaves behind (accelerate alone refuses cpu=True).
    monkeypatch.setitem(PartialState._shared_state, "device", torch.device("meta"))
    assert make_accelerator("cpu").device.type == "cpu"
    if not torch.cuda.is_available():  # a CUDA run must not silently train on the CPU
        with pytest.raises(TrainingError, match="planned on cuda"):
            make_accelerator("cuda")
    assert make_accelerator("cpu").device.type == "cpu"


# --- pre-flight ---------------------------------------------------------------------------------

FRED = ModelShape(
    vocab_size=50364, d_model=1536, d_ff=4096, d_kv=64, num_heads=24, num_layers=24,
    num_decoder_layers=24,
)  # fmt: skip


def test_fred_shape_and_lora_size() -> None:
    assert FRED.total_params() == pytest.approx(1.74e9, rel=0.01)
    # q and v in 24 encoder self-attentions and 24 × 2 decoder attentions, r=16.
    assert FRED.lora_params(16, ["q", "v"]) == 72 * 2 * 16 * (1536 + 1536)


def test_estimate_orders_and_refusal_message() -> None:
    from dataclasses import replace

    from doppelbot.training.preflight import TrainingSetup

    base = TrainingSetup(
        precision="int8", device="cuda", batch_size=6, source_len=712, target_len=64, lora_r=16,
        lora_targets=("q", "v"), gradient_checkpointing=True,
    )  # fmt: skip
    int8 = preflight(FRED, base, available=80 * GIB)
    bf16 = preflight(FRED, replace(base, precision="bf16"), available=80 * GIB)
    assert int8.estimate.weights < bf16.estimate.weights
    no_ckpt_setup = replace(base, gradient_checkpointing=False)
    no_ckpt = preflight(FRED, no_ckpt_setup, available=80 * GIB)
    assert no_ckpt.estimate.activations > 5 * int8.estimate.activations
    check(int8)  # fits in 80 GiB
    # A 16 GB card without checkpointing: refused, and told which batch would fit.
    small = preflight(FRED, no_ckpt_setup, available=15 * GIB)
    assert not small.fits and small.max_batch is not None and 0 < small.max_batch < 6
    with pytest.raises(PreflightError, match=f"--batch-size {small.max_batch}"):
        check(small)
    # A CPU with 4 GiB cannot hold fp32 FRED at all.
    cpu = preflight(FRED, replace(base, precision="fp32", device="cpu"), available=4 * GIB)
    with pytest.raises(PreflightError, match="CUDA GPU"):
        check(cpu)


def test_cpu_memory_from_meminfo(tmp_path: Path) -> None:
    from doppelbot.training.preflight import cpu_available_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:    512 kB\n")
    assert cpu_available_bytes(meminfo) == 512 * 1024


def test_precision_rules() -> None:
    from doppelbot.training.modeling import resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "int8"
    with pytest.raises(TrainingError, match="needs a CUDA GPU"):
        resolve_precision("int8", "cpu")


# --- adapters -----------------------------------------------------------------------------------


def _adapter(root: Path, name: str, meta: dict[str, object] | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / registry.ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": "m"}))
    if meta is not None:
        registry.write_meta(folder, meta)
    return folder


def test_adapter_folders_versions_and_eval_cache(tmp_path: Path) -> None:
    assert registry.next_adapter_name(tmp_path, "sft") == "v0001-sft"
    a = _adapter(tmp_path, "v0001-sft", {"method": "sft", "base_model": "fred"})
    _adapter(tmp_path, "v0007-feedback", {"method": "feedback"})
    _adapter(tmp_path, "imported")  # a foreign peft folder: listed, base from its config
    (tmp_path / "not-an-adapter").mkdir()
    assert registry.next_adapter_name(tmp_path, "sft") == "v0008-sft"
    infos = registry.list_adapters(tmp_path)
    assert [i.name for i in infos] == ["v0001-sft", "v0007-feedback", "imported"]
    assert infos[2].base_model == "m" and infos[0].base_model == "fred"
    assert registry.resolve_adapter(tmp_path, "v0001-sft") == a.resolve()
    assert registry.resolve_adapter(tmp_path, "base") is None
    with pytest.raises(TrainingError, match="no adapter 'nope'"):
        registry.resolve_adapter(tmp_path, "nope")
    registry.store_eval(a, "k", {"loss": 1.5})
    assert registry.cached_eval(a, "k")["loss"] == 1.5  # type: ignore[index]
    assert registry.cached_eval(a, "other") is None


def test_not_worse_rule() -> None:
    registry.check_not_worse("new", 2.0, "old", 2.0)  # equal is fine
    registry.check_not_worse("new", 1.9, "old", 2.0)
    with pytest.raises(AdapterRejectedError, match=r"new has held-out loss 2\.1000, worse"):
        registry.check_not_worse("new", 2.1, "old", 2.0)


async def test_choice_history_and_rollback(db: Database, settings: object, tmp_path: Path) -> None:
    a, b, c = (_adapter(tmp_path, n) for n in ("a", "b", "c"))
    assert await registry.current_adapter(settings, db) is None  # type: ignore[arg-type]
    with pytest.raises(TrainingError, match="nothing to roll back"):
        await registry.rollback(db)
    for folder in (a, b, c):
        await registry.use_adapter(db, folder, heldout_loss=1.0, forced=False)
    assert await registry.current_adapter(settings, db) == c  # type: ignore[arg-type]
    assert (await registry.rollback(db)).adapter_path == b
    assert (await registry.rollback(db)).adapter_path == a
    with pytest.raises(TrainingError, match="first adapter chosen"):
        await registry.rollback(db)
    history = await adapters.choice_history(db)
    assert [h.reason for h in history] == ["rollback", "rollback", "use", "use", "use"]

"""The streamed engine build: weight by weight from the checkpoint files, LoRA merged on the
way, cache written during the build — bit for bit what loading the fp32 model through
``transformers`` + peft and converting it gave; and the memory pre-flight in front of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from doppelbot.config import ModelSettings
from doppelbot.core.errors import InsufficientMemoryError, ModelLoadError
from doppelbot.model import loader, memory
from doppelbot.model.checkpoint import Checkpoint, LoraDeltas, UnsupportedAdapter
from doppelbot.model.engine import EngineConfig, T5Engine, engine_bytes
from doppelbot.model.loader import ModelSpec, build_engine, engine_config, load_reply_model
from tests.tiny_model import make_tiny_lora_dir, make_tiny_model_dir, make_tiny_t5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=11)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    # q, v and a feed-forward input: fused linears (qkv, wi) get merged rows.
    return make_tiny_lora_dir(
        tmp_path_factory.mktemp("lora") / "a", model_dir, targets=("q", "v", "wi_0")
    )


def _old_build(base: Path, adapter: Path | None, precision: str) -> T5Engine:
    """What the first start did before: the fp32 model through transformers, the adapter
    merged by peft, then converted."""
    model = loader.load_hf_model(str(base), adapter, device="cpu", precision="fp32", merge=True)
    return T5Engine.from_hf(model, precision)


def _streamed(base: Path, adapter: Path | None, precision: str, **kw: object) -> T5Engine:
    spec = ModelSpec(
        ModelSettings(base=str(base), device="cpu", precision=precision), adapter=adapter
    )
    return build_engine(spec, engine_config(str(base)), **kw)  # type: ignore[arg-type]


def _assert_identical(a: T5Engine, b: T5Engine) -> None:
    left, right = dict(a.tensors_in_order()), dict(b.tensors_in_order())
    assert left.keys() == right.keys()
    for name, t in left.items():
        assert t.dtype == right[name].dtype and torch.equal(t, right[name]), name


@pytest.mark.parametrize("precision", ["int8", "fp32", "bf16"])
def test_streamed_build_is_bit_identical(
    model_dir: Path, adapter_dir: Path, precision: str
) -> None:
    for adapter in (None, adapter_dir):
        _assert_identical(
            _streamed(model_dir, adapter, precision), _old_build(model_dir, adapter, precision)
        )


def test_lora_is_really_merged(model_dir: Path, adapter_dir: Path) -> None:
    plain = _streamed(model_dir, None, "fp32")
    merged = _streamed(model_dir, adapter_dir, "fp32")
    changed = {
        name
        for name, t in merged.tensors_in_order()
        if not torch.equal(t, dict(plain.tensors_in_order())[name])
    }
    # Exactly the linears holding q, v or wi_0 rows: self/cross q, fused qkv, wi.
    assert changed == {
        name
        for name in dict(plain.tensors_in_order())
        if name.endswith(("qkv.weight", "cross_q.weight", "cross_kv.weight", "ff.wi.weight"))
    }
    deltas = LoraDeltas(adapter_dir)
    name = "encoder.block.1.layer.0.SelfAttention.q.weight"
    with Checkpoint.open(str(model_dir)) as ckpt:
        base_q = ckpt.get(name)
    delta = deltas.delta(name)
    assert delta is not None and float(delta.abs().max()) > 0
    inner = plain.config.inner
    assert torch.equal(merged.linears["enc.1.qkv"].weight[:inner], base_q + delta)  # type: ignore[union-attr]


def test_bin_and_sharded_checkpoints(model_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    from transformers import T5ForConditionalGeneration

    expected = _old_build(model_dir, adapter_dir, "int8")
    model = T5ForConditionalGeneration.from_pretrained(model_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="2MB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    folders = [sharded]
    for name, zipped in (("bin", True), ("legacy-bin", False)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_bytes((model_dir / "config.json").read_bytes())
        torch.save(
            model.state_dict(),
            folder / "pytorch_model.bin",
            _use_new_zipfile_serialization=zipped,
        )
        folders.append(folder)
    for folder in folders:
        _assert_identical(_streamed(folder, adapter_dir, "int8"), expected)
    with Checkpoint.open(str(tmp_path / "bin")) as mapped:
        assert mapped.resident_bytes == 0
    with Checkpoint.open(str(tmp_path / "legacy-bin")) as whole:  # cannot be mapped: read whole
        assert (
            whole.resident_bytes == (tmp_path / "legacy-bin" / "pytorch_model.bin").stat().st_size
        )


def test_mapped_bin_pages_are_released_and_still_readable(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    big = torch.randn(512, 1024)
    torch.save({"w": big, "small": torch.ones(3)}, path)
    with Checkpoint([path]) as ckpt:
        first = ckpt.get("w")  # copied, then the mapping's pages dropped
        again = ckpt.get("w")  # faulted back in from the file
        assert torch.equal(first, big) and torch.equal(again, big)
        assert torch.equal(ckpt.get("small"), torch.ones(3))
        assert ckpt.resident_bytes == 0


def test_cache_is_written_during_the_build(
    model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    spec = ModelSpec(
        ModelSettings(base=str(model_dir), device="cpu", precision="int8"),
        adapter=adapter_dir,
        cache_dir=tmp_path,
    )
    built = load_reply_model(spec)
    folder = Path(built.info["cache"])
    assert built.info["build"] == "streamed"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    engine = built.runtime.engine  # type: ignore[union-attr]
    saved = load_file(str(folder / "engine.safetensors"))  # a regular safetensors file
    ours = dict(engine.tensors_in_order())
    assert saved.keys() == ours.keys()
    assert all(torch.equal(saved[k], ours[k]) for k in ours)
    meta = json.loads((folder / "engine.json").read_text())
    assert meta["adapter"] == adapter_dir.name and meta["precision"] == "int8"
    _assert_identical(T5Engine.load(folder), engine)


def test_a_failed_build_leaves_no_cache(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in model_dir.iterdir():
        if item.name != "model.safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    # A checkpoint that lacks a weight: the build stops part-way.
    from safetensors.torch import load_file, save_file

    sd = load_file(str(model_dir / "model.safetensors"))
    del sd["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    spec = ModelSpec(
        ModelSettings(base=str(broken), device="cpu", precision="int8"), cache_dir=tmp_path / "c"
    )
    with pytest.raises(ModelLoadError, match=r"wo\.weight"):
        load_reply_model(spec)
    assert list((tmp_path / "c" / "reply-model").iterdir()) == []


def test_rslora_scaling_matches_peft(model_dir: Path, tmp_path: Path) -> None:
    adapter = make_tiny_lora_dir(tmp_path / "rs", model_dir, r=8, use_rslora=True)
    _assert_identical(_streamed(model_dir, adapter, "fp32"), _old_build(model_dir, adapter, "fp32"))


def test_other_adapters_go_through_peft(model_dir: Path, tmp_path: Path) -> None:
    adapter = make_tiny_lora_dir(tmp_path / "dora", model_dir, use_dora=True)
    with pytest.raises(UnsupportedAdapter, match="use_dora"):
        LoraDeltas(adapter)
    info: dict[str, object] = {}
    engine = _streamed(model_dir, adapter, "fp32", info=info)
    assert info["build"] == "peft"
    _assert_identical(engine, _old_build(model_dir, adapter, "fp32"))


def test_a_missing_head_with_an_untied_config_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = make_tiny_model_dir(tmp_path / "m", seed=2)
    sd = load_file(str(folder / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lm_head"):
        _streamed(folder, None, "int8")


# --- memory ---------------------------------------------------------------------------------
FRED = EngineConfig(
    vocab_size=50364,
    d_model=1536,
    d_kv=64,
    num_heads=24,
    d_ff=4096,
    num_layers=24,
    num_decoder_layers=24,
    num_buckets=32,
    max_distance=128,
    eps=1e-6,
    activation="gelu_new",
    gated=True,
    scale_decoder_outputs=False,
    pad_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=0,
)
GB = 1024**3


def test_estimates_on_the_fred_shape() -> None:
    # The int8 engine of FRED-T5-1.7B: ~1.66 G int8 weights + the fp32 embeddings.
    assert 1.8 * GB < engine_bytes(FRED, "int8") < 1.9 * GB
    assert 6.4 * GB < engine_bytes(FRED, "fp32") < 6.6 * GB
    assert memory.build_bytes(FRED, "int8") < 3.5 * GB  # the first start fits a 4 GB machine
    assert memory.serve_bytes(FRED, "int8") < 3.0 * GB
    assert memory.whole_model_bytes(FRED, "int8") > 7 * GB
    assert memory.streamed_reference_bytes(FRED, "fp32") < 2 * GB


def test_preflight_says_what_is_needed_and_what_to_do() -> None:
    with pytest.raises(InsufficientMemoryError) as err:
        memory.preflight("building the int8 model", 3 * GB, hints=["X"], available=2 * GB)
    line = str(err.value)
    assert "\n" not in line
    assert "needs ~3.0 GB of RAM" in line and "available: 2.0 GB" in line
    assert "X" in line and "swap" in line and "DOPPELBOT_MEMORY_CHECK=false" in line
    assert memory.preflight("x", 3 * GB, hints=[], available=4 * GB).fits
    assert not memory.preflight("x", 3 * GB, hints=[], available=2 * GB, enabled=False).fits
    assert memory.preflight("x", 3 * GB, hints=[], available=None).fits  # unknown: go on


def test_a_load_that_does_not_fit_stops_before_reading_weights(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda: 1024)

    def no_read(*args: object) -> None:
        raise AssertionError("weights read although the build cannot fit")

    monkeypatch.setattr(Checkpoint, "__init__", no_read)
    monkeypatch.setattr(loader, "load_hf_model", no_read)
    spec = ModelSpec(
        ModelSettings(base=str(model_dir), device="cpu", precision="int8"), cache_dir=tmp_path
    )
    with pytest.raises(InsufficientMemoryError, match="building the int8 model"):
        load_reply_model(spec)
    monkeypatch.undo()
    load_reply_model(spec)  # builds and caches
    monkeypatch.setattr(memory, "available_bytes", lambda: 1024)
    with pytest.raises(InsufficientMemoryError, match="loading the int8 model"):
        load_reply_model(spec)
    from dataclasses import replace

    unchecked = replace(spec, model=replace(spec.model, memory_check=False))
    assert load_reply_model(unchecked).info["from_cache"] is True


def test_available_memory_counts_swap_and_cgroup_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8000000 kB\nMemAvailable: 2000000 kB\nSwapFree: 1000000 kB\n")
    real = memory._meminfo
    monkeypatch.setattr(memory, "_meminfo", lambda: real(meminfo))
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    assert memory.available_bytes() == 3_000_000 * 1024
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 1 * GB)
    assert memory.available_bytes() == GB
    group = tmp_path / "cg"
    group.mkdir()
    (group / "memory.max").write_text(f"{4 * GB}\n")
    (group / "memory.current").write_text(f"{3 * GB}\n")
    (group / "memory.stat").write_text(f"anon 1\ninactive_file {GB // 2}\n")
    monkeypatch.setattr(memory, "_cgroup_path", lambda: group)
    assert memory._cgroup_room_at(group) == GB + GB // 2


# --- the GPU's default precision ------------------------------------------------------------
def test_cuda_auto_precision_follows_free_memory() -> None:
    bf16 = memory.cuda_weight_bytes(FRED, "bf16") + memory.CUDA_WORK
    roomy = memory.choose_cuda_precision("auto", FRED, 80 * GB)
    assert roomy.precision == "bf16" and "80.0 GB free" in roomy.reason
    tight = memory.choose_cuda_precision("auto", FRED, int(bf16 * 1.05))  # no headroom left
    assert tight.precision == "int8" and "bf16 would need" in tight.reason
    assert memory.choose_cuda_precision("auto", FRED, 2 * GB, has_int8=False).precision == "bf16"
    assert memory.choose_cuda_precision("int8", FRED, 80 * GB).precision == "int8"  # as set
    assert memory.choose_cuda_precision("fp32", FRED, 1 * GB).precision == "fp32"
    # The loader's choice, with the free memory faked (no GPU here) and the CPU default.
    tiny = EngineConfig.from_hf(make_tiny_t5().config)
    assert loader.resolve_precision("auto", "cuda", tiny, free_gpu=8 * GB).precision == "bf16"
    assert loader.resolve_precision("auto", "cpu", tiny).precision == "int8"
    with pytest.raises(ModelLoadError):
        loader.resolve_precision("int4", "cpu", tiny)


def test_gpu_loads_are_checked_against_free_gpu_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(ModelSettings(base="x", device="cuda", precision="bf16"))
    monkeypatch.setattr(loader, "cuda_free_bytes", lambda: 2 * GB)
    with pytest.raises(InsufficientMemoryError, match=r"of GPU memory.*DOPPELBOT_PRECISION=int8"):
        loader._preflight_hf(spec, FRED)
    monkeypatch.setattr(loader, "cuda_free_bytes", lambda: 40 * GB)
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 * GB)
    loader._preflight_hf(spec, FRED)  # fits: no error


def test_auto_precision_on_the_cpu_loads_int8(model_dir: Path) -> None:
    model = load_reply_model(
        ModelSpec(ModelSettings(base=str(model_dir), device="cpu", precision="auto"))
    )
    assert model.precision == "int8" and model.info["precision_reason"] == "int8 on the CPU"


# --- model check's reference, layer by layer ------------------------------------------------
def test_layer_by_layer_reference_equals_the_full_model(
    model_dir: Path, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from doppelbot.model import check

    spec = ModelSpec(
        ModelSettings(base=str(model_dir), device="cpu", precision="fp32"), adapter=adapter_dir
    )
    full = load_reply_model(spec)
    texts = [("<SC1>привет<extra_id_0>", "<extra_id_0>да</s>"), ("<SC1>ну<extra_id_0>", "ok</s>")]
    samples = [(full.encode(i), full.encode(t)) for i, t in texts]
    layered = check.reference_logprobs(spec, engine_config(str(model_dir)), samples)
    for (i, t), got in zip(texts, layered, strict=True):
        assert torch.allclose(got, full.target_logprobs(i, t), atol=1e-5, rtol=0)

    # run_check loads only the served model; the reference never holds a whole model.
    loads: list[str] = []
    real = loader.load_reply_model

    def counting(s: ModelSpec, *a: object) -> object:
        loads.append(s.model.precision)
        return real(s, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(loader, "load_reply_model", counting)
    pairs = [check.CheckPair(i, t) for i, t in texts]
    report = check.run_check(
        ModelSpec(
            ModelSettings(base=str(model_dir), device="cpu", precision="int8"), adapter=adapter_dir
        ),
        pairs,
    )
    assert loads == ["int8"]
    assert report.candidate == "int8" and report.reference == "fp32" and report.mean_kl > 0
    monkeypatch.setattr(memory, "available_bytes", lambda: 1024)
    with pytest.raises(InsufficientMemoryError, match="layer by layer"):
        check.run_check(spec, pairs)
    assert loads == ["int8"]  # refused before loading anything

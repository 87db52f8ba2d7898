"""Loading the reply model by path: runtime choice, the untied head, the LoRA adapter, the
quantised-model cache, and prompt text → model → reply text with the real tokenizer."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from doppelbot.config import GenerationOptions, ModelSettings, PromptSettings
from doppelbot.core.domain import Role, Turn
from doppelbot.core.errors import EmptyReplyError, ModelLoadError
from doppelbot.core.prompt import decode_reply
from doppelbot.model import loader
from doppelbot.model.cache import adapter_fingerprint, cache_key
from doppelbot.model.loader import ModelSpec, load_reply_model, select_runtime
from tests.tiny_model import make_tiny_lora_dir, make_tiny_model_dir, make_tiny_t5

FMT = PromptSettings(persona="Я Вася.").format
PROMPT = FMT.build_input([Turn(Role.OTHER, "привет, как дела?")])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=7)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    return make_tiny_lora_dir(tmp_path_factory.mktemp("lora") / "v0001-sft", model_dir)


def spec(
    model_dir: Path,
    *,
    adapter: Path | None = None,
    cache_dir: Path | None = None,
    **model: object,
) -> ModelSpec:
    settings = ModelSettings(base=str(model_dir), device="cpu", **model)  # type: ignore[arg-type]
    return ModelSpec(settings, adapter=adapter, cache_dir=cache_dir)


# --- choices --------------------------------------------------------------------------------------
def test_runtime_selection() -> None:
    assert select_runtime("cpu", "int8") == "engine"
    assert select_runtime("cpu", "fp32") == "engine"
    assert select_runtime("cpu", "bf16") == "engine"
    assert select_runtime("cuda", "int8") == "hf"
    assert select_runtime("cuda", "bf16") == "hf"
    with pytest.raises(ModelLoadError):
        select_runtime("cpu", "int4")
    assert loader.resolve_device("auto", has_cuda=False) == "cpu"
    assert loader.resolve_device("auto", has_cuda=True) == "cuda"
    with pytest.raises(ModelLoadError, match="no CUDA"):
        loader.resolve_device("cuda", has_cuda=False)


def test_cuda_int8_is_bitsandbytes_llm_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: the branch is checked by what it asks transformers for. A stand-in module
    # spares the tests bitsandbytes' slow import; without it the error says what to do.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ModelLoadError, match="bitsandbytes"):
        loader.hf_load_kwargs("cuda", "int8")
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    kwargs = loader.hf_load_kwargs("cuda", "int8")
    assert kwargs["quantization_config"].load_in_8bit is True
    assert kwargs["device_map"] == {"": 0}
    assert loader.hf_load_kwargs("cuda", "bf16") == {"dtype": torch.bfloat16}
    with pytest.raises(ModelLoadError):
        loader.hf_load_kwargs("cpu", "int8")


# --- checkpoint -----------------------------------------------------------------------------------
def test_loaded_by_path_keeps_the_head_untied(model_dir: Path) -> None:
    model = loader.load_hf_model(str(model_dir), None, device="cpu", precision="fp32", merge=True)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not model.config.scale_decoder_outputs
    assert not torch.equal(model.lm_head.weight, model.shared.weight)


def test_a_head_that_comes_out_tied_is_refused(tmp_path: Path) -> None:
    tied = make_tiny_t5()
    tied.lm_head.weight = tied.shared.weight  # what a config-built T5 gives in transformers 5
    tied.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = False  # ...while the checkpoint says "separate", like FRED's
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="tied"):
        loader.load_hf_model(str(tmp_path), None, device="cpu", precision="fp32", merge=True)


def test_missing_model_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        load_reply_model(spec(tmp_path / "nothing", precision="fp32"))


# --- adapter ----------------------------------------------------------------------------------
def test_adapter_roundtrip_gives_the_peft_logits(model_dir: Path, adapter_dir: Path) -> None:
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration

    reply_model = load_reply_model(spec(model_dir, adapter=adapter_dir, precision="fp32"))
    assert reply_model.identity.adapter_id == "v0001-sft"
    target = "<extra_id_0>норм</s>"
    ids = reply_model.encode(PROMPT)
    labels = reply_model.encode(target)
    base = T5ForConditionalGeneration.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.inference_mode():
        expected = peft_model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).logits[
            0
        ]
        plain = T5ForConditionalGeneration.from_pretrained(model_dir)(
            input_ids=torch.tensor([ids]), labels=torch.tensor([labels])
        ).logits[0]
    got = torch.log_softmax(expected, -1)
    assert torch.allclose(reply_model.target_logprobs(PROMPT, target), got, atol=1e-3)
    assert not torch.allclose(expected, plain, atol=1e-2)  # the adapter really changes things


# --- precisions and the cache -----------------------------------------------------------------
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_both_precisions_generate(model_dir: Path, tmp_path: Path, precision: str) -> None:
    model = load_reply_model(spec(model_dir, precision=precision, cache_dir=tmp_path))
    assert model.info["runtime"] == "engine"
    opts = GenerationOptions(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    raw = model.generate(PROMPT, opts)
    ids = model.encode(raw)
    assert len(ids) >= 6 and raw.strip()
    sampled = model.generate(PROMPT, GenerationOptions(max_new_tokens=6, seed=3))
    assert sampled == model.generate(PROMPT, GenerationOptions(max_new_tokens=6, seed=3))


def test_quantised_cache_is_written_once_then_reused(
    model_dir: Path, adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = spec(model_dir, adapter=adapter_dir, precision="int8", cache_dir=tmp_path / "cache")
    first = load_reply_model(s)
    assert first.info["from_cache"] is False
    folder = Path(first.info["cache"])
    assert (folder / "engine.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folders left
    written = (folder / "engine.safetensors").stat().st_mtime_ns

    def no_checkpoint(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fp32 checkpoint must not be read when a cache exists")

    monkeypatch.setattr(loader, "load_hf_model", no_checkpoint)
    monkeypatch.setattr(loader, "build_engine", no_checkpoint)
    second = load_reply_model(s)
    assert second.info["from_cache"] is True and second.info["cache"] == str(folder)
    assert (folder / "engine.safetensors").stat().st_mtime_ns == written
    assert torch.equal(
        first.target_logprobs(PROMPT, "<extra_id_0>да</s>"),
        second.target_logprobs(PROMPT, "<extra_id_0>да</s>"),
    )


def test_cache_key_follows_adapter_content(
    model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "v0001-sft"
    shutil.copytree(adapter_dir, copy)
    assert adapter_fingerprint(copy) == adapter_fingerprint(adapter_dir)
    key = cache_key(str(model_dir), copy, "int8")
    assert key == cache_key(str(model_dir), adapter_dir, "int8")
    assert key != cache_key(str(model_dir), None, "int8")
    assert key != cache_key(str(model_dir), copy, "bf16")
    (copy / "doppelbot_adapter.json").write_text("{}")  # metrics only: same weights
    assert cache_key(str(model_dir), copy, "int8") == key
    weights = next(copy.glob("adapter_model.*"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # retrained in place
    assert cache_key(str(model_dir), copy, "int8") != key


def test_no_cache_for_fp32(model_dir: Path, tmp_path: Path) -> None:
    model = load_reply_model(spec(model_dir, precision="fp32", cache_dir=tmp_path))
    assert "cache" not in model.info and not (tmp_path / "reply-model").exists()


def test_an_unreadable_cache_is_rebuilt(model_dir: Path, tmp_path: Path) -> None:
    s = spec(model_dir, precision="int8", cache_dir=tmp_path)
    folder = Path(load_reply_model(s).info["cache"])
    (folder / "engine.safetensors").write_bytes(b"garbage")
    again = load_reply_model(s)
    assert again.info["from_cache"] is False
    assert load_reply_model(s).info["from_cache"] is True


# --- prompt round-trips with the real tokenizer ---------------------------------------------------
def test_prompt_tokens_and_reply_decoding(model_dir: Path) -> None:
    model = load_reply_model(spec(model_dir, precision="fp32"))
    ids = model.encode(PROMPT)
    assert ids[0] == 50358 and ids[-1] == 50257  # <SC1> … <extra_id_0>, each one token
    assert 50364 not in model.encode("текст <|endoftext|>")  # no embedding row: mapped to pad
    assert 2 in model.stop_ids and 50258 in model.stop_ids and 50257 not in model.stop_ids
    reply_ids = model.encode("<extra_id_0>привет, как ты?</s>")
    assert decode_reply(model.decode(reply_ids)) == "привет, как ты?"
    assert decode_reply(model.decode([*reply_ids[:-1], 50258, 700])) == "привет, как ты?"
    with pytest.raises(EmptyReplyError):
        decode_reply(model.decode(model.encode("<extra_id_0></s>")))


def test_over_long_prompts_keep_the_mode_token_and_the_end(model_dir: Path) -> None:
    model = load_reply_model(spec(model_dir, precision="fp32", max_input_tokens=16))
    long_prompt = FMT.build_input([Turn(Role.OTHER, "слово " * 50)])
    ids = model.encode(long_prompt, limit=16)
    assert len(ids) == 16 and ids[0] == 50358 and ids[-1] == 50257


async def test_serving_adapter_follows_settings(tmp_path: Path, adapter_dir: Path) -> None:
    from doppelbot.config import load_settings

    pinned = load_settings(None, data_dir=tmp_path, adapter_path=adapter_dir)
    assert await loader.serving_adapter(pinned) == adapter_dir
    fresh = load_settings(None, data_dir=tmp_path / "empty")
    assert await loader.serving_adapter(fresh) is None  # no database: the base model alone
    assert not fresh.store.db_path.exists()  # and none was created just to look


def test_transformers_runtime_matches_the_engine(model_dir: Path) -> None:
    """The CUDA path's ``generate()`` wrapper, run on the CPU with the same tiny weights."""
    from doppelbot.core.errors import GenerationTimeoutError

    engine_model = load_reply_model(spec(model_dir, precision="fp32"))
    hf = loader.HFRuntime(
        loader.load_hf_model(str(model_dir), None, device="cpu", precision="fp32", merge=True)
    )
    hf_model = loader.ReplyModel(hf, engine_model.tokenizer, engine_model.identity)
    opts = GenerationOptions(max_new_tokens=10, do_sample=False)
    assert hf_model.generate(PROMPT, opts) == engine_model.generate(PROMPT, opts)
    target = "<extra_id_0>ага</s>"
    assert torch.allclose(
        hf_model.target_logprobs(PROMPT, target),
        engine_model.target_logprobs(PROMPT, target),
        atol=1e-3,
    )
    calls = 0

    def deadline() -> None:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise GenerationTimeoutError("too slow")

    with pytest.raises(GenerationTimeoutError):
        hf_model.generate(PROMPT, GenerationOptions(max_new_tokens=30, min_new_tokens=30), deadline)
    assert calls == 3

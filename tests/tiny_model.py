"""Tiny random FRED-T5-shaped models for tests (model runtime, training, responder).

A real FRED-T5 cannot be downloaded in tests, so these builders make a randomly initialised
``T5ForConditionalGeneration`` that is FRED-T5 in every way that matters to the code — the real
50,364-row vocabulary (use it with the real tokenizer in ``tests/fixtures/fred-t5-tokenizer``),
gated-GELU feed-forward, relative position buckets, an *untied* lm_head and no decoder-output
scaling — but only a few dozen dimensions wide, so it builds and runs in well under a second.

- ``make_tiny_t5(seed=0)`` → the model in memory (eval mode, fp32).
- ``make_tiny_model_dir(path, seed=0)`` → ``path`` holding ``config.json``, the weights and the
  tokenizer files, so "load the base model by local path" runs the real loading code.
- ``make_tiny_lora_dir(path, model_dir)`` → a peft LoRA adapter folder for that model (q and v,
  like the reference fine-tune) with non-zero weights, so it visibly changes the outputs.

Random weights make random text: tests assert on structure (ids, shapes, equal logits), never on
wording. Imports of torch/transformers are inside the functions so collecting tests stays light.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "fred-t5-tokenizer"
FRED_VOCAB = 50364


def tiny_config(**overrides: Any) -> Any:
    from transformers import T5Config

    values: dict[str, Any] = {
        "vocab_size": FRED_VOCAB,
        "d_model": 32,
        "d_ff": 64,
        "d_kv": 8,
        "num_heads": 4,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "feed_forward_proj": "gated-gelu",
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "tie_word_embeddings": False,  # as FRED-T5's config.json says
        "dropout_rate": 0.0,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 2,
        "bos_token_id": 1,
    }
    values.update(overrides)
    return T5Config(**values)


def untie_lm_head(model: Any, *, seed: int = 0) -> Any:
    """transformers 5 ties lm_head to the embeddings for every T5 built from a config; FRED-T5's
    head is separate, so give it its own (random, differently scaled) weights."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    head = model.lm_head.weight
    fresh = torch.randn(head.shape, generator=gen, dtype=head.dtype) * 0.5
    model.lm_head.weight = torch.nn.Parameter(fresh)
    model.config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys.pop("lm_head.weight", None)
    return model


def make_tiny_t5(seed: int = 0, **overrides: Any) -> Any:
    """A tiny random FRED-T5-shaped model in eval mode (untied lm_head, real vocabulary)."""
    import torch
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(tiny_config(**overrides))
    # Larger-than-default weights so different tokens get clearly different logits.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return untie_lm_head(model, seed=seed).eval()


def copy_tokenizer(folder: Path) -> None:
    for item in TOKENIZER_DIR.iterdir():
        shutil.copy(item, folder / item.name)


def make_tiny_model_dir(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny model + the real FRED-T5 tokenizer into ``path``; returns ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    make_tiny_t5(seed, **overrides).save_pretrained(path)
    copy_tokenizer(path)
    return path


def make_tiny_lora_dir(
    path: Path,
    model_dir: Path,
    *,
    seed: int = 1,
    r: int = 4,
    targets: tuple[str, ...] = ("q", "v"),
    **lora: Any,
) -> Path:
    """Save a LoRA adapter (targets q and v by default) for the model in ``model_dir`` into
    ``path``; ``lora`` goes to ``LoraConfig`` (``use_rslora=True``, ``use_dora=True``, …).

    peft initialises LoRA's B matrix to zero (a no-op adapter); the weights are randomised here
    so that loading the adapter, or forgetting to, shows in the logits.
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import T5ForConditionalGeneration

    base = T5ForConditionalGeneration.from_pretrained(model_dir)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=list(targets),
        bias="none",
        task_type=TaskType.SEQ_2_SEQ_LM,
        **lora,
    )
    peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(path)
    return path

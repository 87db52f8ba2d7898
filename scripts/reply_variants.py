"""Engine variants that ``bench_reply.py`` measures against the default int8 engine.

Why here and not in ``doppelbot.model``: they are experiments. The served engine takes one only
if it wins in same-run ratios *and* its numeric cost (``model check``'s agreement and KL on a
trained test model) is acceptable; so far none has (docs/benchmarks.md, "Reply model").

- ``int4``: the decoder's per-token linears and the lm_head as group-wise 4-bit weights
  (asymmetric, groups of ``INT4_GROUP`` along the input, bf16 scales/zeros) on torch's CPU
  kernel ``_weight_int4pack_mm_for_cpu``: half the bytes of int8 per decoded token. The
  cross-attention k/v projection (run once per request over the whole input) stays int8.
- ``onednn-enc``: the encoder's linears repacked for oneDNN's dynamic int8 linear instead of
  fbgemm's (oneDNN uses AMX int8 tiles where the CPU has them).
- ``bf16-enc``: the encoder's linears in bf16 (oneDNN bf16 GEMM: AMX bf16 where present,
  emulated and very slow elsewhere, so the bench skips it on CPUs without AVX512-BF16/AMX).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from doppelbot.model.engine import (
    DenseLinear,
    EngineConfig,
    Int8Linear,
    T5Engine,
    _hf_sources,
    engine_layout,
    fused_weight,
)

INT4_GROUP = 32
VARIANTS = ("int4", "onednn-enc", "bf16-enc")
# Decoder linears read once per generated token (cross_kv runs once per request).
PER_TOKEN = ("qkv", "o", "cross_q", "cross_o", "ff.wi", "ff.wo")


class Int4Linear:
    """``y = x @ W.T`` with W group-wise asymmetric 4-bit, torch's CPU int4 kernel."""

    def __init__(self, weight: torch.Tensor, group: int = INT4_GROUP) -> None:
        n, k = weight.shape
        pad = -n % 16  # the packing wants rows in multiples of 16 (the lm_head has 50364)
        w = F.pad(weight.to(torch.float32), (0, 0, 0, pad)).reshape(n + pad, k // group, group)
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        # The kernel dequantises (q - 8) * scale + zero.
        zero = lo + 8 * scale
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15)
        q = q.to(torch.int32).reshape(n + pad, k)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
        self.scales_zeros = self.scales_zeros.to(torch.bfloat16)
        self.group, self.in_features, self.out_features = group, k, n
        self.nbytes = (n + pad) * k // 2 + self.scales_zeros.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(torch.bfloat16),
            self.packed,
            self.group,
            self.scales_zeros,
        )
        return y[:, : self.out_features].to(torch.float32).reshape(*lead, self.out_features)


def _onednn(layer: Int8Linear) -> Int8Linear:
    q, scale = layer.int8_tensors()
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "onednn"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qt = torch._make_per_channel_quantized_tensor(
                q, scale.to(torch.float64), torch.zeros(q.shape[0], dtype=torch.long), 0
            )
            packed = torch.ops.quantized.linear_prepack(qt, None)
    finally:
        torch.backends.quantized.engine = previous
    return Int8Linear(packed, layer.out_features)


def _bf16(layer: Int8Linear) -> DenseLinear:
    q, scale = layer.int8_tensors()
    return DenseLinear((q.to(torch.float32) * scale[:, None]).to(torch.bfloat16))


def apply_variant(
    engine: T5Engine, variant: str, weight: Callable[[str], torch.Tensor]
) -> T5Engine:
    """A new engine: ``engine`` with ``variant``'s linears (``weight``: the fp32 source weights
    by ``T5ForConditionalGeneration`` name, adapter merged — 4-bit is quantised from those, not
    from int8)."""
    cfg = engine.config
    _tensors, sources = _hf_sources(cfg)
    linears: dict[str, Any] = dict(engine.linears)
    for name, srcs in sources.items():
        decoder_token = name == "lm_head" or (
            name.startswith("dec.") and name.split(".", 2)[2] in PER_TOKEN
        )
        if variant == "int4" and decoder_token:
            linears[name] = Int4Linear(fused_weight(weight, srcs))
        elif variant == "onednn-enc" and name.startswith("enc."):
            linears[name] = _onednn(engine.linears[name])  # type: ignore[arg-type]
        elif variant == "bf16-enc" and name.startswith("enc."):
            linears[name] = _bf16(engine.linears[name])  # type: ignore[arg-type]
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    return T5Engine(cfg, engine.precision, dict(engine.tensors), linears, meta=dict(engine.meta))


# --- bytes and operations ----------------------------------------------------------------------
def linear_bytes(cfg: EngineConfig, name: str, layer: Any) -> int:
    """Bytes a linear's weights occupy (what one use of it reads from memory)."""
    if isinstance(layer, Int4Linear):
        return layer.nbytes
    if isinstance(layer, DenseLinear):
        return int(layer.weight.numel() * layer.weight.element_size())
    sizes = {"I8": 1, "F32": 4}
    return sum(
        sizes[dt] * math.prod(shape)
        for n, dt, shape in engine_layout(cfg, "int8")
        if n in (f"{name}.qweight", f"{name}.scale")
    )


def per_token_bytes(engine: T5Engine, prompt_tokens: int, new_tokens: int) -> int:
    """Bytes one decoding step reads: the per-token decoder linears and the lm_head, the
    cross-attention keys/values of the prompt (fp32, every layer) and, on average, half the
    self-attention cache."""
    cfg = engine.config
    weights = sum(
        linear_bytes(cfg, name, layer)
        for name, layer in engine.linears.items()
        if name == "lm_head" or (name.startswith("dec.") and name.split(".", 2)[2] in PER_TOKEN)
    )
    kv = 4 * 2 * cfg.num_decoder_layers * cfg.inner
    return weights + kv * prompt_tokens + kv * new_tokens // 2


def encoder_macs(cfg: EngineConfig, tokens: int) -> int:
    """Multiply-accumulates of one encoder pass: the linears plus attention's two products."""
    linear = sum(
        math.prod(shape)
        for name, _dt, shape in engine_layout(cfg, "int8")
        if name.startswith("enc.") and name.endswith(".qweight")
    )
    attention = cfg.num_layers * 2 * tokens * tokens * cfg.inner
    return linear * tokens + attention

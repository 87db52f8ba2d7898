"""A lean T5 inference engine for the CPU: int8 (or fp32/bf16) linears, no framework overhead.

Why not ``transformers``' own T5 with ``generate()``: on a 2-core CPU a 32-token reply from the
1.7B model is dominated by reading the weights once per decoded token, and everything else
(mask building, cache objects, per-module hooks, output dataclasses, logits-processor plumbing)
is pure overhead on top. This engine runs the very same computation as
``T5ForConditionalGeneration`` (the tests compare logits with it) from plain tensors:

- linears are int8 with per-output-channel scales, run by fbgemm's dynamic-quantised kernel
  (``quantized::linear_dynamic``: activations are quantised on the fly, int8 x int8 → VNNI) —
  measured here against oneDNN's ``qlinear``, ``torch._int_mm`` and weight-only
  ``_weight_int8pack_mm``, it was the fastest both for one decoder token and for a 321-token
  encoder pass; on CPUs without VNNI the weights use a 7-bit grid (``int8_weight_limit``);
  fp32/bf16 linears are plain ``F.linear``;
- q/k/v of self-attention, k/v of cross-attention and the two gated-FFN input projections are
  each fused into one matrix (exact: scales are per output row), so a decoder step runs six
  matrix products per layer instead of nine;
- the cross-attention keys/values are computed once per request, the self-attention cache is
  preallocated, and beams share one copy of the encoder states;
- the relative position bias (plus causal mask) is computed once per request, not per step.

An engine is built weight by weight (``T5Engine.build``) from a function that returns one
source weight at a time — the checkpoint streamed by ``doppelbot.model.checkpoint`` with the
adapter merged on the way, or a model in memory (``from_hf``) — so a build holds the engine plus
one weight, never a second model. It saves itself as one safetensors file (plain int8 weights +
scales), written tensor by tensor (during the build, too) and loaded back tensor by tensor with
plain reads (no mmap), so the peak memory stays at the size of the int8 model. fbgemm's
repacking of the weights at load is the bulk of a cold start; it runs on several threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Self

import torch
import torch.nn.functional as F

from doppelbot.core.errors import ModelLoadError

ENGINE_FORMAT = 1
_NEG = torch.finfo(torch.float32).min


# --- linears ------------------------------------------------------------------------------------
def _pack_int8(qweight: torch.Tensor, scale: torch.Tensor) -> Any:
    rows = qweight.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(
            qweight, scale.to(torch.float64), torch.zeros(rows, dtype=torch.long), 0
        )
        return torch.ops.quantized.linear_prepack(q, None)


@functools.cache
def int8_weight_limit() -> int:
    """The largest int8 weight magnitude the CPU's int8 kernel multiplies without overflow.

    fbgemm multiplies uint8 activations by int8 weights. With VNNI (``vpdpbusd``) the products
    go straight into 32-bit sums: any weight up to 127 is fine. Without it (AVX2, AVX-512
    without VNNI: most AMD CPUs before Zen 4 and many laptops and VPSes) ``vpmaddubsw`` adds
    two products into a *saturating int16* first, and 255·127·2 overflows it — measured here,
    a row of equal weights came out at half its value. Weights of at most 63 cannot overflow
    (255·63·2 < 2¹⁵) while activations keep all 8 bits; that is the better half to give up:
    activations are quantised per tensor and carry T5's outliers, weights per output row
    (``reduce_range``, the 7-bit-activation alternative, doubled the error in a comparison
    with outlier channels; a 7-bit weight grid barely changed it).

    Found by running the kernel once on a product that overflows only where it saturates,
    so it follows what the installed torch really does on this CPU, not a list of flags.
    """
    cols = 64
    packed = _pack_int8(torch.full((8, cols), 127, dtype=torch.int8), torch.full((8,), 1 / 127))
    with torch.inference_mode():
        y = torch.ops.quantized.linear_dynamic(torch.ones(1, cols), packed, False)
    saturates = not torch.allclose(y, torch.full_like(y, float(cols)), rtol=0.02)
    return 63 if saturates else 127


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``(qweight, scale)`` with ``W ≈ qweight * scale[:, None]``
    on this CPU's grid (``int8_weight_limit``)."""
    limit = int8_weight_limit()
    rows = weight.shape[0]
    qweight = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    # In blocks of rows (exact: every row has its own scale), so the fp32 temporaries stay
    # small next to a 310 MB lm_head — they set the peak of a first start.
    for lo in range(0, rows, _QUANT_ROWS):
        w = weight[lo : lo + _QUANT_ROWS].detach().to(torch.float32)
        s = (w.abs().amax(dim=1) / float(limit)).clamp_min(1e-12)
        qweight[lo : lo + _QUANT_ROWS] = torch.round(w / s[:, None]).clamp_(-limit, limit)
        scale[lo : lo + _QUANT_ROWS] = s
    return qweight, scale


_QUANT_ROWS = 4096


class Int8Linear:
    """``y = x @ W.T`` with W int8 (symmetric, one scale per output row), fbgemm kernel.

    Weights are limited to ``int8_weight_limit()`` (127, or 63 on CPUs whose kernel would
    overflow with larger ones)."""

    __slots__ = ("out_features", "packed")

    def __init__(self, packed: Any, out_features: int) -> None:
        self.packed = packed
        self.out_features = out_features

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Linear:
        return cls.from_int8(*quantize_int8(weight))

    @classmethod
    def from_int8(cls, qweight: torch.Tensor, scale: torch.Tensor) -> Int8Linear:
        limit = int8_weight_limit()
        if limit < 127 and int(qweight.abs().amax()) > limit:
            # Weights quantised for a VNNI CPU (a copied cache): halve the grid rather than
            # let the kernel overflow.
            qweight = torch.round(qweight.to(torch.float32) / 2).clamp_(-limit, limit)
            qweight, scale = qweight.to(torch.int8), scale * 2
        return cls(_pack_int8(qweight, scale), int(qweight.shape[0]))

    def int8_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q, _bias = torch.ops.quantized.linear_unpack(self.packed)
            return q.int_repr().contiguous(), q.q_per_channel_scales().to(torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]), self.packed, False)
        return y.reshape(*lead, self.out_features)


class DenseLinear:
    """``y = x @ W.T`` in the weight's dtype (fp32 or bf16); activations stay fp32 outside."""

    __slots__ = ("weight",)

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32:
            return F.linear(x, self.weight)
        return F.linear(x.to(self.weight.dtype), self.weight).to(torch.float32)


Linear = Int8Linear | DenseLinear


def make_linear(weight: torch.Tensor, precision: str) -> Linear:
    if precision == "int8":
        return Int8Linear.quantize(weight)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return DenseLinear(weight.detach().to(dtype).contiguous())


# --- configuration ------------------------------------------------------------------------------
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_buckets: int
    max_distance: int
    eps: float
    activation: str
    gated: bool
    scale_decoder_outputs: bool
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int

    @property
    def inner(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf(cls, config: Any) -> EngineConfig:
        act = str(config.dense_act_fn)
        if act not in _ACTIVATIONS:
            raise ModelLoadError(f"unsupported T5 activation {act!r}")
        return cls(
            vocab_size=int(config.vocab_size),
            d_model=int(config.d_model),
            d_kv=int(config.d_kv),
            num_heads=int(config.num_heads),
            d_ff=int(config.d_ff),
            num_layers=int(config.num_layers),
            num_decoder_layers=int(config.num_decoder_layers),
            num_buckets=int(config.relative_attention_num_buckets),
            max_distance=int(config.relative_attention_max_distance),
            eps=float(config.layer_norm_epsilon),
            activation=act,
            gated=bool(config.is_gated_act),
            # transformers 5 derives this from the checkpoint's tie_word_embeddings; FRED-T5
            # (T5 v1.1 style) does not scale.
            scale_decoder_outputs=bool(getattr(config, "scale_decoder_outputs", False)),
            pad_token_id=int(config.pad_token_id or 0),
            eos_token_id=int(config.eos_token_id if config.eos_token_id is not None else 1),
            decoder_start_token_id=int(config.decoder_start_token_id or 0),
        )


# --- layers -------------------------------------------------------------------------------------
@dataclass(slots=True)
class FeedForward:
    norm: torch.Tensor
    wi: Linear  # gated: [wi_0; wi_1] fused
    wo: Linear


@dataclass(slots=True)
class EncoderLayer:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    ff: FeedForward


@dataclass(slots=True)
class DecoderLayer:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    cross_norm: torch.Tensor
    cross_q: Linear
    cross_kv: Linear
    cross_o: Linear
    ff: FeedForward


def _encoder_layer(t: dict[str, torch.Tensor], lin: dict[str, Linear], i: int) -> EncoderLayer:
    p = f"enc.{i}"
    ff = FeedForward(norm=t[f"{p}.ff.norm"], wi=lin[f"{p}.ff.wi"], wo=lin[f"{p}.ff.wo"])
    return EncoderLayer(attn_norm=t[f"{p}.attn_norm"], qkv=lin[f"{p}.qkv"], o=lin[f"{p}.o"], ff=ff)


def _decoder_layer(t: dict[str, torch.Tensor], lin: dict[str, Linear], i: int) -> DecoderLayer:
    p = f"dec.{i}"
    return DecoderLayer(
        attn_norm=t[f"{p}.attn_norm"],
        qkv=lin[f"{p}.qkv"],
        o=lin[f"{p}.o"],
        cross_norm=t[f"{p}.cross_norm"],
        cross_q=lin[f"{p}.cross_q"],
        cross_kv=lin[f"{p}.cross_kv"],
        cross_o=lin[f"{p}.cross_o"],
        ff=FeedForward(norm=t[f"{p}.ff.norm"], wi=lin[f"{p}.ff.wi"], wo=lin[f"{p}.ff.wo"]),
    )


@dataclass(slots=True)
class DecoderState:
    """One request's decoder memory: cross-attention keys/values and the self-attention cache."""

    cross_k: list[torch.Tensor]  # per layer [B_enc, H, S, d_kv]
    cross_v: list[torch.Tensor]
    cross_mask: torch.Tensor | None  # [B_enc, 1, 1, S] additive, None when nothing is padded
    self_k: list[torch.Tensor]  # per layer [B, H, max_len, d_kv]
    self_v: list[torch.Tensor]
    bias: torch.Tensor  # [1, H, max_len, max_len]: relative position bias + causal mask
    length: int = 0

    @property
    def batch(self) -> int:
        return int(self.self_k[0].shape[0])

    @property
    def max_len(self) -> int:
        return int(self.self_k[0].shape[2])

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row ``i`` of the cache becomes the old row ``index[i]``."""
        n = self.length
        for cache in (self.self_k, self.self_v):
            for t in cache:
                t[:, :, :n] = t[index, :, :n]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # T5LayerNorm (no mean, no bias), its very formula: measured ~1.7x faster on the CPU than
    # F.rms_norm (which dispatches more ops), and a decoder step runs 73 of them.
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _relative_bucket(
    relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    # Mirrors T5Attention._relative_position_bucket (tests compare against transformers).
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).to(torch.long) * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (
        torch.log(relative.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative, large)


# --- the forward pass, one layer at a time ------------------------------------------------------
# Module functions of the config (not engine methods) so that a pass can also run over layers
# built one at a time (``doppelbot.model.check``'s reference side).
def _split_heads(cfg: EngineConfig, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    b, t, _ = x.shape
    x = x.view(b, t, parts, cfg.num_heads, cfg.d_kv).permute(2, 0, 3, 1, 4)
    return tuple(x.unbind(0))


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def _feed_forward(cfg: EngineConfig, ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
    h = ff.wi(_rms_norm(x, ff.norm, cfg.eps))
    act = _ACTIVATIONS[cfg.activation]
    if cfg.gated:
        gate, up = h.split(cfg.d_ff, dim=-1)
        h = act(gate) * up
    else:
        h = act(h)
    return x + ff.wo(h)


def position_bias(
    cfg: EngineConfig, table: torch.Tensor, q_len: int, k_len: int, *, bidirectional: bool
) -> torch.Tensor:
    ctx = torch.arange(q_len, dtype=torch.long)[:, None]
    mem = torch.arange(k_len, dtype=torch.long)[None, :]
    buckets = _relative_bucket(mem - ctx, bidirectional, cfg.num_buckets, cfg.max_distance)
    return F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)  # [1, H, q, k]


def causal_bias(cfg: EngineConfig, table: torch.Tensor, length: int) -> torch.Tensor:
    """Decoder self-attention: relative position bias + causal mask ``[1, H, L, L]``."""
    bias = position_bias(cfg, table, length, length, bidirectional=False)
    return (bias + torch.full((length, length), _NEG).triu(1)).contiguous()


def encoder_block(
    cfg: EngineConfig, layer: EncoderLayer, x: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    q, k, v = _split_heads(cfg, layer.qkv(_rms_norm(x, layer.attn_norm, cfg.eps)), 3)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    x = x + layer.o(_merge_heads(a))
    return _feed_forward(cfg, layer.ff, x)


def cross_keys_values(
    cfg: EngineConfig, layer: DecoderLayer, encoded: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = _split_heads(cfg, layer.cross_kv(encoded), 2)
    return k.contiguous(), v.contiguous()


def decoder_block(
    cfg: EngineConfig,
    layer: DecoderLayer,
    x: torch.Tensor,
    state: DecoderState,
    i: int,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Layer ``i`` over ``x`` ``[B, T, D]``, the tokens after the ``state.length`` cached ones
    (``state.length`` itself is advanced by the caller, once per pass)."""
    b, t = x.shape[0], x.shape[1]
    start, end = state.length, state.length + t
    q, k, v = _split_heads(cfg, layer.qkv(_rms_norm(x, layer.attn_norm, cfg.eps)), 3)
    state.self_k[i][:, :, start:end] = k
    state.self_v[i][:, :, start:end] = v
    a = F.scaled_dot_product_attention(
        q, state.self_k[i][:, :, :end], state.self_v[i][:, :, :end], attn_mask=mask, scale=1.0
    )
    x = x + layer.o(_merge_heads(a))
    (cq,) = _split_heads(cfg, layer.cross_q(_rms_norm(x, layer.cross_norm, cfg.eps)), 1)
    x = x + layer.cross_o(_merge_heads(_cross_attention(state, i, cq, b)))
    return _feed_forward(cfg, layer.ff, x)


def _cross_attention(state: DecoderState, i: int, q: torch.Tensor, batch: int) -> torch.Tensor:
    k, v = state.cross_k[i], state.cross_v[i]
    if k.shape[0] == batch:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=state.cross_mask, scale=1.0)
    # Beams of one input share its encoder states: fold the beams into the query axis
    # instead of copying keys/values per beam (exact: cross-attention has no query bias).
    _, h, t, d = q.shape
    folded = q.transpose(0, 1).reshape(1, h, batch * t, d)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=state.cross_mask, scale=1.0)
    return out.reshape(h, batch, t, d).transpose(0, 1)


def final_decoder_norm(cfg: EngineConfig, x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    x = _rms_norm(x, norm, cfg.eps)
    if cfg.scale_decoder_outputs:
        x = x * (cfg.d_model**-0.5)
    return x


def _padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return ((1.0 - attention_mask[:, None, None, :].float()) * _NEG).contiguous()


# --- names and shapes ---------------------------------------------------------------------------
def _hf_sources(cfg: EngineConfig) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """Engine tensor/linear names → the ``T5ForConditionalGeneration`` weights they come from
    (several for a fused linear, concatenated along the output rows). The one naming plan
    used to build, save and load an engine; linears are in build order, layer by layer."""
    bias = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    tensors = {
        "embed": "shared.weight",
        "enc_bias_table": f"encoder.{bias}",
        "dec_bias_table": f"decoder.{bias}",
        "enc_final_norm": "encoder.final_layer_norm.weight",
        "dec_final_norm": "decoder.final_layer_norm.weight",
    }
    linears: dict[str, tuple[str, ...]] = {}

    def attn(prefix: str, hf: str, fused: str = "qkv") -> None:
        parts = {"qkv": ("q", "k", "v"), "kv": ("k", "v"), "q": ("q",), "o": ("o",)}[fused]
        linears[prefix] = tuple(f"{hf}.{x}.weight" for x in parts)

    def ff(prefix: str, hf: str) -> None:
        dense = f"{hf}.DenseReluDense"
        tensors[f"{prefix}.norm"] = f"{hf}.layer_norm.weight"
        wi = ("wi_0", "wi_1") if cfg.gated else ("wi",)
        linears[f"{prefix}.wi"] = tuple(f"{dense}.{x}.weight" for x in wi)
        linears[f"{prefix}.wo"] = (f"{dense}.wo.weight",)

    for i in range(cfg.num_layers):
        p, hf = f"enc.{i}", f"encoder.block.{i}.layer"
        tensors[f"{p}.attn_norm"] = f"{hf}.0.layer_norm.weight"
        attn(f"{p}.qkv", f"{hf}.0.SelfAttention")
        attn(f"{p}.o", f"{hf}.0.SelfAttention", "o")
        ff(f"{p}.ff", f"{hf}.1")
    for i in range(cfg.num_decoder_layers):
        p, hf = f"dec.{i}", f"decoder.block.{i}.layer"
        tensors[f"{p}.attn_norm"] = f"{hf}.0.layer_norm.weight"
        attn(f"{p}.qkv", f"{hf}.0.SelfAttention")
        attn(f"{p}.o", f"{hf}.0.SelfAttention", "o")
        tensors[f"{p}.cross_norm"] = f"{hf}.1.layer_norm.weight"
        attn(f"{p}.cross_q", f"{hf}.1.EncDecAttention", "q")
        attn(f"{p}.cross_kv", f"{hf}.1.EncDecAttention", "kv")
        attn(f"{p}.cross_o", f"{hf}.1.EncDecAttention", "o")
        ff(f"{p}.ff", f"{hf}.2")
    linears["lm_head"] = ("lm_head.weight",)
    return tensors, linears


def _hf_shape(cfg: EngineConfig, name: str) -> list[int]:
    """Shape of one ``T5ForConditionalGeneration`` weight, from the config alone."""
    d, inner = cfg.d_model, cfg.inner
    last = name.removesuffix(".weight").rsplit(".", 1)[-1]
    if name in ("shared.weight", "lm_head.weight"):
        return [cfg.vocab_size, d]
    if last == "relative_attention_bias":
        return [cfg.num_buckets, cfg.num_heads]
    if last in ("q", "k", "v"):
        return [inner, d]
    if last == "o":
        return [d, inner]
    if last in ("wi", "wi_0", "wi_1"):
        return [cfg.d_ff, d]
    if last == "wo":
        return [d, cfg.d_ff]
    return [d]  # layer norms


_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int8: "I8"}


def engine_layout(cfg: EngineConfig, precision: str) -> list[tuple[str, str, list[int]]]:
    """``(name, safetensors dtype, shape)`` of every tensor an engine saves, in file order:
    the plain tensors, then per linear its int8 weight and scales (or its weight)."""
    tensor_src, linear_src = _hf_sources(cfg)
    out = [(name, "F32", _hf_shape(cfg, src)) for name, src in tensor_src.items()]
    for name, srcs in linear_src.items():
        shapes = [_hf_shape(cfg, s) for s in srcs]
        rows, cols = sum(s[0] for s in shapes), shapes[0][1]
        if precision == "int8":
            out += [(f"{name}.qweight", "I8", [rows, cols]), (f"{name}.scale", "F32", [rows])]
        else:
            out.append((f"{name}.weight", "BF16" if precision == "bf16" else "F32", [rows, cols]))
    return out


def engine_bytes(cfg: EngineConfig, precision: str) -> int:
    """Size of the engine's weights (what the cache file and the loaded engine hold)."""
    sizes = {"F32": 4, "BF16": 2, "I8": 1}
    return sum(sizes[dt] * math.prod(shape) for _name, dt, shape in engine_layout(cfg, precision))


def largest_linear(cfg: EngineConfig, *, head: bool = True) -> int:
    """Elements of the largest (fused) linear (``head=False``: of the layers' linears): the
    biggest weight a build converts at once."""
    _tensors, linears = _hf_sources(cfg)
    return max(
        sum(math.prod(_hf_shape(cfg, s)) for s in srcs)
        for name, srcs in linears.items()
        if head or name != "lm_head"
    )


class Sink:
    """Where a build writes each finished tensor (``EngineWriter``, a cache entry)."""

    def put(self, name: str, tensor: torch.Tensor) -> None:
        raise NotImplementedError


WeightFn = Callable[[str], torch.Tensor]


def fused_weight(weight: WeightFn, srcs: tuple[str, ...]) -> torch.Tensor:
    """The fp32 weight of one (fused) linear: its sources stacked along the output rows."""
    parts = [weight(x).to(torch.float32) for x in srcs]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _layer_weights(
    cfg: EngineConfig, weight: WeightFn, precision: str, prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, Linear]]:
    tensor_src, linear_src = _hf_sources(cfg)
    tensors = {
        n: weight(src).to(torch.float32) for n, src in tensor_src.items() if n.startswith(prefix)
    }
    linears = {
        n: make_linear(fused_weight(weight, srcs), precision)
        for n, srcs in linear_src.items()
        if n.startswith(prefix)
    }
    return tensors, linears


def build_encoder_layer(
    cfg: EngineConfig, weight: WeightFn, precision: str, i: int
) -> EncoderLayer:
    """Encoder layer ``i`` alone (a pass that holds one layer at a time)."""
    return _encoder_layer(*_layer_weights(cfg, weight, precision, f"enc.{i}."), i)


def build_decoder_layer(
    cfg: EngineConfig, weight: WeightFn, precision: str, i: int
) -> DecoderLayer:
    """Decoder layer ``i`` alone."""
    return _decoder_layer(*_layer_weights(cfg, weight, precision, f"dec.{i}."), i)


@dataclass(slots=True)
class T5Engine:
    """A T5 encoder-decoder as plain tensors; see the module docstring.

    ``tensors`` and ``linears`` hold every weight under its engine name (what is saved); the
    layer lists are views onto them, built in ``__post_init__``.
    """

    config: EngineConfig
    precision: str
    tensors: dict[str, torch.Tensor]
    linears: dict[str, Linear]
    meta: dict[str, Any] = field(default_factory=dict)
    embed: torch.Tensor = field(init=False)  # [V, D] fp32, shared by encoder and decoder
    enc_bias_table: torch.Tensor = field(init=False)  # [num_buckets, H]
    dec_bias_table: torch.Tensor = field(init=False)
    enc_final_norm: torch.Tensor = field(init=False)
    dec_final_norm: torch.Tensor = field(init=False)
    encoder: list[EncoderLayer] = field(init=False)
    decoder: list[DecoderLayer] = field(init=False)
    lm_head: Linear = field(init=False)

    def __post_init__(self) -> None:
        t, lin, cfg = self.tensors, self.linears, self.config
        self.embed = t["embed"]
        self.enc_bias_table, self.dec_bias_table = t["enc_bias_table"], t["dec_bias_table"]
        self.enc_final_norm, self.dec_final_norm = t["enc_final_norm"], t["dec_final_norm"]
        self.lm_head = lin["lm_head"]
        self.encoder = [_encoder_layer(t, lin, i) for i in range(cfg.num_layers)]
        self.decoder = [_decoder_layer(t, lin, i) for i in range(cfg.num_decoder_layers)]

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        cfg: EngineConfig,
        weight: WeightFn,
        precision: str = "int8",
        *,
        progress: Callable[[int, int], None] | None = None,
        sink: Sink | None = None,
        converted: Callable[[tuple[str, ...]], None] | None = None,
    ) -> T5Engine:
        """Build from ``weight(hf_name)`` → that weight (any float dtype), asked for one at a
        time, each exactly once, in ``engine_layout`` order — so a checkpoint can be read,
        merged and converted weight by weight, never whole.

        Every finished tensor goes to ``sink`` (in ``engine_layout`` order: the cache file is
        written during the build instead of from a second copy afterwards); ``converted(srcs)``
        is told when the source weights of a linear are no longer needed.
        """
        if precision not in ("int8", "bf16", "fp32"):
            raise ModelLoadError(f"unknown precision {precision!r}")
        tensor_src, linear_src = _hf_sources(cfg)
        layout = {name: shape for name, _dt, shape in engine_layout(cfg, precision)}

        def checked(name: str, t: torch.Tensor) -> torch.Tensor:
            if list(t.shape) != layout[name]:
                raise ModelLoadError(
                    f"weight {name}: shape {list(t.shape)}, the config says {layout[name]}"
                )
            if sink is not None:
                sink.put(name, t)
            return t

        tensors = {
            name: checked(name, weight(src).to(torch.float32)) for name, src in tensor_src.items()
        }
        linears: dict[str, Linear] = {}
        for done, (name, srcs) in enumerate(linear_src.items(), 1):
            w = fused_weight(weight, srcs)
            if precision == "int8":
                q, scale = quantize_int8(w)
                del w
                linears[name] = Int8Linear.from_int8(
                    checked(f"{name}.qweight", q), checked(f"{name}.scale", scale)
                )
                del q, scale
            else:
                dense = make_linear(w, precision)
                del w
                assert isinstance(dense, DenseLinear)
                linears[name] = DenseLinear(checked(f"{name}.weight", dense.weight))
            if converted is not None:
                converted(srcs)
            if done % 16 == 0:
                release_free_memory()  # the fp32 transients, before they pile up in arenas
            if progress is not None:
                progress(done, len(linear_src))
        return cls(cfg, precision, tensors, linears)

    @classmethod
    def from_hf(
        cls,
        model: Any,
        precision: str = "int8",
        *,
        consume: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> T5Engine:
        """Build from a (merged, fp32) ``T5ForConditionalGeneration`` in memory.

        With ``consume`` each converted linear of ``model`` is released right away (moved to
        the meta device), so building never holds two full copies; the model is unusable
        afterwards.
        """
        cfg = EngineConfig.from_hf(model.config)
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        tensor_src, _linear_src = _hf_sources(cfg)
        plain = set(tensor_src.values())

        def weight(name: str) -> torch.Tensor:
            # Plain tensors are kept by the engine: copies, not views of the model's storage.
            return sd[name].float().clone() if name in plain else sd[name]

        def converted(srcs: tuple[str, ...]) -> None:
            for name in srcs:
                del sd[name]
                model.get_submodule(name.removesuffix(".weight")).to("meta")

        engine = cls.build(
            cfg, weight, precision, progress=progress, converted=converted if consume else None
        )
        if consume:
            model.to("meta")
        return engine

    # --- forward ---------------------------------------------------------------------------
    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encoder hidden states ``[B, S, D]`` (after the final norm)."""
        cfg = self.config
        x = F.embedding(input_ids, self.embed)
        s = input_ids.shape[1]
        bias = position_bias(cfg, self.enc_bias_table, s, s, bidirectional=True)
        pad = _padding_mask(attention_mask)
        # Contiguous once: attention would otherwise copy the [1, H, S, S] mask in every layer.
        mask = (bias if pad is None else bias + pad).contiguous()
        for layer in self.encoder:
            x = encoder_block(cfg, layer, x, mask)
        return _rms_norm(x, self.enc_final_norm, cfg.eps)

    def start(
        self,
        encoded: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        batch: int | None = None,
        max_len: int = 64,
    ) -> DecoderState:
        """Decoder memory for ``batch`` rows (beams) over ``encoded``; room for ``max_len``
        decoder tokens (the start token included)."""
        cfg = self.config
        batch = batch or int(encoded.shape[0])
        cross = [cross_keys_values(cfg, layer, encoded) for layer in self.decoder]
        shape = (batch, cfg.num_heads, max_len, cfg.d_kv)
        return DecoderState(
            cross_k=[k for k, _v in cross],
            cross_v=[v for _k, v in cross],
            cross_mask=_padding_mask(attention_mask),
            self_k=[torch.zeros(shape) for _ in self.decoder],
            self_v=[torch.zeros(shape) for _ in self.decoder],
            bias=causal_bias(cfg, self.dec_bias_table, max_len),
        )

    def decode(self, state: DecoderState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``[B, T]`` after what ``state`` holds; logits ``[B, T, V]``."""
        cfg = self.config
        t = tokens.shape[1]
        start, end = state.length, state.length + t
        if end > state.max_len:
            raise ValueError(f"decoder cache holds {state.max_len} tokens, asked for {end}")
        mask = state.bias[:, :, start:end, :end]
        x = F.embedding(tokens, self.embed)
        for i, layer in enumerate(self.decoder):
            x = decoder_block(cfg, layer, x, state, i, mask)
        state.length = end
        return self.lm_head(final_decoder_norm(cfg, x, self.dec_final_norm))

    # --- persistence -----------------------------------------------------------------------
    def tensors_in_order(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every saved tensor, in ``engine_layout`` order."""
        yield from self.tensors.items()
        for name, layer in self.linears.items():
            if isinstance(layer, Int8Linear):
                q, scale = layer.int8_tensors()
                yield f"{name}.qweight", q
                yield f"{name}.scale", scale
            else:
                yield f"{name}.weight", layer.weight

    def save(self, folder: Path) -> None:
        """``engine.safetensors`` + ``engine.json`` in ``folder`` (which must exist)."""
        with EngineWriter(folder, self.config, self.precision) as writer:
            for name, t in self.tensors_in_order():
                writer.put(name, t)
            writer.finish(self.meta)

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        progress: Callable[[int, int], None] | None = None,
        workers: int | None = None,
    ) -> T5Engine:
        """Load what ``save`` wrote.

        int8 weights are read one tensor at a time and handed to ``workers`` threads (default:
        torch's thread count) that repack them for fbgemm — the repacking, not the reading,
        is the slow part — with at most a few tensors in flight, so memory stays at the size
        of the model.
        """
        try:
            meta = json.loads((folder / "engine.json").read_text(encoding="utf-8"))
            if meta.get("format") != ENGINE_FORMAT:
                raise ModelLoadError(f"{folder}: engine format {meta.get('format')!r}")
            cfg = EngineConfig(**meta["config"])
            precision = str(meta["precision"])
            reader = _TensorReader(folder / "engine.safetensors")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"cannot read the model cache {folder}: {exc}") from exc
        tensor_names, linear_names = _hf_sources(cfg)
        workers = workers or max(1, torch.get_num_threads())
        with reader, ThreadPoolExecutor(workers, thread_name_prefix="doppelbot-pack") as pool:
            tensors = {name: reader.get(name) for name in tensor_names}
            pending: dict[str, Future[Linear]] = {}
            for done, name in enumerate(linear_names, 1):
                if precision == "int8":
                    q, scale = reader.get(f"{name}.qweight"), reader.get(f"{name}.scale")
                    pending[name] = pool.submit(Int8Linear.from_int8, q, scale)
                    # Bound what is read but not yet packed (each holds a raw int8 copy).
                    waiting = [f for f in pending.values() if not f.done()]
                    if len(waiting) > workers:
                        wait(waiting, return_when=FIRST_COMPLETED)
                    if done % 8 == 0:
                        # The raw copies are freed into malloc's arenas, which keep them:
                        # returned now, they do not pile up on top of the packed weights.
                        release_free_memory()
                else:
                    done_future: Future[Linear] = Future()
                    done_future.set_result(DenseLinear(reader.get(f"{name}.weight")))
                    pending[name] = done_future
                if progress is not None:
                    progress(done, len(linear_names))
            linears = {name: future.result() for name, future in pending.items()}
        extra = {k: v for k, v in meta.items() if k not in ("format", "precision", "config")}
        return cls(cfg, precision, tensors, linears, meta=extra)


# --- the file format ----------------------------------------------------------------------------
_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I8": torch.int8,
    "I64": torch.int64,
    "F64": torch.float64,
}


class _OwnsFile:
    """Closes ``_fh`` on ``close()`` or at the end of a ``with`` block."""

    _fh: BinaryIO

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()


class EngineWriter(Sink, _OwnsFile):
    """Writes ``engine.safetensors`` tensor by tensor, in ``engine_layout`` order, then
    ``engine.json``.

    The header (names, shapes, offsets) follows from the config alone, so it is written
    first and each tensor can go to disk the moment it exists — no second copy of the model
    is ever assembled for saving (``safetensors.torch.save_file`` needs all tensors at once
    and serialises them to bytes first: three copies of a 2 GB model at the end of a build).
    The result is a regular safetensors file.
    """

    def __init__(self, folder: Path, cfg: EngineConfig, precision: str) -> None:
        self.folder, self.config, self.precision = folder, cfg, precision
        self._layout = engine_layout(cfg, precision)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        sizes = {"F32": 4, "BF16": 2, "I8": 1}
        for name, dtype, shape in self._layout:
            end = offset + sizes[dtype] * math.prod(shape)
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
            offset = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors does
        self._fh = (folder / "engine.safetensors").open("wb")
        self._fh.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def put(self, name: str, tensor: torch.Tensor) -> None:
        expected, dtype, shape = self._layout[self._next]
        got = (name, _DTYPE_NAMES.get(tensor.dtype), list(tensor.shape))
        if got != (expected, dtype, shape):
            raise ValueError(
                f"engine file: expected {expected} {dtype}{shape}, got {name} "
                f"{tensor.dtype}{list(tensor.shape)}"
            )
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            self._fh.write(memoryview(data.numpy()))
        self._next += 1

    def finish(self, meta: dict[str, Any]) -> None:
        """Close the weights file (every tensor must have been written) and write
        ``engine.json`` with ``meta``."""
        if self._next != len(self._layout):
            raise ValueError(f"engine file: {len(self._layout) - self._next} tensors missing")
        self._fh.close()
        info = {
            "format": ENGINE_FORMAT,
            "precision": self.precision,
            "config": asdict(self.config),
            **meta,
        }
        (self.folder / "engine.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


class _TensorReader(_OwnsFile):
    """Reads single tensors of a safetensors file with plain ``readinto``.

    ``safetensors.safe_open`` memory-maps the file, and every page it touched stays in the
    process' resident set until the file is closed — loading a 2 GB cache that way peaks at
    twice the model. Reading each tensor straight into its own buffer keeps the peak at the
    model plus one tensor.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = path.open("rb")
        try:
            (size,) = _unpack_u64(self._fh.read(8))
            header = json.loads(self._fh.read(size))
        except BaseException:
            self._fh.close()
            raise
        header.pop("__metadata__", None)
        self._header: dict[str, dict[str, Any]] = header
        self._base = 8 + size

    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> list[int]:
        return list(self._header[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        try:
            info = self._header[name]
            dtype = _ST_DTYPES[info["dtype"]]
        except KeyError:
            raise ModelLoadError(f"{self.path} lacks tensor {name!r} (or its type)") from None
        start, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else None
        if view is not None:
            self._fh.seek(self._base + start)
            got = self._fh.readinto(view)
            if got != end - start:
                raise ModelLoadError(f"{self.path} is truncated at tensor {name!r}")
        return out


def _unpack_u64(data: bytes) -> tuple[int]:
    if len(data) != 8:
        raise ValueError("not a safetensors file")
    return struct.unpack("<Q", data)


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, inflating RSS after a
    load that allocated and freed gigabytes)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)

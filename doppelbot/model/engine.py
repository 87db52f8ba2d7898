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

The engine saves itself as one safetensors file (plain int8 weights + scales) and loads back
tensor by tensor with plain reads (no mmap, never an fp32 model), so the peak memory stays at the
size of the int8 model. fbgemm's repacking of the weights at load is the bulk of a cold start;
it runs on several threads.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from doppelbot.errors import ModelLoadError

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
        limit = int8_weight_limit()
        w = weight.detach().to(torch.float32)
        scale = (w.abs().amax(dim=1) / float(limit)).clamp_min(1e-12)
        qweight = torch.round(w / scale[:, None]).clamp_(-limit, limit).to(torch.int8)
        return cls.from_int8(qweight, scale)

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
    # T5LayerNorm (no mean, no bias) as one op instead of five.
    return F.rms_norm(x, weight.shape, weight, eps)


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


def _hf_sources(cfg: EngineConfig) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """Engine tensor/linear names → the ``T5ForConditionalGeneration`` weights they come from
    (several for a fused linear, concatenated along the output rows). The one naming plan
    used to build, save and load an engine."""
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

        def ff(p: str) -> FeedForward:
            return FeedForward(norm=t[f"{p}.ff.norm"], wi=lin[f"{p}.ff.wi"], wo=lin[f"{p}.ff.wo"])

        self.encoder = [
            EncoderLayer(
                attn_norm=t[f"enc.{i}.attn_norm"],
                qkv=lin[f"enc.{i}.qkv"],
                o=lin[f"enc.{i}.o"],
                ff=ff(f"enc.{i}"),
            )
            for i in range(cfg.num_layers)
        ]
        self.decoder = [
            DecoderLayer(
                attn_norm=t[f"dec.{i}.attn_norm"],
                qkv=lin[f"dec.{i}.qkv"],
                o=lin[f"dec.{i}.o"],
                cross_norm=t[f"dec.{i}.cross_norm"],
                cross_q=lin[f"dec.{i}.cross_q"],
                cross_kv=lin[f"dec.{i}.cross_kv"],
                cross_o=lin[f"dec.{i}.cross_o"],
                ff=ff(f"dec.{i}"),
            )
            for i in range(cfg.num_decoder_layers)
        ]

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_hf(
        cls,
        model: Any,
        precision: str = "int8",
        *,
        consume: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> T5Engine:
        """Build from a (merged, fp32) ``T5ForConditionalGeneration``.

        Weights are converted one layer at a time. With ``consume`` each converted block of
        ``model`` is released right away (moved to the meta device), so building an fp32 engine
        never holds two fp32 copies of the model; the model is unusable afterwards.
        """
        if precision not in ("int8", "bf16", "fp32"):
            raise ModelLoadError(f"unknown precision {precision!r}")
        cfg = EngineConfig.from_hf(model.config)
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        tensor_src, linear_src = _hf_sources(cfg)
        # Plain tensors first: with ``consume`` block 0 (holding the bias tables) goes early.
        tensors = {name: sd[src].float().clone() for name, src in tensor_src.items()}
        blocks = [(f"enc.{i}.", model.encoder.block[i]) for i in range(cfg.num_layers)]
        blocks += [(f"dec.{i}.", model.decoder.block[i]) for i in range(cfg.num_decoder_layers)]
        blocks.append(("lm_head", model))
        linears: dict[str, Linear] = {}
        for done, (prefix, module) in enumerate(blocks, 1):
            for name, srcs in linear_src.items():
                if name.startswith(prefix):
                    weight = (
                        torch.cat([sd[x].float() for x in srcs]) if len(srcs) > 1 else sd[srcs[0]]
                    )
                    linears[name] = make_linear(weight.float(), precision)
                    if consume:
                        for x in srcs:
                            del sd[x]
            if consume:
                module.to("meta")
            if progress is not None:
                progress(done, len(blocks))
        return cls(cfg, precision, tensors, linears)

    # --- forward ---------------------------------------------------------------------------
    def _split_heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        b, t, _ = x.shape
        cfg = self.config
        x = x.view(b, t, parts, cfg.num_heads, cfg.d_kv).permute(2, 0, 3, 1, 4)
        return tuple(x.unbind(0))

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, h * d)

    def _ff(self, ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        h = ff.wi(_rms_norm(x, ff.norm, cfg.eps))
        act = _ACTIVATIONS[cfg.activation]
        if cfg.gated:
            gate, up = h.split(cfg.d_ff, dim=-1)
            h = act(gate) * up
        else:
            h = act(h)
        return x + ff.wo(h)

    def _position_bias(
        self, table: torch.Tensor, q_len: int, k_len: int, *, bidirectional: bool
    ) -> torch.Tensor:
        cfg = self.config
        ctx = torch.arange(q_len, dtype=torch.long)[:, None]
        mem = torch.arange(k_len, dtype=torch.long)[None, :]
        buckets = _relative_bucket(mem - ctx, bidirectional, cfg.num_buckets, cfg.max_distance)
        return F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)  # [1, H, q, k]

    @staticmethod
    def _padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return ((1.0 - attention_mask[:, None, None, :].float()) * _NEG).contiguous()

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encoder hidden states ``[B, S, D]`` (after the final norm)."""
        cfg = self.config
        x = F.embedding(input_ids, self.embed)
        s = input_ids.shape[1]
        bias = self._position_bias(self.enc_bias_table, s, s, bidirectional=True)
        pad = self._padding_mask(attention_mask)
        mask = bias if pad is None else bias + pad
        for layer in self.encoder:
            q, k, v = self._split_heads(layer.qkv(_rms_norm(x, layer.attn_norm, cfg.eps)), 3)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
            x = x + layer.o(self._merge_heads(a))
            x = self._ff(layer.ff, x)
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
        cross_k, cross_v = [], []
        for layer in self.decoder:
            k, v = self._split_heads(layer.cross_kv(encoded), 2)
            cross_k.append(k.contiguous())
            cross_v.append(v.contiguous())
        shape = (batch, cfg.num_heads, max_len, cfg.d_kv)
        bias = self._position_bias(self.dec_bias_table, max_len, max_len, bidirectional=False)
        causal = torch.full((max_len, max_len), _NEG).triu(1)
        return DecoderState(
            cross_k=cross_k,
            cross_v=cross_v,
            cross_mask=self._padding_mask(attention_mask),
            self_k=[torch.zeros(shape) for _ in self.decoder],
            self_v=[torch.zeros(shape) for _ in self.decoder],
            bias=(bias + causal).contiguous(),
        )

    def _cross(self, state: DecoderState, i: int, q: torch.Tensor, batch: int) -> torch.Tensor:
        k, v = state.cross_k[i], state.cross_v[i]
        if k.shape[0] == batch:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=state.cross_mask, scale=1.0)
        # Beams of one input share its encoder states: fold the beams into the query axis
        # instead of copying keys/values per beam (exact: cross-attention has no query bias).
        _, h, t, d = q.shape
        folded = q.transpose(0, 1).reshape(1, h, batch * t, d)
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=state.cross_mask, scale=1.0)
        return out.reshape(h, batch, t, d).transpose(0, 1)

    def decode(self, state: DecoderState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``[B, T]`` after what ``state`` holds; logits ``[B, T, V]``."""
        cfg = self.config
        b, t = tokens.shape
        start, end = state.length, state.length + t
        if end > state.max_len:
            raise ValueError(f"decoder cache holds {state.max_len} tokens, asked for {end}")
        mask = state.bias[:, :, start:end, :end]
        x = F.embedding(tokens, self.embed)
        for i, layer in enumerate(self.decoder):
            q, k, v = self._split_heads(layer.qkv(_rms_norm(x, layer.attn_norm, cfg.eps)), 3)
            state.self_k[i][:, :, start:end] = k
            state.self_v[i][:, :, start:end] = v
            a = F.scaled_dot_product_attention(
                q,
                state.self_k[i][:, :, :end],
                state.self_v[i][:, :, :end],
                attn_mask=mask,
                scale=1.0,
            )
            x = x + layer.o(self._merge_heads(a))
            (cq,) = self._split_heads(layer.cross_q(_rms_norm(x, layer.cross_norm, cfg.eps)), 1)
            x = x + layer.cross_o(self._merge_heads(self._cross(state, i, cq, b)))
            x = self._ff(layer.ff, x)
        state.length = end
        x = _rms_norm(x, self.dec_final_norm, cfg.eps)
        if cfg.scale_decoder_outputs:
            x = x * (cfg.d_model**-0.5)
        return self.lm_head(x)

    # --- persistence -----------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """``engine.safetensors`` + ``engine.json`` in ``folder`` (which must exist)."""
        from safetensors.torch import save_file

        out = {name: t.contiguous() for name, t in self.tensors.items()}
        for name, layer in self.linears.items():
            if isinstance(layer, Int8Linear):
                out[f"{name}.qweight"], out[f"{name}.scale"] = layer.int8_tensors()
            else:
                out[f"{name}.weight"] = layer.weight.contiguous()
        save_file(out, str(folder / "engine.safetensors"))
        meta = {
            "format": ENGINE_FORMAT,
            "precision": self.precision,
            "config": asdict(self.config),
            **self.meta,
        }
        (folder / "engine.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

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


_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I8": torch.int8,
    "I64": torch.int64,
    "F64": torch.float64,
}


class _TensorReader:
    """Reads single tensors of a safetensors file with plain ``readinto``.

    ``safetensors.safe_open`` memory-maps the file, and every page it touched stays in the
    process' resident set until the file is closed — loading a 2 GB cache that way peaks at
    twice the model. Reading each tensor straight into its own buffer keeps the peak at the
    model plus one tensor.
    """

    def __init__(self, path: Path) -> None:
        self._fh = path.open("rb")
        (size,) = _unpack_u64(self._fh.read(8))
        header = json.loads(self._fh.read(size))
        header.pop("__metadata__", None)
        self._header: dict[str, dict[str, Any]] = header
        self._base = 8 + size

    def __enter__(self) -> _TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def get(self, name: str) -> torch.Tensor:
        try:
            info = self._header[name]
        except KeyError:
            raise ModelLoadError(f"model cache lacks tensor {name!r}") from None
        start, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else None
        if view is not None:
            self._fh.seek(self._base + start)
            got = self._fh.readinto(view)
            if got != end - start:
                raise ModelLoadError(f"model cache is truncated at tensor {name!r}")
        return out


def _unpack_u64(data: bytes) -> tuple[int]:
    import struct

    if len(data) != 8:
        raise ValueError("not a safetensors file")
    return struct.unpack("<Q", data)


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, inflating RSS after a
    load that allocated and freed gigabytes)."""
    if os.name != "posix":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

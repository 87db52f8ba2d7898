"""Pre-flight memory check: will this model / precision / batch / sequence length fit?

A 1.7 B-parameter fine-tune that runs out of memory an hour in wastes the hour; this estimates
the peak from the model's config (no weights loaded) and the data's real lengths, compares it
with the memory that is free now, and refuses with a message that says what would fit.

The estimate is deliberately simple and a little pessimistic: weights at their storage
precision, LoRA weights + gradients + Adafactor state in fp32, activations per layer (all of
them, or only the layer inputs with gradient checkpointing plus one layer being recomputed),
the fp32 logits over the full vocabulary with their softmax and gradient, and a fixed runtime
overhead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from doppelbot.core.errors import PreflightError

GIB = 1024**3
CPU_OVERHEAD = int(0.7 * GIB)  # python, torch, tokenizer, the data
CUDA_OVERHEAD = int(0.8 * GIB)  # CUDA context, cuBLAS workspaces
FRAGMENTATION = 1.15  # allocator slack on top of the sum of tensors
USABLE_SHARE = 0.92  # never plan to use the last few percent of free memory


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The T5 dimensions that memory depends on."""

    vocab_size: int
    d_model: int
    d_ff: int
    d_kv: int
    num_heads: int
    num_layers: int
    num_decoder_layers: int
    gated: bool = True
    untied_lm_head: bool = True

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        proj = str(getattr(config, "feed_forward_proj", "relu"))
        return cls(
            vocab_size=int(config.vocab_size),
            d_model=int(config.d_model),
            d_ff=int(config.d_ff),
            d_kv=int(config.d_kv),
            num_heads=int(config.num_heads),
            num_layers=int(config.num_layers),
            num_decoder_layers=int(
                getattr(config, "num_decoder_layers", None) or config.num_layers
            ),
            gated=proj.startswith("gated"),
            # FRED-T5 (T5 v1.1) keeps a separate lm_head; counting it is the safe side.
            untied_lm_head=True,
        )

    @property
    def inner(self) -> int:
        return self.num_heads * self.d_kv

    def _attention(self) -> int:
        return 4 * self.d_model * self.inner

    def _ff(self) -> int:
        return (3 if self.gated else 2) * self.d_model * self.d_ff

    def linear_params(self) -> int:
        """Parameters in the blocks' Linear layers (the ones int8 quantises)."""
        enc = self.num_layers * (self._attention() + self._ff())
        dec = self.num_decoder_layers * (2 * self._attention() + self._ff())
        return enc + dec

    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model * (2 if self.untied_lm_head else 1)

    def other_params(self) -> int:
        norms = (2 * self.num_layers + 3 * self.num_decoder_layers + 2) * self.d_model
        return norms + 2 * 32 * self.num_heads  # relative position buckets

    def total_params(self) -> int:
        return self.linear_params() + self.embedding_params() + self.other_params()

    def lora_params(self, r: int, targets: list[str] | tuple[str, ...]) -> int:
        """LoRA A and B for each adapted projection (T5 module names q/k/v/o/wi/wi_0/wi_1/wo)."""
        per_attention = {
            "q": r * (self.d_model + self.inner),
            "k": r * (self.d_model + self.inner),
            "v": r * (self.d_model + self.inner),
            "o": r * (self.inner + self.d_model),
        }
        ff = {
            "wi": r * (self.d_model + self.d_ff),
            "wi_0": r * (self.d_model + self.d_ff),
            "wi_1": r * (self.d_model + self.d_ff),
            "wo": r * (self.d_ff + self.d_model),
        }
        attn = sum(per_attention.get(t, 0) for t in targets)
        ffn = sum(ff.get(t, 0) for t in targets)
        if "wi" in targets and self.gated:
            ffn += ff["wi"]  # gated FF has two input projections, both named wi_*
        enc = self.num_layers * (attn + ffn)
        dec = self.num_decoder_layers * (2 * attn + ffn)
        return enc + dec


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    weights: int
    trainable: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return (
            int((self.weights + self.trainable + self.activations + self.logits) * FRAGMENTATION)
            + self.overhead
        )

    def describe(self) -> str:
        parts = [
            ("weights", self.weights),
            ("LoRA+optimizer", self.trainable),
            ("activations", self.activations),
            ("logits", self.logits),
            ("runtime", self.overhead),
        ]
        inner = ", ".join(f"{name} {gib(v)}" for name, v in parts)
        return f"~{gib(self.total)} ({inner})"


def gib(value: int | float) -> str:
    return f"{value / GIB:.2f} GiB"


def weight_bytes(shape: ModelShape, precision: str) -> int:
    if precision == "int8":
        # LLM.int8 stores block Linear weights in int8 (+ per-row scales); k-bit preparation
        # keeps embeddings, lm_head and norms in fp32.
        linear = int(shape.linear_params() * 1.02)
        return linear + 4 * (shape.embedding_params() + shape.other_params())
    per = 2 if precision == "bf16" else 4
    return per * shape.total_params()


@dataclass(frozen=True, slots=True)
class TrainingSetup:
    """What a training run's memory depends on, besides the model's shape."""

    precision: str
    device: str
    batch_size: int
    source_len: int
    target_len: int
    lora_r: int
    lora_targets: tuple[str, ...]
    gradient_checkpointing: bool


def estimate_training_memory(shape: ModelShape, setup: TrainingSetup) -> MemoryEstimate:
    precision = setup.precision
    act = 4 if precision == "fp32" else 2
    b, s, t = setup.batch_size, max(1, setup.source_len), max(1, setup.target_len)
    d, ff, h, inner = shape.d_model, shape.d_ff, shape.num_heads, shape.inner
    ff_values = (3 if shape.gated else 2) * ff  # wi_0, wi_1 outputs and their product

    def enc_layer(tokens: int) -> int:
        return tokens * (4 * d + 4 * inner + ff_values + d) + 3 * h * tokens * tokens

    def dec_layer() -> int:
        linear = t * (6 * d + 6 * inner + ff_values + d) + 2 * s * inner
        return linear + 3 * h * (t * t + t * s)

    if setup.gradient_checkpointing:
        stored = (shape.num_layers * s + shape.num_decoder_layers * t) * d
        activations = b * act * (stored + max(enc_layer(s), dec_layer()))
    else:
        activations = (
            b * act * (shape.num_layers * enc_layer(s) + shape.num_decoder_layers * dec_layer())
        )
    logits = 3 * 4 * b * t * shape.vocab_size  # fp32 logits, log-softmax and their gradient
    lora = shape.lora_params(setup.lora_r, setup.lora_targets)
    trainable = lora * 4 * 3  # fp32 weights, gradients, optimizer state (Adafactor: less)
    overhead = CUDA_OVERHEAD if setup.device == "cuda" else CPU_OVERHEAD
    return MemoryEstimate(weight_bytes(shape, precision), trainable, activations, logits, overhead)


# --- free memory ------------------------------------------------------------------------------
def cpu_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages (POSIX), else None."""
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def cuda_available_bytes() -> int | None:
    """Free memory of this process's current GPU (``accelerate launch`` sets one per process)."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def available_bytes(device: str) -> int | None:
    return cuda_available_bytes() if device == "cuda" else cpu_available_bytes()


@dataclass(frozen=True, slots=True)
class PreflightReport:
    estimate: MemoryEstimate
    available: int | None
    setup: TrainingSetup
    max_batch: int | None  # the largest batch that would fit (None: free memory unknown)

    @property
    def fits(self) -> bool:
        return self.available is None or self.estimate.total <= self.available * USABLE_SHARE

    def describe(self) -> str:
        avail = "unknown" if self.available is None else gib(self.available)
        run = self.setup
        return (
            f"{run.device}/{run.precision}, batch {run.batch_size}, input ≤{run.source_len} "
            f"and target ≤{run.target_len} tokens: needs {self.estimate.describe()}; "
            f"free {avail}"
        )


def preflight(
    shape: ModelShape,
    setup: TrainingSetup,
    *,
    available: int | None = None,
    measure: bool = True,
) -> PreflightReport:
    """Estimate and compare; ``available`` overrides the measured free memory (tests)."""
    if available is None and measure:
        available = available_bytes(setup.device)

    def est(batch: int) -> MemoryEstimate:
        return estimate_training_memory(shape, replace(setup, batch_size=batch))

    max_batch = None
    if available is not None:
        budget = available * USABLE_SHARE
        lo, hi = 0, max(setup.batch_size, 1) * 64
        while lo < hi:  # the largest batch whose estimate fits the budget
            mid = (lo + hi + 1) // 2
            if est(mid).total <= budget:
                lo = mid
            else:
                hi = mid - 1
        max_batch = lo
    return PreflightReport(est(setup.batch_size), available, setup, max_batch)


def check(report: PreflightReport) -> None:
    """Raise ``PreflightError`` with what would fit, when the estimate does not."""
    if report.fits:
        return
    hints = []
    if report.max_batch:
        hints.append(f"--batch-size {report.max_batch} (raise --grad-accum to keep the batch)")
    else:
        if report.setup.device == "cpu":
            hints.append("a CUDA GPU (--device cuda, int8)")
        elif report.setup.precision != "int8":
            hints.append("--precision int8")
        hints.append("a lower DOPPELBOT_MAX_INPUT_TOKENS")
    raise PreflightError(
        "this fine-tune would not fit in memory: "
        + report.describe()
        + "; try "
        + " or ".join(hints)
        + " (or --no-preflight to try anyway)"
    )

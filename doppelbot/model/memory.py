"""How much memory a model load will take, how much there is, and the choice of precision on a
GPU — decided *before* anything is loaded.

Why: a load that does not fit does not fail cleanly — the kernel's OOM killer ends the whole
process (or the machine swaps itself to a standstill) minutes into the first start. Comparing an
estimate with the memory that is free turns that into one line that says what is needed, what
is there and what to do.

The estimates come from the model's config alone (no weights read) and were calibrated against
``scripts/bench_reply.py`` on the FRED-T5-1.7B shape (peak RSS, measured): each is the peak of
that kind of load plus a fixed runtime share (Python, torch, the tokenizer). "Available" is
``MemAvailable`` + free swap (a build that spills into swap is slow, not broken), or less where
a cgroup (container) limit is lower.

On CUDA the default precision (``DOPPELBOT_PRECISION=auto``) is bf16 whenever the bf16 weights
plus working room fit in the GPU's free memory — bitsandbytes int8 was measured ~5x slower than
bf16 on an H200 — and int8 otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from doppelbot.core.errors import InsufficientMemoryError
from doppelbot.model.engine import EngineConfig, engine_bytes, largest_linear

log = logging.getLogger(__name__)

GIB = 1024**3
RUNTIME = int(0.55 * GIB)  # Python + torch + tokenizer + a generation's activations
CUDA_WORK = int(1.5 * GIB)  # CUDA context, cuBLAS workspaces, activations, KV cache
USABLE_SHARE = 0.9  # never plan on the last tenth of what is free


def gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GB"


# --- estimates ------------------------------------------------------------------------------
def serve_bytes(cfg: EngineConfig, precision: str) -> int:
    """Peak of loading a built engine (the cache) and generating with it."""
    return engine_bytes(cfg, precision) + RUNTIME


def build_bytes(cfg: EngineConfig, precision: str, resident: int = 0) -> int:
    """Peak of building an engine weight by weight from the checkpoint: the engine, the
    largest linear's fp32 weight with its int8 copy and fbgemm's packed one (quantised in row
    blocks, so no full-size temporaries), whatever checkpoint file has to be held whole
    (``resident``), the runtime. FRED-T5-1.7B int8: 2.8 GB estimated, 2.5 GB measured."""
    return engine_bytes(cfg, precision) + 6 * largest_linear(cfg) + resident + RUNTIME


def whole_model_bytes(cfg: EngineConfig, precision: str) -> int:
    """Peak of the fallback build through ``transformers`` + peft: the full fp32 model, then
    the engine growing while the model's layers are released."""
    return engine_bytes(cfg, "fp32") + engine_bytes(cfg, precision) // 2 + RUNTIME


def streamed_reference_bytes(cfg: EngineConfig, precision: str) -> int:
    """``model check``'s reference side, run layer by layer: the fp32 embeddings, the head at
    the reference precision, one layer's linear being converted (~3 copies), the runtime."""
    per = 4 if precision == "fp32" else 2
    vd = cfg.vocab_size * cfg.d_model
    return 4 * vd + per * vd + 3 * 4 * largest_linear(cfg, head=False) + RUNTIME


def cuda_weight_bytes(cfg: EngineConfig, precision: str) -> int:
    """GPU memory of the weights in the ``hf`` runtime (int8: LLM.int8 keeps the embeddings
    and head in 16 bits)."""
    params = engine_bytes(cfg, "fp32") // 4
    if precision == "int8":
        head = 2 * cfg.vocab_size * cfg.d_model  # input embeddings + lm_head
        return (params - head) + 2 * head
    return params * (2 if precision == "bf16" else 4)


# --- what is there --------------------------------------------------------------------------
def _meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in path.read_text(encoding="ascii").splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_path(root: Path = Path("/sys/fs/cgroup")) -> Path | None:
    """This process' cgroup v2 folder (None: not on cgroup v2)."""
    try:
        lines = Path("/proc/self/cgroup").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    line = next((x for x in lines if x.startswith("0::")), None)
    return None if line is None else root / line[3:].lstrip("/")


def _cgroup_room_at(folder: Path) -> int | None:
    """Room left under the memory limit of cgroup ``folder`` (None: no limit), counting the
    reclaimable page cache (``inactive_file``) as free, as container runtimes do."""
    limit, current = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
    if limit is None or current is None:
        return None
    inactive = 0
    try:
        for stat in (folder / "memory.stat").read_text(encoding="ascii").splitlines():
            if stat.startswith("inactive_file "):
                inactive = int(stat.split()[1])
    except (OSError, ValueError):
        pass
    return max(0, limit - current + inactive)


def _cgroup_room() -> int | None:
    folder = _cgroup_path()
    return None if folder is None else _cgroup_room_at(folder)


def available_bytes() -> int | None:
    """RAM a load may count on now: MemAvailable + free swap, capped by a cgroup limit; None
    where it cannot be told (not Linux)."""
    info = _meminfo()
    if "MemAvailable" not in info:
        return None
    free = info["MemAvailable"] + info.get("SwapFree", 0)
    room = _cgroup_room()
    return free if room is None else min(free, room)


# --- the checks -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MemoryPlan:
    what: str  # "building the int8 model", …
    needed: int
    available: int | None

    resource: str = "RAM"

    @property
    def fits(self) -> bool:
        return self.available is None or self.needed <= self.available * USABLE_SHARE

    def describe(self) -> str:
        avail = "unknown" if self.available is None else gib(self.available)
        return f"{self.what} needs ~{gib(self.needed)} of {self.resource}; available: {avail}"


def preflight(
    what: str,
    needed: int,
    *,
    hints: list[str],
    enabled: bool = True,
    available: int | None = None,
    resource: str = "RAM",
) -> MemoryPlan:
    """Raise ``InsufficientMemoryError`` (one line: needed, available, what to do) when
    ``needed`` bytes do not fit. ``available`` defaults to the free RAM (+ swap) measured now;
    pass the GPU's free memory with ``resource="GPU memory"``."""
    if available is None and resource == "RAM":
        available = available_bytes()
    plan = MemoryPlan(what, needed, available, resource)
    log.debug("memory: %s", plan.describe())
    if enabled and not plan.fits:
        free = "free memory or add swap" if resource == "RAM" else "free GPU memory"
        todo = [*hints, free, "DOPPELBOT_MEMORY_CHECK=false to try anyway"]
        raise InsufficientMemoryError(f"{plan.describe()}; try {', '.join(todo)}")
    return plan


# --- GPU precision --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PrecisionChoice:
    precision: str
    reason: str


def choose_cuda_precision(
    requested: str, cfg: EngineConfig, free_bytes: int | None, *, has_int8: bool = True
) -> PrecisionChoice:
    """``auto`` on CUDA: bf16 when its weights plus ``CUDA_WORK`` fit in ``USABLE_SHARE`` of
    the free GPU memory, else int8 (LLM.int8, about half the memory, several times slower).
    An explicit precision is kept."""
    if requested != "auto":
        return PrecisionChoice(requested, f"{requested} as set (DOPPELBOT_PRECISION)")
    need = cuda_weight_bytes(cfg, "bf16") + CUDA_WORK
    if free_bytes is None:
        return PrecisionChoice("bf16", "bf16 (free GPU memory unknown)")
    free = f"{gib(free_bytes)} free on the GPU"
    if need <= free_bytes * USABLE_SHARE:
        return PrecisionChoice("bf16", f"bf16: needs ~{gib(need)}, {free}")
    if not has_int8:
        return PrecisionChoice(
            "bf16", f"bf16 although it needs ~{gib(need)} ({free}): bitsandbytes is missing"
        )
    return PrecisionChoice(
        "int8",
        f"int8 (bitsandbytes): bf16 would need ~{gib(need)}, {free}",
    )

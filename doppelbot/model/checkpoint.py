"""Reading a checkpoint one tensor at a time, with the LoRA adapter merged on the way.

Why: quantising FRED-T5-1.7B used to mean loading the whole fp32 model through
``transformers`` (~7 GB), merging the adapter with peft and converting: ~10.7 GB of RAM on the
first start, which the 4–8 GB machines this bot is meant for do not have. The engine needs each
weight exactly once, so ``WeightSource`` hands them out one by one, straight from the files:

- ``*.safetensors`` (one file or shards with an index): each tensor read with plain
  ``readinto`` into its own buffer (``engine._TensorReader``), so nothing accumulates;
- ``pytorch_model*.bin``: ``torch.load(weights_only=True, mmap=True)``; the mapped pages a
  tensor touched are handed back (``madvise(MADV_DONTNEED)``) once it has been copied, else
  they would stay in the resident set until the file is closed. A pre-2020 (non-zip) ``.bin``
  cannot be mapped and is read whole (``resident_bytes`` says so to the memory check);
- the adapter: ``W + (B @ A) * scaling`` in fp32, computed exactly as peft's
  ``merge_and_unload`` does, just before the weight is converted. Only plain LoRA on linear
  weights is merged here; anything else (DoRA, extra trained modules, per-module alphas, …)
  raises ``UnsupportedAdapter`` and the loader falls back to peft on the whole model.

Names are those of ``T5ForConditionalGeneration``'s state dict. Like ``transformers``, a
checkpoint without ``lm_head.weight`` has its head tied to ``shared.weight``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import mmap
import zipfile
from pathlib import Path
from typing import Any

import torch

from doppelbot.core.errors import ModelLoadError

log = logging.getLogger(__name__)

_ALIASES = {
    "shared.weight": ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
    "lm_head.weight": ("shared.weight",),  # tied head (checked against the config by the caller)
}
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")


class UnsupportedAdapter(Exception):
    """The adapter is more than plain LoRA on linear weights: merge it with peft instead."""


# --- locating the files ---------------------------------------------------------------------
def _resolve(base: str, filename: str) -> Path | None:
    local = Path(base).expanduser()
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(
            base,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the base model {base}: {exc}") from exc
    return None if found is None else Path(found)


def checkpoint_files(base: str) -> list[Path]:
    """The weight files of ``base`` (a folder or a hub id, downloaded or cached like
    ``from_pretrained`` does), safetensors preferred."""
    for index in _INDEXES:
        path = _resolve(base, index)
        if path is None:
            continue
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"{path}: unreadable checkpoint index ({exc})") from exc
        files = [_resolve(base, shard) for shard in shards]
        missing = [s for s, f in zip(shards, files, strict=True) if f is None]
        if missing:
            raise ModelLoadError(f"{base}: checkpoint shard(s) missing: {', '.join(missing)}")
        return [f for f in files if f is not None]
    for single in _SINGLES:
        path = _resolve(base, single)
        if path is not None:
            return [path]
    where = "" if Path(base).expanduser().is_dir() else " (not downloaded yet, or offline?)"
    raise ModelLoadError(
        f"{base}: no model weights found (model.safetensors or pytorch_model.bin, or their "
        f"sharded index){where}"
    )


def resident_bytes(files: list[Path]) -> int:
    """Bytes of the files that must be read whole (pre-zip ``.bin``: cannot be mapped)."""
    return sum(
        f.stat().st_size for f in files if f.suffix != ".safetensors" and not zipfile.is_zipfile(f)
    )


# --- reading --------------------------------------------------------------------------------
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def _release_pages(t: torch.Tensor) -> None:
    """Drop the (clean, file-backed) pages of a tensor mapped from a file; reading it again
    would fault them back in from the file."""
    start = t.data_ptr()
    lo = -(-start // _PAGE) * _PAGE
    hi = (start + t.untyped_storage().nbytes()) // _PAGE * _PAGE
    if hi <= lo:
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
    except (OSError, AttributeError):
        pass  # not glibc: the pages stay mapped until the file is closed


class _BinFile:
    """One ``pytorch_model.bin``: memory-mapped when it is a zip archive, else read whole."""

    def __init__(self, path: Path) -> None:
        self.mapped = zipfile.is_zipfile(path)
        try:
            self._sd: dict[str, torch.Tensor] = torch.load(
                path, map_location="cpu", weights_only=True, mmap=self.mapped
            )
        except (OSError, RuntimeError, ValueError, EOFError) as exc:
            raise ModelLoadError(f"cannot read the checkpoint {path}: {exc}") from exc

    def names(self) -> list[str]:
        return list(self._sd)

    def shape(self, name: str) -> list[int]:
        return list(self._sd[name].shape)

    def get(self, name: str) -> torch.Tensor:
        t = self._sd[name]
        out = t.to(torch.float32, copy=True)
        if self.mapped:
            _release_pages(t)
        return out

    def close(self) -> None:
        self._sd = {}


class _SafetensorsFile:
    def __init__(self, path: Path) -> None:
        from doppelbot.model.engine import _TensorReader

        try:
            self._reader = _TensorReader(path)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read the checkpoint {path}: {exc}") from exc

    def names(self) -> list[str]:
        return self._reader.names()

    def shape(self, name: str) -> list[int]:
        return self._reader.shape(name)

    def get(self, name: str) -> torch.Tensor:
        return self._reader.get(name).to(torch.float32)

    def close(self) -> None:
        self._reader.close()


class Checkpoint:
    """The tensors of a checkpoint's files by name, read on demand as fresh fp32 tensors."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.resident_bytes = 0  # held for the whole build (non-mappable .bin files)
        self._open: list[_BinFile | _SafetensorsFile] = []
        self._where: dict[str, _BinFile | _SafetensorsFile] = {}
        try:
            for path in files:
                opened: _BinFile | _SafetensorsFile
                if path.suffix == ".safetensors":
                    opened = _SafetensorsFile(path)
                else:
                    opened = _BinFile(path)
                    if not opened.mapped:
                        self.resident_bytes += path.stat().st_size
                self._open.append(opened)
                for name in opened.names():
                    self._where[name] = opened
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, base: str) -> Checkpoint:
        return cls(checkpoint_files(base))

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for opened in self._open:
            opened.close()
        self._open, self._where = [], {}

    def _name(self, name: str) -> str:
        if name in self._where:
            return name
        for alias in _ALIASES.get(name, ()):
            if alias in self._where:
                return alias
        raise ModelLoadError(f"the checkpoint has no tensor {name!r}")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> list[int]:
        real = self._name(name)
        return self._where[real].shape(real)

    def get(self, name: str) -> torch.Tensor:
        real = self._name(name)
        return self._where[real].get(real)


# --- the adapter ----------------------------------------------------------------------------
# Config fields that do not change what merging computes.
_HARMLESS = {
    "base_model_name_or_path",
    "revision",
    "task_type",
    "peft_type",
    "peft_version",
    "inference_mode",
    "init_lora_weights",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "auto_mapping",
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",  # the rank is read from the tensors
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
}
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"
_PREFIX = "base_model.model."


class LoraDeltas:
    """A peft LoRA adapter folder as per-weight deltas ``(B @ A) * scaling`` (fp32)."""

    def __init__(self, adapter: Path) -> None:
        config_path = adapter / "adapter_config.json"
        if not config_path.is_file():
            raise ModelLoadError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
        try:
            config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the adapter {adapter}: {exc}") from exc
        if config.get("peft_type") != "LORA":
            raise UnsupportedAdapter(f"peft_type {config.get('peft_type')!r}")
        if config.get("bias", "none") != "none":
            raise UnsupportedAdapter(f"bias={config['bias']!r}")
        for key, value in config.items():
            if key not in _HARMLESS and key != "bias" and value not in (None, False, {}, [], ""):
                raise UnsupportedAdapter(f"{key}={value!r}")
        alpha = float(config.get("lora_alpha", 8))
        rslora = bool(config.get("use_rslora", False))
        weights = self._read_weights(adapter)
        self._pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in weights:
            if not key.startswith(_PREFIX):
                raise UnsupportedAdapter(f"tensor {key}")
            if key.endswith(_LORA_A):
                module = key[len(_PREFIX) : -len(_LORA_A)]
                b_key = key[: -len(_LORA_A)] + _LORA_B
                if b_key not in weights:
                    raise ModelLoadError(f"{adapter}: {key} has no lora_B")
                self._pairs[f"{module}.weight"] = (weights[key], weights[b_key])
            elif not key.endswith(_LORA_B):
                raise UnsupportedAdapter(f"tensor {key}")
        if not self._pairs:
            raise ModelLoadError(f"{adapter}: the adapter holds no LoRA weights")
        self._scaling = {}
        for name, (a, _b) in self._pairs.items():
            r = int(a.shape[0])
            self._scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r

    @staticmethod
    def _read_weights(adapter: Path) -> dict[str, torch.Tensor]:
        st, binary = adapter / "adapter_model.safetensors", adapter / "adapter_model.bin"
        try:
            if st.is_file():
                from safetensors.torch import load_file

                raw = load_file(str(st))
            elif binary.is_file():
                raw = torch.load(binary, map_location="cpu", weights_only=True)
            else:
                raise ModelLoadError(f"{adapter}: no adapter_model.safetensors or .bin")
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the adapter {adapter}: {exc}") from exc
        # peft loads adapter weights into fp32 LoRA layers on an fp32 base (autocast).
        return {k: v.to(torch.float32) for k, v in raw.items()}

    @property
    def targets(self) -> set[str]:
        return set(self._pairs)

    def delta(self, name: str) -> torch.Tensor | None:
        """The delta for weight ``name`` (None if the adapter does not touch it); the same
        arithmetic as peft's ``get_delta_weight`` + ``merge`` (fp32, safe_merge off)."""
        pair = self._pairs.get(name)
        if pair is None:
            return None
        a, b = pair
        return (b @ a) * self._scaling[name]


class WeightSource:
    """``get(name)``: the fp32 weight as the merged model would hold it, read on demand."""

    def __init__(self, checkpoint: Checkpoint, adapter: LoraDeltas | None = None) -> None:
        self.checkpoint = checkpoint
        self.adapter = adapter
        if adapter is not None:
            unknown = sorted(n for n in adapter.targets if n not in checkpoint)
            if unknown:
                raise ModelLoadError(
                    f"the adapter adapts weights the base model lacks: {', '.join(unknown[:3])}"
                )

    def get(self, name: str) -> torch.Tensor:
        weight = self.checkpoint.get(name)
        if self.adapter is not None:
            delta = self.adapter.delta(name)
            if delta is not None:
                weight += delta
        return weight

    def __call__(self, name: str) -> torch.Tensor:
        return self.get(name)

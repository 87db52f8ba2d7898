"""The on-disk cache of quantised reply models.

Quantising FRED-T5-1.7B means reading the 7 GB fp32 checkpoint, merging the LoRA adapter and
converting every linear layer: a minute or more (streamed weight by weight, see
``doppelbot.model.checkpoint``). The result (~2 GB) is written under
``settings.store.cache_dir / "reply-model" / <key>`` while it is built, so every later start
reads it directly.

The key covers everything that changes the weights or their file format: the base model (its id
or path plus a fingerprint of its files), the adapter's *content* (a retrained adapter in the
same folder gets a new entry), the precision, the torch version and the engine format. Entries
are written to a temporary folder and renamed into place, so a crash never leaves a half-written
cache that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doppelbot.model.engine import (
    ENGINE_FORMAT,
    EngineConfig,
    EngineWriter,
    Sink,
    T5Engine,
    int8_weight_limit,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CACHE_SUBDIR = "reply-model"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".pt")


def _hash_file(digest: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)


def adapter_fingerprint(adapter: Path | None) -> str | None:
    """sha256 of the adapter's files (config + weights): the adapter's identity by content."""
    if adapter is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in adapter.iterdir() if p.is_file()):
        if path.suffix in _WEIGHT_SUFFIXES and not path.name.startswith("doppelbot_"):
            # doppelbot_adapter.json holds metrics/evaluations that change without the weights.
            digest.update(path.name.encode())
            _hash_file(digest, path)
    return digest.hexdigest()


def base_fingerprint(base: str) -> str:
    """A local folder: its weight files' names, sizes and mtimes (hashing 7 GB on every start
    would cost more than it saves). A hub id: the id and the cached snapshot's revision."""
    local = Path(base).expanduser()
    if local.is_dir():
        parts = [str(local.resolve())]
        for path in sorted(local.iterdir()):
            if path.is_file() and path.suffix in _WEIGHT_SUFFIXES:
                stat = path.stat()
                parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
        return "|".join(parts)
    revision = ""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(base, "config.json")
        if isinstance(found, str):
            revision = Path(found).parent.name  # .../snapshots/<commit>/config.json
    except (ImportError, ValueError, OSError):
        pass
    return f"{base}@{revision}"


def cache_key(base: str, adapter: Path | None, precision: str) -> str:
    import torch

    material: dict[str, object] = {
        "engine_format": ENGINE_FORMAT,
        "base": base_fingerprint(base),
        "adapter": adapter_fingerprint(adapter),
        "precision": precision,
        "torch": torch.__version__,
    }
    if precision == "int8" and int8_weight_limit() != 127:
        # The weights were rounded to this CPU's kernel (7-bit grid without VNNI); only those
        # entries get the extra field, so caches built on VNNI CPUs keep their keys.
        material["int8_weight_limit"] = int8_weight_limit()
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def cache_folder(cache_dir: Path, key: str) -> Path:
    return cache_dir / CACHE_SUBDIR / key


def is_complete(folder: Path) -> bool:
    return (folder / "engine.json").is_file() and (folder / "engine.safetensors").is_file()


class PendingEntry(Sink):
    """A cache entry written *while* the engine is built (``T5Engine.build(sink=...)``): each
    tensor goes to disk as soon as it is converted, into a temporary folder that ``commit``
    renames into place. A failure to write (disk full, read-only) is logged and the build
    simply goes on uncached."""

    def __init__(self, folder: Path, cfg: EngineConfig, precision: str) -> None:
        self.folder = folder
        self._tmp: Path | None = None
        self._writer: EngineWriter | None = None
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
            self._writer = EngineWriter(self._tmp, cfg, precision)
        except OSError as exc:
            self._abandon(exc)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if self._writer is None:
            return
        try:
            self._writer.put(name, tensor)
        except OSError as exc:
            self._abandon(exc)

    def commit(self, meta: dict[str, Any]) -> bool:
        """Finish the files and move them into place; False when nothing was cached."""
        if self._writer is None or self._tmp is None:
            return False
        try:
            self._writer.finish(meta)
            if self.folder.exists():  # written meanwhile by another process: keep theirs
                shutil.rmtree(self._tmp, ignore_errors=True)
                return True
            os.replace(self._tmp, self.folder)
        except OSError as exc:
            self._abandon(exc)
            return False
        self._writer = None
        return True

    def discard(self) -> None:
        """The build failed: remove the partial files."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _abandon(self, exc: OSError) -> None:
        log.warning("could not write the model cache %s: %s", self.folder, exc)
        self.discard()


def save_engine(engine: T5Engine, folder: Path) -> None:
    """Write ``engine`` to ``folder`` atomically (temp folder + rename); a failure to write
    (disk full, read-only) is logged and the model is simply served uncached."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        engine.save(tmp)
        if folder.exists():  # written meanwhile by another process: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return
        os.replace(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not write the model cache %s: %s", folder, exc)


def discard(folder: Path) -> None:
    """Remove a cache entry that cannot be read, so a rebuilt one can take its place."""
    shutil.rmtree(folder, ignore_errors=True)

"""Trained adapters on disk and the choice of the one the bot serves.

Each fine-tune ends in a versioned folder under ``settings.store.adapters_dir`` (``v0003-sft``): the
peft adapter files plus ``doppelbot_adapter.json`` with the base model, the dataset hash, the
training settings, the metrics and cached held-out evaluations. The serving choice is an
append-only history in SQLite (``adapter_choices``, migration 0009): ``adapter use`` appends a
row, ``adapter rollback`` appends the previous one again, and ``current_adapter`` — what the
reply runtime loads — reads the newest row unless ``DOPPELBOT_ADAPTER_PATH`` pins one.

No torch here: the runtime and the CLI use this without loading a model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doppelbot.core.errors import AdapterRejectedError, TrainingError
from doppelbot.dataset.jsonl import write_json
from doppelbot.store import adapters
from doppelbot.store.adapters import AdapterChoice, current_choice, get_choice
from doppelbot.store.database import Database, now

if TYPE_CHECKING:
    from doppelbot.config import Settings

META_FILE = "doppelbot_adapter.json"
ADAPTER_CONFIG = "adapter_config.json"
BASE_SPEC = "base"  # "no adapter": the base model alone, for comparisons
CURRENT_SPEC = "current"
_VERSION_RE = re.compile(r"^v(\d{4,})-")
# Losses closer than this are "the same": re-evaluating one adapter must never refuse it.
LOSS_TOLERANCE = 1e-6


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    path: Path
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def version(self) -> int | None:
        match = _VERSION_RE.match(self.path.name)
        return int(match.group(1)) if match else None

    @property
    def method(self) -> str:
        return str(self.meta.get("method", "?"))

    @property
    def base_model(self) -> str | None:
        value = self.meta.get("base_model")
        if value is None:  # a foreign peft folder: its own config names the base
            value = read_json(self.path / ADAPTER_CONFIG).get("base_model_name_or_path")
        return None if value is None else str(value)

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.meta.get("metrics", {}))

    @property
    def evals(self) -> dict[str, Any]:
        return dict(self.meta.get("evals", {}))


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def adapter_info(path: Path) -> AdapterInfo:
    if not is_adapter_dir(path):
        raise TrainingError(f"{path} is not an adapter folder (no {ADAPTER_CONFIG})")
    return AdapterInfo(path, read_json(path / META_FILE))


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    write_json(path / META_FILE, meta)  # atomic: temp file + rename


def list_adapters(adapters_dir: Path) -> list[AdapterInfo]:
    if not adapters_dir.is_dir():
        return []
    found = [
        adapter_info(p)
        for p in adapters_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and is_adapter_dir(p)
    ]
    return sorted(found, key=lambda a: (a.version is None, a.version or 0, a.name))


def next_adapter_name(adapters_dir: Path, method: str) -> str:
    versions = [0]
    if adapters_dir.is_dir():
        versions += [
            int(m.group(1)) for p in adapters_dir.iterdir() if (m := _VERSION_RE.match(p.name))
        ]
    return f"v{max(versions) + 1:04d}-{method}"


def resolve_adapter(adapters_dir: Path, spec: str | Path) -> Path | None:
    """An adapter folder from a path or a name under ``adapters_dir``; ``base`` = none."""
    text = str(spec)
    if text == BASE_SPEC:
        return None
    for candidate in (Path(text).expanduser(), adapters_dir / text):
        if is_adapter_dir(candidate):
            return candidate.resolve()
    raise TrainingError(
        f"no adapter {text!r}: give a folder with {ADAPTER_CONFIG} or a name from "
        "`doppelbot adapter list`"
    )


# --- cached held-out evaluations ------------------------------------------------------------
def heldout_key(
    validation_hash: str, limit: int, max_input: int, max_target: int, precision: str
) -> str:
    """Identifies one held-out evaluation: same split, subset, lengths and base precision →
    same loss (an int8 base scores a little differently from fp32, so they never mix)."""
    return f"{validation_hash[:16]}:{limit}:{max_input}:{max_target}:{precision}"


def cached_eval(path: Path | None, key: str) -> dict[str, Any] | None:
    if path is None:
        return None
    value = read_json(path / META_FILE).get("evals", {}).get(key)
    return dict(value) if isinstance(value, dict) else None


def store_eval(path: Path, key: str, metrics: dict[str, Any]) -> None:
    meta = read_json(path / META_FILE)
    evals = dict(meta.get("evals", {}))
    evals[key] = {**evals.get(key, {}), **metrics, "evaluated_at": now()}
    meta["evals"] = evals
    write_meta(path, meta)


# --- the serving choice -----------------------------------------------------------------------
async def current_adapter(settings: Settings, db: Database) -> Path | None:
    """The adapter the reply runtime should load: ``DOPPELBOT_ADAPTER_PATH`` when set, else
    the one chosen with ``doppelbot adapter use`` (None: serve the base model alone)."""
    if settings.model.adapter_path is not None:
        return settings.model.adapter_path
    choice = await current_choice(db)
    return None if choice is None else choice.adapter_path


def check_not_worse(
    candidate_name: str,
    candidate_loss: float,
    current_name: str,
    current_loss: float,
) -> None:
    """The switch rule: held-out loss must not be worse than the current adapter's."""
    if candidate_loss > current_loss + LOSS_TOLERANCE * max(1.0, abs(current_loss)):
        raise AdapterRejectedError(
            f"{candidate_name} has held-out loss {candidate_loss:.4f}, worse than "
            f"{current_loss:.4f} of the adapter served now ({current_name}); "
            "keeping the current one (use --force to switch anyway)"
        )


async def record_choice(
    db: Database,
    adapter: Path,
    *,
    heldout_loss: float | None,
    forced: bool,
    reason: str = "use",
    previous_choice_id: int | None = None,
) -> AdapterChoice:
    choice_id = await adapters.insert_choice(
        db,
        adapter,
        heldout_loss=heldout_loss,
        forced=forced,
        reason=reason,
        previous_choice_id=previous_choice_id,
    )
    choice = await get_choice(db, choice_id)
    assert choice is not None
    return choice


async def use_adapter(
    db: Database, adapter: Path, *, heldout_loss: float | None, forced: bool
) -> AdapterChoice:
    """Make ``adapter`` the served one (the caller has applied ``check_not_worse``)."""
    current = await current_choice(db)
    return await record_choice(
        db,
        adapter,
        heldout_loss=heldout_loss,
        forced=forced,
        reason="use",
        previous_choice_id=None if current is None else current.choice_id,
    )


async def rollback(db: Database) -> AdapterChoice:
    """Serve the adapter chosen before the current one again (one step back per call)."""
    current = await current_choice(db)
    if current is None:
        raise TrainingError("no adapter has been chosen yet: nothing to roll back")
    if current.previous_choice_id is None:
        raise TrainingError(
            f"{current.adapter_name} is the first adapter chosen: there is no previous one"
        )
    previous = await get_choice(db, current.previous_choice_id)
    assert previous is not None
    return await record_choice(
        db,
        previous.adapter_path,
        heldout_loss=previous.heldout_loss,
        forced=previous.forced,
        reason="rollback",
        previous_choice_id=previous.previous_choice_id,
    )

"""The versioned adapter folder a finished run leaves under ``adapters_dir`` (``v0003-sft``).

The peft adapter files plus ``doppelbot_adapter.json`` (see ``registry``): the base model, the
dataset and its hashes, the settings, the metrics and the held-out evaluation the run measured,
so ``adapter use`` can compare without measuring again.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from doppelbot.core.errors import TrainingError
from doppelbot.training.evaluate import heldout_cache_key
from doppelbot.training.registry import META_FILE, next_adapter_name, write_meta
from doppelbot.training.types import PreparedData, TrainOptions


def export_adapter(
    model: Any,
    *,
    adapters_dir: Path,
    options: TrainOptions,
    data: PreparedData,
    run_dir: Path,
    metrics: dict[str, Any],
    init_adapter: Path | None,
    precision: str,
) -> Path:
    """Write the versioned adapter folder atomically (temp folder + rename)."""
    import peft
    import torch
    import transformers

    adapters_dir.mkdir(parents=True, exist_ok=True)
    key = heldout_cache_key(options, data.dataset.validation_hash, precision)
    for _ in range(100):
        name = next_adapter_name(adapters_dir, options.method)
        final = adapters_dir / name
        tmp = adapters_dir / f".tmp-{name}-{os.getpid()}"
        model.save_pretrained(str(tmp), safe_serialization=True)
        version = int(name[1:5]) if name[1:5].isdigit() else None
        meta = {
            "name": name,
            "version": version,
            "method": options.method,
            "base_model": options.model.base,
            "created_at": int(time.time()),
            "run_dir": str(run_dir),
            "init_adapter": None if init_adapter is None else str(init_adapter),
            "dataset": {
                "name": data.dataset.name,
                "folder": str(data.dataset.folder),
                "hash": data.dataset.dataset_hash,
                "train_hash": data.dataset.train_hash,
                "validation_hash": data.dataset.validation_hash,
                "data_hash": data.data_hash,
                **data.summary,
            },
            "settings": {
                **options.trajectory(),
                "epochs": options.epochs,
                "max_steps": options.max_steps,
                "gradient_checkpointing": options.gradient_checkpointing,
                "precision": precision,
                "feedback": None if options.feedback is None else str(options.feedback),
            },
            "metrics": metrics,
            "evals": {}
            if metrics.get("val_loss") is None
            else {
                key: {
                    "loss": metrics["val_loss"],
                    "perplexity": metrics["val_perplexity"],
                    "evaluated_at": int(time.time()),
                }
            },
            "libraries": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        }
        write_meta(tmp, meta)
        try:
            if final.exists():
                raise FileExistsError(final)
            os.rename(tmp, final)  # fails if another run took this version meanwhile
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        assert (final / META_FILE).is_file()
        return final
    raise TrainingError(f"cannot create a new adapter folder in {adapters_dir}")

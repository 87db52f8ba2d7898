"""Preference tuning (DPO) for the encoder-decoder FRED-T5: pairs, their batches, the loss.

The method that trains with them is ``methods/dpo.py``; the held-out preference metrics
(``doppelbot eval --pairs``) use the same pairs and scores.

Why our own few lines instead of TRL's ``DPOTrainer``: TRL is dropping encoder-decoder support
(its KTO trainer lost it in huggingface/trl#4792, coordinated with the DPO refactor #3906), it
is not installed here and would pull ``datasets`` and more, and it brings its own Trainer loop
while ours already gives exact resumption, checkpoints and multi-GPU. The DPO loss itself is
one line (Rafailov et al. 2023)::

    loss = -logsigmoid(beta * ((log πθ(c|x) - log πref(c|x)) - (log πθ(r|x) - log πref(r|x))))

For a seq2seq model ``log π(y|x)`` is the sum of the target tokens' log-probabilities from the
decoder run with ``labels`` (padding masked out). The reference is the *starting* policy — the
SFT adapter given with ``--init-adapter`` (the served one by default), or the base model when
there is none. Its log-probabilities are computed once, before the first step and before any
checkpoint is restored, so a resumed run uses exactly the same reference, and no second copy of
the weights is ever held in memory.

Pairs come from ``doppelbot feedback export`` (``pairs.jsonl``: ``model_input``, ``rejected``,
``chosen``). A stable share of them — chosen by a hash of the pair, so adding new pairs never
moves an old one between the sides — is held out for the preference metrics (``doppelbot eval
--pairs``). Unpaired 👍/👎 rows (KTO) are not used: only DPO is implemented.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doppelbot.core.errors import TrainingError
from doppelbot.core.prompt import build_target
from doppelbot.dataset.jsonl import iter_json_objects
from doppelbot.training.data import TrainRow, hash_strings
from doppelbot.training.seq2seq import EncodeStats, encode_rows
from doppelbot.training.types import IGNORE_INDEX, Example

PAIRS_FILE = "pairs.jsonl"
LATEST_FEEDBACK = "latest.txt"


# --- pairs on disk ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PairRow:
    """One preference: for ``model_input`` the owner chose ``chosen`` over ``rejected``."""

    model_input: str
    chosen: str
    rejected: str
    kind: str = ""

    @property
    def key(self) -> str:
        return hash_strings([self.model_input, self.chosen, self.rejected])


def latest_pairs(data_dir: Path) -> Path:
    """``pairs.jsonl`` of the newest ``doppelbot feedback export``."""
    pointer = data_dir / "feedback" / LATEST_FEEDBACK
    try:
        folder = Path(pointer.read_text(encoding="utf-8").strip())
    except OSError:
        raise TrainingError(
            "no feedback export yet: run `doppelbot feedback export` (or give --pairs PATH)"
        ) from None
    path = folder / PAIRS_FILE
    if not path.is_file():
        raise TrainingError(f"{path} does not exist: run `doppelbot feedback export` again")
    return path


def pairs_file(data_dir: Path, spec: str | None) -> Path:
    """A ``--pairs`` value → the file: a path, or ``latest`` or None (the newest export's)."""
    if spec is None or spec == "latest":
        return latest_pairs(data_dir)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TrainingError(f"no preference pairs file {path}")
    return path


def load_pairs(path: Path) -> list[PairRow]:
    """Preference pairs from JSONL; rows without a prompt or with chosen == rejected are
    skipped (they teach nothing)."""
    rows: list[PairRow] = []
    for where, raw in iter_json_objects(path, TrainingError, "preference pairs"):
        prompt, chosen, rejected = raw.get("model_input"), raw.get("chosen"), raw.get("rejected")
        if not all(isinstance(x, str) for x in (prompt, chosen, rejected)):
            raise TrainingError(f"{where}: a pair needs model_input, chosen and rejected")
        if not prompt.strip() or not chosen.strip() or chosen.strip() == rejected.strip():
            continue
        rows.append(PairRow(prompt, chosen, rejected, str(raw.get("kind", ""))))
    return rows


def split_pairs(rows: Sequence[PairRow], share: float) -> tuple[list[PairRow], list[PairRow]]:
    """(train, held out). A pair is held out when its hash falls under ``share``; at least
    one pair is held out once there are 4 or more, so the metrics always have something."""
    if share <= 0 or not rows:
        return list(rows), []

    def fraction(row: PairRow) -> float:
        return int(hashlib.sha256(row.key.encode()).hexdigest()[:12], 16) / float(1 << 48)

    held = [r for r in rows if fraction(r) < share]
    if not held and len(rows) >= 4:
        held = [min(rows, key=fraction)]
    held_keys = {r.key for r in held}
    return [r for r in rows if r.key not in held_keys], held


# --- tokenized pairs ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PreferenceExample:
    input_ids: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    ref_chosen: float = 0.0  # log πref(chosen|x), filled in before training
    ref_rejected: float = 0.0
    beta: float = 0.1  # carried with the example so the (stateless) method's loss sees it

    @property
    def labels(self) -> tuple[int, ...]:
        # What the memory pre-flight sizes the decoder by: the longer target.
        return self.chosen if len(self.chosen) >= len(self.rejected) else self.rejected

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids) + len(self.chosen) + len(self.rejected)


def encode_pairs(
    tokenizer: Any,
    rows: Sequence[PairRow],
    *,
    max_input: int,
    max_target: int,
    vocab_size: int,
    stats: EncodeStats | None = None,
) -> list[PreferenceExample]:
    """Tokenize exactly as the SFT rows are (shared ``encode_rows``): same targets, same cuts."""

    def as_rows(pick: str) -> list[TrainRow]:
        return [
            TrainRow(r.model_input, build_target(getattr(r, pick)), getattr(r, pick)) for r in rows
        ]

    kwargs = {"max_input": max_input, "max_target": max_target, "vocab_size": vocab_size}
    chosen, kept_c = encode_rows(tokenizer, as_rows("chosen"), stats=stats, **kwargs)
    rejected, kept_r = encode_rows(tokenizer, as_rows("rejected"), **kwargs)
    by_c = {(row.model_input, row.reply): ex for row, ex in zip(kept_c, chosen, strict=True)}
    by_r = {(row.model_input, row.reply): ex for row, ex in zip(kept_r, rejected, strict=True)}
    out = []
    for r in rows:
        c, j = by_c.get((r.model_input, r.chosen)), by_r.get((r.model_input, r.rejected))
        if c is not None and j is not None:
            out.append(PreferenceExample(c.input_ids, c.labels, j.labels))
    return out


def collate_pairs(examples: Sequence[PreferenceExample], pad_id: int = 0) -> dict[str, Any]:
    """One batch of 2·B rows — chosen targets first, then rejected — so a single forward pass
    (one encoder run per row) scores both sides."""
    import torch

    n = len(examples)
    src = max(len(e.input_ids) for e in examples)
    tgt = max(max(len(e.chosen), len(e.rejected)) for e in examples)
    input_ids = torch.full((2 * n, src), pad_id, dtype=torch.long)
    attention = torch.zeros((2 * n, src), dtype=torch.long)
    labels = torch.full((2 * n, tgt), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        for row, target in ((i, e.chosen), (n + i, e.rejected)):
            input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            attention[row, : len(e.input_ids)] = 1
            labels[row, : len(target)] = torch.tensor(target)
    ref = torch.tensor(
        [e.ref_chosen for e in examples] + [e.ref_rejected for e in examples], dtype=torch.float32
    )
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "ref": ref,
        "beta": torch.tensor(float(examples[0].beta)),
    }


def dpo_loss(
    policy_chosen: Any,
    policy_rejected: Any,
    ref_chosen: Any,
    ref_rejected: Any,
    beta: float,
) -> tuple[Any, Any]:
    """Mean DPO loss and the per-pair implicit reward margins β·(Δchosen − Δrejected)."""
    import torch

    margins = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -torch.nn.functional.logsigmoid(margins).mean(), margins


@dataclass(frozen=True)
class PreferenceScores:
    chosen: list[float]
    rejected: list[float]

    def metrics(self) -> dict[str, float]:
        """Preference accuracy (share of pairs where the chosen reply is likelier) and the mean
        log-probability margin log p(chosen) − log p(rejected), in nats."""
        n = len(self.chosen)
        if n == 0:
            return {}
        diffs = [c - r for c, r in zip(self.chosen, self.rejected, strict=True)]
        return {
            "pref_pairs": float(n),
            "pref_accuracy": sum(d > 0 for d in diffs) / n,
            "pref_margin": sum(diffs) / n,
        }


def score_pairs(scorer: Any, examples: Sequence[PreferenceExample]) -> PreferenceScores:
    """log p(chosen|x) and log p(rejected|x) under the scorer's model (eval mode, no grad)."""
    chosen = scorer.sequence_logprobs([Example(e.input_ids, e.chosen) for e in examples])
    rejected = scorer.sequence_logprobs([Example(e.input_ids, e.rejected) for e in examples])
    return PreferenceScores(chosen, rejected)

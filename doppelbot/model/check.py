"""``doppelbot model check``: what int8 quantisation costs on the owner's own weights and data.

The served model is int8; the owner's adapter was trained against fp32/bf16 weights. This
compares the two on N samples of the owner's dataset, token by token under teacher forcing
(the real target reply fed to the decoder), so the numbers say how far the served model's
next-token distribution is from the full-precision one:

- top-1 agreement: share of target positions where both pick the same most likely token;
- mean KL(fp32 ‖ int8) per target token, in nats;
- the target loss (mean negative log-likelihood per token) of each, and their difference.

The two models are loaded one after the other (the candidate's log-probabilities are kept), so
the check needs the memory of the larger model, not of both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from doppelbot.errors import DatasetError

if TYPE_CHECKING:
    from doppelbot.model.loader import ModelSpec, Progress, ReplyModel

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CheckPair:
    model_input: str
    model_target: str


@dataclass(frozen=True, slots=True)
class CheckReport:
    samples: int
    tokens: int
    top1_agreement: float
    mean_kl: float
    loss_reference: float
    loss_candidate: float
    reference: str = "fp32"
    candidate: str = "int8"

    @property
    def loss_delta(self) -> float:
        return self.loss_candidate - self.loss_reference

    def as_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "loss_delta": self.loss_delta}


def load_pairs(path: Path, limit: int) -> list[CheckPair]:
    """Up to ``limit`` (model_input, model_target) pairs spread evenly over a dataset JSONL."""
    from doppelbot.dataset.jsonl import read_samples

    rows = [
        CheckPair(s.model_input, s.model_target)
        for s in read_samples(path)
        if s.model_input and s.model_target
    ]
    if not rows:
        raise DatasetError(f"{path} holds no samples with model_input and model_target")
    if len(rows) <= limit:
        return rows
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit)]


def target_logprobs(
    model: ReplyModel, pairs: Sequence[CheckPair], tick: Callable[[], None] = lambda: None
) -> list[torch.Tensor]:
    out = []
    for pair in pairs:
        out.append(model.target_logprobs(pair.model_input, pair.model_target))
        tick()
    return out


def compare(
    reference: Sequence[torch.Tensor],
    candidate: Sequence[torch.Tensor],
    targets: Sequence[Sequence[int]],
    *,
    reference_name: str = "fp32",
    candidate_name: str = "int8",
) -> CheckReport:
    """Aggregate over all target tokens of all samples (log-probabilities ``[T, V]`` each)."""
    agree = tokens = 0
    kl_sum = nll_ref = nll_cand = 0.0
    for ref, cand, target in zip(reference, candidate, targets, strict=True):
        ids = torch.tensor(list(target), dtype=torch.long)[:, None]
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        kl = (ref.exp() * (ref - cand)).sum(-1)
        kl_sum += float(kl.clamp_min(0).sum())
        nll_ref -= float(ref.gather(-1, ids).sum())
        nll_cand -= float(cand.gather(-1, ids).sum())
        tokens += int(ids.shape[0])
    if tokens == 0:
        raise DatasetError("no target tokens to compare")
    return CheckReport(
        samples=len(targets),
        tokens=tokens,
        top1_agreement=agree / tokens,
        mean_kl=kl_sum / tokens,
        loss_reference=nll_ref / tokens,
        loss_candidate=nll_cand / tokens,
        reference=reference_name,
        candidate=candidate_name,
    )


def run_check(
    spec: ModelSpec,
    pairs: Sequence[CheckPair],
    *,
    progress: Progress | None = None,
    reference_precision: str = "fp32",
) -> CheckReport:
    """Load ``spec`` (the served precision), then the same model at ``reference_precision``,
    and compare them on ``pairs``."""
    import gc

    from doppelbot.model.loader import load_reply_model

    report: Progress = progress or (lambda stage, done, total: None)

    def scored(model: ReplyModel, label: str) -> list[torch.Tensor]:
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            report(f"scoring with {label}", done, len(pairs))

        return target_logprobs(model, pairs, tick)

    candidate = load_reply_model(spec, report)
    targets = [candidate.encode(p.model_target) for p in pairs]
    cand = scored(candidate, spec.precision)
    del candidate
    gc.collect()
    reference = load_reply_model(replace(spec, precision=reference_precision), report)
    ref = scored(reference, reference_precision)
    del reference
    gc.collect()
    return compare(
        ref, cand, targets, reference_name=reference_precision, candidate_name=spec.precision
    )

"""``doppelbot model check``: what int8 quantisation costs on the owner's own weights and data.

The served model is int8; the owner's adapter was trained against fp32/bf16 weights. This
compares the two on N samples of the owner's dataset, token by token under teacher forcing
(the real target reply fed to the decoder), so the numbers say how far the served model's
next-token distribution is from the full-precision one:

- top-1 agreement: share of target positions where both pick the same most likely token;
- mean KL(fp32 ‖ int8) per target token, in nats;
- the target loss (mean negative log-likelihood per token) of each, and their difference.

The served model is loaded first and its log-probabilities kept; then, on the CPU, the reference
runs *layer by layer* straight from the checkpoint (``reference_logprobs``): every sample goes
through encoder layer 1, then layer 2, …, each layer built from the checkpoint (adapter merged)
and dropped after use — the same computation as a full fp32 engine, but holding one layer, the
embeddings and the head instead of the 7 GB model. The check therefore needs about the memory of
the served model; ``run_check`` verifies that before loading anything. (On CUDA, and for
adapters that are more than plain LoRA, the reference is loaded whole, like the served model.)
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from doppelbot.core.errors import DatasetError
from doppelbot.dataset.jsonl import read_samples

if TYPE_CHECKING:
    from doppelbot.model.engine import EngineConfig
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


def reference_logprobs(
    spec: ModelSpec,
    cfg: EngineConfig,
    samples: Sequence[tuple[Sequence[int], Sequence[int]]],
    precision: str = "fp32",
    progress: Progress | None = None,
) -> list[torch.Tensor]:
    """Teacher-forced log-probabilities ``[T, V]`` of each ``(input_ids, target_ids)`` under
    the checkpoint + adapter at ``precision``, computed layer-major: one layer in memory at a
    time (see the module docstring). Raises ``UnsupportedAdapter`` for adapters that only
    peft can merge."""
    import torch.nn.functional as F

    from doppelbot.model import engine as E
    from doppelbot.model.checkpoint import Checkpoint, LoraDeltas, WeightSource

    report: Progress = progress or (lambda stage, done, total: None)
    deltas = None if spec.adapter is None else LoraDeltas(spec.adapter)
    tensor_src, _linears = E._hf_sources(cfg)
    steps = cfg.num_layers + cfg.num_decoder_layers + 1
    stage = f"scoring with {precision}, layer by layer"
    with Checkpoint.open(spec.files) as checkpoint, torch.inference_mode():
        weight = WeightSource(checkpoint, deltas)
        embed = weight(tensor_src["embed"])
        enc_table = weight(tensor_src["enc_bias_table"])
        dec_table = weight(tensor_src["dec_bias_table"])
        xs = [F.embedding(torch.tensor([list(ids)]), embed) for ids, _t in samples]
        for i in range(cfg.num_layers):
            layer = E.build_encoder_layer(cfg, weight, precision, i)
            xs = [
                E.encoder_block(
                    cfg,
                    layer,
                    x,
                    E.position_bias(
                        cfg, enc_table, x.shape[1], x.shape[1], bidirectional=True
                    ).contiguous(),
                )
                for x in xs
            ]
            del layer
            report(stage, i + 1, steps)
        enc_norm = weight(tensor_src["enc_final_norm"])
        encoded = [E._rms_norm(x, enc_norm, cfg.eps) for x in xs]
        del xs
        dec_in = [[cfg.decoder_start_token_id, *target[:-1]] for _ids, target in samples]
        ys = [F.embedding(torch.tensor([d]), embed) for d in dec_in]
        for i in range(cfg.num_decoder_layers):
            layer = E.build_decoder_layer(cfg, weight, precision, i)
            out = []
            for y, enc in zip(ys, encoded, strict=True):
                k, v = E.cross_keys_values(cfg, layer, enc)
                t = y.shape[1]
                shape = (1, cfg.num_heads, t, cfg.d_kv)
                state = E.DecoderState(
                    cross_k=[k],
                    cross_v=[v],
                    cross_mask=None,
                    self_k=[torch.zeros(shape)],
                    self_v=[torch.zeros(shape)],
                    bias=E.causal_bias(cfg, dec_table, t),
                )
                out.append(E.decoder_block(cfg, layer, y, state, 0, state.bias))
            ys = out
            del layer
            report(stage, cfg.num_layers + i + 1, steps)
        del encoded, embed
        dec_norm = weight(tensor_src["dec_final_norm"])
        head = E.make_linear(weight("lm_head.weight"), precision)
        result = [
            torch.log_softmax(head(E.final_decoder_norm(cfg, y, dec_norm))[0].float(), dim=-1)
            for y in ys
        ]
        report(stage, steps, steps)
        return result


def run_check(
    spec: ModelSpec,
    pairs: Sequence[CheckPair],
    *,
    progress: Progress | None = None,
    reference_precision: str = "fp32",
) -> CheckReport:
    """Load ``spec`` (the served precision) and score ``pairs``; then score them with the same
    model at ``reference_precision`` (layer by layer on the CPU) and compare."""

    from doppelbot.model.checkpoint import UnsupportedAdapter
    from doppelbot.model.loader import engine_config, load_reply_model, resolve_device
    from doppelbot.model.memory import preflight, streamed_reference_bytes

    report: Progress = progress or (lambda stage, done, total: None)

    def scored(model: ReplyModel, label: str) -> list[torch.Tensor]:
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            report(f"scoring with {label}", done, len(pairs))

        return target_logprobs(model, pairs, tick)

    cfg = engine_config(spec.files)
    cpu = resolve_device(spec.model.device) == "cpu"
    # Known up front, before minutes of loading: the reference pass, with both sides'
    # log-probabilities (targets are short: 64 tokens per sample is generous).
    held = 2 * len(pairs) * 64 * cfg.vocab_size * 4
    if cpu:
        preflight(
            f"model check's {reference_precision} reference (layer by layer)",
            streamed_reference_bytes(cfg, reference_precision) + held,
            hints=["fewer --samples"],
            enabled=spec.model.memory_check,
        )
    candidate = load_reply_model(spec, report)
    targets = [candidate.encode(p.model_target) for p in pairs]
    samples = [
        (candidate.encode(p.model_input, limit=candidate.max_input_tokens), t)
        for p, t in zip(pairs, targets, strict=True)
    ]
    cand = scored(candidate, candidate.precision)
    candidate_name = candidate.precision
    del candidate
    gc.collect()
    ref: list[torch.Tensor] | None = None
    if cpu:
        try:
            ref = reference_logprobs(spec, cfg, samples, reference_precision, report)
        except UnsupportedAdapter as exc:
            log.info("adapter not plain LoRA (%s): loading the whole reference model", exc)
    if ref is None:
        reference = load_reply_model(spec.at(reference_precision), report)
        ref = scored(reference, reference_precision)
        del reference
        gc.collect()
    return compare(
        ref, cand, targets, reference_name=reference_precision, candidate_name=candidate_name
    )

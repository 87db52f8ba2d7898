"""``dpo``: Direct Preference Optimization on the owner's feedback pairs, from the SFT adapter.

The pairs, their batches and the loss are in ``training.dpo`` (why DPO and why our own lines
are explained there). The reference policy is the starting model: its log-probabilities of every
pair are computed once in ``setup``, before a checkpoint is restored, so a resumed run sees the
very same reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from doppelbot.core.errors import TrainingError
from doppelbot.training.data import file_sha256, hash_strings, load_dataset
from doppelbot.training.dpo import (
    PreferenceExample,
    collate_pairs,
    dpo_loss,
    encode_pairs,
    load_pairs,
    score_pairs,
    split_pairs,
)
from doppelbot.training.seq2seq import EncodeStats, encode_rows, sequence_logprobs, subset
from doppelbot.training.types import MethodContext, PreparedData


@dataclass
class PreferenceData(PreparedData):
    heldout: list[PreferenceExample] = field(default_factory=list)


class DpoMethod:
    """Direct Preference Optimization on feedback pairs, from the SFT adapter."""

    name = "dpo"
    description = "preference tuning (DPO) on feedback pairs (--pairs), from the SFT adapter"
    rows_per_example = 2  # chosen and rejected

    def initial_adapter(self, ctx: MethodContext) -> Path | None:
        # None: a fresh LoRA, whose zero-initialised B makes the reference the base model.
        return ctx.options.init_adapter

    def prepare(self, ctx: MethodContext) -> PreparedData:
        options = ctx.options
        if options.pairs is None:
            raise TrainingError("--method dpo needs preference pairs (--pairs PATH)")
        pairs = load_pairs(options.pairs)
        train_rows, held_rows = split_pairs(pairs, options.pref_heldout_share)
        kwargs = {
            "max_input": options.model.max_input_tokens,
            "max_target": options.max_target_tokens,
            "vocab_size": ctx.vocab_size,
        }
        stats = EncodeStats()
        beta = options.dpo_beta
        train = [
            replace(e, beta=beta)
            for e in encode_pairs(ctx.tokenizer, train_rows, stats=stats, **kwargs)
        ]
        heldout = encode_pairs(ctx.tokenizer, held_rows, stats=stats, **kwargs)
        if not train:
            raise TrainingError(
                f"no usable preference pairs in {options.pairs} ({len(pairs)} pairs, "
                f"{len(held_rows)} held out, {stats.dropped_long_input} over the input budget)"
            )
        # The dataset's validation split keeps the held-out loss comparable with the SFT
        # adapter (`adapter use` refuses a worse one), so forgetting the owner's style shows.
        dataset = load_dataset(ctx.datasets_dir, options.dataset)
        val_rows = subset(dataset.validation, options.eval_max_samples)
        validation, val_kept = encode_rows(ctx.tokenizer, val_rows, **kwargs)
        summary: dict[str, Any] = {
            "dataset": dataset.name,
            "pairs_file": str(options.pairs),
            "pairs": len(pairs),
            "train_pairs": len(train),
            "heldout_pairs": len(heldout),
            "dropped_long_input": stats.dropped_long_input,
            "truncated_target": stats.truncated_target,
            "validation_examples": len(validation),
            "dpo_beta": options.dpo_beta,
        }
        data_hash = hash_strings(
            [
                self.name,
                file_sha256(options.pairs),
                str(options.pref_heldout_share),
                dataset.validation_hash,
            ]
        )
        return PreferenceData(
            train,  # type: ignore[arg-type]
            validation,
            val_kept,
            dataset,
            data_hash,
            summary,
            heldout=heldout,
        )

    def setup(self, model: Any, scorer: Any, data: PreparedData) -> dict[str, Any]:
        """Reference log-probabilities of the starting policy, once, for every pair."""
        assert isinstance(data, PreferenceData)
        train = data.train  # type: ignore[assignment]
        ref = score_pairs(scorer, train)  # type: ignore[arg-type]
        data.train[:] = [
            replace(e, ref_chosen=c, ref_rejected=r)  # type: ignore[type-var]
            for e, c, r in zip(train, ref.chosen, ref.rejected, strict=True)
        ]
        held = score_pairs(scorer, data.heldout)
        data.heldout[:] = [
            replace(e, ref_chosen=c, ref_rejected=r)
            for e, c, r in zip(data.heldout, held.chosen, held.rejected, strict=True)
        ]
        n = max(1, len(ref.chosen))
        return {
            "ref_chosen_mean": sum(ref.chosen) / n,
            "ref_rejected_mean": sum(ref.rejected) / n,
        }

    def heldout_metrics(self, scorer: Any, data: PreparedData) -> dict[str, float]:
        if not isinstance(data, PreferenceData) or not data.heldout:
            return {}
        scores = score_pairs(scorer, data.heldout)
        metrics = scores.metrics()
        beta = float(data.summary.get("dpo_beta", 0.1))
        rewards = [
            beta * ((c - e.ref_chosen) - (r - e.ref_rejected))
            for e, c, r in zip(data.heldout, scores.chosen, scores.rejected, strict=True)
        ]
        metrics["reward_margin"] = sum(rewards) / len(rewards)
        return metrics

    def collate(self, examples: Sequence[Any], pad_id: int) -> dict[str, Any]:
        return collate_pairs(examples, pad_id)

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
        logps = sequence_logprobs(model, batch)
        n = logps.shape[0] // 2
        ref = batch["ref"]
        loss, _ = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], float(batch["beta"]))
        return loss, n

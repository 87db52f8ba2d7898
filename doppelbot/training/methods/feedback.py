"""``feedback``: continue an existing adapter on the owner's feedback positives.

Dataset rows are replayed alongside (``feedback_replay`` per weighted feedback row), so the
model does not forget the owner's style while it learns the corrections.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from doppelbot.core.errors import TrainingError
from doppelbot.training.data import DatasetSplits, TrainRow
from doppelbot.training.methods.sft import SftMethod
from doppelbot.training.types import MethodContext


class FeedbackMethod(SftMethod):
    """Continue an adapter on the owner's feedback positives, with dataset replay."""

    name = "feedback"
    description = "continue an adapter on feedback positives (--feedback), replaying dataset rows"

    def initial_adapter(self, ctx: MethodContext) -> Path | None:
        if ctx.options.init_adapter is None:
            raise TrainingError(
                "--method feedback continues an existing adapter: give --init-adapter, or "
                "choose one with `doppelbot adapter use` first"
            )
        return ctx.options.init_adapter

    def train_rows(
        self,
        ctx: MethodContext,
        dataset: DatasetSplits,
        feedback: list[TrainRow],
        summary: dict[str, Any],
    ) -> list[TrainRow]:
        options = ctx.options
        if options.feedback is None:
            raise TrainingError("--method feedback needs --feedback PATH (feedback export JSONL)")
        if not feedback:
            raise TrainingError(f"{options.feedback} holds no usable feedback positives")
        weighted = [row for row in feedback for _ in range(options.feedback_weight)]
        n_replay = min(len(dataset.train), round(len(weighted) * options.feedback_replay))
        # Seeded, so a resumed run sees the very same replay rows.
        replay = random.Random(f"replay:{options.seed}").sample(list(dataset.train), n_replay)
        summary.update(
            feedback_rows=len(feedback),
            feedback_weight=options.feedback_weight,
            replay_rows=n_replay,
        )
        return [*weighted, *replay]

"""Training methods: what data a run learns from and which loss it minimises.

``doppelbot train --method NAME`` picks one from ``METHODS``, the one table of them all. A
method prepares tokenized examples (train and held-out), batches them and computes a loss (the
``TrainingMethod`` protocol in ``training.types``); the trainer around it — accumulation,
checkpoints, resume, logging, the adapter export — is the same for every method.

- ``sft``: the dataset's train split (plus feedback positives, repeated ``feedback_weight``
  times, when ``--feedback`` is given); starts from a new LoRA or continues ``--init-adapter``.
- ``feedback``: continues an existing adapter (the served one by default) on the feedback
  positives, replaying dataset rows alongside so the model does not forget the owner's style.
- ``dpo``: preference tuning on feedback pairs, from the SFT adapter, with a frozen reference.
"""

from __future__ import annotations

from doppelbot.core.errors import TrainingError
from doppelbot.training.methods.dpo import DpoMethod
from doppelbot.training.methods.feedback import FeedbackMethod
from doppelbot.training.methods.sft import SftMethod
from doppelbot.training.types import TrainingMethod

METHODS: dict[str, TrainingMethod] = {
    method.name: method for method in (SftMethod(), FeedbackMethod(), DpoMethod())
}


def get_method(name: str) -> TrainingMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise TrainingError(
            f"unknown training method {name!r} (available: {', '.join(sorted(METHODS))})"
        ) from None

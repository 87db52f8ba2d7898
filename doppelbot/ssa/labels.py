"""SSA — Sensibleness and Specificity Average (Adiwardana et al. 2020) from the owner's labels.

Pure core: the label syntax the owner types in Saved Messages, the blind mixing of candidates,
and the maths (shares, SSA, 95% intervals). Following the paper, a reply that is not sensible is
not specific either, so specificity is a share of *all* labelled replies and SSA is the mean of
the two shares.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from doppelbot.core.domain import Candidate, SsaLabel
from doppelbot.core.errors import DoppelbotError

Z95 = 1.959963984540054

LABEL_HELP = (
    "Answer with two marks — sensible? specific? — e.g. `11` (both), `10` (sensible, not "
    "specific) or `00` (neither). Also accepted: `yy`/`yn`/`nn`, `++`/`+-`/`--`, `дд`/`дн`/`нн`, "
    "with or without a space."
)

_YES = {"1", "y", "+", "д", "да", "yes"}
_NO = {"0", "n", "-", "н", "нет", "no"}
_SPLIT_RE = re.compile(r"[\s,;/]+")


class LabelSyntaxError(DoppelbotError):
    """The owner's marks could not be read; the message carries a hint."""


def _mark(token: str) -> bool:
    t = token.lower()
    if t in _YES:
        return True
    if t in _NO:
        return False
    raise LabelSyntaxError(f"cannot read mark {token!r}. {LABEL_HELP}")


def parse_label(text: str) -> SsaLabel:
    """Parse the owner's two marks. Raises ``LabelSyntaxError`` with a hint when malformed."""
    raw = text.strip().strip(".!").lower()
    if not raw:
        raise LabelSyntaxError(f"empty label. {LABEL_HELP}")
    parts = [p for p in _SPLIT_RE.split(raw) if p]
    if len(parts) == 1:
        word = parts[0]
        if len(word) != 2:
            raise LabelSyntaxError(f"expected two marks, got {text.strip()!r}. {LABEL_HELP}")
        parts = [word[0], word[1]]
    if len(parts) != 2:
        raise LabelSyntaxError(f"expected two marks, got {text.strip()!r}. {LABEL_HELP}")
    sensible, specific = _mark(parts[0]), _mark(parts[1])
    if specific and not sensible:
        raise LabelSyntaxError(
            "a reply that is not sensible cannot be specific: answer `00` (or `10`/`11`). "
            + LABEL_HELP
        )
    return SsaLabel(sensible, specific)


@dataclass(frozen=True, slots=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class SsaReport:
    n: int
    sensibleness: float
    specificity: float
    ssa: float
    sensibleness_ci: Interval
    specificity_ci: Interval
    ssa_ci: Interval


def wilson_interval(successes: int, n: int, z: float = Z95) -> Interval:
    """Wilson score interval for a proportion (well-behaved at 0 and 1 and for small n)."""
    if n == 0:
        return Interval(0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], z: float = Z95) -> Interval:
    """Normal-approximation interval of a mean (sample standard deviation), clipped to [0, 1]."""
    n = len(values)
    if n == 0:
        return Interval(0.0, 1.0)
    mean = sum(values) / n
    if n == 1:
        return Interval(0.0, 1.0)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return Interval(max(0.0, mean - half), min(1.0, mean + half))


def ssa_report(labels: Iterable[SsaLabel]) -> SsaReport:
    items = list(labels)
    n = len(items)
    sens = sum(1 for x in items if x.sensible)
    spec = sum(1 for x in items if x.specific)
    s = sens / n if n else 0.0
    p = spec / n if n else 0.0
    return SsaReport(
        n=n,
        sensibleness=s,
        specificity=p,
        ssa=(s + p) / 2,
        sensibleness_ci=wilson_interval(sens, n),
        specificity_ci=wilson_interval(spec, n),
        ssa_ci=mean_interval([x.score for x in items]),
    )


def blind_order(candidates: Sequence[Candidate], seed: int) -> list[Candidate]:
    """Shuffle so neither position nor grouping reveals the source.

    Deterministic for a seed, so a re-run of ``ssa start`` posts the same order.
    """
    order = list(candidates)
    random.Random(seed).shuffle(order)
    return order

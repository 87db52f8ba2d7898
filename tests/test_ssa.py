from __future__ import annotations

import pytest

from doppelbot.ssa.labels import (
    Candidate,
    LabelSyntaxError,
    SsaLabel,
    blind_order,
    parse_label,
    ssa_report,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("text", "sensible", "specific"),
    [
        ("11", True, True),
        ("10", True, False),
        ("00", False, False),
        ("1 1", True, True),
        ("1,0", True, False),
        (" yy ", True, True),
        ("YN", True, False),
        ("nn", False, False),
        ("++", True, True),
        ("+-", True, False),
        ("--", False, False),
        ("дд", True, True),
        ("да нет", True, False),
        ("нет нет", False, False),
        ("11.", True, True),
    ],
)
def test_parse_every_syntax(text: str, sensible: bool, specific: bool) -> None:
    assert parse_label(text) == SsaLabel(sensible, specific)


@pytest.mark.parametrize("text", ["", "1", "111", "12", "ok", "x y", "1 1 1", "01", "-+"])
def test_malformed_marks_get_a_hint(text: str) -> None:
    with pytest.raises(LabelSyntaxError) as err:
        parse_label(text)
    assert "`11`" in str(err.value)


def test_hand_computed_example() -> None:
    # Four labels: 11, 11, 10, 00.
    # sensible 3/4 = 0.75; specific 2/4 = 0.5; SSA = (0.75 + 0.5) / 2 = 0.625.
    # Per-reply scores 1, 1, 0.5, 0: mean 0.625, sample variance
    # (0.375² + 0.375² + 0.125² + 0.625²) / 3 = 0.6875 / 3 = 0.22917; standard error
    # sqrt(0.22917 / 4) = 0.23936; half width 1.96 × 0.23936 = 0.46914 → [0.15586, 1 (clipped)].
    # Wilson 3/4, z² = 3.84146: centre (0.75 + 3.84146/8) / (1 + 3.84146/4) = 1.23018 / 1.96037
    # = 0.62753; half = 1.95996 × sqrt(0.75·0.25/4 + 3.84146/64) / 1.96037
    # = 1.95996 × 0.32695 / 1.96037 = 0.32688 → [0.30065, 0.95441].
    labels = [parse_label(x) for x in ("11", "11", "10", "00")]
    r = ssa_report(labels)
    assert r.n == 4
    assert r.sensibleness == 0.75 and r.specificity == 0.5 and r.ssa == 0.625
    assert r.ssa_ci.low == pytest.approx(0.15586, abs=1e-4)
    assert r.ssa_ci.high == 1.0
    assert r.sensibleness_ci.low == pytest.approx(0.30065, abs=1e-4)
    assert r.sensibleness_ci.high == pytest.approx(0.95441, abs=1e-4)


def test_wilson_edges() -> None:
    assert wilson_interval(0, 0).low == 0.0 and wilson_interval(0, 0).high == 1.0
    assert wilson_interval(0, 10).low == 0.0
    assert wilson_interval(10, 10).high == pytest.approx(1.0)
    assert wilson_interval(10, 10).low > 0.6


def test_blind_order_is_deterministic_and_mixes() -> None:
    cands = [
        Candidate(f"c{i}", src, f"r{i}{src}") for i in range(20) for src in ("A", "B", "owner")
    ]
    one, two = blind_order(cands, seed=7), blind_order(cands, seed=7)
    assert one == two and one != cands
    assert sorted(c.reply for c in one) == sorted(c.reply for c in cands)
    # sources are spread: the first third is not all from one source
    assert len({c.source for c in one[:20]}) == 3

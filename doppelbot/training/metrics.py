"""Text metrics for held-out evaluation: chrF, style statistics, distinct-n and repetition.

Self-contained (no sacrebleu dependency) and pure Python, so they are unit-tested against
hand-computed values and usable without a model. ``doppelbot.training.evaluate`` wires them into
its metric registry next to the model-based ones (loss, perplexity).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

CHRF_ORDER = 6
CHRF_BETA = 2.0

# Emoji blocks (pictographs, symbols, dingbats, flags, variation selector, ZWJ joins): a reply
# "has an emoji" when any of its characters falls in one of them.
_EMOJI_RE = re.compile(
    "[\U0001f000-\U0001faff\U00002600-\U000027bf\U00002b00-\U00002bff"
    "\U0001f1e6-\U0001f1ff\ufe0f\u200d\u2300-\u23ff]"
)
_PUNCT_RE = re.compile(r"[.,!?;:…\-—()\"«»']")
# Russian chat's bracket smileys: "ок)", "ахах))", "жаль(".
_BRACKET_SMILEY_RE = re.compile(r"(?:^|[^(:;=8\d])[)(]+\s*$|\){2,}|\({2,}")


# --- chrF -------------------------------------------------------------------------------------
def _char_ngrams(text: str, n: int) -> Counter[str]:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf_statistics(hypothesis: str, reference: str, order: int = CHRF_ORDER) -> list[int]:
    """Per order n = 1..order: [hyp n-grams, ref n-grams, matching n-grams] (flattened).

    Whitespace is removed first, as in chrF's reference implementation (sacrebleu's default);
    hypothesis n-grams of an order the reference is too short to have are not counted, as in
    sacrebleu, so a long reply to a one-word reference is not punished at every order.
    """
    hyp = "".join(hypothesis.split())
    ref = "".join(reference.split())
    stats: list[int] = []
    for n in range(1, order + 1):
        h, r = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        stats += [sum(h.values()) if r else 0, sum(r.values()), sum((h & r).values())]
    return stats


def chrf_from_statistics(stats: Sequence[int], beta: float = CHRF_BETA) -> float:
    """chrF (0..100) from summed statistics: mean precision and recall over the orders that
    occur in both texts, then their F-beta (Popović 2015; sacrebleu's default ``CHRF()``)."""
    order = len(stats) // 3
    factor = beta**2
    avg_prec = avg_rec = 0.0
    effective = 0
    for i in range(order):
        n_hyp, n_ref, n_match = stats[3 * i : 3 * i + 3]
        if n_hyp > 0 and n_ref > 0:
            avg_prec += n_match / n_hyp
            avg_rec += n_match / n_ref
            effective += 1
    if effective == 0:
        return 0.0
    avg_prec /= effective
    avg_rec /= effective
    if avg_prec + avg_rec == 0:
        return 0.0
    return 100.0 * (1 + factor) * avg_prec * avg_rec / (factor * avg_prec + avg_rec)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF: n-gram statistics are summed over all pairs before scoring."""
    if len(hypotheses) != len(references):
        raise ValueError("hypotheses and references differ in length")
    total = [0] * (3 * CHRF_ORDER)
    for hyp, ref in zip(hypotheses, references, strict=True):
        for i, value in enumerate(chrf_statistics(hyp, ref)):
            total[i] += value
    return chrf_from_statistics(total)


def sentence_chrf(hypothesis: str, reference: str) -> float:
    return chrf_from_statistics(chrf_statistics(hypothesis, reference))


# --- style ------------------------------------------------------------------------------------
def has_emoji(text: str) -> bool:
    return _EMOJI_RE.search(text) is not None


def _share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def style_stats(texts: Sequence[str]) -> dict[str, float]:
    """How replies look: length, emoji, punctuation, capitalisation (means/shares over texts)."""
    stripped = [t.strip() for t in texts]
    chars = sum(len(t) for t in stripped)
    return {
        "len_chars": sum(len(t) for t in stripped) / len(stripped) if stripped else 0.0,
        "len_words": sum(len(t.split()) for t in stripped) / len(stripped) if stripped else 0.0,
        "emoji_rate": _share([has_emoji(t) for t in stripped]),
        "question_rate": _share(["?" in t for t in stripped]),
        "exclaim_rate": _share(["!" in t for t in stripped]),
        "end_punct_rate": _share([t.endswith((".", "!", "?", "…")) for t in stripped]),
        "bracket_smiley_rate": _share([_BRACKET_SMILEY_RE.search(t) is not None for t in stripped]),
        "capital_start_rate": _share([t[:1].isupper() for t in stripped]),
        "punct_per_char": sum(len(_PUNCT_RE.findall(t)) for t in stripped) / chars
        if chars
        else 0.0,
        "empty_rate": _share([not t for t in stripped]),
    }


# --- diversity --------------------------------------------------------------------------------
def _tokens(text: str) -> list[str]:
    return text.lower().split()


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams over the whole set."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        toks = _tokens(text)
        grams += [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(texts: Sequence[str]) -> float:
    """Mean share of repeated words inside one reply (``да да да`` → 2/3), over replies of two
    or more words; a degenerate looping model scores high."""
    rates = []
    for text in texts:
        toks = _tokens(text)
        if len(toks) >= 2:
            rates.append(1.0 - len(set(toks)) / len(toks))
    return sum(rates) / len(rates) if rates else 0.0


def duplicate_rate(texts: Sequence[str]) -> float:
    """Share of replies that repeat another reply of the set (one canned answer for all)."""
    cleaned = [t.strip().lower() for t in texts if t.strip()]
    return 1.0 - len(set(cleaned)) / len(cleaned) if cleaned else 0.0


def diversity_stats(texts: Sequence[str]) -> dict[str, float]:
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repetition_rate": repetition_rate(texts),
        "duplicate_rate": duplicate_rate(texts),
    }

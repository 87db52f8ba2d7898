"""Dataset quality: duplicate keys and the per-contact cap.

Duplicates: an *exact* duplicate has the same context turns and reply; a *near* duplicate has
the same letters once case, spaces, punctuation, digits and emoji are ignored (the ``norm``
keys the message cleaner computes). Both are plain set look-ups — deterministic, and cheap
enough for millions of samples. The first occurrence (in chat id, then time order) is kept.

Contact cap: no chat may contribute more than ``max_contact_share`` of the samples; larger
chats are thinned evenly over time, which keeps every period of the conversation represented.
"""

from __future__ import annotations

from collections.abc import Mapping


def contact_cap(counts: Mapping[int, int], share: float) -> int | None:
    """The per-chat sample cap that makes every chat's share at most ``share``.

    ``None`` when no chat exceeds it already, or when it cannot be met (fewer than
    ``1 / share`` chats: even equal shares would be too large).
    """
    values = [n for n in counts.values() if n > 0]
    if not values or share >= 1:
        return None
    total = sum(values)
    biggest = max(values)
    if biggest <= share * total + 1e-9:
        return None
    if len(values) * share < 1 - 1e-9:
        return None

    def ok(cap: int) -> bool:
        return cap <= share * sum(min(n, cap) for n in values) + 1e-9

    lo, hi = 1, biggest  # ok(lo) holds since len(values) * share >= 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def cap_unsatisfiable(counts: Mapping[int, int], share: float) -> bool:
    values = [n for n in counts.values() if n > 0]
    if not values or share >= 1:
        return False
    return max(values) > share * sum(values) + 1e-9 and len(values) * share < 1 - 1e-9


def evenly_spaced(n: int, keep: int) -> list[int]:
    """``keep`` indexes out of ``range(n)``, spread evenly (deterministic thinning)."""
    if keep >= n:
        return list(range(n))
    if keep <= 0:
        return []
    return [(i * n) // keep for i in range(keep)]

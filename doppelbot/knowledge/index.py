"""The in-memory fact index: one float32 matrix of unit vectors, searched by a dot product.

A few thousand facts fit in a few MB and a matrix-vector product over them takes well under a
millisecond, so there is no approximate index: the matrix is simply rebuilt whenever the fact
set changes. Pure numpy, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from doppelbot.core.errors import KnowledgeError
from doppelbot.core.ports import ScoredFact


def vector_to_blob(vector: np.ndarray) -> bytes:
    """The cache format: little-endian float32."""
    return np.asarray(vector, dtype="<f4").tobytes()


def blob_to_vector(blob: bytes, dim: int) -> np.ndarray:
    if len(blob) != dim * 4:
        raise KnowledgeError(f"cached embedding has {len(blob)} bytes, expected {dim} float32")
    return np.frombuffer(blob, dtype="<f4").astype(np.float32, copy=False)


@dataclass(frozen=True, slots=True, eq=False)
class FactIndex:
    ids: np.ndarray  # (n,) int64 fact ids
    texts: tuple[str, ...]
    matrix: np.ndarray  # (n, dim) float32, unit rows

    @classmethod
    def empty(cls, dim: int) -> FactIndex:
        return cls(np.zeros(0, dtype=np.int64), (), np.zeros((0, dim), dtype=np.float32))

    @classmethod
    def build(
        cls, ids: Sequence[int], texts: Sequence[str], vectors: Sequence[np.ndarray]
    ) -> FactIndex:
        if not (len(ids) == len(texts) == len(vectors)):
            raise KnowledgeError("fact index: ids, texts and vectors differ in length")
        if not ids:
            raise KnowledgeError("fact index: use FactIndex.empty(dim) for no facts")
        matrix = np.ascontiguousarray(np.vstack(vectors), dtype=np.float32)
        return cls(np.asarray(ids, dtype=np.int64), tuple(texts), matrix)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def search(self, query: np.ndarray, top_k: int, threshold: float) -> list[ScoredFact]:
        """The ``top_k`` facts with cosine >= ``threshold``, best first (ties: lower id first)."""
        n = len(self.texts)
        if n == 0 or top_k <= 0:
            return []
        scores = self.matrix @ np.asarray(query, dtype=np.float32).reshape(-1)
        candidates = np.argpartition(-scores, top_k - 1)[:top_k] if top_k < n else np.arange(n)
        order = candidates[np.lexsort((self.ids[candidates], -scores[candidates]))]
        out = []
        for i in order:
            score = float(scores[i])
            if score < threshold:
                break  # sorted descending: nothing further qualifies
            out.append(ScoredFact(int(self.ids[i]), self.texts[i], min(score, 1.0)))
        return out

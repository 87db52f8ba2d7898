"""The sentence-transformers model behind fact retrieval, wrapped so nothing else imports it.

``Embedder.load`` is blocking (it reads weights) and ``Embedder.encode`` is CPU-bound: both are
meant to run in the knowledge base's single worker thread, never on the event loop. Vectors come
back L2-normalised float32, so a dot product *is* the cosine similarity.

An ``Embedder`` is not safe for concurrent use from two threads (the fast tokenizer refuses
re-entrant calls); ``KnowledgeBase`` guarantees that by funnelling all work through one thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from doppelbot.core.errors import KnowledgeError

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64


def model_key(name_or_path: str) -> str:
    """The embedding-cache key for a model: a local folder by its absolute path, else the id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path.resolve())
    return name_or_path


def set_worker_threads(threads: int | None) -> None:
    """Limit torch's intra-op threads *of the calling thread* only, so the embedder's worker
    does not fight the reply model's worker for cores.

    The OpenMP thread count is per thread, but ``torch.set_num_threads`` also stores a
    process-wide default that threads started later adopt on their first torch call; that
    default is put back from a short-lived helper thread, or the reply model's worker would
    silently inherit the embedder's single thread.
    """
    if not threads:
        return

    import torch

    previous = torch.get_num_threads()  # this new thread starts from the process default
    torch.set_num_threads(threads)
    if previous != threads:
        helper = threading.Thread(target=torch.set_num_threads, args=(previous,))
        helper.start()
        helper.join()


class Embedder:
    """A loaded sentence-transformers model: ``encode(texts) -> (n, dim)`` unit vectors."""

    def __init__(self, model: Any, model_id: str, *, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self._model = model
        self.model_id = model_id
        self.batch_size = batch_size
        size = getattr(model, "get_embedding_dimension", None)  # sentence-transformers >= 5
        dim = (size or model.get_sentence_embedding_dimension)()
        if not dim:
            raise KnowledgeError(f"embedder {model_id!r} does not report its vector size")
        self.dim = int(dim)
        self.calls = 0  # encode()/encode_query() calls, for tests and stats
        self.texts_encoded = 0
        # encode() re-walks every module (eval(), device lookup) on each call: ~1.5 ms of a
        # ~10 ms query on a small CPU. One query can take a direct forward instead, unless the
        # model wants a prompt prefix or truncation that only encode() applies.
        self._fast_query = (
            getattr(model, "default_prompt_name", None) is None
            and getattr(model, "truncate_dim", None) is None
            and hasattr(model, "forward")
        )
        self._device = getattr(model, "device", None)  # the property walks all parameters

    @classmethod
    def load(
        cls, name_or_path: str, *, device: str | None = None, model_id: str | None = None
    ) -> Embedder:
        """Load a model from a local folder (blocking; call from a worker thread).
        ``model_id``: the configured name it was resolved from (a hub id whose download is in
        ``name_or_path``), which keys the embedding cache."""
        try:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(name_or_path, device=device)
            model.eval()
        except Exception as exc:  # torch/HF raise many types; the CLI needs one clear line
            raise KnowledgeError(
                f"cannot load the embedder {model_id or name_or_path!r} from {name_or_path}: "
                f"{exc}. Run `doppelbot model download embedder`, or set "
                "DOPPELBOT_EMBEDDER_MODEL to a folder holding a sentence-transformers model"
            ) from exc
        log.info("embedder %s loaded on %s", model_id or name_or_path, model.device)
        return cls(model, model_key(model_id or name_or_path))

    def encode_query(self, text: str) -> np.ndarray:
        """One unit-length float32 vector for one short text (blocking); the same vector
        ``encode([text])[0]`` gives, without its per-call overhead."""
        if not self._fast_query:
            return self.encode([text])[0]
        import torch

        self.calls += 1
        model = self._model
        try:
            with torch.inference_mode():
                prepare = getattr(model, "preprocess", None) or model.tokenize
                features = {
                    k: v.to(self._device) if isinstance(v, torch.Tensor) else v
                    for k, v in prepare([text]).items()
                }
                out = model.forward(features)["sentence_embedding"]
                out = torch.nn.functional.normalize(out.float(), p=2, dim=1)
        except Exception as exc:
            raise KnowledgeError(f"the embedder failed on a query: {exc}") from exc
        self.texts_encoded += 1
        return out[0].cpu().numpy().astype(np.float32, copy=False)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text (blocking)."""
        self.calls += 1
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        try:
            out = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        except Exception as exc:
            raise KnowledgeError(f"the embedder failed on {len(texts)} text(s): {exc}") from exc
        self.texts_encoded += len(texts)
        vectors = np.ascontiguousarray(out, dtype=np.float32)
        if vectors.shape != (len(texts), self.dim):
            raise KnowledgeError(
                f"the embedder returned shape {vectors.shape}, expected ({len(texts)}, {self.dim})"
            )
        return vectors

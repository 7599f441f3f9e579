"""retrieval-imprint: few-shot classifiers imprinted from a frozen embedding model (IMPRINT)."""

from .classifier import PRESETS, ImprintClassifier
from .collapse import CollapseReport, neural_collapse
from .collection import Collection
from .embed import Embedder
from .generate import GENERATORS, register

__version__ = "0.1.0"

__all__ = ["ImprintClassifier", "PRESETS", "Collection", "Embedder", "CollapseReport", "neural_collapse",
           "GENERATORS", "register", "__version__"]

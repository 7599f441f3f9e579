"""retrieval-imprint: few-shot classifiers imprinted from a frozen embedding model (IMPRINT)."""

from .classifier import ImprintClassifier
from .collapse import CollapseReport, neural_collapse
from .collection import Collection, QueryResult
from .embed import Embedder
from .errors import ImprintError
from .generate import GENERATORS, register
from .ingest import IngestReport, ingest
from .params import DEFAULTS, PRESETS

__version__ = "0.1.0"

__all__ = ["ImprintClassifier", "PRESETS", "DEFAULTS", "Collection", "QueryResult", "ingest", "IngestReport",
           "Embedder", "ImprintError", "CollapseReport", "neural_collapse", "GENERATORS", "register", "__version__"]

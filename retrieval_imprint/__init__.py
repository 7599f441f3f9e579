"""retrieval-imprint: few-shot classifiers imprinted from a frozen embedding model (IMPRINT).

The public names below are imported on first use (PEP 562), so that ``imprint --help`` and a
module that needs only ``params`` do not pay for scikit-learn, SQLAlchemy and torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOME = {
    "ImprintClassifier": "classifier",
    "CollapseReport": "collapse",
    "neural_collapse": "collapse",
    "Collection": "collection",
    "QueryResult": "ranking",
    "Embedder": "embed",
    "ImprintError": "errors",
    "GENERATORS": "generate",
    "register": "generate",
    "IngestReport": "ingestion",
    "ingest": "ingestion",
    "DEFAULTS": "params",
    "PRESETS": "params",
    "load_demo": "readers",
    "ShardedCollection": "sharded",
    "ImprintCollection": "interface",
    "open": "sharded:open_any",  # either kind of collection
    "set_device": "device",
    "use_device": "device",
}

__all__ = [
    "DEFAULTS",
    "GENERATORS",
    "PRESETS",
    "CollapseReport",
    "Collection",
    "Embedder",
    "ImprintClassifier",
    "ImprintCollection",
    "ImprintError",
    "IngestReport",
    "QueryResult",
    "ShardedCollection",
    "__version__",
    "ingest",
    "load_demo",
    "neural_collapse",
    "open",
    "register",
    "set_device",
    "use_device",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from .classifier import ImprintClassifier
    from .collapse import CollapseReport, neural_collapse
    from .collection import Collection
    from .device import set_device, use_device
    from .embed import Embedder
    from .errors import ImprintError
    from .generate import GENERATORS, register
    from .ingestion import IngestReport, ingest
    from .interface import ImprintCollection
    from .params import DEFAULTS, PRESETS
    from .ranking import QueryResult
    from .readers import load_demo
    from .sharded import ShardedCollection
    from .sharded import open_any as open


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'retrieval_imprint' has no attribute {name!r}")
    module, _, attribute = _HOME[name].partition(":")
    value = getattr(import_module(f".{module}", __name__), attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

# FAISS taken as untyped (pyproject.toml, [tool.mypy]): its own stubs miss much of the SWIG API.
from typing import Any

def __getattr__(name: str) -> Any: ...

"""Where the heavy kernels run: today's numpy/FAISS path, or the torch backend on CPU or a GPU.

Two kernels have a torch backend: batched k-means (``kmeans.py``, one code for numpy and torch
arrays through ``array_api_compat``) and exact search with a top-m merged block by block
(``torch_search.py``). ``device`` is a setting of the process, never stored with a collection:

- ``None`` (default): numpy and FAISS, today's path;
- ``"cpu"``: the torch backend on the CPU; ``"cuda"`` (or ``"cuda:N"``): on a GPU, an error
  naming the problem when torch sees none;
- ``"auto"``: the GPU when torch sees one, else today's path, with a one-line notice.

``set_device`` sets the process default (the CLI's ``--device``); ``use_device`` overrides it in a
``with`` block (``ImprintClassifier(device=...)`` wraps its fit and predict in one); kernels read
``current()``. torch is imported only when a device is asked for.
"""

from __future__ import annotations

import contextvars
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from .errors import DeviceError

DEVICES = (None, "cpu", "cuda", "auto")
BLOCK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}  # padded class data per k-means block

_default: str | None = None
_override: contextvars.ContextVar[tuple[str | None] | None] = contextvars.ContextVar("device", default=None)


class DeviceFallback(UserWarning):
    """``device="auto"`` found no GPU and runs today's numpy/FAISS path."""


def check_device(name: str, device: Any) -> str | None:
    """``device`` if it is one of ``DEVICES`` or ``"cuda:N"``, else a ``DeviceError`` naming it."""
    if device in DEVICES or (isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise DeviceError(f"{name}={device!r} is not valid; expected one of None, 'cpu', 'cuda', 'cuda:N', 'auto'")


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch comes with sentence-transformers
        raise DeviceError("the torch backend needs torch: pip install torch") from exc
    return torch


def resolve(device: Any) -> str | None:
    """The torch device string the kernels use for ``device`` (None: the numpy/FAISS path)."""
    device = check_device("device", device)
    if device is None:
        return None
    torch = _torch()
    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda" if device == "auto" else device
    if device == "auto":
        warnings.warn(f"device='auto': torch {torch.__version__} sees no CUDA GPU; running on the CPU "
                      "with numpy and FAISS", DeviceFallback, stacklevel=3)
        return None
    raise DeviceError(f"device={device!r}: torch {torch.__version__} sees no CUDA GPU "
                      f"({'a CPU-only build' if torch.version.cuda is None else 'no device visible'}); "
                      "use device='auto' to fall back to the CPU")


def set_device(device: Any) -> str | None:
    """Set the process's device (see the module docstring); returns what it resolved to."""
    global _default
    _default = resolve(device)
    return _default


@contextmanager
def use_device(device: Any) -> Iterator[str | None]:
    """Run the kernels of a ``with`` block on ``device`` (None inside: the process default)."""
    token = _override.set((resolve(device),) if device is not None else None)
    try:
        yield current()
    finally:
        _override.reset(token)


def current() -> str | None:
    """The torch device the kernels run on now, or None for the numpy/FAISS path."""
    override = _override.get()
    return _default if override is None else override[0]


def to_device(a: np.ndarray, device: str) -> Any:
    """``a`` as a torch tensor on ``device`` (no copy on the CPU)."""
    return _torch().from_numpy(np.ascontiguousarray(a)).to(device)


def to_numpy(a: Any) -> np.ndarray:
    """A torch tensor (or an array) as a numpy array."""
    return a if isinstance(a, np.ndarray) else a.detach().cpu().numpy()

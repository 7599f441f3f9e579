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

On a GPU device, FAISS does what torch does not: IVF list training and IVF search run on a
read-only GPU copy of the index (``faiss_gpu``), when the ``gpu`` extra (faiss-gpu) is installed;
the CPU index stays the index of record (a GPU index cannot remove ids).
"""

from __future__ import annotations

import contextvars
import functools
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .errors import DeviceError
from .params import check_device

BLOCK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}  # padded class data per k-means block
STAGE_BYTES = 64 << 20  # page-locked buffer a GPU result comes back through (copy_to_host)

_default: str | None = None
_override: contextvars.ContextVar[tuple[str | None] | None] = contextvars.ContextVar("device", default=None)


class DeviceFallback(UserWarning):
    """``device="auto"`` found no GPU and runs today's numpy/FAISS path."""


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
        warnings.warn(
            f"device='auto': torch {torch.__version__} sees no CUDA GPU; running on the CPU with numpy and FAISS",
            DeviceFallback,
            stacklevel=3,
        )
        return None
    raise DeviceError(
        f"device={device!r}: torch {torch.__version__} sees no CUDA GPU "
        f"({'a CPU-only build' if torch.version.cuda is None else 'no device visible'}); "
        "use device='auto' to fall back to the CPU"
    )


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


def to_device(a: Any, device: str) -> Any:
    """``a`` (a numpy array or a tensor) as a torch tensor on ``device``: no copy where it already
    lies (a numpy array on the CPU is shared). To a GPU it goes through page-locked memory without
    blocking the host (torch keeps the staging copy until the transfer is done)."""
    torch = _torch()
    if isinstance(a, torch.Tensor):
        return a.to(device)
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if device == "cpu" else t.pin_memory().to(device, non_blocking=True)


def to_numpy(a: Any) -> np.ndarray:
    """A torch tensor (or an array) as a numpy array."""
    return a if isinstance(a, np.ndarray) else a.detach().cpu().numpy()


def copy_to_host(dst: np.ndarray, src: Any, rows: np.ndarray | None = None) -> None:
    """Copy a tensor (or an array) into the numpy array ``dst``, with no intermediate array:
    into the whole of ``dst`` (contiguous), or into its rows ``rows`` (``src``'s first axis in order).

    From a GPU, a ``STAGE_BYTES`` page-locked buffer at a time (the transfer at full speed), then
    into ``dst`` with torch's threaded copy (``index_copy_`` for ``rows``): landing on fresh host
    memory is what costs (its first touch; 6 GB of centroids took 2.2 s from one thread on the H200
    machine, against 0.11 s for the transfer into page-locked memory), and threads take that in parallel.
    """
    if isinstance(src, np.ndarray):
        dst[... if rows is None else rows] = src
        return
    torch = _torch()
    target = torch.from_numpy(dst)
    at = None if rows is None else torch.from_numpy(np.asarray(rows, np.int64))

    def land(lo: int, part: Any) -> None:  # part: src[lo : lo + len(part)], on the CPU
        if at is None:
            target[lo : lo + len(part)].copy_(part)
        else:
            target.index_copy_(0, at[lo : lo + len(part)], part)

    if src.device.type == "cpu":
        land(0, src)
        return
    step = max(1, STAGE_BYTES // max(1, src[:1].nbytes))  # whole rows of src's first axis per stage
    stage = torch.empty((min(step, len(src)), *src.shape[1:]), dtype=src.dtype, pin_memory=True)
    for lo in range(0, len(src), step):
        part = stage[: min(step, len(src) - lo)]
        part.copy_(src[lo : lo + step])
        land(lo, part)


def prefetched(blocks: Iterable[tuple], device: str) -> Iterator[tuple]:
    """Blocks ``(tag, *arrays)`` with their arrays moved to ``device`` (``tag`` passes as is).

    On a GPU each block's copy is issued on a side stream before the previous block is handed
    out, so the transfer of the next block overlaps the work on this one.
    """
    torch = _torch()
    if not device.startswith("cuda"):
        for tag, *arrays in blocks:
            yield (tag, *(to_device(a, device) for a in arrays))
        return
    side, work = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def issue(block: tuple) -> tuple:
        tag, *arrays = block
        with torch.cuda.stream(side):
            moved = [to_device(a, device) for a in arrays]
            done = torch.cuda.Event()
            done.record(side)
        return tag, moved, done

    def hand_over(issued: tuple) -> tuple:
        tag, moved, done = issued
        work.wait_event(done)
        for t in moved:  # made on the side stream, used on the work stream
            t.record_stream(work)
        return (tag, *moved)

    ahead = None
    for block in blocks:
        issued = issue(block)
        if ahead is not None:
            yield hand_over(ahead)
        ahead = issued
    if ahead is not None:
        yield hand_over(ahead)


def faiss_gpu(device: str | None) -> int | None:
    """The GPU FAISS should use under ``device`` (``"cuda"``, ``"cuda:N"``), or None: not a GPU
    device, or a FAISS without GPU support (faiss-cpu: a one-line notice says so) or GPUs."""
    if device is None or not device.startswith("cuda"):
        return None
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        why = (
            "FAISS sees no GPU"
            if hasattr(faiss, "StandardGpuResources")
            else "this FAISS has no GPU support (make install-gpu, see the README)"
        )
        warnings.warn(
            f"device={device!r}: {why}; IVF indexes are trained and searched on the CPU", DeviceFallback, stacklevel=3
        )
        return None
    return int(device.partition(":")[2] or 0)


@functools.cache
def gpu_resources(gpu: int) -> Any:
    """FAISS's memory and streams on GPU ``gpu``: one per process, shared by every GPU index."""
    import faiss

    return faiss.StandardGpuResources()


def to_gpu(index: Any, gpu: int) -> Any:
    """A GPU copy of a FAISS CPU index (searches only: the CPU index stays the one written)."""
    import faiss

    return faiss.index_cpu_to_gpu(gpu_resources(gpu), gpu, index)

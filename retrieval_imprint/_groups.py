"""Training data grouped by class, and per-class randomness that does not depend on class order.

Every generator sees the same view: rows sorted by class, ``offsets`` marking where each class
starts, and one 64-bit ``key`` per class derived from its label (``labels.label_key``). Random draws are a pure function
of ``(random_state, key, step)`` (a vectorised splitmix64 hash), so a class gets the same proxies
whether it is fitted alone or among a million others: the property incremental adds rely on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as device_of
from threadpoolctl import ThreadpoolController

from .device import BLOCK_BYTES, copy_to_host, prefetched

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_THREADPOOLS: list[ThreadpoolController] = []  # inspected once: scanning the loaded libraries costs ~10 ms


def single_threaded_blas():
    """A context limiting BLAS to one thread (the library scan is cached across calls)."""
    if not _THREADPOOLS:
        _THREADPOOLS.append(ThreadpoolController())
    return _THREADPOOLS[0].limit(limits=1, user_api="blas")


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(keys: np.ndarray, seed: int, stream: int, counter: np.ndarray | int = 0) -> np.ndarray:
    """Uniform draws in [0, 1), elementwise over broadcast ``keys`` and ``counter``.

    One independent stream per ``(seed, stream, key)``; ``counter`` indexes draws within it.
    """
    with np.errstate(over="ignore"):
        base = _mix(np.asarray([seed % 2**64], np.uint64) * _GOLDEN + np.uint64(stream))
        z = _mix(np.asarray(keys, np.uint64) ^ base)
        z = _mix(z + (np.asarray(counter, np.uint64) + np.uint64(1)) * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class Grouped:
    """Rows of ``X`` sorted by class: class ``c`` owns ``X[offsets[c]:offsets[c + 1]]``."""

    X: np.ndarray  # (n, d) float32; or a torch tensor on the device map_blocks runs on
    offsets: np.ndarray  # (C + 1,) int64
    keys: np.ndarray  # (C,) uint64

    @classmethod
    def from_codes(cls, X: np.ndarray, codes: np.ndarray, keys: np.ndarray) -> Grouped:
        """Group ``X`` by integer class codes ``0..C-1`` (every code must occur)."""
        counts = np.bincount(codes, minlength=len(keys))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if np.all(codes[1:] >= codes[:-1]):  # already grouped: no copy
            return cls(np.ascontiguousarray(X), offsets, np.asarray(keys, np.uint64))
        return cls(X[np.argsort(codes, kind="stable")], offsets, np.asarray(keys, np.uint64))

    @property
    def n_classes(self) -> int:
        return len(self.keys)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def owner(self) -> np.ndarray:
        """Class index of every row."""
        return np.repeat(np.arange(self.n_classes), self.sizes)

    def take(self, classes: np.ndarray) -> Grouped:
        """The sub-group of the given class indices, in that order."""
        sizes = self.sizes[classes]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return Grouped(self.X[self.rows(classes)], offsets, self.keys[classes])

    def rows(self, classes: np.ndarray) -> np.ndarray:
        """Row indices of the given classes, class after class (no Python loop over classes)."""
        sizes = self.sizes[classes]
        shift = self.offsets[classes] - np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return np.repeat(shift, sizes) + np.arange(int(sizes.sum()))

    def padded(self, max_bytes: int = 64 << 20) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(classes, P, mask)`` chunks: ``P`` is ``(B, n_pad, d)`` zero-padded class blocks.

        Classes are visited by size so that padding stays small; each chunk holds at most
        ``max_bytes`` of padded data (at least one class). Batched algorithms (k-means, FPS,
        k-medoids) run one BLAS call per chunk instead of one Python call per class.
        """
        sizes, d = self.sizes, self.X.shape[1]
        order = np.argsort(sizes, kind="stable")
        start = 0
        while start < len(order):
            stop = start + 1
            while stop < len(order) and (stop + 1 - start) * sizes[order[stop]] * d * 4 <= max_bytes:
                stop += 1
            classes = order[start:stop]
            n_pad = int(sizes[classes].max())
            mask = np.arange(n_pad)[None, :] < sizes[classes][:, None]
            lo, hi = self.offsets[classes[0]], self.offsets[classes[-1] + 1]
            if mask.all() and hi - lo == len(classes) * n_pad:  # equal, consecutive classes: a view
                P = self.X[lo:hi].reshape(len(classes), n_pad, d)
            else:
                xp = array_namespace(self.X)
                P = xp.zeros((len(classes), n_pad, d), dtype=self.X.dtype, device=device_of(self.X))
                P.reshape(-1, d)[np.flatnonzero(mask.ravel())] = self.X[self.rows(classes)]
            yield classes, P, mask
            start = stop

    def map_blocks(
        self, fn: Callable[[np.ndarray, Any, Any], Any], k: int, workers: int | None = None, device: str | None = None
    ) -> np.ndarray:
        """``fn(classes, P, mask) -> (B, k, d)`` over padded blocks, on all cores; returns ``(C, k, d)``.

        Blocks run in threads with single-threaded BLAS: tiny per-class matrices gain nothing from
        a threaded GEMM, while whole blocks in parallel use every core. With a torch ``device``
        (``device.py``) ``P`` and ``mask`` are tensors on it, and blocks (larger on a GPU) run one
        after another, each using the whole device, the next block's copy overlapping the work.
        """
        d = self.X.shape[1]
        out = np.empty((self.n_classes, k, d), np.float32)
        if device is not None:
            for classes, P, mask in prefetched(self.padded(BLOCK_BYTES[device.split(":")[0]]), device):
                result, lo = fn(classes, P, mask), int(classes[0])
                if np.array_equal(classes, np.arange(lo, lo + len(classes))):  # a run of classes: copied in place
                    copy_to_host(out[lo : lo + len(classes)], result)
                else:
                    copy_to_host(out, result, rows=classes)
            return out
        workers = workers or os.cpu_count() or 1
        total = int(self.sizes.sum()) * d * 4
        max_bytes = int(np.clip(total // (4 * workers), 1 << 20, 64 << 20))
        with single_threaded_blas(), ThreadPoolExecutor(workers) as pool:
            pending = []
            for block in self.padded(max_bytes):
                pending.append(pool.submit(lambda b: (b[0], fn(*b)), block))
                if len(pending) >= 2 * workers:  # bound the padded copies held at once
                    classes, result = pending.pop(0).result()
                    out[classes] = result
            for future in pending:
                classes, result = future.result()
                out[classes] = result
        return out

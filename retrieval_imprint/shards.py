"""A sharded collection's directory: its manifest (``shards.json``), its shards' directories,
and which shard owns a label.

A class lives whole in shard ``label_key(label) % S`` (``labels.label_key``: a 64-bit BLAKE2b key
of the label, the same in every process and on every machine, never Python's salted ``hash``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import labels as lab
from .errors import CollectionDamagedError, InvalidParameterError, NotACollectionError
from .segments import DB_NAME

MANIFEST = "shards.json"

FORMAT = 1

LABEL_HASH = "labels.label_key % shards"


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a sharded collection (a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a collection, sharded or not."""
    return is_sharded(path) or (Path(path) / DB_NAME).exists()


def directories(path: str | os.PathLike) -> list[Path]:
    """The ordinary collections the collection at ``path`` consists of: its shards, or itself."""
    path = Path(path)
    return [path / shard_name(i) for i in range(read_manifest(path)["shards"])] if is_sharded(path) else [path]


def shard_of(labels: Sequence[object], n_shards: int) -> np.ndarray:
    """The shard owning each label: its stable 64-bit key modulo ``n_shards``."""
    return (lab.label_keys(labels) % np.uint64(n_shards)).astype(np.int64)


def shard_name(i: int) -> str:
    return f"shard-{i:04d}"


def recorded_choice(path: str | os.PathLike) -> dict[str, Any] | None:
    """What auto chose for every shard of the sharded collection at ``path`` (None before it)."""
    chosen = read_manifest(Path(path))["auto_choice"]
    return json.loads(chosen) if chosen else None


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, checked: a damaged one is an error naming the file."""
    where = path / MANIFEST
    if not where.exists():
        raise NotACollectionError(f"{path} is not a sharded collection (no {MANIFEST} in it)")
    try:
        manifest = json.loads(where.read_text())
    except (OSError, ValueError) as exc:
        raise CollectionDamagedError(f"{where} cannot be read as a shard manifest: {exc}") from None
    n = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(n, int) or n < 1 or manifest.get("format") != FORMAT:
        raise CollectionDamagedError(
            f"{where} is not a shard manifest this version reads (format {FORMAT}, shards >= 1)"
        )
    if manifest.get("label_hash") != LABEL_HASH:
        raise InvalidParameterError(
            f"{where} assigns labels by {manifest.get('label_hash')!r}; this version knows only {LABEL_HASH!r}"
        )
    return manifest


def new_manifest(shards: int, auto_choice: str | None) -> dict[str, Any]:
    """A new collection's manifest: no ridge of the whole yet (a streaming ls collection's, shardhead.py)."""
    return {"format": FORMAT, "shards": shards, "label_hash": LABEL_HASH, "auto_choice": auto_choice, "ridge": None}


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically (written beside it, synced, renamed over it)."""
    tmp = path / f".{MANIFEST}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)


def pooled(kept: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shards' ``kept_samples`` as one collection's: the samples, their classes numbered across the
    shards in shard order, and the classes' label keys."""
    offsets = np.cumsum([0] + [len(keys) for _, _, keys in kept])
    return (
        np.concatenate([X for X, _, _ in kept]),
        np.concatenate([codes + o for (_, codes, _), o in zip(kept, offsets)]),
        np.concatenate([keys for _, _, keys in kept]),
    )

"""What a collection's first write fixes, and how: its dimension, its IVF lists' training (on the
first add's proxies, or before it on a sample of the data to come: ``train``), auto's choice and the
fitted transforms, committed with the collection row. Runs under the writer lock, as ``writes`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sqlalchemy import Engine

from . import labels as lab
from . import refine, segments, store
from ._groups import Grouped
from .auto import stored_choice
from .errors import CollectionStateError, DataError, InvalidParameterError
from .imprint import imprint
from .index import ProxyIndex
from .ivf import choose_index, default_nprobe
from .normalize import normalize
from .snapshot import Snapshot


def first_index(
    directory: Path, s: Snapshot, W: np.ndarray, version: int, expected: int | None = None
) -> segments.Segment | None:
    """The proxy index of the first add (or train): exact, or an IVF index trained on ``W`` (``index``
    given as a factory string, or ``auto`` chosen from the memory budget for ``expected`` proxies,
    default ``len(W)``). Returns the template segment."""
    cfg = s.config
    factory = cfg["index_factory"]
    if factory == "auto":
        factory = choose_index(expected or len(W), W.shape[1], cfg["memory_budget"])
    template = None
    if factory != "Flat":
        s.template = ProxyIndex.trained(
            refine.parse(factory)[0], W, cfg["metric"], s.fixed.transform, cfg["random_state"]
        )
        nlist = faiss.extract_index_ivf(s.template.index).nlist
        if not cfg["search_params"]:  # none given: tuned once the proxies are in (tune_search), this meanwhile
            cfg["search_params"] = json.dumps({"nprobe": default_nprobe(nlist)})
            cfg["index_tuning"] = "pending"
        template = segments.write_segment(directory, "template", version, s.template.index)
        cfg["trained_on"] = len(W)
    cfg["index_factory"] = factory
    s.proxies = s.new_index("proxies")
    return template


def fix_dimension(s: Snapshot, X: np.ndarray) -> int:
    """The dimension of ``X``, fixed as the collection's by its first write (checked against the model's)."""
    d = X.shape[1]
    if s.config["dimension"] is None:
        emb_dim = s.embedder["dimension"] if s.embedder else None
        if emb_dim is not None and emb_dim != d:
            raise DataError(f"X has dimension {d}, but the collection's model gives {emb_dim}-d vectors")
        s.config["dimension"] = d
    return d


def commit_fitted(conn: Any, s: Snapshot, version: int, template: segments.Segment | None, **columns: Any) -> None:
    """Commit what the first fit fixed (dimension, index and its training, auto's choice), and ``columns``."""
    cfg = s.config
    if template is not None:
        store.set_template(conn, template)
    keys = ("dimension", "index_factory", "search_params", "trained_on", "auto_choice", "index_tuning")
    store.set_collection(conn, version=version, **{k: cfg[k] for k in keys}, **fixed_columns(s), **columns)
    store.set_embedder(conn, dimension=cfg["dimension"])


def record_template(s: Snapshot, template: segments.Segment) -> None:
    """The snapshot's note of its one template segment, just committed."""
    s.files["template"] = []
    s.record("template", template, 0)


def train(directory: Path, engine: Engine, s: Snapshot, X: np.ndarray, codes: np.ndarray, entries: list,
          classes: int | None) -> None:  # fmt: skip
    """Train the IVF lists on proxies imprinted from a sample of the data to come, before the first
    add, which then trains nothing: the lists fit every class, not only the first add's (FAISS's
    ``train`` before ``add``). Adds no class; auto chooses on this sample; ``index="auto"`` sizes
    the index for ``classes`` classes (default: the sample's)."""
    cfg = s.config
    if s.proxies is not None:
        raise CollectionStateError(
            f"collection {directory} is trained already (by its first add or an earlier train): its lists stay "
            "as they are until a compaction retrains them"
        )
    if cfg["index_factory"] == "Flat":
        raise InvalidParameterError("index='Flat' has no lists to train: train is for IVF indexes")
    keys = lab.entry_keys(entries)
    if cfg["auto_choice"] is None:
        cfg["auto_choice"] = stored_choice(cfg, X, codes, keys)
    X = normalize(X, cfg["pre_norm"], what="X")
    fix_dimension(s, X)
    W, _, s.fixed = imprint(Grouped.from_codes(X, codes, keys), s.params, s.fixed)
    version = s.version + 1
    template = first_index(directory, s, W, version, round(len(W) * (classes or len(entries)) / len(entries)))
    with store.writing(engine) as conn:
        commit_fitted(conn, s, version, template)
    segments.crash_point("train: committed")
    if template is not None:
        record_template(s, template)
    s.config.update(version=version)


def fixed_columns(s: Snapshot) -> dict[str, bytes | None]:
    """The collection row's columns of what the first fit fixed: quantile targets, Mahalanobis map."""
    return {"quantile_targets": None if s.fixed.targets is None else s.fixed.targets.tobytes(),
            "metric_transform": None if s.fixed.transform is None else s.fixed.transform.tobytes()}  # fmt: skip

"""Beyond one machine on Ray (the ``ray`` extra; docs/distributed.md): a sharded collection
(sharded.py) built with Ray Data (served with Ray Serve: rayserving.py). Ray is imported only
here and there.

**Build** (``build``; ``imprint index DIR *.parquet --shards S --engine ray``): Ray Data reads the
Parquet files in parallel and checks each block as ``readers.read`` checks a file; rows are
grouped into ``S * buckets_per_shard`` label buckets (``label_key % buckets``, so bucket ``b``
belongs to shard ``b % S``); each bucket's rows, grouped by file and put in a fixed order (file by
path, then each row's BLAKE2b content hash: Ray's read order never changes a proxy), are embedded
by the worker that holds the bucket and sent to the owning shard's writer, a Ray actor that
imprints them with the batched k-means in one atomic write (on the driver's ``device``: a GPU
device gives each writer a share of the cluster's GPUs). Each (bucket, file) part is recorded
by a hash of its rows, so a rerun after a crash, or with more files, skips what is in already,
as ``imprint index`` does. Auto chooses before the buckets, on the first file's first chunk, as
``imprint index`` chooses on its first chunk. An IVF shard trains its lists on its first bucket
and is retrained at the end once it has outgrown them.

**Serve**: rayserving.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import labels as lab
from .collection import Collection
from .device import current, set_device
from .errors import CollectionStateError, DataError, DeviceError
from .ingestion import check_vectors_model, fingerprint
from .interface import check_vectors
from .params import DEFAULT_CHUNK, check_int
from .readers import Dataset, from_arrow
from .sharded import ShardedCollection
from .shards import directories, exists

BUCKETS_PER_SHARD = 16
BUCKET = "__imprint_bucket"  # the column Ray Data groups by
PATH = "path"  # the column read_parquet(include_paths=True) adds


def ray_module():
    try:
        import ray
    except ImportError:
        raise CollectionStateError("the Ray engine needs Ray: pip install 'retrieval-imprint[ray]'") from None
    return ray


def init(address: str | None = None, **options: Any) -> None:
    """Connect to the Ray cluster at ``address`` ("auto": the one this machine belongs to;
    "ray://host:10001": a remote one), or start a local one; nothing if connected already."""
    ray = ray_module()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **options)


# ----------------------------------------------------------------- build
@dataclass(frozen=True)
class BuildReport:
    collection: str
    rows: int  # rows added by this call
    parts: int  # (bucket, file) parts added
    parts_skipped: int  # parts whose rows were in already (an earlier or interrupted run)
    classes: int
    proxies: int
    retrained: bool
    auto_choice: dict[str, Any] | None
    created: bool
    device: str | None  # where the shards' writers ran k-means (device.py; None: numpy)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ShardWriter:
    """The one writer of one shard (a Ray actor): adds the parts it is sent, each part once, with
    its k-means on ``device`` (the driver's, ``device.py``)."""

    def __init__(self, directory: str, lock_timeout: float, choice: str | None, device: str | None) -> None:
        set_device(device)  # the actor's own process: the driver's setting does not reach it otherwise
        self.col = Collection.open(directory, lock_timeout=lock_timeout)
        self.choice = choice

    def device(self) -> str | None:
        return current()

    def add(
        self, X: np.ndarray, labels: list, texts: list | None, refs: list | None, parts: list[tuple[str, int, int]]
    ) -> list[bool]:
        """Add the rows of ``parts`` ``(source, lo, hi)`` not added before, in one write; which were."""
        todo = [(source, lo, hi) for source, lo, hi in parts if self.col.rows_done(source) < hi - lo]
        if todo:
            rows = np.concatenate([np.arange(lo, hi) for _, lo, hi in todo])

            def pick(values: Sequence[Any] | None) -> list | None:
                return None if values is None else [values[i] for i in rows]

            self.col.add(
                X[rows],
                pick(labels) or [],
                texts=pick(texts),
                refs=pick(refs),
                auto_choice=self.choice,
                checkpoints=[(source, hi - lo) for source, lo, hi in todo],
            )
        done = {source for source, _, _ in todo}
        return [source in done for source, _, _ in parts]


def actors_on(device: str | None, shards: int, cluster_gpus: float) -> tuple[str | None, dict[str, Any]]:
    """The device a shard's actor (its writer, its Serve replica) works on, given the driver's, and
    Ray's options for it. On a GPU: ``"cuda"`` (Ray numbers an actor's GPUs from 0) and a share of
    the cluster's GPUs (Ray hides the GPUs from an actor that asks for none); the actors of more
    shards than GPUs share them."""
    if device is None or not device.startswith("cuda"):
        return device, {"num_cpus": 0}
    if not cluster_gpus:
        raise DeviceError(
            f"device={device!r}: the Ray cluster has no GPU for the shards' actors; use device 'cpu', or none"
        )
    return "cuda", {"num_cpus": 0, "num_gpus": min(1.0, cluster_gpus / shards)}


def _options(text_column, label_column, vector_column, id_column) -> dict[str, Any]:
    return dict(text_column=text_column, label_column=label_column, vector_column=vector_column, id_column=id_column)


def _tag(table: Any, n_buckets: int, options: dict[str, Any]) -> Any:
    """A Ray Data block with its rows checked and each row's label bucket added."""
    ds = from_arrow(table.drop_columns([PATH]), table.column(PATH)[0].as_py() if len(table) else "?", **options)
    buckets = (lab.label_keys(ds.need("labels")) % np.uint64(n_buckets)).astype(np.int64)
    return table.append_column(BUCKET, pa.array(buckets))


_EMBEDDERS: dict[str, Any] = {}  # per worker process: the model loads once


def _write_bucket(table: Any, writers: list, n_shards: int, model: str | None, options: dict[str, Any]) -> Any:
    """One bucket's rows: put in their fixed order, embedded, sent to the owning shard's writer."""
    bucket = int(table.column(BUCKET)[0].as_py())
    paths = table.column(PATH).to_pylist()
    rows = from_arrow(table.drop_columns([PATH, BUCKET]), f"bucket {bucket}", **options)
    content = np.frombuffer(
        b"".join(hashlib.blake2b(_row_bytes(rows, i), digest_size=8).digest() for i in range(len(rows))), ">u8"
    )  # big-endian: sorts as the bytes do
    order = np.lexsort((content, lab.label_keys(rows.need("labels")), np.unique(paths, return_inverse=True)[1]))
    rows = rows.take(order)
    paths = [paths[i] for i in order]
    parts, lo = [], 0
    for hi in [i for i in range(1, len(paths)) if paths[i] != paths[i - 1]] + [len(paths)]:
        parts.append((f"ray:{bucket}:" + fingerprint(rows.part(lo, hi)), lo, hi))
        lo = hi
    if rows.vectors is not None:
        X = rows.vectors
    else:
        key = model or ""
        if key not in _EMBEDDERS:
            from .embed import Embedder

            _EMBEDDERS[key] = Embedder(model)
        X = _EMBEDDERS[key].encode(rows.need("texts"))
    ray = ray_module()
    added = ray.get(writers[bucket % n_shards].add.remote(X, rows.labels, rows.texts, rows.refs, parts))
    return pa.table({"bucket": [bucket] * len(parts), "rows": [hi - lo for _, lo, hi in parts], "added": added})


def _row_bytes(rows: Dataset, i: int) -> bytes:
    """What a row's content hash covers: its label and its vector or text."""
    value = rows.vectors[i].tobytes() if rows.vectors is not None else rows.need("texts")[i].encode()
    return repr(lab.entry(rows.need("labels")[i])).encode() + b"\0" + value


def build(
    path: str | os.PathLike,
    sources: Sequence[str | os.PathLike],
    *,
    shards: int,
    buckets_per_shard: int = BUCKETS_PER_SHARD,
    chunk_size: int = DEFAULT_CHUNK,
    preset: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    vector_column: str | None = None,
    id_column: str | None = None,
    vectors_model: str | None = None,
    lock_timeout: float = 3600.0,
    **settings: Any,
) -> BuildReport:
    """Build or extend the sharded collection at ``path`` from Parquet ``sources`` on the Ray cluster
    this process is connected to (``init``); see the module docstring. ``settings`` and ``preset``
    as ``ShardedCollection.create``; ``chunk_size``: the rows of the first file auto chooses on;
    ``vectors_model``: as ``ingest``'s."""
    ray = ray_module()
    shards, buckets_per_shard = check_int("shards", shards, 1), check_int("buckets_per_shard", buckets_per_shard, 1)
    files = [str(Path(s).resolve()) for s in sources]
    if not files:
        raise DataError("no data sources given: nothing to index")
    for f in files:
        if not f.endswith(".parquet") or not Path(f).is_file():
            raise DataError(f"{f}: the Ray engine reads Parquet files (.parquet); no such file, or another format")
    options = _options(text_column, label_column, vector_column, id_column)
    try:
        first_batch = next(pq.ParquetFile(files[0]).iter_batches(batch_size=check_int("chunk_size", chunk_size, 1)))
    except StopIteration:
        raise DataError(f"{files[0]}: no rows") from None
    first = from_arrow(pa.Table.from_batches([first_batch]), files[0], **options)
    created = not exists(path)
    col = ShardedCollection.open_or_create(path, shards=shards, preset=preset, lock_timeout=lock_timeout, **settings)
    writers: list = []
    try:
        if first.vectors is None and col.model is None:
            raise DataError(f"{path} holds precomputed vectors (no model recorded); index vectors, not texts")
        check_vectors_model(first, col.model, vectors_model)
        if not col.chosen:  # auto's choice (and a streaming ls head's ridge) on the first chunk, for every shard
            X = first.vectors if first.vectors is not None else col.embedder().encode(first.need("texts"))
            codes, entries = lab.encode_stored(first.need("labels"))
            col.auto_choice_for(check_vectors(X, "X", None), codes, entries)
        device, resources = actors_on(current(), shards, ray.cluster_resources().get("GPU", 0))
        Writer = ray.remote(ShardWriter).options(**resources)
        writers = [Writer.remote(str(d), lock_timeout, col.manifest["auto_choice"], device) for d in directories(path)]
        device = ray.get([w.device.remote() for w in writers])[0]  # every writer up on it, before any data
        ds = ray.data.read_parquet(files, include_paths=True)
        ds = ds.map_batches(
            _tag, batch_format="pyarrow", fn_kwargs={"n_buckets": shards * buckets_per_shard, "options": options}
        )
        done = (
            ds.groupby(BUCKET)
            .map_groups(
                _write_bucket,
                batch_format="pyarrow",
                fn_kwargs={"writers": writers, "n_shards": shards, "model": col.model, "options": options},
            )
            .to_pandas()
        )
    except BaseException:
        if created and not col.info()["version"]:  # no stub is left with settings that failed
            col.close()
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        for writer in writers:
            ray.kill(writer)  # each held its shard open
    col.refresh()
    col.rechoose_ridge()  # the writers' adds grew the shards past the first chunk the ridge was chosen on
    retrained = col.outgrown
    if retrained:
        col.compact()
    info = col.info()
    added = done["added"].to_numpy(bool)
    return BuildReport(
        str(path),
        int(done["rows"].to_numpy()[added].sum()),
        int(added.sum()),
        int((~added).sum()),
        info["classes"],
        info["proxies"],
        retrained,
        col.auto_choice,
        created,
        device,
    )

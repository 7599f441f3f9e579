"""Beyond one machine on Ray (the ``ray`` extra; docs/distributed.md): a sharded collection
(sharded.py) built with Ray Data and served with Ray Serve. Ray is imported only here.

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

**Serve** (``serve``; ``imprint serve DIR --ray``): one Ray Serve deployment per shard holds that
shard open and answers with its ``sharded.Part``; an ingress deployment embeds texts, fans the
queries out, merges the parts (``sharded.merge``: exact) and answers serve.py's JSON API.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import labels as lab
from .collection import Collection, check_vectors
from .device import current, set_device
from .errors import CollectionStateError, DataError, DeviceError, ImprintError
from .ingestion import check_vectors_model, fingerprint
from .normalize import normalize
from .params import DEFAULT_CHUNK, check_int
from .readers import Dataset, from_arrow
from .serve import Refreshing
from .sharded import ShardedCollection, directories, exists, merge, part

BUCKETS_PER_SHARD = 16
BUCKET = "__imprint_bucket"  # the column Ray Data groups by
PATH = "path"  # the column read_parquet(include_paths=True) adds


def _ray():
    try:
        import ray
    except ImportError:
        raise CollectionStateError("the Ray engine needs Ray: pip install 'retrieval-imprint[ray]'") from None
    return ray


def init(address: str | None = None, **options: Any) -> None:
    """Connect to the Ray cluster at ``address`` ("auto": the one this machine belongs to;
    "ray://host:10001": a remote one), or start a local one; nothing if connected already."""
    ray = _ray()
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

    def add(self, X: np.ndarray, labels: list, texts: list | None, refs: list | None,
            parts: list[tuple[str, int, int]]) -> list[bool]:
        """Add the rows of ``parts`` ``(source, lo, hi)`` not added before, in one write; which were."""
        todo = [(source, lo, hi) for source, lo, hi in parts if self.col._rows_done(source) < hi - lo]
        if todo:
            rows = np.concatenate([np.arange(lo, hi) for _, lo, hi in todo])
            pick = (lambda v: None if v is None else [v[i] for i in rows])
            self.col._add_checked(X[rows], pick(labels), texts=pick(texts), refs=pick(refs), auto_choice=self.choice,
                                  checkpoints=[(source, hi - lo) for source, lo, hi in todo])
        done = {source for source, _, _ in todo}
        return [source in done for source, _, _ in parts]


def _actors_on(device: str | None, shards: int, cluster_gpus: float) -> tuple[str | None, dict[str, Any]]:
    """The device a shard's actor (its writer, its Serve replica) works on, given the driver's, and
    Ray's options for it. On a GPU: ``"cuda"`` (Ray numbers an actor's GPUs from 0) and a share of
    the cluster's GPUs (Ray hides the GPUs from an actor that asks for none); the actors of more
    shards than GPUs share them."""
    if device is None or not device.startswith("cuda"):
        return device, {"num_cpus": 0}
    if not cluster_gpus:
        raise DeviceError(f"device={device!r}: the Ray cluster has no GPU for the shards' actors; "
                          "use device 'cpu', or none")
    return "cuda", {"num_cpus": 0, "num_gpus": min(1.0, cluster_gpus / shards)}


def _options(text_column, label_column, vector_column, id_column) -> dict[str, Any]:
    return dict(text_column=text_column, label_column=label_column, vector_column=vector_column, id_column=id_column)


def _tag(table: Any, n_buckets: int, options: dict[str, Any]) -> Any:
    """A Ray Data block with its rows checked and each row's label bucket added."""
    ds = from_arrow(table.drop_columns([PATH]), table.column(PATH)[0].as_py() if len(table) else "?", **options)
    buckets = (lab.label_keys(ds.labels) % np.uint64(n_buckets)).astype(np.int64)
    return table.append_column(BUCKET, pa.array(buckets))


_EMBEDDERS: dict[str, Any] = {}  # per worker process: the model loads once


def _write_bucket(table: Any, writers: list, n_shards: int, model: str | None, options: dict[str, Any]) -> Any:
    """One bucket's rows: put in their fixed order, embedded, sent to the owning shard's writer."""
    bucket = int(table.column(BUCKET)[0].as_py())
    paths = table.column(PATH).to_pylist()
    rows = from_arrow(table.drop_columns([PATH, BUCKET]), f"bucket {bucket}", **options)
    content = np.frombuffer(b"".join(hashlib.blake2b(_row_bytes(rows, i), digest_size=8).digest()
                                     for i in range(len(rows))), ">u8")  # big-endian: sorts as the bytes do
    order = np.lexsort((content, lab.label_keys(rows.labels), np.unique(paths, return_inverse=True)[1]))
    rows = rows.take(order)
    paths = [paths[i] for i in order]
    parts, lo = [], 0
    for hi in [i for i in range(1, len(paths)) if paths[i] != paths[i - 1]] + [len(paths)]:
        parts.append((f"ray:{bucket}:" + fingerprint(rows.part(lo, hi)), lo, hi))
        lo = hi
    if rows.vectors is not None:
        X = rows.vectors
    else:
        if model not in _EMBEDDERS:
            from .embed import Embedder

            _EMBEDDERS[model] = Embedder(model)
        X = _EMBEDDERS[model].encode(rows.texts)
    ray = _ray()
    added = ray.get(writers[bucket % n_shards].add.remote(X, rows.labels, rows.texts, rows.refs, parts))
    return pa.table({"bucket": [bucket] * len(parts), "rows": [hi - lo for _, lo, hi in parts], "added": added})


def _row_bytes(rows: Dataset, i: int) -> bytes:
    """What a row's content hash covers: its label and its vector or text."""
    value = rows.vectors[i].tobytes() if rows.vectors is not None else rows.texts[i].encode()
    return repr(lab.entry(rows.labels[i])).encode() + b"\0" + value


def build(path: str | os.PathLike, sources: Sequence[str | os.PathLike], *, shards: int,
          buckets_per_shard: int = BUCKETS_PER_SHARD, chunk_size: int = DEFAULT_CHUNK, preset: str | None = None,
          text_column: str | None = None, label_column: str | None = None, vector_column: str | None = None,
          id_column: str | None = None, vectors_model: str | None = None, lock_timeout: float = 3600.0,
          **settings: Any) -> BuildReport:
    """Build or extend the sharded collection at ``path`` from Parquet ``sources`` on the Ray cluster
    this process is connected to (``init``); see the module docstring. ``settings`` and ``preset``
    as ``ShardedCollection.create``; ``chunk_size``: the rows of the first file auto chooses on;
    ``vectors_model``: as ``ingest``'s."""
    ray = _ray()
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
        if col.auto_choice is None:
            X = first.vectors if first.vectors is not None else col.embedder().encode(first.texts)
            codes, entries = lab.encode_stored(first.labels)
            col._choose(check_vectors(X, "X", None), codes, entries)
        device, resources = _actors_on(current(), shards, ray.cluster_resources().get("GPU", 0))
        Writer = ray.remote(ShardWriter).options(**resources)
        writers = [Writer.remote(str(d), lock_timeout, col._manifest["auto_choice"], device) for d in directories(path)]
        device = ray.get([w.device.remote() for w in writers])[0]  # every writer up on it, before any data
        ds = ray.data.read_parquet(files, include_paths=True)
        ds = ds.map_batches(_tag, batch_format="pyarrow", fn_kwargs={"n_buckets": shards * buckets_per_shard,
                                                                     "options": options})
        done = ds.groupby(BUCKET).map_groups(_write_bucket, batch_format="pyarrow", fn_kwargs={
            "writers": writers, "n_shards": shards, "model": col.model, "options": options}).to_pandas()
    except BaseException:
        if created and not col.info()["version"]:  # no stub is left with settings that failed
            col.close()
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        for writer in writers:
            ray.kill(writer)  # each held its shard open
    col.refresh()
    retrained = col.outgrown
    if retrained:
        col.compact()
    info = col.info()
    added = done["added"].to_numpy(bool)
    return BuildReport(str(path), int(done["rows"].to_numpy()[added].sum()), int(added.sum()), int((~added).sum()),
                       info["classes"], info["proxies"], retrained, col.auto_choice, created, device)


# ----------------------------------------------------------------- serve
class ShardReplica:
    """A Ray Serve deployment holding one shard open: answers with its ``Part``, searching on
    ``device`` (the driver's, ``device.py``)."""

    def __init__(self, directory: str, shard: int, n_shards: int, refresh: float, device: str | None) -> None:
        set_device(device)
        self.fresh = Refreshing(Collection.open(directory), refresh)
        self.shard, self.n_shards = shard, n_shards

    def describe(self) -> dict[str, Any]:
        col = self.fresh()
        s = col._s
        return {"classes": len(col), "params": s.params, "inf_norm": s.config["inf_norm"],
                "dimension": s.dimension, "model": col.model, "info": col.info()}

    def part(self, Q: np.ndarray, top: int, threshold: float | None, search_params: dict[str, int] | None):
        col = self.fresh()
        if not len(col):
            return None
        return part(col, self.shard, self.n_shards, Q, top, threshold, search_params)


class Ingress:
    """The Ray Serve ingress: serve.py's JSON API over the shard deployments."""

    def __init__(self, path: str, refresh: float, *replicas: Any) -> None:
        self.path, self.refresh, self.replicas = path, refresh, list(replicas)
        self.embedder = None
        self.described: list[dict[str, Any]] | None = None
        self.looked = 0.0

    async def _describe(self) -> list[dict[str, Any]]:
        """What each shard holds (settings, sizes), asked again once ``refresh`` seconds have passed."""
        if self.described is None or time.monotonic() - self.looked >= self.refresh:
            self.described = await asyncio.gather(*[r.describe.remote() for r in self.replicas])
            self.looked = time.monotonic()
        return self.described

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        from .serve import MAX_BODY, parse_query

        try:
            route = request.url.path.rstrip("/")
            shards = await self._describe()
            if route == "/health" and request.method == "GET":
                return JSONResponse({"status": "ok", "classes": sum(s["classes"] for s in shards),
                                     "shards": len(shards), "model": shards[0]["model"]})
            if route == "/info" and request.method == "GET":
                infos = [s["info"] for s in shards]
                return JSONResponse({"path": self.path, "shards": len(infos),
                                     **{k: sum(i[k] for i in infos) for k in ("classes", "proxies", "samples")},
                                     "config": infos[0]["config"], "shard_info": infos})
            if route != "/query" or request.method != "POST":
                return JSONResponse({"error": f"no route {request.method} {route}"}, status_code=404)
            body = await request.body()
            if len(body) > MAX_BODY:
                return JSONResponse({"error": f"request body over {MAX_BODY} bytes"}, status_code=413)
            return JSONResponse({"results": await self._query(parse_query(body), shards)})
        except ImprintError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    async def _query(self, request: Any, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
        live = [s for s in shards if s["classes"]]
        if not live:
            raise CollectionStateError(f"collection {self.path} has no classes yet")
        first = live[0]
        if request.texts is not None:
            if first["model"] is None:
                raise DataError("this collection holds precomputed vectors (no model): send vectors, not texts")
            if self.embedder is None:
                from .embed import Embedder

                self.embedder = Embedder(first["model"])
            Q = await asyncio.to_thread(self.embedder.encode, request.texts)
        else:
            Q = request.vectors
        Q = normalize(check_vectors(Q, "Q", first["dimension"]), first["inf_norm"], what="Q")
        parts = await asyncio.gather(*[r.part.remote(Q, request.top, request.threshold, request.search_params)
                                       for r in self.replicas])
        result = merge([p for p in parts if p is not None], request.top, first["params"])
        return result.records(request.texts)


def serve(path: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, refresh: float = 1.0,
          name: str = "imprint", shard_options: dict[str, Any] | None = None) -> str:
    """Deploy the collection at ``path`` (sharded or not) on Ray Serve, HTTP on ``host:port``;
    returns the URL. The caller keeps the process alive; ``serve_shutdown()`` stops it.
    ``shard_options``: each shard replica's Ray actor options, e.g. ``{"memory": 40e9}`` so that a
    cluster places shards where they fit (default: no CPU reserved, as a replica works when asked;
    on a GPU device, a share of the cluster's GPUs, as for the build's writers)."""
    ray = _ray()
    from ray import serve as rs

    shards = [str(d) for d in directories(path)]
    rs.start(http_options={"host": host, "port": port})
    device, resources = _actors_on(current(), len(shards), ray.cluster_resources().get("GPU", 0))
    options = {**resources, **(shard_options or {})}
    replicas = [rs.deployment(ShardReplica, name=f"shard-{i}", ray_actor_options=options).bind(d, i, len(shards),
                                                                                               refresh, device)
                for i, d in enumerate(shards)]
    ingress = rs.deployment(Ingress, name="ingress", ray_actor_options={"num_cpus": 0})
    rs.run(ingress.bind(str(path), refresh, *replicas), name=name, route_prefix="/")
    return f"http://{host}:{port}"


def serve_shutdown() -> None:
    from ray import serve as rs

    rs.shutdown()

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

**Serve** (``serve``; ``imprint serve DIR --engine ray``): one Ray Serve deployment per shard holds
that shard open and answers with its ``merge.Part``; the ingress deployment mounts serve.py's
application (the one ``imprint serve`` runs in one process) over a ``ShardRouter``, the
``Searchable`` that fans a batch of queries out to the shards and merges their parts
(``merge.merge``: exact).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import labels as lab
from . import ranking
from .collection import Collection
from .device import current, set_device
from .embed import recorded_embedder
from .errors import CollectionStateError, DataError, DeviceError
from .ingestion import check_vectors_model, fingerprint
from .interface import check_vectors
from .merge import combined_info, merge, part
from .normalize import normalize
from .params import DEFAULT_CHUNK, DEFAULT_PORT, check_int
from .readers import Dataset, from_arrow
from .serve import create_app
from .service import Limits, Service
from .sharded import ShardedCollection
from .shards import directories, exists, is_sharded, recorded_choice

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
                pick(labels),
                texts=pick(texts),
                refs=pick(refs),
                auto_choice=self.choice,
                checkpoints=[(source, hi - lo) for source, lo, hi in todo],
            )
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
        raise DeviceError(
            f"device={device!r}: the Ray cluster has no GPU for the shards' actors; use device 'cpu', or none"
        )
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
    content = np.frombuffer(
        b"".join(hashlib.blake2b(_row_bytes(rows, i), digest_size=8).digest() for i in range(len(rows))), ">u8"
    )  # big-endian: sorts as the bytes do
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
            col.auto_choice_for(check_vectors(X, "X", None), codes, entries)
        device, resources = _actors_on(current(), shards, ray.cluster_resources().get("GPU", 0))
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


# ----------------------------------------------------------------- serve
class ShardReplica:
    """A Ray Serve deployment holding one shard open: answers with its ``Part``, searching on
    ``device`` (the driver's, ``device.py``)."""

    def __init__(self, directory: str, shard: int, n_shards: int, device: str | None) -> None:
        set_device(device)
        self.col = Collection.open(directory)
        self.shard, self.n_shards = shard, n_shards

    def describe(self, refresh: bool) -> dict[str, Any]:
        """What the router needs of this shard: sizes, settings, its ``info()`` (after picking up
        other processes' writes, if ``refresh``)."""
        col = self.col
        if refresh:
            col.refresh()
        info = col.info()
        return {
            "classes": len(col),
            "params": col.params,
            "inf_norm": col.config["inf_norm"],
            "dimension": col.dimension,
            "model": col.model,
            "embedder": info["embedder"],
            "info": info,
        }

    def part(self, Q: np.ndarray, top: int, threshold: float | None, search_params: dict[str, int] | None):
        if not len(self.col):
            return None
        s = self.col.snapshot  # one version for the whole part
        return part(s, ranking.search_params(s, search_params), self.shard, self.n_shards, Q, top, threshold)


class ShardRouter:
    """The ``Searchable`` of a collection served by one Ray Serve deployment per shard: queries go
    to every shard at once and their parts are merged (``merge.merge``: exact). Blocking calls:
    the service's engine thread makes them, never the event loop."""

    def __init__(self, path: str, replicas: Sequence[Any]) -> None:
        self.path, self.replicas = path, list(replicas)
        self.sharded = is_sharded(path)
        self._embedder: Any = None
        self.shards = self._describe(False)

    def _describe(self, refresh: bool) -> list[dict[str, Any]]:
        return [r.result() for r in [replica.describe.remote(refresh) for replica in self.replicas]]

    def refresh(self) -> bool:
        before = [s["info"]["version"] for s in self.shards]
        self.shards = self._describe(True)
        return before != [s["info"]["version"] for s in self.shards]

    @property
    def model(self) -> str | None:
        return self.shards[0]["model"]

    @property
    def dimension(self) -> int | None:
        return next((s["dimension"] for s in self.shards if s["dimension"] is not None), None)

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def __len__(self) -> int:
        return sum(s["classes"] for s in self.shards)

    def info(self) -> dict[str, Any]:
        """What ``open_any(path).info()`` gives in one process."""
        infos = [s["info"] for s in self.shards]
        return combined_info(self.path, infos, recorded_choice(self.path)) if self.sharded else infos[0]

    def embedder(self, *, progress: bool = False) -> Any:
        if self._embedder is None:
            self._embedder = recorded_embedder(self.shards[0]["embedder"], self.path)
        return self._embedder

    def query(
        self,
        Q: Any,
        top: int = 1,
        *,
        threshold: float | None = None,
        model: str | None = None,
        search_params: dict[str, int] | None = None,
    ) -> Any:
        live = [s for s in self.shards if s["classes"]]
        if not live:
            raise CollectionStateError(f"collection {self.path} has no classes yet")
        first = live[0]
        if model is not None and first["model"] is not None and model != first["model"]:
            raise DataError(f"query vectors embedded with {model!r}, but this collection uses {first['model']!r}")
        Q = normalize(check_vectors(Q, "Q", first["dimension"]), first["inf_norm"], what="Q")
        pending = [r.part.remote(Q, top, threshold, search_params) for r in self.replicas]
        parts = [p.result() for p in pending]
        return merge([p for p in parts if p is not None], top, first["params"])


class Ingress:
    """The Ray Serve ingress: serve.py's application over a ``ShardRouter`` (``serve.ingress()``
    mounts what ``__serve_build_asgi_app__`` returns, once this replica is constructed)."""

    def __init__(self, path: str, options: dict[str, Any], api_key: str | None, *replicas: Any) -> None:
        self.service = Service(lambda: ShardRouter(path, replicas), **options)
        self.api_key = api_key

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.service, api_key=self.api_key)


def serve(
    path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    refresh: float = 1.0,
    window: float = 0.0,
    max_batch: int = 256,
    limits: Limits = Limits(),
    api_key: str | None = None,
    name: str = "imprint",
    shard_options: dict[str, Any] | None = None,
    timeout: float = 300.0,
) -> str:
    """Deploy the collection at ``path`` (sharded or not) on Ray Serve, HTTP on ``host:port``, and
    wait until it is ready (``/ready``); returns the URL. The caller keeps the process alive;
    ``serve_shutdown()`` stops it. The other settings are ``service.Service``'s and
    ``serve.create_app``'s, as for one process. ``shard_options``: each shard replica's Ray actor
    options, e.g. ``{"memory": 40e9}`` so that a cluster places shards where they fit (default: no
    CPU reserved, as a replica works when asked; on a GPU device, a share of the cluster's GPUs, as
    for the build's writers)."""
    ray = _ray()
    from ray import serve as rs

    shards = [str(d) for d in directories(path)]
    rs.start(http_options={"host": host, "port": port})
    device, resources = _actors_on(current(), len(shards), ray.cluster_resources().get("GPU", 0))
    options = {**resources, **(shard_options or {})}
    replicas = [
        rs.deployment(ShardReplica, name=f"shard-{i}", ray_actor_options=options).bind(d, i, len(shards), device)
        for i, d in enumerate(shards)
    ]
    ingress = rs.deployment(
        rs.ingress()(Ingress), name="ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096
    )
    settings = {"refresh": refresh, "window": window, "max_batch": max_batch, "limits": limits}
    rs.run(ingress.bind(str(path), settings, api_key, *replicas), name=name, route_prefix="/")
    url = f"http://{host}:{port}"
    _wait_ready(url, timeout)
    return url


def _wait_ready(url: str, timeout: float) -> None:
    """Wait for ``url``'s ``/ready``: a ``CollectionStateError`` with the server's reason if it
    cannot start, or is not ready within ``timeout`` seconds."""
    from .client import Client
    from .errors import ServerError

    client, deadline = Client(url, timeout=10), time.monotonic() + timeout
    while True:
        try:
            if client.ready():
                return
            health = client.health()
        except ServerError as exc:
            health = {"problems": {"server": str(exc)}} if exc.status not in (None, 503) else None
        if health and "startup" in health.get("problems", {}):
            raise CollectionStateError(f"the Ray ingress could not start: {health['problems']['startup']}")
        if time.monotonic() > deadline:
            raise CollectionStateError(f"the Ray ingress at {url} was not ready within {timeout:g} s")
        time.sleep(0.2)


def serve_shutdown() -> None:
    from ray import serve as rs

    rs.shutdown()

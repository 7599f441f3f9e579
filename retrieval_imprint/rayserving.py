"""A collection served on Ray Serve (the ``ray`` extra; ``imprint serve DIR --engine ray``;
docs/serving.md): one deployment per shard holds that shard open and answers with its
``merge.Part``; the ingress deployment mounts serve.py's application (the one ``imprint serve``
runs in one process) over a ``ShardRouter``, the ``Searchable`` that fans a batch of queries out
to the shards and merges their parts (``merge.merge``: exact).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import ranking
from .collection import Collection
from .device import current, set_device
from .distributed import actors_on, ray_module
from .embed import recorded_embedder
from .errors import CollectionStateError, InvalidParameterError
from .interface import query_rows
from .merge import combined_info, merge, part
from .params import DEFAULT_PORT
from .serve import create_app
from .service import Limits, Service
from .shards import directories, is_sharded, recorded_choice


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
        Q, top = query_rows(Q, top, model, first["model"], first["dimension"], first["inf_norm"])
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
    ray = ray_module()
    from ray import serve as rs

    shards = [str(d) for d in directories(path)]
    if is_sharded(path) and Collection.open(shards[0]).config["generator"] == "ls":
        raise InvalidParameterError(
            f"{path}: a sharded streaming least-squares collection (generator='ls') is not served on Ray yet: a "
            "query is mapped by the ridge of every shard's samples together (shardhead.py); serve it in one "
            "process (imprint serve DIR)"
        )
    rs.start(http_options={"host": host, "port": port})
    device, resources = actors_on(current(), len(shards), ray.cluster_resources().get("GPU", 0))
    options = {**resources, **(shard_options or {})}
    replicas = [
        rs.deployment(ShardReplica, name=f"shard-{i}", ray_actor_options=options).bind(d, i, len(shards), device)  # type: ignore[attr-defined]
        for i, d in enumerate(shards)
    ]
    ingress = rs.deployment(
        rs.ingress()(Ingress), name="ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096
    )
    settings = {"refresh": refresh, "window": window, "max_batch": max_batch, "limits": limits}
    rs.run(ingress.bind(str(path), settings, api_key, *replicas), name=name, route_prefix="/")  # type: ignore[attr-defined]
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
            health = {"problems": {"server": str(exc)}} if exc.status not in (None, 503) else {}
        if health and "startup" in health.get("problems", {}):
            raise CollectionStateError(f"the Ray ingress could not start: {health['problems']['startup']}")
        if time.monotonic() > deadline:
            raise CollectionStateError(f"the Ray ingress at {url} was not ready within {timeout:g} s")
        time.sleep(0.2)


def serve_shutdown() -> None:
    from ray import serve as rs

    rs.shutdown()

"""Serving a collection over HTTP: ``imprint serve DIR`` (docs/serving.md).

One JSON API, whoever answers it: this module's one-process server (Starlette on uvicorn, the
``serve`` extra) for a collection or a sharded collection on one machine, or ``distributed.py``'s
Ray Serve application, one deployment per shard behind an ingress that fans out and merges.

- ``GET /health``: ``{"status": "ok", "classes": N, "shards": S, "model": name}``
- ``GET /info``: the collection's ``info()``
- ``POST /query`` ``{"texts": [...]}`` or ``{"vectors": [[...], ...]}``, optional ``"top"``
  (default 1), ``"threshold"`` (default: the stored ones), ``"nprobe"`` (IVF): answers
  ``{"results": [...]}``, one ``QueryResult.records`` record per query. Bad input is a 400 whose
  ``{"error": ...}`` names the problem.

Writers may change the collection while it is served: the server picks up their commits before a
query once ``refresh`` seconds have passed since it last looked.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import DataError, ImprintError

DEFAULT_PORT = 8000
MAX_BODY = 64 << 20  # bytes: a request larger than this is refused (413), not read into memory


@dataclass(frozen=True)
class Request:
    """A checked ``/query`` body."""

    texts: list[str] | None
    vectors: np.ndarray | None
    top: int
    threshold: float | None
    search_params: dict[str, int] | None

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.vectors)


def parse_query(body: bytes) -> Request:
    """The ``/query`` body as a ``Request``, or a ``DataError`` naming what is wrong with it."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise DataError(f"the request body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataError("the request body must be a JSON object with texts or vectors")
    unknown = set(data) - {"texts", "vectors", "top", "threshold", "nprobe"}
    if unknown:
        raise DataError(f"unknown field(s) {sorted(unknown)}; expected texts or vectors, top, threshold, nprobe")
    if ("texts" in data) == ("vectors" in data):
        raise DataError("give either texts (a list of strings) or vectors (a list of rows), not both or neither")
    texts, vectors = data.get("texts"), None
    if texts is not None:
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise DataError("texts must be a non-empty list of strings")
    else:
        try:
            vectors = np.asarray(data["vectors"], np.float32)
        except (TypeError, ValueError):
            raise DataError("vectors must be a list of rows of numbers, all of one length") from None
        if vectors.ndim != 2 or not len(vectors):
            raise DataError(f"vectors must be a non-empty list of rows of numbers; got shape {vectors.shape}")
    top, threshold, nprobe = data.get("top", 1), data.get("threshold"), data.get("nprobe")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise DataError(f"top must be a positive integer; got {top!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise DataError(f"threshold must be a number or null; got {threshold!r}")
    if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1):
        raise DataError(f"nprobe must be a positive integer; got {nprobe!r}")
    return Request(texts, vectors, top, None if threshold is None else float(threshold),
                   None if nprobe is None else {"nprobe": nprobe})


class Refreshing:
    """A collection that picks up other processes' commits when asked for once ``every`` seconds
    have passed since it last looked (a server's view of a collection being written to)."""

    def __init__(self, col: Any, every: float) -> None:
        self.col, self.every, self.looked = col, every, time.monotonic()

    def __call__(self) -> Any:
        if time.monotonic() - self.looked >= self.every:
            self.col.refresh()
            self.looked = time.monotonic()
        return self.col


class LocalService:
    """Answers the API from a collection opened in this process: one query at a time (the BLAS
    and FAISS calls below use every core), the model loaded once."""

    def __init__(self, path: str | os.PathLike, refresh: float = 1.0) -> None:
        from .sharded import open_any

        self.fresh = Refreshing(open_any(path), refresh)
        self.lock = threading.Lock()

    def health(self) -> dict[str, Any]:
        with self.lock:
            col = self.fresh()
            return {"status": "ok", "classes": len(col), "shards": getattr(col, "n_shards", 1), "model": col.model}

    def info(self) -> dict[str, Any]:
        with self.lock:
            return self.fresh().info()

    def query(self, request: Request) -> list[dict[str, Any]]:
        with self.lock:
            col = self.fresh()
            if request.texts is not None:
                if col.model is None:
                    raise DataError("this collection holds precomputed vectors (no model): send vectors, not texts")
                Q = col.embedder().encode(request.texts)
            else:
                Q = request.vectors
            result = col.query(Q, request.top, threshold=request.threshold, search_params=request.search_params,
                               model=col.model if request.texts is not None else None)
            return result.records(request.texts if request.texts is not None else None)


def json_app(health: Callable[[], Any], info: Callable[[], Any], query: Callable[[Request], Any]):
    """The Starlette application of the API over three blocking calls (run in a worker thread, so
    the event loop keeps accepting connections)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def respond(call: Callable[[], Any]):
        async def endpoint(request):
            try:
                if request.method == "POST":
                    body = await request.body()
                    if len(body) > MAX_BODY:
                        return JSONResponse({"error": f"request body over {MAX_BODY} bytes"}, status_code=413)
                    return JSONResponse(await run_in_threadpool(call, parse_query(body)))
                return JSONResponse(await run_in_threadpool(call))
            except ImprintError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        return endpoint

    return Starlette(routes=[Route("/health", respond(health)), Route("/info", respond(info)),
                             Route("/query", respond(lambda r: {"results": query(r)}), methods=["POST"])])


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one), bound before the server starts
    so its address can be printed and no other process can take it in between."""
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                reuse_port=False)
    sock.set_inheritable(True)
    return sock


def run(app: Any, sock: socket.socket, ready: Callable[[], None]) -> None:
    """Serve ``app`` on ``sock`` with uvicorn until interrupted; ``ready()`` is called once the
    server accepts connections (to say where)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            ready()

    Server(uvicorn.Config(app, log_level="warning", lifespan="off")).run(sockets=[sock])

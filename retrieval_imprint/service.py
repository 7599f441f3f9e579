"""The answering side of the HTTP API, whatever holds the classes: a ``Searchable``
(searchable.py) opened in this process, a sharded one, or the Ray shard router. serve.py puts it
behind HTTP; nothing here knows about HTTP but the status each error carries (errors.py).

A query walks: ``Service.query`` -> the micro-batcher (batching.py), which gathers concurrent
requests -> ``Service._answer`` on the engine thread: the texts of the whole batch embedded in one
call, then one ``Searchable.query`` per distinct (top, threshold, search parameters) -> each
request's rows of the answer. The answers are the ones each request would get alone.

Readiness: ``start`` opens the collection, loads the model and runs one text and one query
through them before ``ready`` turns true, so that the first real request pays no start-up cost.
Health: a failure that is not the client's (a damaged collection, a model that fails) is kept in
``problems`` under the dependency's name until that dependency next works.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .batching import MicroBatcher
from .errors import DataError, ImprintError, NotReadyError, RequestError
from .searchable import Searchable

log = logging.getLogger("retrieval_imprint.serve")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond them it is refused with a 4xx naming the limit."""

    max_queries: int = 1024  # texts or vectors in one request
    max_text_chars: int = 16384  # characters in one text (the model reads its first few hundred tokens)
    max_top: int = 1000  # classes in one answer (and never more than the collection holds)
    max_body: int = 32 << 20  # bytes of a request body: its Content-Length, checked before reading, and as read


@dataclass(frozen=True)
class Query:
    """One request's queries, checked for form by serve.py: texts or vectors, and how to answer."""

    texts: list[str] | None
    vectors: np.ndarray | None
    top: int = 1
    threshold: float | None = None
    search_params: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.vectors) if self.vectors is not None else 0


def is_clients(exc: BaseException) -> bool:
    """Whether an error is the client's doing (a 4xx), not a failure of the server's dependencies."""
    return isinstance(exc, ImprintError) and exc.http_status < 500


def one_line(exc: BaseException) -> str:
    return (
        " ".join(f"{type(exc).__name__}: {exc}".split())
        if not isinstance(exc, ImprintError)
        else " ".join(str(exc).split())
    )


class Service:
    """Answers ``Query``s from the ``Searchable`` that ``open()`` returns (called once, on the
    engine thread), through a micro-batcher (``window`` seconds, ``max_batch`` queries)."""

    def __init__(
        self,
        open: Callable[[], Searchable],
        *,
        refresh: float = 1.0,
        window: float = 0.0,
        max_batch: int = 256,
        limits: Limits = Limits(),
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self._open = open
        self.refresh_every = refresh
        self.limits = limits
        self.batcher: MicroBatcher[Query, list[dict[str, Any]]] = MicroBatcher(
            self._answer, window=window, max_rows=max_batch, on_batch=on_batch
        )
        self.col: Searchable | None = None
        self.ready = False
        self.problems: dict[str, str] = {}
        self._looked = time.monotonic()
        self._starting: asyncio.Future | None = None

    # ----------------------------------------------------------------- life
    def start(self) -> None:
        """Begin opening the collection and loading the model on the engine thread; returns at
        once (``ready`` turns true when done, ``problems["startup"]`` says why not)."""
        self._starting = asyncio.ensure_future(self.batcher.run(self._load))

    async def started(self) -> bool:
        """Wait until ``start``'s work is over; whether the service is ready."""
        if self._starting is not None:
            await asyncio.shield(self._starting)
        return self.ready

    def _load(self) -> None:
        try:
            col = self._open()
            if col.model is not None:
                col.embedder().warm()
            if len(col):
                col.query(np.ones((1, col.dimension), np.float32))
        except Exception as exc:
            self.problems["startup"] = one_line(exc)
            log.error("could not start: %s", self.problems["startup"], exc_info=not isinstance(exc, ImprintError))
            return
        self.col, self._looked, self.ready = col, time.monotonic(), True
        # what is loaded now (libraries, model, collection) lives as long as the server: out of the
        # cyclic collector's sight, its full collections stop pausing requests (dev probe, 64 clients:
        # p99 95 -> 64 ms). Process-wide, as a server owns its process.
        gc.freeze()

    async def close(self) -> None:
        await self.batcher.close()
        close = getattr(self.col, "close", None)
        if close is not None:
            close()

    # ----------------------------------------------------------------- answers
    async def query(self, query: Query) -> list[dict[str, Any]]:
        """One record per query (``QueryResult.records``), as if the request were answered alone."""
        self._check_ready()
        return await self.batcher.submit(query, len(query))

    async def info(self) -> dict[str, Any]:
        self._check_ready()
        return await self.batcher.run(lambda: self._fresh().info())

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """``(healthy, body)``: looks at the collection again first if it has not for a while (at
        most two seconds' wait behind a running batch)."""
        if self.ready and time.monotonic() - self._looked >= self.refresh_every:
            try:
                await asyncio.wait_for(self.batcher.run(self._try_fresh), timeout=2.0)
            except asyncio.TimeoutError:
                pass
        col, classes = self.col, None
        if col is not None:
            try:  # counted in the database where the class table is not read (collections.md)
                classes = len(col)
            except Exception as exc:
                self._failed("collection", exc)
        body: dict[str, Any] = {
            "status": "error" if self.problems else "ok",
            "ready": self.ready,
            "classes": classes,
            "shards": col.n_shards if col is not None else None,
            "model": col.model if col is not None else None,
        }
        if self.problems:
            body["problems"] = dict(self.problems)
        return not self.problems, body

    def _check_ready(self) -> None:
        if not self.ready:
            why = self.problems.get("startup")
            raise NotReadyError(
                f"the server could not start: {why}"
                if why
                else "the server is starting: loading the model and the collection"
            )

    def _fresh(self) -> Searchable:
        """The collection, with other processes' commits picked up once ``refresh`` seconds have
        passed since the last look (engine thread only)."""
        col = self.col
        if col is None:
            raise NotReadyError("the collection is not open yet")
        if time.monotonic() - self._looked >= self.refresh_every:
            try:
                col.refresh()
            except Exception as exc:
                self._failed("collection", exc)
                raise
            self._looked = time.monotonic()
            self.problems.pop("collection", None)
        return col

    def _try_fresh(self) -> None:
        try:
            self._fresh()
        except Exception:  # recorded in problems by _fresh
            pass

    def _failed(self, dependency: str, exc: BaseException) -> None:
        if not is_clients(exc):
            self.problems[dependency] = one_line(exc)
            log.error(
                "%s failed: %s", dependency, self.problems[dependency], exc_info=not isinstance(exc, ImprintError)
            )

    def _answer(self, queries: list[Query]) -> list[list[dict[str, Any]] | BaseException]:
        """A batch's answers, one per query (or the error that query alone would get): engine thread."""
        try:
            col = self._fresh()
        except Exception as exc:
            return [exc] * len(queries)
        out: list[Any] = [self._unanswerable(col, q) for q in queries]
        vectors: dict[int, np.ndarray] = {
            i: q.vectors for i, q in enumerate(queries) if out[i] is None and q.vectors is not None
        }
        texts = [i for i, q in enumerate(queries) if out[i] is None and q.texts is not None]
        if texts:
            try:
                embedded = col.embedder().encode([t for i in texts for t in queries[i].texts or ()])
            except Exception as exc:
                self._failed("embedder", exc)
                for i in texts:
                    out[i] = exc
            else:
                self.problems.pop("embedder", None)
                ends = np.cumsum([len(queries[i]) for i in texts])
                vectors.update(zip(texts, np.split(embedded, ends[:-1])))
        groups: dict[tuple, list[int]] = {}
        for i in vectors:
            q = queries[i]
            top = min(q.top, len(col))
            groups.setdefault((top, q.threshold, tuple(sorted((q.search_params or {}).items()))), []).append(i)
        for (top, threshold, params), members in groups.items():
            self._search(col, queries, vectors, members, top, threshold, dict(params) or None, out)
        return out

    def _unanswerable(self, col: Searchable, q: Query) -> ImprintError | None:
        """Why ``q`` cannot be answered from ``col`` (None: it can): checked before batching, so
        that one bad request does not fail the others."""
        if not len(col):
            return RequestError("the collection has no classes yet", 409, "collection_state")
        if q.texts is not None and col.model is None:
            return DataError("this collection holds precomputed vectors (no model): send vectors, not texts")
        if q.vectors is not None and q.vectors.shape[1] != col.dimension:
            return DataError(
                f"vectors have dimension {q.vectors.shape[1]}, but this collection holds {col.dimension}-d vectors"
            )
        return None

    def _search(
        self,
        col: Searchable,
        queries: list[Query],
        vectors: dict[int, np.ndarray],
        members: list[int],
        top: int,
        threshold: float | None,
        params: dict[str, int] | None,
        out: list[Any],
    ) -> None:
        """One search for the queries ``members`` (same top, threshold and parameters); each gets
        its rows. Where the search fails, each is searched alone, so an error reaches only its own."""
        try:
            result = col.query(
                np.concatenate([vectors[i] for i in members]), top, threshold=threshold, search_params=params
            )
        except Exception as exc:
            if len(members) == 1:
                self._failed("collection", exc)
                out[members[0]] = exc
                return
            for i in members:
                self._search(col, queries, vectors, [i], top, threshold, params, out)
            return
        self.problems.pop("collection", None)
        start = 0
        for i in members:
            n = len(queries[i])
            out[i] = result.rows(start, start + n).records(queries[i].texts)
            start += n

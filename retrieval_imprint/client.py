"""A Python client of ``imprint serve`` (serve.py): the same ``QueryResult`` a local collection
gives, from a server on this machine or a Ray cluster. Standard library only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np

from .errors import DataError, ImprintError
from .ranking import QueryResult


class ServerError(ImprintError):
    """The server refused a request or could not be reached; the message says which."""


class Client:
    """``Client("http://127.0.0.1:8000").query(texts=["where is my card"], top=3)``."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", "classes": N, "shards": S, "model": name}``."""
        return self._call("/health")

    def info(self) -> dict[str, Any]:
        """The served collection's ``info()``."""
        return self._call("/info")

    def query(self, texts: Sequence[str] | None = None, vectors: Any = None, top: int = 1,
              threshold: float | None = None, nprobe: int | None = None) -> QueryResult:
        """``Collection.query`` (or ``query_texts``) on the server: give ``texts`` or ``vectors``."""
        if (texts is None) == (vectors is None):
            raise DataError("give either texts or vectors")
        body: dict[str, Any] = {"top": top, "threshold": threshold}
        if texts is not None:
            body["texts"] = list(texts)
        else:
            body["vectors"] = np.asarray(vectors, np.float32).tolist()
        if nprobe is not None:
            body["nprobe"] = nprobe
        return QueryResult.from_records(self._call("/query", body)["results"])

    def _call(self, route: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + route, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise ServerError(f"{self.url}{route}: {exc.code} {message}") from None
        except urllib.error.URLError as exc:
            raise ServerError(f"cannot reach {self.url}: {exc.reason}") from None

"""A Python client of ``imprint serve`` (serve.py): the same ``QueryResult`` a local collection
gives, from a server on this machine or a Ray cluster. Standard library only."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import DataError, ServerError
from .params import DEFAULT_PORT
from .ranking import QueryResult


class Client:
    """``Client("http://127.0.0.1:8000").query(texts=["where is my card"], top=3)``.

    ``api_key``: sent as ``Authorization: Bearer <key>`` (default: ``$IMPRINT_API_KEY``, if set).
    """

    def __init__(
        self, url: str = f"http://127.0.0.1:{DEFAULT_PORT}", timeout: float = 60.0, api_key: str | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.api_key = api_key if api_key is not None else os.environ.get("IMPRINT_API_KEY")

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", "ready": True, "classes": N, "shards": S, "model": name}``; a
        ``ServerError`` (503) where a dependency has failed."""
        return self._call("/health")

    def ready(self) -> bool:
        """Whether the server is ready to answer (its model loaded, its collection open)."""
        try:
            return bool(self._call("/ready")["ready"])
        except ServerError as exc:
            if exc.status == 503:
                return False
            raise

    def info(self) -> dict[str, Any]:
        """The served collection's ``info()``."""
        return self._call("/info")

    def query(
        self,
        texts: Sequence[str] | None = None,
        vectors: Any = None,
        top: int = 1,
        threshold: float | None = None,
        nprobe: int | None = None,
    ) -> QueryResult:
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
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + route, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                answer = json.loads(exc.read())
                message, code = answer["error"], answer.get("code")
            except (ValueError, KeyError, TypeError):
                message, code = exc.reason, None
            raise ServerError(f"{self.url}{route}: {exc.code} {message}", exc.code, code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(f"cannot reach {self.url}: {getattr(exc, 'reason', exc)}") from None

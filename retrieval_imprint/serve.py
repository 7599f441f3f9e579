"""Serving a collection over HTTP (docs/serving.md): one FastAPI application for both engines
(the ``serve`` extra: FastAPI, uvicorn, prometheus-client).

``create_app(service)`` is the whole HTTP side; ``service.Service`` answers. uvicorn mounts the
app for a collection (sharded or not) opened in this process (``imprint serve DIR``), and Ray
Serve's ingress mounts the same app over the Ray shard router (``imprint serve DIR --engine ray``,
distributed.py): same routes, same errors, same answers.

- ``GET /health``: liveness, and the state of what the server needs: 200 ``{"status": "ok", ...}``,
  or 503 with ``"problems"`` naming the failed dependency (the collection, the model).
- ``GET /ready``: 200 once the model is loaded and the collection open (and nothing has failed
  since), else 503: what a load balancer asks before sending traffic.
- ``POST /query``: ``{"texts": [...]}`` or ``{"vectors": [[...], ...]}``, optional ``"top"``,
  ``"threshold"``, ``"nprobe"``; answers ``{"results": [...]}``, one ``QueryResult.records``
  record per query. Concurrent requests are answered in micro-batches (batching.py).
- ``GET /info``: the collection's ``info()``; ``GET /metrics``: Prometheus text format;
  ``GET /openapi.json`` and ``/docs``: the schema and its browsable page.

Every error is JSON ``{"error": message, "code": code}`` with the error's status (errors.py):
4xx where the client is at fault, 5xx where the server is. With an ``api_key``, every route but
``/health`` and ``/ready`` needs ``Authorization: Bearer <key>`` (compared in constant time).
"""

from __future__ import annotations

import hmac
import logging
import socket
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ConfigDict, Field, StringConstraints, ValidationError, create_model, model_validator
from starlette.exceptions import HTTPException

from . import __version__
from .errors import ImprintError, RequestError, UnauthorizedError
from .service import Limits, Query, Service, one_line

ROUTES = ("/health", "/ready", "/info", "/query", "/metrics", "/openapi.json", "/docs")
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 422: "invalid_request"}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
log = logging.getLogger("retrieval_imprint.serve")


def request_model(limits: Limits) -> Any:
    """The ``/query`` body's pydantic model under ``limits``: its checks (types, finite numbers,
    sizes, no unknown field, JSON nested at most 200 deep) and its OpenAPI schema."""
    finite = Annotated[float, Field(allow_inf_nan=False)]
    text = Annotated[str, StringConstraints(max_length=limits.max_text_chars)]
    row = Annotated[list[finite], Field(min_length=1)]

    def one_of(model: Any) -> Any:
        if (model.texts is None) == (model.vectors is None):
            raise ValueError("give either texts (a list of strings) or vectors (a list of rows), not both or neither")
        return model

    return create_model(
        "QueryRequest",
        __config__=ConfigDict(extra="forbid", strict=True),
        __validators__={"one_of": model_validator(mode="after")(one_of)},  # type: ignore[dict-item]
        texts=(
            list[text] | None,
            Field(
                None,
                min_length=1,
                max_length=limits.max_queries,
                description="Texts to embed with the collection's model and classify.",
            ),
        ),
        vectors=(
            list[row] | None,
            Field(
                None,
                min_length=1,
                max_length=limits.max_queries,
                description="Embeddings to classify, all of the collection's dimension.",
            ),
        ),
        top=(
            int,
            Field(1, ge=1, le=limits.max_top, description="Best classes per query (at most the classes there are)."),
        ),
        threshold=(finite | None, Field(None, description="Rejection threshold (default: the stored ones).")),
        nprobe=(int | None, Field(None, ge=1, description="IVF lists searched (default: the stored tuning).")),
    )


def parse_query(body: bytes, model: Any) -> Query:
    """The ``/query`` body as a ``Query``, or a ``RequestError`` naming the first problems."""
    try:
        data = model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestError(_describe(exc)) from None
    vectors = None
    if data.vectors is not None:
        if len({len(r) for r in data.vectors}) > 1:
            raise RequestError(
                f"vectors must be rows of one length; got lengths {sorted({len(r) for r in data.vectors})}"
            )
        vectors = np.asarray(data.vectors)
        if np.abs(vectors).max() > np.finfo(np.float32).max:  # finite as JSON's float64, not as float32
            raise RequestError("vectors hold a number beyond float32's range")
        vectors = vectors.astype(np.float32)
    return Query(
        data.texts, vectors, data.top, data.threshold, None if data.nprobe is None else {"nprobe": data.nprobe}
    )


def _describe(exc: Any) -> str:
    """A pydantic ``ValidationError`` in one line: where and what, for the first three problems."""
    parts = []
    for error in exc.errors()[:3]:
        if error["type"] == "json_invalid":
            parts.append(f"the request body is not valid JSON ({error['msg'].removeprefix('Invalid JSON: ')})")
            continue
        where = ".".join(str(p) for p in error["loc"])
        if error["type"] == "value_error":  # the model's own check, on the body as a whole
            parts.append(error["msg"].removeprefix("Value error, "))
            continue
        parts.append(f"{where or 'the request body'}: {error['msg']}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (an app per registry)."""

    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imprint_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.errors = Counter("imprint_errors", "Error answers, by error code.", ["code"], registry=self.registry)
        self.latency = Histogram(
            "imprint_request_duration_seconds",
            "Time from request to answer, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_queries = Histogram(
            "imprint_batch_queries",
            "Queries answered together in one micro-batch.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "imprint_batch_requests",
            "Requests answered together in one micro-batch.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        Gauge("imprint_classes", "Classes in the served collection.", registry=self.registry).set_function(
            lambda: len(service.col) if service.col is not None else 0
        )
        Gauge("imprint_ready", "1 when the server is ready to answer.", registry=self.registry).set_function(
            lambda: float(service.ready and not service.problems)
        )
        Gauge("imprint_waiting_queries", "Queries waiting for a micro-batch.", registry=self.registry).set_function(
            lambda: service.batcher.waiting_rows
        )
        service.batcher.on_batch = self.batch

    def batch(self, queries: int, requests: int) -> None:
        self.batch_queries.observe(queries)
        self.batch_requests.observe(requests)

    def text(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Measured:
    """ASGI middleware: counts and times every HTTP request for ``Metrics``."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = [500]

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            self.metrics.requests.labels(route, str(status[0])).inc()


class _Limited:
    """ASGI middleware: refuses a body over ``max_body`` bytes, from its Content-Length before
    reading anything and by counting as it streams (a chunked body has none). Starlette's own
    limiter answers in plain text; every error of this server is JSON."""

    def __init__(self, app: Any, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = RequestError(
            f"the request body is over this server's limit of {self.max_body} bytes", 413, "body_too_large"
        )
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            response = JSONResponse(
                {"error": str(too_large), "code": too_large.code}, status_code=413, headers={"Connection": "close"}
            )
            return await response(scope, receive, send)
        seen = 0

        async def counting() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise too_large
            return message

        await self.app(scope, counting, send)


def create_app(service: Service, *, api_key: str | None = None, title: str = "retrieval-imprint") -> Any:
    """The FastAPI application over ``service`` (started and closed with the app's lifespan)."""
    metrics = Metrics(service)
    body_model = request_model(service.limits)

    @asynccontextmanager
    async def lifespan(app: Any):
        service.start()
        yield
        await service.close()

    app = FastAPI(
        title=title,
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        openapi_url=None,
        redoc_url=None,
        description="Few-shot classification by weight imprinting: POST /query with texts or vectors.",
    )
    bearer = HTTPBearer(auto_error=False, description="The server's IMPRINT_API_KEY")

    async def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None:
            raise UnauthorizedError("this server needs an API key: send the header 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(credentials.credentials.encode(), (api_key or "").encode()):
            raise UnauthorizedError("the API key sent is not this server's")

    guarded = [Depends(authorized)] if api_key else []

    def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Any:
        metrics.errors.labels(code).inc()
        return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)

    @app.exception_handler(ImprintError)
    async def imprint_error(request: Request, exc: ImprintError) -> Any:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, UnauthorizedError) else None
        return error(exc.http_status, exc.code, " ".join(str(exc).split()), headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        message = {
            404: f"no route {request.url.path}; routes: {', '.join(ROUTES)}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return error(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), message, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Any:
        return error(400, "invalid_request", _describe(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Any:
        log.error("internal error answering %s %s", request.method, request.url.path, exc_info=exc)
        return error(500, "internal", f"internal error: {one_line(exc)}")

    @app.get("/health", summary="Liveness, and the state of the collection and the model")
    async def health() -> Any:
        healthy, body = await service.health()
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/ready", summary="Whether the server is ready to answer (model loaded, collection open)")
    async def ready() -> Any:
        healthy, body = await service.health()
        ok = healthy and service.ready
        return JSONResponse(
            {"ready": ok, **({} if ok else {"status": body["status"], "problems": body.get("problems", {})})},
            status_code=200 if ok else 503,
        )

    @app.get("/info", dependencies=guarded, summary="The collection's sizes and settings")
    async def info() -> Any:
        return JSONResponse(await service.info())

    @app.post(
        "/query",
        dependencies=guarded,
        summary="Classify texts or vectors",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/QueryRequest"}}},
            }
        },
    )
    async def query(request: Request) -> Any:
        return JSONResponse({"results": await service.query(parse_query(await request.body(), body_model))})

    @app.get("/metrics", dependencies=guarded, summary="Prometheus metrics")
    async def prometheus() -> Any:
        text, content_type = metrics.text()
        return Response(text, media_type=content_type)

    def openapi_schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})["QueryRequest"] = (
                body_model.model_json_schema(ref_template="#/components/schemas/{model}")
            )
            app.openapi_schema = schema
        return app.openapi_schema

    @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    async def openapi() -> Any:
        return JSONResponse(openapi_schema())

    @app.get("/docs", dependencies=guarded, include_in_schema=False)
    async def docs() -> Any:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} API")

    app.add_middleware(_Limited, max_body=service.limits.max_body)
    app.add_middleware(_Measured, metrics=metrics)
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one), bound before the server starts
    so its address can be printed and no other process can take it in between."""
    sock = socket.create_server(
        (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, reuse_port=False, backlog=1024
    )
    sock.set_inheritable(True)
    return sock


def run(
    app: Any,
    sock: socket.socket,
    service: Service,
    *,
    listening: Callable[[], None],
    ready: Callable[[bool], None],
    drain: float = 30.0,
) -> None:
    """Serve ``app`` on ``sock`` with uvicorn until SIGINT or SIGTERM: then it stops taking
    connections, answers the requests in flight (for at most ``drain`` seconds) and returns.
    ``listening()`` is called once connections are taken, ``ready(ok)`` once the service has
    started (or failed to)."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            listening()
            self.announcing = asyncio.ensure_future(self._announce())  # held: a task no one holds may vanish

        async def _announce(self) -> None:
            ready(await service.started())

    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=drain,  # type: ignore[arg-type]  # uvicorn takes seconds as a float timeout_keep_alive=5, backlog=1024
    )
    Server(config).run(sockets=[sock])

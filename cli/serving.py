"""``imprint serve``: a collection's JSON API over HTTP (retrieval_imprint/serve.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from retrieval_imprint.params import DEFAULT_PORT, parse_size

from .app import UserError, collection_argument, engine_options, json_option, main, ray_connect

API_KEY = "IMPRINT_API_KEY"  # the environment variable holding the server's key


@main.command()
@collection_argument
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0: every interface; set IMPRINT_API_KEY, mind who can reach it).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Port to listen on (0: any free one; the address is printed).",
)
@click.option(
    "--refresh",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds between looks for other processes' writes (0: before every batch).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    default=256,
    show_default=True,
    help="Queries answered together at most (1: one request at a time).",
)
@click.option(
    "--batch-window",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    metavar="MS",
    help="Milliseconds an idle server waits after a request for others to batch with it (requests "
    "arriving while a batch runs are batched anyway).",
)
@click.option(
    "--max-queries",
    type=click.IntRange(1),
    default=1024,
    show_default=True,
    help="Texts or vectors one request may hold.",
)
@click.option(
    "--max-text-chars", type=click.IntRange(1), default=16384, show_default=True, help="Characters one text may hold."
)
@click.option(
    "--max-top",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Largest top a request may ask for (answers never hold more classes than there are).",
)
@click.option(
    "--max-body",
    default="32MiB",
    show_default=True,
    help="Largest request body (checked from Content-Length before it is read).",
)
@engine_options
@json_option
def serve(
    collection: Path,
    host: str,
    port: int,
    refresh: float,
    max_batch: int,
    batch_window: float,
    max_queries: int,
    max_text_chars: int,
    max_top: int,
    max_body: str,
    engine: str,
    ray_address: str | None,
    as_json: bool,
) -> None:
    """Answer queries to COLLECTION over HTTP until interrupted (SIGINT or SIGTERM: requests in
    flight are answered first).

    POST /query with {"texts": [...]} or {"vectors": [[...]]} (and "top", "threshold", "nprobe")
    answers {"results": [...]}, one record per query as `query --json` prints them. GET /health
    (liveness), /ready (model loaded), /info, /metrics (Prometheus), /docs (OpenAPI). Concurrent
    requests are answered in micro-batches. With IMPRINT_API_KEY set, every route but /health and
    /ready needs "Authorization: Bearer <key>". With --engine ray, Ray Serve answers with the same
    app: one deployment per shard behind an ingress that merges. It says where it listens, then
    when it is ready, on stderr (--json: {"collection": ..., "url": ...} on stdout once ready).

    \b
    Example:
        imprint serve intents/ --port 8000 &
        curl -s localhost:8000/query -d '{"texts": ["where is my card"], "top": 2}'
    """
    from retrieval_imprint.service import Limits
    from retrieval_imprint.shards import directories

    directories(collection)  # a damaged manifest is an error before anything starts
    limits = Limits(
        max_queries=max_queries, max_text_chars=max_text_chars, max_top=max_top, max_body=parse_size(max_body)
    )
    options: dict[str, Any] = {
        "refresh": refresh,
        "window": batch_window / 1e3,
        "max_batch": max_batch,
        "limits": limits,
    }
    api_key = os.environ.get(API_KEY) or None
    if engine == "ray":
        _serve_on_ray(collection, host, port, options, api_key, ray_address, as_json)
        return
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("imprint serve needs FastAPI and uvicorn: pip install 'retrieval-imprint[serve]'") from None
    from retrieval_imprint.serve import create_app, listen, run
    from retrieval_imprint.service import Service
    from retrieval_imprint.sharded import open_any

    service = Service(lambda: open_any(collection), **options)
    sock = listen(host, port)
    where = sock.getsockname()
    url = f"http://{where[0]}:{where[1]}"
    run(
        create_app(service, api_key=api_key),
        sock,
        service,
        listening=lambda: click.echo(f"serving {collection} on {url} (Ctrl-C stops)", err=True),
        ready=lambda ok: _announce(collection, url, as_json, ok, service.problems),
    )


def _announce(collection: Path, url: str, as_json: bool, ok: bool, problems: dict[str, str]) -> None:
    """Say that the server is ready (or why it cannot answer)."""
    if not ok:
        click.echo(f"not ready: {'; '.join(problems.values())} (GET {url}/health says so too)", err=True)
        return
    if as_json:
        click.echo(json.dumps({"collection": str(collection), "url": url}))
    click.echo(f"ready: {collection} answers on {url}", err=True)


def _serve_on_ray(
    collection: Path,
    host: str,
    port: int,
    options: dict[str, Any],
    api_key: str | None,
    address: str | None,
    as_json: bool,
) -> None:
    """``imprint serve --engine ray``: ``rayserving.serve``, until interrupted."""
    import signal
    import threading

    if port == 0:
        raise UserError("--engine ray needs a --port (Ray Serve's proxy cannot pick a free one and say which)")
    ray_connect(address)
    from retrieval_imprint.rayserving import serve, serve_shutdown

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    url = serve(collection, host=host, port=port, api_key=api_key, **options)
    click.echo(f"serving {collection} on {url} (Ctrl-C stops)", err=True)
    _announce(collection, url, as_json, True, {})
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve_shutdown()

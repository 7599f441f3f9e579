"""``imprint serve``: a collection's JSON API over HTTP (retrieval_imprint/serve.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .app import UserError, collection_argument, engine_options, json_option, main, ray_connect


@main.command()
@collection_argument
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; mind who can reach it).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free one; the address is printed).")
@click.option("--refresh", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds between looks for other processes' writes (0: before every request).")
@engine_options
@json_option
def serve(collection: Path, host: str, port: int, refresh: float, engine: str, ray_address: str | None,
          as_json: bool) -> None:
    """Answer queries to COLLECTION over HTTP until interrupted.

    POST /query with {"texts": [...]} or {"vectors": [[...]]} (and "top", "threshold", "nprobe")
    answers {"results": [...]}, one record per query as `query --json` prints them; GET /health and
    GET /info describe the collection. retrieval_imprint.client.Client is a Python client. With
    --engine ray, Ray Serve answers: one deployment per shard behind an ingress that merges. Once it
    answers, it says where on stderr (--json: {"collection": ..., "url": ...} on stdout).

    \b
    Example:
        imprint serve intents/ --port 8000 &
        curl -s localhost:8000/query -d '{"texts": ["where is my card"], "top": 2}'
    """
    from retrieval_imprint.sharded import directories

    directories(collection)  # a damaged manifest is an error before anything starts
    if engine == "ray":
        _serve_on_ray(collection, host, port, refresh, ray_address, as_json)
        return
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("imprint serve needs Starlette and uvicorn: pip install 'retrieval-imprint[serve]'") from None
    from retrieval_imprint.serve import LocalService, json_app, listen, run

    service = LocalService(collection, refresh)
    sock = listen(host, port)
    where = sock.getsockname()
    url = f"http://{where[0]}:{where[1]}"
    run(json_app(service.health, service.info, service.query), sock, lambda: _announce(collection, url, as_json))


def _announce(collection: Path, url: str, as_json: bool) -> None:
    """Say where the server answers, once it does."""
    if as_json:
        click.echo(json.dumps({"collection": str(collection), "url": url}))
    click.echo(f"serving {collection} on {url} (Ctrl-C stops)", err=True)


def _serve_on_ray(collection: Path, host: str, port: int, refresh: float, address: str | None,
                  as_json: bool) -> None:
    """``imprint serve --engine ray``: ``distributed.serve``, until interrupted."""
    import signal
    import threading

    if port == 0:
        raise UserError("--engine ray needs a --port (Ray Serve's proxy cannot pick a free one and say which)")
    ray_connect(address)
    from retrieval_imprint.distributed import serve, serve_shutdown

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _announce(collection, serve(collection, host=host, port=port, refresh=refresh), as_json)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve_shutdown()

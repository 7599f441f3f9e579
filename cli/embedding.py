"""Commands about the embedding side: the models available offline and the embedding cache."""

from __future__ import annotations

import click

from .app import UserError, json_option, main, output


@main.command()
@json_option
def models(as_json: bool) -> None:
    """The embedding models that load with no network: the packaged one and the
    sentence-transformers models in the Hugging Face cache.

    Any other model is given as a folder (--model /path/to/model).

    \b
    Example:
        imprint models
    """
    from retrieval_imprint.embed import available_models

    output(available_models(), as_json, _print_models)


def _print_models(rows: list[dict]) -> None:
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        click.echo(f"{r['name']:<{width}}  {r['source']}  {r['path']}")


@main.group()
def cache() -> None:
    """The embedding cache: texts embedded once are not embedded again.

    Kept at $RETRIEVAL_IMPRINT_CACHE, else ~/.cache/retrieval-imprint/embeddings.sqlite, keyed by
    the model's fingerprint and the text. RETRIEVAL_IMPRINT_CACHE=off (or imprint --no-cache)
    turns it off.
    """


@cache.command("info")
@json_option
def cache_info(as_json: bool) -> None:
    """Where the embedding cache is, its size, and its vectors per model.

    \b
    Example:
        imprint cache info
    """
    from retrieval_imprint.embed import EmbeddingCache

    path = EmbeddingCache.default_path()
    if path is None:
        output(
            {"path": None, "bytes": 0, "vectors": 0, "models": {}},
            as_json,
            lambda _: click.echo("the embedding cache is turned off (RETRIEVAL_IMPRINT_CACHE=off)"),
        )
        return
    data = EmbeddingCache(path).info() if path.exists() else {"path": str(path), "bytes": 0, "vectors": 0, "models": {}}
    output(data, as_json, _print_cache)


def _print_cache(data: dict) -> None:
    click.echo(f"{data['path']}: {data['vectors']} vectors, {data['bytes'] / 2**20:.1f} MiB")
    for model, n in data["models"].items():
        click.echo(f"  {n:9d}  {model}")


@cache.command("clear")
@click.option("--model", help="Only this model's vectors (its name, e.g. all-MiniLM-L6-v2).")
@json_option
def cache_clear(model: str | None, as_json: bool) -> None:
    """Delete the cached embeddings (all, or one model's) and give the space back.

    \b
    Example:
        imprint cache clear --model all-MiniLM-L6-v2
    """
    from retrieval_imprint.embed import EmbeddingCache

    path = EmbeddingCache.default_path()
    if path is None:
        raise UserError("the embedding cache is turned off (RETRIEVAL_IMPRINT_CACHE=off): nothing to clear")
    deleted = EmbeddingCache(path).clear(model) if path.exists() else 0
    output(
        {"path": str(path), "deleted": deleted},
        as_json,
        lambda d: click.echo(f"deleted {d['deleted']} cached vectors from {d['path']}"),
    )

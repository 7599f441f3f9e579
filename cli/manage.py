"""Commands that inspect and maintain a collection: info, classes, examples, export, remove, compact,
tune, check, db upgrade."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .app import collection_argument, describe, emit, json_option, main, open_collection, output


@main.command()
@collection_argument
@json_option
def info(collection: Path, as_json: bool) -> None:
    """Settings, sizes and files of COLLECTION.

    \b
    Example:
        imprint info intents/
    """
    output(open_collection(collection).info(), as_json, _print_info)


def _print_info(data: dict) -> None:
    for key, value in data.items():
        if key == "auto_choice" and value:
            click.echo(f"auto_choice: {describe(value)}")
        elif isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {v}")
        elif key == "shard_info":
            click.echo("shard_info:")
            for row in value:
                click.echo("  " + ", ".join(f"{k} {v}" for k, v in row.items() if v is not None))
        else:
            click.echo(f"{key}: {', '.join(value) if isinstance(value, list) else value}")


@main.command()
@collection_argument
@json_option
def classes(collection: Path, as_json: bool) -> None:
    """The classes of COLLECTION with their sample and proxy counts.

    Classes are listed in the order they were added; samples counts every sample a class was
    imprinted from, proxies what its GEN setting made of them.

    \b
    Example:
        imprint classes intents/
    """
    output(open_collection(collection).class_table(), as_json, _print_classes)


def _print_classes(rows: list[dict]) -> None:
    width = min(max([len(str(r["label"])) for r in rows] + [5]), 40)  # a longer label runs on, the rest stay put
    click.echo(f"{'class':<{width}}  samples  proxies")
    for r in rows:
        click.echo(f"{r['label']!s:<{width}}  {r['samples']:7d}  {r['proxies']:7d}")


@main.command()
@collection_argument
@click.argument("label")
@click.option("--limit", type=int, help="Show at most this many.")
@json_option
def examples(collection: Path, label: str, limit: int | None, as_json: bool) -> None:
    """The training examples COLLECTION keeps for class LABEL: each sample's text and row id.

    \b
    Example:
        imprint examples intents/ lost_card --limit 3
    """
    col = open_collection(collection)
    rows = col.examples({str(c): c for c in col.classes}.get(label, label))[:limit]

    def human(rs: list[dict]) -> None:
        for r in rs:
            ref = f"  [{r['ref']}]" if r["ref"] is not None else ""
            click.echo(f"{r['sample']:5d}  {r['text'] if r['text'] is not None else '(vector)'}{ref}")

    output(rows, as_json, human)


@main.command()
@collection_argument
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def export(collection: Path, out: Path, as_json: bool) -> None:
    """Write COLLECTION's kept samples (label, text, ref, vector) and settings to the Parquet file OUT.

    `imprint index NEW OUT` makes an equal collection from it: the same settings, what auto chose,
    the threshold, rejection rule, each class's shift and own threshold, the search parameters.

    \b
    Example:
        imprint export intents/ intents.parquet
    """
    rows = open_collection(collection).export(out)
    output({"rows": rows, "out": str(out)}, as_json, lambda d: click.echo(f"wrote {d['rows']} samples to {d['out']}"))


@main.command()
@collection_argument
@click.argument("labels", nargs=-1, required=True)
@json_option
def remove(collection: Path, labels: tuple[str, ...], as_json: bool) -> None:
    """Remove the classes LABELS from COLLECTION (all or nothing).

    \b
    Example:
        imprint remove intents/ lost_card order_food
    """
    col = open_collection(collection)
    by_text = {str(c): c for c in col.classes}
    col.remove([by_text.get(label, label) for label in labels])
    output(
        {"removed": len(set(labels)), "classes": len(col)},
        as_json,
        lambda d: click.echo(f"removed {d['removed']} classes; {d['classes']} remain"),
    )


@main.command()
@collection_argument
@click.option(
    "--retrain/--no-retrain",
    default=None,
    help="Retrain an IVF index's lists on the live proxies now (--retrain) or never "
    "(--no-retrain). Default: when the proxies have grown 4x past those it was trained on.",
)
@json_option
def compact(collection: Path, retrain: bool | None, as_json: bool) -> None:
    """Rewrite COLLECTION's live vectors into one file per kind, dropping removed ones.

    \b
    Example:
        imprint compact intents/
    """
    col = open_collection(collection)
    before = col.info()["segments"]
    after = col.compact(retrain=retrain).info()["segments"]
    retrained = {f for f in before if f.startswith("template")} != {f for f in after if f.startswith("template")}
    output(
        {"before": before, "after": after, "retrained": retrained},
        as_json,
        lambda d: click.echo(
            f"{len(d['before'])} files -> {len(d['after'])}" + ("; IVF lists retrained" if d["retrained"] else "")
        ),
    )


@main.command()
@collection_argument
@json_option
def tune(collection: Path, as_json: bool) -> None:
    """Choose again what COLLECTION's settings leave to auto (k, max or blend), by cross-validation
    on every kept sample, and re-imprint every class with the choice (one atomic write; in a
    sharded collection, one choice on every shard's samples, written shard by shard).

    \b
    Example:
        imprint tune intents/
    """
    col = open_collection(collection)
    before = col.auto_choice
    after = col.tune()
    if as_json:
        emit({"before": before, "after": after})
        return
    click.echo(f"{describe(after)}" + (f" (was {describe(before, cv=False)})" if before else ""))


@main.command()
@collection_argument
@json_option
def check(collection: Path, as_json: bool) -> None:
    """Verify that COLLECTION's database and index files agree (exit 1 if not).

    \b
    Example:
        imprint check intents/
    """
    from retrieval_imprint.sharded import kind_of

    report = kind_of(collection).verify(collection)
    if as_json:
        emit({"ok": report.ok, "problems": report.problems})
    elif report.ok:
        click.echo(f"ok: {collection}")
    for problem in report.problems:
        click.echo(problem, err=True)
    if not report.ok:
        sys.exit(1)


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command()
@collection_argument
@json_option
def upgrade(collection: Path, as_json: bool) -> None:
    """Migrate COLLECTION's database to this version's schema.

    \b
    Example:
        imprint db upgrade intents/
    """
    from retrieval_imprint.sharded import kind_of

    before, head = kind_of(collection).upgrade(collection)
    output(
        {"before": before, "after": head},
        as_json,
        lambda d: click.echo(
            f"{collection}: schema {before} -> {head}" if before != head else f"{collection}: already at {head}"
        ),
    )

"""Commands that build and use a collection: index, query, eval, calibrate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from retrieval_imprint.collection import Collection
from retrieval_imprint.ingest import DEFAULT_CHUNK, ingest
from retrieval_imprint.params import COLLECTION, IMPRINT, PRESETS, STORED
from retrieval_imprint.readers import FORMATS, Dataset, read

from .app import (UserError, collection_argument, data_options, describe, emit, json_option, main, query_vectors, quiet_option,
                  read_options, setting_options, show_progress)


@main.command()
@collection_argument
@click.argument("data", nargs=-1, required=True)
@click.option("--preset", type=click.Choice(list(PRESETS)),
              help="Start from a published method's settings (options given beside it win).")
@setting_options([IMPRINT[name] for name in STORED], " (new collections)")
@setting_options([COLLECTION[name] for name in ("model", "index", "memory_budget", "keep_samples")],
                 " (new collections)")
@click.option("--nprobe", type=int, help="Inverted lists searched per query (IVF indexes); stored.")
@click.option("--chunk-size", type=int, default=DEFAULT_CHUNK, show_default=True,
              help="Larger inputs are embedded and added chunk by chunk; an interrupted run resumes.")
@data_options
@quiet_option
@json_option
def index(collection: Path, data: tuple[str, ...], preset: str | None, nprobe: int | None, chunk_size: int,
          text_column, label_column, vector_column, split, quiet: bool, as_json: bool, **given: Any) -> None:
    """Create COLLECTION or extend it with the labelled rows of DATA files.

    DATA: CSV/TSV, JSONL, Parquet (text and label columns, or a vector column) or NPZ (--split NAME
    reads NAME_X and NAME_y). Every file is read and checked before anything is written. Up to
    --chunk-size rows are embedded and added in one atomic write; larger inputs go chunk by chunk
    (cut between classes when the rows are grouped by label), each chunk atomic and recorded, so
    rerunning an interrupted command continues after the last committed chunk. Settings apply when
    the collection is created; given for an existing one, they must match.

    \b
    Example:
        imprint index intents/ train.csv --generator kmeans --k 5
    """
    settings = {name: value for name, value in given.items() if value is not None}
    if settings.get("model") == "none":
        settings["model"] = None
    if nprobe is not None:
        settings["search_params"] = {"nprobe": nprobe}
    datasets = [read(p, **read_options(text_column, label_column, vector_column, split)) for p in data]
    report = ingest(collection, datasets, chunk_size=chunk_size, progress=show_progress(quiet), preset=preset,
                    **settings)
    if as_json:
        emit(report.as_dict())
        return
    click.echo(f"indexed {report.rows} rows into {collection}"
               + (f" (resumed after {report.resumed_after})" if report.resumed_after else "")
               + f": {report.new_classes} new classes; {report.classes} classes, {report.proxies} proxies in all"
               + ("; IVF lists retrained on them" if report.retrained else ""))
    if report.auto_choice and report.auto_choice["cv_results"]:
        click.echo(f"auto chose {describe(report.auto_choice)}")


@main.command()
@collection_argument
@click.argument("text", nargs=-1)
@click.option("--file", "file_", help="Queries from a file: one per line, or a CSV/JSONL/Parquet text column.")
@click.option("--vectors", help="Query vectors from an .npy or .npz file (--split for NPZ).")
@click.option("--top", type=int, default=1, show_default=True, help="Classes to show per query.")
@click.option("--threshold", type=float, help="Below this score the answer is 'no class' (default: stored).")
@click.option("--nprobe", type=int, help="Inverted lists to search (IVF indexes; default: stored).")
@data_options
@quiet_option
@json_option
def query(collection: Path, text: tuple[str, ...], file_: str | None, vectors: str | None, top: int,
          threshold: float | None, nprobe: int | None, text_column, label_column, vector_column, split, quiet: bool,
          as_json: bool) -> None:
    """Classify TEXT arguments (or --file, or --vectors) against COLLECTION.

    \b
    Example:
        imprint query intents/ "where is my card" "play some jazz" --top 3
    """
    col = Collection.open(collection)
    options = read_options(text_column, label_column, vector_column, split)
    if vectors is not None:
        ds = read(vectors, need_labels=False, **options)
        names: list[Any] = list(range(len(ds)))
        Q = ds.vectors if ds.vectors is not None else query_vectors([ds], col.model, quiet)
    else:
        queries = list(text)
        if file_ is not None:
            if Path(file_).suffix.lower() in FORMATS:
                queries += read(file_, need_labels=False, **options).texts or []
            else:
                if not Path(file_).is_file():
                    raise UserError(f"{file_}: no such file")
                queries += [line.strip() for line in Path(file_).read_text(encoding="utf-8").splitlines()
                            if line.strip()]
        if not queries:
            raise UserError("nothing to query: give TEXT arguments, --file or --vectors")
        if col.model is None:
            raise UserError(f"{collection} records no embedding model: query it with --vectors")
        names, Q = queries, query_vectors([Dataset("args", texts=queries)], col.model, quiet)
    result = col.query(Q, top, threshold=threshold, search_params={"nprobe": nprobe} if nprobe else None)
    rows = [{"query": name, "labels": labels.tolist(), "scores": scores.tolist()}
            for name, labels, scores in zip(names, result.labels, result.scores)]
    if as_json:
        emit(rows)
        return
    for row in rows:
        click.echo(str(row["query"]))
        if row["labels"][0] is None:
            click.echo("  (no class)")
        for label, score in zip(row["labels"], row["scores"]):
            if label is not None:
                click.echo(f"  {score:7.4f}  {label}")


@main.command("eval")
@collection_argument
@click.argument("data")
@click.option("--threshold", type=float, help="Score threshold for 'no class' (default: stored).")
@click.option("--confusions", type=int, default=10, show_default=True, help="Confusion pairs to list.")
@data_options
@quiet_option
@json_option
def evaluate_cmd(collection: Path, data: str, threshold: float | None, confusions: int, text_column, label_column,
                 vector_column, split, quiet: bool, as_json: bool) -> None:
    """Accuracy and macro-F1 of COLLECTION on the labelled rows of DATA.

    \b
    Example:
        imprint eval intents/ test.csv --json
    """
    from retrieval_imprint.evaluate import evaluate

    col = Collection.open(collection)
    ds = read(data, text_column=text_column, label_column=label_column, vector_column=vector_column, split=split)
    if ds.texts is not None and col.model is None:
        raise UserError(f"{collection} records no embedding model: evaluate it on vectors")
    X = query_vectors([ds], col.model, quiet)
    result = evaluate(ds.labels, col.predict(X, threshold=threshold).tolist(),  # type: ignore[arg-type]
                      max_confusions=confusions)
    if as_json:
        emit(result.as_dict())
        return
    click.echo(f"accuracy  {result.accuracy:.4f}  ({round(result.accuracy * result.n)}/{result.n})")
    click.echo(f"macro-F1  {result.macro_f1:.4f}  ({len(result.per_class)} classes)")
    width = max(len(str(r["label"])) for r in result.per_class)
    click.echo(f"\n{'class':<{width}}  precision  recall     f1  support")
    for r in result.per_class:
        click.echo(f"{str(r['label']):<{width}}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['f1']:5.3f}  "
                   f"{r['support']:7d}")
    if result.confusions:
        click.echo("\nmost confused (true -> predicted: count)")
        for c in result.confusions:
            click.echo(f"  {c['true']} -> {c['predicted'] if c['predicted'] is not None else '(no class)'}: "
                       f"{c['count']}")


@main.command()
@collection_argument
@click.argument("data")
@click.option("--oos", help="Out-of-scope queries (no labels needed), to trade against in-scope accuracy.")
@click.option("--oos-split", help="NPZ split of the --oos file.")
@click.option("--target-accuracy", type=float,
              help="Keep in-scope accuracy at least this (rejections count as errors); reject as much as that allows.")
@data_options
@quiet_option
@json_option
def calibrate(collection: Path, data: str, oos: str | None, oos_split: str | None, target_accuracy: float | None,
              text_column, label_column, vector_column, split, quiet: bool, as_json: bool) -> None:
    """Choose and store COLLECTION's rejection threshold from labelled validation DATA.

    Without --target-accuracy, the threshold maximises the mean of in-scope accuracy and
    out-of-scope recall on DATA and --oos. Queries scoring below it then get no class.

    \b
    Example:
        imprint calibrate intents/ val.csv --oos out_of_scope.csv
    """
    col = Collection.open(collection)
    options = read_options(text_column, label_column, vector_column, split)
    ds = read(data, **options)
    X = query_vectors([ds], col.model, quiet)
    X_oos = (query_vectors([read(oos, need_labels=False, **{**options, "split": oos_split})], col.model, quiet)
             if oos else None)
    result = col.calibrate(X, ds.labels, X_oos, target_accuracy=target_accuracy)  # type: ignore[arg-type]
    if as_json:
        emit(result.__dict__)
        return
    click.echo(f"threshold {result.threshold:.4f} ({result.criterion})")
    click.echo(f"in-scope accuracy {result.in_scope_accuracy:.4f}"
               + (f", out-of-scope recall {result.oos_recall:.4f}" if result.oos_recall is not None else ""))



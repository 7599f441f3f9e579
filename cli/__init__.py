"""The ``imprint`` command line: a thin click layer over the ``retrieval_imprint`` Python API.

Installed as ``retrieval_imprint.cli`` (``setup.cfg`` maps this top-level folder there). Every
command has ``--help`` with an example; commands that print results take ``--json``. A user
error (bad file, column, label, dimension, locked collection...) exits with code 2 and one line
on stderr, and leaves the collection as it was.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from tqdm.auto import tqdm

from retrieval_imprint import __version__
from retrieval_imprint.collection import Collection, CollectionLockedError, SchemaVersionError
from retrieval_imprint.generate import GENERATORS
from retrieval_imprint.index import METRICS
from retrieval_imprint.normalize import INF_NORMS, POST_NORMS, PRE_NORMS
from retrieval_imprint.readers import FORMATS, DataError, Dataset, read


class UserError(click.ClickException):
    """A problem with the user's input: exit code 2, one line on stderr."""

    exit_code = 2


class ImprintGroup(click.Group):
    """Turns the library's input errors into ``UserError``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (DataError, ValueError, FileNotFoundError, FileExistsError, CollectionLockedError,
                SchemaVersionError) as exc:
            raise UserError(" ".join(str(exc).split())) from exc


def emit(data: Any) -> None:
    """Print ``data`` as JSON (NaN as null, numpy scalars as numbers)."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple, np.ndarray)):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            v = v.item()
        return None if isinstance(v, float) and not np.isfinite(v) else v

    click.echo(json.dumps(clean(data), ensure_ascii=False, indent=2))


def quiet_option(fn):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(fn)


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)


def data_options(fn):
    for option in reversed([
        click.option("--text-column", help="Column holding the texts (default: text, sentence, utterance, query)."),
        click.option("--label-column", help="Column holding the labels (default: label, category, intent, class)."),
        click.option("--vector-column", help="Column holding precomputed vectors (lists of numbers)."),
        click.option("--split", help="NPZ files: read the arrays SPLIT_X and SPLIT_y."),
    ]):
        fn = option(fn)
    return fn


@functools.lru_cache(maxsize=None)
def embedder(model: str | None, quiet: bool):
    """One embedder per model for the whole command: a chunked index, calibrate or sweep embeds
    several batches, and loading the model is the slow part."""
    from retrieval_imprint.embed import Embedder, EmbeddingCache

    return Embedder(model, cache=EmbeddingCache.default(), progress=not quiet and sys.stderr.isatty())


def load(paths: tuple[str, ...], options: dict[str, Any], *, need_labels: bool = True) -> list[Dataset]:
    return [read(p, need_labels=need_labels, **options) for p in paths]


def vectors_of(datasets: list[Dataset], model: str | None, quiet: bool) -> np.ndarray:
    """All rows of the datasets as vectors: texts are embedded (cached), vectors taken as they are."""
    texts = [t for ds in datasets if ds.texts is not None for t in ds.texts]
    embedded = iter(embedder(model, quiet).encode(texts)) if texts else iter(())
    parts = [np.stack([next(embedded) for _ in ds.texts]) if ds.texts is not None else ds.vectors
             for ds in datasets]
    dims = {p.shape[1] for p in parts}
    if len(dims) > 1:
        raise DataError(f"the data files hold vectors of different dimensions: {sorted(dims)}")
    return np.concatenate(parts)


@click.group(cls=ImprintGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="imprint")
def main() -> None:
    """Few-shot classifiers imprinted from a frozen embedding model (IMPRINT, arXiv 2503.14572).

    \b
    imprint index intents/ train.csv     # embed, imprint, store
    imprint query intents/ "where is my card"
    imprint eval intents/ test.csv
    """


GEN_DEFAULTS = dict(generator="kmeans", k=20, pre_norm="l2", post_norm="l2", inf_norm="l2", aggregation="max",
                    m=1, metric="ip", vote="uniform", random_state=0)


@main.command()
@click.argument("collection", type=click.Path(file_okay=False, path_type=Path))
@click.argument("data", nargs=-1, required=True)
@click.option("--generator", type=click.Choice(list(GENERATORS)), help="GEN (new collections; default kmeans).")
@click.option("--k", type=int, help="Proxies per class; -1 keeps every sample (default 20).")
@click.option("--pre-norm", type=click.Choice(PRE_NORMS), help="NORMpre (default l2).")
@click.option("--post-norm", type=click.Choice(POST_NORMS), help="NORMpost (default l2).")
@click.option("--inf-norm", type=click.Choice(INF_NORMS), help="NORMinf (default l2).")
@click.option("--aggregation", type=click.Choice(["max", "mnn"]), help="AGG (default max).")
@click.option("--m", type=int, help="Neighbours that vote with --aggregation mnn (default 1).")
@click.option("--metric", type=click.Choice(METRICS), help="Similarity metric (default ip).")
@click.option("--vote", type=click.Choice(["uniform", "distance"]), help="m-NN vote weights (default uniform).")
@click.option("--random-state", type=int, help="Seed of the per-class draws (default 0).")
@click.option("--model", help="Embedding model name or path (new collections; default the packaged "
                              "all-MiniLM-L6-v2). Use 'none' for a collection of precomputed vectors.")
@click.option("--keep-samples/--no-keep-samples", default=True, show_default=True,
              help="Keep samples so a class can be re-imprinted when it gets more (new collections).")
@click.option("--index", "index_type",
              help="Proxy index (new collections; default Flat, exact): a FAISS IVF factory string such as "
                   "IVF4096,SQ8, or auto (chosen from --memory-budget).")
@click.option("--memory-budget", help="Bytes the proxies may take with --index auto, e.g. 8GB.")
@click.option("--nprobe", type=int, help="Inverted lists searched per query (IVF indexes); stored.")
@click.option("--chunk-size", type=int, default=20_000, show_default=True,
              help="Larger inputs are embedded and added chunk by chunk; an interrupted run resumes.")
@data_options
@quiet_option
@json_option
def index(collection: Path, data: tuple[str, ...], model: str | None, keep_samples: bool, index_type: str,
          memory_budget: str | None, nprobe: int | None, chunk_size: int, text_column, label_column, vector_column,
          split, quiet: bool, as_json: bool, **gen: Any) -> None:
    """Create COLLECTION or extend it with the labelled rows of DATA files.

    DATA: CSV/TSV, JSONL, Parquet (text and label columns, or a vector column) or NPZ (--split NAME
    reads NAME_X and NAME_y). Every file is read and checked before anything is written. Up to
    --chunk-size rows are embedded and added in one atomic write; larger inputs go chunk by chunk
    (cut between classes when the rows are grouped by label), each chunk atomic and recorded, so
    rerunning an interrupted command continues after the last committed chunk. GEN/NORM/AGG and
    index options apply when the collection is created; given for an existing one, they must match.

    \b
    Example:
        imprint index intents/ train.csv --generator kmeans --k 5
    """
    given = {key: value for key, value in gen.items() if value is not None}
    existing = Collection.open(collection) if (collection / "imprint.db").exists() else None
    if existing is not None:
        config = existing.config
        clash = [f"--{k.replace('_', '-')} {v} (collection: {config[k]})" for k, v in given.items() if config[k] != v]
        if model is not None and model != (existing.model or "none"):
            clash.append(f"--model {model} (collection: {existing.model or 'none'})")
        if index_type is not None and index_type != config["index_factory"]:
            clash.append(f"--index {index_type} (collection: {config['index_factory']})")
        if clash:
            raise UserError(f"{collection} already exists with other settings: {'; '.join(clash)}")
    datasets = load(data, dict(text_column=text_column, label_column=label_column, vector_column=vector_column,
                               split=split))
    recorded = existing.model if existing is not None else (None if model == "none" else model or "all-MiniLM-L6-v2")
    if any(ds.texts is not None for ds in datasets) and recorded is None:
        raise UserError(f"{collection} holds precomputed vectors (no model recorded); index vectors, not texts")
    col = existing

    def add(X: np.ndarray, labels: list[Any], checkpoint: tuple[str, int] | None = None) -> None:
        nonlocal col
        if col is None:  # created only once the first batch is embedded and valid
            col = Collection.create(collection, model=recorded, keep_samples=keep_samples, index=index_type or "Flat",
                                    memory_budget=memory_budget, search_params={"nprobe": nprobe} if nprobe else None,
                                    **{**GEN_DEFAULTS, **given})
        col.add(X, labels, checkpoint=checkpoint)

    total = sum(len(ds) for ds in datasets)
    before = set(map(str, existing.classes)) if existing is not None else set()
    resumed = 0
    if total <= chunk_size:  # one atomic write
        add(vectors_of(datasets, recorded, quiet), [label for ds in datasets for label in ds.labels])
    else:  # chunk by chunk, each chunk atomic and recorded, so an interrupted run resumes
        show = not quiet and sys.stderr.isatty()
        started = time.perf_counter()
        with tqdm(total=total, unit="row", desc="indexing", disable=not show) as bar:
            for ds in datasets:
                stat = Path(ds.source).stat()
                source = f"{Path(ds.source).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
                start = col.rows_done(source) if col is not None else 0
                resumed += start
                bar.update(start)
                for lo, hi in chunks(ds.labels, start, chunk_size):
                    part = Dataset(ds.source, ds.texts[lo:hi] if ds.texts is not None else None,
                                   ds.vectors[lo:hi] if ds.vectors is not None else None, ds.labels[lo:hi])
                    add(vectors_of([part], recorded, quiet=True), part.labels, (source, hi))
                    bar.update(hi - lo)
                    rate = (len(col) - len(before)) / max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(classes=len(col), classes_per_s=f"{rate:.0f}")
    retrained = col.outgrown  # IVF lists trained on the first chunk: retrain them on everything
    if retrained:
        col.compact()
    info = col.info()
    labels = {str(label) for ds in datasets for label in ds.labels}
    result = {"collection": str(collection), "rows": total - resumed, "resumed_after": resumed,
              "new_classes": len(labels - before), "classes": info["classes"], "proxies": info["proxies"],
              "retrained": retrained}
    if as_json:
        emit(result)
    else:
        click.echo(f"indexed {total - resumed} rows into {collection}"
                   + (f" (resumed after {resumed})" if resumed else "")
                   + f": {result['new_classes']} new classes; {info['classes']} classes, {info['proxies']} proxies in all"
                   + ("; IVF lists retrained on them" if retrained else ""))


def chunks(labels: list[Any], start: int, size: int):
    """Row ranges of about ``size`` from ``start``, cut where the label changes when possible, so that
    grouped data never splits a class."""
    lo, n = start, len(labels)
    while lo < n:
        hi = min(lo + size, n)
        if hi < n:
            cut = hi
            while cut > lo + 1 and labels[cut - 1] == labels[cut]:
                cut -= 1
            hi = cut if cut > lo + 1 else hi
        yield lo, hi
        lo = hi


@main.command()
@click.argument("collection", type=click.Path(file_okay=False, path_type=Path))
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
    options = dict(text_column=text_column, label_column=label_column, vector_column=vector_column, split=split)
    if vectors is not None:
        ds = read(vectors, need_labels=False, **options)
        names: list[Any] = list(range(len(ds)))
        Q = ds.vectors if ds.vectors is not None else vectors_of([ds], col.model, quiet)
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
        names, Q = queries, vectors_of([Dataset("args", texts=queries)], col.model, quiet)
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
@click.argument("collection", type=click.Path(file_okay=False, path_type=Path))
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
    X = vectors_of([ds], col.model, quiet)
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
@click.argument("data")
@click.option("--model", help="Embedding model for text data (default the packaged all-MiniLM-L6-v2).")
@click.option("--paper-compatible", is_flag=True, help="Centre on mu_c - mu_G as the paper's code does.")
@click.option("--classes", "n_show", type=int, default=5, show_default=True,
              help="Most and least spread classes to list.")
@data_options
@quiet_option
@json_option
def diagnose(data: str, model: str | None, paper_compatible: bool, n_show: int, text_column, label_column,
             vector_column, split, quiet: bool, as_json: bool) -> None:
    """Neural collapse (NC1) of labelled DATA and the k it suggests for kmeans proxies.

    \b
    Example:
        imprint diagnose train.csv
    """
    from retrieval_imprint.collapse import neural_collapse

    ds = read(data, text_column=text_column, label_column=label_column, vector_column=vector_column, split=split)
    X = vectors_of([ds], model, quiet)
    labels = np.array([str(v) for v in ds.labels])  # type: ignore[union-attr]
    report = neural_collapse(X, labels, paper_compatible=paper_compatible)
    per_class = sorted(({"label": c, "nc1": float(v), "spread": float(s), "samples": int(n)} for c, v, s, n in
                        zip(report.classes, report.per_class_nc1, report.per_class_spread, report.class_sizes)),
                       key=lambda r: -r["nc1"])
    if as_json:
        emit({"nc1": report.nc1, "paper_compatible": paper_compatible, "classes": len(report.classes),
              "recommended_k": report.recommended_k, "reason": report.reason, "per_class": per_class})
        return
    click.echo(f"NC1 {report.nc1:.4f} ({'paper-compatible' if paper_compatible else 'correct'} formula, "
               f"{len(report.classes)} classes, median {int(np.median(report.class_sizes))} samples per class)")
    click.echo(f"recommended k: {report.recommended_k} ({report.reason})")
    shown = per_class[:n_show] + per_class[-n_show:] if len(per_class) > 2 * n_show else per_class
    width = max(len(r["label"]) for r in shown)
    click.echo(f"\n{'class':<{width}}  NC1 share  spread  samples")
    for r in shown:
        click.echo(f"{r['label']:<{width}}  {r['nc1']:9.4f}  {r['spread']:6.3f}  {r['samples']:7d}")


@main.command()
@click.argument("collection", type=click.Path(file_okay=False, path_type=Path))
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
    options = dict(text_column=text_column, label_column=label_column, vector_column=vector_column)
    ds = read(data, split=split, **options)
    X = vectors_of([ds], col.model, quiet)
    X_oos = vectors_of([read(oos, split=oos_split, need_labels=False, **options)], col.model, quiet) if oos else None
    result = col.calibrate(X, ds.labels, X_oos, target_accuracy=target_accuracy)  # type: ignore[arg-type]
    if as_json:
        emit(result.__dict__)
        return
    click.echo(f"threshold {result.threshold:.4f} ({result.criterion})")
    click.echo(f"in-scope accuracy {result.in_scope_accuracy:.4f}"
               + (f", out-of-scope recall {result.oos_recall:.4f}" if result.oos_recall is not None else ""))


@main.command()
@click.argument("collection", type=click.Path(file_okay=False, path_type=Path))
@json_option
def info(collection: Path, as_json: bool) -> None:
    """Settings, sizes and files of COLLECTION.

    \b
    Example:
        imprint info intents/
    """
    data = Collection.open(collection).info()
    if as_json:
        emit(data)
        return
    for key, value in data.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {v}")
        else:
            click.echo(f"{key}: {', '.join(value) if isinstance(value, list) else value}")


@main.command()
@click.argument("collection", type=click.Path(file_okay=False, path_type=Path))
@json_option
def classes(collection: Path, as_json: bool) -> None:
    """The classes of COLLECTION with their sample and proxy counts.

    \b
    Example:
        imprint classes intents/
    """
    rows = Collection.open(collection).class_table()
    if as_json:
        emit(rows)
        return
    width = max([len(str(r["label"])) for r in rows] + [5])
    click.echo(f"{'class':<{width}}  samples  proxies")
    for r in rows:
        click.echo(f"{str(r['label']):<{width}}  {r['samples']:7d}  {r['proxies']:7d}")


@main.command()
@click.argument("collection", type=click.Path(file_okay=False, path_type=Path))
@click.argument("labels", nargs=-1, required=True)
def remove(collection: Path, labels: tuple[str, ...]) -> None:
    """Remove the classes LABELS from COLLECTION (all or nothing).

    \b
    Example:
        imprint remove intents/ lost_card order_food
    """
    col = Collection.open(collection)
    by_text = {str(c): c for c in col.classes}
    col.remove([by_text.get(label, label) for label in labels])
    click.echo(f"removed {len(set(labels))} classes; {len(col)} remain")


@main.command()
@click.argument("collection", type=click.Path(file_okay=False, path_type=Path))
@click.option("--retrain/--no-retrain", default=None,
              help="Retrain an IVF index's lists on the live proxies now (--retrain) or never "
                   "(--no-retrain). Default: when the proxies have grown 4x past those it was trained on.")
def compact(collection: Path, retrain: bool | None) -> None:
    """Rewrite COLLECTION's live vectors into one file per kind, dropping removed ones.

    \b
    Example:
        imprint compact intents/
    """
    col = Collection.open(collection)
    before = col.info()["segments"]
    after = col.compact(retrain=retrain).info()["segments"]
    retrained = {f for f in before if f.startswith("template")} != {f for f in after if f.startswith("template")}
    click.echo(f"{len(before)} files -> {len(after)}" + ("; IVF lists retrained" if retrained else ""))


@main.command()
@click.argument("collection", type=click.Path(file_okay=False, path_type=Path))
def check(collection: Path) -> None:
    """Verify that COLLECTION's database and index files agree (exit 1 if not).

    \b
    Example:
        imprint check intents/
    """
    report = Collection.open(collection).check()
    if report.ok:
        click.echo(f"ok: {collection}")
        return
    for problem in report.problems:
        click.echo(problem, err=True)
    sys.exit(1)


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command()
@click.argument("collection", type=click.Path(file_okay=False, path_type=Path))
def upgrade(collection: Path) -> None:
    """Migrate COLLECTION's database to this version's schema.

    \b
    Example:
        imprint db upgrade intents/
    """
    from retrieval_imprint import store

    engine = store.connect(collection / "imprint.db") if (collection / "imprint.db").is_file() else None
    if engine is None:
        raise UserError(f"{collection} is not a collection (no imprint.db in it)")
    with engine.connect() as conn:
        before, head, known = store.schema_revision(conn)
    if not known:
        raise UserError(f"{collection} has schema revision {before}, newer than this retrieval-imprint knows")
    Collection.open(collection, upgrade=True)
    click.echo(f"{collection}: schema {before} -> {head}" if before != head else f"{collection}: already at {head}")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None


@main.command()
@click.argument("train")
@click.argument("test")
@click.option("--generator", "generators", default="mean,kmeans", show_default=True, help="Generators, comma-separated.")
@click.option("--k", "ks", default="1,5,10,20", show_default=True, help="k values for generators that use k.")
@click.option("--aggregation", "aggregations", default="max", show_default=True, help="max and/or mnn.")
@click.option("--m", "ms", default="1", show_default=True, help="m values for mnn.")
@click.option("--shots", default="1,5,10,0", show_default=True, help="Samples per class; 0 = all.")
@click.option("--seeds", type=int, default=3, show_default=True, help="Seeds per setting (subset and GEN).")
@click.option("--model", help="Embedding model for text data (default the packaged all-MiniLM-L6-v2).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw accuracy vs k per shots setting to a PNG.")
@data_options
@quiet_option
@json_option
def sweep(train: str, test: str, generators: str, ks: str, aggregations: str, ms: str, shots: str, seeds: int,
          model: str | None, plot: str | None, text_column, label_column, vector_column, split, quiet: bool,
          as_json: bool) -> None:
    """Accuracy on TEST of a grid of settings imprinted from TRAIN (mean and std over seeds).

    \b
    Example:
        imprint sweep train.csv test.csv --generator mean,kmeans --k 1,5,20 --shots 5,0 --plot k.png
    """
    from retrieval_imprint.evaluate import sweep as run_sweep

    gens = [g.strip() for g in generators.split(",") if g.strip()]
    aggs = [a.strip() for a in aggregations.split(",") if a.strip()]
    for g in gens:
        if g not in GENERATORS:
            raise UserError(f"--generator {g!r} is not valid; expected one of {', '.join(GENERATORS)}")
    for a in aggs:
        if a not in ("max", "mnn"):
            raise UserError(f"--aggregation {a!r} is not valid; expected max or mnn")
    options = dict(text_column=text_column, label_column=label_column, vector_column=vector_column, split=split)
    train_ds, test_ds = read(train, **options), read(test, **options)
    X_train, X_test = vectors_of([train_ds], model, quiet), vectors_of([test_ds], model, quiet)
    y_train = np.array([str(v) for v in train_ds.labels])  # type: ignore[union-attr]
    y_test = np.array([str(v) for v in test_ds.labels])  # type: ignore[union-attr]
    configs = []
    for g in gens:
        for k in (_int_list(ks) if g not in ("mean", "ls", "all") else [1 if g != "all" else -1]):
            for a in aggs:
                for m in (_int_list(ms) if a == "mnn" else [1]):
                    configs.append(dict(generator=g, k=k, aggregation=a, m=m))
    rows = run_sweep(X_train, y_train, X_test, y_test, configs, _int_list(shots), list(range(seeds)))
    if plot:
        _plot(rows, plot)
    if as_json:
        emit(rows)
        return
    click.echo(f"{'shots':>5}  {'generator':<9} {'k':>3}  {'agg':<3} {'m':>2}  accuracy   std  fit s")
    for r in rows:
        click.echo(f"{r['shots'] or 'all':>5}  {r['generator']:<9} {r['k']:>3}  {r['aggregation']:<3} {r['m']:>2}  "
                   f"{r['accuracy']:8.4f}  {r['accuracy_std']:.4f}  {r['fit_seconds']:.3f}")


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'retrieval-imprint[plot]'") from None
    from retrieval_imprint.evaluate import plot_accuracy_vs_k

    fig, ax = plt.subplots(figsize=(6, 4))
    plot_accuracy_vs_k(rows, ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

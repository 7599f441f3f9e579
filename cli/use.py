"""Commands that build and use a collection: index, query, eval, calibrate."""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from retrieval_imprint.params import COLLECTION, DEFAULT_CHUNK, IMPRINT, PRESETS, STORED

if TYPE_CHECKING:  # numpy and the readers are imported by the commands that use them
    pass

from .app import (
    UserError,
    collection_argument,
    collection_vectors,
    data_options,
    describe,
    emit,
    engine_options,
    id_option,
    json_option,
    lock_timeout,
    main,
    open_collection,
    output,
    plain,
    pyplot,
    quiet_option,
    ray_connect,
    read_options,
    setting_options,
    show_progress,
)


@main.command()
@collection_argument
@click.argument("data", nargs=-1, required=True)
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    help="Start from a published method's settings (options given beside it win).",
)
@setting_options([IMPRINT[name] for name in STORED], " (new collections)")
@setting_options(
    [COLLECTION[name] for name in ("model", "index", "memory_budget", "keep_samples")], " (new collections)"
)
@click.option("--nprobe", type=int, help="Inverted lists searched per query (IVF indexes); stored.")
@click.option(
    "--shards",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="A new collection of more than one shard is sharded by label hash: S ordinary collections answering as one.",
)
@click.option(
    "--chunk-size",
    type=int,
    default=DEFAULT_CHUNK,
    show_default=True,
    help="Larger inputs are embedded and added chunk by chunk; an interrupted run resumes.",
)
@click.option(
    "--again", is_flag=True, help="Add DATA even where the same rows were indexed before (they are skipped otherwise)."
)
@click.option(
    "--upsert",
    is_flag=True,
    help="Classes of DATA that exist get DATA's samples instead of adding to theirs; new ones are added.",
)
@click.option(
    "--vectors-model",
    help="The model that made DATA's vectors, where the file does not say (vectors "
    "for a collection of another model's embeddings are refused).",
)
@data_options
@id_option
@engine_options
@quiet_option
@json_option
def index(
    collection: Path,
    data: tuple[str, ...],
    preset: str | None,
    nprobe: int | None,
    shards: int,
    chunk_size: int,
    again: bool,
    upsert: bool,
    vectors_model: str | None,
    text_column,
    label_column,
    vector_column,
    id_column,
    split,
    engine: str,
    ray_address: str | None,
    quiet: bool,
    as_json: bool,
    **given: Any,
) -> None:
    """Create COLLECTION or extend it with the labelled rows of DATA files.

    DATA: CSV/TSV, JSONL, Parquet (text and label columns, or a vector column) or NPZ (--split NAME
    reads NAME_X and NAME_y). Every file is read and checked before anything is written. Up to
    --chunk-size rows are embedded and added in one atomic write; larger inputs go chunk by chunk
    (cut between classes when the rows are grouped by label), each chunk atomic and recorded, so
    rerunning an interrupted command continues after the last committed chunk, and a file whose rows
    were all indexed before (under any name) is skipped. Settings apply when the collection is
    created; given for an existing one, they must match.

    With --engine ray, Ray Data reads Parquet DATA in parallel and the shards' writers imprint
    label buckets side by side (docs/distributed.md); a rerun skips the rows that are in already.

    \b
    Example:
        imprint index intents/ train.csv --generator kmeans --k 5
    """
    from retrieval_imprint.ingestion import ingest
    from retrieval_imprint.readers import read

    settings = {name: value for name, value in given.items() if value is not None}
    if settings.get("model") == "none":
        settings["model"] = None
    if nprobe is not None:
        settings["search_params"] = {"nprobe": nprobe}
    if engine == "ray":
        _index_on_ray(
            collection,
            data,
            preset,
            shards,
            chunk_size,
            dict(
                text_column=text_column,
                label_column=label_column,
                vector_column=vector_column,
                id_column=id_column,
                vectors_model=vectors_model,
            ),
            settings,
            ray_address,
            as_json,
            unsupported={"--again": again, "--upsert": upsert, "--split": split},
        )
        return
    datasets = [read(p, **read_options(text_column, label_column, vector_column, split, id_column)) for p in data]
    report = ingest(
        collection,
        datasets,
        chunk_size=chunk_size,
        progress=show_progress(quiet),
        again=again,
        upsert=upsert,
        vectors_model=vectors_model,
        preset=preset,
        lock_timeout=lock_timeout(),
        shards=shards,
        **settings,
    )
    if as_json:
        emit(report.as_dict())
        return
    for source in report.skipped:
        click.echo(f"skipped {source}: its rows are in {collection} already (--again adds them again)", err=True)
    _say_indexed(
        report,
        f"indexed {report.rows} rows into {collection}"
        + (f" (resumed after {report.resumed_after})" if report.resumed_after else "")
        + f": {report.new_classes} new classes",
    )


def _say_indexed(report: Any, what: str) -> None:
    """The summary line of an ingestion, and what auto chose if it chose now."""
    click.echo(
        f"{what}; {report.classes} classes, {report.proxies} proxies in all"
        + ("; IVF lists retrained on them" if report.retrained else "")
    )
    if report.created and report.auto_choice and report.auto_choice["cv_results"]:
        click.echo(f"auto chose {describe(report.auto_choice)}")


def _index_on_ray(
    collection: Path,
    data: tuple[str, ...],
    preset: str | None,
    shards: int,
    chunk_size: int,
    columns: dict[str, Any],
    settings: dict[str, Any],
    address: str | None,
    as_json: bool,
    unsupported: dict[str, Any],
) -> None:
    """``imprint index --engine ray``: ``distributed.build``."""
    given = [name for name, value in unsupported.items() if value]
    if given:
        raise UserError(f"{', '.join(given)} cannot be used with --engine ray")
    # Ray's driver prints its raylet's warnings (e.g. "N PYTHON worker processes have been started") to
    # stdout from a thread of its own: they go to stderr while Ray works, so --json stays JSON
    with contextlib.redirect_stdout(sys.stderr):
        ray_connect(address)
        from retrieval_imprint.distributed import build

        report = build(
            collection,
            data,
            shards=shards,
            chunk_size=chunk_size,
            preset=preset,
            lock_timeout=lock_timeout() or 3600.0,
            **columns,
            **settings,
        )
    if as_json:
        emit(report.as_dict())
        return
    _say_indexed(
        report,
        f"indexed {report.rows} rows into {collection} on Ray ({report.parts} parts"
        + (f", {report.parts_skipped} in already" if report.parts_skipped else "")
        + ")",
    )


@main.command()
@collection_argument
@click.argument("text", nargs=-1)
@click.option(
    "--file",
    "file_",
    help="Queries from a file: one per line, or a CSV/JSONL/Parquet text column. "
    "'-' (or /dev/stdin): read lines as they come and answer each as a JSON line.",
)
@click.option("--vectors", help="Query vectors from an .npy or .npz file (--split for NPZ).")
@click.option("--top", type=int, default=1, show_default=True, help="Classes to show per query.")
@click.option(
    "--threshold",
    type=float,
    help="A class whose rejection score is below this is 'no class' (default: "
    "the stored threshold, a class's own first; see imprint calibrate).",
)
@click.option("--nprobe", type=int, help="Inverted lists to search (IVF indexes; default: stored).")
@click.option(
    "--explain",
    type=int,
    default=0,
    metavar="N",
    help="Show the N training examples of each answer's class nearest to the query.",
)
@data_options
@quiet_option
@json_option
def query(
    collection: Path,
    text: tuple[str, ...],
    file_: str | None,
    vectors: str | None,
    top: int,
    threshold: float | None,
    nprobe: int | None,
    explain: int,
    text_column,
    label_column,
    vector_column,
    split,
    quiet: bool,
    as_json: bool,
) -> None:
    """Classify TEXT arguments (or --file, or --vectors) against COLLECTION.

    With --file - the model is loaded once and each line read from standard input is answered
    with one JSON line as soon as it arrives (lines that arrive together are embedded together).

    \b
    Example:
        imprint query intents/ "where is my card" "play some jazz" --top 3
        tail -f questions.txt | imprint query intents/ --file -
    """
    from retrieval_imprint.readers import FORMATS, Dataset, read

    col = open_collection(collection)
    options = read_options(text_column, label_column, vector_column, split)
    search = {"nprobe": nprobe} if nprobe else None
    if file_ in ("-", "/dev/stdin"):
        if text or vectors:
            raise UserError("--file - reads every query from standard input: give no TEXT or --vectors beside it")
        _need_model(col, collection)
        for batch in _line_batches(sys.stdin):
            Q = collection_vectors(col, [Dataset("stdin", texts=batch)], quiet=True)
            for row in col.query(Q, top, threshold=threshold, search_params=search).records(batch):
                click.echo(json.dumps(plain(row), ensure_ascii=False))
            sys.stdout.flush()
        return
    if vectors is not None:
        ds = read(vectors, need_labels=False, **options)
        names: list[Any] = list(range(len(ds)))
        Q = ds.vectors if ds.vectors is not None else collection_vectors(col, [ds], quiet)
    else:
        queries = list(text)
        if file_ is not None:
            if Path(file_).suffix.lower() in FORMATS:
                queries += read(file_, need_labels=False, **options).texts or []
            else:
                if not Path(file_).is_file():
                    raise UserError(f"{file_}: no such file")
                queries += [
                    line.strip() for line in Path(file_).read_text(encoding="utf-8").splitlines() if line.strip()
                ]
        if not queries:
            raise UserError("nothing to query: give TEXT arguments, --file or --vectors")
        _need_model(col, collection)
        names, Q = queries, collection_vectors(col, [Dataset("args", texts=queries)], quiet)
    rows = col.query(Q, top, threshold=threshold, search_params=search).records(names)
    if explain:
        for row, evidence in zip(rows, col.explain(Q, explain, threshold=threshold)):
            row["examples"] = evidence
    if as_json:
        emit(rows)
        return
    for row in rows:
        click.echo(str(row["query"]))
        if row["labels"][0] is None:
            click.echo(
                "  (no class"
                + (
                    f": {row['candidates'][0]} scored {row['rejection_scores'][0]:.4f} < threshold "
                    f"{row['thresholds'][0]:.4f})"
                    if row["rejected"][0]
                    else ")"
                )
            )
        for rank, (label, score) in enumerate(zip(row["labels"], row["scores"])):
            if label is not None:
                click.echo(f"  {score:7.4f}  {label}")
            for ex in row.get("examples", []) if rank == 0 else []:  # the examples behind the answer, under it
                click.echo(
                    f"      {ex['score']:7.4f}  {ex['text'] if ex['text'] is not None else '(vector)'}"
                    + (f"  [{ex['ref']}]" if ex["ref"] is not None else "")
                )


def _need_model(col: Any, collection: Path) -> None:
    if col.model is None:
        raise UserError(f"{collection} records no embedding model: query it with --vectors")


def _line_batches(stream: IO[str], most: int = 256) -> Iterator[list[str]]:
    """Non-empty lines of ``stream`` in batches: each batch is the first line to arrive plus those
    already waiting behind it, so a piped file is embedded in bulk and a typed line answered at once.
    A reader thread does the blocking reads."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            if line.strip():
                lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    while (line := lines.get()) is not None:
        batch = [line]
        while len(batch) < most:
            try:
                waiting = lines.get_nowait()
            except queue.Empty:
                break
            if waiting is None:
                yield batch
                return
            batch.append(waiting)
        yield batch


@main.command("eval")
@collection_argument
@click.argument("data")
@click.option("--threshold", type=float, help="Rejection-score threshold for 'no class' (default: stored).")
@click.option(
    "--oos-label",
    help="Rows with this label belong to no class: report in-scope accuracy, out-of-scope recall and AUROC.",
)
@click.option("--confusions", type=int, default=10, show_default=True, help="Confusion pairs to list.")
@data_options
@quiet_option
@json_option
def evaluate_cmd(
    collection: Path,
    data: str,
    threshold: float | None,
    oos_label: str | None,
    confusions: int,
    text_column,
    label_column,
    vector_column,
    split,
    quiet: bool,
    as_json: bool,
) -> None:
    """Accuracy and macro-F1 of COLLECTION on the labelled rows of DATA.

    \b
    Example:
        imprint eval intents/ test.csv --json
    """
    import numpy as np

    from retrieval_imprint.evaluate import evaluate, open_set
    from retrieval_imprint.readers import read

    col = open_collection(collection)
    ds = read(data, **read_options(text_column, label_column, vector_column, split))
    if ds.texts is not None and col.model is None:
        raise UserError(f"{collection} records no embedding model: evaluate it on vectors")
    found = col.query(collection_vectors(col, [ds], quiet), 1, threshold=threshold)
    oos = np.array([str(label) == oos_label for label in ds.labels]) if oos_label else np.zeros(len(ds), bool)
    if oos.all():
        raise UserError(f"every row of {data} has the out-of-scope label {oos_label!r}: nothing in scope to score")
    labels = [label for label, out in zip(ds.labels, oos) if not out]  # type: ignore[union-attr]
    result = evaluate(labels, found.labels[~oos, 0].tolist(), max_confusions=confusions)
    limit = found.thresholds[:, 0]
    used = {
        "threshold": None if np.isnan(limit).all() else float(np.nanmedian(limit)),
        "rule": col.config["rejection"],
        "source": "given" if threshold is not None else "stored",
    }
    extra = {
        "threshold_used": used,
        **({"open_set": {"in_scope_accuracy": result.accuracy, **open_set(found, oos)}} if oos.any() else {}),
    }
    if as_json:
        emit({**result.as_dict(), **extra})
        return
    click.echo(
        f"threshold {'none' if used['threshold'] is None else format(used['threshold'], '.4f')} "
        f"({used['source']}, rule {used['rule']})"
    )
    if oos.any():
        o = extra["open_set"]
        click.echo(
            f"open set  in-scope accuracy {o['in_scope_accuracy']:.4f}, out-of-scope recall "
            f"{o['oos_recall']:.4f} ({o['oos']} rows), AUROC {o['auroc']:.4f}"
        )
    click.echo(f"accuracy  {result.accuracy:.4f}  ({round(result.accuracy * result.n)}/{result.n})")
    click.echo(f"macro-F1  {result.macro_f1:.4f}  ({len(result.per_class)} classes)")
    width = max(len(str(r["label"])) for r in result.per_class)
    click.echo(f"\n{'class':<{width}}  precision  recall     f1  support")
    for r in result.per_class:
        click.echo(
            f"{r['label']!s:<{width}}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['f1']:5.3f}  {r['support']:7d}"
        )
    if result.confusions:
        click.echo("\nmost confused (true -> predicted: count)")
        for c in result.confusions:
            click.echo(
                f"  {c['true']} -> {c['predicted'] if c['predicted'] is not None else '(no class)'}: {c['count']}"
            )


@main.command()
@collection_argument
@click.argument("data", required=False)
@click.option("--oos", help="Out-of-scope queries (no labels needed), to trade against in-scope accuracy.")
@click.option("--oos-split", help="NPZ split of the --oos file.")
@click.option(
    "--target-accuracy",
    type=float,
    help="Keep in-scope accuracy at least this (rejections count as errors); reject as much as that allows.",
)
@click.option(
    "--target-oos-recall",
    type=float,
    help="Reject at least this share of --oos queries; keep as much in-scope accuracy as that allows.",
)
@click.option(
    "--margin",
    type=float,
    default=1.0,
    show_default=True,
    help="Standard errors a target must be cleared by on DATA, so that it holds on new queries more often "
    "than not (0: just reach it).",
)
@click.option(
    "--target-false-rejection",
    type=float,
    help="No DATA: reject this share of the collection's own samples, each scored left out of its class.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Draw in-scope accuracy against out-of-scope recall per rule to a PNG.",
)
@data_options
@quiet_option
@json_option
def calibrate(
    collection: Path,
    data: str | None,
    oos: str | None,
    oos_split: str | None,
    target_accuracy: float | None,
    target_oos_recall: float | None,
    margin: float,
    target_false_rejection: float | None,
    plot: str | None,
    text_column,
    label_column,
    vector_column,
    split,
    quiet: bool,
    as_json: bool,
) -> None:
    """Choose and store COLLECTION's open-set rejection rule and threshold.

    From labelled validation DATA and out-of-scope queries (--oos): for --target-accuracy,
    --target-oos-recall, or else the balanced point; each rule (max, shift) is weighed and the
    better kept. Without out-of-scope queries: --target-accuracy on DATA, or, with no DATA at all,
    --target-false-rejection from the collection's own samples. Queries scoring below the
    threshold then get no class. A target no threshold reaches exits 2 and changes nothing.

    \b
    Example:
        imprint calibrate intents/ val.csv --oos out_of_scope.csv --target-accuracy 0.9
        imprint calibrate intents/ --target-false-rejection 0.05
    """
    from retrieval_imprint.readers import read

    col = open_collection(collection)
    if data is None:
        if target_false_rejection is None:
            raise UserError(
                "give labelled validation DATA, or --target-false-rejection to calibrate from the "
                "collection's own samples"
            )
        result = col.calibrate(target_false_rejection=target_false_rejection)
    else:
        options = read_options(text_column, label_column, vector_column, split)
        ds = read(data, **options)
        X = collection_vectors(col, [ds], quiet)
        X_oos = (
            collection_vectors(col, [read(oos, need_labels=False, **{**options, "split": oos_split})], quiet)
            if oos
            else None
        )
        result = col.calibrate(
            X,
            ds.labels,
            X_oos,
            target_accuracy=target_accuracy,  # type: ignore[arg-type]
            target_oos_recall=target_oos_recall,
            margin=margin,
        )
    if plot:
        _plot_tradeoff(result.curve, plot)
    if as_json:
        emit(result.as_dict())
        return
    click.echo(f"rule {result.rule}, threshold {result.threshold:.4f} ({result.criterion})")
    if result.in_scope_accuracy is not None:
        click.echo(
            f"in-scope accuracy {result.in_scope_accuracy:.4f}"
            + (f", out-of-scope recall {result.oos_recall:.4f}" if result.oos_recall is not None else "")
        )
    if result.auroc:
        click.echo("AUROC " + ", ".join(f"{rule} {value:.4f}" for rule, value in result.auroc.items()))


def _plot_tradeoff(curves: dict, path: str) -> None:
    if not curves or "oos_recall" not in next(iter(curves.values()))[0]:
        raise UserError("--plot draws the trade-off against out-of-scope queries: give --oos")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for rule, points in curves.items():
        ax.plot([100 * p["oos_recall"] for p in points], [100 * p["in_scope_accuracy"] for p in points], label=rule)
    ax.set_xlabel("out-of-scope recall (%)")
    ax.set_ylabel("in-scope accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@main.command()
@collection_argument
@click.argument("value")
@click.option("--label", help="Set the threshold of this class only ('none' goes back to the collection's).")
@json_option
def threshold(collection: Path, value: str, label: str | None, as_json: bool) -> None:
    """Set COLLECTION's rejection threshold to VALUE (a number, or none: never reject).

    \b
    Example:
        imprint threshold intents/ 0.05
        imprint threshold intents/ 0.2 --label lost_card
    """
    try:
        number = None if value.lower() == "none" else float(value)
    except ValueError:
        raise UserError(f"threshold {value!r} is not a number or none") from None
    col = open_collection(collection)
    target = None if label is None else {str(c): c for c in col.classes}.get(label, label)
    col.set_threshold(number, label=target)
    output(
        {"threshold": number, "label": target},
        as_json,
        lambda d: click.echo(f"threshold {'of ' + repr(target) + ' ' if label else ''}set to {value}"),
    )

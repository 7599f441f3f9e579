"""Commands that build and use a collection: index, query (eval, calibrate, threshold: evaluation.py)."""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from retrieval_imprint.params import COLLECTION, DEFAULT_CHUNK, IMPRINT, PRESETS, STORED

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
    plain,
    quiet_option,
    ray_connect,
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
    reading: dict[str, Any],
    id_column: str | None,
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
    were all indexed before (under any name) is skipped. A new IVF collection filled chunk by chunk
    first trains its lists on whole classes sampled across every file (up to --chunk-size rows).
    Settings apply when the collection is created; given for an existing one, they must match.

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
            {
                **{k: v for k, v in reading.items() if k != "split"},
                "id_column": id_column,
                "vectors_model": vectors_model,
            },
            settings,
            ray_address,
            as_json,
            unsupported={"--again": again, "--upsert": upsert, "--split": reading["split"]},
        )
        return
    datasets = [read(p, **reading, id_column=id_column) for p in data]
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
    reading: dict[str, Any],
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
    options = reading
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

"""Commands that study labelled data before (or instead of) indexing it: diagnose, sweep."""

from __future__ import annotations

from typing import Any

import click

from retrieval_imprint.params import AGGREGATIONS, DEFAULT_MODEL, GENERATOR_KINDS

from .app import UserError, data_options, describe, emit, json_option, main, pyplot, query_vectors, quiet_option


@main.command()
@click.argument("data")
@click.option("--model", help="Embedding model for text data (default the packaged all-MiniLM-L6-v2).")
@click.option("--paper-compatible", is_flag=True, help="Centre on mu_c - mu_G as the paper's code does.")
@click.option(
    "--classes",
    "n_show",
    type=int,
    default=5,
    show_default=True,
    help="Best candidates, and most and least spread classes, to list.",
)
@data_options
@quiet_option
@json_option
def diagnose(
    data: str,
    model: str | None,
    paper_compatible: bool,
    n_show: int,
    reading: dict[str, Any],
    quiet: bool,
    as_json: bool,
) -> None:
    """What the library's automatic choice (auto) picks for labelled DATA, with the held-out
    accuracy behind it, and the data's neural collapse (NC1) per class.

    The choice is the estimator's (`ImprintClassifier()`): each candidate (k, max or blend) scored by
    cross-validation on DATA, and on data of up to 25,000 rows the ls head on 4,000 random features
    scored by its leave-one-out accuracy. `imprint index` makes the same choice among the
    imprinted heads; a collection has the ls head only when asked (`--generator ls --features N`),
    so where it wins the line says so. NC1 measures how tight the classes are; the paper's rule of thumb
    for k from it is shown for reference only, since on few-shot text it picks a k that the
    cross-validation measures as worse.

    \b
    Example:
        imprint diagnose train.csv
    """
    import numpy as np

    from retrieval_imprint.classifier import ImprintClassifier
    from retrieval_imprint.collapse import neural_collapse
    from retrieval_imprint.readers import read

    ds = read(data, **reading)
    X = query_vectors([ds], model or DEFAULT_MODEL, quiet)
    labels = np.array([str(v) for v in ds.labels])  # type: ignore[union-attr]
    report = neural_collapse(X, labels, paper_compatible=paper_compatible)
    auto = ImprintClassifier().fit(X, labels)
    choice = {**auto.auto_choice_, "cv_results": auto.cv_results_}
    ranked = sorted((r for r in auto.cv_results_ if r["accuracy"] is not None), key=lambda r: -r["accuracy"])
    per_class = sorted(
        (
            {"label": c, "nc1": float(v), "spread": float(s), "samples": int(n)}
            for c, v, s, n in zip(report.classes, report.per_class_nc1, report.per_class_spread, report.class_sizes)
        ),
        key=lambda r: -r["nc1"],
    )
    if as_json:
        emit(
            {
                "auto_choice": choice,
                "nc1": report.nc1,
                "paper_compatible": paper_compatible,
                "classes": len(report.classes),
                "paper_rule": {"k": report.recommended_k, "reason": report.reason},
                "per_class": per_class,
            }
        )
        return
    click.echo(f"auto chooses {describe(choice)}")
    if choice["generator"] == "ls":
        click.echo(
            f"  (`imprint index` chooses among the imprinted heads below; for this one: --generator ls "
            f"--features {auto.feature_map_.shape[1]})"
        )
    for r in ranked[:n_show]:
        click.echo(f"  {r['accuracy']:.4f}  {describe({**r, 'cv_results': []}, cv=False)}")
    click.echo(
        f"\nNC1 {report.nc1:.4f} ({'paper-compatible' if paper_compatible else 'correct'} formula, "
        f"{len(report.classes)} classes, median {int(np.median(report.class_sizes))} samples per class); "
        f"the paper's rule of thumb: k = {report.recommended_k} ({report.reason})"
    )
    shown = per_class[:n_show] + per_class[-n_show:] if len(per_class) > 2 * n_show else per_class
    width = max(len(r["label"]) for r in shown)
    click.echo(f"\n{'class':<{width}}  NC1 share  spread  samples")
    for r in shown:
        click.echo(f"{r['label']:<{width}}  {r['nc1']:9.4f}  {r['spread']:6.3f}  {r['samples']:7d}")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None


@main.command()
@click.argument("train")
@click.argument("test")
@click.option(
    "--generator", "generators", default="mean,kmeans", show_default=True, help="Generators, comma-separated."
)
@click.option("--k", "ks", default="1,5,10,20", show_default=True, help="k values for generators that use k.")
@click.option("--aggregation", "aggregations", default="max", show_default=True, help="max and/or mnn.")
@click.option("--m", "ms", default="1", show_default=True, help="m values for mnn.")
@click.option(
    "--features",
    "widths",
    default="0",
    show_default=True,
    help="Widths of random ReLU features the embeddings are mapped to first (0: none); e.g. 0,2000 with "
    "--generator ls.",
)
@click.option("--shots", default="1,5,10,0", show_default=True, help="Samples per class; 0 = all.")
@click.option("--seeds", type=int, default=3, show_default=True, help="Seeds per setting (subset and GEN).")
@click.option("--model", help="Embedding model for text data (default the packaged all-MiniLM-L6-v2).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw accuracy vs k per shots setting to a PNG.")
@data_options
@quiet_option
@json_option
def sweep(
    train: str,
    test: str,
    generators: str,
    ks: str,
    aggregations: str,
    ms: str,
    widths: str,
    shots: str,
    seeds: int,
    model: str | None,
    plot: str | None,
    reading: dict[str, Any],
    quiet: bool,
    as_json: bool,
) -> None:
    """Accuracy on TEST of a grid of settings imprinted from TRAIN (mean and std over seeds).

    \b
    Example:
        imprint sweep train.csv test.csv --generator mean,kmeans --k 1,5,20 --shots 5,0 --plot k.png
        imprint sweep train.csv test.csv --generator ls --features 0,2000 --shots 0
    """
    import numpy as np

    from retrieval_imprint.experiments import sweep as run_sweep
    from retrieval_imprint.readers import read

    gens = [g.strip() for g in generators.split(",") if g.strip()]
    aggs = [a.strip() for a in aggregations.split(",") if a.strip()]
    for g in gens:
        if g not in GENERATOR_KINDS:
            raise UserError(f"--generator {g!r} is not valid; expected one of {', '.join(GENERATOR_KINDS)}")
    for a in aggs:
        if a not in AGGREGATIONS:
            raise UserError(f"--aggregation {a!r} is not valid; expected one of {', '.join(AGGREGATIONS)}")
    options = reading
    train_ds, test_ds = read(train, **options), read(test, **options)
    model = model or DEFAULT_MODEL
    X_train, X_test = query_vectors([train_ds], model, quiet), query_vectors([test_ds], model, quiet)
    y_train = np.array([str(v) for v in train_ds.labels])  # type: ignore[union-attr]
    y_test = np.array([str(v) for v in test_ds.labels])  # type: ignore[union-attr]
    configs = []
    for g in gens:
        kind = GENERATOR_KINDS[g]
        for k in _int_list(ks) if kind.takes_k else [kind.fixed_k]:
            for a in aggs:
                for m in _int_list(ms) if a == "mnn" else [1]:
                    configs += [
                        dict(generator=g, k=k, aggregation=a, m=m, features=f or None) for f in _int_list(widths)
                    ]
    rows = run_sweep(X_train, y_train, X_test, y_test, configs, _int_list(shots), list(range(seeds)))
    if plot:
        _plot(rows, plot)
    if as_json:
        emit(rows)
        return
    click.echo(f"{'shots':>5}  {'generator':<9} {'k':>3}  {'agg':<3} {'m':>2}  {'features':>8}  accuracy   std")
    for r in rows:
        click.echo(
            f"{r['shots'] or 'all':>5}  {r['generator']:<9} {r['k']:>3}  {r['aggregation']:<3} {r['m']:>2}  "
            f"{r['features'] or '-':>8}  {r['accuracy']:8.4f}  {r['accuracy_std']:.4f}"
        )


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    from retrieval_imprint.experiments import plot_accuracy_vs_k

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_accuracy_vs_k(rows, ax)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # (the legend sits right of the axes)
    plt.close(fig)

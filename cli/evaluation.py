"""Commands that measure and set how a collection answers: eval, calibrate, threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from retrieval_imprint.params import MARGIN

from .app import (
    UserError,
    collection_argument,
    collection_vectors,
    data_options,
    emit,
    json_option,
    main,
    open_collection,
    output,
    pyplot,
    quiet_option,
)


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
    reading: dict[str, Any],
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
    ds = read(data, **reading)
    if ds.texts is not None and col.model is None:
        raise UserError(f"{collection} records no embedding model: evaluate it on vectors")
    found = col.query(collection_vectors(col, [ds], quiet), 1, threshold=threshold)
    truth = ds.need("labels")
    oos = np.array([str(label) == oos_label for label in truth]) if oos_label else np.zeros(len(ds), bool)
    if oos.all():
        raise UserError(f"every row of {data} has the out-of-scope label {oos_label!r}: nothing in scope to score")
    labels = [label for label, out in zip(truth, oos) if not out]
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
    default=MARGIN,
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
    reading: dict[str, Any],
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
        options = reading
        ds = read(data, **options)
        X = collection_vectors(col, [ds], quiet)
        X_oos = (
            collection_vectors(col, [read(oos, need_labels=False, **{**options, "split": oos_split})], quiet)
            if oos
            else None
        )
        result = col.calibrate(
            X, ds.labels, X_oos, target_accuracy=target_accuracy, target_oos_recall=target_oos_recall, margin=margin
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

"""``auto``: choose k and the aggregation from the training data alone, by cross-validation.

The best number of proxies per class moves with the data and the shots (the class mean wins at a
few shots per class, k-means with small k on CLINC150's 100 per class, all samples on BANKING77's
spread-out classes; docs/results.md), so the library chooses it. Whatever the user leaves unset is
a candidate: ``generator="auto"`` (with ``k=None``) tries the class mean (k = 1), k-means with k in
``K_GRID`` and every sample (k = -1); ``aggregation="auto"`` tries ``max`` and ``blend`` with alpha
in ``ALPHA_GRID`` (or the ``alpha`` given). Each candidate is imprinted on the training part of
stratified folds (rows of each class dealt round-robin in a seeded order, so a class of 5 samples
leaves one out per fold) and scored on the held-out part; the most accurate wins, ties going to
the cheaper setting (fewer proxies, then plain max). A class with one sample is never held out;
data with no class of two samples gets the cheapest candidate.

Cost: per fold, one batched k-means per k and one similarity GEMM per k over the held-out rows.
Folds are added until ``MIN_SCORED`` held-out rows are scored (all ``FOLDS`` for less data), and at
most ``MIN_SCORED`` of those rows are scored, fewer where they would meet more than ``CV_CELLS``
proxies in all (``cv_proxies``; not fewer than ``MIN_CELL_ROWS``). Beyond ``CV_CLASSES`` classes or
``CV_ROWS`` rows the folds are those of a seeded sample of whole classes (``cv_sample``): the fits of
every candidate then stop growing with the data, while the head is still imprinted on every class.

The estimator (``choose_head``) also weighs the ls head (RanPAC's ridge regression) on
``LS_FEATURES`` random ReLU features where generator, k and the aggregation are all left open and
the data is small enough to fit it whole (``LS_ROWS`` rows, ``CV_CLASSES`` classes): the most
accurate head on full data, and behind the class mean at a few shots a class. It is scored by the
closed-form leave-one-out accuracy its own fit computes to choose its ridge (``lsfit.py``), so
weighing it costs one ls fit, which is kept if it wins: it must beat the best cross-validated
accuracy above. A collection's head is fixed when it is created, so collections choose among the
imprinted heads alone (``stored_choice``); ``generator="ls"`` makes a streaming one (``lshead.py``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from . import lsfit
from ._groups import Grouped, uniforms
from .aggregate import max_scores
from .features import feature_map, relu_features
from .generate import LOO_ROWS
from .imprint import imprint, seed_of
from .index import ProxyIndex
from .lsfit import LSFit
from .normalize import normalize
from .params import AUTO, GENERATOR_KINDS, PAPER_K, STORED

K_GRID = (1, 2, 3, 5, 10, 20, -1)  # 1: the class mean; -1: every sample
ALPHA_GRID = (0.25, 0.5, 0.75, 0.9)
FOLDS = 5
MIN_SCORED = 4000
# held-out row x proxy scores at most (about 100 GFLOP at 384-d, a few seconds on two cores): past it,
# fewer rows are scored, not fewer than MIN_CELL_ROWS; data of a few hundred classes never reaches it
CV_CELLS = 1 << 27
MIN_CELL_ROWS = 1000
CV_CLASSES = 1000  # classes the folds hold at most: beyond, a seeded sample of them (cv_sample)
CV_ROWS = 200_000  # and rows, as far as whole classes allow
# the estimator's ls rival: RanPAC's head on this many random ReLU features (wider is more accurate and
# slower: docs/results.md's width tables), weighed up to LS_ROWS samples (its fit costs rows x width^2:
# about 12 s at 15,000 rows on two cores)
LS_FEATURES = 4000
LS_ROWS = 25_000
_FOLD_STREAM = (1 << 32) + 2  # random streams of _groups.uniforms used here
_SCORE_STREAM = (1 << 32) + 3
_CLASS_STREAM = (1 << 32) + 5


@dataclass(frozen=True)
class Candidate:
    """One concrete GEN/AGG setting; ``features``: the width of the random ReLU features the ls rival
    maps the embeddings through first (``LS_FEATURES``), None for the estimator's own."""

    generator: str
    k: int
    aggregation: str
    alpha: float | None = None
    features: int | None = None

    def params(self) -> dict[str, Any]:
        out = asdict(self)
        if self.features is None:  # the estimator's own setting stands
            del out["features"]
        return out

    def cost(self) -> tuple:
        """Cheaper first: fewer proxies per class, then plain max, then a smaller alpha."""
        proxies = {"mean": 1, "all": np.inf}.get(self.generator, self.k if self.k > 0 else np.inf)
        return proxies, self.aggregation == "blend", self.alpha or 0.0


def candidates(params: dict[str, Any]) -> list[Candidate]:
    """Every concrete setting ``params`` allow: unset choices from the grids, set ones as given."""
    gen, k, agg, alpha = params["generator"], params["k"], params["aggregation"], params.get("alpha")
    if gen == AUTO:
        gens = [({1: "mean", -1: "all"}.get(kk, "kmeans"), kk) for kk in (K_GRID if k is None else (k,))]
    else:
        kind = GENERATOR_KINDS[gen]
        gens = [(gen, (PAPER_K if k is None else k) if kind.takes_k else kind.fixed_k)]
    alphas = ALPHA_GRID if alpha is None else (alpha,)
    aggs = {AUTO: [("max", None)] + [("blend", a) for a in alphas], "blend": [("blend", a) for a in alphas]}.get(
        agg, [(agg, None)]
    )
    out = []
    for g, kk in gens:
        for a, al in aggs:
            if a == "blend" and g == "mean":  # the mean is its own best proxy: blend is max
                a, al = "max", None
            out.append(Candidate(g, kk, a, al))
    return list(dict.fromkeys(out))


def folds(groups: Grouped, seed: int) -> np.ndarray:
    """Fold of each row (-1: never held out), dealt round-robin within each class in a seeded order."""
    owner = groups.owner
    position = np.arange(len(owner)) - groups.offsets[owner]
    order = np.lexsort((uniforms(groups.keys[owner], seed, _FOLD_STREAM, position), owner))
    rank = np.empty(len(owner), np.int64)
    rank[order] = position
    return np.where(groups.sizes[owner] >= 2, rank % FOLDS, -1)


def scored_folds(groups: Grouped, seed: int, most: int = MIN_SCORED) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, scored)`` row masks and indices of the folds that score a held-out row: folds are
    taken until ``most`` rows are held out (all ``FOLDS`` for less data), and at most ``most`` of
    those rows (a seeded sample) are scored."""
    fold, owner = folds(groups, seed), groups.owner
    position = np.arange(len(owner)) - groups.offsets[owner]  # within its class: no dependence on class order
    held = [np.flatnonzero(fold == f) for f in range(FOLDS)]
    n_folds = next((f + 1 for f in range(FOLDS) if sum(map(len, held[: f + 1])) >= most), FOLDS)
    per_fold = -(-most // n_folds)
    out = []
    for f, rows in enumerate(held[:n_folds]):
        if not len(rows):
            continue
        if len(rows) > per_fold:  # a seeded sample of the held-out rows
            draw = uniforms(groups.keys[owner[rows]], seed, _SCORE_STREAM, position[rows])
            rows = np.sort(rows[np.argsort(draw)[:per_fold]])
        out.append((fold != f, rows))
    return out


def cv_sample(groups: Grouped, seed: int) -> Grouped:
    """The classes cross-validation folds: all of ``groups`` up to ``CV_CLASSES`` classes and
    ``CV_ROWS`` rows, else the first classes of a seeded order drawn from their label keys (the same
    classes whatever the order they come in) while they fit both bounds, at least two of them."""
    if groups.n_classes <= CV_CLASSES and len(groups.X) <= CV_ROWS:
        return groups
    return groups.take(np.sort(_seeded_classes(groups, seed, groups.sizes, CV_ROWS, 2)[:CV_CLASSES]))


def class_fold(groups: Grouped, seed: int, max_rows: int) -> np.ndarray:
    """Rows to hold out of a head whose other classes keep all theirs: the first fold (``folds``)
    of whole classes taken in ``cv_sample``'s seeded order while they total at most ``max_rows``
    rows (at least one class's)."""
    per_class = np.where(groups.sizes >= 2, -(-groups.sizes // FOLDS), 0)  # the first fold's rows (dealt round-robin)
    chosen = np.sort(_seeded_classes(groups, seed, per_class, max_rows, 1))
    return groups.rows(chosen)[folds(groups.take(chosen), seed) == 0]  # a class's folds are its own alone


def _seeded_classes(groups: Grouped, seed: int, rows: np.ndarray, max_rows: int, least: int) -> np.ndarray:
    """Class indices in a seeded order drawn from their label keys (the same whatever order the
    classes come in), the first of them whose ``rows`` (per class) total at most ``max_rows``, and
    at least ``least`` of them."""
    order = np.argsort(uniforms(groups.keys, seed, _CLASS_STREAM))
    return order[: max(least, int(np.sum(np.cumsum(rows[order]) <= max_rows)))]


def cross_validate(groups: Grouped, params: dict[str, Any], cands: list[Candidate]) -> list[dict[str, Any]]:
    """Held-out accuracy of each candidate on the classes of ``groups`` (raw, not NORMpre'd samples);
    each row says how many rows were scored, of how many classes."""
    X_pre = normalize(groups.X, params["pre_norm"], what="X")
    queries = normalize(groups.X, params["inf_norm"], what="X")
    owner = groups.owner
    correct, scored = np.zeros(len(cands), np.int64), 0
    most = min(MIN_SCORED, max(MIN_CELL_ROWS, CV_CELLS // cv_proxies(groups, cands)))
    for train, rows in scored_folds(groups, seed_of(params["random_state"]), most):
        counts = np.bincount(owner[train], minlength=groups.n_classes)
        part = Grouped(X_pre[train], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), groups.keys)
        correct += _fold_correct(part, queries[rows], owner[rows], params, cands)
        scored += len(rows)
    return [
        {
            **c.params(),
            "accuracy": float(n / scored) if scored else None,
            "correct": int(n),
            "scored": scored,
            "classes": groups.n_classes,
        }
        for c, n in zip(cands, correct)
    ]


def cv_proxies(groups: Grouped, cands: list[Candidate]) -> int:
    """About how many proxies the candidates' heads hold in all on the classes of ``groups``, each
    imprinted on the training part of a fold (``(FOLDS - 1) / FOLDS`` of its rows): what each scored
    row is compared with. A blend adds the class means."""
    train = np.maximum(1, groups.sizes * (FOLDS - 1) // FOLDS)
    ks = {c.k for c in cands} | ({1} if any(c.aggregation == "blend" for c in cands) else set())
    return max(1, sum(int(train.sum() if k == -1 else np.minimum(k, train).sum()) for k in ks))


def _fold_correct(
    part: Grouped, Q: np.ndarray, truth: np.ndarray, params: dict[str, Any], cands: list[Candidate]
) -> np.ndarray:
    """Correct predictions of each candidate on held-out queries ``Q`` from heads imprinted on ``part``."""
    best: dict[tuple[str, int], np.ndarray] = {}  # per (generator, k): best-proxy similarity per class
    for gen, k in dict.fromkeys((c.generator, c.k) for c in cands):
        best[gen, k] = _best_per_class(part, Q, {**params, "generator": gen, "k": k})
    if any(c.aggregation == "blend" for c in cands) and ("mean", 1) not in best:
        best["mean", 1] = _best_per_class(part, Q, {**params, "generator": "mean", "k": 1})
    out = np.zeros(len(cands), np.int64)
    for i, c in enumerate(cands):
        b = best[c.generator, c.k]
        alpha = float(c.alpha or 0.0)  # set for every blend candidate
        scores = b if c.aggregation == "max" else alpha * best["mean", 1] + (1 - alpha) * b
        out[i] = int(np.sum(scores.argmax(1) == truth))
    return out


def _best_per_class(part: Grouped, Q: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    W, owner, fixed = imprint(part, params)
    index = ProxyIndex(W.shape[1], params["metric"], fixed.transform)
    index.add(W)
    return max_scores(index.similarity(Q), np.searchsorted(owner, np.arange(part.n_classes)))


def choose(
    X: np.ndarray, codes: np.ndarray, keys: np.ndarray, params: dict[str, Any]
) -> tuple[Candidate, list[dict[str, Any]]]:
    """The candidate ``params`` leave open with the best held-out accuracy on raw samples ``X`` of
    classes ``codes`` (label ``keys``; folds of ``cv_sample``'s classes), the cheapest among equals,
    and every candidate's row; a single candidate is returned without cross-validating."""
    cands = candidates(params)
    if len(cands) == 1:
        return cands[0], []
    groups = cv_sample(Grouped.from_codes(X, codes, keys), seed_of(params["random_state"]))
    rows = cross_validate(groups, params, cands)
    ranked = sorted(range(len(cands)), key=lambda i: (-rows[i]["correct"], cands[i].cost()))
    return cands[ranked[0]], rows


def stored_choice(cfg: dict[str, Any], X: np.ndarray, codes: np.ndarray, keys: np.ndarray) -> str:
    """What auto chooses for a collection of stored settings ``cfg`` from samples ``X`` of classes
    ``codes`` (label ``keys``), as a collection stores it: the concrete parameters and the CV table.
    Only an exact index serves a blend: IVF collections (and ``index="auto"``, which may choose
    IVF) choose k under max."""
    params = {name: cfg[name] for name in STORED}
    if cfg["index_factory"] != "Flat" and params["aggregation"] == AUTO:
        params["aggregation"] = "max"
    choice, rows = choose(X, codes, keys, params)
    return json.dumps({**choice.params(), "cv_results": rows})


def choose_head(
    X: np.ndarray, codes: np.ndarray, keys: np.ndarray, params: dict[str, Any]
) -> tuple[Candidate, list[dict[str, Any]], LSFit | None]:
    """The estimator's choice: ``choose``'s, unless the ls head on ``LS_FEATURES`` random features
    (the embeddings as they are where ``params`` map to features already), weighed where generator,
    k and the aggregation are all open and the data is at most ``LS_ROWS`` rows of ``CV_CLASSES``
    classes, is more accurate left out (``lsfit.fit``) than every candidate held out; then its fit too."""
    choice, rows = choose(X, codes, keys, params)
    open_ = params["generator"] == AUTO and params["k"] is None and params["aggregation"] == AUTO
    if not open_ or len(X) > LS_ROWS or int(codes.max(initial=0)) >= CV_CLASSES or rows[0]["accuracy"] is None:
        return choice, rows, None
    fmap = (
        None
        if params["features"] is not None
        else feature_map(X.shape[1], LS_FEATURES, seed_of(params["random_state"]))
    )
    ls = lsfit.fit(X if fmap is None else relu_features(X, fmap), codes, keys, params)
    ls_choice = Candidate("ls", 1, "max", features=None if fmap is None else LS_FEATURES)
    scored = min(len(X), LOO_ROWS)
    row = {
        **Candidate("ls", 1, "max", features=ls.X.shape[1]).params(),
        "accuracy": ls.accuracy,
        "correct": round(ls.accuracy * scored),
        "scored": scored,
        "classes": ls.groups.n_classes,
        "held_out": "leave-one-out",
    }
    if ls.accuracy > max(r["accuracy"] for r in rows):
        return ls_choice, [*rows, row], replace(ls, map=fmap)
    return choice, [*rows, row], None

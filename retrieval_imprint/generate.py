"""GEN: turn each class's (pre-normalised) samples into proxies.

Every generator is one function ``fn(groups, k, seed, **options) -> (W, owner)`` registered under
its paper name: ``W`` is ``(P, d)`` float32, ``owner`` the class index of each row. Generators
of a kind with ``shared_k_rule`` (``params.GENERATOR_KINDS``) only ever see classes with more than ``k`` samples: the
shared rule (GEN ``all``, ``k = -1`` or ``n_c <= k`` keeps every sample) is applied once, here.
All randomness is per class (``_groups.uniforms``), so adding a class never changes another's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ._groups import Grouped, uniforms
from .kmeans import Gram, batched_kmeans, kmeans_pp, space
from .params import GENERATOR_KINDS, GeneratorKind

GeneratorFn = Callable[..., "tuple[np.ndarray, np.ndarray]"]

# Random streams (see _groups.uniforms); k-means++ seeding uses streams 0..k-1.
_RANDOM_STREAM = 1 << 32
_FPS_STREAM = (1 << 32) + 1


@dataclass(frozen=True)
class Generator:
    fn: GeneratorFn
    kind: GeneratorKind  # what the settings know of it: whether it takes k, the shared rule, per class

    @property
    def shared_k_rule(self) -> bool:
        return self.kind.shared_k_rule

    @property
    def per_class(self) -> bool:
        return self.kind.per_class


GENERATORS: dict[str, Generator] = {}


def register(name: str, kind: GeneratorKind | None = None) -> Callable[[GeneratorFn], GeneratorFn]:
    """Register ``fn(groups, k, seed, **options) -> (W, owner)`` as generator ``name``, of ``kind``
    (``params.GENERATOR_KINDS``: declared there for the built-in generators; a new one takes k,
    follows the shared rule and is per class unless ``kind`` says otherwise)."""
    kind = kind or GENERATOR_KINDS.get(name, GeneratorKind())

    def deco(fn: GeneratorFn) -> GeneratorFn:
        GENERATOR_KINDS[name] = kind
        GENERATORS[name] = Generator(fn, kind)
        return fn

    return deco


def generate(name: str, groups: Grouped, k: int, seed: int, **options) -> tuple[np.ndarray, np.ndarray]:
    """Proxies ``(W, owner)`` of every class in ``groups`` with generator ``name``; rows by class.
    The arguments are checked where users give them (``params.py``), not here."""
    gen = GENERATORS[name]
    if not gen.shared_k_rule:
        return gen.fn(groups, k, seed, **options)
    sizes = groups.sizes
    small = sizes <= k if k != -1 else np.ones(len(sizes), bool)
    W = [groups.X[groups.rows(np.flatnonzero(small))]]
    owner = [np.repeat(np.flatnonzero(small), sizes[small])]
    big = np.flatnonzero(~small)
    if len(big):
        Wb, ob = gen.fn(groups if len(big) == len(sizes) else groups.take(big), k, seed, **options)
        W.append(Wb)
        owner.append(big[ob])
    if len(W) == 1 or not len(W[0]):  # one part: already grouped by class
        return np.ascontiguousarray(W[-1], np.float32), owner[-1]
    W_all, owner_all = np.concatenate(W), np.concatenate(owner)
    order = np.argsort(owner_all, kind="stable")
    return np.ascontiguousarray(W_all[order], np.float32), owner_all[order]


def _each_class(n_per_class: int, n_classes: int) -> np.ndarray:
    return np.repeat(np.arange(n_classes), n_per_class)


@register("all")
def all_samples(groups: Grouped, k: int, seed: int, **_) -> tuple[np.ndarray, np.ndarray]:
    """Every sample is a proxy (max aggregation is then 1-NN over the training data)."""
    return groups.X.copy(), groups.owner


def class_means(groups: Grouped) -> np.ndarray:
    """``(C, d)`` class means, accumulated in float64."""
    sums = np.add.reduceat(groups.X, groups.offsets[:-1], axis=0, dtype=np.float64)
    return sums / groups.sizes[:, None]


@register("mean")
def mean(groups: Grouped, k: int, seed: int, **_) -> tuple[np.ndarray, np.ndarray]:
    """One proxy per class, its mean (k is 1 whatever is passed)."""
    return class_means(groups).astype(np.float32), np.arange(groups.n_classes)


@register("kmeans")
def kmeans(
    groups: Grouped, k: int, seed: int, *, max_iter: int = 300, tol: float = 1e-4, **_
) -> tuple[np.ndarray, np.ndarray]:
    """k centroids per class: batched Lloyd with greedy k-means++ seeding (``kmeans.py``)."""
    centers = batched_kmeans(groups, k, seed, max_iter=max_iter, tol=tol)
    return centers.reshape(-1, groups.X.shape[1]), _each_class(k, groups.n_classes)


@register("kmedoids")
def kmedoids(groups: Grouped, k: int, seed: int, *, max_iter: int = 300, **_) -> tuple[np.ndarray, np.ndarray]:
    """k medoids per class (Euclidean): k-means++ seeding, then the "alternate" (Voronoi) method.

    Each round assigns points to the nearest medoid and moves every medoid to the member with the
    smallest summed distance to its cluster; it stops when no medoid moves.
    """
    clusters = np.arange(k)

    def block(classes: np.ndarray, P: np.ndarray, mask: np.ndarray) -> np.ndarray:
        rows = np.arange(len(classes))[:, None]
        sp = Gram(P)
        med = kmeans_pp(sp, mask, k, groups.keys[classes], seed)
        D = np.sqrt(sp.point_dists(np.broadcast_to(np.arange(P.shape[1]), mask.shape)))  # (B, n, n)
        D *= mask[:, None, :]
        for _ in range(max_iter):
            labels = np.argmin(D[rows, med], axis=1)  # (B, n_pad)
            member = (labels[:, None, :] == clusters[None, :, None]) & mask[:, None, :]  # (B, k, n_pad)
            cost = np.matmul(D, member.transpose(0, 2, 1).astype(np.float32))  # point i to cluster j
            own = np.take_along_axis(cost, labels[:, :, None], 2)[:, :, 0]
            new = np.argmin(np.where(member, own[:, None, :], np.inf), axis=2)
            new = np.where(member.any(2), new, med)
            if np.array_equal(new, med):
                break
            med = new
        return P[rows, med]

    return groups.map_blocks(block, k).reshape(-1, groups.X.shape[1]), _each_class(k, groups.n_classes)


def _first_k_per_class(groups: Grouped, score: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k lowest-``score`` rows of each class (ties: earlier row), class by class."""
    owner = groups.owner
    order = np.lexsort((np.arange(len(owner)), score, owner))
    rank = np.arange(len(owner)) - groups.offsets[owner[order]]
    return order[rank < k]


@register("random")
def random(groups: Grouped, k: int, seed: int, **_) -> tuple[np.ndarray, np.ndarray]:
    """k samples per class drawn without replacement (seeded per class)."""
    position = np.arange(len(groups.X)) - groups.offsets[groups.owner]
    draw = uniforms(groups.keys[groups.owner], seed, _RANDOM_STREAM, position)
    return groups.X[_first_k_per_class(groups, draw, k)], _each_class(k, groups.n_classes)


@register("fps")
def fps(groups: Grouped, k: int, seed: int, **_) -> tuple[np.ndarray, np.ndarray]:
    """Farthest-point sampling: a random first sample, then the sample farthest from those chosen."""

    def block(classes: np.ndarray, P: np.ndarray, mask: np.ndarray) -> np.ndarray:
        rows = np.arange(len(classes))
        sp = space(P)
        chosen = np.empty((len(classes), k), np.int64)
        chosen[:, 0] = np.minimum(
            (uniforms(groups.keys[classes], seed, _FPS_STREAM) * mask.sum(1)).astype(np.int64), mask.sum(1) - 1
        )
        D = np.full(mask.shape, np.inf, np.float32)
        for t in range(k):
            if t:
                chosen[:, t] = np.argmax(D, axis=1)
            D = np.minimum(D, sp.point_dists(chosen[:, t : t + 1])[:, 0])
            D[~mask] = -1.0
        return P[rows[:, None], chosen]

    return groups.map_blocks(block, k).reshape(-1, groups.X.shape[1]), _each_class(k, groups.n_classes)


F64_BLOCK_BYTES = 64 << 20  # float64 copy of the samples held at once (cov_max, and ls's products)


def _f64_blocks(X: np.ndarray, axis: int = 0) -> Iterator[tuple[slice, np.ndarray]]:
    """``X`` a block of rows (``axis=0``) or columns (``axis=1``) at a time, in float64, with the
    block's slice: products accumulate in double precision without a float64 copy of all of ``X``
    (at 100k samples of 2,000 features, 1.6 GB)."""
    step = max(1, F64_BLOCK_BYTES // (8 * X.shape[1 - axis]))
    for lo in range(0, X.shape[axis], step):
        part = slice(lo, lo + step)
        yield part, np.asarray(X[part] if axis == 0 else X[:, part], np.float64)


@register("cov_max")
def cov_max(groups: Grouped, k: int, seed: int, **_) -> tuple[np.ndarray, np.ndarray]:
    """The k samples with the largest column sums of the class's n_c x n_c sample covariance.

    Column j of ``np.cov(X_c)`` sums to ``z_j . sum_i z_i / (d - 1)`` with ``z`` the rows centred
    over features, so the n_c x n_c matrix is never formed (nor a float64 copy of all samples).
    """
    X, starts, owner = groups.X, groups.offsets[:-1], groups.owner
    row_means = X.mean(1, dtype=np.float64)
    S = np.add.reduceat(X, starts, axis=0, dtype=np.float64) - np.add.reduceat(row_means, starts)[:, None]
    colsum = np.empty(len(X))
    for rows, part in _f64_blocks(X):
        colsum[rows] = np.einsum("nd,nd->n", part - row_means[rows, None], S[owner[rows]])
    colsum /= max(X.shape[1] - 1, 1)
    return X[_first_k_per_class(groups, -colsum, k)], _each_class(k, groups.n_classes)


RIDGE_GRID = 10.0 ** np.arange(-4.0, 3.01, 0.5)  # ridge / mean eigenvalue of the second moment
LOO_ROWS = 4000  # rows whose leave-one-out prediction scores a ridge (a seeded sample beyond that)
_LOO_STREAM = (1 << 32) + 4


@dataclass(frozen=True)
class Spectrum:
    """Eigenpairs of ``X^T X`` on the span of the rows of ``X`` (``n`` of them, ``d`` wide): the
    eigenvalues ``s`` ``(r,)`` and orthonormal eigenvectors ``V`` ``(d, r)``, r <= min(n, d)."""

    s: np.ndarray
    V: np.ndarray
    n: int

    @classmethod
    def of(cls, X: np.ndarray) -> Spectrum:
        """From the smaller Gram matrix: ``X^T X``, or ``X X^T`` when ``X`` has fewer rows than
        columns (a few shots, or wide random features), whose eigenvectors ``U`` give ``V = X^T U / sqrt(s)``."""
        n, d = X.shape
        wide = n < d
        G = np.zeros((n, n) if wide else (d, d))
        for _, part in _f64_blocks(X, axis=int(wide)):  # the Gram matrix, a block of X at a time
            G += part @ part.T if wide else part.T @ part
        if not wide:
            return cls.of_gram(G, n)
        s, E = _eigenpairs(G, max(n, d))
        V = np.empty((d, len(s)))
        for cols, part in _f64_blocks(X, axis=1):
            V[cols] = part.T @ E / np.sqrt(s)
        return cls(s, V, n)

    @classmethod
    def of_gram(cls, gram: np.ndarray, n: int) -> Spectrum:
        """From ``X^T X`` itself (float64, ``d x d``, of ``n`` rows): a streaming head's ``G``, summed already."""
        return cls(*_eigenpairs(gram, max(n, len(gram))), n)


def _eigenpairs(G: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The eigenpairs of a Gram matrix of rank at most ``min`` of its shape, less those with no variance
    (below rounding at ``size``): every head lives in the span of the rows."""
    s, E = np.linalg.eigh(G)
    keep = s > s.max(initial=0.0) * size * np.finfo(np.float64).eps
    return s[keep], E[:, keep]


def ls_head(spectrum: Spectrum, means: np.ndarray, reg: float) -> np.ndarray:
    """Least-squares head ``W = (1/C) M^T (Sigma_T + mu_G mu_G^T + reg I)^-1``, one row per mean.

    ``spectrum`` is that of all training samples, ``means`` ``(C, d)`` the (pseudo-)class means.
    ``Sigma_T + mu_G mu_G^T`` is the second moment ``X^T X / n``: the head is ridge regression
    onto class indicators weighted ``n / (C n_c)``, so that ``loo_ridge`` can score it in closed form.
    The means lie in the span of the samples, so the head is computed there.
    """
    V = spectrum.V
    W = V @ ((V.T @ means.T) / (spectrum.s / spectrum.n + reg)[:, None])
    return (W.T / len(means)).astype(np.float32)


def loo_ridge(
    X: np.ndarray,
    spectrum: Spectrum,
    codes: np.ndarray,
    means: np.ndarray,
    owner: np.ndarray,
    seed: int,
    normalize_rows: bool,
) -> float:
    """The ridge of ``RIDGE_GRID`` (scaled by the mean eigenvalue of ``X^T X / n``) whose head
    classifies best with each training sample left out (``loo_accuracy``, ``best_ridge``)."""
    return best_ridge(*loo_accuracy(X, spectrum, codes, means, owner, seed, normalize_rows))[0]


def best_ridge(ridges: np.ndarray, accuracy: np.ndarray) -> tuple[float, float]:
    """The ridge of the best leave-one-out ``accuracy`` (ties go to the larger ridge) and that accuracy."""
    i = len(accuracy) - 1 - int(np.argmax(accuracy[::-1]))
    return float(ridges[i]), float(accuracy[i])


def loo_accuracy(
    X: np.ndarray,
    spectrum: Spectrum,
    codes: np.ndarray,
    means: np.ndarray,
    owner: np.ndarray,
    seed: int,
    normalize_rows: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Each ridge of the grid and the leave-one-out accuracy of its head (``LeftOut.grid``)."""
    return LeftOut(X, spectrum, codes, means, seed).grid(owner, normalize_rows)


def ridge_grid(spectrum: Spectrum) -> np.ndarray:
    """``RIDGE_GRID`` as absolute ridges: scaled by the mean eigenvalue of the second moment ``X^T X / n``."""
    return RIDGE_GRID * spectrum.s.sum() / spectrum.n / spectrum.V.shape[0]


class LeftOut:
    """Closed-form leave-one-out of the ridge regression behind ``ls_head``, from ``X``'s one
    eigendecomposition (``spectrum``), at any ridge. ``codes``: the column of ``means`` each row
    belongs to. At most ``LOO_ROWS`` rows (``rows``, a seeded sample) are left out in turn."""

    def __init__(self, X: np.ndarray, spectrum: Spectrum, codes: np.ndarray, means: np.ndarray, seed: int) -> None:
        from scipy import sparse  # here: the command line starts without SciPy

        n, C = len(X), len(means)
        self.spectrum, self.codes = spectrum, codes
        self.weight = n / (C * np.bincount(codes, minlength=C))[codes]  # the indicator target of each row
        targets = sparse.csc_array((self.weight, (codes, np.arange(n))), shape=(C, n))
        TX = np.zeros((C, X.shape[1]))
        for block, part in _f64_blocks(X):
            TX += targets[:, block] @ part
        self.ZY = (TX @ spectrum.V).T  # (r, C): V^T X^T Y
        self.rows: np.ndarray = (
            np.arange(n)
            if n <= LOO_ROWS
            else np.sort(np.argsort(uniforms(np.uint64(0), seed, _LOO_STREAM, np.arange(n)))[:LOO_ROWS])
        )
        self.Z = np.asarray(X[self.rows], np.float64) @ spectrum.V

    def scores(self, reg: float, normalize_rows: bool) -> np.ndarray:
        """``(rows, C)``: each left-out row's score for every column by the head fitted without it,
        at ridge ``reg`` (absolute, as ``ls_head`` takes it); ``normalize_rows``: divided by the norm
        of the head's column, as the head scores after L2 NORMpost."""
        s, n, rows = self.spectrum.s, self.spectrum.n, self.rows
        inv = 1.0 / (s + n * reg)
        Zr = self.Z * inv
        h = np.einsum("nd,nd->n", Zr, self.Z)
        loo = Zr @ self.ZY  # fitted values, then each row's own contribution taken out
        loo[np.arange(len(rows)), self.codes[rows]] -= h * self.weight[rows]
        with np.errstate(divide="ignore", invalid="ignore"):  # h = 1: a row the head interpolates (no ridge)
            loo /= (1.0 - h)[:, None]
        loo[h >= 1.0 - 1e-9] = np.nan  # its fit without it is not defined by this formula: no score
        if normalize_rows:
            loo /= np.sqrt(((inv[:, None] * self.ZY) ** 2).sum(0))  # |w_c|, as V is orthonormal
        return loo

    def grid(self, owner: np.ndarray, normalize_rows: bool) -> tuple[np.ndarray, np.ndarray]:
        """Each ridge of ``ridge_grid`` and its ``accuracy``."""
        ridges = ridge_grid(self.spectrum)
        return ridges, np.array([self.accuracy(reg, owner, normalize_rows) for reg in ridges])

    def accuracy(self, reg: float, owner: np.ndarray, normalize_rows: bool) -> float:
        """The share of left-out rows whose best column's class (``owner``, per column) is theirs (a row
        with no score counts as wrong)."""
        loo = self.scores(reg, normalize_rows)
        right = owner[np.nan_to_num(loo, nan=-np.inf).argmax(1)] == owner[self.codes[self.rows]]
        return float(np.mean(right & ~np.isnan(loo[:, 0])))


def _ridge(
    groups: Grouped,
    spectrum: Spectrum,
    codes: np.ndarray,
    means: np.ndarray,
    owner: np.ndarray,
    ls_reg: float | str,
    seed: int,
    post_norm: str = "l2",
) -> float:
    if ls_reg != "auto":
        return float(ls_reg)
    return loo_ridge(groups.X, spectrum, codes, means, owner, seed, post_norm == "l2")


@register("ls")
def ls(groups: Grouped, k: int, seed: int, *, ls_reg: float | str, **options) -> tuple[np.ndarray, np.ndarray]:
    """Oracle least-squares head over all classes at once (not imprinting: needs every class);
    ``ls_reg="auto"`` chooses the ridge by leave-one-out (``loo_ridge``)."""
    means, classes, spectrum = class_means(groups), np.arange(groups.n_classes), Spectrum.of(groups.X)
    reg = _ridge(groups, spectrum, groups.owner, means, classes, ls_reg, seed, **options)
    return ls_head(spectrum, means, reg), classes


@register("kls")
def kls(groups: Grouped, k: int, seed: int, *, ls_reg: float | str, **options) -> tuple[np.ndarray, np.ndarray]:
    """k-means per class, each cluster a pseudo-class, then ``ls`` over all pseudo-classes (a
    sample belongs to the nearest centre of its class, for ``ls_reg="auto"``)."""
    centers, owner = generate("kmeans", groups, k, seed)
    codes = np.empty(len(groups.X), np.int64)
    if ls_reg == "auto":
        first = np.searchsorted(owner, np.arange(groups.n_classes))
        per_class = np.diff(np.append(first, len(owner)))
        for lo in range(0, len(codes), 2048):  # nearest own-class centre, a block of rows at a time
            c = groups.owner[lo : lo + 2048]
            slots = first[c][:, None] + np.minimum(np.arange(per_class.max()), per_class[c][:, None] - 1)
            d2 = ((groups.X[lo : lo + 2048, None, :] - centers[slots]) ** 2).sum(-1)
            codes[lo : lo + 2048] = slots[np.arange(len(c)), d2.argmin(1)]
    spectrum, centers = Spectrum.of(groups.X), centers.astype(np.float64)
    reg = _ridge(groups, spectrum, codes, centers, owner, ls_reg, seed, **options)
    return ls_head(spectrum, centers, reg), owner

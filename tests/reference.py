"""Brute-force numpy references, written independently of the library: loops per class and per
query, scipy's cdist for distances, explicit formulas from docs/design.md. Slow and obvious on purpose."""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist


def l2(X):
    X = np.asarray(X, np.float64)
    return X / np.sqrt((X**2).sum(1, keepdims=True))


def quantile_norm(W, R):
    """Row r-th smallest entry -> quantile of flattened R at (r + 1/2)/d."""
    d = W.shape[1]
    y = [np.quantile(np.asarray(R, np.float64).ravel(), (i + 0.5) / d) for i in range(d)]
    out = np.empty(W.shape)
    for row in range(len(W)):
        for rank, col in enumerate(np.argsort(W[row], kind="stable")):
            out[row, col] = y[rank]
    return out


def class_mean(Xc):
    return np.asarray(Xc, np.float64).mean(0)


def cov_max(Xc, k):
    """The k samples with the largest column sums of the n_c x n_c covariance (np.cov)."""
    s = np.cov(np.asarray(Xc, np.float64)).sum(0)
    best = sorted(range(len(Xc)), key=lambda i: (-s[i], i))[:k]
    return Xc[best]


def fps(Xc, k, first):
    chosen = [first]
    for _ in range(k - 1):
        d = np.min(cdist(Xc, Xc[chosen]), axis=1)
        chosen.append(int(np.argmax(d)))
    return Xc[chosen]


def ls(X, y, reg, classes=None):
    """W = (1/C) M^T (Sigma_T + mu mu^T + reg I)^-1 with M the d x C matrix of class means."""
    X = np.asarray(X, np.float64)
    classes = np.unique(y) if classes is None else classes
    M = np.stack([X[y == c].mean(0) for c in classes], axis=1)
    mu = X.mean(0)
    sigma_t = sum(np.outer(x - mu, x - mu) for x in X) / len(X)
    return (M.T @ np.linalg.inv(sigma_t + np.outer(mu, mu) + reg * np.eye(X.shape[1]))) / len(classes)


def distances(Q, W, metric, covariance_of=None):
    """Distance used for ranking/voting, and similarity (higher = closer), each (n_q, P).
    Mahalanobis uses the covariance of ``covariance_of`` (default: of ``W``)."""
    Q, W = np.asarray(Q, np.float64), np.asarray(W, np.float64)
    if metric in ("ip", "cosine"):
        sim = Q @ W.T if metric == "ip" else 1.0 - cdist(Q, W, "cosine")
        return np.maximum(1.0 - sim, 0.0), sim
    if metric == "mahalanobis":
        C = np.asarray(W if covariance_of is None else covariance_of, np.float64)
        VI = np.linalg.inv(np.cov(C.T) + 1e-6 * np.eye(W.shape[1]))
        dist = cdist(Q, W, "mahalanobis", VI=VI)
    else:
        dist = cdist(Q, W, {"euclidean": "euclidean", "manhattan": "cityblock", "chebyshev": "chebyshev"}[metric])
    return dist, -dist


def scores(Q, W, proxy_class, n_classes, metric="ip", aggregation="max", m=1, vote="uniform"):
    """Per-class aggregated scores (n_q, C) and predicted class index, query by query."""
    dist, sim = distances(Q, W, metric)
    out = np.zeros((len(Q), n_classes))
    pred = np.zeros(len(Q), int)
    for q in range(len(Q)):
        if aggregation == "max":
            for c in range(n_classes):
                out[q, c] = sim[q, proxy_class == c].max()
        else:
            near = np.argsort(-sim[q], kind="stable")[:m]
            w = np.ones(len(near)) if vote == "uniform" else 1.0 / (dist[q, near] + 1e-10)
            for j, p in enumerate(near):
                out[q, proxy_class[p]] += w[j]
            out[q] /= w.sum()
        pred[q] = int(np.argmax(out[q]))  # first maximum: ties go to the lowest class
    return out, pred


def nc1(X, y, paper_compatible=False):
    """NC1 with explicit per-class sums over L2-normalised X."""
    X = l2(X)
    classes = np.unique(y)
    C, d = len(classes), X.shape[1]
    mu_g = X.mean(0)
    sigma_b, sigma_w = np.zeros((d, d)), np.zeros((d, d))
    for c in classes:
        Xc = X[y == c]
        mu_c = Xc.mean(0)
        sigma_b += np.outer(mu_c - mu_g, mu_c - mu_g) / C
        centre = mu_c - mu_g if paper_compatible else mu_c
        sigma_w += sum(np.outer(x - centre, x - centre) for x in Xc) / len(Xc) / C
    return float(np.trace(sigma_w @ np.linalg.pinv(sigma_b)) / C)


def float32_tolerance(W, Q):
    """Per query, how far a float32 inner product over ``d`` terms may stray from the float64 one:
    d rounding errors of 2^-24 relative, on both sides of the comparison."""
    W, Q = np.asarray(W, np.float64), np.asarray(Q, np.float64)
    return 2 * W.shape[1] * 2.0**-24 * np.linalg.norm(Q, axis=1) * np.linalg.norm(W, axis=1).max()


def assert_top_inner_products(got, W, Q, m):
    """``got`` ``(n_q, m)`` holds row numbers of ``W``: distinct, best first, and each the m best by
    float64 inner product up to float32 precision: a member of a set tied in float32 may stand for
    any other, since which one float32 ranks first depends on the CPU's summation order."""
    S = np.asarray(Q, np.float64) @ np.asarray(W, np.float64).T
    tol = float32_tolerance(W, Q)
    best = -np.sort(-S, axis=1)[:, :m]
    for q in range(len(Q)):
        assert len(set(got[q].tolist())) == m, (q, got[q])
        scores = S[q, got[q]]
        assert np.all(np.abs(scores - best[q]) <= tol[q]), (q, scores - best[q], tol[q])
        assert np.all(np.diff(scores) <= tol[q]), (q, scores)


def blend(Q, W, proxy_class, means, alpha, metric="ip"):
    """alpha * sim(q, mean_c) + (1 - alpha) * max_j sim(q, w_cj), query by query and class by class."""
    _, sim = distances(Q, W, metric)
    _, sim_m = distances(Q, means, metric, covariance_of=W)
    out = np.zeros((len(Q), len(means)))
    for q in range(len(Q)):
        for c in range(len(means)):
            out[q, c] = alpha * sim_m[q, c] + (1 - alpha) * sim[q, proxy_class == c].max()
    return out


def ridge_loo_scores(X, y, reg):
    """``(n, C)``: each row's class scores by the ls head's ridge regression refitted without it (n
    times): targets n / (C n_c) on the row's class, penalty n * reg (n, n_c and C of the full data);
    scores divided by the norms of the full-data head's rows (its L2 NORMpost)."""
    X = np.asarray(X, np.float64)
    classes = np.unique(y)
    n, C = len(X), len(classes)
    counts = {c: np.sum(y == c) for c in classes}
    Y = np.array([[n / (C * counts[c]) if yi == c else 0.0 for c in classes] for yi in y])
    norms = np.linalg.norm(np.linalg.solve(X.T @ X + n * reg * np.eye(X.shape[1]), X.T @ Y), axis=0)
    out = np.empty((n, C))
    for i in range(n):
        keep = np.arange(n) != i
        Wt = np.linalg.solve(X[keep].T @ X[keep] + n * reg * np.eye(X.shape[1]), X[keep].T @ Y[keep])
        out[i] = X[i] @ Wt / norms
    return out


def ridge_loo_correct(X, y, reg):
    """Leave-one-out correct predictions of the ls head's ridge regression (``ridge_loo_scores``)."""
    return int(np.sum(np.unique(y)[ridge_loo_scores(X, y, reg).argmax(1)] == y))

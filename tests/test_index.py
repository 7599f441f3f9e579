"""ProxyIndex: the small-batch numpy path and the FAISS path give the same neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref

from retrieval_imprint import gemm
from retrieval_imprint.index import SMALL_BATCH, ProxyIndex


@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("n_proxies,m", [(500, 1), (500, 10), (30, 40)])
def test_small_and_large_batches_agree_with_brute_force(with_ids, n_proxies, m):
    rng = np.random.default_rng(n_proxies + m)
    W = rng.standard_normal((n_proxies, 12)).astype(np.float32)
    ids = rng.permutation(10**6)[:n_proxies].astype(np.int64)
    index = ProxyIndex(12, "ip", with_ids=with_ids)
    index.add(W, ids if with_ids else None)
    Q = rng.standard_normal((SMALL_BATCH + 5, 12)).astype(np.float32)
    small = index.search(Q[:3], m)  # numpy GEMV path
    large = index.search(Q, m)  # FAISS path
    S = Q.astype(np.float64) @ W.T.astype(np.float64)
    k = min(m, n_proxies)
    expected = np.argsort(-S, axis=1, kind="stable")[:, :k]
    expected = ids[expected] if with_ids else expected
    for sim, _, got in (small, large):
        assert got.shape == (len(sim), m)
        np.testing.assert_array_equal(got[:, :k], expected[: len(got)])
        np.testing.assert_allclose(
            sim[:, :k], np.take_along_axis(S[: len(got)], np.argsort(-S[: len(got)], 1)[:, :k], 1), rtol=1e-4, atol=1e-4
        )
        assert (got[:, k:] == -1).all()


def _rows(got: np.ndarray, ids: np.ndarray, with_ids: bool) -> np.ndarray:
    """Row numbers of the returned ids."""
    if not with_ids:
        return got
    position = dict(zip(ids.tolist(), range(len(ids))))
    return np.vectorize(position.__getitem__)(got)


def _reference_top(W: np.ndarray, Q: np.ndarray, m: int) -> np.ndarray:
    """Brute-force top-m rows in float64, best first; equal scores: lowest row first."""
    return np.argsort(-(Q.astype(np.float64) @ W.T.astype(np.float64)), axis=1, kind="stable")[:, :m]


def _gemm_calls(monkeypatch) -> list[int]:
    """The number of queries of each ``gemm.top_k`` call from now on, as they come."""
    calls, full = [], gemm.top_k

    def counted(xb, q, k):
        calls.append(len(q))
        return full(xb, q, k)

    monkeypatch.setattr(gemm, "top_k", counted)
    return calls


@pytest.mark.parametrize("m", [1, 5, 40])
def test_blocked_gemm_search_is_exact_across_blocks(m, monkeypatch):
    """Blocks of 64 queries and of 64 stored rows (so a top-k spans several), merged as they come:
    the exact top-m. Small integers make every product exact in float32 whatever the summation
    order, so ties are real: with m = 1 the lowest of equal rows answers, as FAISS's does."""
    monkeypatch.setattr(gemm, "QUERY_BLOCK", 64)
    monkeypatch.setattr(gemm, "BLOCK_SCORES", 64 * 64)
    rng = np.random.default_rng(m)
    W = rng.integers(-3, 4, (1000, 32)).astype(np.float32)
    W[700:705] = W[3]  # ties with row 3, ten blocks later
    Q = np.concatenate([W[[3, 500]], rng.integers(-3, 4, (198, 32)).astype(np.float32)])
    S = Q.astype(np.float64) @ W.T.astype(np.float64)
    top, D = gemm.top_k(W, Q, m)
    assert top.shape == D.shape == (200, m)
    ref.assert_top_inner_products(top, W, Q, m)
    np.testing.assert_array_equal(D, np.take_along_axis(S, top, 1))
    if m == 1:
        np.testing.assert_array_equal(top[:, 0], S.argmax(1))  # the first of equal maxima
    monkeypatch.setattr(gemm, "BLOCK_SCORES", 64 * 1000)  # one block: m = 5 takes the grouped candidates
    whole, D = gemm.top_k(W, Q, m)
    ref.assert_top_inner_products(whole, W, Q, m)
    np.testing.assert_array_equal(D, np.take_along_axis(S, whole, 1))
    assert gemm.top_k(W[:3], Q, m)[0].shape == (200, min(m, 3))  # fewer rows than m: all of them


@pytest.mark.parametrize("m", [3, 150])  # deep searches too (a blend's, searched 4x deeper)
def test_a_batch_search_of_an_exact_index_takes_the_blocked_gemm(m, monkeypatch):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((2000, 64)).astype(np.float32)
    ids = np.arange(len(W)) * 5 + 1
    index = ProxyIndex(64, "ip", with_ids=True)
    index.add(W, ids)
    Q = rng.standard_normal((3 * SMALL_BATCH, 64)).astype(np.float32)
    calls = _gemm_calls(monkeypatch)
    S, _, got = index.search(Q, m)
    assert calls == [len(Q)]
    rows = (got - 1) // 5
    ref.assert_top_inner_products(rows, W, Q, m)
    np.testing.assert_allclose(S, np.take_along_axis(Q @ W.T, rows, 1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(index.similarity(Q), Q @ W.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("m", [1, 7])
def test_the_float16_prescan_returns_the_exact_neighbours(with_ids, m, monkeypatch):
    rng = np.random.default_rng(m)
    W = rng.standard_normal((12_000, 384)).astype(np.float32)  # 4.6M floats: past HALF_SCAN_MIN
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    W[100:110] = W[5]  # ties: equal vectors
    W[200:260] = W[7] + 1e-6 * rng.standard_normal((60, 384)).astype(np.float32)  # float16 cannot order these
    ids = rng.choice(10**9, len(W), replace=False).astype(np.int64)
    index = ProxyIndex(384, "ip", with_ids=with_ids)
    index.add(W, ids if with_ids else None)
    Q = np.concatenate([W[[5, 7, 3000]], rng.standard_normal((5, 384)).astype(np.float32)])
    fallbacks = _gemm_calls(monkeypatch)
    _, _, got = index.search(Q, m)
    ref.assert_top_inner_products(_rows(got, ids, with_ids), W, Q, m)  # ties in float32: any member will do
    assert fallbacks == [1]  # only the query among the 60 near-ties needed the float32 scan
    assert index._half is not None


@pytest.mark.parametrize("with_ids", [False, True])
def test_the_float16_copy_follows_every_change(with_ids):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((12_000, 384)).astype(np.float32)
    ids = np.arange(len(W)) * 3 + 7 if with_ids else np.arange(len(W))
    index = ProxyIndex(384, "ip", with_ids=with_ids)
    index.add(W, ids if with_ids else None)
    Q = 10 * rng.standard_normal((4, 384)).astype(np.float32)
    index.search(Q, 3)
    copy = index._half[0]

    def check():
        _, _, got = index.search(Q, 3)
        ref.assert_top_inner_products(_rows(got, ids, True), W, Q, 3)
        assert index._half[0] is copy and copy.ntotal == index.ntotal  # updated in step, not rebuilt

    check()
    new = Q[:2] * 3  # scores 9 |q|^2: the best matches now
    index.add(new, np.array([10**6, 10**6 + 1]) if with_ids else None)
    W, ids = np.concatenate([W, new]), np.concatenate([ids, [10**6, 10**6 + 1] if with_ids else [len(W), len(W) + 1]])
    check()
    if with_ids:
        index.remove(np.array([10**6, ids[500]]))
        keep = ~np.isin(ids, [10**6, ids[500]])
    else:
        index.remove(np.arange(500, 900))  # rows shift down, in the copy too
        keep = (ids < 500) | (ids >= 900)
    W, ids = W[keep], (ids[keep] if with_ids else np.arange(keep.sum()))
    check()


def test_entries_beyond_float16_range_skip_the_copy():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((12_000, 384)).astype(np.float32)
    W[9] *= 1e5  # 65504 is float16's largest value
    index = ProxyIndex(384, "ip")
    index.add(W)
    Q = rng.standard_normal((3, 384)).astype(np.float32)
    ref.assert_top_inner_products(index.search(Q, 4)[2], W, Q, 4)


def test_the_error_bound_catches_a_best_vector_float16_underrates():
    """The true best vector rounds down in float16 below 20 others that round up; one of those
    scores, exactly, above their float16 scores. Without the error bound that row would look
    settled and the wrong vector would win."""
    rng = np.random.default_rng(2)
    W = 1e-3 * rng.standard_normal((12_000, 384)).astype(np.float32)
    W[:, :4] = 0.0
    W[50, :4] = 0.125 + 6e-5  # each entry rounds down (float16 spacing at 0.125: 2^-13)
    W[60:80, :4] = [0.125 + 6.2e-5, 0.125, 0.125, 0.125]  # rounds up: float16 score above W[50]'s
    W[70, :4] = [0.125 + 6.2e-5, 0.125 + 5.9e-5, 0.125 + 5.9e-5, 0.125 + 5.9e-5]  # exactly just below W[50]
    q = np.zeros((1, 384), np.float32)
    q[0, :4] = 1.0
    assert _reference_top(W, q, 1)[0, 0] == 50
    index = ProxyIndex(384, "ip")
    index.add(W)
    assert index.search(q, 1)[2][0, 0] == 50

"""ProxyIndex: the small-batch numpy path and the FAISS path give the same neighbours."""

from __future__ import annotations

import numpy as np
import pytest

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
        np.testing.assert_allclose(sim[:, :k], np.take_along_axis(S[: len(got)], np.argsort(-S[: len(got)], 1)[:, :k], 1),
                                   rtol=1e-4, atol=1e-4)
        assert (got[:, k:] == -1).all()

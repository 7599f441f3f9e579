"""The torch backend (device.py): the same k-means and exact search as the numpy/FAISS path, run
on the CPU everywhere and on the GPU too where torch sees one (``TORCH_DEVICES``), and the device
setting's errors and fallback."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import blobs, shared_data

from retrieval_imprint import Collection, ImprintClassifier, device, torch_search
from retrieval_imprint._groups import Grouped
from retrieval_imprint.cli import main
from retrieval_imprint.errors import DeviceError
from retrieval_imprint.index import ProxyIndex
from retrieval_imprint.kmeans import batched_kmeans
from retrieval_imprint.labels import label_keys
from retrieval_imprint.normalize import l2_normalize

NO_GPU = not torch.cuda.is_available()
TORCH_DEVICES = ["cpu"] + ([] if NO_GPU else ["cuda"])  # where the torch backend is checked against numpy


@pytest.fixture(autouse=True)
def process_default():
    """Each test starts and ends on the numpy/FAISS path."""
    device.set_device(None)
    yield
    device.set_device(None)


def grouped(X: np.ndarray, y: np.ndarray) -> Grouped:
    classes, codes = np.unique(y, return_inverse=True)
    return Grouped.from_codes(l2_normalize(X), codes, label_keys(classes))


def inertia(groups: Grouped, centres: np.ndarray) -> float:
    """Summed squared distance of each sample to the nearest centre of its class (float64)."""
    X, C = groups.X.astype(np.float64), centres.astype(np.float64)[groups.owner]
    return float(((X[:, None, :] - C) ** 2).sum(-1).min(1).sum())


def test_unknown_devices_and_a_missing_gpu_are_clear_errors():
    with pytest.raises(DeviceError, match="device='tpu' is not valid"):
        device.resolve("tpu")
    with pytest.raises(DeviceError, match="device='tpu'"):
        ImprintClassifier(device="tpu").fit(*blobs(2, 5, 3))
    if NO_GPU:
        with pytest.raises(DeviceError, match="sees no CUDA GPU.*device='auto'"):
            device.resolve("cuda")
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            ImprintClassifier(device="cuda").fit(*blobs(2, 5, 3))


@pytest.mark.skipif(not NO_GPU, reason="the fallback is what a machine without a GPU does")
def test_auto_without_a_gpu_falls_back_to_numpy_with_one_notice():
    with pytest.warns(device.DeviceFallback, match="no CUDA GPU; running on the CPU with numpy and FAISS"):
        assert device.resolve("auto") is None
    X, y = blobs(4, 12, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", device.DeviceFallback)
        auto = ImprintClassifier(generator="kmeans", k=3, aggregation="max", device="auto").fit(X, y)
    plain = ImprintClassifier(generator="kmeans", k=3, aggregation="max").fit(X, y)
    np.testing.assert_array_equal(auto.proxies_, plain.proxies_)


def test_use_device_nests_over_the_process_default():
    assert device.current() is None
    device.set_device("cpu")
    assert device.current() == "cpu"
    with device.use_device(None):  # None inside a block: the process's setting
        assert device.current() == "cpu"
    device.set_device(None)
    with device.use_device("cpu"):
        assert device.current() == "cpu"
    assert device.current() is None


@pytest.mark.skipif(NO_GPU, reason="what 'auto' picks on a machine with a GPU")
def test_auto_takes_the_gpu_when_torch_sees_one():
    assert device.resolve("auto") == "cuda"


@pytest.mark.parametrize("dev", TORCH_DEVICES)
@pytest.mark.parametrize("k", [2, 5])
def test_torch_kmeans_matches_numpy_centroids_and_objective(k, dev):
    X, y = blobs(300, 24, 32, seed=3)
    groups = grouped(X, y)
    ours = batched_kmeans(groups, k, 7)
    with device.use_device(dev):
        theirs = batched_kmeans(groups, k, 7)
    close = np.abs(ours - theirs).max(-1) <= 1e-4
    assert close.mean() >= 0.999, close.mean()
    assert inertia(groups, theirs) == pytest.approx(inertia(groups, ours), rel=1e-3)


@pytest.mark.parametrize("dev", TORCH_DEVICES)
def test_torch_kmeans_handles_padding_empty_clusters_and_identical_points(dev):
    rng = np.random.default_rng(0)
    sizes = [4, 9, 30, 5]  # uneven classes share padded blocks
    X = rng.standard_normal((sum(sizes), 16)).astype(np.float32)
    X[4:13] = X[4]  # one class of identical points: every centre is that point
    y = np.repeat(np.arange(len(sizes)), sizes)
    groups = Grouped.from_codes(X, y, label_keys(np.arange(len(sizes))))
    with device.use_device(dev):
        theirs = batched_kmeans(groups, 3, 1)
    np.testing.assert_allclose(theirs, batched_kmeans(groups, 3, 1), atol=1e-5)
    np.testing.assert_allclose(theirs[1], np.broadcast_to(X[4], (3, 16)), atol=1e-6)


@pytest.mark.parametrize("dev", TORCH_DEVICES)
def test_classes_already_on_the_device_give_the_same_centroids(dev):
    """Grouped rows may be a tensor on the device (embeddings made there): no copy in, same k-means,
    through both the view of equal classes and the zero-padded copy of unequal ones."""
    X, y = blobs(40, 12, 16, seed=8)
    y[:5] = 39  # unequal class sizes: zero-padded blocks
    groups = grouped(X, y)
    with device.use_device(dev):
        want = batched_kmeans(groups, 3, 2)
        on_device = Grouped(device.to_device(groups.X, dev), groups.offsets, groups.keys)
        np.testing.assert_array_equal(batched_kmeans(on_device, 3, 2), want)


@pytest.mark.parametrize("dev", TORCH_DEVICES)
def test_prefetched_blocks_arrive_whole_and_in_order(dev):
    rng = np.random.default_rng(0)
    blocks = [(i, rng.standard_normal((i + 1, 3)).astype(np.float32), rng.random(i + 2) < 0.5) for i in range(5)]
    got = list(device.prefetched(iter(blocks), dev))
    assert [tag for tag, *_ in got] == list(range(5))
    for (_, P, mask), (_, P_dev, mask_dev) in zip(blocks, got):
        assert P_dev.device.type == dev and mask_dev.device.type == dev
        np.testing.assert_array_equal(device.to_numpy(P_dev), P)
        np.testing.assert_array_equal(device.to_numpy(mask_dev), mask)


@pytest.mark.parametrize("dev", TORCH_DEVICES)
@pytest.mark.parametrize("stage_rows", [1, 3, 64])  # a row per stage, many stages with a partial last, one
def test_results_come_back_whole_through_the_staging_buffer(dev, stage_rows, monkeypatch):
    monkeypatch.setattr(device, "STAGE_BYTES", 4 * 3 * 7 * stage_rows)
    want = np.random.default_rng(3).standard_normal((50, 3, 7)).astype(np.float32)
    got = np.empty_like(want)
    device.copy_to_host(got, device.to_device(want, dev))
    np.testing.assert_array_equal(got, want)
    rows = np.random.default_rng(4).permutation(80)[:50]  # scattered into the rows of a larger array
    scattered = np.zeros((80, 3, 7), np.float32)
    device.copy_to_host(scattered, device.to_device(want, dev), rows=rows)
    np.testing.assert_array_equal(scattered[rows], want)
    assert not scattered[np.setdiff1d(np.arange(80), rows)].any()


def brute_top(Q: np.ndarray, X: np.ndarray, kind: str) -> np.ndarray:
    """Reference scores ``(n_q, n)`` in float64, larger is better."""
    Q, X = Q.astype(np.float64), X.astype(np.float64)
    if kind == "ip":
        return Q @ X.T
    diff = np.abs(Q[:, None, :] - X[None])
    return -{"l2": (diff**2).sum(-1), "l1": diff.sum(-1), "linf": diff.max(-1)}[kind]


@pytest.mark.parametrize("dev", TORCH_DEVICES)
@pytest.mark.parametrize("kind", torch_search.KINDS)
@pytest.mark.parametrize("block_bytes", [64 << 20, 4 * 7 * 11])  # one block, and blocks of 11 rows merged
def test_blocked_top_k_equals_brute_force_with_ties(kind, block_bytes, dev, monkeypatch):
    monkeypatch.setitem(torch_search.SCORE_BYTES, dev, block_bytes)
    rng = np.random.default_rng(1)
    X = rng.integers(-2, 3, (60, 5)).astype(np.float32)  # small integers: many exact ties
    Q = rng.integers(-2, 3, (7, 5)).astype(np.float32)
    k = 9
    found = torch_search.top_k(device.to_device(Q, dev), device.to_device(X, dev), k, kind)
    s, rows = (device.to_numpy(t) for t in found)
    ref = brute_top(Q, X, kind)
    sign = 1.0 if kind == "ip" else -1.0
    best = -np.sort(-ref, 1)[:, :k]
    np.testing.assert_allclose(sign * s, best, rtol=0, atol=1e-5)  # the k best scores, best first
    np.testing.assert_allclose(np.take_along_axis(ref, rows, 1), best, rtol=0, atol=1e-5)  # ties are ties
    assert all(len(set(r)) == k for r in rows)


@pytest.mark.parametrize("dev", TORCH_DEVICES)
@pytest.mark.parametrize("metric", ["ip", "cosine", "euclidean", "manhattan", "chebyshev"])
def test_proxy_index_searches_alike_on_the_torch_backend(metric, dev):
    X, _ = blobs(40, 5, 12, seed=2)
    Q = blobs(3, 4, 12, seed=9)[0]
    index = ProxyIndex(12, metric, with_ids=True)
    index.add(X[:150], np.arange(150) * 10)
    want, want_similarity = index.search(Q, 7), index.similarity(Q)
    with device.use_device(dev):
        got = index.search(Q, 7)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert (got[2] == want[2]).mean() > 0.95  # only float32 near-ties may swap
        np.testing.assert_allclose(index.similarity(Q), want_similarity, atol=1e-5)
        index.add(X[150:], np.arange(150, 200) * 10)  # the device copy follows adds and removals
        assert index.search(X[150:151], 1)[2][0, 0] == 1500
        index.remove(np.array([1500]))
        assert index.search(X[150:151], 1)[2][0, 0] != 1500
        assert (index.search(Q, 300)[2][:, 199:] == -1).all()  # fewer stored than asked: id -1


@pytest.mark.parametrize("dev", TORCH_DEVICES)
def test_torch_backend_predicts_like_numpy_for_every_aggregation(dev):
    X, y = blobs(20, 30, 16, seed=4)
    Xq, _ = blobs(20, 10, 16, seed=5)
    for params in (
        dict(generator="kmeans", k=4, aggregation="max"),
        dict(generator="kmeans", k=4, aggregation="mnn", m=5),
        dict(generator="kls", k=3, aggregation="max"),
        dict(generator="kmeans", k=3, aggregation="blend", alpha=0.5),
        dict(),
    ):
        ours = ImprintClassifier(**params).fit(X, y)
        theirs = ImprintClassifier(**params, device=dev).fit(X, y)
        assert theirs.auto_choice_ == ours.auto_choice_
        np.testing.assert_allclose(theirs.proxies_, ours.proxies_, atol=1e-4)
        np.testing.assert_array_equal(theirs.predict(Xq), ours.predict(Xq))


@pytest.mark.parametrize("dev", TORCH_DEVICES)
def test_collections_query_on_the_process_device(tmp_path, dev):
    X, y = blobs(30, 8, 10, seed=6)
    col = Collection.create(tmp_path / "c", model=None, generator="kmeans", k=2, aggregation="max")
    col.add(X, y)
    want = col.query(X[:20], top=3)
    device.set_device(dev)
    got = col.query(X[:20], top=3)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
    col.add(X[:8] + 5.0, [999] * 8)  # imprinted with torch k-means, found by torch search
    assert col.predict(X[:1] + 5.0)[0] == 999


def test_the_cli_takes_device(tmp_path):
    X, y = blobs(6, 12, 8)
    np.savez(tmp_path / "v.npz", X=X, y=y)
    runner = CliRunner()
    result = runner.invoke(
        main, ["--device", "cpu", "index", str(tmp_path / "c"), str(tmp_path / "v.npz"), "--model", "none", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert device.current() == "cpu"
    result = runner.invoke(main, ["--device", "tpu", "info", str(tmp_path / "c")])
    assert result.exit_code == 2 and "device='tpu' is not valid" in result.output
    if NO_GPU:
        result = runner.invoke(main, ["info", str(tmp_path / "c")], env={"IMPRINT_DEVICE": "cuda"})
        assert result.exit_code == 2 and "sees no CUDA GPU" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("dev", TORCH_DEVICES)
@pytest.mark.parametrize("name", ["clinc150", "banking77"])
def test_torch_backend_predicts_real_data_identically(name, dev):
    """Real embeddings: the same predictions from the torch backend for the generators built on
    k-means (kmeans, kls, and auto's choice) under max and m-NN."""
    with np.load(shared_data(name, "embeddings.npz")) as z:
        X, y, Xq = z["train_X"], z["train_y"], z["test_X"]
    for params in (
        dict(generator="kmeans", k=20, aggregation="max"),
        dict(generator="kmeans", k=5, aggregation="mnn", m=10),
        dict(generator="kls", k=2, aggregation="max"),
        dict(),
    ):
        ours = ImprintClassifier(**params).fit(X, y)
        theirs = ImprintClassifier(**params, device=dev).fit(X, y)
        assert theirs.auto_choice_ == ours.auto_choice_, params
        close = np.abs(theirs.proxies_ - ours.proxies_).max(1) <= 1e-4
        assert close.mean() >= 0.999, (params, close.mean())
        np.testing.assert_array_equal(theirs.predict(Xq), ours.predict(Xq))


@pytest.mark.skipif(not NO_GPU, reason="the notice is what a machine without a GPU gets")
def test_faiss_without_a_gpu_keeps_ivf_on_the_cpu_with_a_notice():
    """faiss-cpu, or faiss-gpu on a machine without a GPU (the CI's GPU-extra install): IVF indexes
    are trained and searched on the CPU, and the notice says why."""
    import faiss

    with pytest.warns(device.DeviceFallback, match="no GPU support|IVF indexes are trained and searched on the CPU"):
        assert device.faiss_gpu("cuda") is None
    assert device.faiss_gpu("cpu") is None and device.faiss_gpu(None) is None
    assert faiss.IndexFlatIP(4).ntotal == 0  # `import faiss` works whichever wheel provides it


def test_ray_shard_actors_get_a_share_of_the_clusters_gpus_or_a_clear_error():
    """A Ray actor sees only the GPUs it asks for: on a GPU device each shard's writer (or Serve
    replica) asks for a share, numbered from 0 in its own process; a cluster without GPUs is an error."""
    from retrieval_imprint.distributed import actors_on

    assert actors_on(None, 4, 0) == (None, {"num_cpus": 0})
    assert actors_on("cpu", 4, 2) == ("cpu", {"num_cpus": 0})
    assert actors_on("cuda:1", 4, 2) == ("cuda", {"num_cpus": 0, "num_gpus": 0.5})
    assert actors_on("cuda", 2, 8) == ("cuda", {"num_cpus": 0, "num_gpus": 1.0})
    with pytest.raises(DeviceError, match="the Ray cluster has no GPU"):
        actors_on("cuda", 2, 0)

"""Retrieval: exact top-k against brute force, backends agree, shards merge, IVF recall, averaging, banks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmrcnet.errors import ConfigError, InputError
from cmrcnet.retrieval import (
    Bank,
    ShardedIndex,
    build_bank,
    embed_images,
    l2_normalise,
    predict_from_neighbours,
    search,
)


def brute_force(q: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    s = qn.astype(np.float64) @ kn.T.astype(np.float64)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, 1), idx


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(40, 16)).astype(np.float32), rng.normal(size=(500, 16)).astype(np.float32)


@pytest.mark.parametrize("backend", ["torch", "faiss-flat", "auto"])
def test_exact_topk_matches_brute_force(data, backend: str) -> None:
    q, keys = data
    sims, idx = search(q * 3.0, keys * 0.5, k=7, backend=backend)  # scaling must not matter
    ref_s, ref_i = brute_force(q, keys, 7)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)
    assert sims.dtype == np.float32 and idx.dtype == np.int64
    assert np.all(np.diff(sims, axis=1) <= 1e-7)


def test_torch_and_faiss_flat_agree_and_chunking(data) -> None:
    q, keys = data
    st, it = search(q, keys, 10, "torch", chunk_bytes=4 * 500 * 3)  # 3 query rows per chunk
    sf, if_ = search(q, keys, 10, "faiss-flat")
    np.testing.assert_array_equal(it, if_)
    np.testing.assert_allclose(st, sf, atol=1e-5)


def test_k_larger_than_bank_is_clipped_and_bad_inputs(data) -> None:
    q, keys = data
    s, i = search(q, keys[:5], 50, "torch")
    assert i.shape == (40, 5) and sorted(i[0].tolist()) == list(range(5))
    with pytest.raises(InputError):
        search(q, keys[:, :8], 3)
    with pytest.raises(ConfigError):
        search(q, keys, 3, backend="annoy")
    with pytest.raises(ConfigError):
        search(q, keys, 0)


def test_sharded_index_equals_single_index(data, tmp_path) -> None:
    q, keys = data
    ref_s, ref_i = search(q, keys, 9, "faiss-flat")
    shards = [keys[:180], keys[180:]]
    for backend in ("faiss-flat", "torch"):
        s, i = ShardedIndex(shards, backend).search(q, 9)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(s, ref_s, atol=1e-5)
    paths = []
    for n, sh in enumerate(shards):
        p = tmp_path / f"shard{n}.npy"
        np.save(p, sh)
        paths.append(p)
    s, i = ShardedIndex(paths).search(q, 9)
    np.testing.assert_array_equal(i, ref_i)
    # a shard smaller than k still merges correctly
    s, i = ShardedIndex([keys[:4], keys[4:]]).search(q, 9)
    np.testing.assert_array_equal(i, ref_i)


def _clustered(n_keys: int, n_q: int, d: int = 32, clusters: int = 40, seed: int = 1):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    keys = centres[rng.integers(0, clusters, n_keys)] + 0.3 * rng.normal(size=(n_keys, d))
    qs = centres[rng.integers(0, clusters, n_q)] + 0.3 * rng.normal(size=(n_q, d))
    return qs.astype(np.float32), keys.astype(np.float32)


@pytest.mark.parametrize("backend, kwargs", [("faiss-ivf", {}), ("faiss-hnsw", {})])
def test_approximate_recall_on_clustered_data(backend: str, kwargs: dict) -> None:
    q, keys = _clustered(4000, 100)
    _, exact = search(q, keys, 10, "torch")
    _, approx = search(q, keys, 10, backend, **kwargs)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9, recall


def test_ivfpq_reranks_to_high_recall() -> None:
    q, keys = _clustered(4000, 100, d=64)
    _, exact = search(q, keys, 10, "torch")
    _, approx = search(q, keys, 10, "faiss-ivfpq")
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.95, recall


def test_blocked_topk_equals_topk() -> None:
    from cmrcnet.retrieval import topk_blocked

    scores = torch.from_numpy(np.random.default_rng(0).random((5, 1000)).astype(np.float32))
    v, i = topk_blocked(scores, 17, block=64)
    rv, ri = torch.topk(scores, 17, dim=1)
    torch.testing.assert_close(v, rv)
    torch.testing.assert_close(i, ri)


def test_search_is_fp32_under_outer_autocast(data) -> None:
    q, keys = data
    ref_s, ref_i = brute_force(q, keys, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, i = search(q, keys, 5, "torch", precision="fp32")
        pred, spread = predict_from_neighbours(s, i, keys)
    np.testing.assert_array_equal(i, ref_i)
    assert s.dtype == pred.dtype == np.float32


def test_bank_search_builds_an_index_once(monkeypatch) -> None:
    import cmrcnet.retrieval as r

    q, keys = _clustered(2000, 20)
    bank = Bank(l2_normalise(keys), np.zeros((2000, 3), np.float32), ["a", "b", "c"], [f"s:{i}" for i in range(2000)])
    builds = []
    real = r.build_faiss_index
    monkeypatch.setattr(r, "build_faiss_index", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    _, i1 = bank.search(q, 5, "faiss-ivf", nprobe=4)
    s2, i2 = bank.search(q, 5, "faiss-ivf", nprobe=64)  # query-time setting: same index
    s_exact, exact = bank.search(q, 5, "torch")
    np.testing.assert_allclose(s2, s_exact, atol=1e-5)  # L2 distances reported back as cosines
    assert len(builds) == 1
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(i2, exact)])
    assert recall == 1.0  # nprobe 64 >= nlist: every list scanned
    bank.search(q, 5, "faiss-ivf", nlist=8)  # a build setting: a second index
    assert len(builds) == 2


@pytest.mark.parametrize("bf16_faster", [False, True])
def test_auto_backend_by_bank_size(monkeypatch, bf16_faster: bool) -> None:
    import cmrcnet.runtime as rt
    from cmrcnet.retrieval import resolve_backend

    monkeypatch.setattr(rt, "bf16_is_faster", lambda device="cpu": bf16_faster)
    assert resolve_backend("auto", 10_000) == "torch"
    # exact: the bf16 threshold search where bf16 is faster, else FAISS's tiled fp32 top-k
    assert resolve_backend("auto", 1_000_000) == ("torch" if bf16_faster else "faiss-flat")
    assert resolve_backend("auto", 100_000) == ("torch" if bf16_faster else "faiss-flat")
    assert resolve_backend("auto", 60_000) == "faiss-flat"  # FAISS flat wins below the bf16 search's minimum
    assert resolve_backend("auto", 1_000_000, precision="fp32") == "faiss-flat"  # fp32 asked for: FAISS's is faster
    if not bf16_faster:
        assert resolve_backend("auto", 3_000_000, auto_exact_max=5_000_000) == "faiss-flat"
    assert resolve_backend("auto", 3_000_000) == "faiss-ivfpq"
    assert resolve_backend("faiss-hnsw", 10) == "faiss-hnsw"  # explicit choice wins


def test_auto_switches_to_ivf_above_threshold() -> None:
    q, keys = _clustered(2000, 20)
    _, exact = search(q, keys, 5, "torch")
    _, auto = search(q, keys, 5, "auto", auto_exact_max=100, nprobe=64)
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(auto, exact)])
    assert recall >= 0.95


def test_predict_mean_and_spread() -> None:
    rng = np.random.default_rng(0)
    expr = rng.random((30, 6)).astype(np.float32)
    idx = np.array([[0, 5, 7], [3, 3, 29]])
    sims = np.array([[0.9, 0.5, 0.1], [0.8, 0.2, -0.5]], np.float32)
    pred, spread = predict_from_neighbours(sims, idx, expr)
    np.testing.assert_allclose(pred, expr[idx].mean(1), rtol=1e-6)
    np.testing.assert_allclose(spread, expr[idx].std(1), rtol=1e-5, atol=1e-7)
    # similarity weighting: w ∝ max(sim, 0)
    pred_w, _ = predict_from_neighbours(sims, idx, expr, "similarity")
    w = np.maximum(sims, 0)
    w = w / w.sum(1, keepdims=True)
    np.testing.assert_allclose(pred_w, (w[:, :, None] * expr[idx]).sum(1), rtol=1e-5)
    # softmax weighting: w ∝ exp(sim / T)
    pred_s, _ = predict_from_neighbours(sims, idx, expr, "softmax", temperature=0.5)
    w = np.exp(sims / 0.5)
    w = w / w.sum(1, keepdims=True)
    np.testing.assert_allclose(pred_s, (w[:, :, None] * expr[idx]).sum(1), rtol=1e-5)
    # all similarities <= 0 -> plain mean, not a division by zero
    p0, _ = predict_from_neighbours(-np.abs(sims), idx, expr, "similarity")
    np.testing.assert_allclose(p0, pred, rtol=1e-6)
    with pytest.raises(ConfigError):
        predict_from_neighbours(sims, idx, expr, "median")


def test_predict_ignores_missing_neighbours() -> None:
    expr = np.arange(12, dtype=np.float32).reshape(4, 3)
    pred, _ = predict_from_neighbours(np.array([[0.9, -np.inf]]), np.array([[2, -1]]), expr)
    np.testing.assert_allclose(pred, expr[[2]])


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_bank_roundtrip_is_atomic(tmp_path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    bank = Bank(
        l2_normalise(rng.normal(size=(5, 4))),
        rng.random((5, 3)).astype(np.float32),
        ["A", "B", "C"],
        np.array([f"s1:bc{i}" for i in range(5)]),
    )
    path = tmp_path / f"bank{suffix}"
    bank.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left
    back = Bank.load(path)
    np.testing.assert_array_equal(back.embeddings, bank.embeddings)
    np.testing.assert_array_equal(back.expression, bank.expression)
    assert back.genes == bank.genes and back.spot_ids.tolist() == bank.spot_ids.tolist()
    with pytest.raises(InputError):
        Bank.load(tmp_path / "missing.npz")


def test_bank_shape_checks() -> None:
    with pytest.raises(InputError):
        Bank(np.zeros((3, 4)), np.zeros((2, 2)), ["a", "b"], np.array(["x", "y", "z"]))
    with pytest.raises(InputError):
        Bank(np.zeros((2, 4)), np.zeros((2, 2)), ["a"], np.array(["x", "y"]))


class _ToyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)
        self.drop = torch.nn.Dropout(0.9)

    def embed_genes(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.lin(x))

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1)[:, :6])


def test_build_bank_uses_eval_mode_and_normalises() -> None:
    model = _ToyModel().train()
    expr = np.random.default_rng(0).random((10, 6)).astype(np.float32)
    bank = build_bank(model, expr, list("abcdef"), [f"s:{i}" for i in range(10)], batch_size=3)
    assert model.training  # restored
    with torch.no_grad():
        ref = model.lin(torch.from_numpy(expr)).numpy()
    np.testing.assert_allclose(bank.embeddings, l2_normalise(ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(bank.embeddings, axis=1), 1.0, rtol=1e-5)
    imgs = embed_images(model, np.random.default_rng(1).random((5, 1, 2, 3)).astype(np.float32), batch_size=2)
    assert imgs.shape == (5, 4)


def test_end_to_end_with_cmrcnet_tiny() -> None:
    from cmrcnet.models.cmrcnet import CMRCNet, CMRCNetConfig

    torch.manual_seed(0)
    cfg = CMRCNetConfig(
        encoder="vit_tiny_patch16_224",
        encoder_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
        img_size=32,
        reconstruction=False,
    )
    model = CMRCNet(cfg, 8)
    expr = np.random.default_rng(0).random((50, 8)).astype(np.float32)
    bank = build_bank(model, expr, [f"g{i}" for i in range(8)], [f"s:{i}" for i in range(50)])
    q = embed_images(model, torch.randn(4, 3, 32, 32))
    sims, idx = search(q, bank.embeddings, 5)
    pred, spread = predict_from_neighbours(sims, idx, bank.expression)
    assert pred.shape == spread.shape == (4, 8) and np.isfinite(pred).all()


def test_bad_index_settings_are_config_errors() -> None:
    from cmrcnet.retrieval import build_faiss_index

    _, keys = _clustered(500, 5)
    with pytest.raises(ConfigError, match="pq_m"):
        build_faiss_index(keys, "faiss-ivfpq", pq_m=5)  # does not divide 32
    with pytest.raises(ConfigError, match="not a FAISS backend"):
        build_faiss_index(keys, "torch")

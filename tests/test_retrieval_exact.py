"""The bf16 exact search (retrieval.search_torch, precision="bf16"): its error bound holds, and
its result equals fp32 brute force on random banks and on adversarial ones (exact duplicates,
near-ties inside bf16's resolution, a k-th score inside a tie group), whatever the block sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmrcnet import retrieval as R
from cmrcnet.errors import ConfigError
from cmrcnet.retrieval import bf16_score_eps, l2_normalise, search_torch


def exact_scores(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return q.astype(np.float64) @ keys.T.astype(np.float64)


def assert_exact(q: np.ndarray, keys: np.ndarray, k: int, sims: np.ndarray, idx: np.ndarray) -> None:
    """The returned keys are a true top-k (their exact scores are the k largest, in order; which
    of several keys tied within fp32 rounding is returned may differ) and sims are fp32 scores."""
    ref = exact_scores(q, keys)
    want = -np.sort(-ref, axis=1)[:, :k]
    got = np.take_along_axis(ref, idx, 1)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)  # fp32 rounding of a d-term dot product
    np.testing.assert_allclose(sims, got, atol=1e-6, rtol=0)
    assert all(len(set(r)) == k for r in idx), "a key returned twice"
    assert sims.dtype == np.float32 and idx.dtype == np.int64


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return l2_normalise(rng.normal(size=shape))


@pytest.mark.parametrize("n,m,d,k,block,rows", [
    (60, 3000, 32, 10, 256, 16),
    (40, 5000, 64, 50, 1024, 40),
    (30, 700, 16, 1, 64, 7),
    (20, 300, 8, 300, 64, 8),   # k = bank size
    (25, 90, 16, 5, 4096, 1000),  # one block larger than the bank
])
def test_random_banks_equal_brute_force(n: int, m: int, d: int, k: int, block: int, rows: int) -> None:
    rng = np.random.default_rng(n * m + k)
    q, keys = _unit(rng, n, d), _unit(rng, m, d)
    sims, idx = search_torch(q, keys, k, precision="bf16", block=block, chunk_rows=rows)
    assert_exact(q, keys, k, sims, idx)
    fs, fi = search_torch(q, keys, k, precision="fp32")
    np.testing.assert_array_equal(idx, fi)  # no ties in a random bank: the same keys in the same order
    np.testing.assert_allclose(sims, fs, atol=1e-6)


def test_duplicates_and_near_ties() -> None:
    """Groups of 30 copies of a key, exact and perturbed by 1e-4 (far inside bf16's error): the
    bf16 scores cannot separate them, the fp32 re-rank must; the k-th score falls inside a group."""
    rng = np.random.default_rng(3)
    base = _unit(rng, 60, 32)
    exact_dups = np.repeat(base[:30], 30, 0)
    near = l2_normalise(np.repeat(base[30:], 30, 0) + 1e-4 * rng.normal(size=(900, 32)))
    keys = np.ascontiguousarray(rng.permutation(np.concatenate([exact_dups, near])))
    q = l2_normalise(base + 0.05 * rng.normal(size=base.shape))
    R.SEARCH_STATS.update(fp32_fallbacks=0)
    for k in (10, 45, 61):
        sims, idx = search_torch(q, keys, k, precision="bf16", block=128, chunk_rows=17)
        assert_exact(q, keys, k, sims, idx)
    assert R.SEARCH_STATS["fp32_fallbacks"] == 0  # the bf16 path itself was tested


def _cone(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Trained gene embeddings sit within cosine 0.98-0.99 of each other (the her2st bank: 0.12 from
    its mean direction, median key 0.987, 50th neighbour 0.991): most keys are inside the bf16
    error of the k-th score."""
    centre = _unit(rng, 1, 64)
    keys = l2_normalise(centre + 0.015 * rng.normal(size=(4000, 64)))
    return l2_normalise(centre + 0.015 * rng.normal(size=(30, 64))), keys


def test_narrow_cone_bank_exact_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nearly every key a candidate (the give-up rule switched off): the bf16 path is still exact."""
    q, keys = _cone(np.random.default_rng(4))
    monkeypatch.setattr(R, "BF16_MAX_KEPT", 1.0)
    R.SEARCH_STATS.update(rows=0, candidates=0, fp32_fallbacks=0)
    sims, idx = search_torch(q, keys, 50, precision="bf16", block=512, chunk_rows=8)
    assert_exact(q, keys, 50, sims, idx)
    assert R.SEARCH_STATS["fp32_fallbacks"] == 0 and R.SEARCH_STATS["candidates"] > 30 * 2000


def test_narrow_cone_bank_goes_to_fp32() -> None:
    """A bank bf16 cannot prune (the real trained bank kept ~80 % of its pairs, and ran out of
    memory at 20k keys): the probe says so before any work, ``search`` routes it to fp32, and
    ``search_torch`` asked for bf16 gives up after its first block and finishes in fp32. Exact."""
    rng = np.random.default_rng(4)
    q, keys = _cone(rng)
    assert not R.bf16_prunes(q, keys, 50, block=512)
    spread_q, spread = _unit(rng, 30, 64), _unit(rng, 4000, 64)
    assert R.bf16_prunes(spread_q, spread, 50, block=512)
    assert R.exact_route("torch", "bf16", q, keys, 50) == ("torch", "fp32")
    assert R.exact_route("torch", "bf16", spread_q, spread, 50) == ("torch", "bf16")
    R.SEARCH_STATS.update(rows=0, candidates=0, fp32_fallbacks=0)
    sims, idx = search_torch(q, keys, 50, precision="bf16", block=512, chunk_rows=8)
    assert_exact(q, keys, 50, sims, idx)
    assert R.SEARCH_STATS["fp32_fallbacks"] == 1 and R.SEARCH_STATS["rows"] == 0  # every chunk in fp32
    sims, idx = R.search(q, keys, 50, backend="torch", precision="bf16")
    assert_exact(q, keys, 50, sims, idx)


def test_auto_sends_a_cone_bank_to_faiss_flat(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``auto`` would run the bf16 search (a large bank, bf16 faster), a cone bank goes to
    FAISS flat instead, as it would on a CPU without fast bf16."""
    pytest.importorskip("faiss")
    import cmrcnet.runtime as rt

    monkeypatch.setattr(rt, "bf16_is_faster", lambda device="cpu": True)
    monkeypatch.setattr(R, "TORCH_BF16_MIN", 1000)
    monkeypatch.setattr(R, "TORCH_EXACT_MAX", 1000)
    q, keys = _cone(np.random.default_rng(4))
    assert R.exact_route("auto", "auto", q, keys, 50) == ("faiss-flat", "fp32")
    rng = np.random.default_rng(6)
    assert R.exact_route("auto", "auto", _unit(rng, 30, 64), _unit(rng, 4000, 64), 50) == ("torch", "auto")


def test_threshold_prunes_random_banks() -> None:
    """The running threshold keeps few candidates per query on a spread bank (not the whole bank)."""
    rng = np.random.default_rng(5)
    q, keys = _unit(rng, 50, 128), _unit(rng, 20000, 128)
    R.SEARCH_STATS.update(rows=0, candidates=0)
    search_torch(q, keys, 20, precision="bf16", block=2048)
    assert R.SEARCH_STATS["rows"] == 50
    assert R.SEARCH_STATS["candidates"] < 50 * 2000, R.SEARCH_STATS


def _bf16_scores(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return (torch.from_numpy(q).bfloat16() @ torch.from_numpy(keys).bfloat16().T).double().numpy()


@pytest.mark.parametrize("d", [8, 64, 256, 768])
def test_bf16_error_bound_holds(d: int) -> None:
    """|bf16 score - exact| <= bf16_score_eps(d) for random vectors and for ones built to round
    badly: components just off bf16's rounding midpoints, all of one sign, and near-parallel pairs
    (scores near 1, where the output rounding is largest)."""
    rng = np.random.default_rng(d)
    rand = _unit(rng, 200, d)
    mid = (1 + 2.0**-9 * (1 - 1e-3)) * np.sign(rng.normal(size=(100, d)))  # relative error ~2**-9 each
    midpoints = l2_normalise(mid * 2.0 ** rng.integers(-3, 3, size=(100, d)))
    same_sign = l2_normalise(np.abs(rng.normal(size=(100, d))) * (1 + 2.0**-9))
    near = l2_normalise(same_sign + 1e-3 * rng.normal(size=same_sign.shape))
    vecs = np.concatenate([rand, midpoints, same_sign, near]).astype(np.float32)
    err = np.abs(_bf16_scores(vecs, vecs) - exact_scores(vecs, vecs)).max()
    eps = bf16_score_eps(d)
    assert err <= eps, (err, eps)
    assert err > eps / 8  # the adversarial vectors do come near the bound: it is not vacuous slack


def test_auto_precision_follows_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    import cmrcnet.runtime as rt

    big = R.TORCH_BF16_MIN
    monkeypatch.setattr(rt, "bf16_is_faster", lambda device="cpu": True)
    assert R.exact_precision("auto", big) == "bf16"
    assert R.exact_precision("auto", big - 1) == "fp32"  # small banks: the threshold search does not pay
    monkeypatch.setattr(rt, "bf16_is_faster", lambda device="cpu": False)
    assert R.exact_precision("auto", big) == "fp32"
    assert R.exact_precision("bf16", 10) == "bf16" and R.exact_precision("fp32", big) == "fp32"
    with pytest.raises(ConfigError):
        R.exact_precision("fp8", big)


def test_bank_search_routes_a_cone_bank_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Bank.search`` (what predict calls): a cone bank is not converted to bf16 but gets a cached
    FAISS flat index, and the neighbours are exact."""
    pytest.importorskip("faiss")
    import cmrcnet.runtime as rt

    monkeypatch.setattr(rt, "bf16_is_faster", lambda device="cpu": True)
    monkeypatch.setattr(R, "TORCH_BF16_MIN", 1000)
    monkeypatch.setattr(R, "TORCH_EXACT_MAX", 1000)
    q, keys = _cone(np.random.default_rng(4))
    bank = R.Bank(keys, np.zeros((len(keys), 2), np.float32), ["a", "b"], np.arange(len(keys)).astype(str))
    for _ in range(2):
        sims, idx = bank.search(q, 50)
        assert_exact(q, bank.embeddings, 50, sims, idx)
    assert "_keys_bf16" not in bank.__dict__
    assert [b for b, _ in bank.__dict__["_indexes"]] == ["faiss-flat"]


def test_bank_search_probes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bf16 probe runs once per ``Bank.search`` (the bank routes, ``search`` does not again)."""
    import cmrcnet.runtime as rt

    monkeypatch.setattr(rt, "bf16_is_faster", lambda device="cpu": True)
    monkeypatch.setattr(R, "TORCH_BF16_MIN", 1000)
    calls = []
    probe = R.bf16_prunes
    monkeypatch.setattr(R, "bf16_prunes", lambda *a, **kw: calls.append(1) or probe(*a, **kw))
    rng = np.random.default_rng(7)
    q, keys = _unit(rng, 30, 64), _unit(rng, 4000, 64)
    bank = R.Bank(keys, np.zeros((len(keys), 1), np.float32), ["g"], np.arange(len(keys)).astype(str))
    sims, idx = bank.search(q, 20, backend="torch")
    assert_exact(q, bank.embeddings, 20, sims, idx)
    assert len(calls) == 1 and "_keys_bf16" in bank.__dict__

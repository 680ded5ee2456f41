"""Normalisation, HVGs, gene-set selection (train vs all), expression targets, names."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cmrcnet.config import GeneConfig
from cmrcnet.data import genes as G
from cmrcnet.data.sample import Sample
from cmrcnet.errors import ConfigError, InputError


def counts_adata(n_spots: int, genes: list[str], seed: int = 0, variable: list[str] = (), sparse: bool = True):
    """Poisson counts; genes in ``variable`` switch between low and high expression."""
    rng = np.random.default_rng(seed)
    lam = rng.uniform(1.0, 5.0, size=len(genes))
    x = rng.poisson(lam, size=(n_spots, len(genes))).astype(np.int64)
    for g in variable:
        j = genes.index(g)
        on = rng.random(n_spots) < 0.2  # same mean as the others, far larger dispersion
        x[:, j] = np.where(on, rng.poisson(5 * 3.0, n_spots), 0)  # mid-range mean: a well-filled bin
    a = ad.AnnData(X=sp.csr_matrix(x) if sparse else x)
    a.obs_names = [f"s{seed}_{i}" for i in range(n_spots)]
    a.var_names = list(genes)
    return a


def make_sample(sid: str, adata: ad.AnnData) -> Sample:
    return Sample(sample_id=sid, adata=adata, image=None, um_per_px=1.0, spot_diameter_um=55.0)


GENES = [f"G{i:03d}" for i in range(400)]


def test_normalize_log1p_matches_formula_and_keeps_counts():
    a = counts_adata(30, GENES)
    before = a.X.copy()
    n = G.normalize_log1p(a, target_sum=1e4)
    x = before.toarray().astype(np.float64)
    expected = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    assert n.X.dtype == np.float32
    np.testing.assert_allclose(np.asarray(n.X.todense()), expected, rtol=1e-5)
    assert (a.X != before).nnz == 0 and a.X.dtype == before.dtype  # counts untouched
    assert list(n.var_names) == GENES


def test_normalize_log1p_dense_and_zero_spot():
    a = counts_adata(10, GENES, sparse=False)
    a.X[0] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy: "Some cells have zero counts"
        n = G.normalize_log1p(a)
    assert np.isfinite(n.X).all() and (n.X[0] == 0).all()
    bad = a.copy()
    bad.X = bad.X.astype(float)
    bad.X[1, 1] = -1
    with pytest.raises(InputError, match="negative"):
        G.normalize_log1p(bad)


def test_highly_variable_finds_planted_genes_deterministically():
    a = counts_adata(120, GENES, variable=["G003", "G017", "G031"])
    top = G.highly_variable(a, 3)
    assert sorted(top) == ["G003", "G017", "G031"]
    assert G.highly_variable(a, 3) == top
    assert len(G.highly_variable(a, 10)) == 10


def test_highly_variable_all_nonconstant_when_n_top_large_and_tie_safe():
    a = counts_adata(50, GENES)
    x = a.X.toarray()
    x[:, 5] = 0  # constant
    a.X = sp.csr_matrix(x)
    out = G.highly_variable(a, 1000)
    assert "G005" not in out and len(out) == len(GENES) - 1
    # identical columns -> identical dispersions; still exactly n_top, broken by name
    x = a.X.toarray()
    x[:, 10:20] = x[:, [10]]
    b = ad.AnnData(X=sp.csr_matrix(x))
    b.var_names = GENES
    top = G.highly_variable(b, 15)
    assert len(top) == 15 and len(set(top)) == 15
    with pytest.raises(ConfigError):
        G.highly_variable(a, 0)


def _samples():
    # each sample has its own planted variable gene; T2 has an extra gene B01 nobody else has
    s1 = make_sample("T1", counts_adata(80, GENES, seed=1, variable=["G001", "G002"]))
    s2 = make_sample("T2", counts_adata(80, GENES, seed=2, variable=["G002", "G003"]))
    test_genes = GENES + ["ONLYTEST"]
    s3 = make_sample("X", counts_adata(80, test_genes, seed=3, variable=["G030", "ONLYTEST"]))
    return [s1, s2, s3]


def test_select_genes_train_only_has_no_test_leakage():
    samples = _samples()
    cfg = GeneConfig(n_hvg=2, selection="train", combine="union", include_markers=False)
    genes = G.select_genes(samples, ["T1", "T2"], cfg)
    assert genes == ["G001", "G002", "G003"]
    cfg_all = GeneConfig(n_hvg=2, selection="all", combine="union", include_markers=False)
    genes_all = G.select_genes(samples, ["T1", "T2"], cfg_all)
    assert "G030" in genes_all  # transductive: the test sample's HVG enters the set
    assert "ONLYTEST" not in genes_all  # never measured in training data
    assert genes_all == sorted(genes_all)


def test_select_genes_intersection_and_empty():
    samples = _samples()
    cfg = GeneConfig(n_hvg=2, combine="intersection", include_markers=False)
    assert G.select_genes(samples, ["T1", "T2"], cfg) == ["G002"]
    s4 = make_sample("T4", counts_adata(80, GENES, seed=4, variable=["G038", "G039"]))
    with pytest.raises(InputError, match="no genes selected"):
        G.select_genes(samples + [s4], ["T1", "T4"], cfg)


def test_select_genes_markers_appended_and_absent_warned():
    samples = _samples()
    cfg = GeneConfig(n_hvg=2, include_markers=True, markers=["G020", "ERBB2"])
    with pytest.warns(UserWarning, match="ERBB2"):
        genes = G.select_genes(samples, ["T1", "T2"], cfg)
    assert genes == ["G001", "G002", "G003", "G020"]
    # explicit markers override cfg.markers; an HVG marker is not duplicated
    genes = G.select_genes(samples, ["T1", "T2"], cfg, markers=["G002", "G021"])
    assert genes == ["G001", "G002", "G003", "G021"]
    cfg.include_markers = False
    assert G.select_genes(samples, ["T1", "T2"], cfg) == ["G001", "G002", "G003"]


def test_select_genes_bad_config():
    samples = _samples()
    with pytest.raises(ConfigError):
        G.select_genes(samples, ["T1"], GeneConfig(selection="everything"))
    with pytest.raises(ConfigError):
        G.select_genes(samples, ["T1"], GeneConfig(combine="xor"))
    with pytest.raises(InputError, match="unknown training"):
        G.select_genes(samples, ["nope"], GeneConfig())
    with pytest.raises(InputError, match="no training"):
        G.select_genes(samples, [], GeneConfig())


def test_expression_matrix_normalised_over_all_genes_missing_zero():
    a = counts_adata(25, GENES, seed=5)
    s = make_sample("S", a)
    full = np.asarray(G.normalize_log1p(a).X.todense())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = G.expression_matrix(s, ["G007", "G002"])
    assert y.dtype == np.float32 and y.shape == (25, 2)
    np.testing.assert_allclose(y, full[:, [7, 2]], rtol=1e-6)
    with pytest.warns(UserWarning, match="NOPE"):
        y = G.expression_matrix(s, ["G007", "NOPE", "G002"])
    assert (y[:, 1] == 0).all()
    np.testing.assert_allclose(y[:, [0, 2]], full[:, [7, 2]], rtol=1e-6)
    with pytest.raises(InputError, match="empty"):
        G.expression_matrix(s, [])
    with pytest.raises(InputError, match="none of"):
        G.expression_matrix(s, ["X1", "X2"])


def test_harmonise_gene_names():
    a = counts_adata(5, ["ERBB2", "GAPDH", "CD24"], seed=1)
    a.var["gene_ids"] = ["ENSG00000141736", "ENSG00000111640", "ENSG00000272398"]
    b = counts_adata(5, ["ENSG00000141736.13", "ENSG00000111640", "ENSG00000999999"], seed=2)
    c = counts_adata(5, ["ENSG00000000003", "X", "Y"], seed=3)
    c.var["gene_symbols"] = ["TSPAN6", "X", "Y"]
    d = counts_adata(5, ["A", "B", "C"], seed=4)
    d.var_names = ["A", "A", "C"]
    samples = [make_sample(str(i), x) for i, x in enumerate([a, b, c, d])]
    G.harmonise_gene_names(samples)
    assert list(b.var_names) == ["ERBB2", "GAPDH", "ENSG00000999999"]
    assert b.var["gene_ids"].tolist()[0] == "ENSG00000141736.13"
    assert list(c.var_names) == ["TSPAN6", "X", "Y"]
    assert d.var_names.is_unique and list(d.var_names)[0] == "A"
    assert list(a.var_names) == ["ERBB2", "GAPDH", "CD24"]


def test_check_genes_suggests_case():
    with pytest.warns(UserWarning, match="Erbb2 -> ERBB2"):
        present, missing = G.check_genes(["GAPDH", "Erbb2", "FOO"], ["GAPDH", "ERBB2"], what="marker gene")
    assert present == ["GAPDH"] and missing == ["Erbb2", "FOO"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert G.check_genes(["A"], ["A", "B"]) == (["A"], [])


def test_duplicated_names_rejected():
    a = counts_adata(5, ["A", "B", "C"])
    a.var_names = ["A", "A", "C"]
    with pytest.raises(InputError, match="harmonise_gene_names"):
        G.expression_matrix(make_sample("S", a), ["C"])

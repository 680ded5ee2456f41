"""Metrics, gene sets and benchmark tables (cmrcnet.evaluation)."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cmrcnet.errors import InputError
from cmrcnet.evaluation import metrics as M
from cmrcnet.evaluation import summary as S
from cmrcnet.evaluation.gene_sets import evaluation_sets, marker_genes, top_expressed, top_variable

GENES60 = [f"G{i}" for i in range(60)]
MARKERS = ["G3", "g5", "NOPE"]


# --------------------------------------------------------------------------- synthetic benchmark


def make_prediction(method: str, seed: int, fold: int, quality: float, top_k: int | None = None,
                    variant: str | None = None, const_gene: bool = False, n_side: int = 6,
                    with_image: bool = True, overrides: dict | None = None) -> ad.AnnData:
    """A prediction AnnData following the input contract; the ground truth depends on the fold only."""
    rng = np.random.default_rng(fold)
    n, g = n_side * n_side, len(GENES60)
    ii, jj = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    xy = np.stack([jj.ravel() * 40 + 60, ii.ravel() * 40 + 60], 1).astype(float)
    base = rng.gamma(2.0, 1.0, size=g)
    pattern = np.sin(xy[:, :1] / 60 + rng.uniform(0, 6, g)) + np.cos(xy[:, 1:] / 70 + rng.uniform(0, 6, g))
    obs = np.log1p(np.clip(base * (1 + 0.5 * pattern) + rng.normal(0, 0.3, (n, g)), 0, None))
    noise = np.random.default_rng(1000 + 17 * seed + 3 * fold + (top_k or 0) + len(method + (variant or "")))
    pred = quality * obs + (1 - quality) * noise.normal(obs.mean(0), obs.std(0) + 1e-3, size=obs.shape)
    pred = pred.astype(np.float32)
    if const_gene:
        pred[:, 0] = 1.0
    a = ad.AnnData(pred.copy())
    a.var_names = GENES60
    a.obs_names = [f"s{i}" for i in range(n)]
    a.layers["predicted"] = pred
    a.layers["observed"] = obs.astype(np.float32)
    a.obsm["spatial"] = xy
    sid = f"S{fold}"
    if with_image:
        img = np.random.default_rng(0).integers(150, 255, (80, 80, 3)).astype(np.uint8)
        a.uns["spatial"] = {sid: {"images": {"lowres": img},
                                  "scalefactors": {"tissue_lowres_scalef": 0.25, "spot_diameter_fullres": 30.0}}}
    meta = {"method": method, "sample_id": sid, "fold": fold, "seed": seed, "top_k": top_k,
            "markers": MARKERS, "gene_selection": "train"}
    if variant:
        meta["variant"] = variant
        meta["variant_overrides"] = dict(overrides or {})
    a.uns["cmrcnet"] = meta
    return a


def write_fake_bench(root: Path) -> Path:
    """2 methods x 2 seeds x 2 folds (+ k = 250/500 variants of the retrieval method, + ablation runs)."""
    for method, quality, ks in (("stnet", 0.3, [None]), ("cmrcnet", 0.7, [50, 250, 500])):
        for seed in (0, 1):
            for fold in (0, 1):
                for k in ks:
                    a = make_prediction(method, seed, fold, quality, top_k=k, const_gene=method == "stnet")
                    d = root / "runs" / method / f"seed{seed}" / f"fold{fold}"
                    d.mkdir(parents=True, exist_ok=True)
                    a.write_h5ad(d / ("pred.h5ad" if k in (None, 50) else f"pred_k{k}.h5ad"))
    # the settings come from uns["cmrcnet"]["variant_overrides"], never from the name
    variants = (("mse-mask0.3-image", 0.5, {"model.recon_loss": "mse", "model.mask_ratio": 0.3, "model.recon_target": "image"}),
                ("contrastive-only", 0.4, {"model.reconstruction": False}))
    for variant, quality, ov in variants:
        for fold in (0, 1):
            d = root / "ablation" / variant / f"fold{fold}"
            d.mkdir(parents=True, exist_ok=True)
            make_prediction("cmrcnet", 0, fold, quality, top_k=50, variant=variant, overrides=ov).write_h5ad(d / "pred.h5ad")
    return root


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_bench(tmp_path_factory.mktemp("bench"))


# --------------------------------------------------------------------------- metrics


def test_per_gene_metrics_match_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M, "_BLOCK", 7)  # exercise the block loop
    rng = np.random.default_rng(0)
    obs = rng.gamma(1.0, 1.0, (80, 20))
    pred = 0.5 * obs + rng.normal(0, 1, obs.shape)
    pred[:, 3] = np.round(pred[:, 3])  # ties for Spearman
    df = M.per_gene_metrics(pred.astype(np.float32), obs, [f"g{i}" for i in range(20)])
    p32 = pred.astype(np.float32).astype(np.float64)
    for j in range(20):
        assert df.loc[j, "pcc"] == pytest.approx(stats.pearsonr(p32[:, j], obs[:, j])[0], abs=1e-10)
        assert df.loc[j, "spearman"] == pytest.approx(stats.spearmanr(p32[:, j], obs[:, j])[0], abs=1e-10)
        assert df.loc[j, "mse"] == pytest.approx(np.mean((p32[:, j] - obs[:, j]) ** 2))
    assert not df["constant"].any()
    assert list(df.columns[:5]) == ["gene", "pcc", "spearman", "mse", "constant"]


def test_constant_gene_counts_as_zero() -> None:
    rng = np.random.default_rng(1)
    obs, pred = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    pred[:, 1] = 2.5  # constant prediction
    obs[:, 2] = 0.0  # constant ground truth
    df = M.per_gene_metrics(pred, obs, list("abcd"))
    assert df["constant"].tolist() == [False, True, True, False]
    assert df.loc[1, "pcc"] == 0.0 and df.loc[2, "spearman"] == 0.0
    assert df["pred_constant"].tolist() == [False, True, False, False]
    a = ad.AnnData(pred.astype(np.float32), layers={"observed": obs.astype(np.float32)})
    a.var_names = list("abcd")
    _, summary = M.evaluate_prediction(a, markers=[], ks=(2,))
    assert summary.set_index("set").loc["all", "n_constant"] == 2
    assert summary.set_index("set").loc["all", "mean_pcc"] == pytest.approx(df["pcc"].mean())


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="shape"):
        M.per_gene_metrics(np.zeros((5, 3)), np.zeros((5, 2)), list("abc"))
    x = np.ones((5, 2))
    x[0, 0] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        M.per_gene_metrics(x, np.ones((5, 2)), list("ab"))
    with pytest.raises(InputError, match="observed"):
        M.evaluate_prediction(ad.AnnData(np.ones((4, 2), dtype=np.float32)))


def test_gene_gene_correlation_similarity() -> None:
    rng = np.random.default_rng(2)
    latent = rng.normal(size=(200, 3))
    obs = latent @ rng.normal(size=(3, 12)) + 0.3 * rng.normal(size=(200, 12))
    assert M.gene_gene_correlation_similarity(obs, obs) == pytest.approx(1.0)
    noisy = obs + 2.0 * rng.normal(size=obs.shape)
    shuffled = rng.permuted(obs, axis=0)
    s_noisy, s_shuf = (M.gene_gene_correlation_similarity(p, obs) for p in (noisy, shuffled))
    assert 0.3 < s_noisy < 1.0 and s_shuf < s_noisy
    assert M.gene_gene_correlation_similarity(np.ones_like(obs), obs) == 0.0
    assert np.isnan(M.gene_gene_correlation_similarity(obs[:, :2], obs[:, :2]))


# --------------------------------------------------------------------------- gene sets


def test_heg_hvg_selection() -> None:
    genes = ["lowvar_high", "mid", "highvar_low", "tie_a", "tie_b"]
    obs = np.array([[10, 3, 0, 1, 1], [10, 4, 8, 1, 1], [10, 5, 0, 1, 1], [10, 4, 8, 1, 1]], dtype=float)
    assert top_expressed(obs, genes, 2) == ["lowvar_high", "mid"]
    assert top_variable(obs, genes, 2) == ["highvar_low", "mid"]
    assert top_expressed(obs, genes, 10)[-2:] == ["tie_a", "tie_b"]  # ties keep gene order
    assert len(top_expressed(obs, genes, 10)) == 5
    with pytest.raises(InputError):
        top_expressed(obs[:, :3], genes, 2)


def test_marker_genes_and_sets() -> None:
    with pytest.warns(UserWarning, match="NOPE"):
        present, missing = marker_genes(MARKERS, GENES60)
    assert present == ["G3", "G5"] and missing == ["NOPE"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert marker_genes([], GENES60) == ([], [])
    obs = np.random.default_rng(3).gamma(1.0, 1.0, (10, 60))
    with pytest.warns(UserWarning):
        sets = evaluation_sets(obs, GENES60, MARKERS, ks=(50, 150))
    assert set(sets) == {"HEG50", "HVG50", "HEG150", "HVG150", "markers", "all"}
    assert len(sets["HEG50"]) == 50 and len(sets["HEG150"]) == 60 and sets["markers"] == ["G3", "G5"]
    assert sets["HEG50"][0] == GENES60[int(np.argmax(obs.mean(0)))]


def test_evaluate_prediction_membership() -> None:
    a = make_prediction("cmrcnet", 0, 0, 0.7, top_k=50)
    with pytest.warns(UserWarning, match="NOPE"):
        genes, summary = M.evaluate_prediction(a, ks=(50,))
    assert genes["HEG50"].sum() == 50 and genes["markers"].sum() == 2 and genes["all"].all()
    assert genes.loc[genes["heg_rank"] == 1, "HEG50"].item()
    assert list(summary.columns[:7]) == ["set", "n_genes", "mean_pcc", "median_pcc", "mean_spearman",
                                         "mean_mse", "n_constant"]
    heg = summary.set_index("set").loc["HEG50"]
    assert heg["mean_pcc"] == pytest.approx(genes.loc[genes["HEG50"], "pcc"].mean())
    assert 0.5 < heg["gene_corr_similarity"] <= 1.0
    a.uns["cmrcnet"]["unmeasured_genes"] = ["G3"]  # e.g. PGR absent from her2st C5's counts
    with pytest.warns(UserWarning, match="G3"):
        genes2, _ = M.evaluate_prediction(a, ks=(50,))
    assert "G3" not in set(genes2["gene"]) and len(genes2) == 59


# --------------------------------------------------------------------------- tables


def test_table1_averages_folds_then_seeds() -> None:
    rows = []
    vals = {0: [0.1, 0.2, 0.6], 1: [0.4, 0.5]}  # seed 1 lacks fold 2
    for seed, folds in vals.items():
        for fold, v in enumerate(folds):
            rows.append({"dataset": "", "method": "m", "variant": "", "top_k": None, "label": "m", "seed": seed,
                         "fold": fold, "sample_id": f"S{fold}", "set": "HEG50", "mean_pcc": v})
    df = pd.DataFrame(rows)
    t = S.table1(df, sets=("HEG50",))
    seed_means = [np.mean(vals[0]), np.mean(vals[1])]
    assert t.loc["m", "HEG50 mean"] == pytest.approx(np.mean(seed_means))
    assert t.loc["m", "HEG50 sd"] == pytest.approx(np.std(seed_means, ddof=1))
    assert t.loc["m", "HEG50"] == f"{np.mean(seed_means):.4f} ± {np.std(seed_means, ddof=1):.4f}"
    assert t.loc["m", "seeds"] == 2 and t.loc["m", "samples"] == 3
    per_sample = [np.mean([0.1, 0.4]), np.mean([0.2, 0.5]), 0.6]  # each held-out sample over its seeds
    assert t.loc["m", "HEG50 sd_folds"] == pytest.approx(np.std(per_sample, ddof=1))
    assert t.loc["m", "HEG50 fold sd"] == f"{np.std(per_sample, ddof=1):.4f}"


def test_collect_and_tables(bench: Path, tmp_path: Path) -> None:
    coll = S.scan(bench)
    assert len(coll.runs) == 2 * 2 * (1 + 3) + 4 and not coll.skipped
    df = S.collect(bench)
    n_sets = df["set"].nunique()
    assert n_sets == 8 and len(df) == len(coll.runs) * n_sets
    assert set(df.loc[df["method"] == "cmrcnet", "top_k"]) == {50, 250, 500}
    assert df.loc[df["method"] == "stnet", "top_k"].isna().all()

    t1 = S.table1(df)
    assert list(t1.index) == ["cmrcnet-50", "cmrcnet-250", "cmrcnet-500", "stnet"]  # ablation variants excluded
    assert (t1.loc["cmrcnet-50", ["HEG50 mean", "HVG50 mean"]] > t1.loc["stnet", ["HEG50 mean", "HVG50 mean"]]).all()
    assert t1.loc["stnet", "seeds"] == 2 and t1.loc["stnet", "samples"] == 2
    md = S.to_markdown(S.table1(df, top_ks=(50,)))
    assert md.splitlines()[0] == (
        "| label | HEG50 | HEG50 fold sd | HVG50 | HVG50 fold sd | markers | markers fold sd | seeds | samples |"
    )
    cm_line = next(line for line in md.splitlines() if line.startswith("| cmrcnet-50"))
    st_line = next(line for line in md.splitlines() if line.startswith("| stnet"))
    assert cm_line.count("**") == 6 and "**" not in st_line
    assert "<b>" in S.to_html(t1) and "<table" in S.to_html(t1)

    t2 = S.table2(df)
    assert t2.loc["cmrcnet", "k used"] == "250/500" and t2.loc["stnet", "k used"] == "-"
    exp = df[(df["label"] == "cmrcnet-250") & (df["set"] == "HEG150")].groupby("seed")["mean_pcc"].mean().mean()
    assert t2.loc["cmrcnet", "HEG150 mean"] == pytest.approx(exp)
    assert S.to_markdown(t2).splitlines()[0].startswith("| method | HEG150 | HEG150 fold sd | HVG150 |")

    t3 = S.top_genes(coll.genes, n=5)
    assert t3.shape[0] == 5 and "stnet gene" in t3.columns and "cmrcnet-50 PCC" in t3.columns
    long = S.top_genes(coll.genes, n=3, wide=False)
    assert long.groupby("label")["pcc"].apply(lambda s: s.is_monotonic_decreasing).all()

    t5 = S.ablation_table(df)
    assert list(t5.index) == ["cmrcnet-contrastive-only", "cmrcnet-mse-mask0.3-image"]
    cols = ["reconstruction", "mask_ratio", "recon_loss", "recon_target"]
    assert t5.loc["cmrcnet-mse-mask0.3-image", cols].tolist() == ["", "0.3", "mse", "image"]
    assert t5.loc["cmrcnet-contrastive-only", cols].tolist() == ["False", "", "", ""]
    assert "| recon_target | HEG50 | HEG50 fold sd | HVG50 |" in S.to_markdown(t5).splitlines()[0]
    assert S.constant_table(coll.runs).loc["stnet", "constant genes"] == 4
    assert S.gene_selection_modes(coll.runs) == ["train"]


def test_scan_skips_broken_and_duplicate_files(bench: Path, tmp_path: Path) -> None:
    root = tmp_path / "b"
    (root / "x").mkdir(parents=True)
    make_prediction("bleep", 0, 0, 0.6, top_k=50).write_h5ad(root / "x" / "pred.h5ad")
    make_prediction("bleep", 0, 0, 0.6, top_k=50).write_h5ad(root / "x" / "pred_copy.h5ad")
    (root / "x" / "pred_broken.h5ad").write_bytes(b"not hdf5")
    nometa = make_prediction("bleep", 0, 1, 0.6)
    del nometa.uns["cmrcnet"]
    nometa.write_h5ad(root / "x" / "pred_nometa.h5ad")
    with pytest.warns(UserWarning):
        coll = S.scan(root)
    assert len(coll.runs) == 1 and len(coll.skipped) == 3
    assert any("same run" in r for _, r in coll.skipped)
    with pytest.raises(InputError):
        S.scan(root, strict=True)


def test_markdown_bolds_minimum_for_mse() -> None:
    rows = [{"dataset": "", "method": m, "variant": "", "top_k": None, "label": m, "seed": 0, "fold": 0,
             "sample_id": "S0", "set": "all", "mean_mse": v} for m, v in (("a", 0.2), ("b", 0.1))]
    md = S.to_markdown(S.table1(pd.DataFrame(rows), sets=("all",), metric="mean_mse"))
    assert "| b | **0.1000** |" in md and "| a | 0.2000 |" in md

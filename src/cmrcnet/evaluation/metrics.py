"""Per-gene metrics of one prediction (one method, held-out sample and seed).

Conventions (paper and authors' code): Pearson correlation per gene across the
spots of one held-out sample; a gene whose prediction or ground truth is
constant has an undefined (NaN) PCC, which is *recorded as 0* and flagged
``constant`` so that the number of such genes can be reported. Spearman
correlation and MSE are added for context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import rankdata

from cmrcnet.errors import InputError
from cmrcnet.evaluation.gene_sets import DEFAULT_KS, evaluation_sets

#: Genes per block in the column-wise computations (bounds memory on large samples).
_BLOCK = 512
SUMMARY_COLUMNS = [
    "set", "n_genes", "mean_pcc", "median_pcc", "mean_spearman", "mean_mse", "n_constant",
    "gene_corr_similarity",
]
#: Gene-gene correlation similarity is computed only for sets up to this size (cost ~ G^2).
GENE_CORR_MAX_GENES = 500


def dense(x: Any) -> np.ndarray:
    """A dense float64 array from a dense or sparse matrix (layers may be stored sparse)."""
    if sp.issparse(x):
        x = x.toarray()
    return np.asarray(x, dtype=np.float64)


def _constant_columns(x: np.ndarray) -> np.ndarray:
    if x.shape[0] == 0:
        return np.ones(x.shape[1], dtype=bool)
    return np.all(x == x[:1], axis=0)


def _column_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of matching columns; NaN where a column has zero variance."""
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    den = np.sqrt((xc * xc).sum(axis=0) * (yc * yc).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=0) / den
    r[den == 0] = np.nan
    return np.clip(r, -1.0, 1.0)


def _check_pair(pred: Any, obs: Any, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    p, o = dense(pred), dense(obs)
    if p.ndim != 2 or p.shape != o.shape:
        raise InputError(f"prediction {p.shape} and ground truth {o.shape} differ in shape")
    if p.shape[1] != n_genes:
        raise InputError(f"{p.shape[1]} gene columns but {n_genes} gene names")
    if p.shape[0] < 2:
        raise InputError(f"need at least 2 spots to correlate, got {p.shape[0]}")
    for name, a in (("prediction", p), ("ground truth", o)):
        bad = int((~np.isfinite(a)).sum())
        if bad:
            raise InputError(f"{name} contains {bad} non-finite values (NaN/inf)")
    return p, o


def per_gene_metrics(pred: np.ndarray, obs: np.ndarray, genes: Sequence[str]) -> pd.DataFrame:
    """One row per gene: ``gene, pcc, spearman, mse, constant, pred_constant, obs_constant``.

    ``pcc``/``spearman`` of a constant gene are 0 (not NaN) with ``constant=True``,
    matching how the authors average.
    """
    p_all, o_all = _check_pair(pred, obs, len(genes))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("pcc", "sp", "mse", "pc", "oc")}
    for s in range(0, p_all.shape[1], _BLOCK):
        p, o = p_all[:, s : s + _BLOCK], o_all[:, s : s + _BLOCK]
        parts["pcc"].append(_column_pearson(p, o))
        parts["sp"].append(_column_pearson(rankdata(p, axis=0), rankdata(o, axis=0)))
        parts["mse"].append(((p - o) ** 2).mean(axis=0))
        parts["pc"].append(_constant_columns(p))
        parts["oc"].append(_constant_columns(o))
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    pred_const, obs_const = cat["pc"].astype(bool), cat["oc"].astype(bool)
    constant = pred_const | obs_const | np.isnan(cat["pcc"])
    return pd.DataFrame(
        {
            "gene": [str(g) for g in genes],
            "pcc": np.where(constant, 0.0, np.nan_to_num(cat["pcc"])),
            "spearman": np.where(constant, 0.0, np.nan_to_num(cat["sp"])),
            "mse": cat["mse"],
            "constant": constant,
            "pred_constant": pred_const,
            "obs_constant": obs_const,
        }
    )


def correlation_matrix(x: np.ndarray) -> np.ndarray:
    """Gene-gene Pearson correlation (columns); constant genes get 0 off the diagonal."""
    x = dense(x)
    xc = x - x.mean(axis=0)
    norm = np.sqrt((xc * xc).sum(axis=0))
    ok = norm > 0
    z = np.zeros_like(xc)
    z[:, ok] = xc[:, ok] / norm[ok]
    c = np.clip(z.T @ z, -1.0, 1.0)
    np.fill_diagonal(c, 1.0)
    return c


def gene_gene_correlation_similarity(pred: np.ndarray, obs: np.ndarray) -> float:
    """PCC between the upper triangles of the predicted and true gene-gene correlation matrices.

    1 means the prediction keeps the co-expression structure (Fig. 4); 0 when the
    predicted correlations are all equal (e.g. everything constant); NaN for < 3 genes.
    """
    p, o = dense(pred), dense(obs)
    if p.shape != o.shape or p.ndim != 2:
        raise InputError(f"prediction {p.shape} and ground truth {o.shape} differ in shape")
    g = p.shape[1]
    if g < 3:
        return float("nan")
    iu = np.triu_indices(g, k=1)
    a, b = correlation_matrix(p)[iu], correlation_matrix(o)[iu]
    r = _column_pearson(a[:, None], b[:, None])[0]
    return 0.0 if np.isnan(r) else float(r)


def prediction_arrays(adata: Any) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, observed) of a prediction AnnData; ``layers['predicted']`` falls back to ``X``."""
    if "observed" not in adata.layers:
        raise InputError("prediction has no layers['observed'] (ground truth) to evaluate against")
    pred = adata.layers["predicted"] if "predicted" in adata.layers else adata.X
    if pred is None:
        raise InputError("prediction has neither layers['predicted'] nor X")
    return dense(pred), dense(adata.layers["observed"])


def _as_list(x: Any) -> list[str]:
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    return [str(v) for v in np.asarray(x, dtype=object).ravel().tolist()]


def summarise(genes_df: pd.DataFrame, set_name: str, pred: np.ndarray | None = None,
              obs: np.ndarray | None = None) -> dict[str, Any]:
    """Summary of the genes flagged in column ``set_name`` (means over genes)."""
    sub = genes_df[genes_df[set_name]]
    row: dict[str, Any] = {
        "set": set_name,
        "n_genes": int(len(sub)),
        "mean_pcc": float(sub["pcc"].mean()) if len(sub) else float("nan"),
        "median_pcc": float(sub["pcc"].median()) if len(sub) else float("nan"),
        "mean_spearman": float(sub["spearman"].mean()) if len(sub) else float("nan"),
        "mean_mse": float(sub["mse"].mean()) if len(sub) else float("nan"),
        "n_constant": int(sub["constant"].sum()),
        "gene_corr_similarity": float("nan"),
    }
    if pred is not None and obs is not None and 3 <= len(sub) <= GENE_CORR_MAX_GENES:
        idx = sub.index.to_numpy()
        row["gene_corr_similarity"] = gene_gene_correlation_similarity(pred[:, idx], obs[:, idx])
    return row


def evaluate_prediction(
    adata: Any,
    markers: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score one prediction AnnData: (per-gene table, per-set summary).

    The per-gene table has one boolean membership column per evaluation set
    (``HEG50`` ... ``markers``, ``all``) and ``heg_rank``/``hvg_rank`` (1 = top).
    ``markers`` defaults to ``uns['cmrcnet']['markers']``. Genes listed in
    ``uns['cmrcnet']['unmeasured_genes']`` (absent from the held-out sample's
    counts, so their "ground truth" is a fill value) are left out entirely.
    """
    meta = dict(adata.uns.get("cmrcnet", {}) or {})
    unmeasured = set(_as_list(meta.get("unmeasured_genes")))
    if unmeasured:  # not in the held-out sample's count table: no ground truth, so not scored
        adata = adata[:, [g not in unmeasured for g in adata.var_names]]
    pred, obs = prediction_arrays(adata)
    genes = [str(g) for g in adata.var_names]
    if markers is None:
        markers = _as_list(meta.get("markers"))
    df = per_gene_metrics(pred, obs, genes)
    sets = evaluation_sets(obs, genes, markers, ks)
    for name, members in sets.items():
        df[name] = df["gene"].isin(set(members))
    full = evaluation_sets(obs, genes, [], ks=(len(genes),))  # complete rankings, 1 = top
    df["heg_rank"] = df["gene"].map({g: i + 1 for i, g in enumerate(full[f"HEG{len(genes)}"])})
    df["hvg_rank"] = df["gene"].map({g: i + 1 for i, g in enumerate(full[f"HVG{len(genes)}"])})
    summary = pd.DataFrame([summarise(df, name, pred, obs) for name in sets], columns=SUMMARY_COLUMNS)
    return df, summary

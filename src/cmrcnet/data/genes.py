"""Gene preprocessing: normalisation, highly variable genes, the predicted gene set.

Expression targets are ``log1p(normalize_total(counts))`` computed over *all* of a
sample's genes (so a spot's library size is the real one), then subset to the chosen
genes. The raw counts in each :class:`~cmrcnet.data.sample.Sample` are never modified.

Gene selection (:func:`select_genes`) follows the authors' recipe — top-N highly
variable genes per sample, combined over samples — with one difference by default:
``selection="train"`` uses only the training samples of a fold. The paper's variant
(``selection="all"``) includes the held-out sample, which leaks test data into the
choice of genes; it is kept for reproduction.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Iterable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cmrcnet.config import GeneConfig
from cmrcnet.data.readers._common import strip_gene_version
from cmrcnet.data.sample import Sample
from cmrcnet.errors import ConfigError, InputError
from cmrcnet.utils import torch_threads_kept

log = logging.getLogger(__name__)

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
#: var columns that may hold gene symbols when var_names are Ensembl ids.
_SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "gene_name", "gene_names", "symbol", "feature_name")


# -- normalisation -----------------------------------------------------------------------
def _check_unique(adata: ad.AnnData, what: str = "sample") -> None:
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()[:5].tolist()
        raise InputError(
            f"{what} has duplicated gene names (e.g. {', '.join(map(str, dup))}); "
            "call cmrcnet.data.genes.harmonise_gene_names first"
        )


def normalize_log1p(adata: ad.AnnData, target_sum: float | None = 1e4) -> ad.AnnData:
    """A new AnnData with float32 ``X = log1p(normalize_total(counts))`` over all genes.

    ``target_sum=None`` uses scanpy's default (median total count). The input is not
    modified. Spots with zero total counts stay all-zero.
    """
    import scanpy as sc

    x = adata.X
    if x is None:
        raise InputError("AnnData has no X (counts) matrix")
    x = x.astype(np.float32, copy=True) if sp.issparse(x) else np.array(x, dtype=np.float32)
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        neg = bool((x.data < 0).any())
    else:
        neg = bool((x < 0).any())
    if neg:
        raise InputError("counts contain negative values; expected raw counts")
    out = ad.AnnData(X=x, obs=pd.DataFrame(index=adata.obs_names.copy()), var=adata.var.copy())
    with torch_threads_kept():
        sc.pp.normalize_total(out, target_sum=target_sum)
        sc.pp.log1p(out)
    out.X = out.X.astype(np.float32, copy=False)
    return out


# -- highly variable genes ---------------------------------------------------------------
def _column_variance(x: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Per-column variance in float64 (E[x^2] - E[x]^2 in float32 leaves ~1e-5 on a constant
    column of log1p values, which then passed as "variable")."""
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float64)
        mean = np.asarray(x.mean(axis=0)).ravel()
        sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
        var = np.maximum(sq - mean**2, 0.0)
        return np.where(var > 1e-9 * np.maximum(sq, 1.0), var, 0.0)  # cancellation noise of a constant column
    return np.asarray(x, dtype=np.float64).var(axis=0)


def highly_variable(adata_counts: ad.AnnData, n_top: int, target_sum: float | None = 1e4) -> list[str]:
    """Top ``n_top`` highly variable genes of one sample (scanpy, flavor ``"seurat"``).

    Ranked by normalised dispersion on log-normalised data, ties broken by gene name so
    exactly ``n_top`` genes come back (scanpy's own cut-off keeps all tied genes).
    Constant genes are never returned; if ``n_top`` is at least the number of
    non-constant genes, all of these are returned (in the data's gene order).
    Otherwise the list is in rank order, most variable first.
    """
    import scanpy as sc

    if int(n_top) < 1:
        raise ConfigError(f"number of highly variable genes must be >= 1, got {n_top!r}")
    _check_unique(adata_counts)
    norm = normalize_log1p(adata_counts, target_sum)
    var = _column_variance(norm.X)
    keep = var > 1e-12
    names = norm.var_names[keep]
    if int(n_top) >= len(names):
        return [str(g) for g in names]
    sub = norm[:, keep].copy()
    with warnings.catch_warnings(), torch_threads_kept():
        warnings.simplefilter("ignore")
        df = sc.pp.highly_variable_genes(sub, flavor="seurat", n_top_genes=int(n_top), inplace=False)
    disp = np.nan_to_num(np.asarray(df["dispersions_norm"], dtype=np.float64), nan=-np.inf)
    order = np.lexsort((np.asarray(sub.var_names, dtype=str), -disp))  # last key is primary
    return [str(sub.var_names[i]) for i in order[: int(n_top)]]


# -- gene set ----------------------------------------------------------------------------
def select_genes(
    samples: list[Sample],
    train_ids: list[str],
    cfg: GeneConfig,
    markers: list[str] | None = None,
) -> list[str]:
    """The predicted gene set of one fold: combined per-sample HVGs (+ marker genes).

    ``cfg.selection="train"`` (default) takes HVGs of the training samples only;
    ``"all"`` is the paper's transductive union over all samples, the held-out one
    included (test leakage into the gene choice). Either way, genes never measured in
    any training sample are dropped (nothing to learn from). HVGs come sorted by name;
    with ``cfg.include_markers`` the markers found in the training data are appended
    after them (absent ones are warned about, not silently dropped). ``markers``
    overrides ``cfg.markers``.
    """
    if cfg.selection not in ("train", "all"):
        raise ConfigError(f"genes.selection must be 'train' or 'all', got {cfg.selection!r}")
    if cfg.combine not in ("union", "intersection"):
        raise ConfigError(f"genes.combine must be 'union' or 'intersection', got {cfg.combine!r}")
    by_id = _index_samples(samples)
    train = _train_samples(by_id, train_ids)
    pool = train if cfg.selection == "train" else list(by_id.values())

    per_sample = [set(highly_variable(s.adata, cfg.n_hvg, cfg.target_sum)) for s in pool]
    combined = set.union(*per_sample) if cfg.combine == "union" else set.intersection(*per_sample)
    train_genes = set().union(*(map(str, s.adata.var_names) for s in train))
    genes = sorted(combined & train_genes)
    log.info(
        "gene set: %d genes (%s of per-sample top-%d HVGs over %d %s samples)",
        len(genes), cfg.combine, cfg.n_hvg, len(pool), cfg.selection,
    )

    if not genes:
        empty = [s.sample_id for s, hv in zip(pool, per_sample) if not hv]
        if cfg.combine == "intersection" and len(empty) < len(pool):
            raise InputError(
                f"no genes selected (the intersection of per-sample HVGs over {len(pool)} samples is empty); "
                "try genes.combine=union or a larger genes.n_hvg")
        raise InputError(
            f"no gene varies across the spots of the training sample(s) {', '.join(empty)} (constant or all-zero "
            "counts?): nothing to learn; the marker genes alone would be a meaningless gene set")
    marker_list = list(markers) if markers is not None else list(cfg.markers)
    if cfg.include_markers and marker_list:
        present, _ = check_genes(marker_list, train_genes, what="marker gene")
        chosen = set(genes)
        genes += [g for g in present if g not in chosen]
    if not genes:
        raise InputError(
            f"no genes selected ({cfg.combine} of per-sample HVGs is empty); "
            "try genes.combine=union or a larger genes.n_hvg"
        )
    return genes


def _index_samples(samples: list[Sample]) -> dict[str, Sample]:
    if not samples:
        raise InputError("no samples given")
    by_id: dict[str, Sample] = {}
    for s in samples:
        if s.sample_id in by_id:
            raise InputError(f"duplicated sample id {s.sample_id!r}")
        by_id[s.sample_id] = s
    return by_id


def _train_samples(by_id: dict[str, Sample], train_ids: list[str]) -> list[Sample]:
    if not train_ids:
        raise InputError("no training samples given")
    unknown = [t for t in train_ids if t not in by_id]
    if unknown:
        raise InputError(f"unknown training sample id(s): {', '.join(map(str, unknown))}")
    return [by_id[t] for t in dict.fromkeys(train_ids)]


# -- expression targets ------------------------------------------------------------------
def expression_matrix(sample: Sample, genes: list[str], target_sum: float | None = 1e4) -> np.ndarray:
    """(N, G) float32 log1p-normalised expression of ``genes``, columns in ``genes`` order.

    Normalised over all the sample's genes, then subset. A gene this sample did not
    measure becomes a zero column (with a warning listing such genes), so every sample
    yields the same columns.
    """
    genes = [str(g) for g in genes]
    if not genes:
        raise InputError("empty gene list")
    if len(set(genes)) != len(genes):
        dup = sorted({g for g in genes if genes.count(g) > 1})
        raise InputError(f"duplicated genes in the gene list: {', '.join(dup[:10])}")
    _check_unique(sample.adata, f"sample {sample.sample_id!r}")
    index = pd.Index(sample.adata.var_names.astype(str))
    pos = index.get_indexer(genes)
    missing = [g for g, p in zip(genes, pos) if p < 0]
    if len(missing) == len(genes):
        raise InputError(f"sample {sample.sample_id!r} has none of the {len(genes)} requested genes")
    if missing:
        warnings.warn(
            f"sample {sample.sample_id!r}: {len(missing)} gene(s) not measured, set to 0: "
            f"{_short_list(missing)}",
            stacklevel=2,
        )
    norm = normalize_log1p(sample.adata, target_sum)
    found = pos >= 0
    sub = norm.X[:, pos[found]]
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    out = np.zeros((sample.n_spots, len(genes)), dtype=np.float32)
    out[:, found] = sub
    return out


# -- names -------------------------------------------------------------------------------
def _symbol_map(samples: list[Sample]) -> dict[str, str]:
    """Ensembl id (unversioned) -> symbol, learnt from every sample that has both."""
    mapping: dict[str, str] = {}
    for s in samples:
        var = s.adata.var
        names = [str(v) for v in s.adata.var_names]
        if "gene_ids" in var.columns:
            for name, gid in zip(names, var["gene_ids"].astype(str)):
                if not _ENSEMBL.match(name) and _ENSEMBL.match(gid):
                    mapping.setdefault(strip_gene_version(gid), name)
        for col in _SYMBOL_COLUMNS:
            if col in var.columns:
                for name, sym in zip(names, var[col].astype(str)):
                    if _ENSEMBL.match(name) and sym and sym != "nan" and not _ENSEMBL.match(sym):
                        mapping.setdefault(strip_gene_version(name), sym)
    return mapping


def harmonise_gene_names(samples: list[Sample]) -> None:
    """Make gene names comparable across samples, in place (counts are untouched).

    Where a sample's ``var_names`` are Ensembl ids, they are replaced by symbols; the
    id -> symbol map is learnt from any sample that has symbols as ``var_names`` and
    ids in ``var["gene_ids"]``, or from a symbol column (``gene_symbols``,
    ``gene_name``, ...). Unmapped ids are kept. Original ids go to ``var["gene_ids"]``.
    Finally names are made unique with anndata's ``var_names_make_unique`` (``X``,
    ``X-1``, ...). Matching stays case-sensitive (human symbols are upper case).
    """
    mapping = _symbol_map(samples)
    for s in samples:
        names = [str(v) for v in s.adata.var_names]
        ids = [_ENSEMBL.match(n) is not None for n in names]
        if any(ids):
            if "gene_ids" not in s.adata.var.columns:
                s.adata.var["gene_ids"] = names
            new = [mapping.get(strip_gene_version(n), n) if is_id else n for n, is_id in zip(names, ids)]
            n_mapped = sum(a != b for a, b in zip(names, new))
            log.info("sample %s: %d Ensembl ids mapped to symbols", s.sample_id, n_mapped)
            s.adata.var_names = pd.Index(new)
        if not s.adata.var_names.is_unique:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s.adata.var_names_make_unique()


def check_genes(
    requested: list[str], available: Iterable[str], what: str = "gene"
) -> tuple[list[str], list[str]]:
    """Split ``requested`` into (present, missing), in request order; warn about the missing.

    The warning suggests case-insensitive matches (``Erbb2`` -> ``ERBB2``), the usual
    cause of a "missing" gene, but does not apply them.
    """
    avail = {str(a) for a in available}
    lower: dict[str, str] = {}
    for a in sorted(avail):
        lower.setdefault(a.lower(), a)
    present: list[str] = []
    missing: list[str] = []
    for g in dict.fromkeys(str(r) for r in requested):
        (present if g in avail else missing).append(g)
    if missing:
        hints = [f"{g} -> {lower[g.lower()]}" for g in missing if g.lower() in lower]
        msg = f"{len(missing)} {what}(s) not found: {_short_list(missing)}"
        if hints:
            msg += f" (different case available: {_short_list(hints)})"
        warnings.warn(msg, stacklevel=2)
    return present, missing


def _short_list(items: list[str], n: int = 20) -> str:
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def resolve_gene_names(requested: list[str], available: Iterable[str], what: str = "--genes",
                       source: str | None = None) -> list[str]:
    """Map user-typed gene names onto ``available``: exact match, else a unique case-insensitive
    one (``penk`` -> ``Penk``, with a warning). Unknown names are one InputError listing each with
    its closest matches, raised before any work is done."""
    import difflib

    avail = [str(a) for a in available]
    exact = set(avail)
    by_lower: dict[str, list[str]] = {}
    for a in avail:
        by_lower.setdefault(a.lower(), []).append(a)
    out: list[str] = []
    recased: list[str] = []
    unknown: list[str] = []
    for g in dict.fromkeys(str(r).strip() for r in requested if str(r).strip()):
        if g in exact:
            out.append(g)
        elif len(by_lower.get(g.lower(), [])) == 1:
            out.append(by_lower[g.lower()][0])
            recased.append(f"{g} -> {by_lower[g.lower()][0]}")
        else:
            close = difflib.get_close_matches(g.lower(), list(by_lower), n=3, cutoff=0.6)
            hint = [a for c in close for a in by_lower[c]]
            unknown.append(f"{g} (did you mean {', '.join(hint)}?)" if hint else g)
    if unknown:
        where = f" of {source}" if source else ""
        raise InputError(f"{what}: {len(unknown)} gene(s) not among the {len(avail)} genes{where}: "
                         f"{_short_list(unknown)}")
    if recased:
        warnings.warn(f"{what}: matched ignoring case: {_short_list(recased)}", UserWarning, stacklevel=2)
    return out

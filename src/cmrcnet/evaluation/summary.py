"""Collect prediction files of a benchmark directory and build the paper's tables.

Every prediction file under the directory (any ``.h5ad`` holding ``layers["predicted"]``
and ``layers["observed"]``, whatever its name) is scored with
:func:`cmrcnet.evaluation.metrics.evaluate_prediction`; the run's identity
(method, seed, fold, held-out sample, top_k, ablation variant, dataset) comes
from ``uns['cmrcnet']``, never from the path, so any directory layout works.

Averaging order (as the authors): over the genes of a set within one run, then
over held-out samples (folds) within a seed, then mean +- sd over seeds.
"""

from __future__ import annotations

import html
import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cmrcnet.errors import InputError
from cmrcnet.evaluation.gene_sets import DEFAULT_KS, TABLE2_TOP_K
from cmrcnet.evaluation.metrics import SUMMARY_COLUMNS, evaluate_prediction

#: Columns that identify one run (one prediction file).
RUN_KEYS = ["dataset", "method", "variant", "top_k", "label", "seed", "fold", "sample_id"]
#: What an ablation variant changed (JSON of its overrides, ``model.`` dropped), beside RUN_KEYS.
SETTINGS = "variant_settings"
#: Table 2: evaluation set -> number of retrieved neighbours used for retrieval methods (paper).
TABLE2_SETS: dict[str, int] = {f"{kind}{n}": k for n, k in TABLE2_TOP_K.items() for kind in ("HEG", "HVG")}
#: Metrics where lower is better (bolding in tables).
LOWER_IS_BETTER = {"mean_mse"}


# --------------------------------------------------------------------------- metadata


def _opt_int(v: Any) -> int | None:
    """An int, or None for missing / non-positive / NaN values (regression methods have no top_k)."""
    if v is None or isinstance(v, str) and not v.strip().lstrip("-").isdigit():
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if math.isnan(f) or f <= 0:
        return None
    return int(f)


def _int(v: Any, default: int) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return default if math.isnan(f) else int(f)


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping):
        return json.dumps({str(k): _jsonable(x) for k, x in v.items()}, sort_keys=True)
    return str(_jsonable(v))


def _str_list(v: Any) -> list[str]:
    """A list of strings from a list, an array (h5ad round trip) or None."""
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return [str(x) for x in np.asarray(v, dtype=object).ravel()]


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def method_label(method: str, variant: str = "", top_k: int | None = None) -> str:
    """Row label of a run: ``method[-variant][-k]``, e.g. ``cmrcnet-50`` (the paper's CMRCNet-50)."""
    label = method + (f"-{variant}" if variant else "")
    return label + (f"-{top_k}" if top_k else "")


def run_metadata(adata: Any, path: str | Path | None = None) -> dict[str, Any]:
    """Identity of one prediction from ``uns['cmrcnet']`` (raises InputError without a method)."""
    meta = dict(adata.uns.get("cmrcnet", {}) or {})
    method = _text(meta.get("method")).strip()
    if not method:
        raise InputError("uns['cmrcnet']['method'] is missing", path)
    fold = _int(meta.get("fold"), -1)
    sample_id = _text(meta.get("sample_id")).strip()
    if not sample_id:
        spatial = adata.uns.get("spatial", {}) or {}
        sample_id = str(next(iter(spatial), "")) or f"fold{fold}"
    variant = _text(meta.get("variant")).strip()
    top_k = _opt_int(meta.get("top_k"))
    overrides = meta.get("variant_overrides") or {}
    settings = {str(k).removeprefix("model."): _jsonable(v) for k, v in dict(overrides).items()} if variant else {}
    overrides_all = meta.get("overrides")
    return {
        "dataset": _text(meta.get("dataset")).strip(),
        "method": method,
        "variant": variant,
        "top_k": top_k,
        "label": method_label(method, variant, top_k),
        "seed": _int(meta.get("seed"), 0),
        "fold": fold,
        "sample_id": sample_id,
        "gene_selection": _text(meta.get("gene_selection")),
        SETTINGS: json.dumps(settings, sort_keys=True) if settings else "",
        "preset": _text(meta.get("preset")).strip(),
        "epochs": _opt_int(meta.get("epochs")),
        "encoder": _text(meta.get("encoder")).strip(),
        "overrides": ("" if overrides_all is None else
                      json.dumps({str(k): _jsonable(v) for k, v in dict(overrides_all).items()}, sort_keys=True)),
    }


# --------------------------------------------------------------------------- collection


@dataclass
class Collection:
    """Everything scored in a benchmark directory."""

    summary: pd.DataFrame
    """One row per run x evaluation set (:data:`RUN_KEYS` + :data:`SUMMARY_COLUMNS`)."""
    genes: pd.DataFrame
    """One row per run x gene (:data:`RUN_KEYS` + per-gene metrics + set membership)."""
    runs: pd.DataFrame
    """One row per scored file: :data:`RUN_KEYS`, path, gene_selection, n_spots, n_genes, ..."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of files that could not be scored or duplicated another run."""


def _prediction_layers(path: Path) -> set[str] | None:
    """The layer names of an ``.h5ad`` (read from its header, no matrix loaded); None if unreadable."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            layers = f.get("layers")
            return set(layers.keys()) if isinstance(layers, h5py.Group) else set()
    except (OSError, ValueError):
        return None


def find_prediction_files(bench_dir: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The scorable prediction files under ``bench_dir``, recognised by content: an ``.h5ad``
    with ``layers["predicted"]`` and ``layers["observed"]``, whatever its name (``pred.h5ad``,
    the README's ``c3.h5ad``, ...). Also returns ``(path, why)`` for predictions that cannot be
    scored (no ``observed`` layer: a whole-slide grid) or files that cannot be read. Other
    ``.h5ad`` files (input data, caches) are ignored; so is the report folder."""
    root = Path(bench_dir)
    if not root.is_dir():
        raise InputError("benchmark directory does not exist", root)
    found: list[Path] = []
    unscorable: list[tuple[str, str]] = []
    for p in sorted(root.glob("**/*.h5ad")):
        rel = p.relative_to(root).parts
        if "report" in rel[:-1] or p.name.startswith("."):
            continue
        layers = _prediction_layers(p)
        if layers is None:
            unscorable.append((str(p), "cannot be read as HDF5 (.h5ad)"))
        elif "predicted" in layers and "observed" in layers:
            found.append(p)
        elif "predicted" in layers:
            unscorable.append((str(p), "a prediction without layers['observed'] (no ground truth, e.g. a "
                                       "whole-slide grid): not scored"))
    return found, unscorable


def find_predictions(bench_dir: str | Path) -> list[Path]:
    """The scorable prediction files under ``bench_dir`` (see :func:`find_prediction_files`)."""
    return find_prediction_files(bench_dir)[0]


def _score_file(path: Path, ks: Sequence[int]) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    import anndata as ad

    try:
        adata = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise InputError(f"cannot read prediction file ({type(e).__name__}: {e})", path) from e
    meta = run_metadata(adata, path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            genes, summ = evaluate_prediction(adata, ks=ks)
    except InputError as e:
        raise InputError(e.message, path) from e
    for w in caught:
        if "marker genes are not among" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    uns_meta = dict(adata.uns.get("cmrcnet", {}) or {})
    markers, unmeasured = (_str_list(uns_meta.get(k)) for k in ("markers", "unmeasured_genes"))
    n_present = int(genes["markers"].sum())
    present_lower = {g.lower() for g in genes.loc[genes["markers"], "gene"]}
    info = dict(meta)
    info.update(
        path=str(path),
        n_spots=int(adata.n_obs),
        n_genes=int(len(genes)),
        unmeasured_genes=",".join(unmeasured),
        n_constant=int(genes["constant"].sum()),
        n_pred_constant=int(genes["pred_constant"].sum()),
        n_markers=n_present,
        missing_markers=",".join(m for m in markers if m.lower() not in present_lower),
        has_uncertainty="uncertainty" in adata.layers and _has_values(adata.layers["uncertainty"]),
    )
    return info, genes, summ


def scan(bench_dir: str | Path, ks: Sequence[int] = DEFAULT_KS, strict: bool = False) -> Collection:
    """Score every prediction file under ``bench_dir``.

    With ``strict=False`` an unreadable or malformed file is warned about and
    listed in ``Collection.skipped`` instead of aborting the whole report. A
    second file with the same run identity is skipped the same way.
    """
    keyset: dict[tuple, str] = {}
    infos: list[dict[str, Any]] = []
    gene_parts: list[pd.DataFrame] = []
    summ_parts: list[pd.DataFrame] = []
    paths, skipped = find_prediction_files(bench_dir)
    for path, why in skipped:
        if strict and "cannot be read" in why:
            raise InputError(why, path)
        warnings.warn(f"skipping {path}: {why}", stacklevel=2)
    for path in paths:
        try:
            info, genes, summ = _score_file(path, ks)
        except (InputError, OSError, KeyError, ValueError, TypeError) as e:
            if strict:
                raise
            warnings.warn(f"skipping {path}: {e}", stacklevel=2)
            skipped.append((str(path), str(e)))
            continue
        key = tuple(info[k] for k in RUN_KEYS)
        if key in keyset:
            reason = f"same run as {keyset[key]}"
            warnings.warn(f"skipping {path}: {reason}", stacklevel=2)
            skipped.append((str(path), reason))
            continue
        keyset[key] = str(path)
        infos.append(info)
        ident = {k: info[k] for k in RUN_KEYS + [SETTINGS]}
        gene_parts.append(genes.assign(**ident))
        summ_parts.append(summ.assign(**ident))
    run_cols = RUN_KEYS + [SETTINGS, "path", "gene_selection", "n_spots", "n_genes", "unmeasured_genes", "n_constant",
                           "n_pred_constant", "n_markers", "missing_markers", "has_uncertainty",
                           "preset", "epochs", "encoder", "overrides"]
    runs = pd.DataFrame(infos, columns=run_cols)
    summary = _front(pd.concat(summ_parts, ignore_index=True) if summ_parts
                     else pd.DataFrame(columns=SUMMARY_COLUMNS + RUN_KEYS))
    genes_df = _front(pd.concat(gene_parts, ignore_index=True) if gene_parts
                      else pd.DataFrame(columns=["gene", "pcc"] + RUN_KEYS))
    for df in (runs, summary, genes_df):
        df["top_k"] = pd.Series([None if pd.isna(v) else int(v) for v in df["top_k"]],
                                index=df.index, dtype=object)
    return Collection(summary=summary, genes=genes_df, runs=runs, skipped=skipped)


def _front(df: pd.DataFrame) -> pd.DataFrame:
    """Run keys first, then the metric columns."""
    return df[RUN_KEYS + [c for c in df.columns if c not in RUN_KEYS]]


def collect(bench_dir: str | Path, ks: Sequence[int] = DEFAULT_KS) -> pd.DataFrame:
    """One row per (method, seed, fold, sample_id, top_k, set) with the set's metrics."""
    return scan(bench_dir, ks=ks).summary


def _has_values(x: Any) -> bool:
    """False for an all-NaN layer (a method without uncertainty writes NaN, not 0)."""
    import scipy.sparse as sp

    if sp.issparse(x):
        return True  # implicit zeros are values
    return bool(np.isfinite(np.asarray(x)).any())


def coverage(runs: pd.DataFrame, row: str = "label") -> dict[tuple[str, str], frozenset]:
    """``{(dataset, label): {(seed, sample_id), ...}}``: what each label was scored on."""
    out: dict[tuple[str, str], frozenset] = {}
    for (ds, lb), g in runs.groupby(["dataset", row], sort=True):
        out[(str(ds), str(lb))] = frozenset(zip(g["seed"].astype(int), g["sample_id"].astype(str)))
    return out


def mismatched_coverage(runs: pd.DataFrame) -> list[str]:
    """Per dataset, a description of each label's folds and seeds when the labels compared in one
    table (the main methods; the ablation variants among themselves) were scored on different
    (seed, held-out sample) sets; empty when every comparison is like for like."""
    problems: list[str] = []
    if runs.empty:
        return problems
    variant = runs["variant"].fillna("") != ""
    for name, part in (("methods", runs[~variant]), ("ablation variants", runs[variant])):
        cov = coverage(part)
        for ds in sorted({d for d, _ in cov}):
            sets = {lb: c for (d, lb), c in cov.items() if d == ds}
            if len(set(sets.values())) <= 1:
                continue
            desc = []
            for lb in sorted(sets, key=natural_key):
                c = sets[lb]
                seeds = sorted({s for s, _ in c})
                samples = sorted({x for _, x in c}, key=natural_key)
                desc.append(f"{lb}: {len(c)} run(s), sample(s) {', '.join(samples)}, seed(s) {', '.join(map(str, seeds))}")
            where = f" ({ds})" if ds else ""
            problems.append(f"{name}{where} were scored on different held-out samples/seeds: " + "; ".join(desc))
    return problems


# --------------------------------------------------------------------------- aggregation


def _group_keys(df: pd.DataFrame, row: str) -> list[str]:
    """Group by dataset too when the directory holds more than one."""
    return (["dataset"] if df["dataset"].nunique() > 1 else []) + [row]


def aggregate(df: pd.DataFrame, metric: str = "mean_pcc", row: str = "label") -> pd.DataFrame:
    """Long table: (dataset,) row, set -> mean and sd over seeds of the per-seed mean over folds,
    and ``sd_folds``: the sd over held-out samples of each sample's mean over seeds (how much
    the score depends on which section is held out, usually the larger spread)."""
    if df.empty:
        return pd.DataFrame(columns=[row, "set", "mean", "sd", "sd_folds", "n_seeds", "n_samples"])
    keys = _group_keys(df, row) + ["set"]
    per_seed = df.groupby(keys + ["seed"], sort=True)[metric].mean()
    g = per_seed.groupby(level=keys, sort=True)
    out = pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1), "n_seeds": g.count()})
    per_sample = df.groupby(keys + ["sample_id"], sort=True)[metric].mean()
    out["sd_folds"] = per_sample.groupby(level=keys, sort=True).std(ddof=1)
    out["n_samples"] = df.groupby(keys)["sample_id"].nunique()
    return out.reset_index()


def natural_key(label: Any) -> list[Any]:
    """Sort key putting ``cmrcnet-50`` before ``cmrcnet-250`` (numbers compared as numbers)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(label)) if t]


def format_mean_sd(mean: float, sd: float, digits: int = 4) -> str:
    """``0.3156 ± 0.0123``; the mean alone with one seed; ``n/a`` without data."""
    if mean is None or not np.isfinite(mean):
        return "n/a"
    if sd is None or not np.isfinite(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _with_fold_sd(sets: Iterable[str]) -> list[str]:
    """Display columns: each set's ``mean ± sd over seeds`` followed by its sd over held-out samples."""
    return [c for s in sets for c in (s, f"{s} fold sd")]


def _wide(long: pd.DataFrame, sets: Sequence[str], row: str, metric: str) -> pd.DataFrame:
    """Methods x sets table: display strings plus numeric ``{set} mean``/``{set} sd`` columns."""
    idx_cols = [c for c in ("dataset", row) if c in long.columns]
    if long.empty:
        index = pd.Index([], name=row)
    else:
        tuples = sorted({tuple(t) for t in long[idx_cols].itertuples(index=False)},
                        key=lambda t: (t[:-1], natural_key(t[-1])))
        index = pd.MultiIndex.from_tuples(tuples, names=idx_cols) if len(idx_cols) > 1 \
            else pd.Index([t[0] for t in tuples], name=row)
    table = pd.DataFrame(index=index)
    best: dict[str, tuple[str, str]] = {}
    lk = long.set_index(idx_cols + ["set"]) if not long.empty else long
    for s in sets:
        means, sds, fold_sds, seeds, samples = [], [], [], [], []
        for ix in table.index:
            key = (*ix, s) if isinstance(ix, tuple) else (ix, s)
            hit = lk.loc[key] if (not long.empty and key in lk.index) else None
            means.append(float(hit["mean"]) if hit is not None else np.nan)
            sds.append(float(hit["sd"]) if hit is not None else np.nan)
            fold_sds.append(float(hit["sd_folds"]) if hit is not None and "sd_folds" in hit else np.nan)
            seeds.append(int(hit["n_seeds"]) if hit is not None else 0)
            samples.append(int(hit["n_samples"]) if hit is not None else 0)
        table[s] = [format_mean_sd(m, d) for m, d in zip(means, sds)]
        table[f"{s} fold sd"] = [f"{d:.4f}" if np.isfinite(d) else "n/a" for d in fold_sds]
        table[f"{s} mean"], table[f"{s} sd"], table[f"{s} sd_folds"] = means, sds, fold_sds
        table[f"{s} n_seeds"], table[f"{s} n_samples"] = seeds, samples
        best[s] = (f"{s} mean", "min" if metric in LOWER_IS_BETTER else "max")
    n_seeds = table[[f"{s} n_seeds" for s in sets]].max(axis=1) if sets else 0
    n_samples = table[[f"{s} n_samples" for s in sets]].max(axis=1) if sets else 0
    table = table.drop(columns=[f"{s} {c}" for s in sets for c in ("n_seeds", "n_samples")])
    table["seeds"], table["samples"] = n_seeds, n_samples
    shown = _with_fold_sd(sets)
    table.attrs.update(display=shown + ["seeds", "samples"], best=best, metric=metric)
    return table


def main_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Runs of the comparison (no ablation ``variant``); all runs if every run is a variant."""
    main = df[df["variant"].fillna("") == ""]
    return main if len(main) else df


def smallest_k(df: pd.DataFrame, by: str = "method") -> pd.DataFrame:
    """Rows at each group's smallest top_k (the paper's k = 50 figures); rows without top_k kept."""
    k = df["top_k"].map(lambda v: np.nan if v is None or pd.isna(v) else float(v))
    kmin = k.groupby(df[by]).transform("min")
    return df[k.isna() | (k == kmin)]


def table1(df: pd.DataFrame, sets: Sequence[str] = ("HEG50", "HVG50", "markers"),
           metric: str = "mean_pcc", top_ks: Sequence[int] | None = None) -> pd.DataFrame:
    """Table 1: methods (one row per top_k of retrieval methods) x sets, mean ± sd over seeds.

    ``top_ks`` keeps only retrieval runs with those k (the paper shows 50 and 500);
    regression methods (no top_k) are always kept.
    """
    sub = main_runs(df)
    if top_ks is not None:
        wanted = {int(k) for k in top_ks}
        sub = sub[sub["top_k"].map(lambda k: k is None or pd.isna(k) or int(k) in wanted)]
    sub = sub[sub["set"].isin(sets)]
    return _wide(aggregate(sub, metric), sets, "label", metric)


def _base_label(df: pd.DataFrame) -> pd.Series:
    return df["method"] + df["variant"].fillna("").map(lambda v: f"-{v}" if v else "")


def table2(df: pd.DataFrame, sets_k: Mapping[str, int] | None = None,
           metric: str = "mean_pcc") -> pd.DataFrame:
    """Table 2: HEG/HVG150 scored on k=250 runs, HEG/HVG250 on k=500 runs (retrieval methods).

    Regression methods (no top_k) use their only prediction. A retrieval method
    without runs at the wanted k falls back to its largest k; the ``k used``
    column says which k each row used.
    """
    sets_k = dict(TABLE2_SETS if sets_k is None else sets_k)
    sub = main_runs(df).copy()
    sub["base"] = _base_label(sub)
    parts, used = [], {}
    for base, g in sub.groupby("base"):
        ks_avail = sorted({int(k) for k in g["top_k"] if k is not None and not pd.isna(k)})
        ks_used = []
        for s, k in sets_k.items():
            if not ks_avail:
                sel, kk = g[g["set"] == s], "-"
            else:
                kk = k if k in ks_avail else ks_avail[-1]
                sel = g[(g["set"] == s) & (g["top_k"].map(lambda v: v is not None and int(v) == kk))]
            parts.append(sel)
            ks_used.append(str(kk))
        used[base] = "/".join(dict.fromkeys(ks_used))
    long = aggregate(pd.concat(parts) if parts else sub.iloc[:0], metric, row="base")
    table = _wide(long, list(sets_k), "base", metric)
    table.index = table.index.rename("method" if table.index.nlevels == 1 else ["dataset", "method"])
    base_of = [ix[-1] if isinstance(ix, tuple) else ix for ix in table.index]
    table["k used"] = [used.get(b, "-") for b in base_of]
    table.attrs["display"] = _with_fold_sd(sets_k) + ["k used", "seeds", "samples"]
    return table


def ablation_table(df: pd.DataFrame, sets: Sequence[str] = ("HEG50", "HVG50", "markers"),
                   metric: str = "mean_pcc") -> pd.DataFrame:
    """Table 5 analogue: one row per ablation ``variant`` (at its smallest top_k, the paper's 50).

    One column per setting a variant overrides (``recon_loss``, ``mask_ratio``, ...), read from
    the predictions' ``uns["cmrcnet"]["variant_overrides"]``; blank where a variant keeps the default.
    """
    sub = df[df["variant"].fillna("") != ""].copy()
    if sub.empty:
        return _wide(aggregate(sub, metric), sets, "label", metric)
    sub["base"] = _base_label(sub)
    sub = smallest_k(sub, by="base")
    sub = sub[sub["set"].isin(sets)]
    table = _wide(aggregate(sub, metric, row="base"), sets, "base", metric)
    table.index = table.index.rename("variant" if table.index.nlevels == 1 else ["dataset", "variant"])
    settings = {base: _settings(sub.loc[sub["base"] == base]) for base in sub["base"].unique()}
    columns = list(dict.fromkeys(k for d in settings.values() for k in d))
    for col in columns:
        table[col] = ""
    for ix in table.index:
        base = ix[-1] if isinstance(ix, tuple) else ix
        for col, val in settings.get(base, {}).items():
            table.loc[ix, col] = str(val)
    table.attrs["display"] = columns + _with_fold_sd(sets) + ["seeds", "samples"]
    return table


def _settings(rows: pd.DataFrame) -> dict[str, Any]:
    """The overrides of one variant's runs (the first run's; they are the same by construction)."""
    raw = next((v for v in rows.get(SETTINGS, pd.Series(dtype=object)) if isinstance(v, str) and v), "")
    return json.loads(raw) if raw else {}


def top_genes(df_genes: pd.DataFrame, n: int = 5, min_frac: float = 1.0, wide: bool = True) -> pd.DataFrame:
    """Table 3: the n best-predicted genes per method (mean PCC over folds and seeds).

    A gene counts only if scored in at least ``min_frac`` of the method's runs,
    so that a gene predicted in one fold only (per-fold gene selection) cannot
    top the list by luck. ``wide=False`` returns the long form (label, rank, gene, pcc, sd, n_runs).
    """
    sub = main_runs(df_genes)
    rows = []
    keys = _group_keys(sub, "label") if len(sub) else ["label"]
    for gkey, g in sub.groupby(keys, sort=True):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        n_runs = g.groupby(["seed", "fold", "sample_id"]).ngroups
        stats = g.groupby("gene")["pcc"].agg(["mean", "std", "count"])
        stats = stats[stats["count"] >= math.ceil(min_frac * n_runs - 1e-9)]
        stats = stats.sort_values(["mean"], ascending=False, kind="stable").head(n)
        for rank, (gene, st) in enumerate(stats.iterrows(), start=1):
            rows.append({**dict(zip(keys, gkey)), "rank": rank, "gene": gene, "pcc": st["mean"],
                         "sd": st["std"], "n_runs": int(st["count"])})
    long = pd.DataFrame(rows, columns=keys + ["rank", "gene", "pcc", "sd", "n_runs"])
    if not wide:
        return long
    idx = [k for k in keys if k != "label"] + ["rank"]
    table = pd.DataFrame(index=pd.MultiIndex.from_frame(long[idx].drop_duplicates()) if len(idx) > 1
                         else pd.Index(sorted(long["rank"].unique()), name="rank", dtype=int))
    for label in sorted(long["label"].unique(), key=natural_key):
        part = long[long["label"] == label].set_index(idx)
        table[f"{label} gene"] = part["gene"].reindex(table.index)
        table[f"{label} PCC"] = part["pcc"].reindex(table.index).map(
            lambda v: "" if pd.isna(v) else f"{v:.4f}")
    table.attrs.update(display=list(table.columns), best={})
    return table


def constant_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method: runs, genes, and constant genes (whose NaN PCC counted as 0) summed over runs."""
    if runs.empty:
        return pd.DataFrame(columns=["runs", "genes per run", "constant genes", "constant predictions"])
    g = runs.groupby("label", sort=True)
    table = pd.DataFrame({
        "runs": g.size(),
        "genes per run": g["n_genes"].median().astype(int),
        "constant genes": g["n_constant"].sum(),
        "constant predictions": g["n_pred_constant"].sum(),
    })
    table = table.loc[sorted(table.index, key=natural_key)]
    table.attrs.update(display=list(table.columns), best={})
    return table


# --------------------------------------------------------------------------- rendering


def _best_mask(table: pd.DataFrame, numeric: str, how: str) -> pd.Series:
    """True where the row holds the best value of ``numeric`` (within each dataset, if several)."""
    vals = pd.to_numeric(table[numeric], errors="coerce")
    if isinstance(table.index, pd.MultiIndex) and "dataset" in table.index.names:
        grp = vals.groupby(level="dataset")
        ref = grp.transform("max" if how == "max" else "min")
    else:
        ref = pd.Series(vals.max() if how == "max" else vals.min(), index=vals.index)
    v, r = vals.to_numpy(dtype=float), ref.to_numpy(dtype=float)
    # ties at the displayed precision (4 decimals) are all bold
    return pd.Series(np.isfinite(v) & (np.round(v, 4) == np.round(r, 4)), index=table.index)


def _cells(table: pd.DataFrame) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """(header, rows of cell strings, bold flags) for the display columns of a table.

    ``table.attrs["headers"]`` renames display columns; ``table.attrs["rank"] = False`` turns the
    bold best values off (methods scored on different folds are not ranked)."""
    display = [c for c in table.attrs.get("display", list(table.columns)) if c in table.columns]
    best = table.attrs.get("best", {}) if table.attrs.get("rank", True) else {}
    flags = {c: _best_mask(table, *best[c]).tolist() for c in display if c in best and len(table) > 1}
    names = [str(n) if n is not None else "" for n in table.index.names]
    headers = table.attrs.get("headers", {})
    header = names + [str(headers.get(c, c)) for c in display]
    rows, bold = [], []
    for i, ix in enumerate(table.index):
        ix = ix if isinstance(ix, tuple) else (ix,)
        rows.append([str(v) for v in ix] + [_cell(table[c].iloc[i]) for c in display])
        bold.append([False] * len(ix) + [bool(flags[c][i]) if c in flags else False for c in display])
    return header, rows, bold


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table; the best value of each metric column in bold."""
    header, rows, bold = _cells(table)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    for r, b in zip(rows, bold):
        lines.append("| " + " | ".join(f"**{esc(c)}**" if f and c else esc(c) for c, f in zip(r, b)) + " |")
    return "\n".join(lines) + "\n"


def to_html(table: pd.DataFrame, caption: str | None = None) -> str:
    """An HTML table (escaped); the best value of each metric column in bold."""
    header, rows, bold = _cells(table)
    out = ['<table class="tbl">']
    if caption:
        out.append(f"<caption>{html.escape(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead><tbody>")
    for r, b in zip(rows, bold):
        out.append("<tr>" + "".join(
            f"<td><b>{html.escape(c)}</b></td>" if f and c else f"<td>{html.escape(c)}</td>"
            for c, f in zip(r, b)) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def gene_selection_modes(runs: pd.DataFrame) -> list[str]:
    """Distinct ``uns['cmrcnet']['gene_selection']`` values found (empty strings dropped)."""
    if runs.empty or "gene_selection" not in runs:
        return []
    return sorted({str(v) for v in runs["gene_selection"] if isinstance(v, str) and v})


"""Benchmark report: tables (CSV), figures (PNG), one self-contained HTML page and a Markdown summary.

``build_report(DIR)`` scores every prediction file under ``DIR`` (found by content: an
``.h5ad`` with ``layers["predicted"]`` and ``layers["observed"]``) and writes into
``DIR/report/``. Methods scored on different (seed, held-out sample) sets are not compared
unless ``allow_incomplete=True`` (``cmrcnet report --allow-incomplete``), and the report then
says so. The HTML embeds its images as base64 data URIs so it can be
mailed or archived as a single file; the Markdown links the PNGs next to it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cmrcnet import plots
from cmrcnet.errors import InputError
from cmrcnet.evaluation.gene_sets import DEFAULT_KS, top_expressed, top_variable
from cmrcnet.evaluation.metrics import prediction_arrays
from cmrcnet.evaluation.summary import (
    Collection,
    ablation_table,
    constant_table,
    gene_selection_modes,
    main_runs,
    mismatched_coverage,
    natural_key,
    scan,
    smallest_k,
    table1,
    table2,
    to_html,
    to_markdown,
    top_genes,
)
from cmrcnet.utils import atomic_path, write_text_atomic

#: Gene sets of the paper's Table 1.
TABLE1_SETS = ("HEG50", "HVG50", "markers")
CONVENTIONS = (
    "PCC per gene across the spots of one held-out sample; a gene whose prediction or ground truth "
    "is constant has an undefined PCC, counted as 0 (as the authors do) and reported below. "
    "HEG/HVG sets are the top-k genes by mean / variance in each held-out sample's own ground truth, "
    "among the predicted genes. Averages: over the genes of a set, then over held-out samples "
    "(folds), then {seeds}; 'sd over samples' columns give the sd over held-out samples of "
    "each sample's {sample_mean}. {best}"
)


def spread_words(n_seeds: int) -> str:
    """What a value cell of the tables is: ``mean ± sd over 3 seeds``, or with one seed only a mean."""
    return f"mean ± sd over {n_seeds} seeds" if n_seeds > 1 else "the mean (one seed: no sd over seeds)"


def _headers(table: pd.DataFrame) -> pd.DataFrame:
    """Display headers saying what each column's spread is (sd over seeds / over held-out samples)."""
    n_seeds = int(pd.to_numeric(table.get("seeds", pd.Series([1])), errors="coerce").max() or 1) if len(table) else 1
    headers = {}
    for c in table.attrs.get("display", []):
        if str(c).endswith(" fold sd"):
            headers[c] = f"{str(c)[: -len(' fold sd')]} sd over samples"
        elif f"{c} mean" in table.columns:
            headers[c] = f"{c} (mean ± sd, {n_seeds} seeds)" if n_seeds > 1 else f"{c} (mean, 1 seed)"
    table.attrs["headers"] = headers
    return table


@dataclass
class ReportItem:
    """One table or figure of the report."""

    title: str
    caption: str = ""
    table: pd.DataFrame | None = None
    figure: Path | None = None
    csv: Path | None = None


@dataclass
class ReportContent:
    bench_dir: Path
    notes: list[str] = field(default_factory=list)
    items: list[ReportItem] = field(default_factory=list)


# --------------------------------------------------------------------------- tables


def _write_csv(df: pd.DataFrame, path: Path, index: bool = True) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=index)
    return path


def _tables(coll: Collection, out_dir: Path, rank: bool = True) -> list[ReportItem]:
    s = coll.summary
    n_seeds = int(coll.runs["seed"].nunique()) if len(coll.runs) else 1
    spread = spread_words(n_seeds)
    items = [
        ReportItem("Table 1 — top-50 genes and marker genes (PCC)",
                   "Mean PCC over genes of each held-out sample's HEG-50 / HVG-50 and the dataset's "
                   f"marker genes; {spread}, and the sd over held-out samples ('sd over samples'). "
                   "Retrieval methods: one row per number of "
                   "neighbours k (label suffix).", table1(s, TABLE1_SETS)),
        ReportItem("Table 2 — extended gene sets (PCC)",
                   "HEG/HVG-150 scored on retrieval runs with k = 250, HEG/HVG-250 with k = 500 (paper); "
                   "'k used' shows the k actually available; regression methods use their only prediction.",
                   table2(s)),
        ReportItem("Table 3 — five best-predicted genes per method",
                   f"Mean PCC over folds{' and seeds' if n_seeds > 1 else ''} among all predicted genes; a gene must be scored in "
                   "every run of the method.", top_genes(coll.genes, n=5)),
        ReportItem("All predicted genes",
                   "Mean PCC, Spearman and MSE over every predicted gene (the set behind most published "
                   "averages).", _metric_table(s)),
        ReportItem("Gene-gene correlation preservation (Fig. 4 numbers)",
                   "PCC between the upper triangles of the predicted and true gene-gene correlation "
                   f"matrices of each held-out sample's HEG-50 / HVG-50; {spread}.",
                   table1(s, ("HEG50", "HVG50"), metric="gene_corr_similarity")),
        ReportItem("Constant genes",
                   "Genes whose PCC was undefined (constant prediction or ground truth) and counted as 0, "
                   "summed over all runs and all predicted genes; 'constant predictions' are those where "
                   "the model output did not vary.", constant_table(coll.runs)),
    ]
    abl = ablation_table(s, TABLE1_SETS)
    if len(abl):
        items.append(ReportItem("Table 5 — ablation variants",
                                "Runs with uns['cmrcnet']['variant'] (mask rate, reconstruction loss, "
                                f"reconstructed feature), at their smallest k; {spread}.", abl))
    names = ["table1", "table2", "table3_top_genes", "all_genes", "gene_corr_similarity", "constant_genes",
             "table5_ablation"]
    for item, name in zip(items, names):
        item.csv = _write_csv(item.table, out_dir / f"{name}.csv")
        _headers(item.table).attrs["rank"] = rank
    settings = settings_table(coll.runs)
    items.insert(0, ReportItem("Run settings", "What each method's runs were trained with, from each prediction's "
                               "uns['cmrcnet'] (run.json): preset, epochs, encoder, and every setting that differs "
                               "from the preset ('overrides': --set, --config, ablation variant); the seeds and "
                               "held-out samples scored.", settings,
                               csv=_write_csv(settings, out_dir / "run_settings.csv")))
    return items


def _values(col: pd.Series, none: str = "not recorded") -> str:
    vals = sorted({str(v) for v in col if v is not None and not (isinstance(v, float) and np.isnan(v)) and str(v) != ""},
                  key=natural_key)
    return ", ".join(vals) if vals else none


def _overrides_text(col: pd.Series) -> str:
    import json

    texts = {str(v) for v in col if isinstance(v, str)}
    if not texts or texts == {""}:
        return "not recorded"
    parts = []
    for t in sorted(texts):
        d = json.loads(t) if t else {}
        parts.append(", ".join(f"{k}={v}" for k, v in d.items()) if d else "none")
    return " | ".join(dict.fromkeys(parts))


def settings_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per method label: preset, epochs, encoder, overrides, seeds and held-out samples."""
    rows = {}
    for label, g in runs.groupby("label", sort=False):
        rows[label] = {
            "preset": _values(g["preset"]),
            "epochs": _values(g["epochs"]),
            "encoder": _values(g["encoder"], none="-"),
            "overrides": _overrides_text(g["overrides"]),
            "seeds": _values(g["seed"]),
            "held-out samples": _values(g["sample_id"]),
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table = table.loc[sorted(table.index, key=natural_key)] if len(table) else table
    table.index.name = "label"
    table.attrs.update(display=list(table.columns), best={})
    return table


def _metric_table(s: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd of PCC, Spearman and MSE on the ``all`` set, one row per method."""
    parts = {m: table1(s, ("all",), metric=m) for m in ("mean_pcc", "mean_spearman", "mean_mse")}
    base = parts["mean_pcc"]
    out = pd.DataFrame(index=base.index)
    best = {}
    for m, t in parts.items():
        name = m.replace("mean_", "").upper() if m != "mean_spearman" else "Spearman"
        out[name], out[f"{name} mean"] = t["all"], t["all mean"]
        best[name] = (f"{name} mean", "min" if m == "mean_mse" else "max")
    out["seeds"], out["samples"] = base["seeds"], base["samples"]
    out.attrs.update(display=[*best, "seeds", "samples"], best=best)
    return out


# --------------------------------------------------------------------------- figures


def _load(path: str) -> Any:
    import anndata as ad

    return ad.read_h5ad(path)


def representative_runs(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per dataset: one run per method (smallest k, lowest seed) on the first held-out sample.

    The paper's Figs. 3-7 show one sample per dataset with k = 50.
    """
    out: dict[str, pd.DataFrame] = {}
    main = main_runs(runs)
    for dataset, g in main.groupby("dataset", sort=True):
        sample = sorted(g["sample_id"].unique(), key=natural_key)[0]
        g = g[g["sample_id"] == sample].copy()
        g["_k"] = g["top_k"].map(lambda k: -1 if k is None or pd.isna(k) else int(k))
        g = g.sort_values(["method", "seed", "_k"]).groupby("method", sort=False).head(1)
        order = sorted(range(len(g)), key=lambda i: natural_key(g["label"].iloc[i]))
        out[str(dataset)] = g.iloc[order]
    return out


def _align(preds: dict[str, Any]) -> dict[str, Any]:
    """Restrict all predictions to the spots they share (same obs_names, same order)."""
    names = list(preds)
    common = pd.Index(preds[names[0]].obs_names)
    for n in names[1:]:
        common = common.intersection(preds[n].obs_names, sort=False)
    if len(common) < 3:
        raise InputError("predictions of the representative sample share fewer than 3 spots")
    return {n: a[common] for n, a in preds.items()}


def _figures(coll: Collection, out_dir: Path, max_spatial_genes: int) -> list[ReportItem]:
    items: list[ReportItem] = []
    main_genes = smallest_k(main_runs(coll.genes))
    n_seeds = int(coll.runs["seed"].nunique()) if len(coll.runs) else 1
    for set_name in ("HEG50", "HVG50"):
        if set_name in main_genes.columns:
            path = out_dir / f"fig2_boxplot_{set_name}.png"
            plots.boxplot_pcc(main_genes, set_name, out=path)
            items.append(ReportItem(f"Fig. 2 — per-gene PCC, {set_name}",
                                    "One box per method (its smallest k) and held-out sample"
                                    + (f"; genes averaged over {n_seeds} seeds" if n_seeds > 1 else "; one seed")
                                    + "; triangle = mean.",
                                    figure=path))
    reps = representative_runs(coll.runs)
    several = len(reps) > 1
    for dataset, rows in reps.items():
        suffix = f"_{dataset}" if several and dataset else ""
        where = f"{dataset + ', ' if several and dataset else ''}sample {rows['sample_id'].iloc[0]}, " \
                f"seed {rows['seed'].min()}"
        try:
            items.extend(_sample_figures(rows, out_dir, suffix, where, max_spatial_genes))
        except (InputError, KeyError, ValueError) as e:
            warnings.warn(f"per-sample figures skipped ({where}): {e}", stacklevel=2)
    abl = ablation_table(coll.summary, TABLE1_SETS)
    if len(abl):
        path = out_dir / "fig_ablation.png"
        plots.ablation_plot(abl, TABLE1_SETS, out=path)
        items.append(ReportItem("Ablation variants", f"{spread_words(n_seeds)[0].upper()}{spread_words(n_seeds)[1:]} "
                                "per variant.", figure=path))
    return items


def _sample_figures(rows: pd.DataFrame, out_dir: Path, suffix: str, where: str,
                    max_spatial_genes: int) -> list[ReportItem]:
    """Figs. 3-7 for one held-out sample, one prediction per method."""
    preds = _align({r.label: _load(r.path) for r in rows.itertuples()})
    labels = list(preds)
    first = preds[labels[0]]
    shared = [g for g in first.var_names if all(g in preds[lb].var_names for lb in labels[1:])]
    if len(shared) < 3:
        raise InputError("methods share fewer than 3 predicted genes")
    _, obs = prediction_arrays(first[:, shared])
    items = []
    path = out_dir / f"fig3_mean_variance{suffix}.png"
    plots.mean_variance_scatter(preds, out=path)
    items.append(ReportItem("Fig. 3 — predicted vs reference mean and variance per gene",
                            f"{where}; blue = reference, yellow = predicted; r = Pearson over genes.",
                            figure=path))
    for set_name, pick in (("HEG50", top_expressed), ("HVG50", top_variable)):
        genes = pick(obs, shared, 50)
        path = out_dir / f"fig4_gene_correlation_{set_name}{suffix}.png"
        o = prediction_arrays(first[:, genes])[1]
        plots.correlation_heatmaps(o, {lb: prediction_arrays(preds[lb][:, genes])[0] for lb in labels},
                                   genes, out=path, title=f"{set_name} ({where})")
        items.append(ReportItem(f"Fig. 4 — gene-gene correlation, {set_name}",
                                f"{where}; genes ordered by hierarchical clustering of the ground truth; "
                                "similarity = PCC between upper triangles.", figure=path))
    raw = dict(first.uns.get("cmrcnet", {}) or {}).get("markers")
    markers = [] if raw is None else [str(m) for m in np.asarray(raw, dtype=object).ravel()]
    genes = [g for g in shared if g.lower() in {m.lower() for m in markers}][:max_spatial_genes]
    kind = "marker genes"
    if not genes:
        genes, kind = top_expressed(obs, shared, 3), "top expressed genes (no marker predicted)"
    path = out_dir / f"fig5_spatial{suffix}.png"
    plots.spatial_maps(preds, genes, out=path, title=where)
    items.append(ReportItem(f"Figs. 5-7 — spatial expression of {kind}",
                            f"{where}; observed vs predicted on the low-res H&E; each panel has its own "
                            "colour range (1st-99th percentile).", figure=path))
    return items


# --------------------------------------------------------------------------- notes


def _notes(coll: Collection, problems: list[str] | None = None) -> list[str]:
    runs = coll.runs
    n_seeds = int(runs["seed"].nunique()) if len(runs) else 1
    best = ("Best value per column in bold." if not problems else
            "Best value per column in bold, although the methods were not scored on the same runs (asked for "
            "with --allow-incomplete).")
    notes = [CONVENTIONS.format(seeds=spread_words(n_seeds), best=best,
                                sample_mean="mean over seeds" if n_seeds > 1 else "score")]
    for p in problems or []:
        notes.append(f"INCOMPLETE COMPARISON (reported because --allow-incomplete was given): {p}. Differences "
                     "between these rows may come from which samples and seeds were scored, not from the methods.")
    presets, epochs = _values(runs["preset"]), _values(runs["epochs"])
    notes.append(f"Run settings: preset {presets}; epochs {epochs}; encoders {_values(runs['encoder'], none='-')}; "
                 f"overrides of the preset: {_overrides_text(runs['overrides'])} (per method: the Run settings table).")
    n_methods = runs["label"].nunique()
    notes.append(f"{len(runs)} prediction files scored: {n_methods} method labels, "
                 f"{runs['seed'].nunique()} seeds, {runs['sample_id'].nunique()} held-out samples.")
    modes = gene_selection_modes(runs)
    notes.append("Gene selection: " + (", ".join(modes) if modes else "not recorded in uns['cmrcnet']") + ".")
    n_const, n_pairs = int(runs["n_constant"].sum()), int(runs["n_genes"].sum())
    notes.append(f"Constant genes (PCC undefined, counted as 0): {n_const} of {n_pairs} gene-run pairs "
                 f"({int(runs['n_pred_constant'].sum())} with a constant prediction).")
    missing = sorted({m for v in runs["missing_markers"] for m in str(v).split(",") if m})
    if missing:
        notes.append("Marker genes not among the predicted genes (not scored): " + ", ".join(missing) + ".")
    unmeasured = sorted({(r.sample_id, g) for r in runs.itertuples() for g in str(r.unmeasured_genes).split(",") if g})
    if unmeasured:
        by_sample: dict[str, list[str]] = {}
        for s_id, g in unmeasured:
            by_sample.setdefault(s_id, []).append(g)
        parts = [f"{s_id}: {len(gs)} ({', '.join(gs[:8])}{', ...' if len(gs) > 8 else ''})" for s_id, gs in by_sample.items()]
        notes.append("Predicted genes absent from a held-out sample's counts (not scored there; full list in "
                     "runs.csv): " + "; ".join(parts) + ".")
    for path, reason in coll.skipped:
        notes.append(f"Skipped {path}: {reason}")
    return notes


# --------------------------------------------------------------------------- rendering

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table.tbl{border-collapse:collapse;margin:.6em 0;font-size:.9em}
table.tbl th,table.tbl td{border:1px solid #ccc;padding:3px 8px;text-align:left}
table.tbl th{background:#f3f3f3}table.tbl tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption,.cap{color:#555;font-size:.9em}ul.notes li{margin:.25em 0}
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(content: ReportContent) -> str:
    """One self-contained page: inline CSS, HTML tables, images as data URIs."""
    esc = html.escape
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>cmrcnet benchmark report — {esc(content.bench_dir.name)}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>cmrcnet benchmark report</h1><p class=\"cap\">{esc(str(content.bench_dir))} · {stamp}</p>",
             "<h2>Notes</h2><ul class=\"notes\">", *[f"<li>{esc(n)}</li>" for n in content.notes], "</ul>"]
    for item in content.items:
        parts.append(f"<h2>{esc(item.title)}</h2>")
        if item.table is not None:
            if item.caption:
                parts.append(f'<p class="cap">{esc(item.caption)}</p>')
            parts.append(to_html(item.table) if len(item.table) else "<p>(no data)</p>")
        if item.figure is not None:
            parts.append(f'<figure><img src="{_data_uri(item.figure)}" alt="{esc(item.title)}">'
                         f"<figcaption>{esc(item.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_markdown(content: ReportContent, md_path: Path) -> str:
    """The same content as Markdown; figures linked relative to ``md_path``."""
    lines = ["# cmrcnet benchmark report", "", f"`{content.bench_dir}`", "", "## Notes", ""]
    lines += [f"- {n}" for n in content.notes] + [""]
    for item in content.items:
        lines += [f"## {item.title}", ""]
        if item.caption:
            lines += [item.caption, ""]
        if item.table is not None:
            lines += [to_markdown(item.table) if len(item.table) else "(no data)", ""]
        if item.figure is not None:
            rel = os.path.relpath(item.figure, md_path.parent).replace(os.sep, "/")
            lines += [f"![{item.title}]({rel})", ""]
    return "\n".join(lines)


def build_report(bench_dir: str | Path, out_html: str | Path | None = None, out_md: str | Path | None = None,
                 ks: tuple[int, ...] = DEFAULT_KS, max_spatial_genes: int = 4,
                 allow_incomplete: bool = False) -> tuple[Path, Path]:
    """Score ``bench_dir`` and write tables, figures, ``report.html`` and ``report.md`` into ``bench_dir/report``.

    Returns (html path, markdown path). Raises InputError when no prediction file can be scored,
    and when the methods compared were scored on different (seed, held-out sample) sets, unless
    ``allow_incomplete`` (the report then says so at the top).
    """
    from cmrcnet.utils import check_writable_dir

    bench_dir = Path(bench_dir)
    out_dir = bench_dir / "report"
    coll = scan(bench_dir, ks=ks)
    if coll.runs.empty:
        why = "; ".join(f"{p}: {r}" for p, r in coll.skipped[:5])
        raise InputError("no scorable prediction files (.h5ad with layers 'predicted' and 'observed')"
                         + (f" ({why})" if why else ""), bench_dir)
    problems = mismatched_coverage(coll.runs)
    if problems and not allow_incomplete:
        raise InputError("; ".join(problems) + ". Not ranking them: finish the benchmark (cmrcnet benchmark ... "
                         "--resume), or pass --allow-incomplete to report anyway", bench_dir)
    check_writable_dir(out_dir, "report folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(coll.summary, out_dir / "per_run_summary.csv", index=False)
    _write_csv(coll.genes, out_dir / "per_gene_metrics.csv", index=False)
    _write_csv(coll.runs, out_dir / "runs.csv", index=False)
    content = ReportContent(bench_dir=bench_dir, notes=_notes(coll, problems))
    content.items = _tables(coll, out_dir) + _figures(coll, out_dir, max_spatial_genes)
    html_path = Path(out_html) if out_html is not None else out_dir / "report.html"
    md_path = Path(out_md) if out_md is not None else out_dir / "report.md"
    write_text_atomic(html_path, render_html(content))
    write_text_atomic(md_path, render_markdown(content, md_path))
    _make_readable([p for p in out_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
                   + [html_path, md_path])
    return html_path, md_path


def _make_readable(paths: list[Path]) -> None:
    """Give the report files normal permissions (atomic writes create them 0600 via mkstemp)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in dict.fromkeys(paths):
        os.chmod(p, 0o666 & ~mask)

"""Figures of the paper's evaluation (Figs. 2-7), drawn headless.

Every function builds a :class:`matplotlib.figure.Figure` directly (no pyplot
state, so nothing leaks between calls and no display is needed), returns it,
and writes a PNG atomically when ``out`` is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import EllipseCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from cmrcnet.errors import InputError
from cmrcnet.evaluation.metrics import (
    correlation_matrix,
    dense,
    gene_gene_correlation_similarity,
    per_gene_metrics,
    prediction_arrays,
)
from cmrcnet.evaluation.summary import natural_key
from cmrcnet.utils import atomic_path

_EXTRA = ["#9467bd", "#8c564b", "#17becf", "#bcbd22", "#d62728", "#393b79", "#637939"]
REF_COLOUR, PRED_COLOUR = "#1f77b4", "#ffb000"  # Fig. 3: reference blue, prediction yellow
DPI = 110


def method_colour(label: str, order: Sequence[str] = ()) -> str:
    """Stable colour of a method label (``cmrcnet-50`` -> CMRCNet's green): the registered
    method's colour (:func:`cmrcnet.models.register_method`), else one from a fallback palette."""
    from cmrcnet.models import method_colours

    known = sorted(method_colours().items(), key=lambda kv: -len(kv[0]))  # longest name first
    key = str(label).lower().replace("-", "").replace("_", "")
    for name, colour in known:
        if key.startswith(name):
            return colour
    others = [o for o in order if not any(str(o).lower().replace("-", "").startswith(n) for n, _ in known)]
    i = others.index(label) if label in others else sum(map(ord, str(label)))
    return _EXTRA[i % len(_EXTRA)]


def _shade(colour: str, f: float) -> str:
    """Darken (f < 0, towards black) or lighten (f > 0, towards white) a colour."""
    from matplotlib.colors import to_hex, to_rgb

    rgb = np.array(to_rgb(colour))
    rgb = rgb * (1 + f) if f < 0 else rgb + (1 - rgb) * f
    return to_hex(np.clip(rgb, 0, 1))


def label_colours(labels: Sequence[str]) -> dict[str, str]:
    """Colours for a set of labels: the method's colour, in darker-to-lighter shades when
    one method appears several times (e.g. ``cmrcnet-50`` and ``cmrcnet-500``)."""
    labels = list(labels)
    groups: dict[str, list[str]] = {}
    for lb in labels:
        groups.setdefault(method_colour(lb, labels), []).append(lb)
    out: dict[str, str] = {}
    for colour, members in groups.items():
        for i, lb in enumerate(members):
            out[lb] = colour if len(members) == 1 else _shade(colour, -0.35 + 0.8 * i / (len(members) - 1))
    return out


def save_figure(fig: Figure, out: str | Path | None, dpi: int = DPI) -> Path | None:
    """Write ``fig`` as PNG to ``out`` atomically (no half-written file on a crash)."""
    if out is None:
        return None
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return out


def _message(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- Fig. 2


def boxplot_pcc(gene_df: pd.DataFrame, set_name: str, out: str | Path | None = None,
                metric: str = "pcc") -> Figure:
    """Fig. 2: per-gene PCC of one gene set, one group of boxes per held-out sample, one box per method.

    A gene's PCC is first averaged over seeds, so each box holds one point per gene.
    """
    need = {"label", "sample_id", "gene", metric, set_name}
    if not need <= set(gene_df.columns):
        raise InputError(f"per-gene table lacks columns {sorted(need - set(gene_df.columns))}")
    sub = gene_df[gene_df[set_name].astype(bool)]
    per_gene = sub.groupby(["sample_id", "label", "gene"])[metric].mean().reset_index()
    samples = sorted(per_gene["sample_id"].unique(), key=natural_key)
    labels = sorted(per_gene["label"].unique(), key=natural_key)
    width = 0.8 / max(len(labels), 1)
    colours = label_colours(labels)
    fig = Figure(figsize=(max(4.0, 1.0 + len(samples) * (0.45 * len(labels) + 0.6)), 4.2))
    ax = fig.add_subplot()
    if per_gene.empty:
        _message(ax, f"no genes in {set_name}")
        save_figure(fig, out)
        return fig
    for j, label in enumerate(labels):
        data = [per_gene.loc[(per_gene["sample_id"] == s) & (per_gene["label"] == label), metric].to_numpy()
                for s in samples]
        pos = np.arange(len(samples)) - 0.4 + width * (j + 0.5)
        keep = [i for i, d in enumerate(data) if len(d)]
        if not keep:
            continue
        bp = ax.boxplot([data[i] for i in keep], positions=pos[keep], widths=width * 0.85,
                        patch_artist=True, showmeans=True, manage_ticks=False,
                        flierprops={"markersize": 2, "alpha": 0.5},
                        meanprops={"marker": "^", "markerfacecolor": "white", "markeredgecolor": "black",
                                   "markersize": 4},
                        medianprops={"color": "black"})
        for box in bp["boxes"]:
            box.set_facecolor(colours[label])
            box.set_alpha(0.85)
    ax.axhline(0, color="0.6", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(samples)), [str(s) for s in samples])
    ax.set_xlabel("held-out sample")
    ax.set_ylabel(f"{metric.upper()} per gene")
    ax.set_title(f"{set_name}: per-gene {metric.upper()} (mean over seeds; triangle = mean)")
    ax.legend(handles=[Patch(facecolor=colours[lb], label=lb) for lb in labels],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    save_figure(fig, out)
    return fig


# --------------------------------------------------------------------------- Fig. 3


def mean_variance_scatter(preds: Mapping[str, Any], out: str | Path | None = None) -> Figure:
    """Fig. 3: per-gene mean (top row) and variance (bottom row), reference blue vs predicted yellow.

    Genes are ordered along x by their reference value; the panel title gives the
    Pearson r between predicted and reference values over genes.
    """
    if not preds:
        raise InputError("no predictions to plot")
    labels = list(preds)
    fig = Figure(figsize=(3.2 * len(labels) + 0.4, 6.2), layout="constrained")
    axes = fig.subplots(2, len(labels), squeeze=False)
    for j, label in enumerate(labels):
        pred, obs = prediction_arrays(preds[label])
        for i, (stat, fn) in enumerate((("mean", np.mean), ("variance", np.var))):
            ax = axes[i, j]
            ref, prd = fn(obs, axis=0), fn(pred, axis=0)
            order = np.argsort(ref, kind="stable")
            x = np.arange(len(order))
            ax.scatter(x, ref[order], s=5, color=REF_COLOUR, label="reference", alpha=0.8, lw=0)
            ax.scatter(x, prd[order], s=5, color=PRED_COLOUR, label="predicted", alpha=0.8, lw=0)
            r = np.corrcoef(ref, prd)[0, 1] if ref.std() > 0 and prd.std() > 0 else float("nan")
            ax.set_title(f"{label}\n{stat}: r = {r:.3f}" if i == 0 else f"{stat}: r = {r:.3f}", fontsize=9)
            ax.set_xlabel("genes (sorted by reference)", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{stat} of log1p expression", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, markerscale=2, frameon=False)
    save_figure(fig, out)
    return fig


# --------------------------------------------------------------------------- Fig. 4


def cluster_order(corr: np.ndarray) -> np.ndarray:
    """Leaf order of average-linkage clustering on 1 - correlation (identity for < 3 genes)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    n = corr.shape[0]
    if n < 3:
        return np.arange(n)
    dist = np.clip(1.0 - corr, 0.0, 2.0)
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    return leaves_list(linkage(squareform(dist, checks=False), method="average"))


def correlation_heatmaps(obs: np.ndarray, preds: Mapping[str, np.ndarray], genes: Sequence[str],
                         out: str | Path | None = None, title: str | None = None) -> Figure:
    """Fig. 4: gene-gene correlation of the ground truth and of each prediction.

    All panels share the gene order of the hierarchical clustering of the ground
    truth, so blocks can be compared by eye; each title gives the similarity
    (PCC between the upper triangles) to the ground truth.
    """
    o = dense(obs)
    if o.ndim != 2 or o.shape[1] != len(genes):
        raise InputError(f"observed has shape {o.shape}, expected (spots, {len(genes)} genes)")
    ref = correlation_matrix(o)
    order = cluster_order(ref)
    panels: list[tuple[str, np.ndarray]] = [("ground truth", ref)]
    for label, p in preds.items():
        p = dense(p)
        if p.shape != o.shape:
            raise InputError(f"{label}: prediction {p.shape} differs from ground truth {o.shape}")
        sim = gene_gene_correlation_similarity(p, o)
        panels.append((f"{label}\nsimilarity {sim:.3f}", correlation_matrix(p)))
    n = len(panels)
    fig = Figure(figsize=(3.3 * n + 0.8, 3.9), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    show_names = len(genes) <= 30  # 50 names are unreadable and slow to lay out
    for ax, (name, c) in zip(axes, panels):
        im = ax.imshow(c[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        if show_names:
            names = [str(genes[i]) for i in order]
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=max(3, 6 - len(names) // 30))
            ax.set_yticks(range(len(names)), names if ax is axes[0] else [],
                          fontsize=max(3, 6 - len(names) // 30))
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="Pearson r")
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, out)
    return fig


# --------------------------------------------------------------------------- Figs. 5-7


def _spatial_meta(adata: Any) -> tuple[np.ndarray | None, float, float | None]:
    """(image or None, coordinate scale to image pixels, spot diameter in those pixels or None):
    the ``hires`` image where there is one, else ``lowres`` (scanpy's own preference)."""
    spatial = adata.uns.get("spatial", {}) or {}
    meta = dict(adata.uns.get("cmrcnet", {}) or {})
    key = str(meta.get("sample_id", ""))
    entry = spatial.get(key) if key in spatial else (next(iter(spatial.values())) if spatial else None)
    if not isinstance(entry, Mapping):
        return None, 1.0, None
    images = entry.get("images") or {}
    sf = dict(entry.get("scalefactors") or {})
    res = "hires" if images.get("hires") is not None and sf.get("tissue_hires_scalef") is not None else "lowres"
    img = images.get(res)
    scale = sf.get(f"tissue_{res}_scalef")
    if img is None or scale is None:
        d = sf.get("spot_diameter_fullres")
        return None, 1.0, float(d) if d else None
    d = sf.get("spot_diameter_fullres")
    return np.asarray(img), float(scale), float(d) * float(scale) if d else None


def _spot_diameter(xy: np.ndarray) -> float:
    """A spot size from the median nearest-neighbour distance (when no scalefactor gives it)."""
    if len(xy) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(xy).query(xy, k=2)
    nn = float(np.median(dist[:, 1]))
    return 0.9 * nn if nn > 0 else 1.0


def _draw_spots(ax: Axes, xy: np.ndarray, values: np.ndarray, diameter: float,
                image: np.ndarray | None) -> EllipseCollection:
    if image is not None:
        ax.imshow(image, interpolation="bilinear")
    lo, hi = np.percentile(values, [1, 99]) if len(values) else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    coll = EllipseCollection(widths=diameter, heights=diameter, angles=0, units="xy", offsets=xy,
                             offset_transform=ax.transData, cmap="viridis", alpha=0.9, linewidths=0)
    coll.set_array(values)
    coll.set_clim(lo, hi)
    ax.add_collection(coll)
    pad = 1.5 * diameter
    x0, y0 = xy.min(axis=0) - pad
    x1, y1 = xy.max(axis=0) + pad
    if image is not None:
        h, w = image.shape[:2]
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return coll


def spatial_maps(preds: Mapping[str, Any], genes: Sequence[str], out: str | Path | None = None,
                 title: str | None = None) -> Figure:
    """Figs. 5-7: observed vs predicted expression of genes as coloured spots on the low-res H&E.

    ``preds`` maps a method label to its prediction AnnData of one held-out sample;
    the first one supplies the ground truth and the image (``uns['spatial']``,
    scanpy convention; plain coordinates when no image is stored). Each panel has
    its own colour range (1st-99th percentile): retrieval averages compress the
    range, and the spatial pattern is what is compared; the title gives the PCC.
    """
    if not preds:
        raise InputError("no predictions to plot")
    labels = list(preds)
    first = preds[labels[0]]
    if "spatial" not in first.obsm:
        raise InputError("prediction has no obsm['spatial'] spot coordinates")
    image, scale, diameter = _spatial_meta(first)
    genes = list(genes)
    has_obs = "observed" in first.layers  # whole-slide grids have no ground truth
    off = 1 if has_obs else 0
    ncol = off + len(labels)
    span = np.ptp(np.asarray(first.obsm["spatial"], dtype=float)[:, :2], axis=0) + 1e-9
    aspect = float(np.clip(span[1] / span[0], 0.4, 2.5))  # row height follows the tissue's shape
    fig = Figure(figsize=(2.9 * ncol, (2.6 * aspect + 0.4) * max(len(genes), 1) + (0.4 if title else 0)),
                 layout="constrained")
    axes = fig.subplots(max(len(genes), 1), ncol, squeeze=False)
    if not genes:
        _message(axes[0, 0], "no genes to show")
    for i, gene in enumerate(genes):
        if gene not in first.var_names:
            for ax in axes[i]:
                _message(ax, f"{gene}: not predicted")
            continue
        xy = np.asarray(first.obsm["spatial"], dtype=float)[:, :2] * scale
        d = diameter if diameter else _spot_diameter(xy)
        if has_obs:
            _, obs = prediction_arrays(first[:, [gene]])
            coll = _draw_spots(axes[i, 0], xy, obs[:, 0], d, image)
            fig.colorbar(coll, ax=axes[i, 0], fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            axes[i, 0].set_title(f"{gene}: observed", fontsize=9)
        for j, label in enumerate(labels, start=off):
            ax = axes[i, j]
            a = preds[label]
            if gene not in a.var_names:
                _message(ax, f"{gene}: not predicted by {label}")
                continue
            xy_j = np.asarray(a.obsm["spatial"], dtype=float)[:, :2] * scale
            if has_obs and "observed" in a.layers:
                pred, obs_j = prediction_arrays(a[:, [gene]])
                pcc = float(per_gene_metrics(pred, obs_j, [gene])["pcc"].iloc[0])
                ax.set_title(f"{label}: PCC {pcc:.3f}", fontsize=9)
            else:
                pred = np.asarray(a[:, [gene]].layers["predicted"] if "predicted" in a.layers else a[:, [gene]].X)
                ax.set_title(f"{gene}: {label} (predicted)", fontsize=9)
            coll = _draw_spots(ax, xy_j, np.asarray(pred)[:, 0], d, image)
            fig.colorbar(coll, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, out)
    return fig


# --------------------------------------------------------------------------- Table 5


def ablation_plot(table: pd.DataFrame, sets: Sequence[str] = ("HEG50", "HVG50", "markers"),
                  out: str | Path | None = None) -> Figure:
    """Grouped bars of an ablation table (mean ± sd over seeds per variant and set)."""
    sets = [s for s in sets if f"{s} mean" in table.columns]
    rows = [" / ".join(map(str, ix)) if isinstance(ix, tuple) else str(ix) for ix in table.index]
    fig = Figure(figsize=(max(4.0, 1.2 + 0.9 * len(rows) * max(len(sets), 1) * 0.5), 3.8), layout="constrained")
    ax = fig.add_subplot()
    if not rows or not sets:
        _message(ax, "no ablation runs")
        save_figure(fig, out)
        return fig
    width = 0.8 / len(sets)
    x = np.arange(len(rows))
    for j, s in enumerate(sets):
        ax.bar(x - 0.4 + width * (j + 0.5), table[f"{s} mean"].to_numpy(dtype=float), width,
               yerr=np.nan_to_num(table[f"{s} sd"].to_numpy(dtype=float)), label=s, capsize=2,
               color=_EXTRA[j % len(_EXTRA)])
    ax.set_xticks(x, rows, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean PCC")
    ax.legend(fontsize=8, frameon=False)
    save_figure(fig, out)
    return fig

"""Plots of predictions (``cn.pl``), in scanpy's style: AnnData in, a matplotlib figure out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    import anndata as ad
    from matplotlib.figure import Figure


def spatial(
    adata: "ad.AnnData | Mapping[str, ad.AnnData]",
    *,
    genes: Sequence[str],
    out: str | Path | None = None,
    title: str | None = None,
) -> "Figure":
    """Predicted (and, where measured, observed) expression of ``genes`` as spots over the H&E.

    ``adata`` is one prediction, or several of the same sample keyed by a label (one column each;
    the first supplies the image and the observed expression). ``out`` also saves the figure (PNG).
    Genes are checked against the prediction before anything is drawn.
    """
    from cmrcnet.data.genes import resolve_gene_names
    from cmrcnet.plots import save_figure, spatial_maps

    preds = dict(adata) if isinstance(adata, Mapping) else {_label(adata): adata}
    first = next(iter(preds.values()))
    wanted = resolve_gene_names(list(genes), list(first.var_names), "genes", "the prediction")
    fig = spatial_maps(preds, wanted, title=title)
    if out is not None:
        save_figure(fig, out)
    return fig


def _label(adata: "ad.AnnData") -> str:
    meta = adata.uns.get("cmrcnet") or {}
    return str(meta.get("method", "predicted"))

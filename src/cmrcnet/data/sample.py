"""The canonical in-memory sample that every reader produces and every method consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import anndata as ad
import numpy as np

from cmrcnet.data.image import SlideImage

#: Fewest spots a sample needs to be trained or scored on: its highly variable genes need
#: variance, its PCC needs spots, and a gradient step on one spot breaks batch norm.
MIN_SPOTS = 10


@dataclass
class Sample:
    """One section: raw counts + spot coordinates + its H&E image.

    ``adata`` follows scverse conventions:

    - ``X``: raw integer counts (CSR), spots x genes; ``var_names`` are gene symbols where
      known (``var["gene_ids"]`` keeps Ensembl ids when the source had them);
    - ``obs_names``: spot barcodes (unique); ``obs["array_row"]``, ``obs["array_col"]`` when known;
    - ``obsm["spatial"]``: spot centre (x, y) in full-resolution image pixels (float);
    - ``uns["spatial"][sample_id]``: ``{"images": {"hires", "lowres": uint8 RGB}, "scalefactors":
      {"tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres"}}`` (filled by
      :func:`cmrcnet.data.readers.attach_images`).
    """

    sample_id: str
    adata: ad.AnnData
    image: SlideImage | None
    um_per_px: float
    spot_diameter_um: float
    pitch_um: float | None = None
    patient_id: str = ""
    dataset: str = ""
    platform: str = ""
    pixel_size_source: str = "metadata"
    """``metadata`` (read from the files) or ``estimated`` (from the spot grid)."""
    meta: dict = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        return int(self.adata.n_obs)

    @property
    def n_genes(self) -> int:
        return int(self.adata.n_vars)

    @property
    def coords_px(self) -> np.ndarray:
        return np.asarray(self.adata.obsm["spatial"], dtype=np.float64)

    @property
    def spot_diameter_px(self) -> float:
        return self.spot_diameter_um / self.um_per_px

    def __repr__(self) -> str:
        size = self.image.size if self.image is not None else None
        return (
            f"Sample({self.sample_id!r}, patient={self.patient_id!r}, spots={self.n_spots}, "
            f"genes={self.n_genes}, image={size}, um_per_px={self.um_per_px:.3f})"
        )


def unusable_reason(sample: Sample, min_spots: int = MIN_SPOTS) -> str | None:
    """Why ``sample`` cannot be trained or scored on (too few spots, no counts at all), with the
    numbers; None when it can."""
    n = sample.n_spots
    if n < min_spots:
        return f"only {n} spot(s); at least {min_spots} are needed to train or score on a sample"
    if sample.n_genes == 0:
        return None  # a slide without counts (prediction only)
    x = sample.adata.X
    total = float(x.sum())
    if total <= 0:
        return f"all {n} spots x {sample.n_genes} genes have zero counts (an empty or mis-exported count table?)"
    return None


def zero_spot_fraction(sample: Sample) -> float:
    """Fraction of the sample's spots whose counts are all zero."""
    if sample.n_spots == 0 or sample.n_genes == 0:
        return 0.0
    per_spot = np.asarray(sample.adata.X.sum(axis=1)).ravel()
    return float((per_spot <= 0).mean())

"""Slides without a spot table: find the tissue, lay a grid of pseudo-spots over it."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import ndimage

from cmrcnet.data.image import SlideImage
from cmrcnet.data.sample import Sample
from cmrcnet.errors import InputError


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of a 1-D array of values in [0, 255]."""
    hist, edges = np.histogram(values, bins=256, range=(0, 256))
    p = hist.astype(np.float64) / max(1, hist.sum())
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    mu_t = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * omega - mu) ** 2 / (omega * (1.0 - omega))
    between = np.nan_to_num(between)
    return float(edges[int(np.argmax(between))])


def tissue_mask(thumb: np.ndarray, min_object_frac: float = 0.001) -> np.ndarray:
    """Tissue vs glass on an RGB thumbnail: stained tissue is saturated and darker than glass.

    Saturation (max - min over channels) separates H&E stain from white/grey background
    on any scanner better than brightness alone; Otsu picks the cut per slide.
    """
    rgb = thumb.astype(np.int16)
    sat = (rgb.max(-1) - rgb.min(-1)).astype(np.float64)
    thr = max(otsu_threshold(sat), 8.0)
    mask = sat > thr
    mask = ndimage.binary_opening(mask, iterations=1)
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        keep = np.flatnonzero(sizes >= min_object_frac * mask.size) + 1
        mask = np.isin(labels, keep)
    return mask


def grid_sample(
    image_path: str | Path,
    um_per_px: float,
    pitch_um: float = 100.0,
    spot_diameter_um: float = 55.0,
    sample_id: str | None = None,
    thumb_max_side: int = 2048,
) -> Sample:
    """A Sample of pseudo-spots on a square grid over the detected tissue (no expression)."""
    if um_per_px <= 0:
        raise InputError(f"pixel size must be positive, got {um_per_px}", image_path)
    image = SlideImage(image_path)
    thumb, scale = image.thumbnail(thumb_max_side)
    mask = tissue_mask(thumb)
    if not mask.any():
        raise InputError("no tissue detected on the slide", image_path)
    width, height = image.size
    pitch_px = pitch_um / um_per_px
    xs = np.arange(pitch_px / 2, width, pitch_px)
    ys = np.arange(pitch_px / 2, height, pitch_px)
    gx, gy = np.meshgrid(xs, ys)
    cols, rows = np.meshgrid(np.arange(len(xs)), np.arange(len(ys)))
    tx = np.clip((gx * scale).astype(int), 0, mask.shape[1] - 1)
    ty = np.clip((gy * scale).astype(int), 0, mask.shape[0] - 1)
    on = mask[ty, tx]
    coords = np.stack([gx[on], gy[on]], 1)
    rc = np.stack([rows[on], cols[on]], 1)
    sid = sample_id or Path(image_path).stem
    obs = pd.DataFrame(
        {"array_row": rc[:, 0].astype(np.int64), "array_col": rc[:, 1].astype(np.int64)},
        index=pd.Index([f"grid_{r}_{c}" for r, c in rc], name="barcode"),
    )
    adata = ad.AnnData(X=sp.csr_matrix((len(obs), 0), dtype=np.int32), obs=obs)
    adata.obsm["spatial"] = coords.astype(np.float64)
    return Sample(
        sample_id=sid,
        adata=adata,
        image=image,
        um_per_px=float(um_per_px),
        spot_diameter_um=float(spot_diameter_um),
        pitch_um=float(pitch_um),
        patient_id=sid,
        platform="grid",
        pixel_size_source="user",
        meta={"tissue_fraction": float(mask.mean())},
    )

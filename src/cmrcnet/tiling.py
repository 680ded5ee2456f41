"""Slides without a spot table: find the tissue, lay a grid of pseudo-spots over it.

Tissue = stained (saturated, unlike glass) **and** near nuclei: the hematoxylin optical
density from colour deconvolution (Ruifrok & Johnston's H&E vectors), averaged over a
window of :data:`NUCLEI_WINDOW_UM`, must exceed a small floor. Eosin-only background (pink
mounting medium or stain on the glass around a section, with no nuclei) is stained but has
no hematoxylin, and is left out.
"""

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


#: Ruifrok & Johnston (2001) stain vectors (optical density of hematoxylin, eosin, residual).
HE_STAINS = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])
#: Window (micrometres) over which hematoxylin is averaged: tissue has nuclei within it.
NUCLEI_WINDOW_UM = 200.0
#: Hematoxylin OD floor of that average (tissue: >= 0.1 on her2st and mob; eosin-only: ~0).
MIN_HEMATOXYLIN_OD = 0.04
#: Most pseudo-spots a grid may have (a 14 x 14 cm slide at a 100 um pitch); beyond it the
#: pixel size or pitch is almost certainly wrong.
MAX_GRID_SPOTS = 2_000_000


def hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel hematoxylin optical density (colour deconvolution, clipped at 0), float32."""
    stains = HE_STAINS / np.linalg.norm(HE_STAINS, axis=1, keepdims=True)
    to_h = np.linalg.inv(stains)[:, 0].astype(np.float32)
    od = -np.log10(np.maximum(np.asarray(rgb, np.float32)[..., :3], 1.0) / 255.0)
    return np.clip(od @ to_h, 0.0, None)


def _clean(mask: np.ndarray, min_object_frac: float) -> np.ndarray:
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        keep = np.flatnonzero(sizes >= min_object_frac * mask.size) + 1
        mask = np.isin(labels, keep)
    return mask


def tissue_mask(thumb: np.ndarray, min_object_frac: float = 0.001, px_um: float | None = None) -> np.ndarray:
    """Tissue on an RGB thumbnail: stained (saturated, unlike glass) and near nuclei.

    Saturation (max - min over channels) separates H&E stain from white/grey background on
    any scanner better than brightness alone; Otsu picks the cut per slide. Of the stained
    area, only what has hematoxylin nearby is kept: the hematoxylin OD averaged over
    :data:`NUCLEI_WINDOW_UM` (``px_um`` = micrometres per thumbnail pixel; unknown: 2 % of
    the thumbnail's side) must exceed :data:`MIN_HEMATOXYLIN_OD` (or 15 % of the stained
    area's 90th percentile, whichever is larger), which drops eosin-only background.
    """
    rgb = thumb.astype(np.int16)
    sat = (rgb.max(-1) - rgb.min(-1)).astype(np.float64)
    thr = max(otsu_threshold(sat), 8.0)
    mask = sat > thr
    mask = ndimage.binary_opening(mask, iterations=1)
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = _clean(mask, min_object_frac)
    if not mask.any():
        return mask
    window = NUCLEI_WINDOW_UM / px_um if px_um and np.isfinite(px_um) and px_um > 0 else 0.02 * max(mask.shape)
    local_h = ndimage.uniform_filter(hematoxylin_od(thumb), size=max(3, int(round(window))))
    cut = max(MIN_HEMATOXYLIN_OD, 0.15 * float(np.percentile(local_h[mask], 90)))
    mask &= local_h > cut
    mask = ndimage.binary_opening(mask, iterations=1)
    return _clean(mask, min_object_frac)


#: Where :meth:`SlideImage.pixel_size` looks, for the error when a slide has none.
PIXEL_SIZE_SOURCES = ("OpenSlide mpp-x/mpp-y, Aperio MPP, OME PhysicalSizeX, TIFF XResolution with "
                      "ResolutionUnit inch/cm, ImageJ micron calibration, PNG/JPEG density")


def slide_pixel_size(image: SlideImage, um_per_px: float | None = None) -> tuple[float, str]:
    """``um_per_px`` if the user gave one (it overrides the file), else the slide's metadata."""
    if um_per_px is not None:
        return float(um_per_px), "user"
    ps = image.pixel_size()
    if ps is None:
        raise InputError(f"the slide stores no pixel size (looked for {PIXEL_SIZE_SOURCES}); give it with "
                         "--um-per-px (um_per_px=)", image.path)
    return ps.um_per_px, ps.source


def grid_sample(
    image_path: str | Path | SlideImage,
    um_per_px: float | None = None,
    pitch_um: float = 100.0,
    spot_diameter_um: float = 55.0,
    sample_id: str | None = None,
    thumb_max_side: int = 2048,
) -> Sample:
    """A Sample of pseudo-spots on a square grid over the detected tissue (no expression).

    ``um_per_px=None`` reads the pixel size from the slide's metadata (:func:`slide_pixel_size`);
    ``sample.pixel_size_source`` records where it came from.

    The grid's size is checked against :data:`MAX_GRID_SPOTS` before anything is allocated:
    a wrong ``um_per_px`` (500 instead of 0.5) would otherwise build a grid of tens of millions.
    """
    image = image_path if isinstance(image_path, SlideImage) else SlideImage(image_path)
    image_path = image.path
    for name, value in (("--um-per-px", um_per_px), ("--pitch-um", pitch_um), ("spot diameter", spot_diameter_um)):
        if value is not None and not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
            raise InputError(f"{name} must be a positive finite number, got {value}", image_path)
    um_per_px, source = slide_pixel_size(image, um_per_px)
    width, height = image.size
    pitch_px = pitch_um / um_per_px
    n_x, n_y = int(np.ceil((width - pitch_px / 2) / pitch_px)), int(np.ceil((height - pitch_px / 2) / pitch_px))
    if n_x * n_y > MAX_GRID_SPOTS:
        raise InputError(
            f"a {pitch_um:g} um grid at {um_per_px:g} um/px is {pitch_px:.3g} px apart: {n_x:,} x {n_y:,} = "
            f"{n_x * n_y:,} pseudo-spots over this {width} x {height} px image (a {width * um_per_px / 1e3:,.1f} x "
            f"{height * um_per_px / 1e3:,.1f} mm slide), over the maximum of {MAX_GRID_SPOTS:,}; check --um-per-px "
            "(the slide's pixel size, typically 0.25-1 um/px) and --pitch-um", image_path)
    sid = sample_id or Path(image_path).stem
    thumb, scale = image.thumbnail(thumb_max_side)
    mask = tissue_mask(thumb, px_um=um_per_px / scale)
    if not mask.any():
        raise InputError("no tissue detected on the slide", image_path)
    xs = np.arange(pitch_px / 2, width, pitch_px)
    ys = np.arange(pitch_px / 2, height, pitch_px)
    gx, gy = np.meshgrid(xs, ys)
    cols, rows = np.meshgrid(np.arange(len(xs)), np.arange(len(ys)))
    tx = np.clip((gx * scale).astype(int), 0, mask.shape[1] - 1)
    ty = np.clip((gy * scale).astype(int), 0, mask.shape[0] - 1)
    on = mask[ty, tx]
    coords = np.stack([gx[on], gy[on]], 1)
    rc = np.stack([rows[on], cols[on]], 1)
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
        pixel_size_source=source,
        meta={"tissue_fraction": float(mask.mean()), "slide": image.describe()},
    )

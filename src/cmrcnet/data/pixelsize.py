"""Estimate the image pixel size (um/px) from the spot grid.

Legacy ST images carry no pixel size, but the array geometry is known: spot centres sit
on a lattice with a fixed centre-to-centre distance (``pitch_um``: 200 um for legacy ST,
100 um for Visium). Measuring that distance in pixels gives um/px.

Two estimators:

- with array coordinates (``array_rowcol``): fit an affine map array -> pixels by least
  squares, place every occupied lattice position through the fit, and average the
  distances between lattice neighbours. The fit averages out spot-detection noise, so
  this is unbiased (her2st: ~290 px per 200 um, i.e. ~0.69 um/px);
- without: the median nearest-neighbour distance of the raw centres (biased low by a
  few percent when centres are noisy, since a minimum over noisy distances is taken).

"Neighbours" are lattice points closer than ``1.15 x`` the shortest lattice distance, so
the estimator works for square (legacy ST 1k), staggered (ST 2k) and hexagonal
(Visium) layouts alike.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.spatial import cKDTree

from cmrcnet.errors import InputError

#: Neighbour cutoff relative to the shortest lattice distance.
NEIGHBOUR_FACTOR = 1.15
#: A fit whose RMS residual exceeds this fraction of the pitch is not trusted.
MAX_FIT_RESIDUAL = 0.25


def _as_points(coords_px: np.ndarray) -> np.ndarray:
    pts = np.asarray(coords_px, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise InputError(f"spot coordinates must have shape (N, 2), got {pts.shape}")
    if not np.isfinite(pts).all():
        raise InputError("spot coordinates contain NaN or infinite values")
    if len(np.unique(pts, axis=0)) < 2:
        raise InputError("need at least two distinct spot positions to estimate the spot pitch")
    return pts


def _median_nn(pts: np.ndarray) -> float:
    """Median distance from each point to its nearest distinct neighbour."""
    pts = np.unique(pts, axis=0)
    d, _ = cKDTree(pts).query(pts, k=2)
    return float(np.median(d[:, 1]))


def _lattice_pitch(pts: np.ndarray) -> float:
    """Mean distance between lattice neighbours of noise-free lattice points."""
    pts = np.unique(np.round(pts, 9), axis=0)
    tree = cKDTree(pts)
    d, _ = tree.query(pts, k=2)
    d_nn = float(np.median(d[:, 1]))
    pairs = tree.query_pairs(r=NEIGHBOUR_FACTOR * d_nn, output_type="ndarray")
    if len(pairs) == 0:
        return d_nn
    dist = np.linalg.norm(pts[pairs[:, 0]] - pts[pairs[:, 1]], axis=1)
    return float(dist.mean())


def estimate_pitch_px(coords_px: np.ndarray, array_rowcol: np.ndarray | None = None) -> float:
    """Centre-to-centre distance of neighbouring spots, in pixels.

    ``array_rowcol`` (N, 2) are the spots' integer array coordinates (any consistent
    order); when given and well fitted by an affine map, the lattice estimator is used.
    """
    pts = _as_points(coords_px)
    if array_rowcol is not None:
        arr = np.asarray(array_rowcol, dtype=np.float64)
        if arr.shape != pts.shape:
            raise InputError(f"array coordinates of shape {arr.shape} do not match spot coordinates {pts.shape}")
        design = np.column_stack([arr, np.ones(len(arr))])
        if np.linalg.matrix_rank(design) == 3:
            coef, *_ = np.linalg.lstsq(design, pts, rcond=None)
            fitted = design @ coef
            pitch = _lattice_pitch(fitted)
            rms = float(np.sqrt(np.mean(np.sum((pts - fitted) ** 2, axis=1))))
            if pitch > 0 and rms <= MAX_FIT_RESIDUAL * pitch:
                return pitch
            warnings.warn(
                f"spot pixels are not an affine image of the array grid (RMS residual {rms:.1f} px "
                f"vs pitch {pitch:.1f} px); using nearest-neighbour distances instead",
                stacklevel=2,
            )
    return _median_nn(pts)


def estimate_um_per_px(coords_px: np.ndarray, pitch_um: float, array_rowcol: np.ndarray | None = None) -> float:
    """Pixel size in um/px: the platform's known pitch divided by the measured pitch in px."""
    if not (np.isfinite(pitch_um) and pitch_um > 0):
        raise InputError(f"spot pitch must be a positive number of micrometres, got {pitch_um!r}")
    pitch_px = estimate_pitch_px(coords_px, array_rowcol)
    if not pitch_px > 0:
        raise InputError("could not measure the spot pitch: spots coincide")
    return float(pitch_um) / pitch_px

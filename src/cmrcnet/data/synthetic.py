"""A tiny synthetic dataset with a known image -> expression link, for tests and demos.

Each spot has ``n_programs`` latent "programs" (smooth spatial fields in [0, 1]). The
programs both *draw the image* around the spot and *drive its counts*, so an image
model can learn to predict expression, and the truth is known (``obs["program_k"]``):

- program 0: density of dark purple "nuclei" dots (haematoxylin);
- program 1: pink "eosin" saturation of the background;
- program 2: amplitude of a fine stripe texture;
- further programs: blue-channel tint.

Counts: ``log mu = b_gene + loadings @ programs + patient effect + log library size``,
drawn negative binomial (gamma-Poisson). Geometry is legacy-ST-like by default (square
grid, 200 um pitch, 100 um spots) or Visium-like (``platform="visium"``: hexagonal,
100 um pitch, 55 um spots); the pixel size is known (``pixel_size_source="metadata"``).
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cmrcnet.data.image import ArrayImage
from cmrcnet.data.sample import Sample

GEOMETRY = {"legacy-st": (200.0, 100.0), "visium": (100.0, 55.0)}
"""platform -> (pitch_um, spot_diameter_um)."""


def _grid(n_spots: int, platform: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Array rows/cols and lattice positions (in pitch units, origin one pitch in) of n spots."""
    n_cols = int(np.ceil(np.sqrt(n_spots)))
    n_rows = int(np.ceil(n_spots / n_cols))
    r, c = np.divmod(np.arange(n_spots), n_cols)
    if platform == "visium":
        arr_row, arr_col = r, 2 * c + (r % 2)
        ux, uy = c + 0.5 * (r % 2) + 1.0, r * np.sqrt(3) / 2 + 1.0
    else:
        arr_row, arr_col = r + 1, c + 1
        ux, uy = c + 1.0, r + 1.0
    return arr_row, arr_col, ux, uy, n_rows, n_cols


def _programs(rng: np.random.Generator, ux: np.ndarray, uy: np.ndarray, k: int) -> np.ndarray:
    """(n, k) smooth fields in [0, 1]: a few random Gaussian bumps per program, squashed."""
    span = max(ux.max(), uy.max())
    out = np.empty((len(ux), k))
    for j in range(k):
        f = np.zeros(len(ux))
        for _ in range(3):
            cx, cy = rng.uniform(0, span, 2)
            s = rng.uniform(0.15, 0.35) * span
            f += rng.choice([-1.0, 1.0]) * np.exp(-((ux - cx) ** 2 + (uy - cy) ** 2) / (2 * s * s))
        f = (f - f.mean()) / (f.std() + 1e-9)
        out[:, j] = 1.0 / (1.0 + np.exp(-1.5 * f))
    return out


def _draw_image(
    rng: np.random.Generator, progs: np.ndarray, ux: np.ndarray, uy: np.ndarray, pitch_px: int
) -> np.ndarray:
    """H&E-like RGB image: each pixel takes the programs of its nearest spot."""
    from scipy.spatial import cKDTree

    w = int(np.ceil((ux.max() + 1) * pitch_px))
    h = int(np.ceil((uy.max() + 1) * pitch_px))
    yy, xx = np.mgrid[0:h, 0:w]
    _, nearest = cKDTree(np.column_stack([ux, uy]) * pitch_px).query(np.column_stack([xx.ravel(), yy.ravel()]))
    p = progs[nearest].reshape(h, w, -1)
    base = np.array([242.0, 226.0, 236.0])
    eosin = np.array([226.0, 120.0, 170.0])
    img = base + (eosin - base) * p[..., 1:2]
    stripes = np.sin(2 * np.pi * (xx + yy) / 5.0)[..., None]
    img = img + 45.0 * p[..., 2:3] * stripes if p.shape[-1] > 2 else img
    if p.shape[-1] > 3:
        img[..., 2] -= 60.0 * p[..., 3:].mean(axis=-1)
    nuclei = rng.random((h, w)) < (0.03 + 0.45 * p[..., 0])
    img[nuclei] = np.array([88.0, 58.0, 148.0])
    img += rng.normal(0, 6.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_synthetic_samples(
    n_samples: int = 4,
    n_patients: int = 2,
    n_spots: int = 150,
    n_genes: int = 60,
    img_px_per_spot: int = 20,
    seed: int = 0,
    n_programs: int = 3,
    platform: str = "legacy-st",
) -> list[Sample]:
    """In-memory samples (``ArrayImage``) whose expression is predictable from the image.

    ``img_px_per_spot`` is the spot pitch in pixels; samples are split into
    ``n_patients`` consecutive groups (S1, S2 -> P1; S3, S4 -> P2 by default).
    """
    if platform not in GEOMETRY:
        raise ValueError(f"platform must be one of {', '.join(GEOMETRY)}")
    if min(n_samples, n_patients, n_spots, n_genes, img_px_per_spot, n_programs) < 1:
        raise ValueError("all sizes must be >= 1")
    pitch_um, diam_um = GEOMETRY[platform]
    rng = np.random.default_rng(seed)
    base = rng.normal(1.5, 0.8, n_genes)
    loadings = rng.normal(0.0, 2.0, (n_genes, n_programs)) * (rng.random((n_genes, n_programs)) < 0.6)
    patient_fx = rng.normal(0.0, 0.15, (n_patients, n_genes))
    genes = [f"GENE{i:03d}" for i in range(n_genes)]
    gene_ids = [f"SYNG{i:08d}" for i in range(n_genes)]
    arr_row, arr_col, ux, uy, _, _ = _grid(n_spots, platform)
    samples = []
    for i in range(n_samples):
        pat = min(i * n_patients // n_samples, n_patients - 1)
        progs = _programs(rng, ux, uy, n_programs)
        lib = rng.lognormal(0.0, 0.25, n_spots)[:, None]
        mu = np.exp(base + progs @ loadings.T + patient_fx[pat]) * lib
        theta = 10.0
        counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.int32)
        obs = pd.DataFrame(
            {"array_row": arr_row.astype(np.int64), "array_col": arr_col.astype(np.int64)},
            index=[f"{c}x{r}" for r, c in zip(arr_row, arr_col)],
        )
        for k in range(n_programs):
            obs[f"program_{k}"] = progs[:, k]
        adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame({"gene_ids": gene_ids}, index=genes))
        adata.obsm["spatial"] = np.column_stack([ux, uy]) * float(img_px_per_spot)
        sid = f"SYN{i + 1}"
        samples.append(
            Sample(
                sample_id=sid,
                adata=adata,
                image=ArrayImage(_draw_image(rng, progs, ux, uy, img_px_per_spot), name=f"{sid}.png"),
                um_per_px=pitch_um / img_px_per_spot,
                spot_diameter_um=diam_um,
                pitch_um=pitch_um,
                patient_id=f"P{pat + 1}",
                dataset="synthetic",
                platform=platform,
                pixel_size_source="metadata",
                meta={"loadings": loadings, "seed": seed},
            )
        )
    return samples


def make_synthetic_dataset(dest: str | Path, **kwargs) -> Path:
    """Write :func:`make_synthetic_samples` (same keyword arguments) in HEST layout; returns ``dest``."""
    from cmrcnet.data.readers.hest import write_hest

    return write_hest(make_synthetic_samples(**kwargs), dest)

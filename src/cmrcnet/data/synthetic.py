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


# -- slide files: the scanner layouts the readers must handle, written for tests and benchmarks --
#: ``layout`` -> how the pixel size is stored: a generic pyramidal TIFF (resolution tags in cm), an
#: Aperio SVS-style TIFF (``MPP =`` in its ImageDescription), an OME-TIFF (PhysicalSizeX, SubIFD
#: pyramid), or a tiled TIFF with no pixel size at all.
SLIDE_LAYOUTS = ("generic", "svs", "ome", "none")


def he_tile(x0: int, y0: int, w: int, h: int, downsample: float, width: int, height: int, seed: int = 0) -> np.ndarray:
    """An (h, w, 3) H&E-like region of a procedural slide: glass around an elliptical section with
    pink stroma and purple nuclei. Coordinates are in the level's pixels (``downsample`` x level-0);
    any level of any size is drawn directly, so slides far larger than memory can be written."""
    ys = (np.arange(y0, y0 + h, dtype=np.float32) + 0.5) * downsample
    xs = (np.arange(x0, x0 + w, dtype=np.float32) + 0.5) * downsample
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    inside = ((xx / width - 0.5) / 0.42) ** 2 + ((yy / height - 0.5) / 0.40) ** 2 < 1.0
    field = 0.5 + 0.5 * np.sin(xx / 900.0 + seed) * np.cos(yy / 700.0 - seed)
    img = np.empty((h, w, 3), np.float32)
    img[:] = (244.0, 242.0, 245.0)
    stroma = np.array([228.0, 130.0, 178.0], np.float32) * 0.8 + 0.2 * np.array([245.0, 220.0, 235.0], np.float32)
    img[inside] = stroma
    ix, iy = (xx // 9).astype(np.int64), (yy // 9).astype(np.int64)
    hsh = (ix * 73856093 ^ iy * 19349663 ^ (seed + 1) * 83492791) % 1000 / 1000.0
    nuclei = inside & (hsh < 0.08 + 0.25 * field)
    img[nuclei] = (92.0, 60.0, 150.0)
    return img.astype(np.uint8)


def write_slide(
    path: str | Path,
    image: np.ndarray | None = None,
    *,
    size: tuple[int, int] | None = None,
    um_per_px: float = 0.5,
    layout: str = "generic",
    tile: int = 256,
    n_levels: int | None = None,
    compression: str = "jpeg",
    seed: int = 0,
) -> Path:
    """Write a tiled pyramidal slide (factor-2 levels down to ~1k px) in one of :data:`SLIDE_LAYOUTS`.

    ``image`` is the level-0 RGB array; without it a procedural H&E slide of ``size`` = (width,
    height) is drawn tile by tile (:func:`he_tile`), so memory stays one tile whatever the size.
    """
    import tifffile

    if layout not in SLIDE_LAYOUTS:
        raise ValueError(f"layout must be one of {SLIDE_LAYOUTS}, got {layout!r}")
    if image is not None:
        image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        size = (image.shape[1], image.shape[0])
    if size is None:
        raise ValueError("give image or size")
    width, height = map(int, size)
    if n_levels is None:
        n_levels = 1 + max(0, int(np.floor(np.log2(max(width, height) / 1024))))

    def level_tiles(ds: int):
        lw, lh = -(-width // ds), -(-height // ds)
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                if image is not None:
                    block = _downsampled_block(image, tx, ty, tile, ds)
                else:
                    block = he_tile(tx, ty, tile, tile, ds, width, height, seed)
                out = np.full((tile, tile, 3), 255, np.uint8)
                out[: block.shape[0], : block.shape[1]] = block[:tile, :tile]
                yield out

    levels = [2**i for i in range(n_levels)]
    shapes = [(-(-height // ds), -(-width // ds), 3) for ds in levels]
    res = 1e4 / um_per_px  # pixels per centimetre
    common = dict(tile=(tile, tile), compression=compression, photometric="rgb")
    with tifffile.TiffWriter(path, bigtiff=True, ome=(layout == "ome")) as tw:
        if layout == "ome":
            meta = {"axes": "YXS", "PhysicalSizeX": um_per_px, "PhysicalSizeXUnit": "µm",
                    "PhysicalSizeY": um_per_px, "PhysicalSizeYUnit": "µm"}
            tw.write(level_tiles(1), shape=shapes[0], dtype=np.uint8, subifds=len(levels) - 1, metadata=meta, **common)
            for ds, shp in zip(levels[1:], shapes[1:]):
                tw.write(level_tiles(ds), shape=shp, dtype=np.uint8, subfiletype=1, metadata=None, **common)
            return Path(path)
        for i, (ds, shp) in enumerate(zip(levels, shapes)):
            kw: dict = dict(common, metadata=None)
            if layout == "svs":
                desc = f"Aperio Image Library v12.0.15\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q=80"
                kw["description"] = desc + (f"|AppMag = 20|MPP = {um_per_px}" if i == 0 else f" -> {shp[1]}x{shp[0]}")
            elif layout == "generic":
                kw.update(resolution=(res / ds, res / ds), resolutionunit="CENTIMETER")
            if i:
                kw["subfiletype"] = 1
            tw.write(level_tiles(ds), shape=shp, dtype=np.uint8, **kw)
    return Path(path)


def _downsampled_block(image: np.ndarray, tx: int, ty: int, tile: int, ds: int) -> np.ndarray:
    """Tile (tx, ty) of ``image`` downsampled ``ds`` x by block averaging."""
    block = image[ty * ds : (ty + tile) * ds, tx * ds : (tx + tile) * ds].astype(np.float32)
    if ds == 1:
        return block.astype(np.uint8)
    h, w = block.shape[0] // ds * ds, block.shape[1] // ds * ds
    block = block[:h, :w].reshape(h // ds, ds, w // ds, ds, 3).mean(axis=(1, 3))
    return (block + 0.5).astype(np.uint8)

"""HEST-1k layout reader and writer (the paper's data source and our interchange format).

::

    st/{id}.h5ad         raw counts; obsm["spatial"] = spot centre (x, y), full-res px
    wsis/{id}.tif        pyramidal TIFF of the whole slide
    metadata/{id}.json   pixel_size_um_estimated, spot_diameter, inter_spot_dist, fullres_width,
                         fullres_height, magnification, patient, st_technology, ...
    patches/{id}.h5      optional: img (N, 224, 224, 3) uint8, barcode (N, 1) bytes, coords (N, 2)

The writer adds ``cmrcnet_*`` keys (platform, pixel size source, dataset) so that a
her2st -> HEST -> read round trip keeps every field of the :class:`Sample` exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cmrcnet.data.image import ArrayImage, SlideImage
from cmrcnet.data.pixelsize import estimate_um_per_px
from cmrcnet.data.readers._common import (
    IMAGE_SUFFIXES,
    build_adata,
    check_in_image,
    counts_to_csr,
    drop_control_probes,
    log,
    require_file,
)
from cmrcnet.data.sample import Sample
from cmrcnet.errors import InputError
from cmrcnet.utils import atomic_path, write_json_atomic

#: HEST ``st_technology`` names <-> cmrcnet platform names.
HEST_TECHNOLOGY = {
    "legacy-st": "Spatial Transcriptomics",
    "visium": "Visium",
    "visium-hd": "Visium HD",
    "xenium": "Xenium",
}
#: (spot diameter um, pitch um) used when metadata lack them.
PLATFORM_GEOMETRY = {"legacy-st": (100.0, 200.0), "visium": (55.0, 100.0), "xenium": (55.0, 100.0)}

#: TIFF tile side; zlib level 1 keeps writing a 10k x 10k slide to about a second, lossless.
TILE = 256
ZLIB_LEVEL = 1
MIN_LEVEL_SIDE = 1024


def _platform(md: dict) -> str:
    if md.get("cmrcnet_platform"):
        return str(md["cmrcnet_platform"])
    tech = str(md.get("st_technology") or "").strip().lower()
    for plat, name in HEST_TECHNOLOGY.items():
        if tech == name.lower():
            return plat
    return tech.replace(" ", "-")


def _magnification(um_per_px: float) -> str:
    """HEST-style magnification bucket for a pixel size (0.25 um/px = 40x)."""
    for limit, mag in ((0.1625, "60x"), (0.325, "40x"), (0.65, "20x"), (1.3, "10x"), (2.6, "5x")):
        if um_per_px < limit:
            return mag
    return "<5x"


# -- layout -------------------------------------------------------------------------------------
def detect_hest(path: Path) -> bool:
    has_side = (path / "metadata").is_dir() or (path / "wsis").is_dir()
    return (path / "st").is_dir() and has_side and any((path / "st").glob("*.h5ad"))


def list_hest(path: Path) -> list[str]:
    """Sample ids: every id with a spot table (``st/{id}.h5ad``), a slide (``wsis/{id}.*``) or
    metadata (``metadata/{id}.json``), so a sample missing one of its files is listed (and fails
    to read, naming the missing file) instead of vanishing."""
    ids = {p.name[: -len(".h5ad")] for p in (path / "st").glob("*.h5ad") if not p.name.startswith(".")}
    ids |= {p.stem for p in (path / "metadata").glob("*.json") if not p.name.startswith(".")}
    ids |= {p.name.split(".")[0] for p in (path / "wsis").glob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")}
    return sorted(ids)


def _wsi_path(path: Path, sample_id: str) -> Path:
    folder = path / "wsis"
    exact = folder / f"{sample_id}.tif"
    if exact.is_file():
        return exact
    for p in sorted(folder.glob(f"{sample_id}.*")) if folder.is_dir() else []:
        if p.suffix.lower() in IMAGE_SUFFIXES:
            return p
    raise InputError(f"whole-slide image for {sample_id} not found (expected wsis/{sample_id}.tif)", exact)


def read_metadata(path: Path, sample_id: str) -> dict:
    md_path = path / "metadata" / f"{sample_id}.json"
    if not md_path.is_file():
        raise InputError(
            "metadata not found: a HEST sample needs metadata/{id}.json (st_technology, spot_diameter, "
            "pixel_size_um_estimated); without it the platform and pixel size are unknown", md_path)
    try:
        md = json.loads(md_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"not valid JSON ({e})", md_path) from None
    if not isinstance(md, dict):
        raise InputError("metadata must be a JSON object", md_path)
    return md


def _positive(md: dict, *keys: str) -> float | None:
    for k in keys:
        v = md.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0:
            return float(v)
    return None


def _decode_names(names) -> list[str]:
    return [n.decode("utf-8") if isinstance(n, (bytes, np.bytes_)) else str(n) for n in names]


# -- reader ---------------------------------------------------------------------------------------
def read_hest(path: Path, sample_id: str) -> Sample:
    """One HEST sample: counts, coordinates, pixel size from metadata (or the grid), lazy WSI."""
    st_path = require_file(path / "st" / f"{sample_id}.h5ad", "spot table (h5ad)")
    md = read_metadata(path, sample_id)
    try:
        src = ad.read_h5ad(st_path)
    except Exception as e:  # noqa: BLE001 - h5py/anndata raise many types
        raise InputError(f"unreadable h5ad ({type(e).__name__}: {e})", st_path) from None
    if src.X is None:
        raise InputError("h5ad has no X (counts)", st_path)
    barcodes = _decode_names(src.obs_names)
    X = counts_to_csr(src.X, st_path, row_names=barcodes)
    coords = _coords(src, st_path)
    image = SlideImage(_wsi_path(path, sample_id))
    size = image.size

    platform = _platform(md)
    d_default, p_default = PLATFORM_GEOMETRY.get(platform, (None, None))
    spot_d = _positive(md, "spot_diameter") or d_default
    pitch = _positive(md, "inter_spot_dist") or p_default
    if spot_d is None:
        warnings.warn(
            f"{sample_id}: metadata/{sample_id}.json gives neither spot_diameter nor a known st_technology "
            f"(got {md.get('st_technology')!r}); assuming Visium's 55 um spots", stacklevel=2)
        spot_d = 55.0
    arr_rc = None
    if "array_row" in src.obs and "array_col" in src.obs:
        arr_rc = src.obs[["array_row", "array_col"]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(arr_rc).all():  # e.g. pseudo-spots without array positions
            arr_rc = None
    um_per_px = _positive(md, "pixel_size_um_estimated", "pixel_size_um_embedded")
    source = str(md.get("cmrcnet_pixel_size_source") or "metadata")
    if um_per_px is None:
        if pitch is None:
            raise InputError(
                "metadata give neither a pixel size nor an inter-spot distance to estimate one",
                path / "metadata" / f"{sample_id}.json",
            )
        um_per_px, source = estimate_um_per_px(coords, pitch, arr_rc), "estimated"
    _check_size(md, size, sample_id)
    check_in_image(coords, barcodes, image, 0.5 * spot_d / um_per_px, st_path)

    var = src.var
    gene_ids = [str(g) for g in var["gene_ids"]] if "gene_ids" in var else None
    extra = src.obs.drop(columns=["array_row", "array_col"]) if arr_rc is not None else src.obs
    adata = build_adata(
        X, barcodes, _decode_names(src.var_names), coords, st_path, gene_ids=gene_ids,
        array_row=None if arr_rc is None else arr_rc[:, 0],
        array_col=None if arr_rc is None else arr_rc[:, 1],
        obs_extra=extra,
    )
    adata = drop_control_probes(adata, sample_id)
    if adata.n_vars == 0:
        raise InputError("sample has 0 genes after dropping control probes", st_path)
    patches = path / "patches" / f"{sample_id}.h5"
    return Sample(
        sample_id=sample_id,
        adata=adata,
        image=image,
        um_per_px=um_per_px,
        spot_diameter_um=spot_d,
        pitch_um=pitch,
        patient_id=str(md.get("patient") or sample_id),
        dataset=str(md.get("cmrcnet_dataset") or md.get("dataset_title") or path.name),
        platform=platform,
        pixel_size_source=source,
        meta={"metadata": md, "st_file": str(st_path), "image_file": str(image.path),
              **({"patches_file": str(patches)} if patches.is_file() else {})},
    )


def _coords(src: ad.AnnData, st_path: Path) -> np.ndarray:
    if "spatial" in src.obsm:
        xy = np.asarray(src.obsm["spatial"], dtype=np.float64)
    elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(src.obs.columns):
        xy = src.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    else:
        raise InputError("h5ad has no obsm['spatial'] spot coordinates", st_path)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(f"obsm['spatial'] must be (N, 2), got {xy.shape}", st_path)
    xy = xy[:, :2]
    if not np.isfinite(xy).all():
        raise InputError("obsm['spatial'] contains NaN or infinite coordinates", st_path)
    return xy


def _check_size(md: dict, size: tuple[int, int], sample_id: str) -> None:
    w, h = md.get("fullres_width") or md.get("fullres_px_width"), md.get("fullres_height") or md.get("fullres_px_height")
    if w and h and (int(w), int(h)) != tuple(size):
        warnings.warn(f"{sample_id}: metadata say {w} x {h} px but the WSI is {size[0]} x {size[1]}", stacklevel=3)


def read_hest_patches(path: str | Path, sample_id: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(img (N, S, S, 3) uint8, barcodes as str, top-left coords (N, 2)) of ``patches/{id}.h5``."""
    import h5py

    p = require_file(Path(path) / "patches" / f"{sample_id}.h5", "patch file")
    try:
        with h5py.File(p, "r") as f:
            img = f["img"][:]
            bc = _decode_names(np.asarray(f["barcode"][:]).reshape(-1))
            coords = f["coords"][:]
    except Exception as e:  # noqa: BLE001
        raise InputError(f"unreadable patch file ({type(e).__name__}: {e})", p) from None
    return img, bc, coords


# -- writer -----------------------------------------------------------------------------------------
def write_hest(
    samples: list[Sample],
    dest: str | Path,
    patches: bool = False,
    patch_size_um: float = 112.0,
    patch_size_px: int = 224,
) -> Path:
    """Write samples in HEST-1k layout under ``dest`` (files written atomically); returns ``dest``.

    The WSI is a tiled, zlib-compressed (lossless) pyramidal TIFF; counts, coordinates,
    array positions, obs annotations and the exact pixel size survive the round trip.
    """
    dest = Path(dest)
    for sub in ("st", "wsis", "metadata"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for s in samples:
        _write_one(s, dest, patches, patch_size_um, patch_size_px)
    return dest


def _write_one(s: Sample, dest: Path, patches: bool, size_um: float, size_px: int) -> None:
    if s.image is None:
        raise InputError(f"sample {s.sample_id!r} has no image; HEST needs a WSI")
    try:
        if patches:
            _write_patches(s, dest / "patches" / f"{s.sample_id}.h5", size_um, size_px)
        _write_wsi(s, dest / "wsis" / f"{s.sample_id}.tif")
    finally:
        s.image.release()
    _write_h5ad(s, dest / "st" / f"{s.sample_id}.h5ad")
    write_json_atomic(dest / "metadata" / f"{s.sample_id}.json", _metadata(s))
    for sub, ext in (("st", "h5ad"), ("wsis", "tif"), ("metadata", "json"), ("patches", "h5")):
        _default_mode(dest / sub / f"{s.sample_id}.{ext}")
    log.info("wrote %s to %s", s.sample_id, dest)


def _default_mode(path: Path) -> None:
    """Give a file written through a private temp file the usual umask permissions (not 0600)."""
    if path.is_file():
        umask = os.umask(0)
        os.umask(umask)
        path.chmod(0o666 & ~umask)


def _write_h5ad(s: Sample, path: Path) -> None:
    a = s.adata
    out = ad.AnnData(
        X=sp.csr_matrix(a.X),
        obs=a.obs.copy(),
        var=a.var.copy(),
        obsm={"spatial": np.asarray(a.obsm["spatial"], dtype=np.float64)},
    )
    with atomic_path(path) as tmp:
        out.write_h5ad(tmp)


def _metadata(s: Sample) -> dict:
    w, h = s.image.size if s.image is not None else (None, None)
    return {
        "id": s.sample_id,
        "patient": s.patient_id,
        "dataset_title": s.dataset,
        "st_technology": HEST_TECHNOLOGY.get(s.platform, s.platform),
        "pixel_size_um_estimated": float(s.um_per_px),
        "spot_diameter": float(s.spot_diameter_um),
        "inter_spot_dist": None if s.pitch_um is None else float(s.pitch_um),
        "fullres_width": w,
        "fullres_height": h,
        "magnification": _magnification(s.um_per_px),
        "spots_under_tissue": s.n_spots,
        "nb_genes": s.n_genes,
        "cmrcnet_platform": s.platform,
        "cmrcnet_pixel_size_source": s.pixel_size_source,
        "cmrcnet_dataset": s.dataset,
    }


def _write_wsi(s: Sample, path: Path) -> None:
    """Pyramidal tiled TIFF (level 0 + 2x reductions in SubIFDs); copies an existing TIFF as is."""
    import tifffile

    img = s.image
    assert img is not None
    if not isinstance(img, ArrayImage) and img.path.suffix.lower() in (".tif", ".tiff") and img.path.is_file():
        with atomic_path(path) as tmp:
            shutil.copyfile(img.path, tmp)
        return
    w, h = img.size
    level0 = img.read_region(0, 0, w, h)
    levels = _pyramid(level0)
    px_per_cm = 1e4 / float(s.um_per_px)
    opts = dict(
        photometric="rgb", compression="zlib", compressionargs={"level": ZLIB_LEVEL},
        resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
    )
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=level0.nbytes > 2**31 - 2**25) as tw:
            tw.write(level0, tile=_tile(level0), subifds=len(levels), **opts)
            for k, lvl in enumerate(levels, start=1):
                lo = dict(opts, resolution=(px_per_cm / 2**k, px_per_cm / 2**k))
                tw.write(lvl, tile=_tile(lvl), subfiletype=1, **lo)


def _tile(arr: np.ndarray) -> tuple[int, int] | None:
    return (TILE, TILE) if min(arr.shape[:2]) >= TILE else None


def _pyramid(level0: np.ndarray) -> list[np.ndarray]:
    """2x-reduced levels until the longer side drops below MIN_LEVEL_SIDE."""
    from PIL import Image

    out: list[np.ndarray] = []
    im = Image.fromarray(level0)
    while max(im.size) >= 2 * MIN_LEVEL_SIDE:
        im = im.reduce(2)
        out.append(np.asarray(im))
    return out


def _write_patches(s: Sample, path: Path, size_um: float, size_px: int) -> None:
    from cmrcnet.data.patches import iter_patches, side_pixels, top_left, write_patch_h5

    side = side_pixels(size_um, s.um_per_px)
    corners, side_int = top_left(s.coords_px, side)
    chunks = list(iter_patches(s.image, s.coords_px, side, size_px))
    imgs = np.concatenate(chunks, axis=0) if chunks else np.zeros((0, size_px, size_px, 3), np.uint8)
    attrs = {
        "sample_id": s.sample_id,
        "patch_size_um": float(size_um),
        "patch_size_px": int(size_px),
        "patch_size_level0": int(side_int),
        "um_per_px": float(s.um_per_px),
        "pixel_size": float(size_um) / int(size_px),
    }
    write_patch_h5(path, imgs, list(s.adata.obs_names), corners, attrs)


def hest_obs_frame(samples: list[Sample]) -> pd.DataFrame:
    """One row per sample in HEST's metadata-table style (handy for manifests and reports)."""
    return pd.DataFrame([_metadata(s) for s in samples]).set_index("id")

"""Spot patches at a fixed physical size, and their on-disk cache.

Every spot gets a square crop of ``size_um`` micrometres centred on its centre, read at
full resolution (side ``size_um / um_per_px`` pixels, rounded to whole pixels) and
resampled to ``size_px`` pixels. Fixing the *physical* size rather than the pixel size
keeps patches comparable across slides scanned at different resolutions. Crops that
run over the slide border are padded with white (:data:`cmrcnet.data.image.PAD_VALUE`),
so no spot is ever dropped.

Crops are read from the slide's pyramid level closest to (never coarser than) the output
resolution (:meth:`~cmrcnet.data.image.SlideImage.read_patch`) and resampled with Pillow's
``resize`` (``Image.BILINEAR``, which widens its support when downscaling: antialiased).

Patches of a sample are cached as one HEST-style HDF5 file per (sample, size_um,
size_px, content key); see :func:`get_patch_store`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cmrcnet.data.image import ArrayImage, SlideImage
from cmrcnet.data.sample import Sample
from cmrcnet.errors import InputError
from cmrcnet.utils import atomic_path

log = logging.getLogger(__name__)

#: Bumped when the extraction procedure changes, so stale caches are not reused.
PATCH_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$CMRCNET_CACHE`` if set, else ``~/.cache/cmrcnet``."""
    env = os.environ.get("CMRCNET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cmrcnet"


# -- geometry ----------------------------------------------------------------------------
def side_pixels(size_um: float, um_per_px: float) -> float:
    """Patch side in full-resolution pixels for a physical side ``size_um``."""
    if not (np.isfinite(size_um) and size_um > 0):
        raise InputError(f"patch size must be a positive number of micrometres, got {size_um!r}")
    if not (np.isfinite(um_per_px) and um_per_px > 0):
        raise InputError(f"pixel size must be a positive number of um/px, got {um_per_px!r}")
    return float(size_um) / float(um_per_px)


def top_left(coords_px: np.ndarray, side_px: float) -> tuple[np.ndarray, int]:
    """Integer top-left corners (N, 2) and integer side of the crops centred on ``coords_px``.

    Rounds half up (``floor(v + 0.5)``) rather than numpy's half-to-even, so a corner
    never depends on the parity of a coordinate.
    """
    coords = _check_coords(coords_px)
    side = max(1, int(np.floor(side_px + 0.5)))
    corners = np.floor(coords - side / 2.0 + 0.5).astype(np.int64)
    return corners, side


def _check_coords(coords_px: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords_px, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise InputError(f"spot coordinates must have shape (N, 2), got {coords.shape}")
    if not np.isfinite(coords).all():
        bad = int((~np.isfinite(coords)).any(axis=1).sum())
        raise InputError(f"{bad} spot coordinate(s) are NaN or infinite")
    return coords


# -- extraction --------------------------------------------------------------------------
def iter_patches(
    image: SlideImage,
    coords_px: np.ndarray,
    side_px: float,
    size_px: int,
    batch: int = 256,
) -> Iterator[np.ndarray]:
    """Yield (b, size_px, size_px, 3) uint8 batches of patches centred on ``coords_px``.

    Streams so whole-slide grids (tens of thousands of pseudo-spots) need only one
    batch of patches in memory at a time. Does not release the image: the caller may
    stream several grids from the same decoded slide.
    """
    if int(size_px) < 1:
        raise InputError(f"patch size in pixels must be >= 1, got {size_px!r}")
    if int(batch) < 1:
        raise InputError(f"batch size must be >= 1, got {batch!r}")
    size_px = int(size_px)
    corners, side = top_left(coords_px, side_px)
    for start in range(0, len(corners), int(batch)):
        chunk = corners[start : start + int(batch)]
        out = np.empty((len(chunk), size_px, size_px, 3), dtype=np.uint8)
        for i, (x0, y0) in enumerate(chunk):
            out[i] = image.read_patch(int(x0), int(y0), side, size_px)
        yield out


def extract_patches(sample: Sample, size_um: float, size_px: int, batch: int = 256) -> np.ndarray:
    """All patches of ``sample`` as (N, size_px, size_px, 3) uint8, in ``obs_names`` order.

    Releases the decoded slide afterwards: once patches exist the full image is not needed.
    """
    from cmrcnet.progress import progress_reporter

    image = _require_image(sample)
    side = side_pixels(size_um, sample.um_per_px)
    coords = _spot_coords(sample)
    out = np.empty((len(coords), int(size_px), int(size_px), 3), dtype=np.uint8)
    pos = 0
    try:
        with progress_reporter(f"cutting patches of {sample.sample_id}", len(coords), "patches") as advance:
            for chunk in iter_patches(image, coords, side, size_px, batch):
                out[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
                advance(len(chunk))
    finally:
        image.release()
    return out


def _spot_coords(sample: Sample) -> np.ndarray:
    if "spatial" not in sample.adata.obsm:
        raise InputError(f"sample {sample.sample_id!r} has no spot coordinates (obsm['spatial'])")
    return _check_coords(sample.coords_px)


def _require_image(sample: Sample) -> SlideImage:
    if sample.image is None:
        raise InputError(f"sample {sample.sample_id!r} has no H&E image, cannot extract patches")
    return sample.image


# -- HDF5 store --------------------------------------------------------------------------
@dataclass
class PatchStore:
    """A sample's patches, fully loaded in RAM (fast training loader, no per-item I/O)."""

    path: Path
    imgs: np.ndarray
    """(N, S, S, 3) uint8."""
    barcodes: np.ndarray
    """(N,) str, spot barcodes in ``obs_names`` order."""
    coords: np.ndarray
    """(N, 2) int, top-left corner of each crop in full-resolution pixels (HEST convention)."""
    attrs: dict[str, Any] = field(default_factory=dict)
    """size_um, size_px, um_per_px, sample_id, key, ... as stored in the file."""

    def __len__(self) -> int:
        return int(len(self.imgs))


def write_patch_h5(
    path: str | Path,
    imgs: np.ndarray,
    barcodes: np.ndarray | list[str],
    coords: np.ndarray,
    attrs: dict[str, Any],
) -> None:
    """Write patches atomically in HEST layout: ``img``, ``barcode`` (N, 1) bytes, ``coords``.

    Uncompressed: H&E crops compress poorly and the file is read whole at every run.
    ``attrs`` go on the file root and, as HEST does, on the ``coords`` dataset.
    """
    import h5py

    imgs = np.asarray(imgs)
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[-1] != 3:
        raise InputError(f"patches must be uint8 (N, S, S, 3), got {imgs.dtype} {imgs.shape}")
    n = len(imgs)
    bc = np.asarray([str(b).encode("utf-8") for b in barcodes], dtype=bytes)
    xy = np.asarray(coords, dtype=np.int64)
    if len(bc) != n or xy.shape != (n, 2):
        raise InputError(f"{n} patches but {len(bc)} barcodes and coords of shape {xy.shape}")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            chunks = (1, *imgs.shape[1:]) if n else None
            f.create_dataset("img", data=imgs, chunks=chunks)
            f.create_dataset("barcode", data=bc.reshape(n, 1))
            dset = f.create_dataset("coords", data=xy.reshape(n, 2))
            for k, v in attrs.items():
                f.attrs[k] = _h5_attr(v)
                dset.attrs[k] = _h5_attr(v)


def _h5_attr(v: Any) -> Any:
    return "" if v is None else v


def read_patch_h5(path: str | Path) -> PatchStore:
    """Load a patch file written by :func:`write_patch_h5` (or by HEST) fully into RAM."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise InputError("patch file not found", path)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("img", "barcode", "coords") if k not in f]
            if missing:
                raise InputError(f"not a patch file: missing dataset(s) {', '.join(missing)}", path)
            imgs = np.asarray(f["img"][:])
            raw = np.asarray(f["barcode"][:]).reshape(-1)
            coords = np.asarray(f["coords"][:]).astype(np.int64).reshape(-1, 2)
            attrs = {**dict(f["coords"].attrs), **dict(f.attrs)}
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py raises OSError/KeyError/... on corrupt files
        raise InputError(f"unreadable patch file ({type(e).__name__}: {e})", path) from None
    barcodes = np.asarray([b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in raw], dtype=str)
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or len(imgs) != len(barcodes) or len(coords) != len(imgs):
        raise InputError(
            f"inconsistent patch file: img {imgs.dtype} {imgs.shape}, {len(barcodes)} barcodes, "
            f"{len(coords)} coords",
            path,
        )
    return PatchStore(path=path, imgs=imgs, barcodes=barcodes, coords=coords, attrs=_plain_attrs(attrs))


def _plain_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """h5py returns numpy scalars/bytes; convert to plain python values."""
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


# -- cache -------------------------------------------------------------------------------
def _image_fingerprint(image: SlideImage) -> bytes:
    """Identity of the pixels: file path + size + mtime, or a hash of an in-memory array."""
    if isinstance(image, ArrayImage):
        arr = image._full_array()
        h = hashlib.sha1(b"array")
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
        return h.digest()
    st = image.path.stat()
    return f"{image.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()


def cache_key(sample: Sample, size_um: float, size_px: int) -> str:
    """Short sha1 of everything the patches depend on (pixels, coords, barcodes, sizes)."""
    image = _require_image(sample)
    h = hashlib.sha1()
    h.update(f"v{PATCH_FORMAT_VERSION}".encode())
    h.update(_image_fingerprint(image))
    h.update(np.ascontiguousarray(_spot_coords(sample), dtype=np.float64).tobytes())
    h.update("\0".join(map(str, sample.adata.obs_names)).encode("utf-8"))
    h.update(f"|{float(size_um)!r}|{int(size_px)}|{float(sample.um_per_px)!r}".encode())
    level = image.best_level(side_pixels(size_um, sample.um_per_px) / int(size_px))
    if level:  # read from a pyramid level: other pixels than a level-0 read (keys of level 0 unchanged)
        h.update(f"|level{level}|{image.level_downsamples[level]:.6f}".encode())
    return h.hexdigest()[:12]


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def cache_path(sample: Sample, size_um: float, size_px: int, cache_dir: str | Path | None = None) -> Path:
    """``<cache_dir>/patches/<sample_id>_<size_um>um_<size_px>px_<key>.h5`` (id made filename-safe)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    sid = _UNSAFE.sub("_", str(sample.sample_id)) or "sample"
    key = cache_key(sample, size_um, size_px)
    return root / "patches" / f"{sid}_{float(size_um):g}um_{int(size_px)}px_{key}.h5"


def get_patch_store(
    sample: Sample,
    size_um: float,
    size_px: int,
    cache_dir: str | Path | None = None,
) -> PatchStore:
    """The sample's patches, read from the cache or extracted once and cached.

    The file name carries a content key, so changing the image, coordinates, barcodes or
    sizes gives a new file instead of silently reusing stale patches. A cache file that
    cannot be read, or does not match the sample, is re-extracted (with a warning).
    """
    path = cache_path(sample, size_um, size_px, cache_dir)
    key = path.stem.rsplit("_", 1)[-1]
    barcodes = np.asarray(sample.adata.obs_names, dtype=str)
    if path.is_file():
        store = _try_read_cache(path, key, barcodes)
        if store is not None:
            log.debug("patch cache hit %s", path)
            return store
    log.info("extracting %d patches of %s (%g um -> %d px)", len(barcodes), sample.sample_id, size_um, size_px)
    imgs = extract_patches(sample, size_um, size_px)
    corners, side = top_left(sample.coords_px, side_pixels(size_um, sample.um_per_px))
    attrs = {
        "sample_id": str(sample.sample_id),
        "size_um": float(size_um),
        "size_px": int(size_px),
        "um_per_px": float(sample.um_per_px),
        "side_px_fullres": int(side),
        "patch_size_src": int(side),  # HEST names
        "patch_size_target": int(size_px),
        "key": key,
        "format_version": PATCH_FORMAT_VERSION,
        "image": str(sample.image.path) if sample.image is not None else "",
    }
    write_patch_h5(path, imgs, barcodes, corners, attrs)
    return PatchStore(path=path, imgs=imgs, barcodes=barcodes, coords=corners, attrs=attrs)


def _try_read_cache(path: Path, key: str, barcodes: np.ndarray) -> PatchStore | None:
    try:
        store = read_patch_h5(path)
    except InputError as e:
        warnings.warn(f"ignoring unreadable patch cache, re-extracting: {e}", stacklevel=3)
        return None
    if store.attrs.get("key") != key or not np.array_equal(store.barcodes, barcodes):
        warnings.warn(f"patch cache {path} does not match the sample, re-extracting", stacklevel=3)
        return None
    return store

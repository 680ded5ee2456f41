"""Lazy access to H&E images: region reads, padding outside the slide, thumbnails.

TIFF slides (incl. pyramidal HEST ``wsis/*.tif``) are read region by region through
tifffile's zarr store when available; other formats (JPEG/PNG) are decoded once on
first access and kept in memory for the sample's lifetime.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cmrcnet.errors import InputError

# tifffile logs its own complaints about malformed files (truncated strips, bad tags) at
# WARNING; the reader turns them into one InputError naming the file instead.
logging.getLogger("tifffile").setLevel(logging.ERROR)

#: Fill value for pixels outside the slide (white, like glass background).
PAD_VALUE = 255


class SlideImage:
    """An RGB image on disk, read lazily. ``size`` is (width, height) at full resolution."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError("image file not found", self.path)
        self._array: np.ndarray | None = None
        self._size: tuple[int, int] | None = None

    # -- metadata --------------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        if self._size is None:
            self._size = self._read_size()
        return self._size

    def _is_tiff(self) -> bool:
        return self.path.suffix.lower() in {".tif", ".tiff", ".btf", ".svs"}

    def _read_size(self) -> tuple[int, int]:
        try:
            if self._is_tiff():
                import tifffile

                with tifffile.TiffFile(self.path) as tf:
                    page = tf.series[0].levels[0] if tf.series else tf.pages[0]
                    shape = page.shape
                    axes = getattr(page, "axes", "YXS")
                    h = shape[axes.index("Y")]
                    w = shape[axes.index("X")]
                    _check_tiff_complete(tf, self.path)
                    return int(w), int(h)
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = None
            with Image.open(self.path) as im:
                return im.size
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001
            raise InputError(f"unreadable image ({type(e).__name__}: {e})", self.path) from None

    # -- pixels ----------------------------------------------------------------------------
    def _full_array(self) -> np.ndarray:
        if self._array is None:
            try:
                if self._is_tiff():
                    import tifffile

                    arr = tifffile.imread(self.path, level=0)
                else:
                    from PIL import Image

                    Image.MAX_IMAGE_PIXELS = None
                    with Image.open(self.path) as im:
                        im.load()
                        arr = np.asarray(im.convert("RGB"))
            except Exception as e:  # noqa: BLE001
                raise InputError(f"unreadable image ({type(e).__name__}: {e})", self.path) from None
            arr = _to_rgb_uint8(arr, self.path)
            self._array = arr
            self._size = (arr.shape[1], arr.shape[0])
        return self._array

    def read_region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Return the (h, w, 3) uint8 region with top-left (x0, y0); outside pixels are padded."""
        width, height = self.size
        out = np.full((h, w, 3), PAD_VALUE, dtype=np.uint8)
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + w, width), min(y0 + h, height)
        if xa >= xb or ya >= yb:
            return out
        src = self._read_window(xa, ya, xb - xa, yb - ya)
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = src
        return out

    def _read_window(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Read an in-bounds window; TIFFs via zarr when possible, else from the decoded array."""
        if self._is_tiff() and self._array is None:
            store = self._zarr_level0()
            if store is not None:
                try:
                    region = np.asarray(store[y0 : y0 + h, x0 : x0 + w])
                except Exception as e:  # noqa: BLE001 - imagecodecs/zarr raise their own types
                    raise InputError(
                        f"cannot decode the image region at x={x0}, y={y0} ({type(e).__name__}: {e}); "
                        "the file is damaged or truncated", self.path) from None
                return _to_rgb_uint8(region, self.path)
        return self._full_array()[y0 : y0 + h, x0 : x0 + w]

    def _zarr_level0(self):  # pragma: no cover - depends on zarr being installed
        if not hasattr(self, "_zarr"):
            self._zarr = None
            try:
                import tifffile
                import zarr

                store = tifffile.imread(self.path, aszarr=True, level=0)
                z = zarr.open(store, mode="r")
                self._zarr = z if hasattr(z, "shape") else z[0]
            except Exception:  # noqa: BLE001 - fall back to a full decode
                self._zarr = None
        return self._zarr

    def thumbnail(self, max_side: int = 2000) -> tuple[np.ndarray, float]:
        """Downsampled RGB image and its scale factor (thumbnail px per full-res px)."""
        from PIL import Image

        width, height = self.size
        scale = min(1.0, max_side / max(width, height))
        arr = self._pyramid_level_at_least(max_side) if self._array is None else None
        if arr is None:
            arr = self._full_array()
        if scale >= 1.0:
            return arr.copy(), 1.0
        out_wh = (max(1, round(width * scale)), max(1, round(height * scale)))
        return np.asarray(Image.fromarray(arr).resize(out_wh, Image.BILINEAR)), scale

    def _pyramid_level_at_least(self, max_side: int) -> np.ndarray | None:
        """Smallest pyramid level of a TIFF whose long side is still >= ``max_side``.

        Whole-slide TIFFs (HEST ``wsis/``) can be 100k px wide: decoding level 0 for a
        thumbnail would need tens of GB, a stored sub-resolution is nearly free.
        """
        if not self._is_tiff():
            return None
        try:
            import tifffile

            with tifffile.TiffFile(self.path) as tf:
                levels = tf.series[0].levels if tf.series else []
                best = None
                for lvl in levels[1:]:
                    axes = lvl.axes
                    side = max(lvl.shape[axes.index("Y")], lvl.shape[axes.index("X")])
                    if side >= max_side:
                        best = lvl
                if best is None:
                    return None
                return _to_rgb_uint8(best.asarray(), self.path)
        except Exception:  # noqa: BLE001 - fall back to level 0
            return None

    def release(self) -> None:
        """Drop the decoded pixels (they are re-read on demand)."""
        self._array = None


class ArrayImage(SlideImage):
    """An in-memory image (synthetic data, tests)."""

    def __init__(self, array: np.ndarray, name: str = "<array>") -> None:
        self.path = Path(name)
        self._array = _to_rgb_uint8(array, self.path)
        self._size = (self._array.shape[1], self._array.shape[0])

    def _full_array(self) -> np.ndarray:
        assert self._array is not None
        return self._array

    def _read_window(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        return self._full_array()[y0 : y0 + h, x0 : x0 + w]

    def release(self) -> None:  # keep: nothing to re-read
        pass


def _check_tiff_complete(tf, path: Path) -> None:
    """Raise if the pixel data of any page reach past the end of the file (a truncated copy or
    download): found from the offsets in the header, without decoding anything."""
    size = path.stat().st_size
    pages = list(tf.pages)
    for series in tf.series[:1]:
        for level in series.levels:
            pages += [p for p in getattr(level, "pages", []) if p is not None]
    for page in pages:
        offsets = getattr(page, "dataoffsets", ()) or ()
        counts = getattr(page, "databytecounts", ()) or ()
        ends = [int(o) + int(c) for o, c in zip(offsets, counts) if c]
        if ends and max(ends) > size:
            raise InputError(
                f"truncated TIFF: the image data need {max(ends):,} bytes but the file has {size:,}; "
                "copy or download it again", path)


def _to_rgb_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"expected an RGB image, got array of shape {arr.shape}", path)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.max() <= 1.0:
            arr = (arr * 255).round()
        elif arr.dtype == np.uint16:
            arr = arr / 257.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)

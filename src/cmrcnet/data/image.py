"""Lazy access to H&E images: scanner slides, pyramid levels, pixel size, thumbnails.

One facade, :class:`SlideImage`, over three readers, tried in this order:

- **OpenSlide** (the ``openslide-bin`` wheel: no system package) for every format it detects:
  Aperio SVS, Hamamatsu NDPI/VMS, MIRAX MRXS, Leica SCN, Ventana BIF, Philips TIFF and generic
  tiled pyramidal TIFF;
- **tifffile** for the TIFFs OpenSlide does not open or does not read fully (OME-TIFF with
  SubIFD pyramids, stripped or untiled TIFF, BigTIFF from HEST), region by region through its
  zarr store;
- **Pillow** for JPEG/PNG (decoded once on first access, kept until :meth:`SlideImage.release`).

Patches are read from the pyramid level closest to (never coarser than) the resolution the run
needs (:meth:`SlideImage.read_patch`), so memory and decode time stay bounded whatever the slide
size; thumbnails come from the smallest level that is still large enough, read in strips.

The pixel size is read from the file's metadata (:meth:`SlideImage.pixel_size`): OpenSlide's
``openslide.mpp-x/y``, Aperio's ``MPP =``, OME ``PhysicalSizeX/Y`` with their unit, TIFF
``XResolution`` with ``ResolutionUnit`` (inch or cm), ImageJ's micron calibration, PNG/JPEG
density. A value outside :data:`PLAUSIBLE_UM_PER_PX` (e.g. the 72 dpi that image software writes
by default) is not a microscope's pixel size and is ignored, with a note saying so.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmrcnet.errors import InputError

# tifffile logs its own complaints about malformed files (truncated strips, bad tags) at
# WARNING; the reader turns them into one InputError naming the file instead.
logging.getLogger("tifffile").setLevel(logging.ERROR)
log = logging.getLogger(__name__)

#: Fill value for pixels outside the slide (white, like glass background).
PAD_VALUE = 255
#: Suffixes read as TIFF by tifffile when OpenSlide does not take the file.
TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".svs", ".tf8", ".tf2", ".ndpi", ".scn", ".bif"}
#: Micrometres per pixel a microscope image can have; metadata outside this is ignored.
PLAUSIBLE_UM_PER_PX = (0.05, 50.0)
#: A pyramid level whose downsample exceeds the wanted one by at most this factor still counts
#: as "not coarser" (OpenSlide reports 4.0003 for a 4x level of an odd-sized slide).
LEVEL_TOLERANCE = 1.01
#: Largest level (in pixels) a thumbnail reads in one piece; larger ones are read in strips.
THUMB_READ_PIXELS = 32_000_000

_UNIT_TO_UM = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "μm": 1.0, "micron": 1.0, "microns": 1.0,
               "micrometer": 1.0, "nm": 1e-3, "centimeter": 1e4, "inch": 25400.0, "in": 25400.0}


@dataclass(frozen=True)
class PixelSize:
    """A slide's pixel size and where it was read (e.g. ``openslide.mpp-x``, ``OME PhysicalSizeX``)."""

    um_per_px: float
    source: str


def _plausible(um: float) -> bool:
    return bool(np.isfinite(um)) and PLAUSIBLE_UM_PER_PX[0] <= um <= PLAUSIBLE_UM_PER_PX[1]


def _to_float(value: Any) -> float | None:
    try:
        if isinstance(value, tuple) and len(value) == 2:  # TIFF RATIONAL
            return float(value[0]) / float(value[1]) if value[1] else None
        return float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def _from_resolution(xres: Any, yres: Any, unit: Any, source: str) -> tuple[float, float, str] | None:
    """um/px from TIFF-style resolution (pixels per unit) and a unit name or TIFF code (2 inch, 3 cm)."""
    unit = {2: "inch", 3: "cm"}.get(unit, unit) if not isinstance(unit, str) else unit.lower()
    if hasattr(unit, "name"):  # tifffile's RESUNIT enum
        unit = {"INCH": "inch", "CENTIMETER": "cm", "MILLIMETER": "mm", "MICROMETER": "um"}.get(unit.name)
    per_unit = _UNIT_TO_UM.get(unit) if isinstance(unit, str) else None
    fx, fy = _to_float(xres), _to_float(yres)
    if per_unit is None or not fx or fx <= 0:
        return None
    fy = fy if fy and fy > 0 else fx
    return per_unit / fx, per_unit / fy, source


# -- readers ------------------------------------------------------------------------------
class _Reader:
    """One file format: level sizes, region reads at a level, metadata for the pixel size."""

    name = "reader"
    level_dims: list[tuple[int, int]]  # (width, height) per level
    downsamples: list[float]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 of an in-bounds region, in level coordinates."""
        raise NotImplementedError

    def resolutions(self) -> list[tuple[float, float, str]]:
        """Candidate (um/px x, um/px y, source) from the metadata, most trusted first."""
        return []

    def release(self) -> None:
        pass


class _OpenSlideReader(_Reader):
    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self.path = path
        self.slide = openslide.OpenSlide(str(path))
        self.level_dims = [tuple(map(int, d)) for d in self.slide.level_dimensions]
        self.downsamples = [float(d) for d in self.slide.level_downsamples]
        self.vendor = self.slide.properties.get("openslide.vendor", "")

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.downsamples[level]
        im = self.slide.read_region((int(round(x * ds)), int(round(y * ds))), level, (int(w), int(h)))
        rgba = np.asarray(im)
        alpha = rgba[..., 3]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        a = alpha[..., None].astype(np.float32) / 255.0  # transparent = outside the scanned area: white
        return (rgba[..., :3] * a + PAD_VALUE * (1.0 - a) + 0.5).astype(np.uint8)

    def resolutions(self) -> list[tuple[float, float, str]]:
        p = self.slide.properties
        out = []
        mx, my = _to_float(p.get("openslide.mpp-x")), _to_float(p.get("openslide.mpp-y"))
        if mx:
            out.append((mx, my or mx, f"openslide.mpp-x ({self.vendor})" if self.vendor else "openslide.mpp-x"))
        if _to_float(p.get("aperio.MPP")):
            out.append((float(p["aperio.MPP"]), float(p["aperio.MPP"]), "Aperio MPP"))
        res = _from_resolution(p.get("tiff.XResolution"), p.get("tiff.YResolution"), p.get("tiff.ResolutionUnit"),
                               "TIFF XResolution")
        if res:
            out.append(res)
        return out

    def release(self) -> None:
        self.slide.close()


class _TiffReader(_Reader):
    name = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile

        self.path = path
        with tifffile.TiffFile(path) as tf:
            _check_tiff_complete(tf, path)
            levels = list(tf.series[0].levels) if tf.series else [tf.pages[0]]
            self.level_dims = []
            for lvl in levels:
                axes = getattr(lvl, "axes", "YXS")
                self.level_dims.append((int(lvl.shape[axes.index("X")]), int(lvl.shape[axes.index("Y")])))
            self._meta = self._metadata(tf)
        w0 = self.level_dims[0][0]
        self.downsamples = [w0 / w for w, _ in self.level_dims]
        self._stores: dict[int, Any] = {}
        self._arrays: dict[int, np.ndarray] = {}

    @staticmethod
    def _metadata(tf) -> list[tuple[float, float, str]]:
        out: list[tuple[float, float, str]] = []
        if tf.is_ome and tf.ome_metadata:
            m = re.search(r"<Pixels\b[^>]*>", tf.ome_metadata)
            if m:
                attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(0)))
                sx, sy = _to_float(attrs.get("PhysicalSizeX")), _to_float(attrs.get("PhysicalSizeY"))
                unit = _UNIT_TO_UM.get(attrs.get("PhysicalSizeXUnit", "µm"))
                if sx and unit:
                    out.append((sx * unit, (sy or sx) * unit, "OME PhysicalSizeX"))
        page = tf.pages[0]
        m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", page.description or "")
        if m and _to_float(m.group(1)):
            out.append((float(m.group(1)), float(m.group(1)), "Aperio MPP"))
        tags = page.tags
        xres, yres, unit = (tags.get(n) for n in ("XResolution", "YResolution", "ResolutionUnit"))
        if tf.is_imagej and xres is not None and str((tf.imagej_metadata or {}).get("unit", "")).lower() in _UNIT_TO_UM:
            res = _from_resolution(xres.value, yres.value if yres else None, str(tf.imagej_metadata["unit"]).lower(),
                                   "ImageJ calibration")
            if res:
                out.append(res)
        elif xres is not None and unit is not None:
            res = _from_resolution(xres.value, yres.value if yres else None, unit.value, "TIFF XResolution")
            if res:
                out.append(res)
        return out

    def resolutions(self) -> list[tuple[float, float, str]]:
        return list(self._meta)

    def _store(self, level: int):
        if level not in self._stores:
            self._stores[level] = None
            try:
                import tifffile
                import zarr

                z = zarr.open(tifffile.imread(self.path, aszarr=True, level=level), mode="r")
                self._stores[level] = z if hasattr(z, "shape") else z[0]
            except Exception:  # noqa: BLE001 - fall back to a full decode of that level
                self._stores[level] = None
        return self._stores[level]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if level not in self._arrays:
            store = self._store(level)
            if store is not None:
                try:
                    region = np.asarray(store[y : y + h, x : x + w])
                except Exception as e:  # noqa: BLE001 - imagecodecs/zarr raise their own types
                    raise InputError(f"cannot decode the image region at x={x}, y={y} (level {level}; "
                                     f"{type(e).__name__}: {e}); the file is damaged or truncated", self.path) from None
                return _to_rgb_uint8(region, self.path)
            import tifffile

            try:
                self._arrays[level] = _to_rgb_uint8(tifffile.imread(self.path, level=level), self.path)
            except InputError:
                raise
            except Exception as e:  # noqa: BLE001
                raise InputError(f"unreadable image ({type(e).__name__}: {e})", self.path) from None
        return self._arrays[level][y : y + h, x : x + w]

    def release(self) -> None:
        self._arrays.clear()
        self._stores.clear()


class _PillowReader(_Reader):
    name = "pillow"

    def __init__(self, path: Path) -> None:
        from PIL import Image

        self.path = path
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(path) as im:
                self.level_dims = [tuple(map(int, im.size))]
                self._info = dict(im.info)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"unreadable image ({type(e).__name__}: {e})", path) from None
        self.downsamples = [1.0]
        self._array: np.ndarray | None = None

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._array is None:
            from PIL import Image

            try:
                with Image.open(self.path) as im:
                    im.load()
                    arr = np.asarray(im.convert("RGB"))
            except Exception as e:  # noqa: BLE001
                raise InputError(f"unreadable image ({type(e).__name__}: {e})", self.path) from None
            self._array = _to_rgb_uint8(arr, self.path)
        return self._array[y : y + h, x : x + w]

    def resolutions(self) -> list[tuple[float, float, str]]:
        dpi = self._info.get("dpi")
        if isinstance(dpi, tuple) and len(dpi) == 2:
            res = _from_resolution(dpi[0], dpi[1], "inch", "image density (dpi)")
            return [res] if res else []
        return []

    def release(self) -> None:
        self._array = None


class _ArrayReader(_Reader):
    name = "array"

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.level_dims = [(array.shape[1], array.shape[0])]
        self.downsamples = [1.0]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self.array[y : y + h, x : x + w]


def _openslide_format(path: Path) -> str | None:
    """OpenSlide's vendor for ``path``, or None when it does not take the file (or is not installed)."""
    try:
        import openslide
    except (ImportError, OSError):  # no wheel for this platform: tifffile and Pillow still read
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - unreadable for OpenSlide: the next reader decides
        return None


def _is_ome_or_imagej(path: Path) -> bool:
    """OME-TIFF (SubIFD pyramids OpenSlide does not read) or ImageJ TIFF: tifffile reads these."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return bool(tf.is_ome or tf.is_imagej)
    except Exception:  # noqa: BLE001
        return False


def open_reader(path: Path) -> _Reader:
    """The reader for ``path``: OpenSlide where it detects the format, else tifffile, else Pillow."""
    is_tiff = path.suffix.lower() in TIFF_SUFFIXES
    if is_tiff:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tf:
                _check_tiff_complete(tf, path)
        except InputError:
            raise
        except Exception:  # noqa: BLE001 - not a TIFF tifffile can parse; OpenSlide may still
            pass
    vendor = _openslide_format(path) if path.suffix.lower() not in {".png", ".jpg", ".jpeg"} else None
    errors = []
    if vendor and not (vendor == "generic-tiff" and _is_ome_or_imagej(path)):
        try:
            return _OpenSlideReader(path)
        except Exception as e:  # noqa: BLE001
            errors.append(f"OpenSlide: {type(e).__name__}: {e}")
    if is_tiff or vendor:
        try:
            return _TiffReader(path)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001
            errors.append(f"tifffile: {type(e).__name__}: {e}")
    try:
        return _PillowReader(path)
    except InputError as e:
        if errors:
            raise InputError("unreadable image (" + "; ".join(errors) + f"; {e.message})", path) from None
        raise


class SlideImage:
    """An RGB image on disk, read lazily. ``size`` is (width, height) at full resolution (level 0)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError("image file not found", self.path)
        if self.path.is_dir():
            raise InputError("is a folder, not an image file", self.path)
        self._reader_obj: _Reader | None = None

    # -- metadata --------------------------------------------------------------------------
    @property
    def _reader(self) -> _Reader:
        if self._reader_obj is None:
            self._reader_obj = open_reader(self.path)
        return self._reader_obj

    @property
    def size(self) -> tuple[int, int]:
        return self._reader.level_dims[0]

    @property
    def reader(self) -> str:
        """Which library reads the file (``openslide``, ``tifffile``, ``pillow``, ``array``)."""
        return self._reader.name

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return list(self._reader.level_dims)

    @property
    def level_downsamples(self) -> list[float]:
        return list(self._reader.downsamples)

    def pixel_size(self) -> PixelSize | None:
        """The pixel size stored in the file, or None. Implausible values are skipped with a warning;
        anisotropic pixels (x and y differ by > 1 %) are averaged, with a warning."""
        if "_pixel_size" not in self.__dict__:
            self._pixel_size = self._read_pixel_size()
        return self._pixel_size

    def _read_pixel_size(self) -> PixelSize | None:
        for ux, uy, source in self._reader.resolutions():
            if not (_plausible(ux) and _plausible(uy)):
                warnings.warn(f"{self.path}: {source} gives {ux:.4g} um/px, not a microscope's pixel size "
                              f"(expected {PLAUSIBLE_UM_PER_PX[0]}-{PLAUSIBLE_UM_PER_PX[1]}); ignored", stacklevel=2)
                continue
            if abs(ux - uy) > 0.01 * max(ux, uy):
                warnings.warn(f"{self.path}: pixels are not square ({ux:.4g} x {uy:.4g} um); using their mean",
                              stacklevel=2)
            return PixelSize(float((ux + uy) / 2), source)
        return None

    def best_level(self, downsample: float) -> int:
        """The coarsest level not coarser than ``downsample`` (level-0 px per output px)."""
        best = 0
        for i, ds in enumerate(self._reader.downsamples):
            if ds <= downsample * LEVEL_TOLERANCE and ds > self._reader.downsamples[best]:
                best = i
        return best

    # -- pixels ----------------------------------------------------------------------------
    def read_region(self, x0: int, y0: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """The (h, w, 3) uint8 region with top-left (x0, y0), both in ``level``'s pixels;
        pixels outside the slide are padded with :data:`PAD_VALUE`."""
        width, height = self._reader.level_dims[level]
        out = np.full((h, w, 3), PAD_VALUE, dtype=np.uint8)
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + w, width), min(y0 + h, height)
        if xa >= xb or ya >= yb:
            return out
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = self._reader.read(level, xa, ya, xb - xa, yb - ya)
        return out

    def read_patch(self, x0: int, y0: int, side: int, size_px: int) -> np.ndarray:
        """A ``side`` x ``side`` level-0 square at (x0, y0) as (size_px, size_px, 3), read from the
        coarsest level that is still at least as fine as the output (bounded reads on large slides)."""
        level = self.best_level(side / size_px)
        if level == 0:
            return resample(self.read_region(x0, y0, side, side), size_px)
        ds = self._reader.downsamples[level]
        lx, ly = int(np.floor(x0 / ds + 0.5)), int(np.floor(y0 / ds + 0.5))
        lside = max(1, int(np.floor(side / ds + 0.5)))
        return resample(self.read_region(lx, ly, lside, lside, level=level), size_px)

    def read_level(self, level: int, max_pixels: int = THUMB_READ_PIXELS, out_wh: tuple[int, int] | None = None) -> np.ndarray:
        """A whole level, resized to ``out_wh`` if given; levels over ``max_pixels`` are read and
        resized in horizontal strips so memory stays bounded."""
        from PIL import Image

        w, h = self._reader.level_dims[level]
        ow, oh = out_wh or (w, h)
        if w * h <= max_pixels:
            arr = self.read_region(0, 0, w, h, level=level)
            return arr if (ow, oh) == (w, h) else np.asarray(Image.fromarray(arr).resize((ow, oh), Image.BILINEAR))
        rows = max(1, max_pixels // w)
        out = np.empty((oh, ow, 3), np.uint8)
        y_out = 0
        for y in range(0, h, rows):
            hh = min(rows, h - y)
            y_end = oh if y + hh >= h else int(round((y + hh) * oh / h))
            n_out = max(0, y_end - y_out)
            if n_out:
                strip = self.read_region(0, y, w, hh, level=level)
                out[y_out:y_end] = np.asarray(Image.fromarray(strip).resize((ow, n_out), Image.BILINEAR))
            y_out = y_end
        return out

    def thumbnail(self, max_side: int = 2000) -> tuple[np.ndarray, float]:
        """Downsampled RGB image and its scale factor (thumbnail px per full-res px), read from the
        smallest pyramid level whose long side is still >= ``max_side``."""
        width, height = self.size
        scale = min(1.0, max_side / max(width, height))
        out_wh = (max(1, round(width * scale)), max(1, round(height * scale)))
        level = 0
        for i, (w, h) in enumerate(self._reader.level_dims):
            if max(w, h) >= max_side and w * h < np.prod(self._reader.level_dims[level]):
                level = i
        return self.read_level(level, out_wh=out_wh).copy(), scale

    def release(self) -> None:
        """Drop decoded pixels and open handles (they are re-read on demand)."""
        if self._reader_obj is not None:
            self._reader_obj.release()
            self._reader_obj = None

    def describe(self) -> dict[str, Any]:
        """What a prediction records about its slide: reader, levels, pixel size and its source."""
        ps = self.pixel_size()
        return {"path": str(self.path), "reader": self.reader, "size": list(self.size),
                "level_downsamples": [round(d, 4) for d in self.level_downsamples],
                "um_per_px_metadata": ps.um_per_px if ps else None, "pixel_size_source": ps.source if ps else None}


class ArrayImage(SlideImage):
    """An in-memory image (synthetic data, tests)."""

    def __init__(self, array: np.ndarray, name: str = "<array>") -> None:
        self.path = Path(name)
        self._array = _to_rgb_uint8(array, self.path)
        self._reader_obj = _ArrayReader(self._array)

    @property
    def _reader(self) -> _Reader:
        return self._reader_obj

    def _full_array(self) -> np.ndarray:
        return self._array

    def release(self) -> None:  # keep: nothing to re-read
        pass


def resample(region: np.ndarray, size_px: int) -> np.ndarray:
    """Resize an (h, w, 3) uint8 crop to (size_px, size_px, 3), antialiased (Pillow BILINEAR
    widens its support when downscaling, so this is area-aware, not a point sample)."""
    if region.shape[0] == size_px and region.shape[1] == size_px:
        return region
    from PIL import Image

    return np.asarray(Image.fromarray(region).resize((size_px, size_px), Image.BILINEAR), dtype=np.uint8)


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
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):  # planar (C, Y, X)
        arr = np.moveaxis(arr, 0, -1)
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


def read_slide(path: str | Path) -> SlideImage:
    """Open a slide (any format :class:`SlideImage` reads); nothing is decoded until used."""
    return SlideImage(path)

"""Predictions as a SpatialData store: the slide image, the spots as circles, a table annotating them.

The layout the scverse tools read (``spatialdata.read_zarr``, spatialdata-plot, napari-spatialdata)
and that LazySlide/wsidata use for tile-level predictions:

- ``images["he"]``: the slide, downsampled so its long side is at most ``image_max_side`` px, as a
  multiscale image (factor-2 levels) whose transform maps it onto the slide's full-resolution pixels;
- ``shapes["spots"]``: one circle per spot (or grid tile), centre and radius in full-resolution
  slide pixels (the ``global`` coordinate system is level 0 of the slide, as ``obsm["spatial"]``);
- ``tables["table"]``: the prediction AnnData (``X`` = ``layers["predicted"]``,
  ``layers["uncertainty"]``, ``uns["cmrcnet"]``) annotating ``spots`` through ``obs["region"]`` and
  ``obs["spot_id"]``.

spatialdata is an optional dependency (``pip install "cmrcnet[spatial]"``; ``.[dev]`` pulls it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cmrcnet.errors import InputError
from cmrcnet.utils import atomic_dir

if TYPE_CHECKING:
    import anndata as ad

    from cmrcnet.data.image import SlideImage

#: Element names in the store.
IMAGE_KEY, SHAPES_KEY, TABLE_KEY = "he", "spots", "table"
#: Long side of the stored slide image (the store stays small; the scanner file keeps level 0).
IMAGE_MAX_SIDE = 4096
#: Coordinate system of the store: full-resolution slide pixels.
COORDINATE_SYSTEM = "global"


def _require_spatialdata():
    try:
        import spatialdata  # noqa: F401
    except ImportError:
        raise InputError('SpatialData output needs the spatialdata package: pip install "cmrcnet[spatial]"') from None


def _slide_image(pred: "ad.AnnData", image: "SlideImage | None", max_side: int) -> tuple[np.ndarray, float] | None:
    """The RGB image to store and its scale (image px per full-res px): from the slide when given,
    else the ``hires`` image of ``uns["spatial"]``."""
    if image is not None:
        return image.thumbnail(max_side)
    for entry in (pred.uns.get("spatial") or {}).values():
        imgs, sf = entry.get("images") or {}, entry.get("scalefactors") or {}
        if "hires" in imgs and "tissue_hires_scalef" in sf:
            return np.asarray(imgs["hires"]), float(sf["tissue_hires_scalef"])
    return None


def spot_radius_px(pred: "ad.AnnData") -> float:
    """Spot radius in full-resolution pixels, from ``uns["spatial"]``'s ``spot_diameter_fullres``."""
    for entry in (pred.uns.get("spatial") or {}).values():
        d = (entry.get("scalefactors") or {}).get("spot_diameter_fullres")
        if d:
            return float(d) / 2.0
    meta = pred.uns.get("cmrcnet") or {}
    if meta.get("um_per_px") and meta.get("spot_diameter_um"):
        return float(meta["spot_diameter_um"]) / float(meta["um_per_px"]) / 2.0
    raise InputError("the prediction has no spot diameter (uns['spatial'][...]['scalefactors'])")


def to_spatialdata(pred: "ad.AnnData", image: "SlideImage | None" = None, *, image_max_side: int = IMAGE_MAX_SIDE):
    """A :class:`spatialdata.SpatialData` of a prediction (see the module docstring)."""
    _require_spatialdata()
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    if pred.isbacked:
        pred = pred.to_memory()
    coords = np.asarray(pred.obsm["spatial"], dtype=np.float64)
    ids = np.arange(pred.n_obs, dtype=np.int64)
    shapes = ShapesModel.parse(coords, geometry=0, radius=np.full(pred.n_obs, spot_radius_px(pred)),
                               index=pd.Index(ids, name="spot_id"),
                               transformations={COORDINATE_SYSTEM: Identity()})
    obs = pred.obs.copy()
    obs["region"] = pd.Categorical([SHAPES_KEY] * pred.n_obs)
    obs["spot_id"] = ids
    obs["barcode"] = pred.obs_names.astype(str)
    uns = {k: v for k, v in pred.uns.items() if k != "spatial"}  # the image is an element of the store
    table = ad.AnnData(X=pred.X, obs=obs, var=pred.var.copy(), obsm=dict(pred.obsm), layers=dict(pred.layers), uns=uns)
    table = TableModel.parse(table, region=SHAPES_KEY, region_key="region", instance_key="spot_id")
    images = {}
    got = _slide_image(pred, image, image_max_side)
    if got is not None:
        rgb, scale = got
        levels = max(0, min(3, int(np.log2(max(1, min(rgb.shape[:2]) // 256)))))
        images[IMAGE_KEY] = Image2DModel.parse(
            np.moveaxis(np.ascontiguousarray(rgb), -1, 0), dims=("c", "y", "x"), c_coords=["r", "g", "b"],
            scale_factors=[2] * levels or None,
            transformations={COORDINATE_SYSTEM: Scale([1.0 / scale, 1.0 / scale], axes=("y", "x"))})
    return SpatialData(images=images, shapes={SHAPES_KEY: shapes}, tables={TABLE_KEY: table})


def write_spatialdata(pred: "ad.AnnData", path: str | Path, image: "SlideImage | None" = None, *,
                      image_max_side: int = IMAGE_MAX_SIDE) -> Path:
    """Write :func:`to_spatialdata` to a ``.zarr`` store, atomically (a killed run leaves no store)."""
    sdata = to_spatialdata(pred, image, image_max_side=image_max_side)
    path = Path(path)
    with atomic_dir(path) as tmp:
        sdata.write(tmp)
    return path


def is_spatialdata_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".zarr"

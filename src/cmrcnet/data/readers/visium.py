"""10x Visium (Space Ranger ``outs/``) reader, and a writer used to build test fixtures.

A sample folder holds ``spatial/tissue_positions.csv`` (or the older header-less
``tissue_positions_list.csv``), ``spatial/scalefactors_json.json``, a feature-barcode
matrix (``filtered_feature_bc_matrix.h5`` or the ``filtered_feature_bc_matrix/`` mtx
folder) and the full-resolution H&E image (any .tif/.jpg/.png in the folder root, or
``fullres_image=``). A folder of several such folders is a dataset of several samples.

Geometry: spots are 55 um across, 100 um apart (hexagonal). The pixel size comes from
the metadata, ``55 / spot_diameter_fullres``, and is cross-checked against the grid.
Space Ranger's ``pxl_row_in_fullres`` is y and ``pxl_col_in_fullres`` is x.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cmrcnet.data.image import SlideImage
from cmrcnet.data.pixelsize import estimate_um_per_px
from cmrcnet.data.readers._common import (
    build_adata,
    check_in_image,
    check_unique,
    counts_to_csr,
    examples,
    find_images,
    numeric_columns,
    read_table,
    report_one_sided,
    require_file,
    write_sample_image,
)
from cmrcnet.data.sample import Sample
from cmrcnet.errors import InputError
from cmrcnet.utils import atomic_path, write_json_atomic

VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_PITCH_UM = 100.0
#: Relative disagreement between metadata and grid pixel size that triggers a warning.
PIXEL_SIZE_TOLERANCE = 0.1

_POS_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


# -- layout ----------------------------------------------------------------------------------
def _positions_file(folder: Path) -> Path | None:
    for name in ("tissue_positions.csv", "tissue_positions_list.csv"):
        if (folder / "spatial" / name).is_file():
            return folder / "spatial" / name
    return None


def _sample_root(folder: Path) -> Path | None:
    """The folder holding ``spatial/`` (``folder`` itself or its ``outs/``), if any."""
    for cand in (folder, folder / "outs"):
        if _positions_file(cand) is not None:
            return cand
    return None


def _looks_like_spaceranger(folder: Path) -> Path | None:
    """``folder`` (or its ``outs/``) when it has Space Ranger outputs (a ``spatial/`` folder with
    scale factors or images, or a feature-barcode matrix), even without tissue positions."""
    for cand in (folder, folder / "outs"):
        if not cand.is_dir():
            continue
        spatial = cand / "spatial"
        if (spatial / "scalefactors_json.json").is_file() or any(spatial.glob("tissue_*_image.png")):
            return cand
        if any(cand.glob("*feature_bc_matrix*")) and spatial.is_dir():
            return cand
    return None


def _sample_name(folder: Path) -> str:
    return folder.parent.name if folder.name == "outs" else folder.name


def detect_visium(path: Path) -> bool:
    return bool(list_visium(path))


def list_visium(path: Path) -> list[str]:
    """One id for a Space Ranger folder; else one per subfolder that is one. A folder with Space
    Ranger outputs but no tissue positions is listed too, so reading it names the missing file."""
    if _sample_root(path) is not None or _looks_like_spaceranger(path) is not None:
        return [_sample_name(path)]
    if not path.is_dir():
        return []
    return sorted(d.name for d in path.iterdir()
                  if d.is_dir() and (_sample_root(d) is not None or _looks_like_spaceranger(d) is not None))


def _resolve(path: Path, sample_id: str) -> Path:
    own = _sample_root(path) or _looks_like_spaceranger(path)
    folder = path if own is not None and _sample_name(path) == sample_id else path / sample_id
    root = _sample_root(folder)
    if root is None:
        where = _looks_like_spaceranger(folder) or folder
        raise InputError(
            f"tissue positions of sample {sample_id!r} not found (expected spatial/tissue_positions.csv or "
            "spatial/tissue_positions_list.csv from Space Ranger)", where / "spatial" / "tissue_positions.csv")
    return root


# -- tables ------------------------------------------------------------------------------------
def read_positions(path: Path) -> pd.DataFrame:
    """Tissue positions (with or without header), indexed by barcode."""
    with open(path, "rb") as fh:
        first = fh.readline().decode("utf-8", "replace")
    has_header = first.lower().startswith("barcode")
    dtype = {"barcode": str} if has_header else {0: str}
    df = read_table(path, "tissue positions", header=0 if has_header else None, dtype=dtype)
    if not has_header:
        if df.shape[1] != 6:
            raise InputError(f"tissue positions should have 6 columns, found {df.shape[1]}", path)
        df.columns = _POS_COLUMNS
    num = numeric_columns(df, _POS_COLUMNS[1:], path, "tissue positions")
    if "barcode" not in df.columns:
        raise InputError("tissue positions lack a 'barcode' column", path)
    barcodes = df["barcode"].astype(str).str.strip().tolist()
    check_unique(barcodes, path, "barcodes in tissue positions")
    num.index = pd.Index(barcodes)
    return num


def read_scalefactors(folder: Path) -> dict:
    path = require_file(folder / "spatial" / "scalefactors_json.json", "scalefactors_json.json")
    try:
        sf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"not valid JSON ({e})", path) from None
    d = sf.get("spot_diameter_fullres") if isinstance(sf, dict) else None
    if not isinstance(d, (int, float)) or not np.isfinite(d) or d <= 0:
        raise InputError("scalefactors lack a positive spot_diameter_fullres", path)
    return sf


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v) for v in values]


def _matrix_path(folder: Path) -> Path:
    for pattern in ("filtered_feature_bc_matrix.h5", "*filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix",
                    "raw_feature_bc_matrix.h5", "*raw_feature_bc_matrix.h5", "raw_feature_bc_matrix"):
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    raise InputError("no feature-barcode matrix (filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/)", folder)


def read_10x_h5(path: Path) -> tuple[sp.csr_matrix, list[str], list[str], list[str]]:
    """(X barcodes x features, barcodes, feature ids, feature names), Gene Expression only."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "matrix" in f:
                g = f["matrix"]
                feats = g["features"]
                ids = _decode(feats["id"][:])
                names = _decode(feats["name"][:])
                types = _decode(feats["feature_type"][:]) if "feature_type" in feats else ["Gene Expression"] * len(ids)
            else:  # Cell Ranger 2 layout: one group per genome
                g = f[next(iter(f.keys()))]
                ids = _decode(g["genes"][:])
                names = _decode(g["gene_names"][:])
                types = ["Gene Expression"] * len(ids)
            n_feat, n_bc = (int(v) for v in g["shape"][:])
            barcodes = _decode(g["barcodes"][:])
            X = sp.csr_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=(n_bc, n_feat))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py/scipy raise many types for bad files
        raise InputError(f"unreadable 10x HDF5 matrix ({type(e).__name__}: {e})", path) from None
    return _gene_expression(X, barcodes, ids, names, types, path)


def read_10x_mtx(folder: Path) -> tuple[sp.csr_matrix, list[str], list[str], list[str]]:
    """The ``*_feature_bc_matrix/`` folder variant (matrix.mtx, barcodes.tsv, features.tsv)."""
    import scipy.io

    def pick(*names: str) -> Path:
        for n in names:
            for suffix in ("", ".gz"):
                if (folder / (n + suffix)).is_file():
                    return folder / (n + suffix)
        raise InputError(f"{names[0]}[.gz] not found", folder / names[0])

    mtx, bc_path = pick("matrix.mtx"), pick("barcodes.tsv")
    feat_path = pick("features.tsv", "genes.tsv")
    try:
        X = sp.csr_matrix(scipy.io.mmread(str(mtx)).T)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"unreadable Matrix Market file ({type(e).__name__}: {e})", mtx) from None
    barcodes = read_table(bc_path, "barcodes", sep="\t", header=None, dtype=str)[0].tolist()
    feats = read_table(feat_path, "features", sep="\t", header=None, dtype=str)
    ids = feats[0].tolist()
    names = feats[1].tolist() if feats.shape[1] > 1 else ids
    types = feats[2].tolist() if feats.shape[1] > 2 else ["Gene Expression"] * len(ids)
    if X.shape != (len(barcodes), len(ids)):
        raise InputError(
            f"matrix is {X.shape[1]} x {X.shape[0]} but there are {len(ids)} features and {len(barcodes)} barcodes", mtx
        )
    return _gene_expression(X, barcodes, ids, names, types, mtx)


def _gene_expression(X, barcodes, ids, names, types, path: Path):
    if X.shape != (len(barcodes), len(ids)):
        raise InputError(f"matrix shape {X.shape[::-1]} does not match {len(ids)} features x {len(barcodes)} barcodes", path)
    keep = np.array([t == "Gene Expression" for t in types], dtype=bool)
    if not keep.all():
        X = X[:, np.flatnonzero(keep)]
        ids = [i for i, k in zip(ids, keep) if k]
        names = [n for n, k in zip(names, keep) if k]
    return sp.csr_matrix(X), barcodes, ids, names


def read_matrix(path: Path):
    return read_10x_mtx(path) if path.is_dir() else read_10x_h5(path)


def _fullres_image(folder: Path, fullres_image: str | Path | None) -> Path:
    if fullres_image is not None:
        p = Path(fullres_image)
        return require_file(p if p.is_absolute() else folder / p, "full-resolution image")
    found = find_images(folder)
    if not found and folder.name == "outs":
        found = find_images(folder.parent)
    if not found:
        raise InputError(
            "no full-resolution H&E image (.tif/.jpg/.png) next to spatial/; put the image given to Space "
            "Ranger (its --image) in this folder (spatial/tissue_hires_image.png is too small to cut patches from)",
            folder,
        )
    if len(found) > 1:
        found.sort(key=lambda p: p.stat().st_size, reverse=True)
        warnings.warn(f"{folder.name}: several images, using the largest, {found[0].name}", stacklevel=3)
    return found[0]


# -- reader ---------------------------------------------------------------------------------
def read_visium(path: Path, sample_id: str, fullres_image: str | Path | None = None) -> Sample:
    """One Space Ranger sample: in-tissue spots present in the matrix, Gene Expression features."""
    folder = _resolve(path, sample_id)
    pos_path = _positions_file(folder)
    assert pos_path is not None
    pos = read_positions(pos_path)
    sf = read_scalefactors(folder)
    mat_path = _matrix_path(folder)
    X, barcodes, ids, names = read_matrix(mat_path)
    check_unique(barcodes, mat_path, "barcodes in matrix")
    image = SlideImage(_fullres_image(folder, fullres_image))
    image.size  # noqa: B018 - fail now on a broken image header

    in_tissue = pos.index[pos["in_tissue"].to_numpy() == 1]
    bc_set, tissue_set = set(barcodes), set(in_tissue)
    is_raw = "raw_feature_bc_matrix" in mat_path.name
    only_matrix = [b for b in barcodes if b not in pos.index] + (
        [] if is_raw else [b for b in barcodes if b in pos.index and b not in tissue_set]
    )
    only_pos = [b for b in in_tissue if b not in bc_set]
    rows = [i for i, b in enumerate(barcodes) if b in tissue_set]
    if not rows:
        raise InputError(
            f"no in-tissue barcode of {pos_path.name} (e.g. {examples(list(in_tissue)[:3])}) is in the matrix "
            f"(e.g. {examples(barcodes[:3])})",
            mat_path,
        )
    report_one_sided(sample_id, only_matrix, mat_path, only_pos, pos_path, "matrix", "in-tissue positions")
    kept = [barcodes[i] for i in rows]
    Xk = counts_to_csr(X[rows], mat_path, row_names=kept)
    p = pos.loc[kept]
    coords = np.column_stack([p["pxl_col_in_fullres"].to_numpy(), p["pxl_row_in_fullres"].to_numpy()])

    um_per_px = VISIUM_SPOT_DIAMETER_UM / float(sf["spot_diameter_fullres"])
    _cross_check(sample_id, um_per_px, pos, pos_path)
    check_in_image(coords, kept, image, 0.5 * float(sf["spot_diameter_fullres"]), pos_path)
    adata = build_adata(
        Xk, kept, names, coords, mat_path, gene_ids=ids,
        array_row=p["array_row"].to_numpy(), array_col=p["array_col"].to_numpy(),
    )
    return Sample(
        sample_id=sample_id,
        adata=adata,
        image=image,
        um_per_px=um_per_px,
        spot_diameter_um=VISIUM_SPOT_DIAMETER_UM,
        pitch_um=VISIUM_PITCH_UM,
        patient_id=sample_id,
        dataset=_sample_name(path) if _sample_root(path) is not None else path.name,
        platform="visium",
        pixel_size_source="metadata",
        meta={"scalefactors": sf, "matrix_file": str(mat_path), "positions_file": str(pos_path), "image_file": str(image.path)},
    )


def _cross_check(sample_id: str, um_per_px: float, pos: pd.DataFrame, pos_path: Path) -> None:
    """Warn when the metadata pixel size disagrees with the spot grid (wrong image or scalefactors?)."""
    if len(pos) < 3:
        return
    try:
        grid = estimate_um_per_px(
            pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(),
            VISIUM_PITCH_UM,
            pos[["array_row", "array_col"]].to_numpy(),
        )
    except InputError:
        return
    if abs(grid / um_per_px - 1) > PIXEL_SIZE_TOLERANCE:
        warnings.warn(
            f"{sample_id}: pixel size from scalefactors ({um_per_px:.4f} um/px) disagrees with the spot grid "
            f"({grid:.4f} um/px) in {pos_path.name}",
            stacklevel=3,
        )


# -- writer (fixtures) ------------------------------------------------------------------------
def write_visium(
    sample: Sample,
    dest: str | Path,
    matrix: str = "h5",
    positions: str = "csv",
    lowres: bool = True,
) -> Path:
    """Write ``sample`` as a Space Ranger-like folder (for tests and interoperability).

    ``matrix``: ``"h5"`` (filtered_feature_bc_matrix.h5) or ``"mtx"`` (folder);
    ``positions``: ``"csv"`` (tissue_positions.csv with header) or ``"list"`` (old,
    header-less tissue_positions_list.csv). ``spot_diameter_fullres`` is written as
    ``55 / um_per_px`` so the pixel size reads back unchanged. Coordinates are written at
    full float precision (Space Ranger writes integers) so they read back exactly.
    """
    dest = Path(dest)
    obs = sample.adata.obs
    if "array_row" not in obs or "array_col" not in obs:
        raise InputError(f"sample {sample.sample_id!r} has no array_row/array_col, cannot write Visium positions")
    (dest / "spatial").mkdir(parents=True, exist_ok=True)
    xy = sample.coords_px
    barcodes = [str(b) for b in sample.adata.obs_names]
    pos = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": obs["array_row"].to_numpy().astype(int),
            "array_col": obs["array_col"].to_numpy().astype(int),
            "pxl_row_in_fullres": xy[:, 1],
            "pxl_col_in_fullres": xy[:, 0],
        }
    )
    if positions == "csv":
        pos.to_csv(dest / "spatial" / "tissue_positions.csv", index=False, float_format="%.17g")
    elif positions == "list":
        pos.to_csv(dest / "spatial" / "tissue_positions_list.csv", index=False, header=False, float_format="%.17g")
    else:
        raise InputError(f"unknown positions variant {positions!r} (csv or list)")

    var = sample.adata.var
    ids = [str(g) for g in (var["gene_ids"] if "gene_ids" in var else var.index)]
    names = [str(g) for g in var.index]
    X = sp.csr_matrix(sample.adata.X)
    if matrix == "h5":
        _write_10x_h5(dest / "filtered_feature_bc_matrix.h5", X, barcodes, ids, names)
    elif matrix == "mtx":
        _write_10x_mtx(dest / "filtered_feature_bc_matrix", X, barcodes, ids, names)
    else:
        raise InputError(f"unknown matrix variant {matrix!r} (h5 or mtx)")

    d_px = _exact_diameter_px(float(sample.um_per_px))
    sf = {
        "spot_diameter_fullres": d_px,
        "fiducial_diameter_fullres": d_px * 1.6153846,
        "tissue_hires_scalef": 1.0,
        "tissue_lowres_scalef": 1.0,
    }
    if lowres and sample.image is not None:
        from PIL import Image

        for key, side in (("hires", 2000), ("lowres", 600)):
            thumb, s = sample.image.thumbnail(side)
            Image.fromarray(thumb).save(dest / "spatial" / f"tissue_{key}_image.png")
            sf[f"tissue_{key}_scalef"] = s
    write_json_atomic(dest / "spatial" / "scalefactors_json.json", sf)
    _write_fullres(sample, dest)
    return dest


def _exact_diameter_px(um_per_px: float) -> float:
    """A ``spot_diameter_fullres`` d with ``55 / d == um_per_px`` bit for bit when one exists
    within a few ulps (about 9 times in 10), else the nearest (1-ulp error)."""
    d = VISIUM_SPOT_DIAMETER_UM / um_per_px
    up = down = d
    for _ in range(16):
        for cand in (up, down):
            if VISIUM_SPOT_DIAMETER_UM / cand == um_per_px:
                return float(cand)
        up, down = float(np.nextafter(up, np.inf)), float(np.nextafter(down, -np.inf))
    return d


def _write_10x_h5(path: Path, X: sp.csr_matrix, barcodes: list[str], ids: list[str], names: list[str]) -> None:
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            g = f.create_group("matrix")
            g.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes], dtype="S"))
            g.create_dataset("data", data=X.data.astype(np.int32))
            g.create_dataset("indices", data=X.indices.astype(np.int64))
            g.create_dataset("indptr", data=X.indptr.astype(np.int64))
            g.create_dataset("shape", data=np.array([X.shape[1], X.shape[0]], dtype=np.int32))
            ft = g.create_group("features")
            ft.create_dataset("id", data=np.array([i.encode() for i in ids], dtype="S"))
            ft.create_dataset("name", data=np.array([n.encode() for n in names], dtype="S"))
            ft.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(ids), dtype="S"))
            ft.create_dataset("genome", data=np.array([b"unknown"] * len(ids), dtype="S"))
            ft.create_dataset("_all_tag_keys", data=np.array([b"genome"], dtype="S"))


def _write_10x_mtx(folder: Path, X: sp.csr_matrix, barcodes: list[str], ids: list[str], names: list[str]) -> None:
    import gzip

    import scipy.io

    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(X.T), field="integer")
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.write("".join(f"{b}\n" for b in barcodes))
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        fh.write("".join(f"{i}\t{n}\tGene Expression\n" for i, n in zip(ids, names)))


def _write_fullres(sample: Sample, dest: Path) -> Path | None:
    """The full-resolution image next to ``spatial/`` (copied, or saved from memory)."""
    if sample.image is None:
        return None
    return write_sample_image(sample.image, dest, f"{sample.sample_id}_fullres", fmt="tif")

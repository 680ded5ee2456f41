"""Legacy Spatial Transcriptomics (ST, Stahl et al. 2016) readers: her2st and STUtility layouts.

Both layouts pair a counts table (spots x genes, row index ``"{x}x{y}"`` = array
position) with a spot table (``x y new_x new_y pixel_x pixel_y selected``) giving each
spot's centre in pixels of the H&E image:

- ``her2st``: ``ST-cnts/{id}.tsv.gz``, ``ST-spotfiles/{id}_selection.tsv``,
  ``ST-imgs/{patient}/{id}/*.jpg``; patient = first letter of the section id;
- ``legacy-st`` (STUtility example data and similar flat folders): ``{id}.tsv[.gz]``,
  ``alignment_table_{id}.tsv`` (or ``{id}_selection.tsv``), ``{id}.jpg|png|tif``, and an
  optional ``*genes*.tsv[.gz]`` (``gene_id gene_type gene_name``) mapping Ensembl ids to
  symbols. Patient ids come from an optional ``samples.tsv`` (else = sample id).

No pixel size is stored: it is estimated from the spot grid (200 um pitch).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cmrcnet.data.image import SlideImage
from cmrcnet.data.pixelsize import estimate_um_per_px
from cmrcnet.data.readers._common import (
    build_adata,
    check_in_image,
    check_unique,
    counts_to_csr,
    examples,
    find_images,
    log,
    numeric_columns,
    read_table,
    report_one_sided,
    require_file,
    strip_gene_version,
    write_sample_image,
)
from cmrcnet.data.sample import Sample
from cmrcnet.errors import InputError

#: Legacy ST array geometry (1k/2k arrays): centre-to-centre pitch and spot diameter.
ST_PITCH_UM = 200.0
ST_SPOT_DIAMETER_UM = 100.0

_KEY_RX = re.compile(r"^\s*(-?\d+(?:\.\d+)?)x(-?\d+(?:\.\d+)?)\s*$")
_SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


# -- shared core ---------------------------------------------------------------------------
def _norm_key(key: str) -> str:
    """Canonical ``"{x}x{y}"`` key (``"10.0x3"`` -> ``"10x3"``) so both tables join."""
    m = _KEY_RX.match(str(key))
    if not m:
        return str(key).strip()
    parts = [float(g) for g in m.groups()]
    return "x".join(str(int(p)) if p.is_integer() else str(p) for p in parts)


def _read_counts(path: Path) -> pd.DataFrame:
    """Counts table as spots x genes, index = normalised spot keys (transposed if needed)."""
    df = read_table(path, "counts table", sep="\t", index_col=0)
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise InputError(f"counts table is empty ({df.shape[0]} rows x {df.shape[1]} columns)", path)
    idx_keys = np.mean([bool(_KEY_RX.match(str(i))) for i in df.index[:50]])
    col_keys = np.mean([bool(_KEY_RX.match(str(c))) for c in df.columns[:50]])
    if col_keys > 0.9 and idx_keys < 0.1:  # genes x spots: transpose to spots x genes
        df = df.T
    df.index = pd.Index([_norm_key(i) for i in df.index])
    df.columns = pd.Index([str(c) for c in df.columns])
    check_unique(list(df.index), path, "spots in counts table")
    bad = [c for c, t in df.dtypes.items() if not (pd.api.types.is_numeric_dtype(t) or pd.api.types.is_bool_dtype(t))]
    if bad:
        col = bad[0]
        vals = pd.to_numeric(df[col], errors="coerce")
        row = df.index[vals.isna().to_numpy() & df[col].notna().to_numpy()]
        where = f" (e.g. spot {row[0]}: {df.loc[row[0], col]!r})" if len(row) else ""
        raise InputError(f"counts table has non-numeric values in {len(bad)} gene column(s) such as {col!r}{where}", path)
    return df


def _read_spots(path: Path) -> pd.DataFrame:
    """Spot table with keys, array x/y, pixel x/y and (if present) ``selected``."""
    raw = read_table(path, "spot table", sep="\t")
    raw.columns = [str(c).strip() for c in raw.columns]
    num = numeric_columns(raw, _SPOT_COLUMNS, path, "spot table")
    out = pd.DataFrame(
        {
            "x": num["x"].to_numpy(),
            "y": num["y"].to_numpy(),
            "pixel_x": num["pixel_x"].to_numpy(),
            "pixel_y": num["pixel_y"].to_numpy(),
        }
    )
    if "selected" in raw.columns:
        sel = pd.to_numeric(raw["selected"], errors="coerce")
        if sel.isna().any():
            raise InputError("spot table has non-numeric values in column 'selected'", path)
        out["selected"] = sel.to_numpy() != 0
    keys = [_norm_key(f"{x:g}x{y:g}") for x, y in zip(out["x"], out["y"])]
    check_unique(keys, path, "array positions (x, y) in spot table")
    out.index = pd.Index(keys)
    return out


def read_st_section(
    sample_id: str,
    counts_path: Path,
    spots_path: Path,
    image_path: Path,
    patient_id: str,
    dataset: str,
    gene_map: dict[str, str] | None = None,
) -> Sample:
    """Read one legacy-ST section: join counts and spot table on ``"{x}x{y}"``, validate, build."""
    spots_all = _read_spots(spots_path)
    counts = _read_counts(counts_path)
    image = SlideImage(require_file(image_path, "H&E image"))
    image.size  # noqa: B018 - decode the header now so a broken image fails at read time

    spots = spots_all
    if "selected" in spots_all.columns:
        spots = spots_all[spots_all["selected"]]
        n_unsel = int((~spots_all["selected"]).sum())
        if n_unsel:
            log.info("%s: %d spot(s) not under tissue (selected == 0) skipped", sample_id, n_unsel)
        if len(spots) == 0:
            raise InputError("no spot has selected == 1 (no spot under tissue)", spots_path)
    # Counts-only spots that are explicitly deselected in the spot table are not mismatches.
    deselected = set(spots_all.index) - set(spots.index)
    only_counts = [k for k in counts.index if k not in spots.index and k not in deselected]
    only_spots = [k for k in spots.index if k not in counts.index]
    keep = [k for k in spots.index if k in counts.index]
    if not keep:
        raise InputError(
            f"no spot of counts table {counts_path.name} (e.g. {examples(counts.index[:3])}) matches the "
            f"spot table (e.g. {examples(spots.index[:3])})",
            spots_path,
        )
    report_one_sided(sample_id, only_counts, counts_path, only_spots, spots_path)

    # Order spots as in the counts table (the source order of the expression data).
    keep_set = set(keep)
    order = [k for k in counts.index if k in keep_set]
    sub = counts.loc[order]
    X = counts_to_csr(sub.to_numpy(), counts_path, row_names=order)
    sp_rows = spots.loc[order]
    coords = sp_rows[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)

    um_per_px = estimate_um_per_px(
        spots_all[["pixel_x", "pixel_y"]].to_numpy(), ST_PITCH_UM, spots_all[["y", "x"]].to_numpy()
    )
    check_in_image(coords, order, image, 0.5 * ST_SPOT_DIAMETER_UM / um_per_px, spots_path)

    ids = list(sub.columns)
    gene_ids = None
    genes = ids
    if gene_map is not None:
        genes = [_map_gene(g, gene_map) for g in ids]
        gene_ids = ids
    adata = build_adata(
        X,
        order,
        genes,
        coords,
        counts_path,
        gene_ids=gene_ids,
        array_row=sp_rows["y"].to_numpy().round(),
        array_col=sp_rows["x"].to_numpy().round(),
    )
    return Sample(
        sample_id=sample_id,
        adata=adata,
        image=image,
        um_per_px=um_per_px,
        spot_diameter_um=ST_SPOT_DIAMETER_UM,
        pitch_um=ST_PITCH_UM,
        patient_id=patient_id,
        dataset=dataset,
        platform="legacy-st",
        pixel_size_source="estimated",
        meta={"counts_file": str(counts_path), "spots_file": str(spots_path), "image_file": str(image_path)},
    )


# -- gene ids -> symbols -------------------------------------------------------------------
def _map_gene(gene_id: str, gene_map: dict[str, str]) -> str:
    """Symbol for ``gene_id``: exact id first, then the id without its version suffix."""
    if gene_id in gene_map:
        return gene_map[gene_id]
    return gene_map.get(strip_gene_version(gene_id), gene_id)


def _find_gene_table(folder: Path) -> Path | None:
    cands = sorted(p for p in folder.glob("*genes*.tsv*") if p.is_file() and p.suffix in (".tsv", ".gz"))
    return cands[0] if cands else None


def read_gene_map(path: Path) -> dict[str, str]:
    """``gene_id -> gene_name`` (both with and without version suffix)."""
    df = read_table(path, "gene table", sep="\t", dtype=str)
    for col in ("gene_id", "gene_name"):
        if col not in df.columns:
            raise InputError(f"gene table lacks column {col!r} (has: {examples(df.columns)})", path)
    df = df.dropna(subset=["gene_id", "gene_name"])
    out: dict[str, str] = {}
    for gid, name in zip(df["gene_id"], df["gene_name"]):
        out.setdefault(strip_gene_version(gid), name)
    for gid, name in zip(df["gene_id"], df["gene_name"]):
        out[gid] = name  # exact ids win over stripped ones
    return out


# -- her2st layout -------------------------------------------------------------------------
def _her2st_counts(root: Path, sample_id: str) -> Path:
    for name in (f"{sample_id}.tsv.gz", f"{sample_id}.tsv"):
        if (root / "ST-cnts" / name).is_file():
            return root / "ST-cnts" / name
    return root / "ST-cnts" / f"{sample_id}.tsv.gz"


def detect_her2st(path: Path) -> bool:
    return (path / "ST-cnts").is_dir() and (path / "ST-spotfiles").is_dir()


def list_her2st(path: Path) -> list[str]:
    """Section ids = names of the counts files, spot files and image folders (no parsing): a
    section missing one of the three is listed, and reading it names the missing file."""
    ids = {p.name.split(".tsv")[0] for p in (path / "ST-cnts").glob("*.tsv*") if not p.name.startswith(".")}
    ids |= {p.name[: -len("_selection.tsv")] for p in (path / "ST-spotfiles").glob("*_selection.tsv")
            if not p.name.startswith(".")}
    imgs = path / "ST-imgs"
    if imgs.is_dir():
        ids |= {d.name for d in imgs.glob("*/*") if d.is_dir() and find_images(d)}
    return sorted(ids)


def her2st_patient(sample_id: str) -> str:
    """her2st convention: the patient is the section id's leading letter (C2 -> C)."""
    return sample_id[0] if sample_id else sample_id


def _her2st_image(root: Path, sample_id: str, patient: str) -> Path:
    imgs = root / "ST-imgs"
    for folder in [imgs / patient / sample_id, *sorted(imgs.glob(f"*/{sample_id}")), imgs / sample_id]:
        found = find_images(folder)
        if len(found) > 1:
            warnings.warn(f"{sample_id}: several images in {folder}, using {found[0].name}", stacklevel=3)
        if found:
            return found[0]
    raise InputError(f"no H&E image for section {sample_id} (expected ST-imgs/{patient}/{sample_id}/*.jpg)", imgs)


def read_her2st(path: Path, sample_id: str) -> Sample:
    """One her2st section."""
    patient = her2st_patient(sample_id)
    counts = require_file(_her2st_counts(path, sample_id), "counts table")
    spots = require_file(path / "ST-spotfiles" / f"{sample_id}_selection.tsv", "spot table")
    image = _her2st_image(path, sample_id, patient)
    return read_st_section(sample_id, counts, spots, image, patient, path.name)


# -- generic legacy ST (STUtility) layout ----------------------------------------------------
_SPOT_FILE_PATTERNS = (re.compile(r"^alignment_table_(.+)\.tsv$"), re.compile(r"^(.+)_selection\.tsv$"))


def _spot_files(path: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if not path.is_dir():
        return out
    for p in sorted(path.iterdir()):
        for rx in _SPOT_FILE_PATTERNS:
            m = rx.match(p.name)
            if m and p.is_file():
                out.setdefault(m.group(1), p)
    return out


def _legacy_counts(path: Path, sample_id: str) -> Path:
    for name in (f"{sample_id}.tsv", f"{sample_id}.tsv.gz", f"{sample_id}_stdata.tsv", f"{sample_id}_stdata.tsv.gz"):
        if (path / name).is_file():
            return path / name
    return path / f"{sample_id}.tsv"


def _legacy_image(path: Path, sample_id: str) -> Path:
    found = find_images(path, re.escape(sample_id) + r"([_\-.].*)?")
    exact = [p for p in found if p.stem == sample_id]
    if exact or found:
        return (exact or found)[0]
    raise InputError(f"no H&E image for sample {sample_id} (expected {sample_id}.jpg, .png or .tif)", path)


def detect_legacy_st(path: Path) -> bool:
    return any(_legacy_counts(path, sid).is_file() for sid in _spot_files(path)) or bool(_counts_ids(path))


_COUNTS_RX = re.compile(r"^(.+?)(_stdata)?\.tsv(\.gz)?$")


def _counts_ids(path: Path) -> set[str]:
    """Ids of the counts tables ``{id}.tsv[.gz]`` / ``{id}_stdata.tsv[.gz]`` that have an image
    ``{id}.jpg|png|tif`` next to them (spot tables, gene tables and samples.tsv excluded)."""
    if not path.is_dir():
        return set()
    images = {p.stem for p in find_images(path)}
    out = set()
    for p in path.iterdir():
        m = _COUNTS_RX.match(p.name)
        if not m or not p.is_file() or p.name.startswith(".") or p.name.startswith("alignment_table_"):
            continue
        sid = m.group(1)
        if sid.endswith("_selection") or "genes" in sid or sid in ("samples",):
            continue
        if sid in images:
            out.add(sid)
    return out


def list_legacy_st(path: Path) -> list[str]:
    """Ids of the spot tables, and of counts tables with an image but no spot table (so that a
    sample missing its spot table is listed, and reading it names the missing file)."""
    return sorted(set(_spot_files(path)) | _counts_ids(path))


def read_legacy_st(path: Path, sample_id: str) -> Sample:
    """One section of a flat legacy-ST folder; Ensembl ids mapped to symbols when a gene table exists."""
    spot_files = _spot_files(path)
    if sample_id not in spot_files:
        raise InputError(f"spot table of sample {sample_id} not found (expected alignment_table_{sample_id}.tsv "
                         f"or {sample_id}_selection.tsv)", path / f"alignment_table_{sample_id}.tsv")
    counts = require_file(_legacy_counts(path, sample_id), "counts table")
    image = _legacy_image(path, sample_id)
    table = _find_gene_table(path)
    gene_map = read_gene_map(table) if table is not None else None
    return read_st_section(sample_id, counts, spot_files[sample_id], image, sample_id, path.name, gene_map)


# -- writer (test fixtures, exports) ---------------------------------------------------------
def write_legacy_st(sample: Sample, dest: str | Path, layout: str = "her2st") -> Path:
    """Write ``sample`` as a her2st (``layout="her2st"``) or flat legacy-ST folder.

    Spot keys are ``"{array_col}x{array_row}"``; the image is copied when it is a file,
    else written as PNG. Used to build small (and deliberately broken) fixtures.
    """
    dest = Path(dest)
    obs = sample.adata.obs
    if "array_row" not in obs or "array_col" not in obs:
        raise InputError(f"sample {sample.sample_id!r} has no array_row/array_col, cannot write legacy ST")
    x = obs["array_col"].to_numpy().astype(int)
    y = obs["array_row"].to_numpy().astype(int)
    keys = [f"{a}x{b}" for a, b in zip(x, y)]
    X = sample.adata.X
    dense = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    cols = list(sample.adata.var["gene_ids"]) if "gene_ids" in sample.adata.var else list(sample.adata.var_names)
    counts = pd.DataFrame(dense, index=keys, columns=cols)
    xy = sample.coords_px
    spots = pd.DataFrame(
        {
            "x": x, "y": y, "new_x": x.astype(float), "new_y": y.astype(float),
            "pixel_x": xy[:, 0], "pixel_y": xy[:, 1], "selected": 1,
        }
    )
    sid = sample.sample_id
    if layout == "her2st":
        counts_path = dest / "ST-cnts" / f"{sid}.tsv.gz"
        spots_path = dest / "ST-spotfiles" / f"{sid}_selection.tsv"
        img_dir = dest / "ST-imgs" / (sample.patient_id or her2st_patient(sid)) / sid
    elif layout == "legacy-st":
        counts_path = dest / f"{sid}.tsv"
        spots_path = dest / f"alignment_table_{sid}.tsv"
        img_dir = dest
    else:
        raise InputError(f"unknown legacy ST layout {layout!r} (choose her2st or legacy-st)")
    for p in (counts_path, spots_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    counts.to_csv(counts_path, sep="\t")
    spots.to_csv(spots_path, sep="\t", index=False)
    img_dir.mkdir(parents=True, exist_ok=True)
    _write_image(sample, img_dir, sid)
    return dest


def _write_image(sample: Sample, folder: Path, stem: str) -> Path:
    if sample.image is None:
        raise InputError(f"sample {sample.sample_id!r} has no image")
    return write_sample_image(sample.image, folder, stem)

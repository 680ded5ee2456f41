"""Validation and construction helpers shared by every reader.

Every reader funnels its tables through these, so all formats enforce the same
contract (see :class:`cmrcnet.data.sample.Sample`) and fail with the same kind of
one-line :class:`~cmrcnet.errors.InputError` naming the offending file.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cmrcnet.data.image import SlideImage
from cmrcnet.errors import InputError

log = logging.getLogger("cmrcnet.data.readers")

#: Image suffixes a reader will pick up as an H&E image.
IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".jpg", ".jpeg", ".png")

#: Prefixes of Xenium (and similar panel) control probes that are not genes.
CONTROL_PROBE_PREFIXES = (
    "BLANK",
    "NegControl",
    "NegPrb",
    "antisense",
    "Unassigned",
    "DeprecatedCodeword",
    "intergenic",
)


def examples(items: Iterable[object], n: int = 5) -> str:
    """A short, readable list of a few items for error and warning messages."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise an InputError saying what was expected."""
    if not path.is_file():
        raise InputError(f"{what} not found", path)
    return path


def read_table(path: Path, what: str, **kwargs) -> pd.DataFrame:
    """``pandas.read_csv`` that turns parse errors into an InputError naming the file."""
    require_file(path, what)
    kwargs.setdefault("float_precision", "round_trip")  # exact floats: coordinates must round-trip
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot parse {what}: {msg}", path) from None


def numeric_columns(df: pd.DataFrame, columns: Sequence[str], path: Path, what: str) -> pd.DataFrame:
    """Check ``columns`` exist and are all-numeric, finite; return them as float64."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(
            f"{what} lacks column(s) {', '.join(missing)} (has: {examples(df.columns, 10)})", path
        )
    out = df[list(columns)].apply(pd.to_numeric, errors="coerce")
    bad = out.isna().any(axis=1) | ~np.isfinite(out.to_numpy(dtype=np.float64)).all(axis=1)
    if bad.any():
        rows = [str(i) for i in df.index[bad.to_numpy()]]
        raise InputError(
            f"{what} has {int(bad.sum())} row(s) with missing or non-numeric "
            f"{'/'.join(columns)} (rows {examples(rows)})",
            path,
        )
    return out.astype(np.float64)


def counts_to_csr(values: np.ndarray | sp.spmatrix, path: Path, row_names: Sequence[str] | None = None) -> sp.csr_matrix:
    """Validate raw counts (numeric, finite, >= 0, whole numbers) and return an integer CSR.

    Counts stored as floats with integral values are converted to an integer dtype, so
    downstream code can rely on ``X`` holding raw integer counts.
    """
    if sp.issparse(values):
        mat = sp.csr_matrix(values)
        data = mat.data
    else:
        arr = np.asarray(values)
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
        ):
            raise InputError("counts contain non-numeric values", path)
        mat = sp.csr_matrix(arr)
        data = mat.data
    if data.size:
        if not np.issubdtype(data.dtype, np.number):
            raise InputError("counts contain non-numeric values", path)
        if np.issubdtype(data.dtype, np.floating):
            if not np.isfinite(data).all():
                raise InputError("counts contain NaN or infinite values", path)
        neg = data < 0
        if neg.any():
            rows = np.repeat(np.arange(mat.shape[0]), np.diff(mat.indptr))[neg]
            names = [row_names[r] for r in rows] if row_names is not None else rows.tolist()
            raise InputError(
                f"counts contain {int(neg.sum())} negative value(s) (spots {examples(sorted(set(map(str, names))))})",
                path,
            )
        if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.round(data)):
            raise InputError(
                "counts are not whole numbers (normalised data?); raw integer UMI counts are required",
                path,
            )
    vmax = float(data.max()) if data.size else 0.0
    dtype = np.int32 if vmax < 2**31 else np.int64
    mat = sp.csr_matrix((data.astype(dtype), mat.indices, mat.indptr), shape=mat.shape)
    mat.eliminate_zeros()
    mat.sort_indices()
    return mat


def check_unique(names: Sequence[str], path: Path, what: str) -> None:
    """Raise if ``names`` (barcodes, spot keys) contain duplicates."""
    s = pd.Index([str(n) for n in names])
    if s.has_duplicates:
        dups = s[s.duplicated()].unique().tolist()
        raise InputError(f"duplicate {what}: {examples(dups)}", path)


def report_one_sided(
    sample_id: str,
    only_a: Sequence[str],
    file_a: Path,
    only_b: Sequence[str],
    file_b: Path,
    a_what: str = "counts",
    b_what: str = "spot table",
) -> None:
    """Warn about spots present in only one of two tables: dropped, but never silently."""
    if len(only_a):
        warnings.warn(
            f"{sample_id}: {len(only_a)} spot(s) in {a_what} {file_a.name} but not in {b_what} "
            f"{file_b.name} were dropped: {examples(sorted(map(str, only_a)))}",
            stacklevel=3,
        )
    if len(only_b):
        warnings.warn(
            f"{sample_id}: {len(only_b)} spot(s) in {b_what} {file_b.name} but not in {a_what} "
            f"{file_a.name} were dropped: {examples(sorted(map(str, only_b)))}",
            stacklevel=3,
        )


def check_in_image(
    coords_px: np.ndarray, barcodes: Sequence[str], image: SlideImage, tol_px: float, coords_file: Path
) -> None:
    """Raise if spot centres lie outside the image by more than ``tol_px`` pixels.

    Reading ``image.size`` here also makes a truncated or non-image file fail at read time.
    """
    w, h = image.size
    x, y = coords_px[:, 0], coords_px[:, 1]
    out = (x < -tol_px) | (y < -tol_px) | (x > w + tol_px) | (y > h + tol_px)
    if out.any():
        idx = np.flatnonzero(out)
        ex = [f"{barcodes[i]} ({x[i]:.0f}, {y[i]:.0f})" for i in idx[:3]]
        raise InputError(
            f"{int(out.sum())} spot(s) lie outside the {w} x {h} image {image.path.name}: "
            f"{', '.join(ex)}{', ...' if len(idx) > 3 else ''} (wrong image or coordinate scale?)",
            coords_file,
        )


def make_unique(names: Sequence[str]) -> list[str]:
    """Make names unique the anndata way (``A``, ``A-1``, ``A-2``)."""
    idx = pd.Index([str(n) for n in names])
    if not idx.has_duplicates:
        return list(idx)
    return list(ad.utils.make_index_unique(idx))


def build_adata(
    X: sp.csr_matrix,
    barcodes: Sequence[str],
    genes: Sequence[str],
    coords_px: np.ndarray,
    counts_file: Path,
    gene_ids: Sequence[str] | None = None,
    array_row: np.ndarray | None = None,
    array_col: np.ndarray | None = None,
    obs_extra: pd.DataFrame | None = None,
) -> ad.AnnData:
    """Assemble the canonical AnnData: counts, unique barcodes/genes, full-res (x, y) coords."""
    if X.shape[0] == 0:
        raise InputError("sample has 0 spots after matching counts, coordinates and tissue selection", counts_file)
    if X.shape[1] == 0:
        raise InputError("sample has 0 genes", counts_file)
    check_unique(barcodes, counts_file, "spot barcodes")
    obs = pd.DataFrame(index=pd.Index([str(b) for b in barcodes], name=None))
    if array_row is not None and array_col is not None:
        obs["array_row"] = np.asarray(array_row).astype(np.int64)
        obs["array_col"] = np.asarray(array_col).astype(np.int64)
    if obs_extra is not None:
        for c in obs_extra.columns:
            if c not in obs.columns:
                obs[c] = obs_extra[c].to_numpy()
    var = pd.DataFrame(index=pd.Index(make_unique(genes), name=None))
    if gene_ids is not None:
        var["gene_ids"] = [str(g) for g in gene_ids]
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm["spatial"] = np.asarray(coords_px, dtype=np.float64).reshape(-1, 2)
    return adata


def drop_control_probes(adata: ad.AnnData, sample_id: str) -> ad.AnnData:
    """Remove panel control probes (BLANK_*, NegControl*, ...) which are not genes."""
    names = adata.var_names.astype(str)
    mask = np.array([n.startswith(CONTROL_PROBE_PREFIXES) for n in names], dtype=bool)
    if mask.any():
        log.info("%s: dropped %d control probe(s) (%s)", sample_id, int(mask.sum()), examples(names[mask], 3))
        adata = adata[:, ~mask].copy()
    return adata


def find_images(folder: Path, stem_pattern: str | None = None) -> list[Path]:
    """Image files directly in ``folder`` (optionally whose name matches a regex), sorted."""
    if not folder.is_dir():
        return []
    rx = re.compile(stem_pattern) if stem_pattern else None
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not p.name.startswith(".")
        and (rx is None or rx.fullmatch(p.stem))
    )


def patient_table(folder: Path) -> dict[str, str]:
    """Optional ``samples.tsv``/``samples.csv`` (columns sample_id, patient_id) -> {sample: patient}.

    Lets dataset-specific grouping (which sections come from one individual) live next to
    the data instead of being hard-coded in a reader.
    """
    for name, sep in (("samples.tsv", "\t"), ("samples.csv", ",")):
        path = folder / name
        if path.is_file():
            df = read_table(path, "sample table", sep=sep, dtype=str)
            df.columns = [str(c).strip() for c in df.columns]
            for col in ("sample_id", "patient_id"):
                if col not in df.columns:
                    raise InputError(f"sample table lacks column {col!r}", path)
            return {str(s).strip(): str(p).strip() for s, p in zip(df["sample_id"], df["patient_id"])}
    return {}


def write_sample_image(image, folder: Path, stem: str, fmt: str = "png") -> Path:
    """Copy a slide's image file into ``folder`` as ``stem.<ext>``, or save an in-memory image
    as ``fmt`` (``png``, or ``tif`` with zlib) when there is no file to copy."""
    import shutil

    from cmrcnet.data.image import ArrayImage

    if not isinstance(image, ArrayImage) and image.path.is_file():
        out = folder / f"{stem}{image.path.suffix.lower()}"
        shutil.copyfile(image.path, out)
        return out
    w, h = image.size
    pixels = image.read_region(0, 0, w, h)
    if fmt == "png":
        from PIL import Image

        out = folder / f"{stem}.png"
        Image.fromarray(pixels).save(out)
        return out
    import tifffile

    out = folder / f"{stem}.tif"
    tifffile.imwrite(out, pixels, photometric="rgb", compression="zlib")
    return out


def strip_gene_version(gene_id: str) -> str:
    """``ENSG00000141736.13`` -> ``ENSG00000141736``; other names unchanged."""
    return gene_id.split(".", 1)[0] if gene_id.startswith("ENS") else gene_id

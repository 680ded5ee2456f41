"""HEST-1k reader/writer and 10x Visium reader/writer: exact round trips and bad input."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cmrcnet.data.readers import attach_lowres, detect_format, list_sample_ids, read_dataset, read_sample
from cmrcnet.data.readers.hest import read_hest_patches, write_hest
from cmrcnet.data.readers.visium import write_visium
from cmrcnet.data.synthetic import make_synthetic_samples
from cmrcnet.errors import InputError


def assert_same(a, b, exact_pixel_size: bool = True) -> None:
    """Counts, barcodes, genes, coordinates and array positions identical."""
    assert (a.adata.X != b.adata.X).nnz == 0 and a.adata.X.shape == b.adata.X.shape
    assert np.issubdtype(b.adata.X.dtype, np.integer)
    assert list(a.adata.obs_names) == list(b.adata.obs_names)
    assert list(a.adata.var_names) == list(b.adata.var_names)
    assert np.array_equal(a.coords_px, b.coords_px)
    for col in ("array_row", "array_col"):
        assert np.array_equal(a.adata.obs[col].to_numpy(), b.adata.obs[col].to_numpy())
    if exact_pixel_size:
        assert a.um_per_px == b.um_per_px
    else:
        assert a.um_per_px == pytest.approx(b.um_per_px, rel=1e-15)


# -- HEST -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hest_c2(her2st_c2, tmp_path_factory) -> Path:
    return write_hest([her2st_c2], tmp_path_factory.mktemp("hest") / "her2st_hest")


def test_hest_roundtrip_her2st_c2(her2st_c2, hest_c2: Path) -> None:
    assert detect_format(hest_c2) == "hest" and list_sample_ids(hest_c2) == ["C2"]
    r = read_sample(hest_c2, "C2")
    assert_same(her2st_c2, r)
    assert (r.patient_id, r.dataset, r.platform, r.pixel_size_source) == ("C", "her2st", "legacy-st", "estimated")
    assert (r.spot_diameter_um, r.pitch_um) == (100.0, 200.0)
    assert r.image.size == her2st_c2.image.size
    # lossless image, read through the pyramidal TIFF
    assert np.array_equal(r.image.read_region(4000, 5000, 300, 200), her2st_c2.image.read_region(4000, 5000, 300, 200))
    her2st_c2.image.release()
    r.image.release()


def test_hest_files(hest_c2: Path) -> None:
    import tifffile

    md = json.loads((hest_c2 / "metadata" / "C2.json").read_text())
    assert md["st_technology"] == "Spatial Transcriptomics" and md["patient"] == "C"
    assert (md["fullres_width"], md["fullres_height"]) == (9274, 9911)
    assert md["spot_diameter"] == 100.0 and md["inter_spot_dist"] == 200.0
    assert md["cmrcnet_pixel_size_source"] == "estimated" and 0.68 < md["pixel_size_um_estimated"] < 0.7
    with tifffile.TiffFile(hest_c2 / "wsis" / "C2.tif") as tf:
        levels = tf.series[0].levels
        assert len(levels) >= 3 and levels[0].shape == (9911, 9274, 3)
        assert tf.pages[0].is_tiled and tf.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    a = ad.read_h5ad(hest_c2 / "st" / "C2.h5ad")
    assert a.obsm["spatial"].shape == (187, 2) and sp.issparse(a.X)


def test_hest_roundtrip_synthetic_with_patches(tmp_path: Path) -> None:
    samples = make_synthetic_samples(n_samples=2, n_spots=40, n_genes=12)
    dest = write_hest(samples, tmp_path / "hest", patches=True, patch_size_um=200.0, patch_size_px=16)
    back = read_dataset(dest)
    for s, r in zip(samples, back):
        assert_same(s, r)
        assert (r.patient_id, r.dataset, r.platform, r.pixel_size_source) == (s.patient_id, "synthetic", "legacy-st", "metadata")
        assert np.array_equal(r.adata.obs["program_0"].to_numpy(), s.adata.obs["program_0"].to_numpy())
        w, h = s.image.size
        assert np.array_equal(r.image.read_region(0, 0, w, h), s.image.read_region(0, 0, w, h))
        img, bc, coords = read_hest_patches(dest, s.sample_id)
        assert img.shape == (40, 16, 16, 3) and img.dtype == np.uint8
        assert bc == list(s.adata.obs_names)
        assert np.array_equal(coords, np.floor(s.coords_px - 10 + 0.5).astype(int))  # 200 um = 20 px side
        assert "patches_file" in r.meta


def test_synthetic_dir_fixture(synthetic_dir: Path) -> None:
    samples = read_dataset(synthetic_dir)
    assert len(samples) == 4 and {s.patient_id for s in samples} == {"P1", "P2"}


def _hest_copy(synthetic_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "hest"
    shutil.copytree(synthetic_dir, dest)
    return dest


def test_hest_xenium_controls_bytes_barcodes_and_estimated_pixel_size(synthetic_dir: Path, tmp_path: Path) -> None:
    root = _hest_copy(synthetic_dir, tmp_path)
    st = root / "st" / "SYN1.h5ad"
    a = ad.read_h5ad(st)
    names = list(a.var_names)
    names[:4] = ["BLANK_0001", "NegControlProbe_00042", "antisense_ABC", "UnassignedCodeword_0001"]
    a.var_names = names
    a.X = sp.csr_matrix(a.X.astype(np.float32))  # float storage of integer counts is accepted
    a.write_h5ad(st)
    md_path = root / "metadata" / "SYN1.json"
    md = json.loads(md_path.read_text())
    for k in ("pixel_size_um_estimated", "cmrcnet_platform", "cmrcnet_pixel_size_source"):
        md.pop(k)
    md["st_technology"] = "Xenium"
    md_path.write_text(json.dumps(md))
    (root / "patches").mkdir()
    with h5py.File(root / "patches" / "SYN1.h5", "w") as f:
        f["img"] = np.zeros((2, 4, 4, 3), np.uint8)
        f["barcode"] = np.array([[b"1x1"], [b"2x1"]])
        f["coords"] = np.zeros((2, 2), np.int64)
    r = read_sample(root, "SYN1")
    assert r.n_genes == 56 and not any(n.startswith(("BLANK", "NegControl", "antisense")) for n in r.adata.var_names)
    assert r.platform == "xenium" and np.issubdtype(r.adata.X.dtype, np.integer)
    assert r.pixel_size_source == "estimated" and r.um_per_px == pytest.approx(10.0, rel=1e-9)
    assert read_hest_patches(root, "SYN1")[1] == ["1x1", "2x1"]


@pytest.mark.parametrize("change", ["no_wsi", "negative", "fraction", "outside", "bad_json"])
def test_hest_bad_input(synthetic_dir: Path, tmp_path: Path, change: str) -> None:
    root = _hest_copy(synthetic_dir, tmp_path)
    st = root / "st" / "SYN2.h5ad"
    a = ad.read_h5ad(st)
    if change == "no_wsi":
        (root / "wsis" / "SYN2.tif").unlink()
        match = "whole-slide image for SYN2 not found"
    elif change == "negative":
        X = a.X.toarray()
        X[0, 0] = -1
        a.X = sp.csr_matrix(X)
        match = "negative"
    elif change == "fraction":
        a.X = sp.csr_matrix(a.X.toarray() * 0.5)
        match = "whole numbers"
    elif change == "outside":
        a.obsm["spatial"] = a.obsm["spatial"] + 5000.0
        match = "outside"
    else:
        (root / "metadata" / "SYN2.json").write_text("{not json")
        match = "not valid JSON"
    a.write_h5ad(st)
    with pytest.raises(InputError, match=match):
        read_sample(root, "SYN2")


# -- Visium ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def visium_samples():
    return make_synthetic_samples(n_samples=2, n_spots=60, n_genes=15, platform="visium", seed=5)


@pytest.mark.parametrize(("matrix", "positions"), [("h5", "csv"), ("mtx", "list")])
def test_visium_roundtrip(visium_samples, tmp_path: Path, matrix: str, positions: str) -> None:
    s = visium_samples[0]
    folder = write_visium(s, tmp_path / "V1", matrix=matrix, positions=positions)
    assert detect_format(folder) == "visium" and list_sample_ids(folder) == ["V1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # metadata and grid pixel sizes agree: no warning
        r = read_sample(folder, "V1")
    assert_same(s, r, exact_pixel_size=False)
    assert list(r.adata.var["gene_ids"]) == list(s.adata.var["gene_ids"])
    assert (r.platform, r.spot_diameter_um, r.pitch_um, r.pixel_size_source) == ("visium", 55.0, 100.0, "metadata")
    assert r.image.size == s.image.size and r.image.size[0] != r.image.size[1]  # x/y not swapped
    attach_lowres(r, max_side=64)
    assert r.adata.uns["spatial"]["V1"]["images"]["hires"].shape[1] == 64


def test_visium_her2st_c2_exact(her2st_c2, tmp_path: Path) -> None:
    folder = write_visium(her2st_c2, tmp_path / "C2", lowres=False)  # copies the JPEG: fast
    with pytest.warns(UserWarning, match="disagrees with the spot grid"):  # 200 um ST pitch read as Visium
        r = read_sample(folder, "C2")
    assert_same(her2st_c2, r, exact_pixel_size=False)


def test_visium_multi_sample_folder(visium_samples, tmp_path: Path) -> None:
    for s in visium_samples:
        write_visium(s, tmp_path / "ds" / s.sample_id / "outs", lowres=False)
    root = tmp_path / "ds"
    assert detect_format(root) == "visium"
    back = read_dataset(root)
    assert [b.sample_id for b in back] == ["SYN1", "SYN2"] and {b.dataset for b in back} == {"ds"}
    for s, b in zip(visium_samples, back):
        assert_same(s, b, exact_pixel_size=False)


def _edit_positions(folder: Path, fn) -> None:
    p = folder / "spatial" / "tissue_positions.csv"
    df = pd.read_csv(p, float_precision="round_trip")
    fn(df).to_csv(p, index=False, float_format="%.17g")


def test_visium_tissue_filter_and_mismatch(visium_samples, tmp_path: Path) -> None:
    folder = write_visium(visium_samples[0], tmp_path / "V", lowres=False)

    def edit(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[0, "in_tissue"] = 0  # in the matrix but not under tissue -> dropped, reported
        extra = df.iloc[[1, 2]].copy()
        extra["barcode"] = ["OFF-1", "NEW-1"]
        extra["in_tissue"] = [0, 1]  # off-tissue extra: silent; in-tissue but not in matrix: reported
        extra["array_row"] += 100
        return pd.concat([df, extra])

    _edit_positions(folder, edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = read_sample(folder, "V")
    msgs = " | ".join(str(w.message) for w in caught)
    assert r.n_spots == 59 and visium_samples[0].adata.obs_names[0] not in r.adata.obs_names
    assert "1 spot(s) in matrix filtered_feature_bc_matrix.h5" in msgs and "NEW-1" in msgs and "OFF-1" not in msgs


def test_visium_feature_types(visium_samples, tmp_path: Path) -> None:
    folder = write_visium(visium_samples[0], tmp_path / "V", lowres=False)
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "r+") as f:
        ft = f["matrix/features/feature_type"][:]
        ft[-2:] = b"Antibody Capture"
        del f["matrix/features/feature_type"]
        f["matrix/features/feature_type"] = ft
    r = read_sample(folder, "V")
    assert r.n_genes == 13


@pytest.mark.parametrize("change", ["no_scalefactors", "no_image", "dup_barcode", "no_overlap", "bad_h5"])
def test_visium_bad_input(visium_samples, tmp_path: Path, change: str) -> None:
    folder = write_visium(visium_samples[0], tmp_path / "V", lowres=False)
    if change == "no_scalefactors":
        (folder / "spatial" / "scalefactors_json.json").unlink()
        match = "scalefactors_json.json not found"
    elif change == "no_image":
        (folder / "SYN1_fullres.tif").unlink()
        match = "no full-resolution H&E image"
    elif change == "dup_barcode":
        _edit_positions(folder, lambda df: pd.concat([df, df.iloc[:1]]))
        match = "duplicate barcodes in tissue positions"
    elif change == "no_overlap":
        _edit_positions(folder, lambda df: df.assign(barcode="X" + df["barcode"]))
        match = "no in-tissue barcode"
    else:
        (folder / "filtered_feature_bc_matrix.h5").write_bytes(b"\x89HDF\r\n\x1a\ngarbage")
        match = "unreadable 10x HDF5"
    with pytest.raises(InputError, match=match):
        read_sample(folder, "V")

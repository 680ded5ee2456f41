"""Patches at a fixed physical size, streaming, and the HDF5 cache."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from cmrcnet.data import patches as P
from cmrcnet.data.image import PAD_VALUE, ArrayImage, SlideImage
from cmrcnet.data.sample import Sample
from cmrcnet.errors import InputError


def coord_image(h: int = 300, w: int = 400) -> np.ndarray:
    """R = x mod 256, G = y mod 256, B = 7: every pixel tells where it came from."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx % 256, yy % 256, np.full_like(xx, 7)], axis=-1).astype(np.uint8)


def smooth_image(h: int, w: int, scale: float = 1.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] / scale
    r = 128 + 100 * np.sin(xx / 9.0)
    g = 128 + 100 * np.cos(yy / 11.0)
    b = 128 + 60 * np.sin((xx + yy) / 13.0)
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def make_sample(image, coords, um_per_px: float = 0.5, sid: str = "S1") -> Sample:
    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    adata = ad.AnnData(
        X=sp.csr_matrix(np.ones((n, 3), dtype=np.int64)),
    )
    adata.obs_names = [f"bc{i:03d}" for i in range(n)]
    adata.var_names = ["A", "B", "C"]
    adata.obsm["spatial"] = coords
    img = image if isinstance(image, SlideImage) or image is None else ArrayImage(image)
    return Sample(sample_id=sid, adata=adata, image=img, um_per_px=um_per_px, spot_diameter_um=55.0)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CMRCNET_CACHE", str(tmp_path / "c"))
    assert P.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CMRCNET_CACHE")
    assert P.default_cache_dir() == Path.home() / ".cache" / "cmrcnet"


def test_exact_crop_without_resampling():
    # 16 um at 0.5 um/px = 32 px, output 32 px -> a pure crop centred on the spot
    s = make_sample(coord_image(), [[100, 50], [200.4, 120.6]])
    out = P.extract_patches(s, size_um=16, size_px=32)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    img = coord_image()
    np.testing.assert_array_equal(out[0], img[34:66, 84:116])
    np.testing.assert_array_equal(out[1], img[105:137, 184:216])  # 200.4-16 -> 184, 120.6-16 -> 105


def test_edge_spots_are_padded_not_dropped():
    s = make_sample(coord_image(), [[0, 0], [399, 299], [1000, 1000]])
    out = P.extract_patches(s, size_um=16, size_px=32)
    assert len(out) == 3
    assert (out[0, :16, :, :] == PAD_VALUE).all() and (out[0, :, :16, :] == PAD_VALUE).all()
    np.testing.assert_array_equal(out[0, 16:, 16:], coord_image()[:16, :16])
    assert (out[1, 17:, :, :] == PAD_VALUE).all()
    assert (out[2] == PAD_VALUE).all()


def test_order_follows_obs_names():
    img = coord_image()
    coords = [[50, 50], [150, 80], [250, 200]]
    a = P.extract_patches(make_sample(img, coords), 16, 32)
    b = P.extract_patches(make_sample(img, coords[::-1]), 16, 32)
    np.testing.assert_array_equal(a, b[::-1])


def test_fixed_physical_size_across_resolutions():
    # the same tissue scanned at 1 um/px and at 0.5 um/px gives (almost) the same patch
    lo = smooth_image(200, 200)
    hi = smooth_image(400, 400, scale=2.0)
    centres = np.array([[60.0, 80.0], [120.0, 100.0]])
    p_lo = P.extract_patches(make_sample(lo, centres, um_per_px=1.0), size_um=40, size_px=20)
    p_hi = P.extract_patches(make_sample(hi, centres * 2, um_per_px=0.5), size_um=40, size_px=20)
    diff = np.abs(p_lo.astype(int) - p_hi.astype(int)).mean()
    assert diff < 6, diff


def test_downscale_is_antialiased():
    # a 1-px checkerboard averages to grey instead of aliasing to black/white
    checker = ((np.indices((256, 256)).sum(0) % 2) * 255).astype(np.uint8)
    s = make_sample(np.stack([checker] * 3, -1), [[128, 128]])
    out = P.extract_patches(s, size_um=64, size_px=16)  # 128 px -> 16 px
    assert abs(out.mean() - 127.5) < 5 and out.std() < 10


def test_iter_patches_streams_batches():
    img = ArrayImage(smooth_image(300, 300))
    coords = np.random.default_rng(0).uniform(0, 300, size=(23, 2))
    chunks = list(P.iter_patches(img, coords, side_px=30.0, size_px=12, batch=10))
    assert [len(c) for c in chunks] == [10, 10, 3]
    s = make_sample(img, coords)
    full = P.extract_patches(s, size_um=15, size_px=12)
    np.testing.assert_array_equal(np.concatenate(chunks), full)


def test_bad_inputs():
    with pytest.raises(InputError, match="no H&E image"):
        P.extract_patches(make_sample(None, [[1, 1]]), 16, 32)
    with pytest.raises(InputError, match="NaN"):
        P.extract_patches(make_sample(coord_image(), [[np.nan, 1]]), 16, 32)
    with pytest.raises(InputError, match="pixel size"):
        P.extract_patches(make_sample(coord_image(), [[1, 1]], um_per_px=0), 16, 32)


def test_h5_roundtrip_hest_layout(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "p.h5"
    P.write_patch_h5(path, imgs, ["a", "b", "c", "d"], np.arange(8).reshape(4, 2), {"size_um": 4.0, "sample_id": "x"})
    with h5py.File(path) as f:
        assert f["img"].dtype == np.uint8 and f["img"].shape == (4, 8, 8, 3)
        assert f["barcode"].shape == (4, 1) and f["barcode"].dtype.kind == "S"
        assert f["coords"].shape == (4, 2) and f["coords"].dtype.kind == "i"
    store = P.read_patch_h5(path)
    np.testing.assert_array_equal(store.imgs, imgs)
    assert store.barcodes.tolist() == ["a", "b", "c", "d"]
    assert store.attrs["size_um"] == 4.0 and store.attrs["sample_id"] == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["p.h5"]  # no temp files left


def test_read_patch_h5_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        P.read_patch_h5(tmp_path / "nope.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="unreadable"):
        P.read_patch_h5(bad)


def test_cache_second_call_reads_file(tmp_path, monkeypatch):
    s = make_sample(coord_image(), [[100, 50], [0, 0], [300, 200]], sid="A/1")
    st = P.get_patch_store(s, size_um=16, size_px=32, cache_dir=tmp_path)
    assert st.path.parent == tmp_path / "patches"
    assert st.path.name.startswith("A_1_16um_32px_") and st.path.suffix == ".h5"
    assert st.imgs.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(st.coords, [[84, 34], [-16, -16], [284, 184]])
    assert st.attrs["um_per_px"] == 0.5 and st.attrs["size_px"] == 32

    def boom(*a, **k):
        raise AssertionError("extract_patches called on a cache hit")

    monkeypatch.setattr(P, "extract_patches", boom)
    again = P.get_patch_store(s, size_um=16, size_px=32, cache_dir=tmp_path)
    assert again.path == st.path
    np.testing.assert_array_equal(again.imgs, st.imgs)
    np.testing.assert_array_equal(again.coords, st.coords)
    assert again.barcodes.tolist() == list(s.adata.obs_names)

    # different coordinates or sizes -> a different key, so extraction is needed
    s.adata.obsm["spatial"] = s.adata.obsm["spatial"] + 1.0
    with pytest.raises(AssertionError, match="cache hit"):
        P.get_patch_store(s, size_um=16, size_px=32, cache_dir=tmp_path)


def test_cache_key_depends_on_inputs():
    img = coord_image()
    s = make_sample(img, [[10, 10], [20, 20]])
    k = P.cache_key(s, 16, 32)
    assert k == P.cache_key(make_sample(img.copy(), [[10, 10], [20, 20]]), 16, 32)
    assert k != P.cache_key(s, 16, 24)
    assert k != P.cache_key(s, 20, 32)
    img2 = img.copy()
    img2[0, 0, 0] ^= 1
    assert k != P.cache_key(make_sample(img2, [[10, 10], [20, 20]]), 16, 32)
    s2 = make_sample(img, [[10, 10], [20, 20]])
    s2.adata.obs_names = ["x", "y"]
    assert k != P.cache_key(s2, 16, 32)


def test_corrupt_cache_is_rebuilt(tmp_path):
    s = make_sample(coord_image(), [[100, 50]])
    path = P.cache_path(s, 16, 32, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="re-extracting"):
        st = P.get_patch_store(s, 16, 32, tmp_path)
    assert st.imgs.shape == (1, 32, 32, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.get_patch_store(s, 16, 32, tmp_path).imgs.shape == (1, 32, 32, 3)


def test_file_image_is_released_and_keyed_by_mtime(tmp_path):
    from PIL import Image

    jpg = tmp_path / "slide.png"
    Image.fromarray(smooth_image(120, 160)).save(jpg)
    image = SlideImage(jpg)
    s = make_sample(image, [[40, 40], [100, 60]])
    k1 = P.cache_key(s, 20, 16)
    st = P.get_patch_store(s, 20, 16, tmp_path / "cache")
    assert image._reader_obj is None  # decoded slide released after extraction
    assert st.imgs.shape == (2, 16, 16, 3) and st.imgs.std() > 0
    os.utime(jpg, ns=(1, 1))
    assert P.cache_key(s, 20, 16) != k1


@pytest.mark.realdata
def test_real_her2st_jpeg(tmp_path):
    root = Path(os.environ.get("CMRCNET_DATA_DIR", "/work/shared/data"))
    jpg = root / "her2st" / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg"
    if not jpg.is_file():
        pytest.skip(f"{jpg} not available")
    image = SlideImage(jpg)
    w, h = image.size
    coords = [[w / 2, h / 2], [w / 3, h / 2], [10, 10], [w - 5, h - 5]]
    s = make_sample(image, coords, um_per_px=0.5)
    st = P.get_patch_store(s, size_um=112, size_px=56, cache_dir=tmp_path)
    assert st.imgs.shape == (4, 56, 56, 3) and st.imgs.dtype == np.uint8
    assert (st.imgs[2, :20, :20] == PAD_VALUE).all()  # top-left corner is outside the slide
    assert image._reader_obj is None

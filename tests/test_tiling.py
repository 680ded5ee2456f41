"""Slides without a spot table: tissue detection, pseudo-spot grid, streamed prediction, maps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmrcnet.tiling import grid_sample, tissue_mask


def _slide(path: Path, size: int = 400) -> Path:
    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), 245, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    blob = (xx - size * 0.4) ** 2 + (yy - size * 0.5) ** 2 < (size * 0.25) ** 2
    img[blob] = (rng.normal(0, 15, (blob.sum(), 3)) + [150, 60, 160]).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


def test_tissue_mask_finds_the_stained_blob(tmp_path):
    arr = np.asarray(Image.open(_slide(tmp_path / "s.png")))
    mask = tissue_mask(arr)
    assert 0.15 < mask.mean() < 0.25  # blob area = pi * 0.25^2 ~ 0.196
    assert mask[200, 160] and not mask[20, 380]


def _slide_with_pink_background(path: Path, size: int = 400) -> Path:
    """Tissue (pink with dark purple nuclei) on the left, a large pink region WITHOUT nuclei (eosin
    on the glass / mounting medium) on the right, white glass around both."""
    rng = np.random.default_rng(1)
    img = np.full((size, size, 3), 245, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    tissue = (xx - size * 0.3) ** 2 + (yy - size * 0.5) ** 2 < (size * 0.2) ** 2
    pink = (np.abs(xx - size * 0.72) < size * 0.18) & (np.abs(yy - size * 0.5) < size * 0.3)
    img[tissue | pink] = (rng.normal(0, 6, ((tissue | pink).sum(), 3)) + [235, 150, 190]).clip(0, 255).astype(np.uint8)
    nuclei = tissue & (rng.random(tissue.shape) < 0.08)
    nuclei = np.asarray(Image.fromarray(nuclei.astype(np.uint8) * 255).filter(__import__("PIL.ImageFilter").ImageFilter.MaxFilter(3))) > 0
    img[nuclei & tissue] = [70, 40, 120]
    Image.fromarray(img).save(path)
    return path


def test_tissue_mask_excludes_pink_background_without_nuclei(tmp_path):
    """Issue 16: stain-only (eosin, nuclei-free) background is not tissue; the old saturation-only
    mask took it in."""
    from cmrcnet.tiling import hematoxylin_od

    arr = np.asarray(Image.open(_slide_with_pink_background(tmp_path / "p.png")))
    assert hematoxylin_od(np.array([[[70, 40, 120]]], np.uint8))[0, 0] > 0.5  # nuclei: hematoxylin
    assert hematoxylin_od(np.array([[[235, 150, 190]]], np.uint8))[0, 0] < 0.02  # eosin only
    mask = tissue_mask(arr, px_um=5.0)  # 400 px = 2 mm: the nuclei window is 40 px
    yy, xx = np.mgrid[: arr.shape[0], : arr.shape[1]]
    tissue = (xx - 120) ** 2 + (yy - 200) ** 2 < 75**2  # well inside the tissue disc
    pink = (np.abs(xx - 288) < 60) & (np.abs(yy - 200) < 110)  # well inside the pink region
    assert mask[tissue].mean() > 0.95
    assert mask[pink].mean() < 0.02
    smp = grid_sample(tmp_path / "p.png", um_per_px=5.0, pitch_um=100.0, sample_id="slide-A")
    assert smp.sample_id == "slide-A" and (smp.coords_px[:, 0] < 220).all()  # no pseudo-spot on the pink region


def test_real_sections_keep_their_spots_under_tissue(mob_dir):
    """On the mob sections the mask keeps the spots the authors marked under tissue and drops
    the others (their alignment tables' `selected`)."""
    import pandas as pd

    from cmrcnet.data.image import SlideImage

    for k in (1, 2):
        image = SlideImage(mob_dir / f"MOB{k}.jpg")
        thumb, scale = image.thumbnail(2048)
        mask = tissue_mask(thumb, px_um=6.18 / scale)
        spots = pd.read_csv(mob_dir / f"alignment_table_MOB{k}.tsv", sep="\t")
        on = mask[(spots["pixel_y"] * scale).astype(int).clip(0, mask.shape[0] - 1),
                  (spots["pixel_x"] * scale).astype(int).clip(0, mask.shape[1] - 1)]
        sel = spots["selected"].to_numpy() == 1
        assert on[sel].mean() > 0.85 and on[~sel].mean() < 0.01


def test_grid_covers_tissue_only(tmp_path):
    smp = grid_sample(_slide(tmp_path / "s.png"), um_per_px=1.0, pitch_um=20.0)
    xy = smp.coords_px
    assert 50 < smp.n_spots < 120  # 400 grid points at a 20 px pitch, ~20% on tissue
    d = np.hypot(xy[:, 0] - 160, xy[:, 1] - 200)
    assert (d < 110).all()


def test_blank_slide_is_an_error(tmp_path):
    from cmrcnet.errors import InputError

    p = tmp_path / "blank.png"
    Image.fromarray(np.full((100, 100, 3), 250, np.uint8)).save(p)
    with pytest.raises(InputError, match="no tissue"):
        grid_sample(p, um_per_px=1.0)


@pytest.mark.slow
def test_predict_image_grid_cli(tmp_path):
    from cmrcnet.config import make_config
    from cmrcnet.data.synthetic import make_synthetic_dataset
    from cmrcnet.training import load_samples, train

    ds = make_synthetic_dataset(tmp_path / "ds", n_samples=2, n_patients=2, seed=1)
    cfg = make_config("cmrcnet", "tiny", {"data.path": str(ds), "data.cache_dir": str(tmp_path / "c"), "train.epochs": 1})
    samples = load_samples(cfg)
    run = train(cfg, tmp_path / "run", [samples[-1].sample_id], samples=samples)
    gene = (run / "genes.txt").read_text().split()[0]
    slide = _slide(tmp_path / "slide.png")
    out = tmp_path / "grid.h5ad"
    r = subprocess.run(
        [sys.executable, "-m", "cmrcnet", "predict", "--run", str(run), "--image", str(slide), "--um-per-px", "1.0",
         "--pitch-um", "20", "--out", str(out), "--genes", gene],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    import anndata as ad

    pred = ad.read_h5ad(out)
    assert pred.n_obs > 50 and "observed" not in pred.layers and "uncertainty" in pred.layers
    assert out.with_suffix(".maps.png").is_file()


@pytest.mark.parametrize("method", [pytest.param("cmrcnet", marks=pytest.mark.slow), "ridge"])
def test_streamed_h5ad_equals_in_memory_prediction(tmp_path, method):
    """Whole-slide output is written block by block (bounded memory); the file must hold
    exactly what the in-memory path returns, chunk boundaries included."""
    import anndata as ad

    from cmrcnet.config import make_config
    from cmrcnet.data.synthetic import make_synthetic_dataset
    from cmrcnet.training import load_run, load_samples, predict_streaming, train

    ds = make_synthetic_dataset(tmp_path / "ds", n_samples=2, n_patients=2, seed=1)
    cfg = make_config(method, "tiny", {"data.path": str(ds), "data.cache_dir": str(tmp_path / "c"), "train.epochs": 1})
    samples = load_samples(cfg)
    run = load_run(train(cfg, tmp_path / "run", [samples[-1].sample_id], samples=samples))
    smp = grid_sample(_slide(tmp_path / "slide.png"), um_per_px=1.0, pitch_um=20.0)
    mem = predict_streaming(run, smp, batch_size=7, chunk_spots=10)
    out = tmp_path / "grid.h5ad"
    disk = predict_streaming(run, smp, batch_size=7, chunk_spots=10, out=out)
    assert disk.isbacked and out.is_file() and not list(tmp_path.glob("*.tmp*"))
    np.testing.assert_allclose(np.asarray(disk.X[:]), mem.X, rtol=1e-5, atol=1e-6)
    back = ad.read_h5ad(out)  # a plain h5ad for scanpy/squidpy
    np.testing.assert_array_equal(back.layers["predicted"], back.X)
    if method == "cmrcnet":
        np.testing.assert_allclose(back.layers["uncertainty"], mem.layers["uncertainty"], rtol=1e-5, atol=1e-6)
    else:  # regression: no uncertainty, stated as NaN (in memory and on disk alike)
        assert np.isnan(back.layers["uncertainty"]).all() and np.isnan(mem.layers["uncertainty"]).all()
        assert "NaN" in back.uns["cmrcnet"]["uncertainty"] and "NaN" in mem.uns["cmrcnet"]["uncertainty"]
    assert back.shape == mem.shape and list(back.obs_names) == list(mem.obs_names)
    np.testing.assert_allclose(back.obsm["spatial"], mem.obsm["spatial"])
    assert back.uns["cmrcnet"]["method"] == method

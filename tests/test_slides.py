"""Scanner slides (issue 14): pixel size from metadata, pyramid levels, cohorts that resume,
SpatialData output, training on every sample, the Python API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cmrcnet.data.image import SlideImage
from cmrcnet.data.synthetic import make_synthetic_samples, write_slide

from test_bad_input_cli import one_error_line, run_cli


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny ridge run trained on every sample of a synthetic HEST folder (no --test)."""
    from cmrcnet.data.readers.hest import write_hest

    root = tmp_path_factory.mktemp("slides")
    data = write_hest(make_synthetic_samples(n_samples=2, n_patients=2, n_spots=40, n_genes=20), root / "hest")
    os.environ.setdefault("CMRCNET_CACHE", str(root / "cache"))
    from cmrcnet.cli import main

    try:
        main(["train", "--data", str(data), "--method", "ridge", "--preset", "tiny", "--out", str(root / "run"),
              "--set", f"data.cache_dir={root / 'cache'}"])
    except SystemExit as e:
        assert not e.code
    return root / "run", data


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    """A 5000 x 4000 px procedural slide (3 levels) in each layout, 0.25 um/px where stored."""
    root = tmp_path_factory.mktemp("slidefiles")
    names = {"generic": "generic.tif", "svs": "aperio.svs", "ome": "section.ome.tif", "none": "nopixelsize.tif"}
    return {k: write_slide(root / v, size=(5000, 4000), um_per_px=0.25, layout=k) for k, v in names.items()}


# -- reading: pixel size, reader, pyramid level -------------------------------------------------------
@pytest.mark.parametrize(("layout", "reader", "source"), [
    ("generic", "openslide", "openslide.mpp-x (generic-tiff)"),  # from the TIFF resolution tags (cm)
    ("svs", "openslide", "openslide.mpp-x (aperio)"),  # from "MPP = 0.25" in the ImageDescription
    ("ome", "tifffile", "OME PhysicalSizeX"),  # SubIFD pyramid: tifffile reads it
])
def test_slide_pixel_size_and_levels_from_the_file(slides, layout, reader, source) -> None:
    s = SlideImage(slides[layout])
    ps = s.pixel_size()
    assert ps is not None and ps.um_per_px == pytest.approx(0.25) and ps.source == source
    assert s.reader == reader and s.size == (5000, 4000)
    assert s.level_downsamples == pytest.approx([1.0, 2.0, 4.0])
    # a 112 um patch at 112 px is 1 um/px = 4x: read from level 2, not level 0
    assert s.best_level(448 / 112) == 2 and s.best_level(448 / 224) == 1 and s.best_level(0.5) == 0
    from_level = s.read_patch(2000, 1500, 448, 112).astype(float)
    from_full = SlideImage(slides[layout]).read_region(2000, 1500, 448, 448)
    from cmrcnet.data.image import resample

    ref = resample(from_full, 112).astype(float)
    assert np.abs(from_level - ref).mean() < 12  # same tissue; the level is the scanner's own downsample


def test_patches_come_from_the_level_the_run_needs(slides, monkeypatch) -> None:
    """Bounded reads: a patch never decodes the level-0 square when a coarser level serves."""
    s = SlideImage(slides["generic"])
    levels = []
    original = s._reader.read
    monkeypatch.setattr(s._reader, "read", lambda level, *a: levels.append(level) or original(level, *a))
    s.read_patch(100, 100, 448, 112)
    s.thumbnail(1024)
    assert levels == [2, 2]


def test_slide_without_pixel_size_is_one_line(slides, run_and_data, tmp_path, capsys) -> None:
    run, _ = run_and_data
    assert SlideImage(slides["none"]).pixel_size() is None
    code, _, err = run_cli(["predict", "--run", run, "--image", slides["none"], "--out", tmp_path / "x.h5ad"], capsys)
    one_error_line(code, err, "nopixelsize.tif", "stores no pixel size", "--um-per-px")
    assert not list(tmp_path.iterdir())
    code, out, err = run_cli(["predict", "--run", run, "--image", slides["none"], "--um-per-px", "0.25",
                              "--out", tmp_path / "x.h5ad"], capsys)
    assert code == 0, err
    assert ad.read_h5ad(tmp_path / "x.h5ad").uns["cmrcnet"]["pixel_size_source"] == "user"


def test_default_72_dpi_is_not_taken_for_a_pixel_size(tmp_path) -> None:
    import tifffile

    p = tmp_path / "export.tif"
    tifffile.imwrite(p, np.full((64, 64, 3), 200, np.uint8), resolution=(72, 72), resolutionunit="INCH")
    with pytest.warns(UserWarning, match="352.8 um/px, not a microscope"):
        assert SlideImage(p).pixel_size() is None
    tifffile.imwrite(p, np.full((64, 64, 3), 200, np.uint8), resolution=(20000, 20000), resolutionunit="CENTIMETER")
    assert SlideImage(p).pixel_size().um_per_px == pytest.approx(0.5)


def test_um_per_px_overrides_the_metadata(slides, run_and_data, tmp_path, capsys) -> None:
    run, _ = run_and_data
    code, _, err = run_cli(["predict", "--run", run, "--image", slides["svs"], "--um-per-px", "0.5",
                            "--out", tmp_path / "x.h5ad"], capsys)
    assert code == 0, err
    meta = ad.read_h5ad(tmp_path / "x.h5ad").uns["cmrcnet"]
    assert meta["um_per_px"] == 0.5 and meta["pixel_size_source"] == "user"
    assert meta["slide"]["um_per_px_metadata"] == pytest.approx(0.25) and meta["slide"]["reader"] == "openslide"


# -- training on every sample ---------------------------------------------------------------------------
def test_train_without_test_fits_on_every_sample(run_and_data) -> None:
    import json

    run, data = run_and_data
    info = json.loads((run / "run.json").read_text())
    split = json.loads((run / "split.json").read_text())
    assert info["test_ids"] == [] and sorted(info["train_ids"]) == ["SYN1", "SYN2"]
    assert split["fold"]["test"] == [] and sum(len(v) for v in split["val_spots"].values()) > 0


@pytest.mark.parametrize("value", ["none", "None"])
def test_test_none_is_every_sample(value) -> None:
    from cmrcnet.tl import _test_ids

    assert _test_ids(value) == [] and _test_ids(None) == [] and _test_ids("A, B") == ["A", "B"]


# -- cohorts ------------------------------------------------------------------------------------------
def test_cohort_from_files_folder_and_csv(slides, run_and_data, tmp_path, capsys) -> None:
    run, _ = run_and_data
    folder = tmp_path / "slides"
    folder.mkdir()
    for k in ("generic", "svs"):
        (folder / slides[k].name).symlink_to(slides[k])
    csv = tmp_path / "list.csv"
    pd.DataFrame({"image": [str(slides["ome"]), str(slides["none"])], "sample_id": ["S-ome", "S-none"],
                  "um_per_px": [None, 0.25]}).to_csv(csv, index=False)
    out = tmp_path / "pred"
    code, stdout, err = run_cli(["predict", "--run", run, "--image", folder, csv, "--out", out], capsys)
    assert code == 0, err
    summary = pd.read_csv(out / "cohort.csv")
    assert list(summary["sample_id"]) == ["aperio", "generic", "S-ome", "S-none"]
    assert list(summary["pixel_size_source"]) == ["openslide.mpp-x (aperio)", "openslide.mpp-x (generic-tiff)",
                                                  "OME PhysicalSizeX", "user"]
    assert (summary["status"] == "predicted").all() and (summary["spots"] > 0).all()
    for _, r in summary.iterrows():
        a = ad.read_h5ad(r["output"])
        assert a.n_obs == r["spots"] and a.uns["cmrcnet"]["sample_id"] == r["sample_id"]
    assert "aperio.svs" in stdout and "cohort.csv" in stdout  # the summary table


def test_cohort_with_duplicate_ids_fails_before_work(slides, run_and_data, tmp_path, capsys) -> None:
    run, _ = run_and_data
    other = tmp_path / "b" / "generic.tif"
    other.parent.mkdir()
    other.symlink_to(slides["generic"])
    code, _, err = run_cli(["predict", "--run", run, "--image", slides["generic"], other, "--out", tmp_path / "o"], capsys)
    one_error_line(code, err, "two slides have the id 'generic'")
    assert not (tmp_path / "o").exists()


def test_cohort_checks_every_slide_before_predicting(slides, run_and_data, tmp_path, capsys) -> None:
    run, _ = run_and_data
    out = tmp_path / "o"
    code, _, err = run_cli(["predict", "--run", run, "--image", slides["generic"], slides["none"], "--out", out], capsys)
    one_error_line(code, err, "nopixelsize.tif", "stores no pixel size")
    assert not list(out.glob("*.h5ad"))  # the first, good slide was not predicted either


@pytest.mark.slow
def test_cohort_killed_midway_resumes(run_and_data, tmp_path) -> None:
    """Three slides; the run is killed (SIGKILL: no cleanup at all) once the first output exists.
    Nothing half-written is left under an output name, and a re-run predicts only the rest."""
    run, _ = run_and_data
    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(3):
        write_slide(folder / f"S{i}.tif", size=(6000, 6000), um_per_px=0.25, seed=i)
    out = tmp_path / "pred"
    cmd = [sys.executable, "-m", "cmrcnet", "predict", "--run", str(run), "--image", str(folder), "--out", str(out),
           "--pitch-um", "25"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("S*.h5ad")) and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    finished = sorted(p.name for p in out.glob("S*.h5ad"))
    assert 1 <= len(finished) < 3, f"kill came too late or too early: {finished}"
    for name in finished:
        ad.read_h5ad(out / name)  # complete files only
    before = {n: (out / n).stat().st_mtime_ns for n in finished}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = pd.read_csv(out / "cohort.csv")
    status = dict(zip(summary["sample_id"], summary["status"]))
    assert all(status[Path(n).stem] == "done earlier" for n in finished)
    assert sum(v == "predicted" for v in status.values()) == 3 - len(finished)
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == before  # not redone
    assert sorted(p.name for p in out.glob("S*.h5ad")) == ["S0.h5ad", "S1.h5ad", "S2.h5ad"]
    for i in range(3):
        assert ad.read_h5ad(out / f"S{i}.h5ad").n_obs == summary["spots"][i] > 1000


# -- SpatialData -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_spatialdata_store_opens_and_plots(slides, run_and_data, tmp_path, capsys) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import spatialdata as sd
    import spatialdata_plot  # noqa: F401 - registers .pl

    run, _ = run_and_data
    store = tmp_path / "slide.zarr"
    code, _, err = run_cli(["predict", "--run", run, "--image", slides["svs"], "--out", store], capsys)
    assert code == 0, err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = sd.read_zarr(store)
    table = sdata.tables["table"]
    h5 = tmp_path / "slide.h5ad"
    code, _, err = run_cli(["predict", "--run", run, "--image", slides["svs"], "--out", h5], capsys)
    ref = ad.read_h5ad(h5)
    np.testing.assert_allclose(table.layers["predicted"], ref.layers["predicted"], rtol=1e-6)
    assert "uncertainty" in table.layers and table.uns["spatialdata_attrs"]["region"] == "spots"
    circles = sdata.shapes["spots"]
    assert len(circles) == table.n_obs and (circles.geometry.geom_type == "Point").all()
    np.testing.assert_allclose(np.c_[circles.geometry.x, circles.geometry.y], ref.obsm["spatial"])
    img = sdata.images["he"]
    level0 = img["scale0"]["image"] if hasattr(img, "children") else img
    assert level0.shape[0] == 3 and max(level0.shape[1:]) <= 4096
    # the image's transform maps it onto the slide's full-resolution pixels
    from spatialdata.transformations import get_transformation

    t = get_transformation(img, to_coordinate_system="global")
    corner = t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")) @ np.array([level0.shape[2], level0.shape[1], 1])
    assert corner[0] == pytest.approx(5000, rel=0.01) and corner[1] == pytest.approx(4000, rel=0.01)
    gene = table.var_names[0]
    fig, ax = plt.subplots()
    sdata.pl.render_images("he").pl.render_shapes("spots", color=gene, table_name="table").pl.show(ax=ax)
    assert ax.images and ax.collections  # the H&E and the coloured spots were drawn
    plt.close(fig)
    assert not list(tmp_path.glob(".*tmp*"))


def test_sample_prediction_as_spatialdata(run_and_data, tmp_path, capsys) -> None:
    run, data = run_and_data
    code, _, err = run_cli(["predict", "--run", run, "--sample", data, "--sample-id", "SYN1", "--out",
                            tmp_path / "s.zarr"], capsys)
    assert code == 0, err
    import spatialdata as sd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = sd.read_zarr(tmp_path / "s.zarr").tables["table"]
    assert "observed" in t.layers and t.n_obs == 40


# -- the Python API ----------------------------------------------------------------------------------
def test_python_api_round_trip(slides, run_and_data, tmp_path) -> None:
    import cmrcnet as cn

    run, data = run_and_data
    trained = cn.tl.load(run)
    a = cn.tl.predict(trained, sample=cn.read_sample(data, "SYN1"), progress=False)
    per_gene, summary = cn.tl.score(a)
    assert {"set", "mean_pcc"} <= set(summary.columns) and len(per_gene) == a.n_vars
    g = cn.tl.predict(trained, image=slides["ome"], progress=False)
    assert g.uns["cmrcnet"]["pixel_size_source"] == "OME PhysicalSizeX" and "observed" not in g.layers
    with pytest.raises(cn.errors.InputError, match="layers\\['observed'\\]"):
        cn.tl.score(g)
    fig = cn.pl.spatial(a, genes=[a.var_names[0]], out=tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0 and fig.axes


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.timeout(1800)  # ~2 min idle (features of six sections cached once); generous for loaded machines
def test_readme_python_example_runs_as_written(her2st_dir, tmp_path, monkeypatch) -> None:
    """Issue 14's 'done when': the README's Python API example, unchanged, in a folder holding
    ``data/her2st`` (the real six sections) and ``slides/`` (pyramidal slides written here, pixel
    size in their metadata): a final model on all six sections predicts them."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "her2st").symlink_to(her2st_dir)
    (tmp_path / "slides").mkdir()
    write_slide(tmp_path / "slides" / "S1.svs", size=(8000, 6000), um_per_px=0.5, layout="svs")
    write_slide(tmp_path / "slides" / "S2.ome.tif", size=(6000, 6000), um_per_px=0.5, layout="ome", seed=1)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "import cmrcnet as cn" in b)
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    run, adata, summary = ns["run"], ns["adata"], ns["summary"]
    assert sorted(run.info["train_ids"]) == ["B4", "C2", "C3", "C4", "C5", "C6"] and run.info["test_ids"] == []
    assert {"ERBB2", "GATA3"} <= set(run.markers) <= set(run.genes)  # her2st's markers, from its manifest
    assert adata.uns["cmrcnet"]["pixel_size_source"] == "openslide.mpp-x (aperio)" and adata.n_obs > 500
    assert (tmp_path / "S1_maps.png").is_file() and (tmp_path / "S1.h5ad").is_file() and (tmp_path / "S1.zarr").is_dir()
    assert list(summary["sample_id"]) == ["S1", "S2"] and (summary["spots"] > 0).all()


# -- reading ahead of the model ---------------------------------------------------------------------
def test_read_ahead_keeps_order_and_raises_the_producers_error() -> None:
    from cmrcnet.training.predict import read_ahead

    assert list(read_ahead(iter(range(100)), depth=2)) == list(range(100))

    def broken():
        yield 1
        raise ValueError("bad tile")

    got = []
    with pytest.raises(ValueError, match="bad tile"):
        for x in read_ahead(broken()):
            got.append(x)
    assert got == [1]
    it = read_ahead(iter(range(10**6)), depth=2)  # stopping early stops the thread
    assert next(it) == 0
    it.close()


def test_prefetched_prediction_equals_the_plain_one(slides, run_and_data) -> None:
    import cmrcnet as cn
    from cmrcnet.tiling import grid_sample
    from cmrcnet.training.predict import predict_streaming

    run = cn.tl.load(run_and_data[0])
    a = predict_streaming(run, grid_sample(slides["generic"]), prefetch=0, batch_size=16)
    b = predict_streaming(run, grid_sample(slides["generic"]), prefetch=2, batch_size=16)
    np.testing.assert_array_equal(a.X, b.X)


def test_large_levels_are_read_in_strips(slides) -> None:
    """A level over the one-piece limit is read and resized in strips: the same picture, bounded memory."""
    s = SlideImage(slides["generic"])
    whole = s.read_level(0, max_pixels=10**9, out_wh=(1000, 800)).astype(float)
    strips = s.read_level(0, max_pixels=5000 * 300, out_wh=(1000, 800)).astype(float)
    assert strips.shape == whole.shape == (800, 1000, 3)
    assert np.abs(strips - whole).mean() < 3


def test_bad_cohort_inputs_are_one_line(slides, run_and_data, tmp_path, capsys) -> None:
    run, _ = run_and_data
    bad_col = tmp_path / "cols.csv"
    pd.DataFrame({"file": [str(slides["svs"])]}).to_csv(bad_col, index=False)
    bad_um = tmp_path / "um.csv"
    pd.DataFrame({"image": [str(slides["svs"])], "um_per_px": [-1]}).to_csv(bad_um, index=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, needles in (
        (["--image", bad_col], ("cols.csv", "needs a column 'image'")),
        (["--image", bad_um], ("um.csv", "row 2", "um_per_px must be a positive number")),
        (["--image", empty], ("empty", "no slide files")),
        (["--image", tmp_path / "missing.svs"], ("missing.svs", "image file not found")),
        (["--image", slides["svs"], "--format", "parquet"], ("--format must be one of h5ad, spatialdata",)),
    ):
        code, _, err = run_cli(["predict", "--run", run, *args, "--out", tmp_path / "o"], capsys)
        one_error_line(code, err, *needles)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())

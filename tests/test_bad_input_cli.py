"""Issue 16, as a user would meet it: broken copies of the data through the CLI.

One test (parametrised where it can be) per row of the issue's table; each asserts a
non-zero exit, one ``error:`` line naming the file or option and the problem, no traceback,
and nothing half-written left behind.

| row | tests |
|---|---|
| multi-sample folder, one sample lacks a file | test_multi_sample_folder_missing_file_fails_naming_sample, test_skip_bad_samples_goes_on_with_a_warning_per_sample |
| single Visium folder without tissue_positions | test_single_visium_folder_without_tissue_positions |
| HEST metadata JSON missing | test_hest_metadata_missing_is_named |
| Visium full-res image missing | test_visium_fullres_image_missing_names_no_python_argument |
| HEST truncated TIFF | test_hest_truncated_tiff_fails_info_and_train, test_damaged_tiff_region_is_an_input_error |
| a sample with one spot | test_sample_with_one_spot_is_a_clear_error |
| all-zero counts | test_all_zero_counts_is_a_clear_error, test_low_gene_overlap_warns_with_numbers |
| predict --genes unknown / case | test_predict_unknown_gene_fails_before_predicting, test_predict_gene_in_other_case_is_matched |
| unwritable --out | test_unwritable_out_fails_before_work |
| --um-per-px nan/inf, --pitch-um 0 | test_bad_grid_numbers_are_one_line |
| --um-per-px 500 | test_huge_grid_is_refused_with_its_size, test_interrupted_whole_slide_prediction_leaves_no_temp_file (slow) |
| --set train.epochs=abc | tests/test_config_checks.py |
| whole-slide output | test_whole_slide_output_keeps_the_contract, tests/test_tiling.py::test_tissue_mask_excludes_pink_background_without_nuclei |
| squidpy | test_scanpy_plots_sample_and_whole_slide_predictions, test_squidpy_plots_sample_and_whole_slide_predictions (slow) |
| report | tests/test_report_honesty.py |
| progress | test_progress_lines_off_a_terminal, test_training_epochs_logged_off_a_terminal, test_warning_printed_once |
| CLI | test_version, test_every_option_has_help, test_tables_not_truncated_when_piped, tests/test_report_honesty.py::test_report_finds_prediction_files_by_content_not_name |
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cmrcnet.data.readers.hest import write_hest
from cmrcnet.data.readers.visium import write_visium
from cmrcnet.data.synthetic import make_synthetic_samples


# -- helpers --------------------------------------------------------------------------------------
def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``cmrcnet ARGS`` in this process: (exit code, stdout, stderr)."""
    from cmrcnet.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str, *needles: str) -> str:
    """Assert a failed command printed exactly one ``error:`` line holding ``needles``, no traceback."""
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def _hest(root: Path, n_samples: int = 3, n_spots: int = 30, **kw) -> Path:
    return write_hest(make_synthetic_samples(n_samples=n_samples, n_patients=n_samples, n_spots=n_spots,
                                             n_genes=20, **kw), root)


def _visium(root: Path, n: int = 2) -> Path:
    for s in make_synthetic_samples(n_samples=n, n_spots=30, n_genes=12, platform="visium", seed=5):
        write_visium(s, root / s.sample_id, lowres=False)
    return root


def _mob_copy(mob_dir: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    dest.mkdir(parents=True)
    for f in mob_dir.iterdir():
        if f.name not in drop:
            (dest / f.name).symlink_to(f)
    return dest


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny ridge run (seconds) and the synthetic HEST folder it was trained on."""
    from cmrcnet.config import make_config
    from cmrcnet.training import train

    root = tmp_path_factory.mktemp("run")
    data = _hest(root / "hest", n_samples=2, n_spots=40)
    cfg = make_config("ridge", "tiny", {"data.path": str(data), "data.cache_dir": str(root / "cache")})
    run = train(cfg, root / "run", ["SYN2"])
    return run, data


# -- multi-sample folders ----------------------------------------------------------------------------
def _break(kind: str, tmp_path: Path, mob_dir: Path | None) -> tuple[Path, str, str]:
    """A multi-sample folder with one sample missing a file: (folder, sample id, file name)."""
    if kind == "legacy-st-spot-table":
        return _mob_copy(mob_dir, tmp_path / "mob", drop=("alignment_table_MOB2.tsv",)), "MOB2", "alignment_table_MOB2.tsv"
    if kind == "hest-st-h5ad":
        root = _hest(tmp_path / "hest")
        (root / "st" / "SYN2.h5ad").unlink()
        return root, "SYN2", "st/SYN2.h5ad"
    root = _visium(tmp_path / "vis")
    (root / "SYN2" / "spatial" / "tissue_positions.csv").unlink()
    return root, "SYN2", "tissue_positions"


KINDS = ["legacy-st-spot-table", "hest-st-h5ad", "visium-tissue-positions"]


@pytest.fixture
def maybe_mob(request):
    return request.getfixturevalue("mob_dir") if "legacy" in request.node.callspec.params.get("kind", "") else None


@pytest.mark.parametrize("command", ["data info", "train"])
@pytest.mark.parametrize("kind", KINDS)
def test_multi_sample_folder_missing_file_fails_naming_sample(kind, command, tmp_path, capsys, maybe_mob) -> None:
    folder, sid, fname = _break(kind, tmp_path, maybe_mob)
    args = ["data", "info", folder] if command == "data info" else \
        ["train", "--data", folder, "--test", "MOB1" if sid == "MOB2" else "SYN1", "--method", "ridge",
         "--preset", "tiny", "--out", tmp_path / "run"]
    code, _, err = run_cli(args, capsys)
    line = one_error_line(code, err, sid, fname, "--skip-bad-samples")
    assert "not found" in line


@pytest.mark.parametrize("kind", KINDS)
def test_skip_bad_samples_goes_on_with_a_warning_per_sample(kind, tmp_path, capsys, maybe_mob) -> None:
    from cmrcnet.config import make_config
    from cmrcnet.training import load_samples

    folder, sid, fname = _break(kind, tmp_path, maybe_mob)
    code, out, err = run_cli(["data", "info", folder, "--skip-bad-samples"], capsys)
    assert code == 0, err
    skips = [ln for ln in err.splitlines() if ln.startswith("warning: skipping sample")]
    assert len(skips) == 1 and sid in skips[0] and fname in skips[0]
    assert f" {sid} " not in out
    cfg = make_config("ridge", "tiny", {"data.path": str(folder), "data.skip_bad_samples": "true"})
    with pytest.warns(UserWarning, match=f"skipping sample {sid}"):
        samples = load_samples(cfg)
    assert sid not in [s.sample_id for s in samples] and list(samples.skipped) == [sid]


def test_training_with_skipped_test_sample_says_why(tmp_path, capsys) -> None:
    folder, sid, _ = _break("hest-st-h5ad", tmp_path, None)
    code, _, err = run_cli(["train", "--data", folder, "--test", sid, "--method", "ridge", "--preset", "tiny",
                            "--out", tmp_path / "r", "--skip-bad-samples"], capsys)
    one_error_line(code, err, "held-out sample(s) not in the dataset: SYN2", "skipped as unreadable", "st/SYN2.h5ad")


# -- single-sample formats ------------------------------------------------------------------------------
def test_single_visium_folder_without_tissue_positions(tmp_path, capsys) -> None:
    root = _visium(tmp_path / "vis", n=1)
    (root / "SYN1" / "spatial" / "tissue_positions.csv").unlink()
    code, _, err = run_cli(["data", "info", root / "SYN1"], capsys)
    line = one_error_line(code, err, "tissue_positions", "not found")
    assert "no supported dataset found" not in line and "--skip-bad-samples" not in line


def test_hest_metadata_missing_is_named(tmp_path, capsys) -> None:
    root = _hest(tmp_path / "hest")
    (root / "metadata" / "SYN2.json").unlink()
    code, _, err = run_cli(["data", "info", root], capsys)
    one_error_line(code, err, "metadata/SYN2.json", "metadata not found", "SYN2")
    assert "assuming 55 um" not in err


def test_visium_fullres_image_missing_names_no_python_argument(tmp_path, capsys) -> None:
    root = _visium(tmp_path / "vis", n=1)
    for p in (root / "SYN1").glob("*fullres*"):
        p.unlink()
    code, _, err = run_cli(["data", "info", root / "SYN1"], capsys)
    line = one_error_line(code, err, "full-resolution H&E image", str(root / "SYN1"))
    assert "fullres_image=" not in line and "Space Ranger" in line


def _truncate(path: Path, frac: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * frac)])


@pytest.mark.parametrize("command", ["data info", "train"])
def test_hest_truncated_tiff_fails_info_and_train(command, tmp_path, capsys) -> None:
    root = _hest(tmp_path / "hest", img_px_per_spot=40)
    _truncate(root / "wsis" / "SYN2.tif")
    args = ["data", "info", root] if command == "data info" else \
        ["train", "--data", root, "--test", "SYN1", "--method", "ridge", "--preset", "tiny", "--out", tmp_path / "r",
         "--set", f"data.cache_dir={tmp_path / 'c'}"]
    code, _, err = run_cli(args, capsys)
    one_error_line(code, err, "wsis/SYN2.tif", "truncated TIFF")
    assert len(err.strip().splitlines()) == 1 and "DeflateError" not in err


def test_damaged_tiff_region_is_an_input_error(tmp_path, capsys) -> None:
    """Same size but garbage inside: the header is fine, decoding a region is not."""
    from cmrcnet.data.readers import read_sample
    from cmrcnet.data.patches import extract_patches
    from cmrcnet.errors import InputError

    root = _hest(tmp_path / "hest", img_px_per_spot=40)
    tif = root / "wsis" / "SYN2.tif"
    import tifffile

    with tifffile.TiffFile(tif) as tf:
        off, cnt = tf.pages[0].dataoffsets[0], tf.pages[0].databytecounts[0]
    data = bytearray(tif.read_bytes())
    data[off: off + cnt] = b"\x00" * cnt
    tif.write_bytes(bytes(data))
    code, _, err = run_cli(["data", "info", root, "--check-images"], capsys)
    line = one_error_line(code, err, "wsis/SYN2.tif")
    assert "cannot decode the image region" in line or "unreadable image" in line
    s = read_sample(root, "SYN2")
    with pytest.raises(InputError, match="cannot decode|unreadable image"):
        extract_patches(s, 112.0, 16)


# -- degenerate data ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ridge", "bleep"])
def test_sample_with_one_spot_is_a_clear_error(method, tmp_path, capsys) -> None:
    samples = make_synthetic_samples(n_samples=3, n_patients=3, n_spots=40, n_genes=20)
    samples[1].adata = samples[1].adata[:1].copy()
    root = write_hest(samples, tmp_path / "hest")
    code, _, err = run_cli(["train", "--data", root, "--test", "SYN3", "--method", method, "--preset", "tiny",
                            "--out", tmp_path / "r"], capsys)
    one_error_line(code, err, "SYN2", "only 1 spot(s)", "at least 10", "--skip-bad-samples")


def test_all_zero_counts_is_a_clear_error(tmp_path, capsys) -> None:
    samples = make_synthetic_samples(n_samples=2, n_patients=2, n_spots=40, n_genes=20)
    samples[0].adata.X = sp.csr_matrix(samples[0].adata.shape, dtype=np.int32)
    root = write_hest(samples, tmp_path / "hest")
    code, _, err = run_cli(["train", "--data", root, "--test", "SYN2", "--method", "ridge", "--preset", "tiny",
                            "--out", tmp_path / "r"], capsys)
    one_error_line(code, err, "SYN1", "zero counts", "40 spots x 20 genes")


def test_no_variable_gene_is_an_error_not_a_marker_only_run() -> None:
    from cmrcnet.config import GeneConfig
    from cmrcnet.data.genes import select_genes
    from cmrcnet.errors import InputError

    s = make_synthetic_samples(n_samples=1, n_spots=20, n_genes=10)[0]
    s.adata.X = sp.csr_matrix(np.ones(s.adata.shape, np.int32))  # every gene constant
    with pytest.raises(InputError, match="no gene varies") as e:
        select_genes([s], [s.sample_id], GeneConfig(), markers=list(s.adata.var_names[:3]))
    assert "marker genes alone" in str(e.value)


def test_low_gene_overlap_warns_with_numbers() -> None:
    from cmrcnet.training.fit import check_gene_overlap

    s = make_synthetic_samples(n_samples=1, n_spots=20, n_genes=10)[0]
    genes = list(s.adata.var_names[:2]) + [f"OTHER{i}" for i in range(18)]
    with pytest.warns(UserWarning, match=r"measures only 2 of the 20 genes of this run \(10%\); the other 18"):
        check_gene_overlap([s], genes)


# -- predict ---------------------------------------------------------------------------------------
def test_predict_unknown_gene_fails_before_predicting(trained_run, tmp_path, capsys) -> None:
    run, data = trained_run
    gene = (run / "genes.txt").read_text().split()[0]
    out = tmp_path / "p.h5ad"
    code, _, err = run_cli(["predict", "--run", run, "--sample", data, "--sample-id", "SYN2", "--out", out,
                            "--genes", f"{gene},NOTAGENE,{gene[:-1]}X"], capsys)
    one_error_line(code, err, "--genes", "NOTAGENE", f"{gene[:-1]}X (did you mean GENE")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_predict_gene_in_other_case_is_matched(trained_run, tmp_path, capsys) -> None:
    run, data = trained_run
    gene = (run / "genes.txt").read_text().split()[0]
    out = tmp_path / "p.h5ad"
    code, _, err = run_cli(["predict", "--run", run, "--sample", data, "--sample-id", "SYN2", "--out", out,
                            "--genes", gene.lower()], capsys)
    assert code == 0, err
    assert f"{gene.lower()} -> {gene}" in err and out.with_suffix(".maps.png").is_file()


def _unwritable(kind: str, tmp_path: Path) -> Path:
    if kind == "parent-is-a-file":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile" / "out"
    if kind == "out-is-a-directory":
        (tmp_path / "adir").mkdir()
        return tmp_path / "adir"
    if os.geteuid() == 0:  # root writes through permission bits: use a file system it cannot write
        if Path("/sys").is_dir():
            return Path("/sys/cmrcnet-test-out")
        pytest.skip("no read-only location for root")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return ro / "out"


@pytest.mark.parametrize("kind", ["parent-is-a-file", "out-is-a-directory", "read-only"])
@pytest.mark.parametrize("command", ["predict", "train"])
def test_unwritable_out_fails_before_work(command, kind, trained_run, tmp_path, capsys) -> None:
    run, data = trained_run
    out = _unwritable(kind, tmp_path)
    if command == "train" and kind == "out-is-a-directory":
        (tmp_path / "afile2").write_text("x")
        out, kind = tmp_path / "afile2", "out-is-a-file"  # a run directory: the wrong kind is a file
    t0 = time.perf_counter()
    if command == "predict":
        out = out if kind == "out-is-a-directory" else Path(str(out) + ".h5ad")
        args = ["predict", "--run", run, "--sample", data, "--sample-id", "SYN2", "--out", out]
    else:
        args = ["train", "--data", data, "--test", "SYN2", "--method", "ridge", "--preset", "tiny", "--out", out]
    code, _, err = run_cli(args, capsys)
    one_error_line(code, err, "--out", str(out.parent if kind == "read-only" else out).split("/")[-1])
    assert time.perf_counter() - t0 < 3.0  # refused before reading data or predicting
    assert not list(tmp_path.glob("**/.*.tmp*"))


@pytest.mark.parametrize(("option", "value"), [("--um-per-px", "nan"), ("--um-per-px", "inf"),
                                               ("--um-per-px", "-1"), ("--pitch-um", "0"), ("--pitch-um", "nan")])
def test_bad_grid_numbers_are_one_line(option, value, trained_run, tmp_path, capsys) -> None:
    run, data = trained_run
    args = ["predict", "--run", run, "--image", data / "wsis" / "SYN1.tif", "--out", tmp_path / "g.h5ad",
            *(["--um-per-px", "10"] if option != "--um-per-px" else []), option, value]
    code, _, err = run_cli(args, capsys)
    one_error_line(code, err, option, "positive finite number")
    assert not list(tmp_path.iterdir())


def test_huge_grid_is_refused_with_its_size(trained_run, mob_dir, tmp_path, capsys) -> None:
    run, _ = trained_run
    t0 = time.perf_counter()
    code, _, err = run_cli(["predict", "--run", run, "--image", mob_dir / "MOB1.jpg", "--um-per-px", "500",
                            "--out", tmp_path / "g.h5ad"], capsys)
    one_error_line(code, err, "MOB1.jpg", "9,525 x 9,525", "pseudo-spots", "--um-per-px", "952.5 x 952.5 mm")
    assert time.perf_counter() - t0 < 5.0 and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_interrupted_whole_slide_prediction_leaves_no_temp_file(trained_run, tmp_path) -> None:
    """SIGTERM (kill, a scheduler's time limit) in the middle of a streamed prediction: the
    temporary file is removed and the exit is non-zero, without a traceback."""
    from PIL import Image

    run, _ = trained_run
    rng = np.random.default_rng(0)
    size = 1500
    img = np.full((size, size, 3), 245, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    blob = (xx - size * 0.5) ** 2 + (yy - size * 0.5) ** 2 < (size * 0.4) ** 2
    img[blob] = (rng.normal(0, 15, (blob.sum(), 3)) + [150, 60, 160]).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "slide.png")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "cmrcnet", "predict", "--run", str(run), "--image",
                             str(tmp_path / "slide.png"), "--um-per-px", "1", "--pitch-um", "4",
                             "--out", str(out_dir / "g.h5ad")], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out_dir.glob(".*.tmp*")):
        time.sleep(0.2)
    if not list(out_dir.glob(".*.tmp*")):
        proc.kill()
        pytest.fail(f"prediction never started: {proc.communicate()[1][-2000:]}")
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert not list(out_dir.iterdir())


# -- outputs: the contract on every path, scanpy and squidpy ------------------------------------------------
def test_whole_slide_output_keeps_the_contract(trained_run, tmp_path, capsys) -> None:
    run, data = trained_run
    out = tmp_path / "slide.h5ad"
    code, _, err = run_cli(["predict", "--run", run, "--image", data / "wsis" / "SYN1.tif", "--um-per-px", "10",
                            "--out", out, "--sample-id", "slide-7"], capsys)
    assert code == 0, err
    a = ad.read_h5ad(out)
    assert {"predicted", "uncertainty"} <= set(a.layers) and "observed" not in a.layers
    np.testing.assert_array_equal(a.layers["predicted"], a.X)
    assert np.isnan(a.layers["uncertainty"]).all() and "NaN" in a.uns["cmrcnet"]["uncertainty"]  # ridge: none
    assert list(a.uns["spatial"]) == ["slide-7"] and a.uns["cmrcnet"]["sample_id"] == "slide-7"
    entry = a.uns["spatial"]["slide-7"]
    assert {"hires", "lowres"} <= set(entry["images"])
    assert {"tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres"} <= set(entry["scalefactors"])
    assert a.obsm["spatial"].shape == (a.n_obs, 2) and "gene_ids" in a.var  # ids kept from the training data
    import h5py

    with h5py.File(out) as f:  # one copy on disk: layers/predicted is a hard link to X
        assert f["layers/predicted"].id == f["X"].id


def _plots(a, gene: str, squidpy: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    sc.pl.spatial(a, color=gene, layer="predicted", show=False)
    sc.pl.spatial(a, color=gene, layer="predicted", img_key="lowres", show=False)
    if squidpy:
        import squidpy as sq

        sq.pl.spatial_scatter(a, layer="predicted", color=gene)
    plt.close("all")


def _sample_and_slide(trained_run, tmp_path, capsys) -> list[Path]:
    run, data = trained_run
    outs = [tmp_path / "sample.h5ad", tmp_path / "slide.h5ad"]
    for args in (["--sample", data, "--sample-id", "SYN2"], ["--image", data / "wsis" / "SYN1.tif", "--um-per-px", "10"]):
        out = outs[0] if "--sample" in args else outs[1]
        code, _, err = run_cli(["predict", "--run", run, "--out", out, *args], capsys)
        assert code == 0, err
    return outs


def test_scanpy_plots_sample_and_whole_slide_predictions(trained_run, tmp_path, capsys) -> None:
    for path in _sample_and_slide(trained_run, tmp_path, capsys):
        a = ad.read_h5ad(path)
        _plots(a, a.var_names[0], squidpy=False)


@pytest.mark.slow
def test_squidpy_plots_sample_and_whole_slide_predictions(trained_run, tmp_path, capsys) -> None:
    pytest.importorskip("squidpy")
    for path in _sample_and_slide(trained_run, tmp_path, capsys):
        a = ad.read_h5ad(path)
        _plots(a, a.var_names[0], squidpy=True)


def test_readme_scanpy_recipe_runs_as_written(trained_run, tmp_path, capsys, monkeypatch) -> None:
    """The README's python block, executed on a fresh prediction in a folder of its own."""
    import re

    run, data = trained_run
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["predict", "--run", run, "--sample", data, "--sample-id", "SYN2", "--out", "c3.h5ad"], capsys)
    assert code == 0, err
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "import scanpy" in b)
    gene = (run / "genes.txt").read_text().split()[0]
    import matplotlib

    matplotlib.use("Agg")
    exec(compile(block.replace('"ERBB2"', repr(gene)), "README.md", "exec"), {})


# -- progress and warnings -------------------------------------------------------------------------------
def test_progress_lines_off_a_terminal(trained_run, tmp_path, capsys, monkeypatch) -> None:
    run, data = trained_run
    monkeypatch.setenv("CMRCNET_PROGRESS_SECONDS", "0")
    code, _, err = run_cli(["predict", "--run", run, "--image", data / "wsis" / "SYN1.tif", "--um-per-px", "10",
                            "--out", tmp_path / "g.h5ad"], capsys)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "predicting:" in ln]
    assert lines and all("spots/s" in ln for ln in lines)
    assert any("ETA" in ln for ln in lines) or any(" in " in ln for ln in lines)


def test_line_progress_has_rate_and_eta(caplog) -> None:
    import logging

    from cmrcnet.progress import LineProgress

    caplog.set_level(logging.INFO, logger="cmrcnet.progress")
    lp = LineProgress("cutting patches of X", 100, "patches", interval=0)
    for _ in range(4):
        lp.advance(10)
    lp.finish()
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("cutting patches of X: 20/100 patches (20.0%)") and "patches/s, ETA" in m for m in msgs)
    assert msgs[-1].startswith("cutting patches of X: 40 patches in")


@pytest.mark.slow
def test_training_epochs_logged_off_a_terminal(tmp_path, capsys, monkeypatch) -> None:
    root = _hest(tmp_path / "hest", n_samples=2, n_spots=24)
    code, _, err = run_cli(["train", "--data", root, "--test", "SYN2", "--method", "stnet", "--preset", "tiny",
                            "--out", tmp_path / "r", "--set", "train.epochs=2",
                            "--set", f"data.cache_dir={tmp_path / 'c'}"], capsys)
    assert code == 0, err
    epochs = [ln for ln in err.splitlines() if "training stnet: epoch" in ln]
    assert len(epochs) == 2 and "epoch 2/2" in epochs[-1] and "s/epoch" in epochs[0] and "ETA" in epochs[0]


def test_warning_printed_once(trained_run, tmp_path, capsys) -> None:
    """ridge warns about random encoder weights with warnings.warn and logs it: one line on stderr
    when it trains; predicting from the trained run (weights in model.pt) does not repeat it."""
    run, data = trained_run
    code, _, err = run_cli(["train", "--data", data, "--test", "SYN2", "--method", "ridge", "--preset", "tiny",
                            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    assert err.count("RANDOM weights") == 1, err
    code, _, err = run_cli(["predict", "--run", run, "--sample", data, "--sample-id", "SYN2",
                            "--out", tmp_path / "p.h5ad"], capsys)
    assert code == 0, err
    assert err.count("RANDOM weights") == 0, err


# -- CLI -------------------------------------------------------------------------------------------------
def test_version(capsys) -> None:
    import cmrcnet

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"cmrcnet {cmrcnet.__version__}"


def test_every_option_has_help() -> None:
    import typer

    from cmrcnet import cli

    cli._register()
    missing = []

    def walk(cmd, path):
        for p in cmd.params:
            if not (getattr(p, "help", None) or "").strip():
                missing.append(f"{' '.join(path)} {'/'.join(p.opts)}")
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(cli.app), ["cmrcnet"])
    assert not missing, missing


def test_tables_not_truncated_when_piped(capsys) -> None:
    from cmrcnet.data.manifest import list_manifests, load_manifest

    code, out, _ = run_cli(["datasets"], capsys)
    assert code == 0 and "…" not in out
    for name in list_manifests():
        assert ", ".join(load_manifest(name).sample_ids()) in out
    code, out, _ = run_cli(["datasets", "her2st"], capsys)
    assert code == 0 and "…" not in out


@pytest.mark.slow
def test_tables_not_truncated_in_a_pipe_subprocess(tmp_path) -> None:
    """``cmrcnet datasets > file``: a real redirect, 80-column default width."""
    env = {**os.environ, "COLUMNS": "80"}
    with open(tmp_path / "out.txt", "w") as fh:
        r = subprocess.run([sys.executable, "-m", "cmrcnet", "datasets"], stdout=fh, stderr=subprocess.PIPE,
                           text=True, env=env, timeout=120)
    text = (tmp_path / "out.txt").read_text()
    assert r.returncode == 0 and "…" not in text and "NCBI783, NCBI785, TENX95, TENX99" in text


@pytest.mark.parametrize(("args", "needle"), [
    (["predict", "--run", "x", "--out", "y.h5ad", "--top-k", "0"], "--top-k"),
    (["train", "--test", "A", "--out", "r"], "Missing option '--data'"),
    (["no-such-command"], "No such command"),
])
def test_usage_errors_are_one_line(args, needle, capsys) -> None:
    code, _, err = run_cli(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err and "--help" in err

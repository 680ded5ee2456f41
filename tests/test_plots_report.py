"""Figures (cmrcnet.plots) and the HTML/Markdown report (cmrcnet.report)."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from cmrcnet import plots
from cmrcnet.errors import InputError
from cmrcnet.models import get_method
from cmrcnet.report import build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")


def _helpers():
    """The synthetic-benchmark writer of test_evaluation.py (loaded by path: no conftest needed)."""
    path = Path(__file__).with_name("test_evaluation.py")
    spec = importlib.util.spec_from_file_location("_cmrcnet_eval_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


H = _helpers()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    bench = H.write_fake_bench(tmp_path_factory.mktemp("bench"))
    html_path, md_path = build_report(bench)
    return bench, html_path, md_path


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def test_figures_return_figure_and_write_png(tmp_path: Path) -> None:
    preds = {"cmrcnet-50": H.make_prediction("cmrcnet", 0, 0, 0.7, top_k=50),
             "stnet": H.make_prediction("stnet", 0, 0, 0.3, const_gene=True)}
    first = preds["cmrcnet-50"]
    genes = list(first.var_names[:20])
    obs = first[:, genes].layers["observed"]
    out = {
        "fig3": plots.mean_variance_scatter(preds, out=tmp_path / "fig3.png"),
        "fig4": plots.correlation_heatmaps(obs, {k: a[:, genes].layers["predicted"] for k, a in preds.items()},
                                           genes, out=tmp_path / "fig4.png"),
        "fig5": plots.spatial_maps(preds, ["G3", "G5", "MISSING"], out=tmp_path / "fig5.png"),
    }
    for name, fig in out.items():
        assert isinstance(fig, Figure)
        assert _is_png(tmp_path / f"{name}.png")
    assert any("similarity" in ax.get_title() for ax in out["fig4"].axes)
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic writes leave no temporaries
    img = imread(tmp_path / "fig5.png")
    assert img.shape[0] > 300 and img[..., :3].std() > 0.05  # not blank


def test_spatial_maps_without_image(tmp_path: Path) -> None:
    a = H.make_prediction("bleep", 0, 1, 0.6, top_k=50, with_image=False)
    fig = plots.spatial_maps({"bleep-50": a}, ["G1"], out=tmp_path / "noimg.png")
    assert not any(ax.images for ax in fig.axes) and _is_png(tmp_path / "noimg.png")
    with pytest.raises(InputError):
        plots.spatial_maps({}, ["G1"])


def test_boxplot_and_colours(report: tuple[Path, Path, Path], tmp_path: Path) -> None:
    genes = pd.read_csv(report[0] / "report" / "per_gene_metrics.csv", keep_default_na=False)
    assert genes["HEG50"].dtype == bool
    fig = plots.boxplot_pcc(genes[genes["variant"] == ""], "HEG50", out=tmp_path / "box.png")
    assert isinstance(fig, Figure) and _is_png(tmp_path / "box.png")
    cols = plots.label_colours(["cmrcnet-50", "cmrcnet-500", "stnet", "mine"])
    assert len(set(cols.values())) == 4 and cols["stnet"] == get_method("stnet").colour
    with pytest.raises(InputError):
        plots.boxplot_pcc(genes, "NOT_A_SET")


def test_build_report_outputs(report: tuple[Path, Path, Path]) -> None:
    bench, html_path, md_path = report
    assert html_path == bench / "report" / "report.html" and md_path.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert html_path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    text = html_path.read_text()
    assert text.count("data:image/png;base64,") >= 6
    assert "<table" in text and "Table 1" in text and "Table 2" in text and "Table 5" in text
    assert "cmrcnet-50" in text and "stnet" in text
    assert "Gene selection: train" in text
    assert "Constant genes (PCC undefined, counted as 0): 4 of" in text
    assert "NOPE" in text  # missing marker reported
    assert not re.search(r'src="(?!data:)', text)  # self-contained: no external images
    uri = re.search(r'src="data:image/png;base64,([^"]+)"', text).group(1)
    assert imread(io.BytesIO(base64.b64decode(uri))).ndim == 3
    md = md_path.read_text()
    assert ("| label | HEG50 (mean ± sd, 2 seeds) | HEG50 sd over samples | HVG50 (mean ± sd, 2 seeds) | "
            "HVG50 sd over samples | markers (mean ± sd, 2 seeds) | markers sd over samples | seeds | samples |") in md
    assert "](fig2_boxplot_HEG50.png)" in md
    for name in ("table1.csv", "table2.csv", "table3_top_genes.csv", "table5_ablation.csv", "runs.csv",
                 "per_run_summary.csv", "per_gene_metrics.csv", "fig4_gene_correlation_HVG50.png",
                 "fig5_spatial.png"):
        assert (bench / "report" / name).exists(), name


def test_build_report_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no scorable"):
        build_report(tmp_path)


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None,
                    reason="chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, html_path, _ = report
    url = html_path.resolve().as_uri()
    shot = tmp_path / "out.png"
    _chromium([f"--screenshot={shot}", "--window-size=1200,2000", url], tmp_path)
    assert shot.exists() and _is_png(shot)
    img = imread(shot)
    assert img.shape[:2] == (2000, 1200) and img[..., :3].std() > 0.05
    dom = _chromium(["--dump-dom", url], tmp_path).stdout
    assert dom.count("<table") >= 5 and dom.count("<img") >= 6
    assert "0.7" in dom and "cmrcnet-50" in dom
    assert np.all([s.startswith("data:image/png;base64,") for s in re.findall(r'<img src="([^"]+)"', dom)])

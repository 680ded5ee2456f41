"""The report: files found by content, no ranking of methods scored on different runs, run settings
stated, ± columns worded by what they are (issue 16)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from cmrcnet.errors import InputError
from cmrcnet.report import build_report


def _helpers():
    path = Path(__file__).with_name("test_evaluation.py")
    spec = importlib.util.spec_from_file_location("_cmrcnet_eval_helpers_r", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


H = _helpers()


def _write(root: Path, runs: list[tuple[str, int, int]], names=lambda m, s, f: f"runs/{m}/seed{s}/fold{f}/pred.h5ad",
           settings: dict | None = None) -> Path:
    for method, seed, fold in runs:
        a = H.make_prediction(method, seed, fold, 0.6 if method == "cmrcnet" else 0.3,
                              top_k=50 if method == "cmrcnet" else None)
        a.uns["cmrcnet"].update(settings or {})
        p = root / names(method, seed, fold)
        p.parent.mkdir(parents=True, exist_ok=True)
        a.write_h5ad(p)
    return root


def test_report_finds_prediction_files_by_content_not_name(tmp_path: Path) -> None:
    """The README's `predict --out c3.h5ad` files are found; input data and whole-slide grids are not scored."""
    root = _write(tmp_path / "b", [("cmrcnet", 0, 0), ("stnet", 0, 0)], names=lambda m, s, f: f"{m}_c3.h5ad")
    import anndata as ad
    import numpy as np

    other = ad.AnnData(np.ones((3, 2), np.float32))  # e.g. an input st/*.h5ad: no predicted layer
    other.write_h5ad(root / "input.h5ad")
    grid = H.make_prediction("stnet", 0, 5, 0.3)
    del grid.layers["observed"]
    grid.write_h5ad(root / "slide.h5ad")
    (root / "broken.h5ad").write_bytes(b"not hdf5")
    html, md = build_report(root)
    text = md.read_text()
    assert "2 prediction files scored" in text
    assert "slide.h5ad" in text and "without layers['observed']" in text and "broken.h5ad" in text
    assert "input.h5ad" not in text


def test_report_refuses_to_rank_methods_scored_on_different_folds(tmp_path: Path) -> None:
    root = _write(tmp_path / "b", [("cmrcnet", 0, 0), ("cmrcnet", 0, 1), ("stnet", 0, 0)])
    with pytest.raises(InputError, match="different held-out samples/seeds") as e:
        build_report(root)
    msg = str(e.value)
    assert "cmrcnet-50: 2 run(s), sample(s) S0, S1" in msg and "stnet: 1 run(s), sample(s) S0" in msg
    assert "--allow-incomplete" in msg and not (root / "report" / "report.md").exists()
    _, md = build_report(root, allow_incomplete=True)
    text = md.read_text()
    assert "INCOMPLETE COMPARISON" in text and "--allow-incomplete" in text


def test_report_cli_incomplete_is_one_line_and_flag_reports(tmp_path: Path, capsys) -> None:
    from cmrcnet.cli import main

    root = _write(tmp_path / "b", [("cmrcnet", 0, 0), ("cmrcnet", 1, 0), ("stnet", 0, 0)])
    with pytest.raises(SystemExit) as e:
        main(["report", str(root)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "seed(s) 0, 1" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["report", str(root), "--allow-incomplete"])
    assert e.value.code == 0 and (root / "report" / "report.html").is_file()


def test_report_states_run_settings(tmp_path: Path) -> None:
    settings = {"preset": "cpu", "epochs": 8, "encoder": "resnet18", "overrides": {"train.lr": 0.001}}
    root = _write(tmp_path / "b", [("cmrcnet", 0, 0), ("stnet", 0, 0)], settings=settings)
    _, md = build_report(root)
    text = md.read_text()
    assert "Run settings: preset cpu; epochs 8; encoders resnet18; overrides of the preset: train.lr=0.001" in text
    row = next(line for line in text.splitlines() if line.startswith("| stnet | cpu |"))
    assert "| 8 | resnet18 | train.lr=0.001 | 0 | S0 |" in row
    assert (root / "report" / "run_settings.csv").is_file()


def test_report_with_one_seed_does_not_say_over_seeds(tmp_path: Path) -> None:
    root = _write(tmp_path / "b", [("cmrcnet", 0, 0), ("cmrcnet", 0, 1), ("stnet", 0, 0), ("stnet", 0, 1)])
    _, md = build_report(root)
    text = md.read_text()
    assert "over seeds" not in text.replace("no sd over seeds", "").replace("mean over seeds", "")
    assert "HEG50 (mean, 1 seed)" in text and "HEG50 sd over samples" in text
    shutil.rmtree(root / "runs" / "stnet")
    for s in (1, 2):
        _write(root, [("cmrcnet", s, 0), ("cmrcnet", s, 1)])
    _, md = build_report(root)
    assert "mean ± sd over 3 seeds" in md.read_text() and "HEG50 (mean ± sd, 3 seeds)" in md.read_text()

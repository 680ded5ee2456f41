"""`cmrcnet benchmark --dataset NAME` on a HEST-layout folder named like a paper manifest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cmrcnet.data.manifest import load_manifest


def _hest_folder(dest: Path, ids: list[str]) -> Path:
    from cmrcnet.data.readers.hest import write_hest
    from cmrcnet.data.synthetic import make_synthetic_samples

    samples = make_synthetic_samples(n_samples=len(ids), n_patients=len(ids), seed=5)
    for s, new_id in zip(samples, ids):
        s.sample_id = new_id
        s.patient_id = new_id
    return write_hest(samples, dest)


@pytest.mark.slow
def test_benchmark_dataset_manifest_end_to_end(tmp_path):
    skcm = load_manifest("SKCM")
    hest = _hest_folder(tmp_path / "hest", skcm.sample_ids())
    out = tmp_path / "bench"
    r = subprocess.run(
        [sys.executable, "-m", "cmrcnet", "benchmark", "--data", str(hest), "--dataset", "SKCM", "--methods", "cmrcnet,ridge",
         "--preset", "tiny", "--seeds", "0", "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.epochs=1", "--out", str(out)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    preds = sorted(out.glob("runs/*/seed0/fold*/pred.h5ad"))
    assert len(preds) == 2 * len(skcm.sample_ids())
    import anndata as ad

    meta = ad.read_h5ad(preds[0]).uns["cmrcnet"]
    assert list(meta["markers"]) == skcm.markers
    assert (out / "report" / "report.html").is_file() or list((out / "report").glob("*.html"))


def test_benchmark_dataset_missing_sample_is_a_clear_error(tmp_path):
    skcm = load_manifest("SKCM")
    hest = _hest_folder(tmp_path / "hest", skcm.sample_ids()[:1])
    r = subprocess.run(
        [sys.executable, "-m", "cmrcnet", "benchmark", "--data", str(hest), "--dataset", "skcm", "--methods", "ridge", "--preset", "tiny", "--out", str(tmp_path / "b")],
        capture_output=True, text=True,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert skcm.sample_ids()[1] in r.stderr
    assert "snapshot_download" in r.stderr

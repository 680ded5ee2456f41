"""A small cross-validated benchmark on synthetic data: files, resume, table, report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from cmrcnet.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("bsynth") / "ds", n_samples=3, n_patients=3, seed=3)


@pytest.mark.slow
def test_benchmark_end_to_end_and_resume(synth, tmp_path):
    from cmrcnet.benchmark import BenchmarkSpec, run_benchmark
    from cmrcnet.evaluation.summary import collect, table1
    from cmrcnet.report import build_report

    spec = BenchmarkSpec(
        data=str(synth),
        methods=["cmrcnet", "stnet"],
        seeds=[0],
        preset="tiny",
        overrides={"data.cache_dir": str(tmp_path / "cache"), "train.epochs": "1"},
        extra_top_k=[20],
    )
    out = tmp_path / "bench"
    done = run_benchmark(spec, out)
    assert len(done) == 2 * 3
    assert (out / "benchmark.yaml").is_file()
    assert len(list((out / "splits").glob("fold*.json"))) == 3
    assert len(list(out.glob("runs/cmrcnet/seed0/fold*/pred.h5ad"))) == 3
    assert len(list(out.glob("runs/cmrcnet/seed0/fold*/pred_k20.h5ad"))) == 3
    assert not list(out.glob("runs/stnet/seed0/fold*/pred_k*.h5ad"))
    # finished jobs keep model.pt but not the (large) Lightning checkpoints
    assert len(list(out.glob("runs/*/seed0/fold*/model.pt"))) == 6
    assert not list(out.glob("runs/*/seed0/fold*/checkpoints"))

    # resume skips every finished job
    statuses = []
    run_benchmark(spec, out, resume=True, on_job=lambda j, s, dt: statuses.append(s))
    assert statuses == ["skipped"] * 6

    df = collect(out)
    t1 = table1(df)
    labels = " ".join(map(str, t1.index)) + " " + " ".join(map(str, t1.get("method", [])))
    assert "cmrcnet-50" in labels and "stnet" in labels
    html, md = build_report(out)
    assert html.is_file() and md.is_file()
    assert "cmrcnet" in md.read_text()

    import dataclasses

    kept = tmp_path / "bench_kept"
    run_benchmark(dataclasses.replace(spec, methods=["cmrcnet"], keep_checkpoints=True), kept, fold=0)
    assert list(kept.glob("runs/cmrcnet/seed0/fold0/checkpoints/*.ckpt"))


def test_benchmark_cli_bad_split(synth, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "cmrcnet", "benchmark", "--data", str(synth), "--out", str(tmp_path / "b"), "--methods", "cmrcnet", "--split", "loo-nothing", "--preset", "tiny"],
        capture_output=True, text=True,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr

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


def test_method_scoped_overrides_reach_only_that_method(synth) -> None:
    """``stnet:model.encoder_mode=frozen`` beside HisToGene (no encoder options): each job gets its own."""
    from cmrcnet.benchmark import BenchmarkSpec, Job, job_config

    spec = BenchmarkSpec(data=str(synth), methods=["stnet", "histogene"], preset="tiny",
                         overrides={"train.epochs": "1", "stnet:model.encoder_mode": "scratch",
                                    "stnet:train.epochs": "2"})
    stnet = job_config(spec, Job("stnet", "stnet", 0, 0, ["S0"], ["S1"]))
    histogene = job_config(spec, Job("histogene", "histogene", 0, 0, ["S0"], ["S1"]))
    assert stnet.model["encoder_mode"] == "scratch" and stnet.train.epochs == 2
    assert "encoder_mode" not in histogene.model and histogene.train.epochs == 1


@pytest.mark.parametrize(("key", "message"), [("ridge:train.epochs", "'ridge' is not a method of this benchmark"),
                                              ("histogene:model.encoder_mode", "histogene"),
                                              ("model.encoder_mode", "histogene")])
def test_bad_benchmark_override_is_refused_before_any_work(synth, tmp_path, key: str, message: str) -> None:
    from cmrcnet.benchmark import BenchmarkSpec, run_benchmark
    from cmrcnet.errors import ConfigError

    out = tmp_path / "b"
    spec = BenchmarkSpec(data=str(synth), methods=["stnet", "histogene"], preset="tiny", overrides={key: "frozen"})
    with pytest.raises(ConfigError, match=message):
        run_benchmark(spec, out)
    assert not list(out.glob("runs/*"))


def test_bad_benchmark_override_is_one_line_on_the_command_line(synth, tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "cmrcnet", "benchmark", "--data", str(synth), "--out", str(tmp_path / "b"),
                        "--methods", "stnet,histogene", "--preset", "tiny", "--set", "ridge:train.epochs=2"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "'ridge' is not a method of this benchmark" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error")]) == 1

"""The hand-run benchmark scripts in benchmarks/ still run: each in --smoke mode, in a subprocess.

Smoke mode uses tiny presets, synthetic data and one thread, and finishes in seconds on an
idle 2-core machine (imports included). The numbers are not checked, only that each script
exits 0, prints its tables and writes a JSON envelope with the machine facts and the load.
The GPU script is run only when CUDA is available; otherwise its no-GPU exit is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses with full imports: the inner loop skips them

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
#: Generous: the budget is ~20 s on an idle machine, but CI boxes and shared machines are loaded.
TIMEOUT_S = 240


def run_script(name: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", CMRCNET_CACHE=str(tmp_path / "cache"))
    return subprocess.run(
        [sys.executable, str(BENCH / name), "--smoke", "--out", str(tmp_path / "out.json"), *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def check_envelope(path: Path, tables: set[str]) -> dict:
    payload = json.loads(path.read_text())
    assert payload["machine"]["cpu_count"] >= 1
    assert "torch_threads" in payload["machine"]
    assert isinstance(payload["loadavg_start"], list) and isinstance(payload["loadavg_end"], list)
    missing = tables - set(payload["tables"])
    assert not missing, f"tables missing from the JSON: {missing}"
    for key in tables:
        assert payload["tables"][key], f"table {key} is empty"
    return payload


def test_train_throughput_smoke(tmp_path: Path) -> None:
    proc = run_script("train_throughput.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_envelope(tmp_path / "out.json", {"gemm_peak", "compute", "epoch"})
    methods = {r["method"] for r in payload["tables"]["compute"]}
    assert methods == {"cmrcnet", "bleep", "stnet", "histogene", "ridge-embedding"}
    for r in payload["tables"]["compute"]:
        assert r["patches_s"] > 0 and r["fwd_gflop_patch"] > 0
    for r in payload["tables"]["epoch"]:
        assert r["epoch_s"] > 0 and r["ratio"] > 0


def test_predict_throughput_smoke(tmp_path: Path) -> None:
    proc = run_script("predict_throughput.py", tmp_path, "--work", str(tmp_path / "work"), "--grid-stream")
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_envelope(tmp_path / "out.json", {"embed", "section", "grid"})
    grid = payload["tables"]["grid"][0]
    assert grid["spots"] >= grid["target"]
    assert grid["peak_rss_mb"] > 0


def test_frozen_features_smoke(tmp_path: Path) -> None:
    proc = run_script("frozen_features.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_envelope(tmp_path / "out.json", {"gemm_peak", "encode"})
    assert all(r["patches_per_s"] > 0 and 0 < r["peak_fraction"] for r in payload["tables"]["encode"])


def test_retrieval_smoke(tmp_path: Path) -> None:
    proc = run_script("retrieval.py", tmp_path, "--cache", str(tmp_path / "rcache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_envelope(tmp_path / "out.json", {"summary", "tradeoff"})
    exact = [r for r in payload["tables"]["summary"] if r["backend"] in ("torch", "torch-bf16", "faiss-flat")]
    assert {"torch", "torch-bf16", "faiss-ivfpq"} <= {r["backend"] for r in payload["tables"]["summary"]}
    assert exact and all(r["recall"] == pytest.approx(1.0) for r in exact)


def test_gpu_paper(tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        proc = subprocess.run(
            [sys.executable, str(BENCH / "gpu_paper.py")], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path
        )
        assert proc.returncode == 2
        assert "no CUDA GPU" in proc.stderr
        return
    proc = run_script("gpu_paper.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_envelope(tmp_path / "out.json", {"gemm_peak", "train", "loader", "retrieval"})


def test_slide_throughput_smoke(tmp_path: Path) -> None:
    proc = run_script("slide_throughput.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = check_envelope(tmp_path / "out.json", {"slide"})["tables"]["slide"]
    assert {r["prefetch"] for r in rows} == {0, 2}
    assert all(r["pixel_size_source"].startswith("openslide.mpp-x") and r["peak_rss_mb"] > 0 for r in rows)
    assert len({r["spots"] for r in rows}) == 1  # the same slide, whatever the reading thread


def test_slide_throughput_frozen_encoder_smoke(tmp_path: Path) -> None:
    """--encoder: a frozen CMRCNet run over a random-weight timm encoder, its rate against the GEMM peak."""
    proc = run_script("slide_throughput.py", tmp_path, "--encoder", "vit_tiny_patch16_224", "--prefetch", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = check_envelope(tmp_path / "out.json", {"slide"})["tables"]["slide"]
    assert len(rows) == 1 and rows[0]["model_gflop_s"] > 0 and 0 < rows[0]["e2e_of_peak"] <= rows[0]["model_of_peak"] * 1.5


def test_exact_search_smoke(tmp_path: Path) -> None:
    proc = run_script("exact_search.py", tmp_path, "--methods", "faiss-flat,torch-bf16,torch-fp32,gemm-bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_envelope(tmp_path / "out.json", {"exact"})
    searched = [r for r in payload["tables"]["exact"] if r["method"] != "gemm-bf16"]
    assert {r["method"] for r in searched} == {"faiss-flat", "torch-bf16", "torch-fp32"}
    assert all(r["recall"] == pytest.approx(1.0) and r["max_kth_gap"] < 1e-5 for r in searched)


def test_approx_frontier_smoke(tmp_path: Path) -> None:
    proc = run_script("approx_frontier.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_envelope(tmp_path / "out.json", {"frontier"})
    methods = {r["method"] for r in payload["tables"]["frontier"]}
    assert {"ivf-flat", "ivf-pq-rflat", "ivf-sq8-rflat", "hnsw", "library"} <= methods
    assert all(0 <= r["recall"] <= 1 for r in payload["tables"]["frontier"])


def test_train_step_smoke(tmp_path: Path) -> None:
    proc = run_script("train_step.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = check_envelope(tmp_path / "out.json", {"steps"})["tables"]["steps"]
    assert {(r["precision"], r["attention"]) for r in rows} == {("fp32", "never"), ("fp32", "always"),
                                                                ("bf16", "never"), ("bf16", "always")}
    assert all(r["step_s"] > 0 for r in rows)


def test_ab_step_smoke(tmp_path: Path) -> None:
    """This tree against itself: two fresh processes, the same seed, so the same losses."""
    proc = run_script("ab_step.py", tmp_path, "--a", str(ROOT), "--b", str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = check_envelope(tmp_path / "out.json", {"summary", "runs"})["tables"]
    (row,) = tables["summary"]
    assert row["preset"] == "tiny" and row["A_step_s"] > 0 and row["B_step_s"] > 0
    a, b = ([r["losses"] for r in tables["runs"] if r["tree"] == t] for t in ("A", "B"))
    assert a == b and len(a[0]) == 2


def test_ab_step_bad_tree_is_one_line(tmp_path: Path) -> None:
    proc = run_script("ab_step.py", tmp_path, "--a", str(tmp_path), "--b", str(ROOT))
    assert proc.returncode != 0
    assert "not a cmrcnet source tree" in proc.stderr and "Traceback" not in proc.stderr


def test_ab_step_bad_env_b_is_one_line(tmp_path: Path) -> None:
    proc = run_script("ab_step.py", tmp_path, "--a", str(ROOT), "--b", str(ROOT), "--env-b", "GOMP_SPINCOUNT")
    assert proc.returncode != 0
    assert "take KEY=VALUE, got 'GOMP_SPINCOUNT'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_busy_machine_smoke(tmp_path: Path) -> None:
    """Three tiny training processes (one untimed), one beside a competitor: ~30-60 s."""
    proc = run_script("busy_machine.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = check_envelope(tmp_path / "out.json", {"runs"})["tables"]["runs"]
    assert row["setting"] == "default" and row["idle_s"] > 0 and row["busy_s"] > 0


def test_frontier_prices_approximation_in_expression(monkeypatch: pytest.MonkeyPatch) -> None:
    """approx_frontier --run: the expression kept beside each augmented bank row is the row that was
    embedded (re-embedding it gives the same vector), and the per-gene PCC is numpy's."""
    import numpy as np
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    import approx_frontier
    import retrieval as bench_retrieval

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(12, 6)

        def embed_genes(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = Linear().eval()
    seeds = np.random.default_rng(0).gamma(0.5, 2.0, (30, 12)).astype(np.float32)
    expr = np.empty((50, 12), np.float32)
    emb = bench_retrieval.augment_embed(model, seeds, 50, seed=1, chunk=16, expr_cols=np.arange(12), expr_out=expr)
    with torch.no_grad():
        again = torch.nn.functional.normalize(model.embed_genes(torch.from_numpy(expr)), dim=1).numpy()
    np.testing.assert_allclose(emb, again, atol=1e-5)
    assert not np.allclose(expr[:, :1], expr[0, 0])  # mixes differ
    a, b = np.random.default_rng(1).normal(size=(2, 40, 5))
    b[:, 3] = a[:, 3]
    want = np.mean([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(5)])
    assert approx_frontier.mean_gene_pcc(a, b) == pytest.approx(want)
    const = np.ones((40, 5))
    assert approx_frontier.mean_gene_pcc(a, const) == 0.0  # a constant column counts as 0


@pytest.mark.parametrize("extra,needle", [
    (["--run", "no/such/run"], "not a cmrcnet run directory"),
    (["--pq-m", "5"], "--pq-m 5 must divide"),
    (["--expr-genes", "0"], "--expr-genes must be >= 1"),
    (["--methods", "ivf-flat,annoy"], "unknown ['annoy']"),
])
def test_approx_frontier_refuses_bad_options(tmp_path: Path, extra: list[str], needle: str) -> None:
    proc = run_script("approx_frontier.py", tmp_path, *extra)
    assert proc.returncode != 0
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out.json").exists()

"""Cross-validated benchmark: every (method, fold, seed) job through the same train/predict path.

Layout of a benchmark directory::

    DIR/benchmark.yaml                         settings of the benchmark (resolved)
    DIR/splits/fold{k}.json                    the folds (train/test sample ids)
    DIR/runs/{name}/seed{s}/fold{k}/           one run directory per job (see cmrcnet.training.fit)
    DIR/runs/{name}/seed{s}/fold{k}/pred.h5ad  prediction of the held-out sample(s) (k = config top_k)
    DIR/runs/{name}/seed{s}/fold{k}/pred_k250.h5ad, pred_k500.h5ad   retrieval methods only
    DIR/report/                                tables and figures (``cmrcnet report DIR``)

``name`` is the method, or ``cmrcnet-{variant}`` for ablation variants. A job is complete
when its run has ``done.json`` and all its prediction files exist; ``resume`` skips those,
so a killed benchmark loses at most the job in flight. A finished job's Lightning checkpoints
are deleted (``model.pt`` stays) unless ``keep_checkpoints`` is set.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from cmrcnet.config import RunConfig, make_config
from cmrcnet.data.sample import Sample
from cmrcnet.errors import ConfigError
from cmrcnet.utils import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

EXTRA_TOP_K = (250, 500)

#: Table 5 of the paper: (variant name, model overrides).
ABLATION_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("contrastive-only", {"model.reconstruction": False}),
    ("cosine-mask0.3-image", {"model.recon_loss": "cosine", "model.mask_ratio": 0.3, "model.recon_target": "image"}),
    ("cosine-mask0.5-image", {"model.recon_loss": "cosine", "model.mask_ratio": 0.5, "model.recon_target": "image"}),
    ("cosine-mask0.7-image", {"model.recon_loss": "cosine", "model.mask_ratio": 0.7, "model.recon_target": "image"}),
    ("cosine-mask0.5-expression", {"model.recon_loss": "cosine", "model.mask_ratio": 0.5, "model.recon_target": "expression"}),
    ("mse-mask0.3-image", {"model.recon_loss": "mse", "model.mask_ratio": 0.3, "model.recon_target": "image"}),
    ("mse-mask0.5-image", {"model.recon_loss": "mse", "model.mask_ratio": 0.5, "model.recon_target": "image"}),
    ("mse-mask0.7-image", {"model.recon_loss": "mse", "model.mask_ratio": 0.7, "model.recon_target": "image"}),
    ("mse-mask0.5-expression", {"model.recon_loss": "mse", "model.mask_ratio": 0.5, "model.recon_target": "expression"}),
]


@dataclass
class Job:
    name: str
    method: str
    fold: int
    seed: int
    test_ids: list[str]
    train_ids: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)
    variant: str = ""

    def run_dir(self, root: Path) -> Path:
        return root / "runs" / self.name / f"seed{self.seed}" / f"fold{self.fold}"


@dataclass
class BenchmarkSpec:
    data: str
    methods: list[str]
    split: str = "loo-sample"
    seeds: list[int] = field(default_factory=lambda: [0])
    preset: str = "cpu"
    dataset: str | None = None
    gene_selection: str = "train"
    ablation: bool = False
    overrides: dict[str, str] = field(default_factory=dict)
    extra_top_k: list[int] = field(default_factory=lambda: list(EXTRA_TOP_K))
    keep_checkpoints: bool = False


def job_config(spec: BenchmarkSpec, job: Job) -> RunConfig:
    ov: dict[str, Any] = {"data.path": spec.data, "seed": job.seed, "split.scheme": spec.split, "genes.selection": spec.gene_selection}
    if spec.dataset:
        ov["data.dataset"] = spec.dataset
    ov.update(spec.overrides)
    ov.update(job.overrides)
    return make_config(job.method, spec.preset, ov)


def plan_jobs(spec: BenchmarkSpec, samples: list[Sample]) -> tuple[list, list[Job]]:
    from cmrcnet.data.splits import make_folds

    patients = {s.sample_id: s.patient_id or s.sample_id for s in samples}
    folds = make_folds(sorted(patients), patients, spec.split, seed=0)
    entries: list[tuple[str, str, dict[str, Any], str]] = []
    if spec.ablation:
        entries += [(f"cmrcnet-{v}", "cmrcnet", ov, v) for v, ov in ABLATION_VARIANTS]
    else:
        entries += [(m, m, {}, "") for m in spec.methods]
    jobs = [
        Job(name, method, f.index, seed, list(f.test), list(f.train), dict(ov), variant)
        for seed in spec.seeds
        for f in folds
        for name, method, ov, variant in entries
    ]
    return folds, jobs


def pred_paths(job_dir: Path, kind: str, extra_top_k: list[int]) -> list[tuple[Path, int | None]]:
    paths: list[tuple[Path, int | None]] = [(job_dir / "pred.h5ad", None)]
    if kind == "retrieval":
        paths += [(job_dir / f"pred_k{k}.h5ad", k) for k in extra_top_k]
    return paths


def job_complete(job_dir: Path) -> bool:
    marker = job_dir / "predictions.done"
    return marker.is_file() and (job_dir / "done.json").is_file()


def run_job(spec: BenchmarkSpec, job: Job, samples: list[Sample], root: Path, resume: bool) -> Path:
    from cmrcnet.models import get_method
    from cmrcnet.training import load_run, predict_sample, train, write_h5ad_atomic

    job_dir = job.run_dir(root)
    if resume and job_complete(job_dir):
        return job_dir
    cfg = job_config(spec, job)
    train(cfg, job_dir, job.test_ids, train_ids=job.train_ids, samples=samples, resume=resume)
    run = load_run(job_dir)
    kind = get_method(job.method).model_cls.kind
    by_id = {s.sample_id: s for s in samples}
    for test_id in job.test_ids:
        suffix = "" if len(job.test_ids) == 1 else f"_{test_id}"
        for path, k in pred_paths(job_dir, kind, spec.extra_top_k):
            path = path.with_name(path.stem + suffix + ".h5ad")
            if resume and path.is_file():
                continue
            extra = {"fold": job.fold, "variant": job.variant, "name": job.name, "split": spec.split}
            pred = predict_sample(run, by_id[test_id], top_k=k, extra=extra)
            write_h5ad_atomic(pred, path)
    write_text_atomic(job_dir / "predictions.done", "ok\n")
    if not spec.keep_checkpoints:
        drop_checkpoints(job_dir)
    return job_dir


def drop_checkpoints(job_dir: Path) -> None:
    """Free the Lightning checkpoints of a finished job (they hold optimizer state and are only
    needed to resume training mid-job); ``model.pt`` keeps the trained weights. A cpu-preset
    benchmark keeps ~300 MB per job otherwise, 45 GB for her2st x 3 seeds with the ablation."""
    shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)


def write_benchmark_meta(spec: BenchmarkSpec, root: Path, folds: list, jobs: list[Job]) -> None:
    from cmrcnet.data.splits import save_split

    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / "benchmark.yaml", yaml.safe_dump({**spec.__dict__, "n_jobs": len(jobs)}, sort_keys=False))
    for f in folds:
        save_split(root / "splits" / f"fold{f.index}.json", f)


def run_benchmark(
    spec: BenchmarkSpec,
    out: str | Path,
    resume: bool = False,
    only_fold: int | None = None,
    jobs_parallel: int = 1,
    on_job: Callable[[Job, str, float], None] | None = None,
    argv_for_fold: Callable[[int], list[str]] | None = None,
) -> list[Path]:
    """Run (or resume) all jobs; with ``jobs_parallel > 1`` folds run as separate processes."""
    from cmrcnet.training import load_samples

    root = Path(out)
    base = make_config(spec.methods[0] if spec.methods else "cmrcnet", spec.preset, {"data.path": spec.data, **({"data.dataset": spec.dataset} if spec.dataset else {})})
    samples = load_samples(base)
    folds, jobs = plan_jobs(spec, samples)
    if only_fold is not None:
        if only_fold not in {f.index for f in folds}:
            raise ConfigError(f"--fold {only_fold} out of range (0..{len(folds) - 1})")
        jobs = [j for j in jobs if j.fold == only_fold]
    write_benchmark_meta(spec, root, folds, jobs)
    if jobs_parallel > 1 and only_fold is None and argv_for_fold is not None:
        return _run_fold_processes(folds, jobs_parallel, argv_for_fold, root)
    done: list[Path] = []
    for job in jobs:
        t0 = time.perf_counter()
        status = "skipped" if resume and job_complete(job.run_dir(root)) else "ran"
        done.append(run_job(spec, job, samples, root, resume))
        if on_job is not None:
            on_job(job, status, time.perf_counter() - t0)
    write_json_atomic(root / "benchmark_done.json", {"jobs": len(done), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return done


def _run_fold_processes(folds: list, n_parallel: int, argv_for_fold: Callable[[int], list[str]], root: Path) -> list[Path]:
    """One subprocess per fold, at most ``n_parallel`` at a time, threads split between them."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n_parallel))
    # Idle OpenMP threads spin by default; with several processes on few cores they steal the
    # cores from each other's compute: 2 fold processes on 2 cores ran 4-10x slower than one
    # alone (docs/PERFORMANCE.md). Sleeping waits remove that.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    pending = [f.index for f in folds]
    running: list[tuple[int, subprocess.Popen]] = []
    failed: list[int] = []
    (root / "logs").mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < n_parallel:
            k = pending.pop(0)
            logf = open(root / "logs" / f"fold{k}.log", "ab")
            running.append((k, subprocess.Popen([sys.executable, "-m", "cmrcnet", *argv_for_fold(k)], stdout=logf, stderr=subprocess.STDOUT, env=env)))
        time.sleep(0.5)
        for k, p in list(running):
            if p.poll() is not None:
                running.remove((k, p))
                if p.returncode != 0:
                    failed.append(k)
    if failed:
        raise ConfigError(f"fold(s) {failed} failed; see {root / 'logs'}")
    return sorted(root.glob("runs/*/seed*/fold*"))

"""Cross-validated benchmark: every (method, fold, seed) job through the same train/predict path.

Layout of a benchmark directory::

    DIR/benchmark.yaml                         settings of the benchmark (resolved)
    DIR/splits/fold{k}.json                    the folds (train/test sample ids)
    DIR/runs/{name}/seed{s}/fold{k}/           one run directory per job (see cmrcnet.training.fit)
    DIR/runs/{name}/seed{s}/fold{k}/pred.h5ad  prediction of the held-out sample(s) (k = config top_k)
    DIR/runs/{name}/seed{s}/fold{k}/pred_k250.h5ad, pred_k500.h5ad   methods whose predictor
                                               takes a k (retrieval), for Table 2
    DIR/logs/fold{k}.log                       output of each fold process (``jobs > 1``)
    DIR/report/                                tables and figures (``cmrcnet report DIR``)

``name`` is the method, or ``cmrcnet-{variant}`` for ablation variants; a variant's overrides
are recorded with its run and in its predictions (``uns["cmrcnet"]["variant_overrides"]``).
A job is complete when its run has ``done.json`` and all its prediction files exist;
``resume`` skips those, so a killed benchmark loses at most the job in flight. A finished
job's Lightning checkpoints are deleted (``model.pt`` stays) unless ``keep_checkpoints`` is set.

With ``jobs > 1`` folds run as separate processes (``python -m cmrcnet.benchmark DIR --fold K``),
each reading the settings from ``DIR/benchmark.yaml``: nothing is passed on a command line.
"""

from __future__ import annotations

import dataclasses
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
from cmrcnet.errors import ConfigError, InputError
from cmrcnet.evaluation.gene_sets import TABLE2_TOP_K
from cmrcnet.utils import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

#: The extra k of retrieval predictions: those Table 2 scores (:data:`TABLE2_TOP_K`).
EXTRA_TOP_K: tuple[int, ...] = tuple(sorted(set(TABLE2_TOP_K.values())))
SPEC_FILE = "benchmark.yaml"

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

    def describe(self, split: str) -> dict[str, Any]:
        """What the job's run records about itself (run.json, every prediction's uns)."""
        return {"name": self.name, "fold": self.fold, "split": split, "variant": self.variant,
                "variant_overrides": dict(self.overrides)}


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

    def save(self, path: Path, n_jobs: int) -> None:
        write_text_atomic(path, yaml.safe_dump({**dataclasses.asdict(self), "n_jobs": n_jobs}, sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "BenchmarkSpec":
        """The settings a benchmark directory was started with (its ``benchmark.yaml``)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"not a benchmark directory ({SPEC_FILE} missing)", path.parent)
        raw = yaml.safe_load(path.read_text()) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def overrides_for(overrides: dict[str, Any], method: str) -> dict[str, Any]:
    """One method's overrides: the plain ``key`` ones (every job), then its own ``method:key`` ones,
    e.g. ``stnet:model.encoder_mode=frozen`` beside HisToGene, which has no encoder options."""
    shared = {k: v for k, v in overrides.items() if ":" not in k}
    own = {k.partition(":")[2]: v for k, v in overrides.items() if k.partition(":")[0] == method and ":" in k}
    return {**shared, **own}


def check_method_overrides(spec: BenchmarkSpec) -> None:
    """``method:key`` overrides name a method of this benchmark (a typo would silently do nothing)."""
    methods = {"cmrcnet"} if spec.ablation else set(spec.methods)
    for k in spec.overrides:
        m, sep, key = k.partition(":")
        if sep and m not in methods:
            raise ConfigError(f"--set {k}: {m!r} is not a method of this benchmark ({', '.join(sorted(methods))})")
        if sep and not key:
            raise ConfigError(f"--set {k}: no config key after {m!r}:")


def job_config(spec: BenchmarkSpec, job: Job) -> RunConfig:
    ov: dict[str, Any] = {"data.path": spec.data, "seed": job.seed, "split.scheme": spec.split, "genes.selection": spec.gene_selection}
    if spec.dataset:
        ov["data.dataset"] = spec.dataset
    ov.update(overrides_for(spec.overrides, job.method))
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


def job_complete(job_dir: Path) -> bool:
    marker = job_dir / "predictions.done"
    return marker.is_file() and (job_dir / "done.json").is_file()


def run_job(spec: BenchmarkSpec, job: Job, samples: list[Sample], root: Path, resume: bool) -> Path:
    from cmrcnet.training import load_run, predict_sample, train, write_h5ad_atomic

    job_dir = job.run_dir(root)
    if resume and job_complete(job_dir):
        return job_dir
    cfg = job_config(spec, job)
    train(cfg, job_dir, job.test_ids, train_ids=job.train_ids, samples=samples, resume=resume,
          describe=job.describe(spec.split))
    run = load_run(job_dir)
    predictors = {"pred": run.predictor}
    for k in spec.extra_top_k:
        p = run.predictor.with_top_k(k)
        if p is not None:
            predictors[f"pred_k{k}"] = p
    by_id = {s.sample_id: s for s in samples}
    for test_id in job.test_ids:
        suffix = "" if len(job.test_ids) == 1 else f"_{test_id}"
        for stem, predictor in predictors.items():
            path = job_dir / f"{stem}{suffix}.h5ad"
            if resume and path.is_file():
                continue
            write_h5ad_atomic(predict_sample(run, by_id[test_id], predictor), path)
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
    spec.save(root / SPEC_FILE, len(jobs))
    for f in folds:
        save_split(root / "splits" / f"fold{f.index}.json", f)


def run_benchmark(
    spec: BenchmarkSpec,
    out: str | Path,
    *,
    resume: bool = False,
    fold: int | None = None,
    jobs: int = 1,
    on_job: Callable[[Job, str, float], None] | None = None,
) -> list[Path]:
    """Run (or resume) all jobs, or those of one ``fold``; returns the job directories.

    With ``jobs > 1`` folds run as that many parallel processes (threads split between them),
    each started from the saved ``benchmark.yaml``, so library callers get the same
    parallelism as ``cmrcnet benchmark --jobs``; their output goes to ``DIR/logs/fold{k}.log``.
    """
    from cmrcnet.training import load_samples

    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    check_method_overrides(spec)
    root = Path(out)
    data_ov = {k: v for k, v in spec.overrides.items() if k.startswith("data.")}  # e.g. data.skip_bad_samples
    base = make_config(spec.methods[0] if spec.methods else "cmrcnet", spec.preset,
                       {**data_ov, "data.path": spec.data, **({"data.dataset": spec.dataset} if spec.dataset else {})})
    samples = load_samples(base)
    folds, all_jobs = plan_jobs(spec, samples)
    for job in {j.name: j for j in all_jobs}.values():  # every method's config, before any work
        job_config(spec, job)
    selected = all_jobs
    if fold is not None:
        if fold not in {f.index for f in folds}:
            raise ConfigError(f"--fold {fold} out of range (0..{len(folds) - 1})")
        selected = [j for j in all_jobs if j.fold == fold]
    write_benchmark_meta(spec, root, folds, all_jobs)
    if jobs > 1 and fold is None:
        return _run_fold_processes([f.index for f in folds], jobs, root)
    done: list[Path] = []
    for job in selected:
        t0 = time.perf_counter()
        status = "skipped" if resume and job_complete(job.run_dir(root)) else "ran"
        done.append(run_job(spec, job, samples, root, resume))
        if on_job is not None:
            on_job(job, status, time.perf_counter() - t0)
    if fold is None:
        write_json_atomic(root / "benchmark_done.json", {"jobs": len(done), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return done


def fold_process_env(n_parallel: int) -> dict[str, str]:
    """Environment of the fold processes: each gets its share of the cores and sleeping OpenMP
    waits (spinning ones made 2 fold processes on 2 cores 4-10x slower than one alone,
    docs/PERFORMANCE.md), unless the user set these variables; this process's own defaults
    (:mod:`cmrcnet.runtime`) are not passed on as if they were the user's."""
    from cmrcnet.runtime import APPLIED, thread_defaults

    env = {k: v for k, v in os.environ.items() if APPLIED.get(k) != v}
    env.update(thread_defaults(env, n_parallel=n_parallel))
    return env


def _run_fold_processes(fold_ids: list[int], n_parallel: int, root: Path) -> list[Path]:
    """One process per fold (``python -m cmrcnet.benchmark ROOT --fold K``), at most ``n_parallel``
    at a time, threads split between them; every process reads ``ROOT/benchmark.yaml``."""
    env = fold_process_env(n_parallel)
    pending = list(fold_ids)
    running: list[tuple[int, subprocess.Popen]] = []
    failed: list[int] = []
    (root / "logs").mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < n_parallel:
            k = pending.pop(0)
            with open(root / "logs" / f"fold{k}.log", "ab") as logf:
                cmd = [sys.executable, "-m", "cmrcnet.benchmark", str(root), "--fold", str(k)]
                running.append((k, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)))
        time.sleep(0.5)
        for k, p in list(running):
            if p.poll() is not None:
                running.remove((k, p))
                if p.returncode != 0:
                    failed.append(k)
    if failed:
        raise ConfigError(f"fold(s) {failed} failed; see {root / 'logs'}")
    write_json_atomic(root / "benchmark_done.json", {"folds": len(fold_ids), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return sorted(root.glob("runs/*/seed*/fold*"))


def _fold_process_main(argv: list[str]) -> int:
    """Entry point of one fold process: the settings come from the benchmark directory."""
    import argparse

    from cmrcnet.errors import CmrcnetError

    ap = argparse.ArgumentParser(prog="python -m cmrcnet.benchmark", description="Run one fold of a benchmark directory.")
    ap.add_argument("root", type=Path)
    ap.add_argument("--fold", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("cmrcnet.progress").setLevel(logging.INFO)  # patch cutting, epochs: rate and ETA in the log

    def on_job(job: Job, status: str, dt: float) -> None:
        print(f"{status} {job.name} seed={job.seed} fold={job.fold} (test {','.join(job.test_ids)}) {dt:.1f} s", flush=True)

    try:
        spec = BenchmarkSpec.load(args.root / SPEC_FILE)
        run_benchmark(spec, args.root, resume=True, fold=args.fold, on_job=on_job)
    except CmrcnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_fold_process_main(sys.argv[1:]))

"""``cmrcnet benchmark`` and ``cmrcnet report``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from cmrcnet.cli import stdout_console
from cmrcnet.models import available_methods

console = stdout_console()


def benchmark_cmd(
    data: Path = typer.Option(..., "--data", help="Dataset folder."),
    out: Path = typer.Option(..., "--out", help="Benchmark directory."),
    methods: str = typer.Option(",".join(available_methods()), "--methods",
                                help=f"Comma-separated methods to compare, from: {', '.join(available_methods())}."),
    split: str = typer.Option("loo-sample", "--split", help="loo-sample (one fold per sample) or loo-patient."),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds; each fold is trained once per seed."),
    preset: str = typer.Option("cpu", "--preset", help="cpu (2-core machine), paper, tiny (tests)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset manifest (e.g. COAD for a HEST folder)."),
    transductive_genes: bool = typer.Option(False, "--transductive-genes", help="Paper's choice: HVG union over ALL samples (leaks the test sample)."),
    ablation: bool = typer.Option(False, "--ablation", help="Run the Table 5 ablation grid of CMRCNet instead of --methods."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Config override key=value for every job; method:key=value for one method's jobs (stnet:model.encoder_mode=frozen)."),
    resume: bool = typer.Option(False, "--resume", help="Skip finished jobs."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Run one fold only (one per machine on a cluster)."),
    jobs: int = typer.Option(1, "--jobs", help="Folds run as this many parallel processes."),
    report: bool = typer.Option(True, "--report/--no-report", help="Build the report when all jobs are done."),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help="Keep each finished job's Lightning checkpoints (about 300 MB per cpu-preset job); model.pt is always kept."),
    skip_bad: bool = typer.Option(False, "--skip-bad-samples", help="Go on without a sample that cannot be read or is degenerate (one warning each); default: stop, naming it."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print INFO messages (what each step does)."),
) -> None:
    """Cross-validated comparison of methods; writes one run per (method, fold, seed)."""
    from cmrcnet.benchmark import BenchmarkSpec, run_benchmark
    from cmrcnet.cli.run import _setup_logging
    from cmrcnet.config import parse_overrides
    from cmrcnet.errors import ConfigError
    from cmrcnet.utils import check_writable_dir

    _setup_logging(verbose)
    check_writable_dir(out, "--out")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    spec = BenchmarkSpec(
        data=str(data),
        methods=[m.strip() for m in methods.split(",") if m.strip()],
        split=split,
        seeds=seed_list,
        preset=preset,
        dataset=dataset,
        gene_selection="all" if transductive_genes else "train",
        ablation=ablation,
        overrides={**parse_overrides(overrides), **({"data.skip_bad_samples": "true"} if skip_bad else {})},
        keep_checkpoints=keep_checkpoints,
    )
    t0 = time.perf_counter()

    def on_job(job, status, dt):
        console.print(f"[{'dim' if status == 'skipped' else 'green'}]{status}[/] {job.name} seed={job.seed} fold={job.fold} (test {','.join(job.test_ids)}) {dt:.1f} s")

    run_benchmark(spec, out, resume=resume, fold=fold, jobs=jobs, on_job=on_job)
    console.print(f"benchmark finished in {(time.perf_counter() - t0) / 60:.1f} min -> {out}")
    if report and fold is None:
        from cmrcnet.report import build_report

        html, md = build_report(out)
        console.print(f"report: {html} and {md}")


def report_cmd(
    bench_dir: Path = typer.Argument(..., help="Benchmark directory (or any folder of prediction .h5ad files)."),
    allow_incomplete: bool = typer.Option(
        False, "--allow-incomplete",
        help="Compare methods even if they were scored on different held-out samples or seeds (the report says so)."),
) -> None:
    """Tables, figures and one self-contained HTML page for a benchmark directory.

    Prediction files are found by content (an .h5ad with layers 'predicted' and 'observed'), whatever their name."""
    from cmrcnet.report import build_report

    html, md = build_report(bench_dir, allow_incomplete=allow_incomplete)
    console.print(f"report: {html} and {md}")


def register(app: typer.Typer) -> None:
    app.command("benchmark")(benchmark_cmd)
    app.command("report")(report_cmd)

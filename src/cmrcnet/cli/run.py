"""``cmrcnet train``, ``cmrcnet predict`` and the main job ``cmrcnet demo``."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cmrcnet.cli import stdout_console
from cmrcnet.errors import InputError
from cmrcnet.models import available_methods

console = stdout_console()


class _Plain(logging.Formatter):
    """Off a terminal: ``warning: ...`` / ``error: ...`` as the CLI prints them, INFO lines with the time."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        return f"{self.formatTime(record, '%H:%M:%S')} {msg}"


class _OncePerText(logging.Filter):
    """A warning that was also issued with ``warnings.warn`` (or repeated) is shown once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        from cmrcnet.cli import _shown

        text = record.getMessage().strip()
        if text in _shown:
            return False
        _shown.add(text)
        return True


def _setup_logging(verbose: bool = False) -> None:
    """Logging of every command: rich on a terminal, plain lines otherwise; warnings once;
    progress lines (``cmrcnet.progress``) always at INFO, so long steps report under nohup too."""
    from cmrcnet.progress import stderr_is_terminal

    if stderr_is_terminal():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Plain())
    handler.addFilter(_OncePerText())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("cmrcnet.progress").setLevel(logging.INFO)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING if not verbose else logging.INFO)


def build_run_config(
    method: str,
    preset: str,
    data: Optional[Path],
    dataset: Optional[str],
    config: Optional[Path],
    overrides: Optional[list[str]],
    seed: Optional[int],
):
    from cmrcnet.config import load_yaml, make_config, parse_overrides

    base = load_yaml(config) if config else None
    ov = parse_overrides(overrides)
    if data is not None:
        ov["data.path"] = str(data)
    if dataset:
        ov["data.dataset"] = dataset
    if seed is not None:
        ov["seed"] = str(seed)
    return make_config(method, preset, ov, base=base)


SEED_HELP = "Random seed (python, numpy, torch; the validation split and augmentation)."
VERBOSE_HELP = "Also print INFO messages (what each step does)."
SKIP_HELP = "Go on without a sample that cannot be read or is degenerate (one warning each); default: stop, naming it."


def train_cmd(
    data: Path = typer.Option(..., "--data", help="Dataset folder (her2st, legacy ST, Visium, HEST-1k)."),
    out: Path = typer.Option(..., "--out", help="Run directory to write."),
    test: Optional[str] = typer.Option(
        None, "--test", help="Held-out sample id(s), comma-separated; omit (or 'none') to train a final model on every sample."),
    method: str = typer.Option("cmrcnet", "--method", help=f"One of: {', '.join(available_methods())}."),
    preset: str = typer.Option("cpu", "--preset", help="cpu (2-core machine), paper, tiny (tests)."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Config override key=value (repeatable); typed and range-checked."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config to start from."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset manifest name."),
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint; skip if complete."),
    skip_bad: bool = typer.Option(False, "--skip-bad-samples", help=SKIP_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
) -> None:
    """Train a method and write a run directory (samples held out with --test, or none: a final model)."""
    from cmrcnet import tl
    from cmrcnet.config import parse_overrides
    from cmrcnet.utils import check_writable_dir

    _setup_logging(verbose)
    check_writable_dir(out, "--out")
    t0 = time.perf_counter()
    run = tl.train(data, out=out, method=method, test=test, preset=preset, seed=seed,
                   overrides=parse_overrides(overrides), config=config, dataset=dataset, resume=resume,
                   skip_bad_samples=skip_bad)
    held = run.info.get("test_ids") or []
    what = f"{', '.join(held)} held out" if held else f"final model on all {len(run.info.get('train_ids', []))} samples"
    console.print(f"[green]trained[/] {run.cfg.method} ({run.cfg.preset}; {what}) in {time.perf_counter() - t0:.1f} s "
                  f"-> {run.run_dir}")


def _finite_positive(value: Optional[float], option: str) -> None:
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise InputError(f"{option} must be a positive finite number, got {value}")


def _is_cohort(images: list[Path], out: Path) -> bool:
    """Several slides, a folder or a CSV list, or an --out without a file suffix: one output per slide."""
    return (len(images) > 1 or images[0].is_dir() or images[0].suffix.lower() == ".csv"
            or out.suffix.lower() not in (".h5ad", ".zarr"))


def _format_for(out: Path, fmt: Optional[str]) -> str:
    from cmrcnet.cohort import check_format

    if fmt is not None:
        return check_format(fmt)
    return "spatialdata" if out.suffix.lower() == ".zarr" else "h5ad"


def predict_cmd(
    run: Path = typer.Option(..., "--run", help="Run directory written by `cmrcnet train`."),
    out: Path = typer.Option(..., "--out", help="Output: a .h5ad or .zarr file; for several slides, a folder."),
    sample: Optional[Path] = typer.Option(None, "--sample", help="Dataset folder holding the sample."),
    sample_id: Optional[str] = typer.Option(
        None, "--sample-id", help="Which sample of --sample; with one --image, the id to give the slide (default: file name)."),
    image: Optional[list[Path]] = typer.Option(
        None, "--image", help="Slide(s) without spot table (SVS, NDPI, MRXS, SCN, OME-TIFF, TIFF, JPEG/PNG), folders of slides, "
        "or CSV lists (column image): predict a tissue grid. Several may follow one --image."),
    more_images: Optional[list[Path]] = typer.Argument(
        None, help="More slides after --image (`--image A.svs B.ndpi C.mrxs`).", show_default=False),
    um_per_px: Optional[float] = typer.Option(
        None, "--um-per-px", help="Pixel size of the slide(s) (micrometres per pixel); default: read from each slide."),
    pitch_um: float = typer.Option(100.0, "--pitch-um", help="Grid pitch for --image (micrometres)."),
    fmt: Optional[str] = typer.Option(
        None, "--format", help="h5ad (AnnData, default) or spatialdata (a SpatialData .zarr store); default from --out's suffix."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Cohort: predict slides whose output exists again (default: skip them)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Neighbours for retrieval methods."),
    genes: Optional[str] = typer.Option(None, "--genes", help="Comma-separated genes to draw as PNG maps (checked before predicting)."),
    overrides: Optional[list[str]] = typer.Option(
        None, "--set", help="Retrieval override key=value, e.g. retrieval.backend=faiss-ivfpq (repeatable)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
) -> None:
    """Predict expression for every spot of a sample, or a grid over one slide or a cohort of slides."""
    from cmrcnet import tl
    from cmrcnet.config import parse_overrides
    from cmrcnet.data.genes import resolve_gene_names
    from cmrcnet.utils import check_writable_dir, check_writable_file

    _setup_logging(verbose)
    images = list(image or []) + list(more_images or [])
    if more_images and not image:
        raise InputError(f"unexpected argument {more_images[0]} (slides follow --image)")
    # everything that can be checked is checked before the (possibly long) prediction
    if (sample is None) == (not images):
        raise InputError("give exactly one of --sample (a dataset folder) or --image (slides)")
    _finite_positive(um_per_px, "--um-per-px")
    _finite_positive(pitch_um, "--pitch-um")
    cohort = bool(images) and _is_cohort(images, out)
    if cohort:
        check_writable_dir(out, "--out")
        fmt = _format_for(Path("x.zarr" if fmt == "spatialdata" else "x.h5ad"), fmt)
    else:
        fmt = _format_for(out, fmt)
        if fmt == "h5ad":
            check_writable_file(out, "--out")
    trained = tl.load(run, overrides=parse_overrides(overrides))
    wanted = resolve_gene_names(genes.split(","), trained.genes, "--genes", f"run {run} (genes.txt)") if genes else []
    trained.predictor_for(top_k)  # --top-k checked against the method now
    t0 = time.perf_counter()
    if cohort:
        from cmrcnet.cohort import collect_slides, predict_cohort

        jobs = collect_slides(images, um_per_px=um_per_px)
        if sample_id and len(jobs) == 1:
            jobs[0].sample_id = sample_id
        summary = predict_cohort(trained, jobs, out, fmt=fmt, pitch_um=pitch_um, top_k=top_k, resume=not overwrite,
                                 console=console)
        _print_cohort(summary, time.perf_counter() - t0, out)
        return
    out_path = out.with_suffix(".zarr") if fmt == "spatialdata" and out.suffix.lower() != ".zarr" else out
    if images:
        pred = tl.predict(trained, image=images[0], um_per_px=um_per_px, pitch_um=pitch_um, top_k=top_k,
                          sample_id=sample_id, out=out_path)
    else:
        pred = tl.predict(trained, sample=sample, sample_id=sample_id, top_k=top_k, out=out_path)
    dt = time.perf_counter() - t0
    where = (pred.uns.get("cmrcnet") or {})
    src = f", {where.get('um_per_px', 0):.4g} um/px from {where.get('pixel_size_source')}" if images else ""
    console.print(f"[green]predicted[/] {pred.n_obs} spots x {pred.n_vars} genes in {dt:.1f} s{src} -> {out_path}")
    if wanted:
        from cmrcnet.plots import spatial_maps

        png = out_path.with_suffix(".maps.png")
        spatial_maps({trained.cfg.method: pred}, wanted, out=png)
        console.print(f"maps -> {png}")


def _print_cohort(summary, seconds: float, out: Path) -> None:
    import pandas as pd

    from cmrcnet.cohort import SUMMARY_FILE

    def cell(value, fmt: str) -> str:
        return "-" if pd.isna(value) else format(value, fmt)

    table = Table(title=f"{len(summary)} slide(s) -> {out}")
    for col in ("slide", "um/px (source)", "spots", "seconds", "output", "status"):
        table.add_column(col)
    for _, r in summary.iterrows():
        um = "-" if pd.isna(r["um_per_px"]) else f"{r['um_per_px']:.4g} ({r['pixel_size_source']})"
        spots = cell(r["spots"], ",.0f")
        secs = cell(r["seconds"], ".1f")
        table.add_row(Path(str(r["slide"])).name, um, spots, secs, Path(str(r["output"])).name, str(r["status"]))
    console.print(table)
    console.print(f"summary -> {out / SUMMARY_FILE}; took {seconds:.1f} s")


def resolve_her2st_dir(data_dir: Optional[Path]) -> Path:
    """--data-dir, else $CMRCNET_DATA_DIR/her2st, else a downloaded copy in the cache."""
    candidates = []
    if data_dir is not None:
        candidates.append(data_dir)
        candidates.append(data_dir / "her2st")
    elif os.environ.get("CMRCNET_DATA_DIR"):
        root = Path(os.environ["CMRCNET_DATA_DIR"])
        candidates += [root / "her2st", root]
    for c in candidates:
        if (c / "ST-cnts").is_dir():
            return c
    if data_dir is not None:
        raise InputError("no her2st data (ST-cnts/, ST-spotfiles/, ST-imgs/) found", data_dir)
    from cmrcnet.data.download import download_her2st
    from cmrcnet.data.patches import default_cache_dir

    dest = default_cache_dir() / "her2st"
    console.print(f"no local her2st copy; downloading to {dest}")
    return download_her2st(dest)


def demo_cmd(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="her2st folder (default: $CMRCNET_DATA_DIR/her2st, else download)."),
    test: str = typer.Option("C3", "--test", help="Held-out section."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder."),
    preset: str = typer.Option("cpu", "--preset", help="cpu (2-core machine), paper, tiny (tests)."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Config override key=value (repeatable)."),
    seed: int = typer.Option(0, "--seed", help=SEED_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
) -> None:
    """Main job: train CMRCNet on her2st with one section held out, predict it, and score it."""
    from cmrcnet.evaluation import evaluate_prediction
    from cmrcnet.plots import spatial_maps
    from cmrcnet.training import load_run, load_samples, predict_sample, train, write_h5ad_atomic
    from cmrcnet.utils import check_writable_dir, write_json_atomic

    _setup_logging(verbose)
    check_writable_dir(out, "--out")
    t0 = time.perf_counter()
    her2st = resolve_her2st_dir(data_dir)
    cfg = build_run_config("cmrcnet", preset, her2st, None, None, overrides, seed)
    console.print(f"[bold]cmrcnet demo[/]: CMRCNet ({preset} preset) on her2st, {test} held out")
    console.print("reading her2st")
    samples = load_samples(cfg)
    console.print(f"read {len(samples)} sections: " + ", ".join(f"{s.sample_id} ({s.n_spots} spots)" for s in samples))
    run_dir = out / "run"
    console.print("cutting patches, selecting genes, training (this takes a few minutes)")
    train(cfg, run_dir, [test], samples=samples, resume=True)
    t_train = time.perf_counter() - t0
    trained = load_run(run_dir)
    held = next(s for s in samples if s.sample_id == test)
    pred = predict_sample(trained, held)
    write_h5ad_atomic(pred, out / "pred.h5ad")
    genes_df, summary = evaluate_prediction(pred, trained.markers)
    from cmrcnet.utils import atomic_path

    with atomic_path(out / "per_gene.csv") as tmp:
        genes_df.to_csv(tmp, index=False)
    with atomic_path(out / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    markers = [g for g in ("ERBB2", "GATA3", "MKI67", "ESR1") if g in pred.var_names]
    if markers:
        spatial_maps({"CMRCNet": pred}, markers, out=out / "spatial_maps.png")
    total = time.perf_counter() - t0
    table = Table(title=f"Held-out {test}: PCC per gene set ({pred.n_vars} genes predicted, {pred.n_obs} spots)")
    for col in ("set", "n_genes", "mean_pcc", "median_pcc", "n_constant"):
        table.add_column(col)
    for _, r in summary.iterrows():
        table.add_row(str(r["set"]), str(int(r["n_genes"])), f"{r['mean_pcc']:.3f}", f"{r['median_pcc']:.3f}", str(int(r["n_constant"])))
    console.print(table)
    write_json_atomic(out / "demo.json", {"test": test, "preset": preset, "seed": seed, "train_seconds": round(t_train, 1), "total_seconds": round(total, 1), "summary": summary.to_dict(orient="records")})
    console.print(f"outputs in {out} (pred.h5ad, per_gene.csv, summary.csv, spatial_maps.png); took {total / 60:.1f} min")


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("predict")(predict_cmd)
    app.command("demo")(demo_cmd)

"""Predict a cohort of slides: one output per slide, atomic, resumable, with a summary table.

Inputs are slide files, folders of slides, or CSV lists (column ``image``, optional ``sample_id``
and ``um_per_px``; relative paths are relative to the CSV). Everything that can be checked is
checked for every slide before the first prediction starts: the file opens, it has a pixel size
(metadata or an override), tissue is found and the grid is of sane size. Then slides run one
after the other; each output appears only when complete, so a killed run leaves finished slides
and nothing half-written, and a re-run skips the slides whose output exists (``resume=True``).
The summary (slide, µm/px and where it was read, spots, seconds, output) is rewritten after every
slide as ``cohort.csv`` in the output folder.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from cmrcnet.errors import InputError

if TYPE_CHECKING:
    from cmrcnet.training.predict import TrainedRun

log = logging.getLogger(__name__)

#: Files a folder input contributes: scanner formats OpenSlide reads, TIFF/OME-TIFF, JPEG/PNG.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".tif", ".tiff", ".btf",
                  ".jpg", ".jpeg", ".png")
#: Output formats: AnnData (``.h5ad``, the default) or a SpatialData store (``.zarr``).
FORMATS = {"h5ad": ".h5ad", "spatialdata": ".zarr"}
SUMMARY_FILE = "cohort.csv"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class SlideJob:
    """One slide of a cohort; ``um_per_px`` overrides the slide's metadata when given."""

    image: Path
    sample_id: str
    um_per_px: float | None = None


def slide_id(path: Path) -> str:
    """``B1.ome.tif`` -> ``B1``: the file name without its (double) suffix."""
    name = path.name
    for suf in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def _csv_jobs(csv: Path) -> list[SlideJob]:
    try:
        df = pd.read_csv(csv)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read the slide list ({type(e).__name__}: {e})", csv) from None
    col = next((c for c in ("image", "path", "slide") if c in df.columns), None)
    if col is None:
        raise InputError(f"slide list needs a column 'image' (has: {', '.join(map(str, df.columns))})", csv)
    jobs = []
    for i, row in df.iterrows():
        if pd.isna(row[col]) or not str(row[col]).strip():
            raise InputError(f"row {i + 2}: empty {col!r}", csv)
        p = Path(str(row[col]).strip()).expanduser()
        p = p if p.is_absolute() else csv.parent / p
        sid = str(row["sample_id"]).strip() if "sample_id" in df.columns and not pd.isna(row["sample_id"]) else slide_id(p)
        um = None
        if "um_per_px" in df.columns and not pd.isna(row["um_per_px"]):
            um = float(row["um_per_px"])
            if not (np.isfinite(um) and um > 0):
                raise InputError(f"row {i + 2}: um_per_px must be a positive number, got {row['um_per_px']!r}", csv)
        jobs.append(SlideJob(p, sid, um))
    return jobs


def collect_slides(inputs: Iterable[str | Path], um_per_px: float | None = None) -> list[SlideJob]:
    """The cohort's slides from files, folders (their slide files, sorted) and CSV lists; ids unique."""
    jobs: list[SlideJob] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir() and p.suffix.lower() != ".zarr":
            found = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(SLIDE_SUFFIXES)
                           and not f.name.startswith("."))
            if not found:
                raise InputError(f"no slide files ({', '.join(SLIDE_SUFFIXES)}) in this folder", p)
            jobs += [SlideJob(f, slide_id(f)) for f in found]
        elif p.suffix.lower() == ".csv":
            if not p.is_file():
                raise InputError("slide list not found", p)
            jobs += _csv_jobs(p)
        else:
            if not p.exists():
                raise InputError("image file not found", p)
            jobs.append(SlideJob(p, slide_id(p)))
    if not jobs:
        raise InputError("no slides given")
    if um_per_px is not None:
        for j in jobs:
            j.um_per_px = j.um_per_px if j.um_per_px is not None else float(um_per_px)
    seen: dict[str, Path] = {}
    for j in jobs:
        if j.sample_id in seen:
            raise InputError(f"two slides have the id {j.sample_id!r} ({seen[j.sample_id]} and {j.image}); "
                             "give unique ids in a CSV list (column sample_id)", j.image)
        seen[j.sample_id] = j.image
    return jobs


def output_path(out_dir: Path, job: SlideJob, fmt: str) -> Path:
    return Path(out_dir) / f"{_UNSAFE.sub('_', job.sample_id) or 'slide'}{FORMATS[fmt]}"


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def predict_cohort(
    run: "TrainedRun",
    jobs: Sequence[SlideJob],
    out_dir: str | Path,
    *,
    fmt: str = "h5ad",
    pitch_um: float = 100.0,
    top_k: int | None = None,
    resume: bool = True,
    console=None,
    on_slide: Callable[[dict], None] | None = None,
) -> pd.DataFrame:
    """Predict every slide of ``jobs`` into ``out_dir``; returns the summary table (also ``cohort.csv``)."""
    from cmrcnet.progress import CohortProgress
    from cmrcnet.tiling import grid_sample
    from cmrcnet.utils import atomic_path, check_writable_dir

    check_format(fmt)
    out_dir = check_writable_dir(Path(out_dir), "--out")
    predictor = run.predictor_for(top_k)
    previous = _previous_rows(out_dir)
    rows: dict[str, dict] = {}
    todo = []
    for job in jobs:  # everything checkable, for every slide, before the first prediction
        out = output_path(out_dir, job, fmt)
        if resume and out.exists():
            rows[job.sample_id] = {**previous.get(job.sample_id, _row(job, out)), "status": "done earlier"}
            continue
        smp = grid_sample(job.image, job.um_per_px, pitch_um=pitch_um, sample_id=job.sample_id)
        smp.image.release()
        todo.append((job, smp, out))
        rows[job.sample_id] = {**_row(job, out), "um_per_px": smp.um_per_px, "pixel_size_source": smp.pixel_size_source,
                               "spots": smp.n_spots, "status": "to do"}
    _write_summary(out_dir, jobs, rows, atomic_path)
    total = sum(s.n_spots for _, s, _ in todo)
    if todo:
        log.info("cohort: %d slide(s) to predict (%s spots), %d done earlier", len(todo), f"{total:,}",
                 len(jobs) - len(todo))
    with CohortProgress(total, "spots", console=console) as bar:
        for i, (job, smp, out) in enumerate(todo, 1):
            t0 = time.perf_counter()
            advance = bar.slide(f"{job.sample_id} ({i}/{len(todo)})", smp.n_spots)
            write_prediction(run, smp, out, fmt, predictor=predictor, progress=advance)
            rows[job.sample_id].update(seconds=round(time.perf_counter() - t0, 1), status="predicted")
            _write_summary(out_dir, jobs, rows, atomic_path)
            if on_slide is not None:
                on_slide(rows[job.sample_id])
    return _summary_frame(jobs, rows)


def write_prediction(run: "TrainedRun", sample, out: Path, fmt: str, *, predictor=None, progress=None):
    """Predict a slide's grid (patches cut as needed) into ``out``: a streamed ``.h5ad`` (memory
    independent of the number of spots), or a SpatialData ``.zarr`` store."""
    from cmrcnet.training.predict import predict_streaming

    if fmt == "spatialdata":
        from cmrcnet.export import write_spatialdata

        pred = predict_streaming(run, sample, predictor, progress=progress)
        write_spatialdata(pred, out, sample.image)
        sample.image.release()
        return pred
    return predict_streaming(run, sample, predictor, progress=progress, out=out)


def _row(job: SlideJob, out: Path) -> dict:
    return {"sample_id": job.sample_id, "slide": str(job.image), "um_per_px": job.um_per_px,
            "pixel_size_source": "user" if job.um_per_px is not None else "", "spots": None, "seconds": None,
            "output": str(out), "status": ""}


def _previous_rows(out_dir: Path) -> dict[str, dict]:
    path = out_dir / SUMMARY_FILE
    if not path.is_file():
        return {}
    try:
        df = pd.read_csv(path, dtype={"sample_id": str})
    except Exception:  # noqa: BLE001 - a summary we cannot read is rebuilt
        return {}
    return {str(r["sample_id"]): {k: (None if pd.isna(v) else v) for k, v in r.items()} for _, r in df.iterrows()}


def _summary_frame(jobs: Sequence[SlideJob], rows: dict[str, dict]) -> pd.DataFrame:
    cols = ["sample_id", "slide", "um_per_px", "pixel_size_source", "spots", "seconds", "output", "status"]
    return pd.DataFrame([rows[j.sample_id] for j in jobs], columns=cols)


def _write_summary(out_dir: Path, jobs, rows, atomic_path) -> None:
    with atomic_path(out_dir / SUMMARY_FILE) as tmp:
        _summary_frame(jobs, rows).to_csv(tmp, index=False)

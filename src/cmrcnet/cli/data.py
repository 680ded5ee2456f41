"""``cmrcnet data ...``: inspect, download, convert and synthesise datasets.

Thin wrappers over :mod:`cmrcnet.data.readers`, :mod:`cmrcnet.data.download` and
:mod:`cmrcnet.data.synthetic`. Errors are raised as :class:`~cmrcnet.errors.CmrcnetError`
and printed as one line by :func:`cmrcnet.cli.main`. Reader warnings (e.g. spots found
in only one of two tables) are shown as yellow ``warning:`` lines.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from cmrcnet.cli import stdout_console
from cmrcnet.errors import InputError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = stdout_console()
err_console = Console(stderr=True)


def _wide() -> Console:
    """The stdout console (tables as wide as their content when not a terminal)."""
    return console


@contextlib.contextmanager
def _shown_warnings() -> Iterator[None]:
    """Collect Python warnings and print each as one line (instead of the file/line noise)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, (UserWarning, RuntimeWarning)):
                    from cmrcnet.cli import show_warning_once

                    show_warning_once(str(w.message))


SKIP_HELP = "Go on without a sample that cannot be read (one warning each); default: stop, naming it."


def _read_or_skip(path: Path, sid: str, fmt: str, skip_bad: bool, several: bool = True):
    """``read_sample``, with the sample named in the error; None (and a warning) when skipping."""
    from cmrcnet.data.readers import read_sample, sample_error

    try:
        return read_sample(path, sid, fmt)
    except InputError as e:
        if not skip_bad:
            raise sample_error(sid, e, several) from None
        where = f"{e.path}: " if e.path is not None else ""
        warnings.warn(f"skipping sample {sid}: {where}{e.message}", UserWarning, stacklevel=2)
        return None


def _split(value: Optional[str]) -> Optional[list[str]]:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command("info")
def info(
    path: Path = typer.Argument(..., help="Dataset folder (her2st, legacy-st, visium or hest layout)."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="Force a format instead of auto-detecting."),
    samples: Optional[str] = typer.Option(None, "--samples", help="Comma-separated sample ids (default: all)."),
    check_images: bool = typer.Option(False, "--check-images", help="Decode every image fully (catches damaged files)."),
    skip_bad: bool = typer.Option(False, "--skip-bad-samples", help=SKIP_HELP),
) -> None:
    """One row per sample: patient, spots, genes, image size, pixel size, spot diameter."""
    from cmrcnet.data.readers import detect_format, list_sample_ids, verify_image

    fmt = fmt or detect_format(path)
    ids = _split(samples) or list_sample_ids(path, fmt)
    if not ids:
        raise InputError(f"no samples found in this {fmt} dataset", path)
    table = Table(title=f"{path} ({fmt})", box=box.SIMPLE_HEAD)
    for col, just in (("sample", "left"), ("patient", "left"), ("spots", "right"), ("genes", "right"),
                      ("image WxH", "right"), ("um/px", "right"), ("spot um", "right"), ("platform", "left")):
        table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    with _shown_warnings():
        for sid in ids:
            s = _read_or_skip(path, sid, fmt, skip_bad, len(ids) > 1)
            if s is None:
                continue
            if check_images:
                verify_image(s)
            w, h = s.image.size if s.image is not None else (0, 0)
            est = " est." if s.pixel_size_source == "estimated" else ""
            table.add_row(
                s.sample_id, s.patient_id, f"{s.n_spots:,}", f"{s.n_genes:,}", f"{w}x{h}",
                f"{s.um_per_px:.4f}{est}", f"{s.spot_diameter_um:g}", s.platform,
            )
            if s.image is not None:
                s.image.release()
    _wide().print(table)


@app.command("download")
def download(
    name: str = typer.Argument(..., help="Dataset to download (only: her2st)."),
    dest: Path = typer.Option(..., "--dest", help="Destination folder."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Base URL of the data folder (mirror)."),
    sections: Optional[str] = typer.Option(None, "--sections", help="Comma-separated sections, e.g. C2,C3 (default: all six)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Download a public dataset (her2st: six sections with full-resolution images)."""
    from cmrcnet.data.download import DEFAULT_HER2ST_URL, download_her2st

    if name.lower() != "her2st":
        raise InputError(f"unknown dataset {name!r} (available: her2st)")
    out = download_her2st(dest, base_url or DEFAULT_HER2ST_URL, _split(sections), progress=not quiet)
    console.print(f"her2st in {out}")


@app.command("convert")
def convert(
    path: Path = typer.Argument(..., help="Dataset folder to convert."),
    to_hest: Path = typer.Option(..., "--to-hest", help="Destination folder (HEST-1k layout)."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="Force the input format."),
    samples: Optional[str] = typer.Option(None, "--samples", help="Comma-separated sample ids (default: all)."),
    patches: bool = typer.Option(False, "--patches", help="Also write patches/{id}.h5 (112 um, 224 px)."),
    skip_bad: bool = typer.Option(False, "--skip-bad-samples", help=SKIP_HELP),
) -> None:
    """Convert a dataset to the HEST-1k layout, one sample at a time (bounded memory)."""
    from cmrcnet.data.readers import detect_format, list_sample_ids
    from cmrcnet.data.readers.hest import write_hest
    from cmrcnet.utils import check_writable_dir

    fmt = fmt or detect_format(path)
    ids = _split(samples) or list_sample_ids(path, fmt)
    check_writable_dir(to_hest, "--to-hest")
    with _shown_warnings():
        for sid in ids:
            s = _read_or_skip(path, sid, fmt, skip_bad, len(ids) > 1)
            if s is None:
                continue
            write_hest([s], to_hest, patches=patches)
            console.print(f"{sid}: {s.n_spots} spots, {s.n_genes} genes -> {to_hest}")


@app.command("synthetic")
def synthetic(
    dest: Path = typer.Argument(..., help="Destination folder (HEST-1k layout)."),
    n_samples: int = typer.Option(4, "--n-samples", min=1, help="Number of samples (sections)."),
    n_patients: int = typer.Option(2, "--n-patients", min=1, help="Patients the samples are spread over."),
    n_spots: int = typer.Option(150, "--n-spots", min=1, help="Spots per sample."),
    n_genes: int = typer.Option(60, "--n-genes", min=1, help="Genes per sample."),
    px_per_spot: int = typer.Option(20, "--px-per-spot", min=2, help="Spot pitch in pixels."),
    platform: str = typer.Option("legacy-st", "--platform", help="legacy-st (square grid) or visium (hexagonal)."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the synthetic images and counts."),
) -> None:
    """Write a small synthetic dataset whose expression is predictable from the image."""
    from cmrcnet.data.synthetic import GEOMETRY, make_synthetic_dataset

    if platform not in GEOMETRY:
        raise InputError(f"unknown platform {platform!r} (choose from {', '.join(GEOMETRY)})")
    out = make_synthetic_dataset(
        dest, n_samples=n_samples, n_patients=n_patients, n_spots=n_spots, n_genes=n_genes,
        img_px_per_spot=px_per_spot, seed=seed, platform=platform,
    )
    console.print(f"synthetic dataset ({n_samples} samples) in {out}")

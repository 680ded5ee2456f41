"""Dataset readers: every supported on-disk format -> a list of canonical :class:`Sample`.

Formats (see ``docs/data.md``): ``her2st``, ``legacy-st`` (STUtility-style flat
folders), ``visium`` (Space Ranger outputs) and ``hest`` (HEST-1k layout). Each is a
:class:`ReaderSpec` in :data:`READERS`; :func:`detect_format` tries them in order.

An optional ``samples.tsv`` / ``samples.csv`` (columns ``sample_id``, ``patient_id``) in
the dataset folder overrides the patient of each listed sample, for any format.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cmrcnet.data.readers import hest, legacy_st, visium
from cmrcnet.data.readers._common import patient_table
from cmrcnet.data.sample import Sample
from cmrcnet.errors import InputError

__all__ = [
    "READERS",
    "ReaderSpec",
    "SampleList",
    "attach_images",
    "attach_lowres",
    "detect_format",
    "list_sample_ids",
    "read_dataset",
    "read_sample",
    "register_reader",
    "verify_image",
]


@dataclass(frozen=True)
class ReaderSpec:
    """How to recognise, list and read one on-disk format."""

    name: str
    detect: Callable[[Path], bool]
    list_ids: Callable[[Path], list[str]]
    read: Callable[[Path, str], Sample]
    layout: str
    """One line describing the expected files, used in error messages."""


#: Registered readers, in detection order (first match wins).
READERS: dict[str, ReaderSpec] = {}


def register_reader(spec: ReaderSpec) -> None:
    """Add (or replace) a reader; new formats plug in here."""
    READERS[spec.name] = spec


register_reader(ReaderSpec("hest", hest.detect_hest, hest.list_hest, hest.read_hest, "st/*.h5ad + wsis/ + metadata/"))
register_reader(
    ReaderSpec(
        "her2st", legacy_st.detect_her2st, legacy_st.list_her2st, legacy_st.read_her2st,
        "ST-cnts/ + ST-spotfiles/ + ST-imgs/",
    )
)
register_reader(
    ReaderSpec(
        "visium", visium.detect_visium, visium.list_visium, visium.read_visium,
        "spatial/tissue_positions*.csv (or subfolders with it)",
    )
)
register_reader(
    ReaderSpec(
        "legacy-st", legacy_st.detect_legacy_st, legacy_st.list_legacy_st, legacy_st.read_legacy_st,
        "alignment_table_{id}.tsv + {id}.tsv + {id}.jpg",
    )
)


def _folder(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError("dataset folder not found", p)
    if not p.is_dir():
        raise InputError("expected a dataset folder, got a file", p)
    return p


def _spec(path: Path, fmt: str | None) -> ReaderSpec:
    if fmt is None:
        return READERS[detect_format(path)]
    if fmt not in READERS:
        raise InputError(f"unknown format {fmt!r} (choose from {', '.join(READERS)})", path)
    return READERS[fmt]


def detect_format(path: str | Path) -> str:
    """Name of the format of the dataset folder ``path``; InputError if none matches."""
    p = _folder(path)
    for spec in READERS.values():
        if spec.detect(p):
            return spec.name
    expected = "; ".join(f"{s.name}: {s.layout}" for s in READERS.values())
    raise InputError(f"no supported dataset found: expected {expected}", p)


def list_sample_ids(path: str | Path, fmt: str | None = None) -> list[str]:
    """Sample ids in the dataset, from file names only (no counts are parsed)."""
    p = _folder(path)
    return _spec(p, fmt).list_ids(p)


def read_sample(path: str | Path, sample_id: str, fmt: str | None = None) -> Sample:
    """Read one sample of the dataset at ``path`` (format auto-detected unless ``fmt``)."""
    p = _folder(path)
    spec = _spec(p, fmt)
    ids = spec.list_ids(p)
    if sample_id not in ids:
        raise InputError(f"no sample {sample_id!r} in this {spec.name} dataset (has: {', '.join(ids) or 'none'})", p)
    sample = spec.read(p, sample_id)
    patients = patient_table(p)
    if sample_id in patients:
        sample.patient_id = patients[sample_id]
    return sample


class SampleList(list):
    """The samples read (a plain list), and ``skipped``: ``{sample id: why}`` of those left out
    with ``skip_bad=True``."""

    skipped: dict[str, str]

    def __init__(self, items=(), skipped: dict[str, str] | None = None) -> None:
        super().__init__(items)
        self.skipped = dict(skipped or {})


SKIP_HINT = "pass --skip-bad-samples to go on without it"


def sample_error(sample_id: str, e: InputError, several: bool = True) -> InputError:
    """``e`` with the sample named (when its message does not already) and, where other samples
    could go on without it, the ``--skip-bad-samples`` hint."""
    msg = e.message if sample_id in e.message else f"sample {sample_id}: {e.message}"
    return InputError(msg + (f" ({SKIP_HINT})" if several else ""), e.path)


def read_dataset(
    path: str | Path, fmt: str | None = None, sample_ids: list[str] | None = None, dataset: str = "",
    skip_bad: bool = False,
) -> SampleList:
    """Read all (or the listed) samples of a dataset; ``dataset`` overrides the dataset name.

    A sample that cannot be read (a missing or broken file) is an InputError naming the sample
    and the file; with ``skip_bad`` it is left out instead, with one warning per sample, and
    listed in the result's ``skipped``. Never silently: every sample any of whose files is
    present is listed by the readers.
    """
    p = _folder(path)
    spec = _spec(p, fmt)
    ids = spec.list_ids(p)
    if not ids:
        raise InputError(f"no samples found in this {spec.name} dataset", p)
    if sample_ids is not None:
        missing = [s for s in sample_ids if s not in ids]
        if missing:
            raise InputError(f"sample(s) {', '.join(missing)} not in this dataset (has: {', '.join(ids)})", p)
        ids = list(sample_ids)
    samples = SampleList()
    for sid in ids:
        try:
            samples.append(read_sample(p, sid, spec.name))
        except InputError as e:
            where = f"{e.path}: " if e.path is not None else ""
            if not skip_bad:
                raise sample_error(sid, e, several=len(ids) > 1) from None
            samples.skipped[sid] = f"{where}{e.message}"
            warnings.warn(f"skipping sample {sid}: {where}{e.message}", UserWarning, stacklevel=2)
    if not samples:
        raise InputError(f"no sample of this {spec.name} dataset could be read: "
                         + "; ".join(f"{k}: {v}" for k, v in samples.skipped.items()), p)
    if dataset:
        for s in samples:
            s.dataset = dataset
    return samples


def verify_image(sample: Sample) -> None:
    """Decode the whole image once, so a truncated body fails now (InputError), not mid-training."""
    if sample.image is None:
        raise InputError(f"sample {sample.sample_id!r} has no image")
    w, h = sample.image.size
    try:
        sample.image.read_region(0, 0, w, h) if w * h <= 16e6 else sample.image.thumbnail(512)
    finally:
        sample.image.release()


#: Longest side of the ``hires`` and ``lowres`` images, as Space Ranger writes them.
HIRES_SIDE, LOWRES_SIDE = 2000, 600


def attach_images(sample: Sample, hires_side: int = HIRES_SIDE, lowres_side: int = LOWRES_SIDE) -> None:
    """Put ``hires`` and ``lowres`` images and their scale factors in ``adata.uns["spatial"]``.

    The scanpy/squidpy layout (``uns["spatial"][library]["images"]``, ``["scalefactors"]`` with
    ``tissue_hires_scalef``, ``tissue_lowres_scalef``, ``spot_diameter_fullres``), as Space Ranger
    writes it, so ``sc.pl.spatial`` and ``sq.pl.spatial_scatter`` work with their defaults
    (both default to ``hires``) on any sample.
    """
    if sample.image is None:
        raise InputError(f"sample {sample.sample_id!r} has no image")
    hires, hs = sample.image.thumbnail(hires_side)
    lowres, ls = sample.image.thumbnail(lowres_side)
    spatial = sample.adata.uns.setdefault("spatial", {})
    spatial[sample.sample_id] = {
        "images": {"hires": np.ascontiguousarray(hires, dtype=np.uint8),
                   "lowres": np.ascontiguousarray(lowres, dtype=np.uint8)},
        "scalefactors": {
            "tissue_hires_scalef": float(hs),
            "tissue_lowres_scalef": float(ls),
            "spot_diameter_fullres": float(sample.spot_diameter_px),
        },
        "metadata": {
            "source_image_path": str(sample.image.path),
            "um_per_px": float(sample.um_per_px),
            "platform": sample.platform,
        },
    }


def attach_lowres(sample: Sample, max_side: int = HIRES_SIDE) -> None:
    """Older name of :func:`attach_images` (which stores ``hires`` and ``lowres``)."""
    attach_images(sample, hires_side=max_side)

"""Cross-validation folds and validation spots, seeded and saved as JSON.

Folds are leave-one-out over samples or over patients. They are exhaustive, so there
is nothing to shuffle: folds come in sorted order, which keeps a fold's index stable
across runs and machines (the authors' code shuffled without a seed). The seed is
recorded in each :class:`Fold` and drives the random validation spots.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmrcnet.errors import ConfigError, InputError
from cmrcnet.utils import write_json_atomic

SCHEMES = ("loo-sample", "loo-patient")
SPLIT_FORMAT_VERSION = 1


@dataclass
class Fold:
    index: int
    train: list[str]
    """Training sample ids."""
    test: list[str]
    """Held-out sample ids."""
    scheme: str
    seed: int


def make_folds(
    sample_ids: list[str],
    patients: dict[str, str] | None,
    scheme: str = "loo-sample",
    seed: int = 0,
) -> list[Fold]:
    """Leave-one-sample-out or leave-one-patient-out folds, in sorted order.

    ``loo-patient`` holds out all sections of one patient at a time, so no patient is
    in both train and test; it needs ``patients`` (sample id -> patient id) for every
    sample and at least two patients.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"split.scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    ids = _check_ids(sample_ids)
    if scheme == "loo-sample":
        if len(ids) < 2:
            raise InputError(f"leave-one-sample-out needs at least 2 samples, got {len(ids)}")
        groups = [[sid] for sid in ids]
    else:
        groups = _patient_groups(ids, patients)
    return [
        Fold(index=i, train=[s for s in ids if s not in test], test=test, scheme=scheme, seed=int(seed))
        for i, test in enumerate(groups)
    ]


def _check_ids(sample_ids: list[str]) -> list[str]:
    ids = [str(s) for s in sample_ids]
    if not ids:
        raise InputError("no samples to split")
    dup = sorted({s for s in ids if ids.count(s) > 1})
    if dup:
        raise InputError(f"duplicated sample id(s): {', '.join(dup)}")
    return sorted(ids)


def _patient_groups(ids: list[str], patients: dict[str, str] | None) -> list[list[str]]:
    """Sample ids grouped by patient, groups sorted by patient id."""
    if not patients:
        raise InputError("leave-one-patient-out needs the patient of each sample (none given)")
    missing = [s for s in ids if not str(patients.get(s, "") or "")]
    if missing:
        raise InputError(f"no patient id for sample(s): {', '.join(missing)}")
    by_patient: dict[str, list[str]] = {}
    for s in ids:
        by_patient.setdefault(str(patients[s]), []).append(s)
    if len(by_patient) < 2:
        raise InputError(
            f"leave-one-patient-out needs at least 2 patients, got {len(by_patient)}; "
            "use split.scheme=loo-sample"
        )
    return [by_patient[p] for p in sorted(by_patient)]


def validation_mask(n_spots: dict[str, int], fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Per training sample, a bool mask of spots held out for validation.

    Each sample's draw is seeded from ``(seed, crc32(sample_id))``, so a sample's mask
    does not depend on which other samples are in the fold. With ``fraction > 0`` every
    sample with 2+ spots gets at least one validation and one training spot.
    """
    if not (0.0 <= float(fraction) < 1.0):
        raise ConfigError(f"split.val_fraction must be in [0, 1), got {fraction!r}")
    masks: dict[str, np.ndarray] = {}
    for sid, n in n_spots.items():
        n = int(n)
        if n < 0:
            raise InputError(f"sample {sid!r}: negative number of spots {n}")
        k = int(round(float(fraction) * n))
        if fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        elif n < 2:
            k = 0
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(str(sid).encode("utf-8"))])
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[:k]] = True
        masks[str(sid)] = mask
    return masks


def save_split(
    path: str | Path,
    fold: Fold,
    val_masks: dict[str, np.ndarray] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the fold (and validation spots as index lists) to JSON, atomically."""
    obj: dict[str, Any] = {"format_version": SPLIT_FORMAT_VERSION, "fold": asdict(fold)}
    if val_masks is not None:
        obj["n_spots"] = {str(k): int(len(m)) for k, m in val_masks.items()}
        obj["val_spots"] = {
            str(k): np.flatnonzero(np.asarray(m, dtype=bool)).tolist() for k, m in val_masks.items()
        }
    if extra:
        obj["extra"] = extra
    write_json_atomic(path, obj)


def load_split(path: str | Path) -> tuple[Fold, dict[str, np.ndarray] | None]:
    """Read a split written by :func:`save_split`: the fold and validation masks (or None)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("split file not found", path)
    try:
        obj = json.loads(path.read_text())
        f = obj["fold"]
        fold = Fold(
            index=int(f["index"]),
            train=[str(s) for s in f["train"]],
            test=[str(s) for s in f["test"]],
            scheme=str(f["scheme"]),
            seed=int(f["seed"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"not a valid split file ({type(e).__name__}: {e})", path) from None
    if "val_spots" not in obj:
        return fold, None
    try:
        masks: dict[str, np.ndarray] = {}
        for sid, idx in obj["val_spots"].items():
            mask = np.zeros(int(obj["n_spots"][sid]), dtype=bool)
            mask[np.asarray(idx, dtype=np.int64)] = True
            masks[sid] = mask
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise InputError(f"invalid validation spots in split file ({type(e).__name__}: {e})", path) from None
    return fold, masks

"""Shared fixtures: the real data folder (skips when absent) and a tiny synthetic dataset."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``$CMRCNET_DATA_DIR`` (default /work/shared/data); tests needing it skip when absent."""
    p = Path(os.environ.get("CMRCNET_DATA_DIR", "/work/shared/data"))
    if not p.is_dir():
        pytest.skip(f"real data not found at {p} (set CMRCNET_DATA_DIR)")
    return p


@pytest.fixture(scope="session")
def her2st_dir(data_dir: Path) -> Path:
    p = data_dir / "her2st"
    if not (p / "ST-cnts").is_dir():
        pytest.skip(f"her2st not found under {data_dir}")
    return p


@pytest.fixture(scope="session")
def mob_dir(data_dir: Path) -> Path:
    p = data_dir / "mob"
    if not p.is_dir():
        pytest.skip(f"mob not found under {data_dir}")
    return p


@pytest.fixture(scope="session")
def her2st_c2(her2st_dir: Path):
    """Section C2 read once per session (187 spots). Do not mutate it in tests."""
    from cmrcnet.data.readers import read_sample

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_sample(her2st_dir, "C2")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-sample, 2-patient synthetic dataset in HEST layout (written in well under a second)."""
    from cmrcnet.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "hest")

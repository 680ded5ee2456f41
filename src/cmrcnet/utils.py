"""Small shared helpers: atomic writes, output checks, seeding."""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place only on success.

    A run killed midway therefore never leaves a half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; final files get normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``path`` (a store such as ``.zarr``); it replaces ``path``
    only when the block succeeds, so a killed run leaves no half-written store under that name."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name  # libraries that insist on creating the folder themselves write here
    try:
        yield target
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(target, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path, target: Path, option: str) -> None:
    """Create and remove a temporary file in ``folder``: the one reliable test (read-only file
    systems, permissions, quotas) before long work whose result would be written there."""
    from cmrcnet.errors import InputError

    try:
        fd, tmp = tempfile.mkstemp(prefix=".cmrcnet-write-test.", dir=folder)
    except OSError as e:
        raise InputError(f"{option}: cannot write in {folder} ({e.strerror or type(e).__name__})", target) from None
    os.close(fd)
    os.unlink(tmp)


def check_writable_file(path: str | Path, option: str = "--out") -> Path:
    """Raise InputError (naming ``option``) unless a file can be written at ``path``: it must not
    be a directory, and its nearest existing parent must be a writable directory. Creates nothing."""
    from cmrcnet.errors import InputError

    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{option} is a directory; give a file name, e.g. {path / 'pred.h5ad'}", path)
    anc = _nearest_existing(path.parent)
    if not anc.is_dir():
        raise InputError(f"{option}: {anc} is a file, not a folder", path)
    _probe_writable(anc, path, option)
    return path


def check_writable_dir(path: str | Path, option: str = "--out") -> Path:
    """Raise InputError (naming ``option``) unless ``path`` is, or can be created as, a writable
    directory. Creates nothing."""
    from cmrcnet.errors import InputError

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} is a file; give a folder", path)
    anc = _nearest_existing(path)
    if not anc.is_dir():
        raise InputError(f"{option}: {anc} is a file, not a folder", path)
    _probe_writable(anc, path, option)
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (if imported) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's intra-op thread count after calling scanpy.

    scanpy's numba kernels set the OpenMP thread count, which torch shares through the same
    libgomp: after gene selection a process started with ``OMP_NUM_THREADS=1`` trained with
    2 threads per process, and two benchmark folds on 2 cores ran 7-9x slower than alone.
    """
    import torch

    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

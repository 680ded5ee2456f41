"""cmrcnet: predict spatially resolved gene expression from H&E histology.

Python API, in scanpy's style (keyword-only options, AnnData in and out)::

    import cmrcnet as cn
    samples = cn.read_dataset("data/her2st")
    run = cn.tl.train(samples, method="cmrcnet", test=None, out="runs/final")
    adata = cn.tl.predict(run, image="slide.svs")
    cn.pl.spatial(adata, genes=["ERBB2"], out="erbb2.png")

``cn.read_dataset`` / ``cn.read_sample`` / ``cn.read_slide`` read data; ``cn.tl`` trains, predicts
(samples, slides, cohorts) and scores; ``cn.pl`` plots; ``cn.export`` writes SpatialData stores.

Package layout: ``data`` (readers, slides, patches, genes, splits), ``models`` (one file per
method, a registry), ``training`` (Lightning glue, run directories, prediction), ``retrieval``
(reference banks, top-k search), ``evaluation`` (metrics, gene sets), ``plots``/``report``,
``cohort``, ``export`` and ``cli`` (a thin layer over all of it).

Importing the package (which every ``cmrcnet`` command does first) sets passive OpenMP waits,
huge pages for large CPU tensors and, in a CPU-restricted process, the thread count, unless the
user set them or torch is already loaded: see :mod:`cmrcnet.runtime`.
"""

from __future__ import annotations

import importlib
from typing import Any

from cmrcnet.runtime import apply_thread_defaults as _apply_thread_defaults

_apply_thread_defaults()

__version__ = "0.1.0"

_SUBMODULES = {"tl", "pl", "export", "cohort", "errors", "data", "models", "training", "evaluation", "retrieval", "plots"}
_READERS = {"read_dataset": "cmrcnet.data.readers", "read_sample": "cmrcnet.data.readers",
            "read_slide": "cmrcnet.data.image"}


def __getattr__(name: str) -> Any:
    """Submodules and readers load on first use: ``import cmrcnet`` stays cheap (no torch)."""
    if name in _SUBMODULES:
        return importlib.import_module(f"cmrcnet.{name}")
    if name in _READERS:
        return getattr(importlib.import_module(_READERS[name]), name)
    raise AttributeError(f"module 'cmrcnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES | set(_READERS))

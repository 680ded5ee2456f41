"""cmrcnet: predict spatially resolved gene expression from H&E histology.

Layout (scanpy-like split): ``data`` (readers, patches, genes, splits),
``models`` (one file per method, a registry), ``training`` (Lightning glue,
run directories, prediction), ``retrieval`` (reference banks, top-k search),
``evaluation`` (metrics, gene sets), ``plots``/``report`` and ``cli``.

Importing the package (which every ``cmrcnet`` command does first) sets passive OpenMP waits
and, in a CPU-restricted process, the thread count, unless the user set them or torch is
already loaded: see :mod:`cmrcnet.runtime`.
"""

from cmrcnet.runtime import apply_thread_defaults as _apply_thread_defaults

_apply_thread_defaults()

__version__ = "0.1.0"

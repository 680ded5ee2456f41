"""cmrcnet: predict spatially resolved gene expression from H&E histology.

Layout (scanpy-like split): ``data`` (readers, patches, genes, splits),
``models`` (one file per method, a registry), ``training`` (Lightning glue,
run directories, prediction), ``retrieval`` (reference banks, top-k search),
``evaluation`` (metrics, gene sets), ``plots``/``report`` and ``cli``.
"""

__version__ = "0.1.0"

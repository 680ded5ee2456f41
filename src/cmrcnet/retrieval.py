"""Similarity-based prediction: a bank of training-spot gene embeddings, top-k search, averaging.

Paper, "Similarity-based retrieval in inference stage": embed the test patches
with the image encoder, embed every training spot's expression with the gene
encoder, take the ``k`` most cosine-similar training spots per patch and average
their measured expression. Here:

- :class:`Bank` holds the L2-normalised gene embeddings + expression + ids (saved atomically);
- :func:`search` finds exact (torch / FAISS flat) or approximate (FAISS IVF / HNSW) top-k;
- :func:`predict_from_neighbours` averages the neighbours (plain mean, as in the paper,
  or similarity-weighted) and returns their spread as a per-spot uncertainty;
- :class:`ShardedIndex` searches banks larger than memory shard by shard and merges.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cmrcnet.errors import ConfigError, InputError
from cmrcnet.utils import atomic_path

__all__ = [
    "Bank",
    "build_bank",
    "embed_images",
    "search",
    "predict_from_neighbours",
    "ShardedIndex",
    "l2_normalise",
    "BACKENDS",
]

BACKENDS = ("auto", "torch", "faiss-flat", "faiss-ivf", "faiss-hnsw")
WEIGHTINGS = ("mean", "similarity", "softmax")


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps)


# -- the bank ------------------------------------------------------------------------------------
@dataclass
class Bank:
    """Reference set for retrieval: one row per training spot."""

    embeddings: np.ndarray
    """(M, D) float32, L2-normalised gene embeddings."""
    expression: np.ndarray
    """(M, G) float32, the spots' log1p-normalised expression (what is averaged)."""
    genes: list[str]
    spot_ids: np.ndarray
    """(M,) str, ``"sample:barcode"``."""

    def __post_init__(self) -> None:
        self.embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        self.expression = np.ascontiguousarray(self.expression, dtype=np.float32)
        self.genes = [str(g) for g in self.genes]
        self.spot_ids = np.asarray(self.spot_ids).astype(str)
        m = self.embeddings.shape[0]
        if self.embeddings.ndim != 2 or self.expression.ndim != 2:
            raise InputError("bank embeddings and expression must be 2-D")
        if self.expression.shape[0] != m or self.spot_ids.shape[0] != m:
            raise InputError(
                f"bank rows disagree: {m} embeddings, {self.expression.shape[0]} expression rows, "
                f"{self.spot_ids.shape[0]} spot ids"
            )
        if self.expression.shape[1] != len(self.genes):
            raise InputError(f"bank has {self.expression.shape[1]} expression columns but {len(self.genes)} genes")

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def save(self, path: str | Path) -> None:
        """Write ``.npz`` (default) or ``.h5``; the file appears only once complete."""
        path = Path(path)
        with atomic_path(path) as tmp:
            if path.suffix in (".h5", ".hdf5"):
                import h5py

                with h5py.File(tmp, "w") as f:
                    f.create_dataset("embeddings", data=self.embeddings)
                    f.create_dataset("expression", data=self.expression, compression="gzip", compression_opts=4)
                    f.create_dataset("genes", data=np.array(self.genes, dtype=object), dtype=h5py.string_dtype())
                    f.create_dataset("spot_ids", data=self.spot_ids.astype(object), dtype=h5py.string_dtype())
            else:
                with open(tmp, "wb") as fh:  # a file handle: np.savez would append ".npz" to a path
                    np.savez(
                        fh,
                        embeddings=self.embeddings,
                        expression=self.expression,
                        genes=np.array(self.genes, dtype=str),
                        spot_ids=self.spot_ids.astype(str),
                    )

    @classmethod
    def load(cls, path: str | Path) -> "Bank":
        path = Path(path)
        if not path.is_file():
            raise InputError("retrieval bank not found", path)
        try:
            if path.suffix in (".h5", ".hdf5"):
                import h5py

                with h5py.File(path, "r") as f:
                    d = {k: f[k][()] for k in ("embeddings", "expression", "genes", "spot_ids")}
                d["genes"] = [g.decode() if isinstance(g, bytes) else str(g) for g in d["genes"]]
                d["spot_ids"] = np.array([s.decode() if isinstance(s, bytes) else str(s) for s in d["spot_ids"]])
            else:
                with np.load(path, allow_pickle=False) as z:
                    d = {k: z[k] for k in ("embeddings", "expression", "genes", "spot_ids")}
                d["genes"] = d["genes"].tolist()
        except (KeyError, OSError, ValueError) as e:
            raise InputError(f"not a retrieval bank: {e}", path) from None
        return cls(**d)


def _model_device(model: Any):
    import torch

    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def build_bank(
    model: Any,
    expr: np.ndarray,
    genes: Sequence[str],
    spot_ids: Sequence[str] | np.ndarray,
    batch_size: int = 1024,
) -> Bank:
    """Embed every reference spot's expression with ``model.embed_genes`` (eval mode, no grad)."""
    import torch

    expr = np.asarray(expr, dtype=np.float32)
    was_training = model.training
    model.eval()
    device = _model_device(model)
    out = []
    try:
        with torch.no_grad():
            for start in range(0, expr.shape[0], batch_size):
                chunk = torch.from_numpy(expr[start : start + batch_size]).to(device)
                out.append(model.embed_genes(chunk).float().cpu().numpy())
    finally:
        model.train(was_training)
    emb = np.concatenate(out, 0) if out else np.zeros((0, 0), np.float32)
    return Bank(l2_normalise(emb), expr, list(genes), np.asarray(spot_ids).astype(str))


def embed_images(model: Any, images: Any, batch_size: int = 256) -> np.ndarray:
    """Embed an (N, 3, H, W) array/tensor or an iterable of image batches; L2-normalised float32."""
    import torch

    was_training = model.training
    model.eval()
    device = _model_device(model)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        t = torch.as_tensor(images)
        batches: Any = (t[i : i + batch_size] for i in range(0, t.shape[0], batch_size))
    else:
        batches = images
    out = []
    try:
        with torch.no_grad():
            for b in batches:
                if isinstance(b, dict):
                    b = b["img"]
                out.append(model.embed_images(torch.as_tensor(b).to(device)).float().cpu().numpy())
    finally:
        model.train(was_training)
    return l2_normalise(np.concatenate(out, 0))


# -- search --------------------------------------------------------------------------------------
def _search_torch(
    q: np.ndarray, keys: np.ndarray, k: int, chunk_bytes: int = 256 << 20
) -> tuple[np.ndarray, np.ndarray]:
    """Exact search with torch matmuls; queries chunked so a block stays under ``chunk_bytes``."""
    import torch

    kt = torch.from_numpy(keys)
    rows = max(1, chunk_bytes // (4 * max(1, keys.shape[0])))
    sims_out = np.empty((q.shape[0], k), np.float32)
    idx_out = np.empty((q.shape[0], k), np.int64)
    for s in range(0, q.shape[0], rows):
        block = torch.from_numpy(q[s : s + rows]) @ kt.T
        v, i = torch.topk(block, k, dim=1, largest=True, sorted=True)
        sims_out[s : s + rows] = v.numpy()
        idx_out[s : s + rows] = i.numpy()
    return sims_out, idx_out


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a dependency
        raise ConfigError(f"FAISS is not installed ({e}); use retrieval.backend=torch") from None
    return faiss


def build_faiss_index(keys: np.ndarray, backend: str, **index_kwargs: Any):
    """A FAISS inner-product index over (already normalised) ``keys``.

    ``faiss-ivf``: ``nlist`` (default ``4 * sqrt(M)``, at most ``M / 39``),
    ``nprobe`` (default ``max(1, nlist // 16)``);
    ``faiss-hnsw``: ``M`` (default 32), ``ef_search`` (default 128), ``ef_construction`` (default 200).
    """
    faiss = _faiss()
    m, d = keys.shape
    if backend == "faiss-flat":
        index = faiss.IndexFlatIP(d)
    elif backend == "faiss-ivf":
        nlist = int(index_kwargs.get("nlist") or max(1, round(4 * math.sqrt(m))))
        nlist = max(1, min(nlist, m // 39))  # FAISS k-means wants >= 39 points per centroid
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        train = keys
        max_train = int(index_kwargs.get("max_train", 256 * nlist))
        if m > max_train:
            rng = np.random.default_rng(int(index_kwargs.get("seed", 0)))
            train = keys[rng.choice(m, max_train, replace=False)]
        index.train(train)
        index.nprobe = int(index_kwargs.get("nprobe") or max(1, nlist // 16))
    elif backend == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, int(index_kwargs.get("M", 32)), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(index_kwargs.get("ef_construction", 200))
        index.hnsw.efSearch = int(index_kwargs.get("ef_search", 128))
    else:
        raise ConfigError(f"not a FAISS backend: {backend!r}")
    index.add(keys)
    return index


def _search_faiss(q: np.ndarray, keys: np.ndarray, k: int, backend: str, **index_kwargs: Any):
    index = build_faiss_index(keys, backend, **index_kwargs)
    sims, idx = index.search(q, k)
    return sims.astype(np.float32), idx.astype(np.int64)


def resolve_backend(backend: str, n_keys: int, auto_exact_max: int = 200_000) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"retrieval backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "torch" if n_keys <= auto_exact_max else "faiss-ivf"


def search(
    queries: np.ndarray,
    keys: np.ndarray,
    k: int,
    backend: str = "auto",
    auto_exact_max: int = 200_000,
    **index_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` keys by cosine similarity for each query: ``(sims (N,k), idx (N,k))``, sorted descending.

    Inputs are L2-normalised here, so raw embeddings are fine. ``k`` larger than the
    bank is clipped to the bank size. ``auto`` is exact (torch) up to ``auto_exact_max``
    keys and IVF above. Approximate backends may return ``-1`` indices when they find
    fewer than ``k`` candidates; their similarity is then ``-inf``.
    """
    q = l2_normalise(np.atleast_2d(queries))
    kk = l2_normalise(np.atleast_2d(keys))
    if kk.shape[0] == 0:
        raise InputError("the retrieval bank is empty")
    if q.shape[1] != kk.shape[1]:
        raise InputError(f"query dimension {q.shape[1]} differs from bank dimension {kk.shape[1]}")
    if k < 1:
        raise ConfigError(f"top_k must be >= 1, got {k}")
    k = min(int(k), kk.shape[0])
    if q.shape[0] == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    b = resolve_backend(backend, kk.shape[0], auto_exact_max)
    if b == "torch":
        sims, idx = _search_torch(q, kk, k, int(index_kwargs.get("chunk_bytes", 256 << 20)))
    else:
        sims, idx = _search_faiss(q, kk, k, b, **index_kwargs)
    sims = np.where(idx < 0, -np.inf, sims).astype(np.float32)
    return sims, idx


# -- prediction ----------------------------------------------------------------------------------
def predict_from_neighbours(
    sims: np.ndarray,
    idx: np.ndarray,
    expression: np.ndarray,
    weighting: str = "mean",
    temperature: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Average the neighbours' expression: ``(pred (N,G), spread (N,G))``.

    ``weighting``:

    - ``mean``: plain mean (paper, authors, BLEEP);
    - ``similarity``: weights ``max(sim, 0)`` normalised per query (falls back to the
      plain mean when all are <= 0);
    - ``softmax``: weights ``exp(sim / temperature)`` normalised (BLEEP's exp(-distance)
      variant, for unit vectors up to the temperature).

    ``spread`` is the (weighted) standard deviation of the neighbours' expression per gene,
    a per-spot uncertainty: wide when the retrieved spots disagree. Invalid neighbours
    (index ``-1`` from an approximate index) get zero weight.
    """
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"retrieval weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    sims = np.asarray(sims, dtype=np.float64)
    idx = np.asarray(idx, dtype=np.int64)
    expression = np.asarray(expression, dtype=np.float32)
    valid = idx >= 0
    if not valid.any(axis=1).all():
        raise InputError("a query has no valid neighbour")
    safe = np.where(valid, idx, 0)
    if weighting == "mean":
        w = valid.astype(np.float64)
    elif weighting == "similarity":
        w = np.where(valid, np.maximum(sims, 0.0), 0.0)
        none = w.sum(1) <= 0
        w[none] = valid[none]
    else:
        z = np.where(valid, sims / temperature, -np.inf)
        z = z - z.max(1, keepdims=True)
        w = np.exp(z)
    w = (w / w.sum(1, keepdims=True)).astype(np.float32)
    n, g = idx.shape[0], expression.shape[1]
    pred = np.empty((n, g), np.float32)
    spread = np.empty((n, g), np.float32)
    step = max(1, (64 << 20) // max(1, 4 * idx.shape[1] * g))  # bound the (rows, k, G) gather
    for s in range(0, n, step):
        nb = expression[safe[s : s + step]]  # (r, k, G)
        ww = w[s : s + step, :, None]
        mu = (ww * nb).sum(1)
        var = (ww * (nb - mu[:, None, :]) ** 2).sum(1)
        pred[s : s + step] = mu
        spread[s : s + step] = np.sqrt(np.maximum(var, 0.0))
    return pred, spread


# -- sharded search ------------------------------------------------------------------------------
class ShardedIndex:
    """Exact/approximate top-k over a bank split into shards, searched one shard at a time.

    ``shards``: arrays (M_i, D) or paths to ``.npy`` files (memory-mapped) or saved
    :class:`Bank` files. Only one shard's index is in memory at once; per-shard top-k
    lists are merged, and returned indices are global (shard offsets added).
    """

    def __init__(
        self,
        shards: Sequence[np.ndarray | str | os.PathLike],
        backend: str = "faiss-flat",
        **index_kwargs: Any,
    ) -> None:
        if not shards:
            raise InputError("ShardedIndex needs at least one shard")
        if backend == "auto":
            raise ConfigError("ShardedIndex needs an explicit backend")
        resolve_backend(backend, 0)
        self.shards = list(shards)
        self.backend = backend
        self.index_kwargs = index_kwargs
        self.offsets: list[int] = []
        total = 0
        for s in self.shards:
            self.offsets.append(total)
            total += self._rows(s)
        self.size = total

    @staticmethod
    def _load(shard: Any) -> np.ndarray:
        if isinstance(shard, np.ndarray):
            return shard
        p = Path(shard)
        if p.suffix == ".npy":
            return np.load(p, mmap_mode="r")
        return Bank.load(p).embeddings

    def _rows(self, shard: Any) -> int:
        if isinstance(shard, np.ndarray):
            return int(shard.shape[0])
        p = Path(shard)
        if p.suffix == ".npy":
            return int(np.load(p, mmap_mode="r").shape[0])
        return len(Bank.load(p))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = l2_normalise(np.atleast_2d(queries))
        k = min(int(k), self.size)
        all_s, all_i = [], []
        for shard, off in zip(self.shards, self.offsets):
            keys = np.asarray(self._load(shard), dtype=np.float32)
            s, i = search(q, keys, min(k, keys.shape[0]), self.backend, **self.index_kwargs)
            all_s.append(s)
            all_i.append(np.where(i >= 0, i + off, -1))
        sims = np.concatenate(all_s, 1)
        idx = np.concatenate(all_i, 1)
        # merge: sort by similarity desc, ties by global index asc (same order as one exact index)
        order = np.lexsort((np.where(idx < 0, np.iinfo(np.int64).max, idx), -sims), axis=1)[:, :k]
        return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)

"""Similarity-based prediction: a bank of training-spot gene embeddings, top-k search, averaging.

Paper, "Similarity-based retrieval in inference stage": embed the test patches
with the image encoder, embed every training spot's expression with the gene
encoder, take the ``k`` most cosine-similar training spots per patch and average
their measured expression. Here:

- :class:`Bank` holds the L2-normalised gene embeddings + expression + ids (saved atomically);
- :func:`search` finds exact (torch / FAISS flat) or approximate (FAISS IVF / HNSW) top-k;
  :func:`search_torch` is its exact torch path and :func:`topk_blocked` the row-wise top-k
  it uses (both public so that benchmarks can time them on their own);
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
    "search_torch",
    "topk_blocked",
    "predict_from_neighbours",
    "ShardedIndex",
    "l2_normalise",
    "BACKENDS",
]

BACKENDS = ("auto", "torch", "faiss-flat", "faiss-ivf", "faiss-ivfpq", "faiss-hnsw")
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

    def search(
        self, queries: np.ndarray, k: int, backend: str = "auto", auto_exact_max: int = 2_000_000, **index_kwargs: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`search` over this bank; a FAISS index is built once per backend and build
        settings, then reused for every later call (one per predicted section)."""
        b = resolve_backend(backend, len(self), auto_exact_max, str(index_kwargs.get("precision", "auto")))
        index = None
        if b == "torch" and exact_precision(str(index_kwargs.get("precision", "auto")), len(self)) == "bf16":
            if "_keys_bf16" not in self.__dict__:  # converted once, reused by every later search
                import torch

                self.__dict__["_keys_bf16"] = torch.from_numpy(self.embeddings).to(torch.bfloat16)
            index_kwargs = {**index_kwargs, "keys_bf16": self.__dict__["_keys_bf16"]}
        elif b != "torch":
            build = tuple(sorted((key, v) for key, v in index_kwargs.items() if key not in _QUERY_PARAMS))
            cache = self.__dict__.setdefault("_indexes", {})
            if (b, build) not in cache:
                cache[(b, build)] = build_faiss_index(self.embeddings, b, **index_kwargs)
            index = cache[(b, build)]
        return search(queries, self.embeddings, k, b, auto_exact_max, index=index, **index_kwargs)

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
def bf16_score_eps(d: int) -> float:
    """Certified bound on ``|bf16 score - exact cosine|`` of two unit ``d``-vectors, the score
    computed as torch does on CPU and GPU: inputs rounded to bf16 (relative error ``u = 2**-8``
    each, so ``2u + u**2`` on the dot product by Cauchy-Schwarz), products summed in fp32
    (``d * 2**-24``), the sum rounded to bf16 (``u`` relative, ``|score| <= 1 + ...``). 1 % and
    ``1e-6`` of slack cover inputs normalised in fp32 (norm ``1 +- 1e-7``) and flushed denormals."""
    u = 2.0**-8
    e_in = (2 * u + u * u) + (d + 2) * 2.0**-24 * (1 + u) ** 2
    return (e_in + u * (1 + e_in) / (1 - u)) * 1.01 + 1e-6


SEARCH_STATS = {"rows": 0, "candidates": 0}
"""Counters of the bf16 exact search: query rows searched, and (row, key) candidates re-ranked
in fp32 (the candidates per row show how well the threshold prunes). For benchmarks; reset freely."""


def topk_blocked(scores, k: int, block: int = 65_536):
    """``torch.topk(scores, k, dim=1)`` of a ``(N, M)`` score tensor, computed per column block
    of ``block`` columns then merged: the same ``(values, indices)``, sorted descending,
    ~1.8x faster on million-wide rows (cache-sized partial sorts)."""
    import torch

    m = scores.shape[1]
    if m <= 2 * block:
        return torch.topk(scores, k, dim=1, largest=True, sorted=True)
    vals, idxs = [], []
    for start in range(0, m, block):
        v, i = torch.topk(scores[:, start : start + block], min(k, m - start), dim=1, sorted=False)
        vals.append(v)
        idxs.append(i + start)
    v, j = torch.topk(torch.cat(vals, 1), k, dim=1, largest=True, sorted=True)
    return v, torch.gather(torch.cat(idxs, 1), 1, j)


def _padded(rows, n_rows: int, *cols):
    """Ragged per-row lists (``rows`` sorted, as ``nonzero`` gives them) as dense ``(n_rows, width)``
    tensors, one per ``cols``, padded with ``-inf`` (floats) or ``-1`` (ints)."""
    import torch

    counts = torch.bincount(rows, minlength=n_rows)
    width = int(counts.max()) if rows.numel() else 0
    pos = torch.arange(rows.numel()) - (torch.cumsum(counts, 0) - counts)[rows]
    out = []
    for c in cols:
        fill = float("-inf") if c.is_floating_point() else -1
        d = torch.full((n_rows, width), fill, dtype=c.dtype)
        d[rows, pos] = c
        out.append(d)
    return out


def _bf16_floor(x):
    """bf16 values ``<= x`` (fp32), within 1.5 bf16 ulps: the compare then runs on bf16 scores
    without converting them, and rounding never raises the threshold."""
    import torch

    return (x - x.abs() * 2.0**-7 - 1e-30).to(torch.bfloat16)


_GROUP = 64
"""Scores are screened in groups of this many keys (a max per group, then only groups whose max
reaches the threshold are looked at): a full compare + ``nonzero`` pass cost as much as the GEMM."""


def _above(scores, lo):
    """``(rows, cols, values)`` of the entries of ``scores`` (n, w) that are ``>= lo`` (n,), rows
    ascending (what :func:`_padded` needs). Keys ``c, c + w/g, c + 2w/g, ...`` form a group, so
    the group maxima are an elementwise max over contiguous rows of the (n, g, w/g) view."""
    n, w = scores.shape
    g = _GROUP if w % _GROUP == 0 and w >= 4 * _GROUP else 1
    lo = lo.unsqueeze(1)
    if g == 1:
        flat = (scores >= lo).view(-1).nonzero().squeeze(1)
        return flat // w, flat % w, scores.view(-1)[flat].float()
    s3 = scores.view(n, g, w // g)
    if bool((lo > 0).all()):
        # positive bf16 values order like their bits as int16 (negative ones fall below any
        # positive threshold either way), and an int16 max is 5x faster than a bf16 one
        import torch

        gmax = s3.view(torch.int16).amax(1) >= lo.view(torch.int16)
    else:
        gmax = s3.amax(1) >= lo
    gr, gc = gmax.nonzero(as_tuple=True)  # groups holding a candidate
    sub = s3[gr, :, gc]  # (groups, g): their scores
    hit_g, hit_t = (sub >= lo[gr]).nonzero(as_tuple=True)
    # nonzero is row-major: gr ascends, and so does hit_g, so the rows come out ascending
    return gr[hit_g], hit_t * (w // g) + gc[hit_g], sub[hit_g, hit_t].float()


def _bf16_threshold_topk(q, kt, kb, k: int, block: int, eps: float):
    """Exact top-``k`` of one query chunk: bf16 scores of bank blocks, keeping per query only
    keys within ``2 eps`` of the running k-th bf16 score; the survivors of the final threshold
    are ranked by fp32 dot products.

    Why exact: after any blocks, ``k`` keys have bf16 scores >= the running k-th ``t``, so their
    true scores are >= ``t - eps`` and so is the true k-th score; a key whose bf16 score is
    below ``t - 2 eps`` has a true score below ``t - eps``: not in the top-k (ties included).
    No score block is sorted: per block a compare, and a top-k merge of ``k + (candidates in
    the block)`` columns per row for the threshold."""
    import torch

    n, m = q.shape[0], kt.shape[0]
    qb = q.to(torch.bfloat16)
    first = min(m, max(block, k))
    s0 = qb @ kb[:first].T
    bv = torch.topk(s0.float(), k, dim=1, sorted=True).values  # running top-k of bf16 scores
    parts = []
    threads = torch.get_num_threads()
    for start, stop in [(0, first)] + [(s, min(m, s + block)) for s in range(first, m, block)]:
        scores = s0 if start == 0 else qb @ kb[start:stop].T
        # the screening ops are small: on 1 thread each takes well under a millisecond, on 2 threads
        # of a loaded machine each waited for a descheduled OpenMP thread (10-25 ms per op)
        torch.set_num_threads(1)
        try:
            rows, cols, vals = _above(scores, _bf16_floor(bv[:, -1] - 2 * eps))
            parts.append((rows, cols + start, vals))
            if start > 0 and rows.numel():  # block 0's bf16 top-k is already in bv
                (new_bv,) = _padded(rows, n, vals)
                bv = torch.topk(torch.cat([bv, new_bv], 1), k, dim=1, sorted=True).values
        finally:
            torch.set_num_threads(threads)
    del s0
    rows, cols, vals = (torch.cat(x) for x in zip(*parts))
    keep = (vals >= bv[rows, -1] - 2 * eps).nonzero().squeeze(1)  # the final threshold
    keep = keep[torch.argsort(rows[keep], stable=True)]
    rows, cols = rows[keep], cols[keep]
    exact = torch.einsum("cd,cd->c", q[rows], kt[cols])
    pv, pi = _padded(rows, n, exact, cols)
    v, j = torch.topk(pv, k, dim=1, sorted=True)
    SEARCH_STATS["rows"] += n
    SEARCH_STATS["candidates"] += int(rows.numel())
    return v, torch.gather(pi, 1, j)


TORCH_BF16_MIN = 500_000
"""From this bank size ``auto`` runs exact search as the bf16 threshold search where bf16 is
faster: 1.75x FAISS flat at 10k x 1M, but 0.85x at 10k x 100k (the running threshold stays
loose for most blocks) and no faster than torch fp32 at 50k or below (docs/PERFORMANCE.md 5c)."""


def exact_precision(precision: str, n_keys: int) -> str:
    """``fp32`` or ``bf16`` for the exact torch search over ``n_keys`` keys: ``auto`` is ``bf16``
    from :data:`TORCH_BF16_MIN` keys where bf16 matmuls beat fp32 on this CPU
    (:func:`cmrcnet.runtime.bf16_is_faster`); the result is exact either way."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"exact search precision must be auto, fp32 or bf16, got {precision!r}")
    if precision != "auto":
        return precision
    if n_keys < TORCH_BF16_MIN:
        return "fp32"
    from cmrcnet.runtime import bf16_is_faster

    return "bf16" if bf16_is_faster("cpu") else "fp32"


def search_torch(
    q: np.ndarray,
    keys: np.ndarray,
    k: int,
    chunk_bytes: int = 256 << 20,
    precision: str = "auto",
    block: int = 16_384,
    chunk_rows: int = 1024,
    keys_bf16: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact search with torch matmuls: ``(sims (N, k), idx (N, k))`` sorted by descending cosine.

    The torch path of :func:`search`, without its checks: ``q`` (N, D) and ``keys`` (M, D) must
    already be float32 and L2-normalised, and ``k <= M``.

    ``precision`` (see :func:`exact_precision`): ``fp32`` scores query chunks whose score block
    stays under ``chunk_bytes`` and takes a blocked top-k of it; ``bf16`` scores ``chunk_rows``
    queries against ``block`` keys at a time in bf16 and keeps only candidates the bf16 error
    bound (:func:`bf16_score_eps`) cannot rule out, then ranks them in fp32: the same result as
    fp32 search (up to the order of keys whose fp32 scores tie within rounding), without
    sorting any score block. ``keys_bf16``: the keys already in bf16 (a cached copy).
    """
    import torch

    use_bf16 = exact_precision(precision, keys.shape[0]) == "bf16"
    sims_out = np.empty((q.shape[0], k), np.float32)
    idx_out = np.empty((q.shape[0], k), np.int64)
    # autocast off: an outer bf16 autocast would otherwise turn the fp32 path into bf16
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        kt = torch.from_numpy(keys)
        if use_bf16:
            kb = keys_bf16 if keys_bf16 is not None else kt.to(torch.bfloat16)
            rows, eps = max(1, int(chunk_rows)), bf16_score_eps(keys.shape[1])
        else:
            rows = max(1, chunk_bytes // (4 * max(1, keys.shape[0])))
        for s in range(0, q.shape[0], rows):
            qc = torch.from_numpy(q[s : s + rows])
            v, i = _bf16_threshold_topk(qc, kt, kb, k, int(block), eps) if use_bf16 else topk_blocked(qc @ kt.T, k)
            sims_out[s : s + rows] = v.numpy()
            idx_out[s : s + rows] = i.numpy()
    return sims_out, idx_out


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a dependency
        raise ConfigError(f"FAISS is not installed ({e}); use retrieval.backend=torch") from None
    return faiss


APPROXIMATE = ("faiss-ivf", "faiss-ivfpq", "faiss-hnsw")
_QUERY_PARAMS = ("nprobe", "ef_search", "k_factor", "precision", "block", "chunk_rows", "keys_bf16")
"""Index settings applied at query time (changing them does not rebuild an index)."""


def _ivf_nlist(m: int, index_kwargs: dict[str, Any]) -> int:
    nlist = int(index_kwargs.get("nlist") or max(1, round(4 * math.sqrt(m))))
    return max(1, min(nlist, m // 39))  # FAISS k-means wants >= 39 points per centroid


def _ivf_training_rows(keys: np.ndarray, nlist: int, index_kwargs: dict[str, Any]) -> np.ndarray:
    """k-means on a sample: 64 points per list is as good as 256 here and 4-5x faster to build."""
    max_train = int(index_kwargs.get("max_train", 64 * nlist))
    if keys.shape[0] <= max_train:
        return keys
    rng = np.random.default_rng(int(index_kwargs.get("seed", 0)))
    return np.ascontiguousarray(keys[np.sort(rng.choice(keys.shape[0], max_train, replace=False))])


def set_query_params(index: Any, backend: str, **index_kwargs: Any) -> None:
    """``nprobe`` (IVF; default ``max(16, nlist // 8)``), ``ef_search`` (HNSW; default 128),
    ``k_factor`` (IVF-PQ re-rank depth; default 64: recall 0.93 at 48, 0.98 at 128 on a trained 100k bank)."""
    faiss = _faiss()
    if backend in ("faiss-ivf", "faiss-ivfpq"):
        ivf = faiss.extract_index_ivf(index)
        nlist = ivf.nlist
        ivf.nprobe = int(index_kwargs.get("nprobe") or min(nlist, max(16, nlist // 8)))
        if backend == "faiss-ivfpq":
            index.k_factor = float(index_kwargs.get("k_factor") or 64)
    elif backend == "faiss-hnsw":
        index.hnsw.efSearch = int(index_kwargs.get("ef_search", 128))


def build_faiss_index(keys: np.ndarray, backend: str, **index_kwargs: Any):
    """A FAISS index over (already normalised) ``keys``.

    The approximate indexes use the L2 metric: for unit vectors it ranks exactly like the
    inner product (|q - k|^2 = 2 - 2 cos), and k-means / PQ partition a narrow cone of
    embeddings far better in L2 (trained gene embeddings of her2st sit within cosine 0.98-0.99
    of each other; inner-product IVF-PQ reached recall 0.1-0.3 there). :func:`search`
    converts the distances back to cosines.

    ``faiss-ivf``: inverted lists of full vectors, ``nlist`` (default ``4 * sqrt(M)``, at most
    ``M / 39``), ``nprobe``; ``faiss-ivfpq``: the same lists holding 4-bit fast-scan PQ codes
    (``pq_m`` sub-quantizers, default ``D / 4``), the ``k_factor * k`` best re-ranked with the
    full vectors; ``faiss-hnsw``: ``M`` (default 32), ``ef_construction`` (default 200),
    ``ef_search``. See :func:`set_query_params` for the query-time settings.
    """
    faiss = _faiss()
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    m, d = keys.shape
    if backend == "faiss-flat":
        index = faiss.IndexFlatIP(d)
    elif backend == "faiss-ivf":
        nlist = _ivf_nlist(m, index_kwargs)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
        index.train(_ivf_training_rows(keys, nlist, index_kwargs))
    elif backend == "faiss-ivfpq":
        nlist = _ivf_nlist(m, index_kwargs)
        pq_m = int(index_kwargs.get("pq_m") or (d // 4 if d % 4 == 0 else d))
        if d % pq_m:
            raise ConfigError(f"pq_m={pq_m} must divide the embedding dimension {d}")
        index = faiss.index_factory(d, f"IVF{nlist},PQ{pq_m}x4fs,RFlat", faiss.METRIC_L2)
        index.train(_ivf_training_rows(keys, nlist, index_kwargs))
    elif backend == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, int(index_kwargs.get("M", 32)), faiss.METRIC_L2)
        index.hnsw.efConstruction = int(index_kwargs.get("ef_construction", 200))
    else:
        raise ConfigError(f"not a FAISS backend: {backend!r}")
    index.add(keys)
    set_query_params(index, backend, **index_kwargs)
    return index


TORCH_EXACT_MAX = 50_000
"""Where bf16 is not faster than fp32, ``auto`` searches banks up to this size with torch fp32 (no
index to build) and larger exact searches go to FAISS's flat index, whose tiled BLAS scoring
with a heap top-k was 2x faster than torch fp32 at 1M rows (docs/PERFORMANCE.md)."""


def resolve_backend(backend: str, n_keys: int, auto_exact_max: int = 2_000_000, precision: str = "auto") -> str:
    """``auto``: exact search up to ``auto_exact_max`` keys, an IVF-PQ index beyond. Exact is
    ``torch`` (fp32) below :data:`TORCH_EXACT_MAX`, ``torch`` with the bf16 threshold search from
    :data:`TORCH_BF16_MIN` where bf16 matmuls are faster, else ``faiss-flat``. ``precision``: the
    search's setting (``fp32`` asked for: FAISS flat above :data:`TORCH_EXACT_MAX`)."""
    if backend not in BACKENDS:
        raise ConfigError(f"retrieval backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if n_keys > auto_exact_max:
        return "faiss-ivfpq"
    if n_keys <= TORCH_EXACT_MAX or exact_precision(precision, n_keys) == "bf16":
        return "torch"
    return "faiss-flat"


def search(
    queries: np.ndarray,
    keys: np.ndarray,
    k: int,
    backend: str = "auto",
    auto_exact_max: int = 2_000_000,
    index: Any = None,
    **index_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` keys by cosine similarity for each query: ``(sims (N,k), idx (N,k))``, sorted descending.

    Inputs are L2-normalised here, so raw embeddings are fine. ``k`` larger than the
    bank is clipped to the bank size. ``auto`` is exact up to ``auto_exact_max`` keys (see
    :func:`resolve_backend`) and IVF-PQ above. ``index``: a FAISS index already built over ``keys`` (see
    :meth:`Bank.search`, which caches one), else it is built here. Approximate backends
    may return ``-1`` indices when they find fewer than ``k`` candidates; their
    similarity is then ``-inf``. Torch backend settings: ``precision`` (``auto``/``fp32``/``bf16``),
    ``block``, ``chunk_rows``, ``chunk_bytes``, ``keys_bf16``: see :func:`search_torch`.
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
    b = resolve_backend(backend, kk.shape[0], auto_exact_max, str(index_kwargs.get("precision", "auto")))
    if b == "torch":
        sims, idx = search_torch(
            q,
            kk,
            k,
            int(index_kwargs.get("chunk_bytes", 256 << 20)),
            str(index_kwargs.get("precision", "auto")),
            int(index_kwargs.get("block", 16_384)),
            int(index_kwargs.get("chunk_rows", 1024)),
            index_kwargs.get("keys_bf16"),
        )
    else:
        if index is None:
            index = build_faiss_index(kk, b, **index_kwargs)
        elif b != "faiss-flat":
            set_query_params(index, b, **index_kwargs)
        sims, idx = index.search(q, k)
        if index.metric_type == _faiss().METRIC_L2:
            sims = 1.0 - 0.5 * sims  # squared L2 distance of unit vectors -> cosine
        sims, idx = sims.astype(np.float32), idx.astype(np.int64)
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
    return _weighted_mean_and_spread(w, safe, expression)


def _weighted_mean_and_spread(w: np.ndarray, idx: np.ndarray, expression: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query: weighted mean and standard deviation of its neighbours' rows, as batched
    matrix products on gathered blocks (the numpy broadcast version was 4-5x slower)."""
    import torch

    n, g = idx.shape[0], expression.shape[1]
    pred = np.empty((n, g), np.float32)
    spread = np.empty((n, g), np.float32)
    e = torch.from_numpy(expression)
    step = max(1, (64 << 20) // max(1, 4 * idx.shape[1] * g))  # bound the (rows, k, G) gather
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for s in range(0, n, step):
            nb = e[torch.from_numpy(idx[s : s + step])]  # (r, k, G)
            ww = torch.from_numpy(w[s : s + step]).unsqueeze(1)  # (r, 1, k)
            mu = torch.bmm(ww, nb)  # (r, 1, G)
            nb.sub_(mu).square_()
            var = torch.bmm(ww, nb).squeeze(1)
            pred[s : s + step] = mu.squeeze(1).numpy()
            spread[s : s + step] = var.clamp_(min=0.0).sqrt_().numpy()
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

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
        b, precision = exact_route(backend, str(index_kwargs.get("precision", "auto")), queries, self.embeddings, k,
                                   auto_exact_max)
        index_kwargs = {**index_kwargs, "precision": precision}
        index = None
        if b == "torch" and exact_precision(precision, len(self)) == "bf16":
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
        return search(queries, self.embeddings, k, b, auto_exact_max, index=index, routed=True, **index_kwargs)

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


SEARCH_STATS = {"rows": 0, "candidates": 0, "fp32_fallbacks": 0}
"""Counters of the bf16 exact search: query rows searched, (row, key) candidates re-ranked in fp32
(the candidates per row show how well the threshold prunes), and query chunks redone in fp32
because the bank defeated bf16's resolution. For benchmarks and tests; reset freely."""

BF16_MAX_KEPT = 0.05
"""The bf16 search gives up (and the search is done in fp32) once it keeps more than this fraction
of the (query, key) pairs it has scored, beyond ``4 k`` per query (:func:`_bf16_hopeless`): on a
bank whose neighbours all lie within bf16's error bound of each other (a trained encoder's narrow
cone: the 50th neighbour 0.991, the median key 0.987) it would otherwise keep ~80 % of them and
run out of memory (20k keys x 1,024 queries took 24 GB). Prunable banks keep < 1 %
(docs/PERFORMANCE.md 5c)."""


def _bf16_hopeless(kept: float, queries: int, scanned: int, k: int) -> bool:
    """Whether ``kept`` candidates for ``queries`` queries after ``scanned`` keys are too many for
    the bf16 search to pay (:data:`BF16_MAX_KEPT`); the ``4 k`` allowance is the top-k itself and
    its ties, which any bank keeps."""
    return kept > queries * (BF16_MAX_KEPT * scanned + 4 * k)


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
    ascending (what :func:`_padded` needs). Runs of ``g`` adjacent keys form a group: its max is
    a reduction over the last dim of the (n, w/g, g) view, and a group that reaches ``lo`` is read
    back as one 128-byte run (keys strided across the row cost 64 cache lines per group)."""
    import torch

    n, w = scores.shape
    g = _GROUP if w % _GROUP == 0 and w >= 4 * _GROUP else 1
    lo = lo.unsqueeze(1)
    if g == 1:
        flat = (scores >= lo).view(-1).nonzero().squeeze(1)
        return flat // w, flat % w, scores.view(-1)[flat].float()
    s3 = scores.view(n, w // g, g)
    if bool((lo > 0).all()):
        # positive bf16 values order like their bits as int16 (negative ones fall below any
        # positive threshold either way), and an int16 max is 5x faster than a bf16 one
        gmax = s3.view(torch.int16).amax(2) >= lo.view(torch.int16)
    else:
        gmax = s3.amax(2) >= lo
    gr, gc = gmax.nonzero(as_tuple=True)  # groups holding a candidate
    sub = s3.view(-1, g).index_select(0, gr * (w // g) + gc)  # (groups, g): their scores
    hit_g, hit_t = (sub >= lo[gr]).nonzero(as_tuple=True)
    # nonzero is row-major: gr ascends, and so does hit_g, so the rows come out ascending
    return gr[hit_g], gc[hit_g] * g + hit_t, sub[hit_g, hit_t].float()


def _bf16_threshold_topk(q, kt, kb, k: int, block: int, eps: float):
    """Exact top-``k`` of one query chunk: bf16 scores of bank blocks, keeping per query only
    keys within ``2 eps`` of the running k-th bf16 score; the survivors of the final threshold
    are ranked by fp32 dot products. ``(sims, idx, candidates)``.

    Why exact: after any blocks, ``k`` keys have bf16 scores >= the running k-th ``t``, so their
    true scores are >= ``t - eps`` and so is the true k-th score; a key whose bf16 score is
    below ``t - 2 eps`` has a true score below ``t - eps``: not in the top-k (ties included).
    No score block is sorted: per block a compare, and a top-k merge of ``k + (candidates in
    the block)`` columns per row for the threshold. ``None`` when more than
    :data:`BF16_MAX_KEPT` of the scored pairs survive (bf16 cannot tell this bank's keys apart)."""
    import torch

    n, m = q.shape[0], kt.shape[0]
    qb = q.to(torch.bfloat16)
    first = min(m, max(block, k))
    # one score buffer for all blocks: a fresh (n, block) product per block (32 MB, page faults on
    # first touch) ran the GEMM at half the rate of one written into reused memory
    buf = torch.empty(n * first, dtype=torch.bfloat16)

    def scores_of(start: int, stop: int):
        return torch.matmul(qb, kb[start:stop].T, out=buf[: n * (stop - start)].view(n, stop - start))

    bv = torch.topk(scores_of(0, first), k, dim=1, sorted=True).values.float()  # running top-k of bf16 scores
    parts, kept = [], 0
    for start, stop in [(0, first)] + [(s, min(m, s + block)) for s in range(first, m, block)]:
        scores = buf[: n * first].view(n, first) if start == 0 else scores_of(start, stop)
        rows, cols, vals = _above(scores, _bf16_floor(bv[:, -1] - 2 * eps))
        parts.append((rows, cols + start, vals))
        kept += rows.numel()
        if _bf16_hopeless(kept, n, stop, k):
            return None
        if start > 0 and rows.numel():  # block 0's bf16 top-k is already in bv
            (new_bv,) = _padded(rows, n, vals)
            bv = torch.topk(torch.cat([bv, new_bv], 1), k, dim=1, sorted=True).values
    rows, cols, vals = (torch.cat(x) for x in zip(*parts))
    keep = (vals >= bv[rows, -1] - 2 * eps).nonzero().squeeze(1)  # the final threshold
    keep = keep[torch.argsort(rows[keep], stable=True)]
    rows, cols = rows[keep], cols[keep]
    exact = torch.einsum("cd,cd->c", q.index_select(0, rows), kt.index_select(0, cols))  # 2x faster than [...]
    pv, pi = _padded(rows, n, exact, cols)
    v, j = torch.topk(pv, k, dim=1, sorted=True)
    return v, torch.gather(pi, 1, j), int(rows.numel())


def _bf16_search(q: np.ndarray, kt, kb, k: int, block: int, spans: list[tuple[int, int]],
                 sims_out: np.ndarray, idx_out: np.ndarray) -> list[tuple[int, int]]:
    """The bf16 threshold search of the query ``spans``, one worker thread per intra-op thread,
    each running its chunks on one thread: the selection ops are small and serial, so with one
    pool of 2 threads the second core idled through ~half of the search (and under load each
    small op waited for a descheduled OpenMP thread). Returns the spans left to fp32: all not
    finished once one chunk found the bank unprunable."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    eps = bf16_score_eps(kt.shape[1])
    threads = torch.get_num_threads()
    gave_up = threading.Event()

    def run(span: tuple[int, int]) -> tuple[tuple[int, int], int | None]:
        if gave_up.is_set():
            return span, None
        torch.set_num_threads(1)
        # grad mode and autocast are per thread: set them in the worker
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            out = _bf16_threshold_topk(torch.from_numpy(q[span[0] : span[1]]), kt, kb, k, block, eps)
        if out is None:
            gave_up.set()
            return span, None
        sims_out[span[0] : span[1]] = out[0].numpy()
        idx_out[span[0] : span[1]] = out[1].numpy()
        return span, out[2]

    try:
        with ThreadPoolExecutor(max(1, min(threads, len(spans)))) as pool:
            done = list(pool.map(run, spans))
    finally:
        torch.set_num_threads(threads)
    left = [span for span, c in done if c is None]
    SEARCH_STATS["fp32_fallbacks"] += int(bool(left))
    SEARCH_STATS["rows"] += sum(b - a for (a, b), c in done if c is not None)
    SEARCH_STATS["candidates"] += sum(c for _, c in done if c is not None)
    return left


TORCH_BF16_MIN = 100_000
"""From this bank size ``auto`` runs exact search as the bf16 threshold search where bf16 is
faster and the bank is prunable (:func:`bf16_prunes`): 10k queries, idle 2-core AVX512-BF16 CPU,
2.74x FAISS flat at 1M keys and 1.55x at 100k, but 0.85x at 50k and 0.43x at 20k, where FAISS
flat (or torch fp32 up to :data:`TORCH_EXACT_MAX`) is used (docs/PERFORMANCE.md 5c)."""


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

    n = q.shape[0]
    sims_out = np.empty((n, k), np.float32)
    idx_out = np.empty((n, k), np.int64)
    fp32_rows = max(1, chunk_bytes // (4 * max(1, keys.shape[0])))
    # autocast off: an outer bf16 autocast would otherwise turn the fp32 path into bf16
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        kt = torch.from_numpy(keys)
        spans = [(0, n)]
        if exact_precision(precision, keys.shape[0]) == "bf16":
            kb = keys_bf16 if keys_bf16 is not None else kt.to(torch.bfloat16)
            # at least one chunk per worker thread (a section's few hundred spots are split too)
            rows = max(1, min(int(chunk_rows), -(-n // torch.get_num_threads())))
            spans = _bf16_search(q, kt, kb, k, int(block), [(s, min(n, s + rows)) for s in range(0, n, rows)],
                                 sims_out, idx_out)
        for a, b in spans:  # fp32: everything, or what the bf16 search gave up on
            for s in range(a, b, fp32_rows):
                e = min(b, s + fp32_rows)
                v, i = topk_blocked(torch.from_numpy(q[s:e]) @ kt.T, k)
                sims_out[s:e] = v.numpy()
                idx_out[s:e] = i.numpy()
    return sims_out, idx_out


def bf16_prunes(q: np.ndarray, keys: np.ndarray, k: int, block: int = 16_384, sample: int = 256) -> bool:
    """Whether the bf16 threshold search can prune this bank for these queries: up to ``sample``
    queries scored in bf16 against the first ``block`` keys (what the search scores first) keep few
    enough pairs within ``2 eps`` of their k-th score (:func:`_bf16_hopeless`). Milliseconds; lets
    :func:`search` send a narrow-cone bank to an fp32 exact search before any work. ``keys``
    L2-normalised; ``q`` need not be."""
    import torch

    if len(q) == 0:
        return True
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        rows = np.linspace(0, len(q) - 1, min(len(q), sample)).astype(int)
        qs = torch.from_numpy(l2_normalise(np.atleast_2d(q)[rows])).bfloat16()
        s = (qs @ torch.from_numpy(keys[:block]).bfloat16().T).float()
        kth = torch.topk(s, min(k, s.shape[1]), dim=1).values[:, -1:]
        kept = int((s >= kth - 2 * bf16_score_eps(keys.shape[1])).sum())
    return not _bf16_hopeless(kept, s.shape[0], s.shape[1], k)


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
    (``pq_m`` sub-quantizers, default ``D / 2``: on a trained encoder's bank ``D / 4`` capped recall@50
    near 0.6 whatever the lists probed, docs/PERFORMANCE.md 5d'), the ``k_factor * k`` best re-ranked with the
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
        pq_m = int(index_kwargs.get("pq_m") or (d // 2 if d % 2 == 0 else d))
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
    search's setting (``fp32`` asked for: FAISS flat above :data:`TORCH_EXACT_MAX`). Whether bf16
    can prune the bank needs the queries: :func:`exact_route`."""
    if backend not in BACKENDS:
        raise ConfigError(f"retrieval backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if n_keys > auto_exact_max:
        return "faiss-ivfpq"
    if n_keys <= TORCH_EXACT_MAX or exact_precision(precision, n_keys) == "bf16":
        return "torch"
    return "faiss-flat"


def exact_route(
    backend: str, precision: str, queries: np.ndarray, keys: np.ndarray, k: int, auto_exact_max: int = 2_000_000
) -> tuple[str, str]:
    """``(backend, precision)`` for a search: :func:`resolve_backend`, then, where that chose the
    bf16 exact search, a :func:`bf16_prunes` probe; a bank bf16 cannot prune is searched in fp32
    (the same exact result), with FAISS flat where ``auto`` would have taken it without bf16."""
    b = resolve_backend(backend, keys.shape[0], auto_exact_max, precision)
    if b == "torch" and exact_precision(precision, keys.shape[0]) == "bf16" and not bf16_prunes(queries, keys, k):
        precision = "fp32"
        if backend == "auto":
            b = resolve_backend(backend, keys.shape[0], auto_exact_max, precision)
    return b, precision


def search(
    queries: np.ndarray,
    keys: np.ndarray,
    k: int,
    backend: str = "auto",
    auto_exact_max: int = 2_000_000,
    index: Any = None,
    routed: bool = False,
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
    ``routed``: ``backend`` and ``precision`` are already :func:`exact_route`'s answer (as
    :meth:`Bank.search` passes them), so its bf16 probe is not run a second time.
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
    b, precision = backend, str(index_kwargs.get("precision", "auto"))
    if not routed:
        b, precision = exact_route(b, precision, q, kk, k, auto_exact_max)
    if b == "torch":
        sims, idx = search_torch(
            q,
            kk,
            k,
            int(index_kwargs.get("chunk_bytes", 256 << 20)),
            precision,
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

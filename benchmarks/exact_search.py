"""Exact top-k cosine search against the machine's limit: the bf16 threshold search
(``retrieval.search_torch(precision="bf16")``) side by side with FAISS flat in one run.

Per size (``--sizes QUERIESxBANK``): the bank and queries are clustered Gaussian embeddings,
L2-normalised (``--clusters`` centres, spread ``--sigma``: neighbours are near-ties as in a
trained bank, unlike uniform random vectors); each method runs once (``--repeats`` for more,
median), in one process, one after the other:

``faiss-flat``  ``IndexFlatIP`` (tiled fp32 BLAS + heap top-k): the reference, recall 1.0
``torch-bf16``  bf16 scores of bank blocks, running per-query k-th threshold, fp32 re-rank of
                the candidates (certified: equals fp32 brute force)
``torch-fp32``  fp32 scores + blocked top-k (the previous torch path), with ``--methods``
``gemm-bf16``   the bf16 products alone (no selection): the floor for any bf16 method here

Columns: wall seconds, ratio to FAISS flat, recall@k against FAISS flat (set overlap) and the
largest gap between the exact scores of each method's k-th neighbour and FAISS's (0 = the same
top-k up to ties), candidates per query kept by the threshold.

    python benchmarks/exact_search.py                                    # 10k x 100k and 10k x 1M, 256-d, k=50
    python benchmarks/exact_search.py --sizes 2000x200000 --methods torch-bf16,faiss-flat,torch-fp32
    python benchmarks/exact_search.py --smoke
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

METHODS = ("faiss-flat", "torch-bf16", "torch-fp32", "gemm-bf16")


def clustered(n: int, d: int, clusters: int, sigma: float, seed: int, centres=None):
    """``n`` unit vectors around ``clusters`` random unit centres (generated in 100k-row pieces)."""
    import numpy as np

    from cmrcnet.retrieval import l2_normalise

    rng = np.random.default_rng(seed)
    if centres is None:
        centres = l2_normalise(rng.normal(size=(clusters, d)))
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        c = centres[rng.integers(0, len(centres), e - s)]
        out[s:e] = l2_normalise(c + (sigma / np.sqrt(d)) * rng.standard_normal((e - s, d), dtype=np.float32))
    return out, centres


def gemm_only(q, keys, block: int, rows: int) -> None:
    import torch

    kb = torch.from_numpy(keys).bfloat16()
    buf = torch.empty(rows * block, dtype=torch.bfloat16)  # reused, as the search reuses its score buffer
    with torch.no_grad():
        for s in range(0, q.shape[0], rows):
            qb = torch.from_numpy(q[s : s + rows]).bfloat16()
            for b in range(0, kb.shape[0], block):
                w = min(block, kb.shape[0] - b)
                torch.matmul(qb, kb[b : b + w].T, out=buf[: len(qb) * w].view(len(qb), w))


def main() -> None:
    import numpy as np

    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000x100000,10000x1000000", help="QUERIESxBANK, comma-separated")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--methods", default="faiss-flat,torch-bf16,gemm-bf16")
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--sigma", type=float, default=1.0, help="cluster spread (per-dimension sd x sqrt(dim))")
    p.add_argument("--block", type=int, default=16_384, help="torch-bf16: bank rows per scored block")
    p.add_argument("--chunk-rows", type=int, default=1024, help="torch-bf16: queries per chunk")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    if args.smoke:
        args.sizes, args.dim, args.k, args.clusters = "200x5000", 32, 10, 50
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "faiss-flat" not in methods or any(m not in METHODS for m in methods):
        raise SystemExit(f"--methods: choose from {METHODS}; faiss-flat (the reference) is required")
    C.apply_threads(args.threads)
    import faiss
    import torch

    from cmrcnet import retrieval as R

    if args.threads:
        faiss.omp_set_num_threads(int(args.threads))
    rep = C.Report("exact_search", args)
    rep.payload["bf16_is_faster"] = __import__("cmrcnet.runtime", fromlist=["x"]).bf16_is_faster("cpu")
    rows = []
    for size in args.sizes.split(","):
        nq, m = (int(x) for x in size.lower().split("x"))
        t = time.perf_counter()
        keys, centres = clustered(m, args.dim, args.clusters, args.sigma, seed=1)
        q, _ = clustered(nq, args.dim, args.clusters, args.sigma, seed=2, centres=centres)
        gen_s = time.perf_counter() - t
        times: dict[str, list[float]] = {mm: [] for mm in methods}
        results: dict[str, tuple] = {}
        stats: dict[str, int] = {}
        for _ in range(max(1, args.repeats)):
            for meth in methods:
                t = time.perf_counter()
                if meth == "faiss-flat":
                    index = faiss.IndexFlatIP(args.dim)
                    index.add(keys)
                    results[meth] = index.search(q, args.k)
                    del index
                elif meth == "torch-bf16":
                    R.SEARCH_STATS.update(rows=0, candidates=0)
                    results[meth] = R.search_torch(q, keys, args.k, precision="bf16", block=args.block,
                                                   chunk_rows=args.chunk_rows)
                    stats = dict(R.SEARCH_STATS)
                elif meth == "torch-fp32":
                    results[meth] = R.search_torch(q, keys, args.k, precision="fp32")
                else:
                    gemm_only(q, keys, args.block, args.chunk_rows)
                times[meth].append(time.perf_counter() - t)
        ref_i = results["faiss-flat"][1]
        t_ref = C.median(times["faiss-flat"])
        ex_ref = np.einsum("nd,nd->n", q, keys[ref_i[:, -1]])
        for meth in methods:
            row = {"queries": nq, "bank": m, "dim": args.dim, "k": args.k, "method": meth,
                   "seconds": round(C.median(times[meth]), 2), "vs_faiss_flat": round(t_ref / C.median(times[meth]), 2)}
            row["recall"] = row["max_kth_gap"] = None
            if meth in results:
                idx = results[meth][1]
                row["recall"] = round(float(np.mean([len(set(a) & set(b)) for a, b in zip(idx, ref_i)])) / args.k, 5)
                kth = np.einsum("nd,nd->n", q, keys[idx[:, -1]])
                row["max_kth_gap"] = float(np.abs(kth - ex_ref).max())
            row["cand_per_query"] = (round(stats["candidates"] / stats["rows"], 1)
                                     if meth == "torch-bf16" and stats.get("rows") else None)
            row["load1"] = C.loadavg()[0] if C.loadavg() else None
            rows.append(row)
        rep.note(f"{nq} x {m}: data generated in {gen_s:.1f} s; threads torch {torch.get_num_threads()}, "
                 f"faiss {faiss.omp_get_max_threads()}")
        del keys, q, results
    rep.table("exact", f"exact top-{args.k} (clustered unit vectors, {args.clusters} centres, sigma {args.sigma})", rows)
    rep.write(C.resolve_out(args.out, "exact_search", args.smoke))


if __name__ == "__main__":
    main()

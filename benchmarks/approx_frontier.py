"""Approximate top-k for banks beyond exact reach: the recall@k / query-time frontier at 1M.

Bank and queries: clustered Gaussian unit vectors (as ``exact_search.py``: ``--clusters``
centres, spread ``--sigma``). The exact reference is the certified bf16 search
(``retrieval.search_torch(precision="bf16")``, equal to fp32 brute force). Indexes (FAISS, L2
metric on unit vectors, as ``retrieval.build_faiss_index``), one coarse quantizer (k-means,
``--nlist`` lists, 64 training points per list) shared by the IVF variants:

``ivf-flat``     full vectors in the lists; ``nprobe`` sweep
``ivf-pq-rflat`` 4-bit fast-scan PQ codes (``D/4`` sub-quantizers) in the lists, the best
                 ``k_factor * k`` re-ranked exactly with the full vectors (``IndexRefineFlat``):
                 a large cheap candidate list, an exact final ranking; ``nprobe x k_factor`` sweep
``ivf-sq8-rflat`` 8-bit scalar-quantised lists + exact re-rank; ``nprobe x k_factor`` sweep
``hnsw``         ``IndexHNSWFlat`` (``--hnsw-m``, efConstruction 64); ``efSearch`` sweep, built
                 only for banks up to ``--hnsw-max-bank`` (its build is minutes at 1M on 2 cores)

Every setting is one timed query pass over all queries; ``meets`` marks recall >= ``--recall``
within ``--seconds``.

    python benchmarks/approx_frontier.py                       # 10k queries x 1M, 256-d, k=50
    python benchmarks/approx_frontier.py --bank 200000 --hnsw-max-bank 200000
    python benchmarks/approx_frontier.py --smoke
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from exact_search import clustered  # noqa: E402


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--bank", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobes", default="4,8,16,32,64")
    p.add_argument("--k-factors", default="4,16")
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--ef-searches", default="64,128,256")
    p.add_argument("--hnsw-max-bank", type=int, default=300_000)
    p.add_argument("--methods", default="ivf-flat,ivf-pq-rflat,ivf-sq8-rflat,hnsw")
    p.add_argument("--recall", type=float, default=0.95)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--max-query-s", type=float, default=60.0, help="stop a sweep once a pass is slower than this")
    args = p.parse_args()
    if args.smoke:
        args.queries, args.bank, args.dim, args.k, args.clusters, args.nlist = 200, 5000, 32, 10, 50, 32
        args.nprobes, args.k_factors, args.ef_searches = "4,16", "4", "32"
    C.apply_threads(args.threads)
    import faiss
    import numpy as np

    from cmrcnet.retrieval import search_torch

    if args.threads:
        faiss.omp_set_num_threads(int(args.threads))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rep = C.Report("approx_frontier", args)
    keys, centres = clustered(args.bank, args.dim, args.clusters, args.sigma, seed=1)
    q, _ = clustered(args.queries, args.dim, args.clusters, args.sigma, seed=2, centres=centres)
    t = time.perf_counter()
    _, ref = search_torch(q, keys, args.k, precision="bf16")
    rows = [{"method": "exact (torch-bf16)", "params": "", "build_s": 0.0, "query_s": round(time.perf_counter() - t, 2),
             "recall": 1.0, "meets": False, "load1": C.loadavg()[0]}]
    d, k = args.dim, args.k

    def sweep(name: str, index, build_s: float, points) -> None:
        for label, apply in points:
            apply()
            qs, rec = C.timed_search(index, q, k, ref)
            rows.append({"method": name, "params": label, "build_s": round(build_s, 1), "query_s": round(qs, 2),
                         "recall": round(rec, 4), "meets": rec >= args.recall and qs <= args.seconds,
                         "load1": C.loadavg()[0]})
            print(rows[-1], flush=True)
            if qs > args.max_query_s or rec >= 0.999:
                return

    nprobes = [int(x) for x in args.nprobes.split(",")]
    kfs = [int(x) for x in args.k_factors.split(",")]
    need_ivf = any(m.startswith("ivf") for m in methods)
    if need_ivf:
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        train = keys[np.sort(rng.choice(len(keys), min(len(keys), 64 * args.nlist), replace=False))]
        km = faiss.Kmeans(d, args.nlist, niter=20, seed=0)
        km.train(np.ascontiguousarray(train))
        coarse_s = time.perf_counter() - t0
        rep.note(f"k-means, {args.nlist} lists on {len(train)} points: {coarse_s:.1f} s")

    def quantizer():
        cq = faiss.IndexFlatL2(d)
        cq.add(km.centroids)
        return cq

    for name in methods:
        t0 = time.perf_counter()
        if name == "ivf-flat":
            cq = quantizer()
            index = faiss.IndexIVFFlat(cq, d, args.nlist, faiss.METRIC_L2)
            index.add(keys)
            ivf = index
            pts = [(f"nprobe {n}", lambda n=n, ivf=ivf: setattr(ivf, "nprobe", n)) for n in nprobes]
        elif name in ("ivf-pq-rflat", "ivf-sq8-rflat"):
            cq = quantizer()
            if name == "ivf-pq-rflat":
                base = faiss.IndexIVFPQFastScan(cq, d, args.nlist, d // 4, 4, faiss.METRIC_L2)
            else:
                base = faiss.IndexIVFScalarQuantizer(cq, d, args.nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2)
            base.train(keys[: 64 * args.nlist])
            index = faiss.IndexRefineFlat(base)
            index.add(keys)
            ivf = base
            pts = [(f"nprobe {n}, k_factor {kf}",
                    lambda n=n, kf=kf, ivf=ivf, index=index: (setattr(ivf, "nprobe", n), setattr(index, "k_factor", float(kf))))
                   for n in nprobes for kf in kfs]
        elif name == "hnsw":
            if args.bank > args.hnsw_max_bank:
                rep.note(f"hnsw not built: bank {args.bank} > --hnsw-max-bank {args.hnsw_max_bank}")
                continue
            index = faiss.IndexHNSWFlat(d, args.hnsw_m, faiss.METRIC_L2)
            index.hnsw.efConstruction = 64
            index.add(keys)
            pts = [(f"efSearch {e}", lambda e=int(e), index=index: setattr(index.hnsw, "efSearch", e))
                   for e in args.ef_searches.split(",")]
        else:
            raise SystemExit(f"unknown method {name}")
        build_s = time.perf_counter() - t0 + (coarse_s if name.startswith("ivf") else 0.0)
        sweep(name, index, build_s, pts)
        del index
    rep.table("frontier", f"top-{k}, {args.queries} queries x {args.bank} bank, {d}-d clustered "
              f"(recall target {args.recall} in {args.seconds} s)", rows)
    best = [r for r in rows if r["meets"]]
    rep.note("target reached by: " + (", ".join(f"{r['method']} ({r['params']}: {r['recall']} in {r['query_s']} s)"
                                                 for r in best) if best else "none"))
    rep.write(C.resolve_out(args.out, "approx_frontier", args.smoke))


if __name__ == "__main__":
    main()

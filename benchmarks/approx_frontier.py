"""Approximate top-k for banks beyond exact reach: the recall@k / query-time frontier at 1M.

Bank and queries: clustered Gaussian unit vectors (as ``exact_search.py``: ``--clusters``
centres, spread ``--sigma``), or with ``--run`` the trained-encoder bank of ``retrieval.py``
(her2st spots, C3 held out, mixed and noised to ``--bank`` rows, through the run's gene encoder:
a narrow cone where the 50th and 114th neighbours differ by ~3e-4). With ``--run`` each setting
is also priced in predicted expression: the mean of the neighbours' expression of the
``--expr-genes`` most expressed genes, against the exact neighbours' mean (``pcc_vs_exact``, mean
per-gene PCC over the queries) and against the queries' own expression (``pcc_truth``, the
figure a user sees; the exact search's is in its row). The exact reference is ``retrieval.search``'s
exact ``auto`` route (the certified bf16 search where bf16 can prune the bank, FAISS flat where it
cannot, as on the trained bank). Indexes (FAISS, L2
metric on unit vectors, as ``retrieval.build_faiss_index``), one coarse quantizer (k-means,
``--nlist`` lists, 64 training points per list) shared by the IVF variants:

``ivf-flat``     full vectors in the lists; ``nprobe`` sweep
``ivf-pq-rflat`` 4-bit fast-scan PQ codes (``--pq-m``, default ``D/4`` sub-quantizers) in the lists, the best
                 ``k_factor * k`` re-ranked exactly with the full vectors (``IndexRefineFlat``):
                 a large cheap candidate list, an exact final ranking; ``nprobe x k_factor`` sweep
``ivf-sq8-rflat`` 8-bit scalar-quantised lists + exact re-rank; ``nprobe x k_factor`` sweep
``library``      ``retrieval.build_faiss_index(keys, "faiss-ivfpq")`` with the package's defaults
                 (what ``auto`` uses beyond ``auto_exact_max``); one point
``hnsw``         ``IndexHNSWFlat`` (``--hnsw-m``, efConstruction 64); ``efSearch`` sweep, built
                 only for banks up to ``--hnsw-max-bank`` (its build is minutes at 1M on 2 cores)

Every setting is one timed query pass over all queries; ``meets`` marks recall >= ``--recall``
within ``--seconds``.

    python benchmarks/approx_frontier.py                       # 10k queries x 1M, 256-d, k=50
    python benchmarks/approx_frontier.py --bank 200000 --hnsw-max-bank 200000
    python benchmarks/approx_frontier.py --run RUN_DIR --cache bench_out/retrieval_cache   # trained bank
    python benchmarks/approx_frontier.py --smoke
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from exact_search import clustered  # noqa: E402

METHODS = ("ivf-flat", "ivf-pq-rflat", "ivf-sq8-rflat", "hnsw", "library")


def mean_gene_pcc(a, b) -> float:
    """Mean over columns (genes) of the Pearson correlation between ``a`` and ``b`` (rows: queries);
    a constant column counts as 0."""
    import numpy as np

    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return float(np.mean(np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1), 0.0)))


def check_args(args) -> None:
    """One line and exit 1 for what can be checked before minutes of work."""
    unknown = [m for m in args.methods.split(",") if m.strip() and m.strip() not in METHODS]
    if unknown:
        raise SystemExit(f"approx_frontier: --methods: unknown {unknown}; choose from {list(METHODS)}")
    if args.run is not None and not (args.run / "config.yaml").is_file():
        raise SystemExit(f"approx_frontier: --run {args.run}: not a cmrcnet run directory (no config.yaml)")
    if args.expr_genes < 1:
        raise SystemExit(f"approx_frontier: --expr-genes must be >= 1, got {args.expr_genes}")
    if args.pq_m < 0 or (args.pq_m and args.run is None and args.dim % args.pq_m):
        raise SystemExit(f"approx_frontier: --pq-m {args.pq_m} must divide --dim {args.dim} (0: dim / 4)")


def trained_bank(args):
    """``retrieval.py``'s trained-encoder bank (cached under ``--cache``) with the expression of the
    ``--expr-genes`` most expressed training genes for the bank rows and the queries."""
    import numpy as np
    import retrieval as RB

    from cmrcnet.utils import atomic_path

    data = C.her2st_dir(args.data)
    if data is None:
        raise SystemExit(C.data_missing(args.data))
    ref_seed, q_seed, src = RB.her2st_seeds(data)
    model, enc = RB.gene_encoder(ref_seed.shape[1], args.run, "cpu")
    if getattr(model, "n_genes", ref_seed.shape[1]) != ref_seed.shape[1]:
        raise SystemExit(f"--run {args.run}: trained on other genes than the her2st fold used here")
    cols = np.argsort(-ref_seed.mean(0), kind="stable")[: args.expr_genes]
    key = hashlib.sha1(f"{src}|{enc}|{ref_seed.shape}|{q_seed.shape}|{args.expr_genes}".encode()).hexdigest()[:10]
    out = []
    for name, seeds, n, seed in (("bank", ref_seed, args.bank, 1), ("queries", q_seed, args.queries, 2)):
        emb_p, expr_p = (args.cache / f"frontier_{name}_{key}_{n}_{kind}.npy" for kind in ("emb", "expr"))
        if emb_p.is_file() and expr_p.is_file():
            emb, expr = np.load(emb_p), np.load(expr_p)
        else:
            expr = np.empty((n, len(cols)), np.float32)
            emb = RB.augment_embed(model, seeds, n, seed=seed, expr_cols=cols, expr_out=expr)
            for arr, path in ((emb, emb_p), (expr, expr_p)):
                with atomic_path(path) as tmp:  # tmp ends in .npy: np.save keeps the name
                    np.save(tmp, arr)
        out += [emb, expr]
    return out[0], out[2], out[1], out[3], f"{src}, {enc}"


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
    p.add_argument("--pq-m", type=int, default=0, help="ivf-pq-rflat sub-quantizers (0: dim / 4)")
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--ef-searches", default="64,128,256")
    p.add_argument("--hnsw-max-bank", type=int, default=300_000)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--recall", type=float, default=0.95)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--max-query-s", type=float, default=60.0, help="stop a sweep once a pass is slower than this")
    p.add_argument("--run", type=Path, default=None, help="a trained CMRCNet run: its gene encoder makes the bank")
    p.add_argument("--data", default=None, help="her2st folder (with --run; default $CMRCNET_DATA_DIR)")
    p.add_argument("--cache", type=Path, default=C.DEFAULT_OUT_DIR / "retrieval_cache", help="generated banks (--run)")
    p.add_argument("--expr-genes", type=int, default=50, help="with --run: genes the expression columns price")
    args = p.parse_args()
    if args.smoke:
        args.queries, args.bank, args.dim, args.k, args.clusters, args.nlist = 200, 5000, 32, 10, 50, 32
        args.nprobes, args.k_factors, args.ef_searches = "4,16", "4", "32"
    check_args(args)
    C.apply_threads(args.threads)
    import faiss
    import numpy as np

    from cmrcnet.retrieval import exact_route, search

    if args.threads:
        faiss.omp_set_num_threads(int(args.threads))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rep = C.Report("approx_frontier", args)
    if args.run is not None:
        keys, q, bank_expr, q_expr, src = trained_bank(args)
        args.dim = keys.shape[1]
        if args.pq_m and args.dim % args.pq_m:
            raise SystemExit(f"approx_frontier: --pq-m {args.pq_m} must divide the run's embedding "
                             f"dimension {args.dim}")
    else:
        keys, centres = clustered(args.bank, args.dim, args.clusters, args.sigma, seed=1)
        q, _ = clustered(args.queries, args.dim, args.clusters, args.sigma, seed=2, centres=centres)
        bank_expr = q_expr = None
        src = f"{args.dim}-d clustered ({args.clusters} centres, sigma {args.sigma})"
    rep.note(f"bank: {src}")
    backend, precision = exact_route("auto", "auto", q, keys, args.k)
    route = f"{backend}/{precision}"
    t = time.perf_counter()
    _, ref = search(q, keys, args.k, backend, routed=True, precision=precision)
    rows = [{"method": f"exact ({route})", "params": "", "build_s": 0.0, "query_s": round(time.perf_counter() - t, 2),
             "recall": 1.0, "meets": False, "load1": C.loadavg()[0]}]
    d, k = args.dim, args.k
    exact_pred = None
    if bank_expr is not None:
        exact_pred = bank_expr[ref].mean(1)
        rows[0].update(pcc_vs_exact=1.0, pcc_truth=round(mean_gene_pcc(exact_pred, q_expr), 4))

    def sweep(name: str, index, build_s: float, points) -> None:
        for label, apply in points:
            apply()
            qs, rec, idx = C.timed_search(index, q, k, ref)
            rows.append({"method": name, "params": label, "build_s": round(build_s, 1), "query_s": round(qs, 2),
                         "recall": round(rec, 4), "meets": rec >= args.recall and qs <= args.seconds,
                         "load1": C.loadavg()[0]})
            if exact_pred is not None:
                pred = bank_expr[np.where(idx < 0, ref, idx)].mean(1)  # an empty slot (-1) counts as exact
                rows[-1].update(pcc_vs_exact=round(mean_gene_pcc(pred, exact_pred), 5),
                                pcc_truth=round(mean_gene_pcc(pred, q_expr), 4))
            print(rows[-1], flush=True)
            if qs > args.max_query_s or rec >= 0.999:
                return

    nprobes = [int(x) for x in args.nprobes.split(",")]
    kfs = [int(x) for x in args.k_factors.split(",")]
    need_ivf = any(m.startswith("ivf") for m in methods)  # "library" trains its own quantizer
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
                base = faiss.IndexIVFPQFastScan(cq, d, args.nlist, args.pq_m or d // 4, 4, faiss.METRIC_L2)
            else:
                base = faiss.IndexIVFScalarQuantizer(cq, d, args.nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2)
            base.train(keys[: 64 * args.nlist])
            index = faiss.IndexRefineFlat(base)
            index.add(keys)
            ivf = base
            pts = [(f"nprobe {n}, k_factor {kf}",
                    lambda n=n, kf=kf, ivf=ivf, index=index: (setattr(ivf, "nprobe", n), setattr(index, "k_factor", float(kf))))
                   for n in nprobes for kf in kfs]
        elif name == "library":  # what cmrcnet's faiss-ivfpq backend builds with its defaults
            from cmrcnet.retrieval import build_faiss_index, set_query_params

            index = build_faiss_index(keys, "faiss-ivfpq")
            pts = [("faiss-ivfpq defaults", lambda index=index: set_query_params(index, "faiss-ivfpq"))]
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
    rep.table("frontier", f"top-{k}, {args.queries} queries x {len(keys)} bank, {src} "
              f"(recall target {args.recall} in {args.seconds} s)", rows)
    best = [r for r in rows if r["meets"]]
    rep.note("target reached by: " + (", ".join(f"{r['method']} ({r['params']}: {r['recall']} in {r['query_s']} s)"
                                                 for r in best) if best else "none"))
    rep.write(C.resolve_out(args.out, "approx_frontier", args.smoke))


if __name__ == "__main__":
    main()

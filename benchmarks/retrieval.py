"""Top-k cosine retrieval at scale: exact torch, FAISS flat / IVF / HNSW, recall vs exact.

10,000 queries, top-50, against banks of 10k, 100k and 1M 256-d embeddings (10M with
``--gpu`` on a CUDA machine). For each backend: build time, query time, index bytes and
recall@50 against the exact torch result; IVF is swept over ``nlist`` x ``nprobe`` and
HNSW over ``efSearch`` (the trade-off curve), and the cheapest setting reaching the
recall target is reported.

Embeddings come from a real model and real expression: the CMRCNet cpu-preset gene
encoder (``embed_genes``; initial weights, or a trained run with ``--run``) applied to
her2st spot expression, augmented to reach millions of rows. Each synthetic spot is a
mix of two real spots (``lam * a + (1 - lam) * b``, ``lam ~ U(0, 1)``) with 10 % of
genes dropped to 0 and log-normal noise (sigma 0.1) on the rest, so the bank is a
continuous cloud around the real data rather than copies of ~1,000 points. References
are drawn from the training sections, queries from the held-out section (C3).
Generated banks are cached under ``--cache`` (prefixes of the largest one are the
smaller banks).

"torch" is exact fp32 search; "torch-bf16" is ``cmrcnet.retrieval``'s bf16 exact search (bf16
scores of bank blocks, a running per-query k-th threshold widened by the certified bf16 error
bound, fp32 re-rank of the candidates; candidates per query are reported);
"faiss-ivfpq" is IVF with 4-bit fast-scan PQ codes re-ranked on the full vectors.

    python benchmarks/retrieval.py                      # 10k, 100k, 1M (~15 min on 2 cores)
    python benchmarks/retrieval.py --sizes 10000,100000 --backends torch,faiss-ivf
    python benchmarks/retrieval.py --gpu                # adds 10M and CUDA exact search
    python benchmarks/retrieval.py --smoke
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HELD_OUT = "C3"
ALL_BACKENDS = ("torch", "torch-bf16", "faiss-flat", "faiss-ivf", "faiss-ivfpq", "faiss-hnsw")


# -- embeddings ------------------------------------------------------------------------------
def her2st_seeds(data: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Expression (log1p) of the training spots and of the held-out section, in the fold's genes."""
    from cmrcnet.config import make_config
    from cmrcnet.data.genes import expression_matrix, select_genes
    from cmrcnet.data.readers import read_dataset

    samples = read_dataset(data)
    cfg = make_config("cmrcnet", "cpu", {"data.path": str(data)})
    ids = [s.sample_id for s in samples]
    test = HELD_OUT if HELD_OUT in ids else ids[-1]
    train_ids = [i for i in ids if i != test]
    from cmrcnet.training import resolve_markers

    markers = resolve_markers(cfg)
    genes = select_genes(samples, train_ids, cfg.genes, markers if cfg.genes.include_markers else None)
    by_id = {s.sample_id: s for s in samples}
    ref = np.concatenate([expression_matrix(by_id[i], genes, cfg.genes.target_sum) for i in train_ids])
    qry = expression_matrix(by_id[test], genes, cfg.genes.target_sum)
    return ref.astype(np.float32), qry.astype(np.float32), f"her2st {len(train_ids)} sections -> {test}"


def gene_encoder(n_genes: int, run: Path | None, preset: str, seed: int = 0):
    """``embed_genes`` of a trained run, or of the preset's model at its initial weights."""
    import torch

    if run is not None:
        from cmrcnet.training import load_run

        r = load_run(run)
        return r.model.eval(), f"trained run {run}"
    from cmrcnet.config import make_config
    from cmrcnet.training import build_model

    torch.manual_seed(seed)
    cfg = make_config("cmrcnet", preset)
    return build_model(cfg, n_genes).eval(), f"cmrcnet {preset} preset, initial weights (seed {seed})"


def augment_embed(model, seeds: np.ndarray, n: int, seed: int, device: str = "cpu", chunk: int = 8192,
                  drop: float = 0.1, sigma: float = 0.1, expr_cols: np.ndarray | None = None,
                  expr_out: np.ndarray | None = None) -> np.ndarray:
    """``n`` L2-normalised gene embeddings of augmented mixes of rows of ``seeds`` (see module doc).

    ``expr_out`` (n, len(expr_cols)), when given, is filled with the mixes' expression of the
    genes ``expr_cols``: what a retrieval would average, to price an approximate index in
    predicted expression rather than in neighbour identity."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.from_numpy(seeds).to(device)
    model = model.to(device)
    out: np.ndarray | None = None  # filled in place: no second copy of a 1 GB bank
    with torch.no_grad():
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            i = torch.randint(0, len(base), (m,), generator=g, device=device)
            j = torch.randint(0, len(base), (m,), generator=g, device=device)
            lam = torch.rand((m, 1), generator=g, device=device)
            x = lam * base[i] + (1 - lam) * base[j]
            x = x * (torch.rand(x.shape, generator=g, device=device) >= drop)
            x = x * torch.exp(sigma * torch.randn(x.shape, generator=g, device=device))
            if expr_out is not None:
                expr_out[start : start + m] = x[:, torch.as_tensor(expr_cols, device=device)].cpu().numpy()
            e = torch.nn.functional.normalize(model.embed_genes(x).float(), dim=1).cpu().numpy()
            if out is None:
                out = np.empty((n, e.shape[1]), np.float32)
            out[start : start + m] = e
    return out if out is not None else np.zeros((0, 0), np.float32)


def cached(path: Path, make: Callable[[], np.ndarray]) -> np.ndarray:
    if path.is_file():
        return np.load(path, mmap_mode=None)
    arr = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)
    return arr


# -- search variants -------------------------------------------------------------------------
def search_torch_device(q: np.ndarray, keys_dev, k: int, chunk_bytes: int = 2 << 30):
    """Exact top-k on a CUDA device (keys already there); query blocks bounded by ``chunk_bytes``."""
    import torch

    dev = keys_dev.device
    rows = max(1, chunk_bytes // (keys_dev.element_size() * keys_dev.shape[0]))
    sims = np.empty((len(q), k), np.float32)
    idx = np.empty((len(q), k), np.int64)
    qd = torch.from_numpy(q).to(dev, keys_dev.dtype)
    for s in range(0, len(q), rows):
        v, i = torch.topk(qd[s : s + rows] @ keys_dev.T, k, dim=1)
        sims[s : s + rows] = v.float().cpu().numpy()
        idx[s : s + rows] = i.cpu().numpy()
    torch.cuda.synchronize()
    return sims, idx


def progress(r: dict[str, Any]) -> None:
    """One line per measurement while a long run goes on (the tables come at the end)."""
    keys = ("bank", "backend", "params", "build_s", "query_s", "recall", "load1")
    print("  " + "  ".join(f"{k}={C.fmt(r.get(k))}" for k in keys), flush=True)


def index_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).size)


# -- one bank size ---------------------------------------------------------------------------
def ivf_nlists(m: int, spec: str) -> list[int]:
    if spec != "auto":
        return [int(x) for x in spec.split(",")]
    base = 2 ** round(math.log2(max(1.0, math.sqrt(m))))
    return sorted({max(1, min(n, m // 39)) for n in (base, 2 * base)})


def bench_size(rep: C.Report, keys: np.ndarray, q: np.ndarray, k: int, args, backends: list[str]) -> tuple[list, list]:
    """Rows of the summary and of the trade-off curve for one bank."""
    import torch

    from cmrcnet.retrieval import build_faiss_index, search, set_query_params

    m, d = keys.shape
    nprobes = [int(p) for p in args.ivf_nprobe.split(",")]
    rows: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []

    def row(backend: str, params: str, build_s: float, query_s: float, nbytes: int, recall: float, queries: int) -> dict:
        r = {
            "bank": m,
            "backend": backend,
            "params": params,
            "build_s": build_s,
            "query_s": query_s,
            "query_s_10k": query_s * 10_000 / queries,
            "queries_timed": queries,
            "ms_per_query": 1000 * query_s / queries,
            "index_mb": nbytes / 2**20,
            "recall": recall,
            "load1": C.loadavg()[0],
        }
        progress(r)
        return r

    def sweep(index, backend: str, build_s: float, points: list[tuple[str, Callable[[], None]]]):
        """Time one query pass per setting (``params`` label, setter), recording each on the
        trade-off curve; stop once recall reaches ``--recall-stop`` or a pass exceeds ``--max-query-s``."""
        for params, apply in points:
            apply()
            qs, rec, _ = C.timed_search(index, q, k, ex_i)
            curve.append({"bank": m, "backend": backend, "params": params, "build_s": build_s,
                          "query_s": qs, "recall": rec, "load1": C.loadavg()[0]})
            progress(curve[-1])
            yield params, qs, rec
            if rec >= args.recall_stop or qs > args.max_query_s:
                return

    def not_reached(backend: str, build_s: float, nbytes: int) -> dict:
        """Summary row for a sweep that never reached the recall target: its last (slowest) setting."""
        last = next(c for c in reversed(curve) if c["backend"] == backend)
        return row(backend, last["params"] + " (target not reached)", build_s, last["query_s"], nbytes, last["recall"], len(q))

    ref_path = args.cache / f"exact_{args.cache_key}_{m}_{len(q)}_{k}.npy"
    if "torch" in backends or not ref_path.is_file():
        t = time.perf_counter()
        ex_s, ex_i = search(q, keys, k, backend="torch", precision="fp32")
        t_exact = time.perf_counter() - t
        np.save(ref_path, ex_i)
        if "torch" in backends:
            rows.append(row("torch", "exact fp32, chunk 256 MiB", 0.0, t_exact, keys.nbytes, 1.0, len(q)))
    else:
        ex_i = np.load(ref_path)  # exact reference from an earlier run on the same cached bank
    if "torch-bf16" in backends:
        from cmrcnet import retrieval as R

        R.SEARCH_STATS.update(rows=0, candidates=0)
        t = time.perf_counter()
        _, i = search(q, keys, k, backend="torch", precision="bf16")
        qs = time.perf_counter() - t
        per_q = R.SEARCH_STATS["candidates"] / max(1, R.SEARCH_STATS["rows"])
        rows.append(row("torch-bf16", f"threshold, {per_q:.0f} candidates/query re-ranked in fp32", 0.0, qs,
                        keys.nbytes * 3 // 2, C.recall_at_k(i, ex_i), len(q)))
    if "faiss-flat" in backends:
        nq = len(q) if m < args.flat_cap_from else min(len(q), args.flat_query_cap)
        t = time.perf_counter()
        index = build_faiss_index(keys, "faiss-flat")
        b_s = time.perf_counter() - t
        t = time.perf_counter()
        _, i = index.search(q[:nq], k)
        rows.append(row("faiss-flat", "exact", b_s, time.perf_counter() - t, index_bytes(index), C.recall_at_k(i, ex_i[:nq]), nq))
        del index
    if "faiss-ivf" in backends:
        nlists = ivf_nlists(m, args.ivf_nlist)
        settings = [(nl, int(args.ivf_train_per_list) * nl) for nl in nlists]
        if m <= args.ivf_default_max:
            settings.insert(0, (0, 0))  # the module's defaults
        for nlist, max_train in settings:
            kw: dict[str, Any] = {} if nlist == 0 else {"nlist": nlist, "max_train": max_train}
            t = time.perf_counter()
            index = build_faiss_index(keys, "faiss-ivf", **kw)
            b_s = time.perf_counter() - t
            nb = index_bytes(index)
            label = f"nlist {index.nlist}" + (" (module defaults)" if nlist == 0 else f", train {min(max_train, m):,}")
            label += f", imbalance {index.invlists.imbalance_factor():.1f}"

            default_nprobe = max(1, index.nlist // 16)
            points = [(f"{label}, nprobe {p}", partial(setattr, index, "nprobe", p))
                      for p in nprobes if p <= index.nlist]
            best = None
            for params, qs, rec in sweep(index, "faiss-ivf", b_s, points):
                if nlist == 0 and params.endswith(f", nprobe {default_nprobe}"):
                    rows.append(row("faiss-ivf", f"{params} (default)", b_s, qs, nb, rec, len(q)))
                if best is None and rec >= args.recall_target:
                    best = row("faiss-ivf", params, b_s, qs, nb, rec, len(q))
            if nlist != 0:
                rows.append(best or not_reached("faiss-ivf", b_s, nb))
            del index
    if "faiss-ivfpq" in backends:
        for nlist in ivf_nlists(m, args.ivfpq_nlist):
            t = time.perf_counter()
            index = build_faiss_index(keys, "faiss-ivfpq", nlist=nlist)
            b_s = time.perf_counter() - t
            nb = index_bytes(index)
            best = None
            for kf in [float(x) for x in args.ivfpq_k_factor.split(",")]:
                points = [(f"nlist {nlist}, PQ{d // 4}x4fs, k_factor {kf:g}, nprobe {p}",
                           partial(set_query_params, index, "faiss-ivfpq", nprobe=p, k_factor=kf))
                          for p in nprobes if p <= nlist]
                for params, qs, rec in sweep(index, "faiss-ivfpq", b_s, points):
                    if rec >= args.recall_target and (best is None or qs < best["query_s"]):
                        best = row("faiss-ivfpq", params, b_s, qs, nb, rec, len(q))
            rows.append(best or not_reached("faiss-ivfpq", b_s, nb))
            del index
    if "faiss-hnsw" in backends and m <= args.hnsw_max:
        t = time.perf_counter()
        index = build_faiss_index(keys, "faiss-hnsw", M=args.hnsw_m, ef_construction=args.hnsw_efc)
        b_s = time.perf_counter() - t
        nb = index_bytes(index)
        points = [(f"M {args.hnsw_m}, efC {args.hnsw_efc}, efSearch {ef}", partial(setattr, index.hnsw, "efSearch", ef))
                  for ef in (int(e) for e in args.hnsw_ef.split(","))]
        best = None
        for params, qs, rec in sweep(index, "faiss-hnsw", b_s, points):
            if best is None and rec >= args.recall_target:
                best = row("faiss-hnsw", params, b_s, qs, nb, rec, len(q))
        rows.append(best or not_reached("faiss-hnsw", b_s, nb))
        del index
    return rows, curve


def bench_gpu(keys: np.ndarray, q: np.ndarray, k: int) -> list[dict[str, Any]]:
    import torch

    rows = []
    m = keys.shape[0]
    ref = None
    for dtype in (torch.float32, torch.float16):
        t = time.perf_counter()
        kd = torch.from_numpy(keys).to("cuda", dtype)
        torch.cuda.synchronize()
        b_s = time.perf_counter() - t
        search_torch_device(q[:256], kd, k)  # warm-up
        t = time.perf_counter()
        _, i = search_torch_device(q, kd, k)
        qs = time.perf_counter() - t
        ref = i if ref is None else ref
        rows.append({"bank": m, "backend": "torch-cuda", "params": str(dtype).replace("torch.", ""), "build_s": b_s, "query_s": qs,
                     "query_s_10k": qs * 10_000 / len(q), "queries_timed": len(q), "ms_per_query": 1000 * qs / len(q),
                     "index_mb": kd.numel() * kd.element_size() / 2**20, "recall": C.recall_at_k(i, ref), "load1": C.loadavg()[0]})
        del kd
        torch.cuda.empty_cache()
    return rows


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--backends", default=",".join(ALL_BACKENDS))
    p.add_argument("--recall-target", type=float, default=0.95)
    p.add_argument("--recall-stop", type=float, default=0.995, help="stop a sweep once recall reaches this")
    p.add_argument("--max-query-s", type=float, default=60.0, help="stop a sweep once one query pass takes this long")
    p.add_argument("--ivf-nlist", default="auto", help="comma list, or auto = 2^round(log2 sqrt(M)) and twice that")
    p.add_argument("--ivf-nprobe", default="1,2,4,8,16,24,32,48,64,96,128")
    p.add_argument("--ivf-train-per-list", type=int, default=64, help="k-means training points per list (module default: 256)")
    p.add_argument("--ivf-default-max", type=int, default=100_000, help="also time the module's IVF defaults up to this bank size")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--hnsw-efc", type=int, default=80)
    p.add_argument("--hnsw-ef", default="50,64,96,128,192,256,384")
    p.add_argument("--hnsw-max", type=int, default=1_000_000, help="largest bank to build HNSW for")
    p.add_argument("--ivfpq-nlist", default="auto", help="comma list, or auto as for --ivf-nlist")
    p.add_argument("--ivfpq-k-factor", default="16", help="comma list of re-rank depths (x k)")
    p.add_argument("--flat-cap-from", type=int, default=1_000_000, help="from this bank size faiss-flat is timed on --flat-query-cap queries")
    p.add_argument("--flat-query-cap", type=int, default=2000)
    p.add_argument("--run", type=Path, default=None, help="use a trained run's gene encoder")
    p.add_argument("--data", default=None, help="her2st folder")
    p.add_argument("--cache", type=Path, default=C.DEFAULT_OUT_DIR / "retrieval_cache")
    p.add_argument("--gpu", action="store_true", help="on CUDA: add a 10M bank and exact search on the GPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.queries = "2000,5000", 200
        args.ivf_nprobe, args.hnsw_ef = "1,4,16", "64,128"
        args.threads = args.threads or 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    C.quiet_warnings()
    C.apply_threads(args.threads)
    import torch

    if args.threads:
        import faiss

        faiss.omp_set_num_threads(int(args.threads))
    rep = C.Report("retrieval", args)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    gpu = args.gpu and torch.cuda.is_available()
    if args.gpu and not gpu:
        rep.note("--gpu given but CUDA is not available: 10M / GPU rows skipped")
    if gpu and 10_000_000 not in sizes:
        sizes.append(10_000_000)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    data = None if args.smoke else C.her2st_dir(args.data)
    if data is not None:
        ref_seed, q_seed, src = her2st_seeds(data)
    else:
        if not args.smoke:
            rep.note(C.data_missing(args.data) + ": embedding synthetic gamma expression")
        rng = np.random.default_rng(0)
        ref_seed = np.log1p(rng.gamma(0.5, 2.0, (400, 200))).astype(np.float32)
        q_seed = np.log1p(rng.gamma(0.5, 2.0, (50, 200))).astype(np.float32)
        src = "synthetic gamma expression (smoke / no her2st)"
    model, enc = gene_encoder(ref_seed.shape[1], args.run, "tiny" if args.smoke else "cpu")
    if args.run is not None and getattr(model, "n_genes", ref_seed.shape[1]) != ref_seed.shape[1]:
        raise SystemExit("--run was trained on other genes than the her2st fold used here")
    dev = "cuda" if gpu else "cpu"
    key = hashlib.sha1(f"{src}|{enc}|{ref_seed.shape}|{q_seed.shape}".encode()).hexdigest()[:10]
    t = time.perf_counter()
    n_max = max(sizes)
    bank = cached(args.cache / f"bank_{key}_{n_max}.npy", lambda: augment_embed(model, ref_seed, n_max, seed=1, device=dev))
    queries = cached(args.cache / f"queries_{key}_{args.queries}.npy", lambda: augment_embed(model, q_seed, args.queries, seed=2, device=dev))
    rep.note(f"embeddings: {src}; encoder: {enc}; dim {bank.shape[1]}; generated/loaded in {time.perf_counter() - t:.1f} s")
    rep.payload["embeddings"] = {"source": src, "encoder": enc, "dim": int(bank.shape[1]), "cache_key": key}
    args.cache_key = key
    summary: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    for m in sizes:
        keys = np.ascontiguousarray(bank[:m])
        if m <= 2_000_000:
            r, c = bench_size(rep, keys, queries, args.k, args, backends)
            summary += r
            curve += c
        if gpu:
            summary += bench_gpu(keys, queries, args.k)
    cols = ["bank", "backend", "params", "build_s", "query_s", "query_s_10k", "queries_timed", "ms_per_query", "index_mb", "recall", "load1"]
    rep.table("summary", f"top-{args.k} cosine, {len(queries):,} queries (recall@{args.k} vs exact torch; IVF/HNSW: cheapest setting with recall >= {args.recall_target})", summary, cols)
    rep.table("tradeoff", "Trade-off curve (query time vs recall)", curve, ["bank", "backend", "params", "build_s", "query_s", "recall", "load1"])
    rep.write(C.resolve_out(args.out, "retrieval", args.smoke))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where exact top-50 search against a 1M bank spends its time: GEMM vs top-k, FAISS flat vs torch.

Reads the bank, queries and exact reference that ``benchmarks/retrieval.py`` cached (run that
first with ``--sizes ...,1000000``); ``--key`` picks the cached bank (file name part after
``bank_``). Prints and writes JSON.

    python benchmarks/retrieval_breakdown.py --key 5260c06b20 --out bench_out/retrieval_1m_breakdown.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("bench_out/retrieval_cache"))
    p.add_argument("--key", required=True)
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--out", type=Path, default=Path("bench_out/retrieval_1m_breakdown.json"))
    args = p.parse_args(argv)
    import torch

    from cmrcnet.retrieval import build_faiss_index, search_torch, topk_blocked

    bank = np.ascontiguousarray(np.load(args.cache / f"bank_{args.key}_{args.size}.npy")[: args.size])
    q = np.load(args.cache / f"queries_{args.key}_{args.queries}.npy")
    ex = np.load(args.cache / f"exact_{args.key}_{args.size}_{args.queries}_50.npy")
    recall = lambda i: float(np.mean([len(set(a) & set(b)) / 50 for a, b in zip(i, ex)]))  # noqa: E731
    out: dict[str, float] = {"threads": torch.get_num_threads()}
    kt, qt = torch.from_numpy(bank), torch.from_numpy(q[:512])
    t = time.perf_counter(); s = qt @ kt.T; out["gemm_fp32_512q_s"] = time.perf_counter() - t  # noqa: E702
    t = time.perf_counter(); topk_blocked(s, 50); out["topk_blocked_512q_s"] = time.perf_counter() - t  # noqa: E702
    t = time.perf_counter(); torch.topk(s, 50, dim=1); out["topk_plain_512q_s"] = time.perf_counter() - t  # noqa: E702
    del s
    kb, qb = kt.bfloat16(), qt.bfloat16()
    t = time.perf_counter(); s = qb @ kb.T; out["gemm_bf16_512q_s"] = time.perf_counter() - t  # noqa: E702
    del s, kb, qb
    index = build_faiss_index(bank, "faiss-flat")
    t = time.perf_counter(); _, i = index.search(q, 50); out["faiss_flat_s"] = time.perf_counter() - t  # noqa: E702
    out["faiss_flat_recall"] = recall(i)
    for mb in (64, 256, 1024):
        t = time.perf_counter()
        search_torch(q, bank, 50, chunk_bytes=mb << 20, precision="fp32")
        out[f"torch_fp32_chunk{mb}MB_s"] = time.perf_counter() - t
    print(json.dumps(out, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

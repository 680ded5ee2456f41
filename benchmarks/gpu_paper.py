"""GPU benchmark of the paper preset: training throughput (ViT-B/32, batch 64, bf16) and
exact retrieval against 1M references. Needs a CUDA GPU; exits with code 2 and a message
otherwise.

Measures, on one GPU:

- compute only: forward + backward + AdamW step of CMRCNet's paper preset (ViT-B/32 at
  224 px, batch 64, bf16 autocast) on a batch already on the device, median of ``--steps``
  steps after warm-up; FLOPs per patch (``FlopCounterMode``, training = 3x forward) and
  the fraction of the GPU's measured bf16 GEMM peak; ``--compile`` adds torch.compile;
- the loader side: patches/s that ``data.batches.spot_loader`` (uint8 -> float on the
  CPU, ``num_workers`` workers) delivers, plus host-to-device copy, versus what the GPU
  consumes (if the loader is slower, add ``train.num_workers``);
- retrieval: exact top-50 cosine for 10,000 queries against 1M (and ``--bank``) 256-d
  embeddings on the GPU, fp32 and fp16 (recall of fp16 vs fp32), bank from the CMRCNet
  gene encoder on augmented her2st expression when the data are present (else Gaussian).

    python benchmarks/gpu_paper.py
    python benchmarks/gpu_paper.py --methods cmrcnet,bleep,stnet --compile
    python benchmarks/gpu_paper.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NO_GPU_EXIT = 2


def cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


def gpu_batch(n: int, size_px: int, n_genes: int, device: str, seed: int = 0) -> dict:
    import torch

    from cmrcnet.data.batches import to_float_images

    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, size_px, size_px, 3), dtype=torch.uint8, generator=g)
    return {
        "img": to_float_images(u8).to(device),
        "expr": torch.log1p(torch.rand(n, n_genes, generator=g) * 5).to(device),
        "pos": torch.stack([torch.arange(n) // 16, torch.arange(n) % 16], 1).to(device),
        "index": torch.arange(n, device=device),
    }


def train_case(method: str, preset: str, batch_size: int, n_genes: int, steps: int, warmup: int, compile_: bool, peak: float) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cmrcnet.config import make_config
    from cmrcnet.training import build_model

    cfg = make_config(method, preset)
    torch.manual_seed(0)
    model = build_model(cfg, n_genes).cuda().train()
    n = batch_size if C.batches_spots(model) else 256  # whole-slide models: a slide of 256 spots
    batch = gpu_batch(n, cfg.patches.size_px, n_genes, "cuda")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.training_loss(batch)
    fwd = counter.get_total_flops() / n
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    loss_fn = torch.compile(model.training_loss) if compile_ else model.training_loss

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(batch)["loss"]
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    cuda_sync()
    first = time.perf_counter() - t0
    times = C.time_repeats(step, steps, warmup=warmup, sync=cuda_sync)
    med = C.median(times)
    pps = n / med
    achieved = 3 * fwd * pps / 1e9
    return {
        "method": method,
        "preset": preset,
        "precision": "bf16",
        "compile": compile_,
        "batch": n,
        "size_px": cfg.patches.size_px,
        "encoder": cfg.model.get("encoder"),
        "step_ms": 1000 * med,
        "patches_s": pps,
        "first_step_s": first,
        "fwd_gflop_patch": fwd / 1e9,
        "achieved_tflops": achieved / 1000,
        "peak_tflops": peak / 1000,
        "frac_peak": achieved / peak,
        "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
    }


def loader_rate(size_px: int, batch_size: int, n_spots: int, workers: int) -> dict[str, Any]:
    """Patches/s the package loader delivers to the GPU (augmentation on, pinned copy)."""
    import torch

    from cmrcnet.data.batches import SpotTable, spot_loader

    rng = np.random.default_rng(0)
    table = SpotTable(
        imgs=rng.integers(0, 256, (n_spots, size_px, size_px, 3), dtype=np.uint8),
        expr=rng.random((n_spots, 1000), dtype=np.float32),
        pos=np.zeros((n_spots, 2), np.int64),
        sample_ids=np.array(["S"] * n_spots),
        barcodes=np.array([str(i) for i in range(n_spots)]),
    )
    table.slide_index = {"S": np.arange(n_spots)}
    loader = spot_loader(table, batch_size, shuffle=True, augment=True, seed=0, drop_last=True, num_workers=workers)
    t0 = time.perf_counter()
    n = 0
    for b in loader:
        b["img"].pin_memory().to("cuda", non_blocking=True)
        n += b["img"].shape[0]
    cuda_sync()
    dt = time.perf_counter() - t0
    return {"workers": workers, "patches": n, "seconds": dt, "patches_s": n / dt}


def retrieval_rows(sizes: list[int], n_queries: int, k: int, data: Path | None) -> list[dict[str, Any]]:
    import torch

    import retrieval as R  # the sibling benchmark script (not cmrcnet.retrieval)

    if data is not None:
        ref, qry, src = R.her2st_seeds(data)
        model, _ = R.gene_encoder(ref.shape[1], None, "cpu")
        bank = R.augment_embed(model, ref, max(sizes), seed=1, device="cuda")
        queries = R.augment_embed(model, qry, n_queries, seed=2, device="cuda")
    else:
        g = torch.Generator(device="cuda").manual_seed(0)
        bank = torch.nn.functional.normalize(torch.randn(max(sizes), 256, device="cuda", generator=g), dim=1).cpu().numpy()
        queries = torch.nn.functional.normalize(torch.randn(n_queries, 256, device="cuda", generator=g), dim=1).cpu().numpy()
        src = "gaussian"
    rows = []
    for m in sizes:
        for r in R.bench_gpu(np.ascontiguousarray(bank[:m]), queries, k):
            r["source"] = src
            rows.append(r)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--methods", default="cmrcnet", help="methods to time at the paper preset")
    p.add_argument("--preset", default="paper")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--n-genes", type=int, default=4120, help="genes (her2st cpu/paper fold: 4,120)")
    p.add_argument("--workers", default="0,4", help="loader workers to time")
    p.add_argument("--bank", default="1000000", help="reference bank sizes for retrieval")
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--data", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.steps, args.warmup = "tiny", 3, 1
        args.bank, args.queries, args.workers, args.n_genes = "20000", 500, "0", 50
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_paper.py: no CUDA GPU is available (torch.cuda.is_available() is False); nothing was measured. "
              "Run it on a GPU machine; the CPU benchmarks are train_throughput.py, predict_throughput.py and retrieval.py.",
              file=sys.stderr)
        return NO_GPU_EXIT
    C.quiet_warnings()
    C.apply_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rep = C.Report("gpu_paper", args)
    n = 1024 if args.smoke else 8192
    peaks = {p: C.gemm_peak_gflops(p, n, device="cuda") for p in ("bf16", "fp32")}
    rep.table("gemm_peak", f"GEMM peak ({n}^3, fp32 = TF32 allowed)", [{"precision": p, "tflops": v / 1000} for p, v in peaks.items()])
    rows = []
    from cmrcnet.models import get_method

    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if not C.trains_by_gradient(get_method(method).model_cls):
            rep.note(f"{method}: fitted in closed form, no training step to time (skipped)")
            continue
        for comp in ([False, True] if args.compile else [False]):
            rows.append(train_case(method, args.preset, args.batch, args.n_genes, args.steps, args.warmup, comp, peaks["bf16"]))
            torch.cuda.empty_cache()
    rep.table("train", f"Training compute on {torch.cuda.get_device_name(0)} (bf16 autocast, fused AdamW)", rows)
    from cmrcnet.config import make_config

    size_px = make_config("cmrcnet", args.preset).patches.size_px
    lrows = [loader_rate(size_px, args.batch, 16 * args.batch, int(w)) for w in args.workers.split(",")]
    gpu_pps = rows[0]["patches_s"] if rows else float("nan")
    for r in lrows:
        r["gpu_patches_s"] = gpu_pps
        r["loader_keeps_up"] = r["patches_s"] >= gpu_pps
    rep.table("loader", "Loader (spot_loader, augment on) + pinned host-to-device copy vs GPU consumption", lrows)
    data = None if args.smoke else C.her2st_dir(args.data)
    if data is None and not args.smoke:
        rep.note(C.data_missing(args.data) + ": retrieval bank of Gaussian embeddings")
    rr = retrieval_rows([int(s) for s in args.bank.split(",")], args.queries, 50, data)
    rep.table("retrieval", f"Exact top-50 on the GPU, {args.queries:,} queries (recall of fp16 vs fp32)", rr,
              ["bank", "backend", "params", "build_s", "query_s", "ms_per_query", "index_mb", "recall", "source"])
    rep.write(C.resolve_out(args.out, "gpu_paper", args.smoke))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

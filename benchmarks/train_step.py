"""CMRCNet training step of the ``authors`` and ``paper`` presets: precision x attention kernel.

One optimiser step (forward, backward, AdamW) on one synthetic batch of 224-px patches, compute
only, for every variant of ``--precisions`` (fp32, bf16 autocast) x ``--attention`` (the
model's ``fused_attention``: ``never`` = explicit matmuls, the CPU default under ``auto``;
``always`` = ``F.scaled_dot_product_attention``), interleaved over ``--rounds`` so load changes
hit all variants alike. Reports the median step, patches/s and each variant's speed relative
to the preset's default on this machine (``train.precision=auto`` as resolved here,
``fused_attention=auto``), plus what ``auto`` resolved to.

    python benchmarks/train_step.py
    python benchmarks/train_step.py --presets authors --batch 64 --steps 3
    python benchmarks/train_step.py --smoke
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from train_throughput import compute_batch, make_step, synthetic_workload  # noqa: E402


def build(preset: str, attention: str, n_genes: int, size_px: int):
    import torch

    from cmrcnet.config import make_config
    from cmrcnet.training import build_model

    over = {"patches.size_px": size_px}
    if attention != "auto":
        over["model.fused_attention"] = attention
    cfg = make_config("cmrcnet", preset, over)
    torch.manual_seed(0)
    return build_model(cfg, n_genes), cfg


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--presets", default="authors,paper")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--attention", default="never,always")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--genes", type=int, default=1000)
    p.add_argument("--size-px", type=int, default=224)
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if args.smoke:
        args.presets, args.batch, args.genes, args.size_px, args.steps, args.rounds = "tiny", 8, 50, 32, 1, 1
    C.apply_threads(args.threads)
    C.quiet_warnings()
    from cmrcnet.runtime import resolve_precision

    rep = C.Report("train_step", args)
    auto = resolve_precision("auto", "cpu")
    rep.note(f"train.precision=auto resolves to {auto} on this machine")
    wl = synthetic_workload(args.size_px, max(args.batch, 64), args.genes)
    batch = compute_batch(wl.table, True, args.batch)
    import torch

    rows = []
    for preset in [s.strip() for s in args.presets.split(",") if s.strip()]:
        cases = {}
        for att in args.attention.split(","):
            for prec in args.precisions.split(","):
                model, _ = build(preset, att, wl.n_genes, args.size_px)
                model.on_train_start(torch.from_numpy(wl.table.expr))
                cases[(prec, att)] = (make_step(model, prec, False), [])
        for step, _ in cases.values():  # warm-up (oneDNN kernel selection, allocator)
            step(batch)
        for _ in range(max(1, args.rounds)):
            for step, times in cases.values():
                times += C.time_repeats(lambda step=step: step(batch), args.steps, warmup=0)
        default = ("bf16" if auto.startswith("bf16") else "fp32", "never")  # fused_attention=auto on CPU: explicit
        base = C.median(cases[default][1]) if default in cases else None
        for (prec, att), (_, times) in cases.items():
            med = C.median(times)
            rows.append({"preset": preset, "precision": prec, "attention": att, "step_s": round(med, 3),
                         "patches_s": round(args.batch / med, 1),
                         "speedup_vs_default": round(base / med, 2) if base else None,
                         "load1": C.loadavg()[0]})
    rep.table("steps", f"cmrcnet train step, batch {args.batch}, {args.size_px} px, {args.genes} genes "
              f"(speedup vs this machine's default: precision {auto}, explicit attention)", rows)
    rep.write(C.resolve_out(args.out, "train_step", args.smoke))


if __name__ == "__main__":
    main()

"""Frozen-encoder speed: feature caching throughput against the matmul peak, and one frozen fold.

Phases (``--phases``, both by default):

``encode``  patches/s of ``models.features.encode_views`` (what fills the feature cache) for the
            packaged ImageNet EfficientNet-Lite0 at 112 and 224 px and a ViT-B/16-sized encoder
            (random weights: speed does not depend on them) at 224 px, fp32 and bf16; FLOPs per
            patch (FlopCounterMode, one forward) and the achieved fraction of the measured GEMM peak.
``fold``    one her2st fold (C3 held out) per method in ``encoder_mode=frozen`` with
            EfficientNet-Lite0, through ``training.train``: the first run fills the cache
            (``feature_seconds``), the second reads it; ``train_seconds`` is the training on
            features alone (target <= 15 s).

    python benchmarks/frozen_features.py
    python benchmarks/frozen_features.py --phases encode --n 256
    python benchmarks/frozen_features.py --phases fold --cache $CMRCNET_CACHE --repeats 3   # warm cache only
    python benchmarks/frozen_features.py --smoke
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HELD_OUT = "C3"


def _patches(args, size_px: int):
    """A spot table of real her2st patches at ``size_px`` (synthetic patches without the data)."""
    import numpy as np

    from cmrcnet.config import make_config
    from cmrcnet.training import load_samples, spot_table

    her2st = None if args.smoke else C.her2st_dir(args.data)
    if her2st is not None:
        cfg = make_config("stnet", "cpu", {"data.path": str(her2st), "patches.size_px": size_px})
        s = [x for x in load_samples(cfg) if x.sample_id == "C2"][0]
        t = spot_table(s, list(s.adata.var_names[:4]), cfg)
        source = "her2st C2"
    else:
        from cmrcnet.data.synthetic import make_synthetic_dataset

        d = make_synthetic_dataset(Path(tempfile.mkdtemp()) / "ds", n_samples=1, n_patients=1, seed=0)
        cfg = make_config("stnet", "cpu", {"data.path": str(d), "patches.size_px": size_px})
        s = load_samples(cfg)[0]
        t = spot_table(s, list(s.adata.var_names[:4]), cfg)
        source = "synthetic"
    n = min(args.n, len(t))
    return t.subset(np.arange(n)), source


def phase_encode(args, rep: C.Report, peaks: dict[str, float]) -> None:
    from cmrcnet.models.encoders import ImageEncoder
    from cmrcnet.models.features import encode_views

    cases = [("efficientnet-lite0", {}, 112), ("efficientnet-lite0", {}, 224), ("vit_base_patch16_224", {}, 224)]
    if args.smoke:
        cases = [("efficientnet-lite0", {}, 32)]
    rows = []
    for name, kw, px in cases:
        table, source = _patches(args, px)
        enc = ImageEncoder(name, img_size=px if name.startswith("vit") else None, fallback_pool="timm", **kw).eval()
        flops = C.flops_per_patch(enc, px)
        for precision in args.precisions:
            bf16 = precision == "bf16"
            encode_views(enc, table.subset(range(min(16, len(table)))), views=1, token_grid=None, bf16=bf16)  # warm-up
            t0 = time.perf_counter()
            encode_views(enc, table, views=1, token_grid=None, bf16=bf16, batch_size=args.batch)
            dt = time.perf_counter() - t0
            rate = len(table) / dt
            rows.append({"encoder": name, "px": px, "precision": precision, "patches": len(table), "source": source,
                         "patches_per_s": rate, "gflop_per_patch": flops / 1e9, "gflop_s": rate * flops / 1e9,
                         "peak_fraction": rate * flops / 1e9 / peaks[precision], "load1": C.loadavg()[0]})
    rep.table("encode", "Feature caching throughput (encode_views, 1 view, eval, batch %d)" % args.batch, rows)


def phase_fold(args, rep: C.Report) -> None:
    from cmrcnet.config import make_config
    from cmrcnet.training import load_samples, train

    her2st = C.her2st_dir(args.data)
    if her2st is None or args.smoke:
        rep.note(C.data_missing(args.data) + ": fold phase skipped" if her2st is None else "smoke: fold phase skipped")
        return
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="frozen-cache-"))
    cfgs = {m: make_config(m, "cpu", {"data.path": str(her2st), "data.cache_dir": str(cache),
                                      "model.encoder": "efficientnet-lite0", "model.encoder_mode": "frozen"})
            for m in args.methods}
    samples = load_samples(next(iter(cfgs.values())))
    # a fresh cache: the first run of each method fills it; then warm runs, methods alternating so
    # that they share the machine's load
    runs = ([] if args.cache else ["cold cache"]) + ["warm cache"] * args.repeats
    rows = []
    for i, run in enumerate(runs):
        for method, cfg in cfgs.items():
            out = Path(tempfile.mkdtemp(prefix="frozen-run-"))
            load0 = C.loadavg()[0]
            t0 = time.perf_counter()
            train(cfg, out, [HELD_OUT], samples=samples)
            wall = time.perf_counter() - t0
            done = json.loads((out / "done.json").read_text())
            rows.append({"method": method, "run": run, "repeat": i, "feature_s": done["feature_seconds"],
                         "train_s": done["train_seconds"], "total_s": wall, "epochs": done.get("epochs_run", "-"),
                         "load1_start": load0, "load1_end": C.loadavg()[0]})
            shutil.rmtree(out, ignore_errors=True)
    rep.table("fold", f"One her2st fold ({HELD_OUT} held out), encoder_mode=frozen, EfficientNet-Lite0 (target train_s <= 15)", rows)


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="her2st folder (default $CMRCNET_DATA_DIR/her2st)")
    p.add_argument("--phases", default="encode,fold")
    p.add_argument("--n", type=int, default=512, help="patches encoded per case")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--methods", default="cmrcnet,bleep,stnet,ridge")
    p.add_argument("--cache", default=None, help="fold phase: an existing feature cache folder (default: a fresh one, "
                   "so the first run per method is timed with a cold cache)")
    p.add_argument("--repeats", type=int, default=1, help="fold phase: warm-cache runs per method (interleaved)")
    args = p.parse_args(argv)
    args.precisions = args.precisions.split(",")
    args.methods = args.methods.split(",")
    if args.smoke:
        args.n, args.batch, args.precisions = 16, 8, ["fp32"]
    C.apply_threads(1 if args.smoke and not args.threads else args.threads)
    C.quiet_warnings()
    rep = C.Report("frozen_features", args)
    peaks = {pr: C.gemm_peak_gflops(pr, n=256 if args.smoke else 2048) for pr in ("fp32", "bf16")}
    rep.table("gemm_peak", "Matmul peak (GEMM, median)", [{"precision": k, "gflop_s": v} for k, v in peaks.items()])
    phases = args.phases.split(",")
    if "encode" in phases:
        phase_encode(args, rep, peaks)
    if "fold" in phases:
        phase_fold(args, rep)
    rep.write(C.resolve_out(args.out, "frozen_features", args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())

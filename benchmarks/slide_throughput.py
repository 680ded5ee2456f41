"""Whole-slide prediction from a pyramidal file: spots/s, patches/s against the matmul peak, peak RSS.

Writes (once; reused when present) a procedural pyramidal slide, generic tiled TIFF with its
pixel size in the resolution tags (0.5 um/px by default, JPEG tiles, factor-2 levels), sized so
that the 100 um tissue grid has at least ``--spots`` pseudo-spots; then predicts it with a run
through ``cmrcnet.tl.predict(run, image=..., out=....h5ad)`` (pixel size read from the file,
patches read from the pyramid level the run needs, written to disk block by block), each
measurement in a fresh child process so its peak RSS (its own ``ru_maxrss``) is the slide's.

Each child also splits the work on the first 4,096 spots: reading alone (OpenSlide decode,
resampling, conversion to float) and the model alone (embedding, retrieval, averaging on the same
batches held in memory), so the end-to-end rate can be set against both.

``--prefetch 0,2`` compares reading the next batch of patches in a background thread (the
default, 2 ahead) with reading it in the model's thread, interleaved ``--repeats`` times.

``--encoder NAME`` (instead of ``--run``) trains a small frozen-encoder CMRCNet run on synthetic
spots with a random-weight ``NAME`` (any timm name, e.g. ``vit_base_patch16_224``, ViT-B-sized
like Phikon/CONCH's trunk) saved to a local file, so a foundation-sized encoder's slide rate is
measured without its weights. Each row also gives the model-only rate in GFLOP/s (encoder FLOPs
per patch, ``FlopCounterMode``) against the GEMM peak measured in the same run.

    python benchmarks/slide_throughput.py --run runs/her2st-final --slide /tmp/slide50k.tif
    python benchmarks/slide_throughput.py --encoder vit_base_patch16_224 --spots 2000 --prefetch 2
    python benchmarks/slide_throughput.py --smoke          # a small slide and a tiny run
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CHILD = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import cmrcnet as cn
from cmrcnet.tiling import grid_sample
from cmrcnet.training.predict import predict_streaming
run_dir, slide, out, prefetch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
run = cn.tl.load(run_dir)
t_load = time.perf_counter() - t0
t1 = time.perf_counter()
smp = grid_sample(slide)
t_grid = time.perf_counter() - t1
t2 = time.perf_counter()
pred = predict_streaming(run, smp, out=out, prefetch=prefetch)
t_pred = time.perf_counter() - t2
# the same work split in two, on the first 4,096 spots: reading + decoding + resampling the patches
# alone, then the model + retrieval + averaging alone on those batches held in memory
import itertools
from cmrcnet.training.fit import spot_positions
from cmrcnet.training.predict import ArraySink, predict_into, slide_batches
n_part = min(4096, smp.n_spots)
t3 = time.perf_counter()
part = list(itertools.islice(slide_batches(smp, run.cfg, spot_positions(smp), 256, prefetch=0), -(-n_part // 256)))
t_read = time.perf_counter() - t3
n_part = sum(len(b["index"]) for b in part)
t4 = time.perf_counter()
predict_into(run, part, ArraySink(n_part, len(run.genes)))
t_model = time.perf_counter() - t4
print(json.dumps({"spots": int(pred.n_obs), "genes": int(pred.n_vars), "um_per_px": smp.um_per_px,
                  "pixel_size_source": smp.pixel_size_source, "slide_px": list(smp.image.size),
                  "levels": smp.image.level_downsamples, "load_s": t_load, "grid_s": t_grid, "predict_s": t_pred,
                  "read_only_spots_per_s": n_part / t_read, "model_only_spots_per_s": n_part / t_model,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def slide_size_for(spots: int, pitch_um: float, um_per_px: float) -> tuple[int, int]:
    """Side (px) of a square procedural slide whose elliptical section holds ``spots`` grid points."""
    import numpy as np

    area_um2 = spots * pitch_um**2 / (np.pi * 0.42 * 0.40) * 1.05
    side = int(np.ceil(np.sqrt(area_um2) / um_per_px / 512) * 512)
    return side, side


def run_child(run: Path, slide: Path, prefetch: int, tmp: Path) -> dict:
    out = tmp / f"pred_{prefetch}_{time.monotonic_ns()}.h5ad"
    env = dict(os.environ, CMRCNET_PROGRESS_SECONDS="100000")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(run), str(slide), str(out), str(prefetch)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.perf_counter()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {stderr[-3000:]}")
    row = json.loads(stdout.strip().splitlines()[-1])
    row.update(prefetch=prefetch, wall_s=wall)
    out.unlink(missing_ok=True)
    return row


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="A trained run directory (default with --smoke: a tiny ridge run).")
    p.add_argument("--encoder", help="Instead of --run: a frozen CMRCNet run over this random-weight timm encoder.")
    p.add_argument("--slide", type=Path, help="Where the pyramidal slide is (written if missing).")
    p.add_argument("--spots", type=int, default=50_000)
    p.add_argument("--um-per-px", type=float, default=0.5)
    p.add_argument("--prefetch", default="0,2")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    C.quiet_warnings()
    from cmrcnet.data.synthetic import write_slide

    tmp = Path(tempfile.mkdtemp(prefix="slide_throughput_"))
    spots = 400 if args.smoke else args.spots
    slide = args.slide or tmp / f"slide_{spots}.tif"
    if not slide.is_file():
        size = slide_size_for(spots, 100.0, args.um_per_px)
        t0 = time.perf_counter()
        write_slide(slide, size=size, um_per_px=args.um_per_px, layout="generic", tile=512)
        print(f"wrote {slide} ({size[0]} x {size[1]} px, {slide.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    run = args.run
    if run is None and args.encoder:
        run = _frozen_encoder_run(tmp, args.encoder, args.smoke)
    if run is None:
        if not args.smoke:
            raise SystemExit("--run or --encoder is required, except with --smoke")
        run = _tiny_run(tmp)
    rep = C.Report("slide_throughput", args)
    gflop, precision = _encoder_cost(run)
    peak = C.gemm_peak_gflops(precision)
    rep.note(f"encoder: {gflop:.3f} GFLOP per patch, {precision}; GEMM peak in this run {peak:.0f} GFLOP/s ({precision})")
    rows = []
    for _ in range(args.repeats):
        for pf in [int(x) for x in args.prefetch.split(",")]:
            row = run_child(run, slide, pf, tmp)
            row["spots_per_s"] = row["spots"] / row["predict_s"]
            row["model_gflop_s"] = row["model_only_spots_per_s"] * gflop
            row["e2e_of_peak"] = row["spots_per_s"] * gflop / peak
            row["model_of_peak"] = row["model_gflop_s"] / peak
            row["load"] = C.loadavg()[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
    rep.table("slide", "Whole-slide prediction (streamed .h5ad)", rows,
              ["prefetch", "spots", "genes", "um_per_px", "pixel_size_source", "grid_s", "predict_s", "spots_per_s",
               "read_only_spots_per_s", "model_only_spots_per_s", "model_gflop_s", "model_of_peak", "e2e_of_peak",
               "peak_rss_mb", "wall_s", "load"])
    print(f"report -> {rep.write(C.resolve_out(args.out, 'slide_throughput', args.smoke))}")


def _encoder_cost(run_dir: Path) -> tuple[float, str]:
    """GFLOP of one patch through the run's image encoder, and the precision it runs in on this machine."""
    import cmrcnet as cn
    from cmrcnet.models.encoders import ImageEncoder
    from cmrcnet.runtime import resolve_precision

    run = cn.tl.load(run_dir)
    enc = next((m for m in run.model.modules() if isinstance(m, ImageEncoder)), None)
    gflop = 0.0 if enc is None else C.flops_per_patch(enc.eval(), run.cfg.patches.size_px) / 1e9
    precision = "bf16" if resolve_precision("auto", "cpu") == "bf16-mixed" else "fp32"
    return gflop, precision


def _frozen_encoder_run(tmp: Path, encoder: str, smoke: bool) -> Path:
    """A frozen CMRCNet run on synthetic spots over a random-weight ``encoder`` saved as a local file."""
    import timm
    import torch

    from cmrcnet.config import make_config
    from cmrcnet.data.readers.hest import write_hest
    from cmrcnet.data.synthetic import make_synthetic_samples
    from cmrcnet.training import train

    weights = tmp / f"{encoder}.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model(encoder, pretrained=False, num_classes=0).state_dict(), weights)
    data = write_hest(make_synthetic_samples(n_samples=2, n_spots=40 if smoke else 150, n_genes=50), tmp / "hest")
    cfg = make_config("cmrcnet", "cpu", {
        "data.path": str(data), "data.cache_dir": str(tmp / "cache"), "model.encoder": encoder,
        "model.encoder_weights": str(weights), "model.encoder_mode": "frozen", "model.frozen_views": "none",
        "patches.size_px": 224, "patches.size_um": 112.0, "train.epochs": 1})
    return train(cfg, tmp / "run", [])


def _tiny_run(tmp: Path) -> Path:
    from cmrcnet.config import make_config
    from cmrcnet.data.readers.hest import write_hest
    from cmrcnet.data.synthetic import make_synthetic_samples
    from cmrcnet.training import train

    data = write_hest(make_synthetic_samples(n_samples=2, n_spots=40, n_genes=20), tmp / "hest")
    cfg = make_config("ridge", "tiny", {"data.path": str(data), "data.cache_dir": str(tmp / "cache")})
    return train(cfg, tmp / "run", [])


if __name__ == "__main__":
    main()

"""Prediction throughput and memory: embedding, one her2st section, a whole-slide grid.

Phases (``--phases``, all by default):

``embed``    image-embedding patches/s of the run's model (CMRCNet cpu preset), eval mode,
             bf16 autocast vs fp32, at batch 64 and 256, on the held-out section's real
             patches; plus how much bf16 changes the retrieved neighbours (top-50 overlap).
``section``  end-to-end ``training.predict_sample`` on the held-out her2st section (C3):
             spots/s with the patch cache warm and cold (patches cut from the JPEG), and a
             breakdown (patch table, embedding, search, averaging, AnnData).
``grid``     ``tiling.grid_sample`` on the held-out section's JPEG with the pitch chosen so
             that >= ``--grid-spots`` pseudo-spots land on tissue, then
             ``training.predict_streaming``; each size runs in a fresh child process so its
             peak RSS (``VmHWM``) is its own. Target: peak memory < 4 GB whatever the slide size.

The model: unless ``--run RUN_DIR`` names a trained run, a run directory is built without
training (``cmrcnet`` cpu preset with its initial weights, genes selected on the training
sections, bank embedded from their real expression; ``--train-steps N`` trains N steps
through the real trainer instead). Weights change nothing about speed or memory.
"bf16" rows run only the image encoder under bf16 autocast (a proposed predict option).

    python benchmarks/predict_throughput.py
    python benchmarks/predict_throughput.py --run runs/demo/run --grid-spots 5000,20000,40000
    python benchmarks/predict_throughput.py --smoke
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HELD_OUT = "C3"
GB = 1024.0


# -- setup -----------------------------------------------------------------------------------
def synthetic_data(root: Path) -> Path:
    from cmrcnet.data.synthetic import make_synthetic_dataset

    dest = root / "synthetic_hest"
    if not (dest / "st").is_dir():
        make_synthetic_dataset(dest)
    return dest


def quick_run(data: Path, run_dir: Path, preset: str, test_id: str, samples: list, max_steps: int) -> Path:
    """Train ``cmrcnet`` for ``max_steps`` steps through the real trainer (``--train-steps``)."""
    from cmrcnet.config import make_config
    from cmrcnet.training import train

    if (run_dir / "done.json").is_file():
        return run_dir
    cfg = make_config("cmrcnet", preset, {"data.path": str(data), "train.epochs": 1, "train.max_steps": max_steps})
    return train(cfg, run_dir, [test_id], samples=samples, resume=True)


def untrained_run(data: Path, run_dir: Path, preset: str, test_id: str, samples: list) -> Path:
    """A complete run directory without training: the fold's genes, the preset's model with its
    initial weights, and the bank embedded from the real training expression (what ``train``
    writes, minus Lightning). Speed and memory do not depend on the weights."""
    import torch

    from cmrcnet.config import make_config
    from cmrcnet.training import build_model, describe_run, prepare_fold, save_model
    from cmrcnet.utils import write_json_atomic, write_text_atomic

    if (run_dir / "done.json").is_file():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = make_config("cmrcnet", preset, {"data.path": str(data)})
    ids = [s.sample_id for s in samples]
    fold = prepare_fold(samples, [i for i in ids if i != test_id], [test_id], cfg, run_dir)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, len(fold.genes)).eval()
    write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
    write_text_atomic(run_dir / "genes.txt", "\n".join(fold.genes) + "\n")
    run_info = describe_run(cfg, fold, {"untrained": True})
    write_json_atomic(run_dir / "run.json", run_info)
    save_model(run_dir / "model.pt", model, cfg, fold.genes, run_info)
    model.make_predictor(fold, cfg).save(run_dir)  # the bank, embedded from fold.reference (train + val)
    write_json_atomic(run_dir / "done.json", {"method": cfg.method, "test_ids": [test_id], "untrained": True})
    return run_dir


def embed_precision(run, precision: str):
    """Set the run's ``retrieval.embed_precision`` (what ``cmrcnet predict`` reads, and what the
    run's retrieval predictor embeds with) for a measurement."""
    run.cfg.retrieval.embed_precision = precision
    settings = getattr(run.predictor, "settings", None)
    if settings is not None:
        settings.embed_precision = precision


def bank_of(run):
    """The reference bank of a retrieval run (None for a regression method)."""
    return getattr(run.predictor, "bank", None)


def autocast(precision: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


# -- phase: embed ----------------------------------------------------------------------------
def embed_phase(rep: C.Report, run, table, batches: list[int], precisions: list[str], repeats: int) -> None:
    import torch

    from cmrcnet.data.batches import to_float_images
    from cmrcnet.retrieval import l2_normalise, search

    model = run.model.eval()
    rows = []
    n = len(table)
    for bs in batches:
        idx = np.arange(bs) % n
        u8 = torch.from_numpy(np.ascontiguousarray(table.imgs[idx]))
        t_conv = C.median(C.time_repeats(lambda: to_float_images(u8), repeats, warmup=1))
        x = to_float_images(u8)
        for prec in precisions:

            def go() -> None:
                with torch.no_grad(), autocast(prec):
                    model.embed_images(x)

            med = C.median(C.time_repeats(go, repeats, warmup=2))
            rows.append(
                {
                    "batch": bs,
                    "precision": prec,
                    "embed_ms": 1000 * med,
                    "patches_s": bs / med,
                    "uint8_to_float_ms": 1000 * t_conv,
                    "with_conversion_patches_s": bs / (med + t_conv),
                    "load1": C.loadavg()[0],
                }
            )
    rep.table("embed", "Image embedding (model.embed_images, eval, no_grad)", rows)
    # does bf16 change what is retrieved?
    bank = bank_of(run)
    if bank is not None and {"bf16", "fp32"} <= set(precisions):
        x = to_float_images(torch.from_numpy(np.ascontiguousarray(table.imgs)))
        embs = {}
        for prec in ("fp32", "bf16"):
            with torch.no_grad(), autocast(prec):
                embs[prec] = model.embed_images(x).float().numpy()
        k = min(run.predictor.settings.top_k, len(bank))
        _, i32 = search(embs["fp32"], bank.embeddings, k, backend="torch")
        _, i16 = search(embs["bf16"], bank.embeddings, k, backend="torch")
        overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(i32, i16)])
        cos = float(np.mean(np.sum(l2_normalise(embs["fp32"]) * l2_normalise(embs["bf16"]), 1)))
        rep.table(
            "bf16_agreement",
            "bf16 vs fp32 embeddings of the held-out section",
            [{"spots": len(table), "mean_cosine": cos, f"top{k}_overlap": float(overlap)}],
        )


# -- phase: section --------------------------------------------------------------------------
def breakdown(run, sample, precision: str) -> dict[str, float]:
    """Time the steps ``predict_sample`` runs, one by one (same calls, same order): the patch
    table, then what ``predict_into`` does with the run's retrieval predictor (embed the batches,
    search the bank, average the neighbours: ``RetrievalPredictor.search`` split in two), then
    the rows into an ``ArraySink`` and the AnnData (both in ``anndata_s``)."""
    from cmrcnet.retrieval import predict_from_neighbours
    from cmrcnet.training import ArraySink, prediction_anndata, spot_table, table_batches

    out: dict[str, float] = {}
    t = time.perf_counter()
    table = spot_table(sample, run.genes, run.cfg, with_expr=True)
    out["patch_table_s"] = time.perf_counter() - t
    embed_precision(run, precision)
    predictor = run.predictor
    t = time.perf_counter()
    parts = list(predictor.embed(run.model.prediction_batches(table_batches(table))))
    rows = np.concatenate([r for r, _ in parts])
    q = np.concatenate([e for _, e in parts])
    out["embed_s"] = time.perf_counter() - t
    s, bank = predictor.settings, predictor.bank
    k = min(int(s.top_k), len(bank))
    t = time.perf_counter()
    sims, idx = bank.search(q, k, s.backend, s.auto_exact_max, precision=s.exact_precision, **dict(s.index))
    out["search_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pred, spread = predict_from_neighbours(sims, idx, bank.expression, s.weighting)
    out["neighbours_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sink = ArraySink(len(table), len(run.genes))
    sink.write(rows, pred, spread)
    prediction_anndata(run, sample, table.barcodes, sink.x, sink.spread, table.expr, predictor)
    out["anndata_s"] = time.perf_counter() - t
    return out


def section_phase(rep: C.Report, run, sample, precisions: list[str], repeats: int, profile: bool) -> None:
    from cmrcnet.training import predict_sample

    rows = []
    cold_dir = Path(tempfile.mkdtemp(prefix="cmrcnet_cold_cache_"))
    warm_cache = run.cfg.data.cache_dir
    for prec in precisions:
        for cache in ("warm", "cold"):
            times = []
            for r in range(repeats if cache == "warm" else 1):
                if cache == "cold":
                    run.cfg.data.cache_dir = str(cold_dir / f"{prec}{r}")
                    sample.image.release()
                t0 = time.perf_counter()
                embed_precision(run, prec)
                adata = predict_sample(run, sample)
                times.append(time.perf_counter() - t0)
                run.cfg.data.cache_dir = warm_cache
            med = C.median(times)
            parts = breakdown(run, sample, prec) if cache == "warm" else {}
            rows.append(
                {
                    "precision": prec,
                    "patch_cache": cache,
                    "spots": adata.n_obs,
                    "genes": adata.n_vars,
                    "predict_s": med,
                    "spots_s": adata.n_obs / med,
                    **parts,
                    "load1": C.loadavg()[0],
                }
            )
    rep.table("section", f"predict_sample on held-out section {sample.sample_id} (bank {len(bank_of(run))} spots; precision = retrieval.embed_precision)", rows)
    if profile:
        pr = cProfile.Profile()
        pr.enable()
        predict_sample(run, sample)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(25)
        text = s.getvalue()
        rep.payload.setdefault("profiles", {})["predict_sample_cprofile_cumulative"] = text
        print("\ncProfile of predict_sample (warm cache, fp32), top 25 by cumulative time:\n" + text)


# -- phase: grid (child process) -------------------------------------------------------------
def choose_pitch(image_path: Path, um_per_px: float, target: int, tries: int = 6) -> tuple[Any, float]:
    """Grid ``Sample`` with >= ``target`` pseudo-spots on tissue (pitch from the tissue area, then refined)."""
    from cmrcnet.tiling import grid_sample

    smp = grid_sample(image_path, um_per_px, pitch_um=100.0)
    w, h = smp.image.size
    tissue_um2 = smp.meta["tissue_fraction"] * w * h * um_per_px**2
    pitch = float(np.sqrt(tissue_um2 / target))
    for _ in range(tries):
        smp.image.release()
        smp = grid_sample(image_path, um_per_px, pitch_um=pitch)
        if smp.n_spots >= target:
            return smp, pitch
        pitch *= 0.98 * float(np.sqrt(smp.n_spots / target))
    return smp, pitch


def grid_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: the peak RSS reported is this grid's alone."""
    import torch

    from cmrcnet.training import load_run, predict_streaming, write_h5ad_atomic

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    res: dict[str, Any] = {"rss_after_import_mb": C.current_rss_mb()}
    run = load_run(spec["run"])
    res["rss_after_load_run_mb"] = C.current_rss_mb()
    t0 = time.perf_counter()
    smp, pitch = choose_pitch(Path(spec["image"]), float(spec["um_per_px"]), int(spec["target"]))
    res["grid_s"] = time.perf_counter() - t0
    res["pitch_um"] = pitch
    res["spots"] = smp.n_spots
    res["image_px"] = list(smp.image.size)
    res["rss_after_grid_mb"] = C.current_rss_mb()
    res["peak_before_predict_mb"] = C.peak_rss_mb()
    t0 = time.perf_counter()
    embed_precision(run, spec["precision"])
    stream_to = Path(spec["write"]) if spec.get("stream") else None
    pred = predict_streaming(run, smp, batch_size=int(spec.get("batch", 256)), out=stream_to)
    res["predict_s"] = time.perf_counter() - t0
    res["spots_s"] = smp.n_spots / res["predict_s"]
    res["genes"] = pred.n_vars
    res["output"] = "streamed to h5ad" if stream_to else "in memory"
    res["peak_after_predict_mb"] = C.peak_rss_mb()
    if stream_to is not None:
        res["write_s"] = 0.0  # included in predict_s
        res["h5ad_mb"] = round(stream_to.stat().st_size / 2**20, 1)
        pred.file.close()
        stream_to.unlink()
    elif spec.get("write"):
        path = Path(spec["write"])
        t0 = time.perf_counter()
        write_h5ad_atomic(pred, path)
        res["write_s"] = time.perf_counter() - t0
        res["h5ad_mb"] = round(path.stat().st_size / 2**20, 1)
        path.unlink()
    res["peak_rss_mb"] = C.peak_rss_mb()
    res["load1"] = C.loadavg()[0]
    return res


def grid_phase(rep: C.Report, run_dir: Path, image: Path, um_per_px: float, targets: list[int], precisions: list[str], args) -> None:
    rows = []
    for prec in precisions:
        for target in targets:
            spec = {
                "run": str(run_dir),
                "image": str(image),
                "um_per_px": um_per_px,
                "target": target,
                "precision": prec,
                "threads": args.threads,
                "write": str(Path(tempfile.gettempdir()) / f"cmrcnet_grid_{os.getpid()}.h5ad") if (args.grid_write or args.grid_stream) else "",
                "stream": bool(args.grid_stream),
            }
            cmd = [sys.executable, str(Path(__file__).resolve()), "--grid-child", json.dumps(spec)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rep.note(f"grid {target} {prec} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["child_wall_s"] = time.perf_counter() - t0
            rows.append({"target": target, "precision": prec, **res})
    cols = ["target", "precision", "output", "spots", "pitch_um", "genes", "grid_s", "predict_s", "spots_s", "write_s", "h5ad_mb",
            "rss_after_load_run_mb", "peak_before_predict_mb", "peak_after_predict_mb", "peak_rss_mb", "load1"]
    rep.table("grid", f"Whole-slide grid: grid_sample + predict_streaming ({image.name}, child process per row)", rows, cols)
    fp = [r for r in rows if r["precision"] == precisions[0]]
    if len(fp) >= 2:
        x = np.array([r["spots"] for r in fp], float)
        y = np.array([r["peak_rss_mb"] for r in fp], float)
        slope, icpt = np.polyfit(x, y, 1)
        at4 = (4 * GB - icpt) / slope if slope > 0 else float("inf")
        rep.table(
            "grid_memory_model",
            "Peak RSS ~ a + b x spots (fit over the grid rows)",
            [{"a_mb": icpt, "b_kb_per_spot": slope * 1024, "spots_at_4gb": at4, "genes": fp[0].get("genes")}],
        )


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--phases", default="embed,section,grid")
    p.add_argument("--run", type=Path, default=None, help="a trained run directory (default: train a quick one)")
    p.add_argument("--data", default=None, help="her2st folder")
    p.add_argument("--train-steps", type=int, default=0, help="train this many steps instead of using initial weights")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--precisions", default="bf16,fp32", help="retrieval.embed_precision values to compare")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--grid-spots", default="5000,20000", help="pseudo-spot targets (>= 2 gives a memory-vs-size fit)")
    p.add_argument("--grid-precisions", default="auto", help="retrieval.embed_precision values: auto (as shipped), fp32, bf16")
    p.add_argument("--grid-write", action="store_true", help="predict in memory, then write the grid's h5ad (timed, then deleted)")
    p.add_argument("--grid-stream", action="store_true", help="stream the prediction into the h5ad (what `cmrcnet predict --image` does)")
    p.add_argument("--profile", action="store_true", help="cProfile of predict_sample")
    p.add_argument("--work", type=Path, default=None, help="folder for the quick run (default bench_out/predict_work)")
    p.add_argument("--grid-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.preset = "tiny"
        args.batches, args.repeats = "16", 2
        args.grid_spots = "150"
        args.phases = args.phases if args.phases != "embed,section,grid" else "embed,section,grid"
        args.threads = args.threads or 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    C.quiet_warnings()
    if args.grid_child:
        print(json.dumps(grid_child(json.loads(args.grid_child)), default=float))
        return 0
    C.apply_threads(args.threads)
    from cmrcnet.data.readers import read_dataset
    from cmrcnet.training import load_run, spot_table

    rep = C.Report("predict_throughput", args)
    phases = {s.strip() for s in args.phases.split(",") if s.strip()}
    precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    work = args.work or (C.DEFAULT_OUT_DIR / ("predict_work_smoke" if args.smoke else "predict_work"))
    work.mkdir(parents=True, exist_ok=True)
    data = None if args.smoke else C.her2st_dir(args.data)
    if data is None:
        data = synthetic_data(work)
        rep.note(f"using the synthetic dataset at {data} ({'smoke' if args.smoke else C.data_missing(args.data)})")
    samples = read_dataset(data)
    ids = [s.sample_id for s in samples]
    test_id = HELD_OUT if HELD_OUT in ids else ids[-1]
    held = next(s for s in samples if s.sample_id == test_id)
    t0 = time.perf_counter()
    if args.run:
        run_dir, how = args.run, "given"
    elif args.train_steps > 0:
        run_dir = quick_run(data, work / f"run_{args.preset}_{test_id}_steps{args.train_steps}", args.preset, test_id, samples, args.train_steps)
        how = f"trained {args.train_steps} steps through cmrcnet.training.train"
    else:
        run_dir = untrained_run(data, work / f"run_{args.preset}_{test_id}_untrained", args.preset, test_id, samples)
        how = "untrained model (initial weights) + bank of the real training expression"
    rep.note(f"run {run_dir}: {how}; ready in {time.perf_counter() - t0:.1f} s")
    run = load_run(run_dir)
    rep.payload["run"] = {"dir": str(run_dir), "method": run.cfg.method, "preset": run.cfg.preset, "genes": len(run.genes),
                          "bank": len(bank_of(run)) if bank_of(run) is not None else None, "encoder": run.cfg.model.get("encoder")}
    timings: dict[str, float] = {}
    rep.payload["phase_s"] = timings
    t0 = time.perf_counter()
    if "embed" in phases:
        table = spot_table(held, run.genes, run.cfg, with_expr=True)
        embed_phase(rep, run, table, [int(b) for b in args.batches.split(",")], precisions, args.repeats)
        timings["embed"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if "section" in phases:
        section_phase(rep, run, held, precisions, max(1, args.repeats // 2), args.profile)
        timings["section"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if "grid" in phases:
        targets = [int(t) for t in args.grid_spots.split(",") if t.strip()]
        grid_precisions = [s.strip() for s in args.grid_precisions.split(",") if s.strip()]
        grid_phase(rep, run_dir, held.image.path, held.um_per_px, targets, grid_precisions, args)
        timings["grid"] = time.perf_counter() - t0
    rep.note("phase wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    rep.write(C.resolve_out(args.out, "predict_throughput", args.smoke))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

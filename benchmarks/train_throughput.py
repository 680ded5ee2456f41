"""Training throughput per method and preset: compute only, full epoch, FLOPs vs matmul peak.

For every method (cmrcnet, bleep, stnet, histogene, ridge-embedding) and preset:

(a) compute only: forward + backward + AdamW step on one batch already in memory
    (64 patches; HisToGene: one whole slide), bf16 autocast and fp32, median of
    ``--steps`` steps after ``--warmup`` steps. ridge is fitted in closed form, so its
    "step" is the frozen encoder's forward pass (no grad), i.e. the embedding cost.
(b) full epoch through the real loader (the method's own ``model.loader(..., train=True)``
    over the her2st training ``SpotTable`` from the patch cache, or synthetic uint8 patches
    with ``--synthetic``), with the preset's augmentation; reports epoch time / compute-only
    time (target <= 1.2), the loader alone, and with ``--lightning`` the same epoch
    through the package's own Lightning trainer (``training.make_trainer``).
(c) model FLOPs per patch (``torch.utils.flop_counter.FlopCounterMode`` on the forward
    of ``training_loss``; training counted as 3x forward) and achieved FLOP/s as a
    fraction of this machine's matmul peak, measured in the same run (square GEMMs).
(d) ``--threads-list``, ``--channels-last``, ``--compile``: each adds the variant next
    to the default so the comparison is in one table.

    python benchmarks/train_throughput.py                      # cpu preset, all methods
    python benchmarks/train_throughput.py --paper --precisions bf16 --steps 3
    python benchmarks/train_throughput.py --smoke              # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

#: benchmark name -> registry name
METHODS: dict[str, str] = {
    "cmrcnet": "cmrcnet",
    "bleep": "bleep",
    "stnet": "stnet",
    "histogene": "histogene",
    "ridge-embedding": "ridge",
}
HELD_OUT = "C3"


@dataclass
class Workload:
    """The training spots a preset trains on (patches at the preset's size)."""

    table: Any  # cmrcnet.data.batches.SpotTable
    n_genes: int
    size_px: int
    source: str


@dataclass
class Case:
    method: str
    preset: str
    precision: str  # "bf16" | "fp32"
    threads: int
    channels_last: bool = False
    compile: bool = False
    optimizer: str = "default"  # torch.optim.AdamW as lit.py builds it; "foreach" / "fused" variants

    @property
    def label(self) -> str:
        extra = [f"t{self.threads}"] + (["cl"] if self.channels_last else []) + (["compile"] if self.compile else [])
        extra += [] if self.optimizer == "default" else [f"adamw-{self.optimizer}"]
        return f"{self.method}/{self.preset}/{self.precision}/{'+'.join(extra)}"


@dataclass
class StepResult:
    times: list[float]
    first_s: float
    batch: int
    extra: dict[str, Any] = field(default_factory=dict)


# -- data ------------------------------------------------------------------------------------
def synthetic_workload(size_px: int, n_spots: int, n_genes: int, n_slides: int = 4, seed: int = 0) -> Workload:
    """Random uint8 patches and log1p-like expression, in ``n_slides`` slides (no file I/O)."""
    from cmrcnet.data.batches import SpotTable, concat_tables

    rng = np.random.default_rng(seed)
    per = max(1, n_spots // n_slides)
    parts = []
    for s in range(n_slides):
        side = int(np.ceil(np.sqrt(per)))
        rc = np.stack(np.divmod(np.arange(per), side), 1).astype(np.int64)
        parts.append(
            SpotTable(
                imgs=rng.integers(0, 256, (per, size_px, size_px, 3), dtype=np.uint8),
                expr=np.log1p(rng.gamma(0.5, 2.0, (per, n_genes))).astype(np.float32),
                pos=rc,
                sample_ids=np.array([f"SYN{s}"] * per),
                barcodes=np.array([f"s{i}" for i in range(per)]),
            )
        )
    return Workload(concat_tables(parts), n_genes, size_px, f"synthetic ({n_slides} slides x {per} spots)")


def her2st_workload(data: Path, preset: str, samples: list | None = None) -> tuple[Workload, list]:
    """The her2st training table of the ``C3``-held-out fold, patches from the patch cache."""
    from cmrcnet.config import make_config
    from cmrcnet.data.readers import read_dataset
    from cmrcnet.training import prepare_fold

    if samples is None:
        samples = read_dataset(data)
    cfg = make_config("cmrcnet", preset, {"data.path": str(data)})
    ids = [s.sample_id for s in samples]
    test = HELD_OUT if HELD_OUT in ids else ids[-1]
    fold = prepare_fold(samples, [i for i in ids if i != test], [test], cfg)
    src = f"her2st ({len(ids) - 1} sections, {test} held out, val spots excluded)"
    return Workload(fold.train, len(fold.genes), cfg.patches.size_px, src), samples


# -- models ----------------------------------------------------------------------------------
def build_case_model(method: str, preset: str, n_genes: int, size_px: int, seed: int = 0):
    """Model + resolved config of ``method`` at ``preset`` (patch size taken from the workload)."""
    import torch

    from cmrcnet.config import make_config
    from cmrcnet.training import build_model

    cfg = make_config(METHODS[method], preset, {"patches.size_px": size_px})
    torch.manual_seed(seed)
    return build_model(cfg, n_genes), cfg


def has_conv(model) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def compute_batch(table, spot_batches: bool, batch: int, seed: int = 0) -> dict:
    """One batch as the loader would give it, without augmentation (HisToGene: the largest slide)."""
    from cmrcnet.data.batches import BatchedSpots

    if not spot_batches:
        rows = max(table.slide_index.values(), key=len)
    else:
        rows = np.random.default_rng(seed).permutation(len(table))[: min(batch, len(table))]
    return BatchedSpots(table, augment=False)[list(rows)]


def to_channels_last(batch: dict) -> dict:
    import torch

    out = dict(batch)
    out["img"] = batch["img"].contiguous(memory_format=torch.channels_last)
    return out


def make_optimizer(params: list, kind: str):
    """AdamW as ``training/lit.py`` builds it (``default``: per-parameter loop on CPU), or its
    multi-tensor (``foreach``) / fused-kernel (``fused``) implementation."""
    import torch

    kw = {"lr": 1e-4, "weight_decay": 1e-3}
    if kind == "foreach":
        kw["foreach"] = True
    elif kind == "fused":
        kw["fused"] = True
    elif kind != "default":
        raise SystemExit(f"unknown optimizer variant {kind!r} (default, foreach, fused)")
    return torch.optim.AdamW(params, **kw)


def make_step(model, precision: str, compile_: bool, optimizer: str = "default") -> Callable[[dict], None]:
    """One optimiser step (trainable models) or one frozen forward pass (ridge)."""
    import torch

    bf16 = precision == "bf16"
    if not C.trains_by_gradient(model):
        fwd = torch.compile(model.embed) if compile_ else model.embed

        def embed_step(batch: dict) -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                fwd(batch["img"])

        return embed_step

    model.train()
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer)
    loss_fn = torch.compile(model.training_loss) if compile_ else model.training_loss

    def train_step(batch: dict) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(batch)["loss"]
        loss.backward()
        opt.step()

    return train_step


def forward_flops(model, batch: dict) -> float:
    """FLOPs of one forward pass of the training objective (ridge: of the frozen encoder)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        if C.trains_by_gradient(model):
            model.train()
            model.training_loss(batch)
        else:
            model.embed(batch["img"])
    return float(counter.get_total_flops())


# -- measurements ----------------------------------------------------------------------------
def run_compute(step: Callable[[dict], None], batch: dict, steps: int, warmup: int) -> StepResult:
    t0 = time.perf_counter()
    step(batch)
    first = time.perf_counter() - t0
    times = C.time_repeats(lambda: step(batch), steps, warmup=max(0, warmup - 1))
    return StepResult(times, first, int(batch["img"].shape[0]))


def run_epoch(step: Callable[[dict], None], loader, channels_last: bool) -> tuple[float, int, int]:
    """Seconds for one pass over ``loader`` with ``step`` on every batch; patches and batches seen."""
    n = nb = 0
    t0 = time.perf_counter()
    for b in loader:
        if channels_last:
            b = to_channels_last(b)
        step(b)
        n += int(b["img"].shape[0])
        nb += 1
    return time.perf_counter() - t0, n, nb


def loader_only(loader) -> float:
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def lightning_epoch(model, cfg, table, precision: str) -> float:
    """One epoch through the package's trainer (Lightning, CSV logger, checkpoint callback)."""
    import copy

    from cmrcnet.training import make_trainer
    from cmrcnet.training.lit import LitMethod

    cfg = copy.deepcopy(cfg)
    cfg.train.epochs = 1
    cfg.train.precision = "bf16-mixed" if precision == "bf16" else "32-true"
    cfg.train.accelerator = "cpu"
    t = cfg.train
    loader = model.loader(table, batch_size=t.batch_size, train=True, augment=t.augment, seed=cfg.seed)
    lit = LitMethod(model, t, steps_per_epoch=len(loader))
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = make_trainer(cfg, Path(tmp), has_val=False)
        t0 = time.perf_counter()
        trainer.fit(lit, train_dataloaders=loader)
        return time.perf_counter() - t0


def profile_step(step: Callable[[dict], None], batch: dict, top: int = 15) -> str:
    """torch.profiler table (self CPU time) of one step, after a warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--paper", action="store_true", help="also the paper preset (ViT-B/32, ResNet-50, DenseNet-121 at 224 px; slow on CPU)")
    p.add_argument("--presets", default=None, help="explicit comma-separated presets (overrides --paper)")
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="interleave the cases over this many rounds (steps split between rounds)")
    p.add_argument("--threads-list", default=None, help="e.g. 1,2: repeat the compute cases per thread count")
    p.add_argument("--channels-last", action="store_true", help="add channels_last variants (conv models)")
    p.add_argument("--compile", action="store_true", help="add torch.compile variants (compile time reported)")
    p.add_argument("--optimizers", default="default", help="AdamW variants to compare: default,foreach,fused")
    p.add_argument("--no-epoch", action="store_true", help="skip the full-epoch measurement")
    p.add_argument("--lightning", action="store_true", help="also time one epoch through the Lightning trainer")
    p.add_argument("--synthetic", action="store_true", help="synthetic uint8 patches instead of her2st")
    p.add_argument("--synthetic-spots", type=int, default=1024)
    p.add_argument("--synthetic-genes", type=int, default=1000)
    p.add_argument("--data", default=None, help="her2st folder (default $CMRCNET_DATA_DIR/her2st; synthetic patches without either)")
    p.add_argument("--gemm-n", type=int, default=2048)
    p.add_argument("--profile", default=None, help="METHOD[/PRECISION]: print a torch.profiler table of one step")
    args = p.parse_args(argv)
    if args.smoke:
        args.presets = args.presets or "tiny"
        args.steps, args.warmup, args.gemm_n, args.rounds = 2, 1, 256, 1
        args.synthetic = True
        args.synthetic_spots, args.synthetic_genes = 96, 50
        args.batch = min(args.batch, 16)
        args.precisions = "fp32"
        args.threads = args.threads or 1  # 2 OpenMP threads on a loaded 2-core box stall on small ops
    return args


def measure_peaks(threads_list: list[int], gemm_n: int) -> tuple[dict[tuple[int, str], float], list[dict[str, Any]]]:
    """Square-GEMM rate per (threads, precision), measured now (same load as the cases)."""
    import torch

    default = torch.get_num_threads()
    peaks: dict[tuple[int, str], float] = {}
    rows = []
    for th in threads_list:
        torch.set_num_threads(th)
        for prec in ("fp32", "bf16"):
            peaks[(th, prec)] = C.gemm_peak_gflops(prec, gemm_n)
            rows.append({"threads": th, "precision": prec, "gemm_n": gemm_n, "gflops": peaks[(th, prec)], "load1": C.loadavg()[0]})
    torch.set_num_threads(default)
    return peaks, rows


def cases_for(method: str, preset: str, args: argparse.Namespace, threads_list: list[int], default_threads: int, conv: bool) -> list[Case]:
    """The default cases (threads x precisions) plus the requested channels_last / compile variants."""
    precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    base = [Case(method, preset, prec, th) for th in threads_list for prec in precisions]
    cases = list(base)
    for opt in [o.strip() for o in args.optimizers.split(",") if o.strip() and o.strip() != "default"]:
        cases += [Case(c.method, c.preset, c.precision, c.threads, optimizer=opt) for c in base if METHODS[method] != "ridge"]
    if args.channels_last and conv:
        cases += [Case(c.method, c.preset, c.precision, c.threads, channels_last=True) for c in base]
    if args.compile:
        cases += [Case(c.method, c.preset, c.precision, c.threads, compile=True) for c in base if c.threads == default_threads]
    return cases


def compute_row(case: Case, res: StepResult, fwd_flops: float, mult: float, peak: float) -> dict[str, Any]:
    med = C.median(res.times)
    pps = res.batch / med
    achieved = mult * fwd_flops * pps / 1e9
    return {
        "method": case.method,
        "preset": case.preset,
        "precision": case.precision,
        "threads": case.threads,
        "channels_last": case.channels_last,
        "compile": case.compile,
        "optimizer": case.optimizer,
        "params_m": res.extra.get("params_m"),
        "batch": res.batch,
        "step_ms": 1000 * med,
        "step_ms_min": 1000 * min(res.times),
        "step_ms_max": 1000 * max(res.times),
        "first_step_s": res.first_s,
        "patches_s": pps,
        "fwd_gflop_patch": fwd_flops / 1e9,
        "achieved_gflops": achieved,
        "peak_gflops": peak,
        "frac_peak": achieved / peak,
        "load1": C.loadavg()[0],
    }


def epoch_row(case: Case, model, cfg, step: Callable[[dict], None], wl: Workload, batch: int, pps: float, lightning: bool, rep: C.Report) -> dict[str, Any]:
    """(b) The same warm model over one epoch of the real loader, next to the loader alone."""
    t = cfg.train
    loader = model.loader(wl.table, batch_size=batch, train=True, augment=t.augment, seed=0)
    t_loader = loader_only(loader)
    t_loader_noaug = loader_only(model.loader(wl.table, batch_size=batch, train=True, augment=False, seed=0))
    t_epoch, n_seen, n_batches = run_epoch(step, loader, False)
    compute_equiv = n_seen / pps
    row: dict[str, Any] = {
        "method": case.method,
        "preset": case.preset,
        "precision": case.precision,
        "patches": n_seen,
        "batches": n_batches,
        "augment": bool(t.augment),
        "loader_only_s": t_loader,
        "loader_no_aug_s": t_loader_noaug,
        "epoch_s": t_epoch,
        "compute_only_s": compute_equiv,
        "ratio": t_epoch / compute_equiv,
        "load1": C.loadavg()[0],
    }
    if lightning and C.trains_by_gradient(model):
        try:
            t_l = lightning_epoch(model, cfg, wl.table, case.precision)
            row["lightning_epoch_s"] = t_l
            row["lightning_ratio"] = t_l / compute_equiv
        except Exception as e:  # noqa: BLE001
            rep.note(f"lightning epoch {case.label} failed: {type(e).__name__}: {e}")
    return row


@dataclass
class Collected:
    compute: list[dict[str, Any]] = field(default_factory=list)
    epoch: list[dict[str, Any]] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)


def wants_profile(spec: str | None, case: Case) -> bool:
    if not spec:
        return False
    want = spec.split("/")
    return want[0] == case.method and (len(want) == 1 or want[1] == case.precision)


@dataclass
class Prepared:
    case: Case
    model: Any
    cfg: Any
    step: Callable[[dict], None]
    batch: dict
    times: list[float] = field(default_factory=list)
    first_s: float = 0.0
    peaks: list[float] = field(default_factory=list)


def prepare_case(case: Case, method: str, preset: str, wl: Workload, batch: dict) -> Prepared:
    import torch

    model, cfg = build_case_model(method, preset, wl.n_genes, wl.size_px)
    model.on_train_start(torch.from_numpy(wl.table.expr))
    b = batch
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
        b = to_channels_last(batch)
    return Prepared(case, model, cfg, make_step(model, case.precision, case.compile, case.optimizer), b)


def bench_method(method: str, preset: str, wl: Workload, args: argparse.Namespace, threads_list: list[int],
                 default_threads: int, out: Collected, rep: C.Report) -> None:
    """All cases of one method at one preset, compute only, in ``--rounds`` interleaved rounds
    (so that load drift hits every case alike); the matmul peak is re-measured after each
    case's steps, under the same load; then (default cases) one epoch."""
    import torch

    probe, _ = build_case_model(method, preset, wl.n_genes, wl.size_px)
    cases = cases_for(method, preset, args, threads_list, default_threads, has_conv(probe))
    batch = compute_batch(wl.table, C.batches_spots(probe), args.batch)
    fwd_flops = forward_flops(probe, batch) / batch["img"].shape[0]
    mult = 3.0 if C.trains_by_gradient(probe) else 1.0
    del probe
    prepared: list[Prepared] = []
    for case in cases:
        torch.set_num_threads(case.threads)
        p = prepare_case(case, method, preset, wl, batch)
        try:
            res = run_compute(p.step, p.batch, 0, args.warmup)
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing on this CPU
            rep.note(f"{case.label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            continue
        p.first_s = res.first_s
        prepared.append(p)
    per_round = max(1, args.steps // max(1, args.rounds))
    for _ in range(max(1, args.rounds)):
        for p in prepared:
            torch.set_num_threads(p.case.threads)
            p.times += C.time_repeats(lambda: p.step(p.batch), per_round, warmup=0)
            p.peaks.append(C.gemm_peak_gflops(p.case.precision, args.gemm_n, repeats=3))
    for p in prepared:
        case = p.case
        torch.set_num_threads(case.threads)
        res = StepResult(p.times, p.first_s, int(p.batch["img"].shape[0]))
        r = compute_row(case, res, fwd_flops, mult, C.median(p.peaks))
        r["params_m"] = sum(x.numel() for x in p.model.parameters() if x.requires_grad) / 1e6
        out.compute.append(r)
        print(f"  {case.label}: {r['step_ms']:.0f} ms/step, {r['patches_s']:.1f} patches/s, "
              f"{r['frac_peak']:.1%} of peak (load {r['load1']})", flush=True)
        is_default = not case.channels_last and not case.compile and case.optimizer == "default" and case.threads == default_threads
        if is_default and not out.profiles and wants_profile(args.profile, case):
            out.profiles[case.label] = profile_step(p.step, p.batch)
        if is_default and not args.no_epoch:
            row = epoch_row(case, p.model, p.cfg, p.step, wl, args.batch, r["patches_s"], args.lightning, rep)
            out.epoch.append(row)
            print(f"  {case.label}: epoch {row['epoch_s']:.1f} s, ratio {row['ratio']:.2f}, loader {row['loader_only_s']:.2f} s", flush=True)
    torch.set_num_threads(default_threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    C.quiet_warnings()
    C.apply_threads(args.threads)
    import torch

    from cmrcnet.config import make_config

    rep = C.Report("train_throughput", args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    presets = [s.strip() for s in args.presets.split(",")] if args.presets else (["cpu", "paper"] if args.paper else ["cpu"])
    default_threads = torch.get_num_threads()
    threads_list = [int(t) for t in args.threads_list.split(",")] if args.threads_list else [default_threads]
    _, peak_rows = measure_peaks(threads_list, args.gemm_n)
    rep.table("gemm_peak", f"Matmul peak ({args.gemm_n}^3 GEMM, median)", peak_rows)

    data_dir = None if args.synthetic else C.her2st_dir(args.data)
    if not args.synthetic and data_dir is None:
        rep.note(C.data_missing(args.data) + ": using synthetic patches")
    workloads: dict[int, Workload] = {}
    samples = None
    out = Collected()
    for preset in presets:
        size_px = make_config("cmrcnet", preset).patches.size_px
        if size_px not in workloads:
            if data_dir is None:
                workloads[size_px] = synthetic_workload(size_px, args.synthetic_spots, args.synthetic_genes)
            else:
                workloads[size_px], samples = her2st_workload(data_dir, preset, samples)
        wl = workloads[size_px]
        rep.note(f"preset {preset}: {len(wl.table)} training spots, {wl.n_genes} genes, {wl.size_px} px, {wl.source}")
        for method in methods:
            bench_method(method, preset, wl, args, threads_list, default_threads, out, rep)

    rep.table(
        "compute",
        "(a, c) Compute only: fwd+bwd+AdamW on one in-memory batch (ridge: frozen forward), median",
        out.compute,
        ["method", "preset", "precision", "threads", "channels_last", "compile", "optimizer", "params_m", "batch", "step_ms", "patches_s",
         "fwd_gflop_patch", "achieved_gflops", "peak_gflops", "frac_peak", "first_step_s", "load1"],
    )
    if out.epoch:
        cols = ["method", "preset", "precision", "patches", "batches", "augment", "loader_only_s", "loader_no_aug_s",
                "epoch_s", "compute_only_s", "ratio"]
        if args.lightning:
            cols += ["lightning_epoch_s", "lightning_ratio"]
        rep.table("epoch", "(b) One epoch through the method's model.loader (ratio = epoch / compute only; target <= 1.2)", out.epoch, cols + ["load1"])
    for label, text in out.profiles.items():
        print(f"\ntorch.profiler, one training step of {label} (self CPU time):\n{text}")
    rep.payload["profiles"] = out.profiles
    rep.payload["workloads"] = {str(k): {"spots": len(w.table), "genes": w.n_genes, "size_px": w.size_px, "source": w.source} for k, w in workloads.items()}
    rep.note("FLOPs count matmul/conv/attention ops of one forward (FlopCounterMode); training = 3x forward, ridge = 1x")
    rep.write(C.resolve_out(args.out, "train_throughput", args.smoke))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A/B of CMRCNet's training step between two source trees, fresh processes, alternating.

One optimiser step as the package's trainer runs it: ``LitMethod.training_step`` (the tree's
own model, loss and logging hooks) under the autocast of the preset's resolved precision
(``train.precision=auto`` -> ``bf16-mixed`` on a bf16-capable CPU, as Lightning's
``bf16-mixed`` plugin does: ``torch.autocast("cpu", bfloat16)``), ``backward`` and the
tree's own optimiser (``LitMethod.configure_optimizers``: fused AdamW). The batch is
synthetic (random uint8 patches at the preset's size, log1p-gamma expression), made
identically in both trees. Each (preset, tree) runs in a fresh process with
``PYTHONPATH=TREE/src``, trees alternating A B, B A, A B ... over ``--rounds`` (an even
number balances the order) so a change of the machine's load hits both alike; reported:
median step (wall and process CPU time), patches/s and the B/A ratio of the medians.

Presets: ``authors`` and ``paper`` (CMRCNet with a from-scratch ViT-B/32, 224 px) and
``frozen`` (the ``cpu`` preset: frozen ImageNet EfficientNet-Lite0, so a step trains the
heads on cached features: the batch carries the encoder's features of the same patches).

    git worktree add --detach ../base 23c8cc8
    python benchmarks/ab_step.py --a ../base --b . --rounds 4 --threads 2
    python benchmarks/ab_step.py --a ../base --b . --env OMP_WAIT_POLICY=PASSIVE --env THP_MEM_ALLOC_ENABLE=1
    python benchmarks/ab_step.py --a . --b . --presets frozen --steps 10     # A/A: the noise floor
    python benchmarks/ab_step.py --a . --b . --env-b GOMP_SPINCOUNT=10000    # one tree, two wait settings
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

#: Preset name of this script -> (cmrcnet preset, extra overrides)
PRESETS: dict[str, tuple[str, dict[str, object]]] = {
    "authors": ("authors", {}),
    "paper": ("paper", {}),
    "frozen": ("cpu", {}),
    "tiny": ("tiny", {"patches.size_px": 32}),
}

#: Runs inside the child process (the tree under test on PYTHONPATH): one preset, N steps.
CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import cmrcnet
import numpy as np
import torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
from cmrcnet.config import make_config
from cmrcnet.data.batches import BatchedSpots, SpotTable
from cmrcnet.training import build_model
from cmrcnet.training.lit import LitMethod

cfg = make_config("cmrcnet", spec["preset"], spec["set"])
prec = cfg.train.precision
if prec == "auto":
    from cmrcnet.runtime import resolve_precision
    prec = resolve_precision(prec, "cpu")
bf16 = prec.startswith("bf16")
b, g, s = spec["batch"], spec["genes"], cfg.patches.size_px
rng = np.random.default_rng(0)
table = SpotTable(imgs=rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
                  expr=np.log1p(rng.gamma(0.5, 2.0, (b, g))).astype(np.float32),
                  pos=np.stack(np.divmod(np.arange(b), 8), 1).astype(np.int64),
                  sample_ids=np.array(["SYN"] * b), barcodes=np.array([f"s{i}" for i in range(b)]))
torch.manual_seed(0)
model = build_model(cfg, g)
batch = BatchedSpots(table)[list(range(b))]
if model.config.encoder_mode == "frozen":  # what the feature cache would hold for these patches
    from cmrcnet.models.features import encode_views
    grid = int(model.config.frozen_token_grid) if model.needs_tokens else None
    feats = encode_views(model.image_encoder, table, views=1, token_grid=grid, bf16=bf16)
    batch = BatchedSpots(table.with_features(feats))[list(range(b))]
model.on_train_start(torch.from_numpy(table.expr))
lit = LitMethod(model, cfg.train, steps_per_epoch=100)
opt = lit.configure_optimizers()["optimizer"]
lit.train()

def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = lit.training_step(batch, 0)
    loss.backward()
    opt.step()
    return float(loss.detach())

losses, wall, cpu = [], [], []
for i in range(spec["warmup"] + spec["steps"]):
    t0, c0 = time.perf_counter(), time.process_time()
    losses.append(step())
    if i >= spec["warmup"]:
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
profile = ""
if spec["profile"]:  # one more step, by operator (self CPU time)
    from torch.profiler import ProfilerActivity, profile as prof
    with prof(activities=[ProfilerActivity.CPU]) as pr:
        step()
    profile = pr.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40)
print(json.dumps({"wall": wall, "cpu": cpu, "losses": losses, "precision": prec, "size_px": s, "profile": profile,
                  "params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
                  "source": cmrcnet.__file__}))
"""


def run_child(tree: Path, spec: dict, extra_env: dict[str, str]) -> dict:
    """One fresh process of ``tree``: the CHILD program on ``spec``; its JSON line."""
    env = dict(os.environ, **extra_env, PYTHONPATH=str(tree.resolve() / "src"))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ab_step: the run in {tree} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(preset: str, runs: list[dict], batch: int) -> dict:
    """Median step of trees A and B over all their rounds, and the B/A ratios."""
    row: dict = {"preset": preset, "batch": batch}
    for tree in ("A", "B"):
        wall = [t for r in runs if r["tree"] == tree for t in r["wall"]]
        cpu = [t for r in runs if r["tree"] == tree for t in r["cpu"]]
        row[f"{tree}_step_s"] = round(C.median(wall), 3)
        row[f"{tree}_cpu_s"] = round(C.median(cpu), 3)
        row[f"{tree}_patches_s"] = round(batch / C.median(wall), 2)
    row["speedup_wall"] = round(row["A_step_s"] / row["B_step_s"], 3)
    row["speedup_cpu"] = round(row["A_cpu_s"] / row["B_cpu_s"], 3)
    loads = [r["load1_start"] for r in runs] + [r["load1_end"] for r in runs]
    row["load1"] = f"{min(loads):.2f}-{max(loads):.2f}"
    return row


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--a", type=Path, required=True, help="source tree A (the baseline)")
    p.add_argument("--b", type=Path, default=Path("."), help="source tree B")
    p.add_argument("--presets", default="authors,paper,frozen", help="from: " + ", ".join(PRESETS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--genes", type=int, default=4120, help="genes of the gene side (her2st fold: 4,120)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4, help="A B / B A pairs alternate: use an even number")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE override for both trees")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table (by operator) of one more "
                   "step of every process of tree B")
    p.add_argument("--env", action="append", default=[],
                   help="NAME=VALUE environment variable for both trees' processes (e.g. OMP_WAIT_POLICY=PASSIVE: "
                        "what a newer tree sets on import, given to an older one too)")
    p.add_argument("--env-b", action="append", default=[],
                   help="NAME=VALUE for tree B's processes only (A/A runs of one tree under two settings)")
    args = p.parse_args(argv)
    if args.smoke:
        args.presets, args.batch, args.genes, args.steps, args.warmup, args.rounds = "tiny", 8, 50, 1, 1, 1
        args.threads = args.threads or 1  # 2 OpenMP threads on a loaded 2-core box stall on small ops
    import yaml

    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.batch < 1 or args.genes < 1:
        raise SystemExit("ab_step: --steps, --rounds, --batch and --genes must be >= 1, --warmup >= 0")
    bad = [s for s in presets if s not in PRESETS]
    if bad:
        raise SystemExit(f"ab_step: unknown preset(s) {bad}; choose from {list(PRESETS)}")
    for tree in (args.a, args.b):
        if not (tree / "src" / "cmrcnet").is_dir():
            raise SystemExit(f"ab_step: {tree} is not a cmrcnet source tree (no src/cmrcnet)")
    bad_kv = [a for a in args.set + args.env + args.env_b if "=" not in a]
    if bad_kv:
        raise SystemExit(f"ab_step: --set/--env/--env-b take KEY=VALUE, got {bad_kv[0]!r}")
    user = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args.set)}
    extra_env = dict(a.split("=", 1) for a in args.env)
    env_of = {"A": extra_env, "B": {**extra_env, **dict(a.split("=", 1) for a in args.env_b)}}
    threads = args.threads or 2
    rep = C.Report("ab_step", args)
    runs, rows = [], []
    for name in presets:
        preset, extra = PRESETS[name]
        spec = {"preset": preset, "set": {**extra, **user}, "batch": args.batch, "genes": args.genes,
                "steps": args.steps, "warmup": args.warmup, "threads": threads, "profile": False}
        these = []
        for r in range(args.rounds):
            order = (("A", args.a), ("B", args.b))
            # A B, B A, A B, ...: the second process of a pair ran 5-10 % faster here (docs/PERFORMANCE.md, 5b')
            for tree_name, tree in order if r % 2 == 0 else order[::-1]:
                load0 = C.loadavg()[0]
                res = run_child(tree, {**spec, "profile": args.profile and tree_name == "B"}, env_of[tree_name])
                text = res.pop("profile", "")
                if text:
                    print(f"torch.profiler, {name}, tree B, round {r}:\n{text}", flush=True)
                these.append({"preset": name, "round": r, "tree": tree_name, **res, "load1_start": load0,
                              "load1_end": C.loadavg()[0]})
                print(f"  {name} round {r} {tree_name}: wall {C.median(res['wall']):.2f} s, cpu "
                      f"{C.median(res['cpu']):.2f} s, first loss {res['losses'][0]:.5f} (load {load0})", flush=True)
        runs += these
        rows.append(summary(name, these, args.batch))
        print(f"{name}: A {rows[-1]['A_step_s']} s, B {rows[-1]['B_step_s']} s, "
              f"speedup {rows[-1]['speedup_wall']}x wall, {rows[-1]['speedup_cpu']}x cpu", flush=True)
    rep.table("summary", f"CMRCNet training step, batch {args.batch}, {args.genes} genes, {threads} threads: "
              f"A={args.a}, B={args.b} (medians over {args.rounds} rounds x {args.steps} steps)"
              + (f"; environment of both: {' '.join(args.env)}" if args.env else "")
              + (f"; of B only: {' '.join(args.env_b)}" if args.env_b else ""), rows)
    rep.table("runs", "every process", [{k: v for k, v in r.items() if k not in ("source",)} for r in runs])
    rep.write(C.resolve_out(args.out, "ab_step", args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A/B of one her2st fold's training time between two source trees, alternating under the same load.

Each run is a fresh process (``PYTHONPATH=TREE/src``) that trains one fold through
``training.train`` and reports ``train_seconds`` (``done.json``) and the CPU seconds of the same
span (``fit_by_gradient``: all threads, page faults included), so a code change is judged by
the ratio of runs that shared the machine's load, not by absolute times on a busy machine.
Also checks that the two trees trained bit-identical weights (same seed).

    git worktree add --detach ../base 23c8cc8
    OMP_NUM_THREADS=1 python benchmarks/ab_fold.py --a ../base --b . --rounds 3 --threads 1
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

#: Runs inside the child process: one fold, timed around ``fit_by_gradient``.
CHILD = r"""
import json, sys, time
from pathlib import Path
import cmrcnet
import torch
import yaml
import cmrcnet.training.fit as F
from cmrcnet.config import make_config
from cmrcnet.training import load_samples, train
out, threads, method, held_out, seed = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
overrides = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in sys.argv[7:])}
if threads:
    torch.set_num_threads(threads)
span = {}
fit = F.fit_by_gradient
def timed(*a, **k):
    c0 = time.process_time()
    r = fit(*a, **k)
    span["cpu_s"] = time.process_time() - c0
    return r
F.fit_by_gradient = timed
cfg = make_config(method, "cpu", {"data.path": sys.argv[6], "seed": seed, **overrides})
train(cfg, out, [held_out], samples=load_samples(cfg))
done = json.loads((out / "done.json").read_text())
print(json.dumps({"train_s": done["train_seconds"], "cpu_s": round(span["cpu_s"], 2), "source": cmrcnet.__file__}))
"""


def run_one(tree: Path, out: Path, args, her2st: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve() / "src"))
    cmd = [sys.executable, "-c", CHILD, str(out), str(args.threads or 0), args.method, args.test, str(args.seed),
           str(her2st), *args.set]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run in {tree} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_weights(a: Path, b: Path) -> bool:
    import torch

    sa = torch.load(a / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    sb = torch.load(b / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--a", type=Path, required=True, help="source tree A (the baseline)")
    p.add_argument("--b", type=Path, default=Path("."), help="source tree B")
    p.add_argument("--data", default=None, help="her2st folder (default $CMRCNET_DATA_DIR/her2st)")
    p.add_argument("--method", default="cmrcnet")
    p.add_argument("--test", default="C3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE override for both trees")
    args = p.parse_args(argv)
    if args.smoke:
        raise SystemExit("ab_fold.py: no --smoke mode (it trains real her2st folds)")
    her2st = C.her2st_dir(args.data)
    if her2st is None:
        raise SystemExit(C.data_missing(args.data))
    rep = C.Report("ab_fold", args)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="ab-fold-"))
    for r in range(args.rounds):
        dirs = {}
        for name, tree in (("A", args.a), ("B", args.b)):
            dirs[name] = tmp / f"{name}{r}"
            load0 = C.loadavg()[0]
            res = run_one(tree, dirs[name], args, her2st)
            rows.append({"round": r, "tree": name, **res, "load1_start": load0, "load1_end": C.loadavg()[0],
                         "weights_identical_to_A": "-" if name == "A" else same_weights(dirs["A"], dirs[name])})
        for d in dirs.values():  # each holds 166 MB+ of checkpoints
            shutil.rmtree(d, ignore_errors=True)
    for key in ("train_s", "cpu_s"):
        a = [x[key] for x in rows if x["tree"] == "A"]
        b = [x[key] for x in rows if x["tree"] == "B"]
        rep.note(f"{key}: A mean {sum(a) / len(a):.2f}, B mean {sum(b) / len(b):.2f}, B/A {sum(b) / sum(a):.3f}")
    rep.table("runs", f"One her2st fold ({args.test} held out), {args.method}, trees alternating", rows)
    rep.write(C.resolve_out(args.out, "ab_fold", args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A training run on a busy machine: wall time idle and beside a competing CPU-bound process,
for several OpenMP wait settings, measured as ratios in one run.

Each timed run is a fresh ``python -m cmrcnet train`` process (one her2st fold, C3 held out,
``--set train.epochs=1`` by default; the patch/feature cache is filled by an untimed first
run). "busy" starts ``--competitors`` single-threaded CPU-bound processes (a python busy loop,
or ``--competitor matmul``: a 1-thread torch matmul loop) before the run and stops them after.
Settings (``--settings``):

``default``  what ``cmrcnet`` does now (:mod:`cmrcnet.runtime`: ``OMP_WAIT_POLICY=PASSIVE``
             unless the user set a wait policy)
``libgomp``  the previous behaviour: GNU OpenMP's own default waits (spin 300,000 rounds, then
             sleep; set as ``GOMP_SPINCOUNT=300000``, which cmrcnet leaves alone as the user's)
``active``   ``OMP_WAIT_POLICY=ACTIVE`` (threads spin without end)
``1thread``  the default plus ``OMP_NUM_THREADS=1``

Runs are interleaved (setting x idle/busy per repeat), so a change of background load hits all
alike; the table gives medians and each setting's busy / idle ratio and busy / ``default``-idle.

    python benchmarks/busy_machine.py
    python benchmarks/busy_machine.py --settings default,active --repeats 2 --competitor matmul
    python benchmarks/busy_machine.py --smoke
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SETTINGS = {
    "default": {},
    "libgomp": {"GOMP_SPINCOUNT": "300000"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "1thread": {"OMP_NUM_THREADS": "1"},
}
COMPETITORS = {
    "busy": "while True: pass",
    "matmul": ("import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\n"
               "while True: a @ a"),
}
USER_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _env(setting: str) -> dict[str, str]:
    """This process's environment without any thread variable (as a user who set none), plus the setting's."""
    from cmrcnet import runtime

    env = {k: v for k, v in os.environ.items() if k not in USER_VARS}
    env.update(SETTINGS[setting])
    src = str(Path(runtime.__file__).resolve().parents[1])  # the cmrcnet being measured
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train_cmd(args, data: Path, test: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "cmrcnet", "train", "--data", str(data), "--test", test, "--out", str(out),
           "--method", args.method, "--preset", args.preset, "--set", f"train.epochs={args.epochs}"]
    for s in args.set:
        cmd += ["--set", s]
    return cmd


def _start_competitors(kind: str, n: int) -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k not in USER_VARS}
    return [subprocess.Popen([sys.executable, "-c", COMPETITORS[kind]], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()


def timed_run(args, data: Path, test: str, setting: str, busy: bool, work: Path) -> float:
    """Wall seconds of one training process (raises with its log if it fails)."""
    comp = _start_competitors(args.competitor, args.competitors) if busy else []
    try:
        time.sleep(0.5 if busy else 0.0)  # competitors running before the run starts
        with tempfile.TemporaryDirectory(dir=work) as d:
            t0 = time.perf_counter()
            r = subprocess.run(_train_cmd(args, data, test, Path(d) / "run"), env=_env(setting),
                               capture_output=True, text=True)
            dt = time.perf_counter() - t0
    finally:
        _stop(comp)
    if r.returncode != 0:
        raise SystemExit(f"train failed ({setting}, busy={busy}):\n{r.stderr[-3000:]}")
    return dt


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="her2st folder (default $CMRCNET_DATA_DIR/her2st)")
    p.add_argument("--test", default="C3")
    p.add_argument("--method", default="cmrcnet")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="extra train --set key=value")
    p.add_argument("--settings", default="default,libgomp,active")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--competitor", choices=sorted(COMPETITORS), default="busy")
    p.add_argument("--competitors", type=int, default=1, help="competing single-threaded processes")
    args = p.parse_args()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise SystemExit(f"--settings: unknown {bad}; choose from {sorted(SETTINGS)}")
    rep = C.Report("busy_machine", args)
    work = Path(tempfile.mkdtemp(prefix="cmrcnet_busy_"))
    try:
        measure(args, settings, rep, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, settings: list[str], rep: C.Report, work: Path) -> None:
    data, test = C.her2st_dir(args.data), args.test
    if args.smoke or data is None:
        if data is None:
            rep.note(C.data_missing(args.data) + "; synthetic data, tiny preset")
        from cmrcnet.data.synthetic import make_synthetic_dataset

        data, test = make_synthetic_dataset(work / "synthetic"), "SYN1"
        args.preset, args.epochs = "tiny", 1
        args.repeats, settings = 1, settings[:1]
        args.set = [*args.set, f"data.cache_dir={work / 'cache'}"]
    # untimed: fills the patch/feature cache so every timed run starts warm
    timed_run(args, data, test, settings[0], False, work)
    times: dict[tuple[str, bool], list[float]] = {}
    loads: dict[tuple[str, bool], list[float]] = {}
    for _ in range(max(1, args.repeats)):
        for setting in settings:
            for busy in (False, True):
                times.setdefault((setting, busy), []).append(timed_run(args, data, test, setting, busy, work))
                print(f"{setting} {'busy' if busy else 'idle'}: {times[(setting, busy)][-1]:.1f} s, "
                      f"load {C.loadavg()}", flush=True)
                loads.setdefault((setting, busy), []).append(C.loadavg()[0] if C.loadavg() else float("nan"))
    base = C.median(times[(settings[0], False)])
    rows = []
    for setting in settings:
        idle, busy = C.median(times[(setting, False)]), C.median(times[(setting, True)])
        rows.append({"setting": setting, "env": " ".join(f"{k}={v}" for k, v in SETTINGS[setting].items()) or "(none)",
                     "idle_s": round(idle, 1), "busy_s": round(busy, 1), "busy/idle": round(busy / idle, 2),
                     f"busy/{settings[0]}-idle": round(busy / base, 2),
                     "load1_after": [round(x, 2) for x in loads[(setting, True)]]})
    rep.table("runs", f"{args.method} {args.preset}, {args.epochs} epoch(s), test {test}; busy = "
              f"{args.competitors} x {args.competitor} competitor", rows)
    rep.payload["raw_s"] = {f"{s}/{'busy' if b else 'idle'}": v for (s, b), v in times.items()}
    rep.write(C.resolve_out(args.out, "busy_machine", args.smoke))


if __name__ == "__main__":
    main()

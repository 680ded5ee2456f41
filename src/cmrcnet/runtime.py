"""Process-wide settings: passive OpenMP waits, a thread count that fits the CPUs this process
may use and huge pages for large CPU tensors, applied before torch loads and never over a
user's own settings.

Why: GNU OpenMP (torch's thread pool on Linux) spins idle threads by default. On a machine
that also runs something else, the spinning threads take the cores the other process and our
own compute need: a 1-epoch her2st ``cmrcnet train`` took 25.0 s idle and 39.4 s beside one
CPU-bound process with the default waits, 30.4 s with ``OMP_WAIT_POLICY=PASSIVE``
(docs/PERFORMANCE.md, "Threads"). OpenMP reads these variables once, when the library loads,
so they must be in the environment before ``import torch``; :mod:`cmrcnet` applies them on
import and the command line before anything else.

The user's settings win: a set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` keeps the wait policy
as it is, a set ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` keeps the thread count, and nothing
is changed once torch is imported (``torch.set_num_threads`` is never called here).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from functools import cache

__all__ = ["usable_cores", "thread_defaults", "apply_thread_defaults", "WAIT_VARS", "COUNT_VARS",
           "bf16_is_faster", "resolve_precision", "use_bf16"]

WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""Any of these set by the user: the wait policy is theirs."""
COUNT_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Any of these set by the user: the thread count is theirs (torch reads both)."""

ALLOC_VARS = ("THP_MEM_ALLOC_ENABLE",)
"""Set by the user (``0`` to opt out): the allocator setting is theirs."""

#: What :func:`apply_thread_defaults` added to ``os.environ`` in this process (for run.json / tests).
APPLIED: dict[str, str] = {}


def _cgroup_cpu_limit() -> int | None:
    """CPUs granted by a cgroup-v2 quota (``cpu.max``: containers, SLURM), rounded up; None if unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, -(-int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, SLURM) capped by a cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(n, limit) if limit else n)


def thread_defaults(environ: Mapping[str, str] | None = None, n_parallel: int = 1) -> dict[str, str]:
    """The variables to add to ``environ`` (``os.environ`` by default): only those the user left unset.

    ``OMP_WAIT_POLICY=PASSIVE`` unless any of :data:`WAIT_VARS` is set. ``OMP_NUM_THREADS``
    unless any of :data:`COUNT_VARS` is set, and only where it changes something: with
    ``n_parallel`` processes sharing the cores (``cmrcnet benchmark --jobs``) each gets its share;
    a single process gets :func:`usable_cores` only when the process is restricted to fewer CPUs
    than the machine has (otherwise torch's own default, the physical cores, is kept).

    ``THP_MEM_ALLOC_ENABLE=1`` unless set: torch then backs CPU tensors of >= 2 MB with transparent
    huge pages (read at its first allocation). Without it a fresh 34 MB gradient (CMRCNet's gene
    tokenizer, every step) costs ~8,000 4 KB page faults, 15 ms instead of 3.4 ms; a frozen-mode
    her2st fold trains ~12 % faster, bit-identically (docs/PERFORMANCE.md, 3b')."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    if not any(v in env for v in ALLOC_VARS):
        out["THP_MEM_ALLOC_ENABLE"] = "1"
    if not any(v in env for v in WAIT_VARS):  # set at all, even empty: the user's choice
        out["OMP_WAIT_POLICY"] = "PASSIVE"
    if not any(v in env for v in COUNT_VARS):
        cores = usable_cores()
        if n_parallel > 1:
            out["OMP_NUM_THREADS"] = str(max(1, cores // n_parallel))
        elif cores < (os.cpu_count() or cores):
            out["OMP_NUM_THREADS"] = str(cores)
    return out


def apply_thread_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Add :func:`thread_defaults` to the environment unless torch is already loaded (then they
    could not take effect and the process's settings are left as they are); returns what was added."""
    if environ is None and "torch" in sys.modules:
        return {}
    env = os.environ if environ is None else environ
    added = thread_defaults(env)
    env.update(added)
    if environ is None:
        APPLIED.update(added)
    return added


# -- precision ------------------------------------------------------------------------------------
PROBE_VERSION = 1
#: bf16 counts as faster when its probe matmul takes at most this fraction of fp32's: mixed
#: precision pays casts around every matmul, so a tie is not a win.
BF16_MARGIN = 0.8


def _cpu_key(threads: int) -> str:
    """What the probe result depends on: CPU model and features, torch version, thread count."""
    import platform

    import torch

    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip() == "model name":
            model = value.strip()
        elif name.strip() == "flags":
            flags = " ".join(f for f in value.split() if "bf16" in f or "amx" in f)
            break
    return f"v{PROBE_VERSION}|{model}|{flags}|torch {torch.__version__}|{threads} threads"


def _probe_cpu(repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` seconds of a (256, 1024) @ (1024, 1024) matmul in fp32 and bf16,
    interleaved so a change of load hits both alike (~0.1-0.3 s in all on 2 cores)."""
    import time

    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    pairs = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}
    best = {k: float("inf") for k in pairs}
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for x, y in pairs.values():  # warm-up: oneDNN kernel selection
            x @ y
        for _ in range(repeats):
            for k, (x, y) in pairs.items():
                t0 = time.perf_counter()
                x @ y
                best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _probe_file():
    from cmrcnet.data.patches import default_cache_dir

    return default_cache_dir() / "bf16_probe.json"


@cache
def _cpu_bf16_is_faster(threads: int) -> bool:
    import json

    from cmrcnet.utils import write_json_atomic

    key, path = _cpu_key(threads), _probe_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), dict) and "bf16_faster" in known[key]:
        return bool(known[key]["bf16_faster"])
    t = _probe_cpu()
    faster = t["bf16"] <= BF16_MARGIN * t["fp32"]
    known = known if isinstance(known, dict) else {}
    known[key] = {"bf16_faster": faster, "fp32_s": t["fp32"], "bf16_s": t["bf16"]}
    try:
        write_json_atomic(path, known)
    except OSError:  # a read-only cache folder: the probe is then per process
        pass
    return faster


def bf16_is_faster(device: str = "cpu") -> bool:
    """Whether bf16 matmuls beat fp32 on ``device``, the one test behind every ``auto`` precision
    (training, frozen-feature encoding, image embedding, exact retrieval).

    On a CPU a quick timing decides (bf16 vs fp32 matmul; cached per process and on disk in
    ``$CMRCNET_CACHE/bf16_probe.json`` per CPU model, torch version and thread count): AMX
    CPUs ran bf16 7x faster than fp32, but a 2-core AVX512-BF16 CPU without AMX ran it 0.6x as
    fast. On CUDA: bf16 support (tensor cores)."""
    import torch

    if str(device).startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return _cpu_bf16_is_faster(torch.get_num_threads())


def _training_device(accelerator: str) -> str:
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """A Lightning precision for ``train.precision``: ``auto`` becomes ``bf16-mixed`` where
    :func:`bf16_is_faster` on the training device, else ``32-true``; others pass through."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if bf16_is_faster(_training_device(accelerator)) else "32-true"


def use_bf16(setting: str, train_precision: str, device: str) -> bool:
    """An ``auto``/``fp32``/``bf16`` inference setting (frozen-feature encoding, image embedding):
    ``auto`` runs bf16 where the run trains in bf16 (its resolved precision) and bf16 is faster
    on ``device``, so inference sees the numerics the model was trained with."""
    if setting != "auto":
        return setting == "bf16"
    trained_bf16 = resolve_precision(str(train_precision)).startswith("bf16")
    return trained_bf16 and bf16_is_faster(device)

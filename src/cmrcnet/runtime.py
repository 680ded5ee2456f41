"""Process-wide thread settings: passive OpenMP waits and a thread count that fits the CPUs
this process may use, applied before torch loads and never over a user's own settings.

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
from typing import Mapping, MutableMapping

__all__ = ["usable_cores", "thread_defaults", "apply_thread_defaults", "WAIT_VARS", "COUNT_VARS"]

WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""Any of these set by the user: the wait policy is theirs."""
COUNT_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Any of these set by the user: the thread count is theirs (torch reads both)."""

#: What :func:`apply_thread_defaults` added to ``os.environ`` in this process (for run.json / tests).
APPLIED: dict[str, str] = {}


def _cgroup_cpu_limit() -> int | None:
    """CPUs granted by a cgroup-v2 quota (``cpu.max``: containers, SLURM), rounded up; None if unlimited."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
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
    than the machine has (otherwise torch's own default, the physical cores, is kept)."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    if not any(env.get(v) for v in WAIT_VARS):
        out["OMP_WAIT_POLICY"] = "PASSIVE"
    if not any(env.get(v) for v in COUNT_VARS):
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


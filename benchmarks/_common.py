"""Helpers shared by the hand-run benchmark scripts in this folder.

Machine facts (cores, threads, load average, CPU features), timing, peak memory,
matmul peak, rich tables and the JSON envelope every script writes. Not part of the
installed package: the scripts import it as a sibling module (``python benchmarks/x.py``
puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

#: Default output folder, relative to the current directory (``/bench_out/`` is git-ignored).
DEFAULT_OUT_DIR = Path("bench_out")

#: Environment variable naming the real-data root (the folder holding ``her2st/``); with
#: neither it nor ``--data`` the scripts run on synthetic data and say so.
DATA_ENV = "CMRCNET_DATA_DIR"


# -- machine ---------------------------------------------------------------------------------
def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (``[]`` where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted: Sequence[str] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list[str]:
    """The CPU features among ``wanted`` (bf16 GEMM speed depends on AMX / AVX512-BF16)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def total_ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """Everything needed to compare two runs of a benchmark (recorded in every JSON)."""
    import torch

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "ram_gb": total_ram_gb(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": loadavg(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        info["faiss"] = None
    return info


# -- memory ----------------------------------------------------------------------------------
def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (``VmHWM``; ``ru_maxrss`` elsewhere)."""
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            kb //= 1024
    return round(kb / 1024, 1)


def current_rss_mb() -> float:
    kb = _proc_status_kb("VmRSS")
    return round(kb / 1024, 1) if kb is not None else float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -- timing ----------------------------------------------------------------------------------
def time_repeats(fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall times (s) of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(max(0, warmup)):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def gemm_peak_gflops(dtype_name: str, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Measured ``n x n @ n x n`` GEMM rate (median, GFLOP/s) in ``fp32`` or ``bf16``."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    times = time_repeats(lambda: a @ b, repeats, warmup=2, sync=sync)
    return 2.0 * n**3 / median(times) / 1e9


def flops_per_patch(encoder: Any, size_px: int) -> float:
    """FLOPs of one forward of ``encoder`` on one ``size_px`` patch (``FlopCounterMode``: matmuls and convs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        encoder(torch.zeros(1, 3, size_px, size_px))
    return float(fc.get_total_flops())


def recall_at_k(approx: Any, exact: Any) -> float:
    """Mean over queries of |approx ∩ exact| / k (``-1``, FAISS's empty slot, never matches)."""
    import numpy as np

    k = exact.shape[1]
    hits = sum(int(np.isin(row_e, row_a).sum()) for row_a, row_e in zip(approx, exact))
    return round(float(hits) / (k * len(exact)), 6)


def timed_search(index: Any, queries: Any, k: int, exact: Any) -> tuple[float, float, Any]:
    """One query pass of a FAISS index: (seconds, recall@k against the exact neighbours ``exact``,
    the neighbours found)."""
    t = time.perf_counter()
    _, idx = index.search(queries, k)
    return time.perf_counter() - t, recall_at_k(idx, exact), idx


# -- data ------------------------------------------------------------------------------------
def her2st_dir(arg: str | None) -> Path | None:
    """``--data``, else ``$CMRCNET_DATA_DIR/her2st`` (or the variable's folder itself); None when
    neither is given or neither holds her2st (``ST-cnts/``): see :func:`data_missing`."""
    candidates = []
    if arg:
        candidates += [Path(arg), Path(arg) / "her2st"]
    elif os.environ.get(DATA_ENV):
        root = Path(os.environ[DATA_ENV])
        candidates += [root / "her2st", root]
    for c in candidates:
        if (c / "ST-cnts").is_dir():
            return c
    return None


def data_missing(arg: str | None) -> str:
    """Why :func:`her2st_dir` found no her2st folder (for the note a script prints before its
    synthetic fallback)."""
    if arg:
        return f"her2st not found at --data {arg} (no ST-cnts/ in it or in its her2st/)"
    if os.environ.get(DATA_ENV):
        return f"her2st not found under ${DATA_ENV}={os.environ[DATA_ENV]} (no her2st/ST-cnts/)"
    return f"no real data given (pass --data HER2ST_DIR or set ${DATA_ENV} to the folder holding her2st/)"


def trains_by_gradient(model: Any) -> bool:
    """True for a method (model or its class) fitted by the shared gradient trainer, i.e. that
    keeps :meth:`ExpressionModel.fit`'s default; False for closed-form fits (ridge)."""
    from cmrcnet.models import ExpressionModel

    cls = model if isinstance(model, type) else type(model)
    return cls.fit is ExpressionModel.fit


def batches_spots(model: Any) -> bool:
    """True for a method (model or its class) that trains on batches of spots (the default
    :meth:`ExpressionModel.loader`); False for whole-slide sequence models (HisToGene)."""
    from cmrcnet.models import ExpressionModel

    cls = model if isinstance(model, type) else type(model)
    return cls.loader is ExpressionModel.loader


def quiet_warnings() -> None:
    """Silence the library's data warnings (unmeasured genes, random ridge weights) in tables."""
    warnings.filterwarnings("ignore")
    import logging

    for name in ("cmrcnet", "lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


# -- command line & output -------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="JSON file to write (default bench_out/<name>.json)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks the script still runs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the whole run")
    return p


def resolve_out(out: Path | None, name: str, smoke: bool) -> Path:
    if out is not None:
        return out
    return DEFAULT_OUT_DIR / (f"{name}_smoke.json" if smoke else f"{name}.json")


def apply_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(int(n))


class Report:
    """Collects rows and notes; prints rich tables and writes one JSON envelope."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.args = args
        self.t0 = time.perf_counter()
        self.payload: dict[str, Any] = {
            "benchmark": name,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": machine_info(),
            "loadavg_start": loadavg(),
            "tables": {},
            "notes": [],
        }

    def table(self, key: str, title: str, rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
        """Store ``rows`` under ``tables[key]`` and print them (columns default to the first row's keys)."""
        self.payload["tables"][key] = rows
        print_table(title, rows, columns)

    def note(self, text: str) -> None:
        self.payload["notes"].append(text)
        from rich.console import Console

        Console(stderr=False).print(f"[dim]note:[/] {text}", highlight=False)

    def write(self, out: Path) -> Path:
        self.payload["loadavg_end"] = loadavg()
        self.payload["wall_s"] = round(time.perf_counter() - self.t0, 1)
        self.payload["peak_rss_mb"] = peak_rss_mb()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.payload, indent=2, default=_json_default))
        tmp.replace(out)
        from rich.console import Console

        Console().print(
            f"wrote {out} ({self.payload['wall_s']} s; load avg {self.payload['loadavg_start']} -> "
            f"{self.payload['loadavg_end']})"
        )
        return out


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def fmt(v: Any) -> str:
    """Compact cell text: 3 significant digits for floats, thousands separators for ints."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ",".join(fmt(x) for x in v)
    return str(v)


def print_table(title: str, rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = list(columns) if columns else (list(rows[0]) if rows else [])
    t = Table(title=title, title_justify="left")
    for c in cols:
        t.add_column(c, justify="left" if c in _TEXT_COLUMNS else "right")
    for r in rows:
        t.add_row(*[fmt(r.get(c)) for c in cols])
    Console(width=max(220, Console().width)).print(t)


_TEXT_COLUMNS = {"method", "preset", "precision", "backend", "params", "phase", "what", "case", "encoder", "note", "setting"}


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """The same table as GitHub markdown (for pasting into docs/PERFORMANCE.md)."""
    cols = list(columns) if columns else (list(rows[0]) if rows else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)

"""Process defaults (cmrcnet.runtime): passive OpenMP waits, the thread count and huge pages are set
when the user left them unset, and a user's own OMP_* / MKL_* / THP_* settings are never overridden."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmrcnet import runtime
from cmrcnet.runtime import apply_thread_defaults, thread_defaults, usable_cores

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROBE = ("import json, os, sys; {pre}import cmrcnet{post}; import torch; "
         "print(json.dumps({{k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'OMP_NUM_THREADS', 'THP_MEM_ALLOC_ENABLE')}} | "
         "{{'threads': torch.get_num_threads()}}))")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in runtime.WAIT_VARS + runtime.COUNT_VARS + runtime.ALLOC_VARS}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _probe(env: dict[str, str], pre: str = "", post: str = "") -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(pre=pre, post=post)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_defaults_when_unset() -> None:
    got = thread_defaults({})
    assert got["OMP_WAIT_POLICY"] == "PASSIVE"
    if usable_cores() < (os.cpu_count() or 1):
        assert got["OMP_NUM_THREADS"] == str(usable_cores())
    else:  # unrestricted process: torch's own default (physical cores) is kept
        assert "OMP_NUM_THREADS" not in got


@pytest.mark.parametrize("var,value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "1000"),
                                       ("KMP_BLOCKTIME", "0"), ("OMP_WAIT_POLICY", "")])
def test_user_wait_policy_kept(var: str, value: str) -> None:
    env = {var: value}
    assert "OMP_WAIT_POLICY" not in thread_defaults(env)
    apply_thread_defaults(env)
    assert {k: v for k, v in env.items() if k in runtime.WAIT_VARS} == {var: value}


@pytest.mark.parametrize("var", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_user_thread_count_kept(var: str) -> None:
    assert "OMP_NUM_THREADS" not in thread_defaults({var: "3"}, n_parallel=2)


def test_huge_pages_default_and_opt_out() -> None:
    assert thread_defaults({})["THP_MEM_ALLOC_ENABLE"] == "1"
    env = {"THP_MEM_ALLOC_ENABLE": "0"}
    apply_thread_defaults(env)
    assert env["THP_MEM_ALLOC_ENABLE"] == "0"


def test_parallel_processes_share_the_cores() -> None:
    assert thread_defaults({}, n_parallel=2)["OMP_NUM_THREADS"] == str(max(1, usable_cores() // 2))
    assert thread_defaults({}, n_parallel=10 * usable_cores())["OMP_NUM_THREADS"] == "1"


def test_import_sets_passive_waits_before_torch() -> None:
    got = _probe(_clean_env())
    assert got["OMP_WAIT_POLICY"] == "PASSIVE" and got["THP_MEM_ALLOC_ENABLE"] == "1"


def test_import_keeps_user_settings() -> None:
    got = _probe(_clean_env(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1", THP_MEM_ALLOC_ENABLE="0"))
    assert got == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1", "THP_MEM_ALLOC_ENABLE": "0", "threads": 1}


def test_import_after_torch_changes_nothing() -> None:
    """torch already loaded (and its threads perhaps set by the user): the environment stays as it was."""
    got = _probe(_clean_env(), pre="import torch; torch.set_num_threads(1); ")
    assert got["OMP_WAIT_POLICY"] is None and got["threads"] == 1


def test_cli_entry_point_applies_defaults() -> None:
    got = _probe(_clean_env(), post=".cli")
    assert got["OMP_WAIT_POLICY"] == "PASSIVE"


def test_benchmark_fold_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from cmrcnet.benchmark import fold_process_env

    for v in runtime.WAIT_VARS + runtime.COUNT_VARS:
        monkeypatch.delenv(v, raising=False)
    # this process's own default is not taken for the user's: the children still get their share
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setitem(runtime.APPLIED, "OMP_NUM_THREADS", "7")
    env = fold_process_env(2)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == str(max(1, usable_cores() // 2))
    monkeypatch.delitem(runtime.APPLIED, "OMP_NUM_THREADS")  # now it is the user's: kept
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    env = fold_process_env(2)
    assert env["OMP_NUM_THREADS"] == "7" and env["OMP_WAIT_POLICY"] == "ACTIVE"


# -- precision ------------------------------------------------------------------------------------
@pytest.fixture
def fresh_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty probe cache (on disk and in this process)."""
    monkeypatch.setenv("CMRCNET_CACHE", str(tmp_path / "cache"))
    runtime._cpu_bf16_is_faster.cache_clear()
    yield tmp_path / "cache" / "bf16_probe.json"
    runtime._cpu_bf16_is_faster.cache_clear()


@pytest.mark.parametrize("fp32,bf16,faster", [(1.0, 0.5, True), (1.0, 0.9, False), (0.5, 1.0, False)])
def test_probe_decides_by_timing_and_caches_on_disk(fresh_probe: Path, monkeypatch: pytest.MonkeyPatch,
                                                    fp32: float, bf16: float, faster: bool) -> None:
    monkeypatch.setattr(runtime, "_probe_cpu", lambda: {"fp32": fp32, "bf16": bf16})
    assert runtime.bf16_is_faster("cpu") is faster
    saved = json.loads(fresh_probe.read_text())
    (entry,) = saved.values()
    assert entry["bf16_faster"] is faster and entry["fp32_s"] == fp32

    def no_probe():
        raise AssertionError("probed again although the answer was cached on disk")

    runtime._cpu_bf16_is_faster.cache_clear()
    monkeypatch.setattr(runtime, "_probe_cpu", no_probe)
    assert runtime.bf16_is_faster("cpu") is faster


def test_real_probe_is_quick_and_consistent(fresh_probe: Path) -> None:
    t = runtime._probe_cpu()
    assert t["fp32"] > 0 and t["bf16"] > 0
    assert runtime.bf16_is_faster("cpu") == runtime.bf16_is_faster("cpu")


@pytest.mark.parametrize("faster", [True, False])
def test_auto_precision_everywhere_follows_the_probe(monkeypatch: pytest.MonkeyPatch, faster: bool) -> None:
    monkeypatch.setattr(runtime, "bf16_is_faster", lambda device="cpu": faster)
    assert runtime.resolve_precision("auto") == ("bf16-mixed" if faster else "32-true")
    assert runtime.resolve_precision("32-true") == "32-true" and runtime.resolve_precision("bf16-mixed") == "bf16-mixed"
    assert runtime.use_bf16("auto", "auto", "cpu") is faster  # embedding / frozen features
    assert runtime.use_bf16("auto", "32-true", "cpu") is False  # a run trained in fp32 embeds in fp32
    assert runtime.use_bf16("bf16", "32-true", "cpu") is True and runtime.use_bf16("fp32", "bf16-mixed", "cpu") is False


def test_presets_default_to_auto_precision() -> None:
    from cmrcnet.config import make_config

    for method, preset in [("cmrcnet", "cpu"), ("cmrcnet", "paper"), ("cmrcnet", "authors"), ("bleep", "cpu")]:
        assert make_config(method, preset).train.precision == "auto", (method, preset)
    assert make_config("cmrcnet", "tiny").train.precision == "32-true"

"""End-to-end training/prediction on synthetic data through the shared pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmrcnet.config import make_config
from cmrcnet.training import load_run, load_samples, predict_sample, train


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from cmrcnet.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "ds", n_samples=3, n_patients=3, seed=0)


def _cfg(synth: Path, method: str = "cmrcnet", **ov):
    base = {"data.path": str(synth), "data.cache_dir": str(synth.parent / "cache")}
    base.update(ov)
    return make_config(method, "tiny", base)


def _mean_pcc(pred, obs) -> float:
    p = pred - pred.mean(0)
    o = obs - obs.mean(0)
    den = np.sqrt((p**2).sum(0) * (o**2).sum(0))
    r = np.where(den > 0, (p * o).sum(0) / np.where(den > 0, den, 1), 0.0)
    return float(r.mean())


def test_run_directory_and_prediction(synth, tmp_path):
    cfg = _cfg(synth)
    samples = load_samples(cfg)
    test_id = samples[-1].sample_id
    run = train(cfg, tmp_path / "run", [test_id], samples=samples)
    for name in ("config.yaml", "split.json", "genes.txt", "model.pt", "bank.npz", "done.json"):
        assert (run / name).is_file(), name
    split = json.loads((run / "split.json").read_text())
    assert test_id in json.dumps(split)
    trained = load_run(run)
    pred = predict_sample(trained, samples[-1])
    assert pred.shape == (samples[-1].n_spots, len(trained.genes))
    assert {"predicted", "observed", "uncertainty"} <= set(pred.layers)
    assert pred.obsm["spatial"].shape == (pred.n_obs, 2)
    assert pred.uns["cmrcnet"]["method"] == "cmrcnet"
    assert np.isfinite(pred.X).all()


@pytest.mark.slow
def test_cmrcnet_learns_beyond_shuffled_control(synth, tmp_path):
    """Held-out PCC of the real model must clearly beat the same model trained on shuffled labels."""
    ov = {"train.epochs": 6, "seed": 1}
    cfg = _cfg(synth, **ov)
    samples = load_samples(cfg)
    test_id = samples[0].sample_id
    scores = {}
    for label, shuffle in (("real", False), ("shuffled", True)):
        c = _cfg(synth, **ov, **{"train.shuffle_labels": shuffle})
        run = train(c, tmp_path / label, [test_id], samples=samples)
        pred = predict_sample(load_run(run), samples[0])
        scores[label] = _mean_pcc(pred.layers["predicted"], pred.layers["observed"])
    assert scores["real"] > 0.15, scores
    assert scores["real"] > scores["shuffled"] + 0.12, scores


@pytest.mark.slow
def test_resume_continues_from_saved_step(synth, tmp_path):
    cfg = _cfg(synth, **{"train.epochs": 1})
    samples = load_samples(cfg)
    test_id = samples[-1].sample_id
    run = train(cfg, tmp_path / "run", [test_id], samples=samples)
    first = json.loads((run / "done.json").read_text())["global_step"]
    assert first > 0
    (run / "done.json").unlink()  # as if killed after the checkpoint was written
    cfg2 = _cfg(synth, **{"train.epochs": 2})
    train(cfg2, run, [test_id], samples=samples, resume=True)
    second = json.loads((run / "done.json").read_text())["global_step"]
    assert second == 2 * first
    # a completed run is skipped on resume
    mtime = (run / "done.json").stat().st_mtime
    train(cfg2, run, [test_id], samples=samples, resume=True)
    assert (run / "done.json").stat().st_mtime == mtime


def test_last_checkpoint_holds_the_final_state(synth, tmp_path):
    """last.ckpt (a link to best.ckpt when both hold the same step) always resolves to the last step."""
    import os

    import torch

    cfg = _cfg(synth, **{"train.epochs": 3})
    samples = load_samples(cfg)
    run = train(cfg, tmp_path / "run", [samples[-1].sample_id], samples=samples)
    done = json.loads((run / "done.json").read_text())
    last, best = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "best.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == done["global_step"]
    if last.is_symlink():
        assert os.readlink(last) == "best.ckpt"
        assert torch.load(best, map_location="cpu", weights_only=False)["global_step"] == done["global_step"]
    assert not list((run / "checkpoints").glob("*tmp*"))


@pytest.mark.parametrize("method", ["bleep", pytest.param("stnet", marks=pytest.mark.slow), "histogene", "ridge"])
def test_every_method_trains_and_predicts(synth, tmp_path, method):
    cfg = _cfg(synth, method)
    samples = load_samples(cfg)
    run = train(cfg, tmp_path / method, [samples[-1].sample_id], samples=samples)
    pred = predict_sample(load_run(run), samples[-1])
    assert pred.shape[0] == samples[-1].n_spots
    assert np.isfinite(pred.layers["predicted"]).all()
    assert "observed" in pred.layers


@pytest.mark.slow
def test_cli_train_and_predict(synth, tmp_path):
    cache = str(synth.parent / "cache")
    env_cmd = [sys.executable, "-m", "cmrcnet"]
    from cmrcnet.data.readers import list_sample_ids

    sid = list_sample_ids(synth)[-1]
    r = subprocess.run(
        env_cmd + ["train", "--data", str(synth), "--test", sid, "--preset", "tiny", "--set", f"data.cache_dir={cache}", "--set", "train.epochs=1", "--out", str(tmp_path / "run")],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        env_cmd + ["predict", "--run", str(tmp_path / "run"), "--sample", str(synth), "--sample-id", sid, "--out", str(tmp_path / "pred.h5ad")],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    import anndata as ad

    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert "predicted" in pred.layers and "spatial" in pred.obsm
    # retrieval settings are overridable at prediction time; other settings are not
    r = subprocess.run(
        env_cmd + ["predict", "--run", str(tmp_path / "run"), "--sample", str(synth), "--sample-id", sid, "--out", str(tmp_path / "flat.h5ad"),
                   "--set", "retrieval.backend=faiss-flat", "--set", "retrieval.exact_precision=fp32"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "flat.h5ad").X, pred.X, rtol=1e-5, atol=1e-6)
    r = subprocess.run(
        env_cmd + ["predict", "--run", str(tmp_path / "run"), "--sample", str(synth), "--sample-id", sid, "--out", str(tmp_path / "x.h5ad"),
                   "--set", "train.epochs=3"],
        capture_output=True, text=True,
    )
    assert r.returncode == 2 and "retrieval.*" in r.stderr and "Traceback" not in r.stderr
    for bad in ("retrieval.embed_precision=fp8", "retrieval.backend=annoy"):
        r = subprocess.run(
            env_cmd + ["predict", "--run", str(tmp_path / "run"), "--sample", str(synth), "--sample-id", sid,
                       "--out", str(tmp_path / "x.h5ad"), "--set", bad],
            capture_output=True, text=True,
        )
        assert r.returncode == 2 and bad.split("=")[0].split(".")[-1] in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "x.h5ad").exists()


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cmrcnet", "train", "--data", str(tmp_path / "nope"), "--test", "X", "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "cmrcnet", "train", "--data", str(tmp_path), "--test", "X", "--out", str(tmp_path / "r"), "--set", "train.nonsense=1"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "nonsense" in r.stderr



@pytest.mark.slow
def test_lightning_ddp_two_cpu_processes_gather_negatives(synth, tmp_path):
    """Lightning DDP on 2 CPU processes (gloo): the contrastive loss sees both processes' spots."""
    import pandas as pd

    cfg = _cfg(synth, **{"train.epochs": 1, "train.devices": 2, "train.accelerator": "cpu", "train.strategy": "ddp_spawn", "train.batch_size": 16})
    samples = load_samples(cfg)
    run = train(cfg, tmp_path / "ddp", [samples[-1].sample_id], samples=samples)
    assert (run / "model.pt").is_file() and (run / "bank.npz").is_file()
    metrics = pd.read_csv(run / "logs" / "metrics.csv")
    negs = metrics["train/n_negatives"].dropna()
    assert len(negs) > 0
    assert (negs == 2 * 16).all(), negs.tolist()


def test_runs_saved_with_a_removed_config_key_still_load() -> None:
    from dataclasses import asdict

    from cmrcnet.config import from_dict, make_config

    d = asdict(make_config("cmrcnet", "tiny"))
    d["train"]["compile"] = False  # written by versions before the key was removed
    with pytest.warns(UserWarning, match="train.compile"):
        cfg = from_dict(d)
    assert cfg.train.epochs == make_config("cmrcnet", "tiny").train.epochs
    d["train"]["no_such_key"] = 1
    with pytest.raises(Exception, match="unknown config key"):
        from_dict(d)


def _read_moved(folder: Path, sample_id: str):
    from cmrcnet.data.readers import read_sample

    return read_sample(folder, sample_id)


def test_run_describes_itself_and_predicts_after_the_data_moved(tmp_path, monkeypatch):
    """run.json holds markers, genes, gene sets and the caller's description; prediction never
    consults the training data folder or a manifest, so moving the data changes nothing."""
    import shutil

    from cmrcnet.data.synthetic import make_synthetic_dataset
    from cmrcnet.training import fit as fit_module

    data = make_synthetic_dataset(tmp_path / "ds", n_samples=3, n_patients=3, seed=0)
    cfg = _cfg(data, **{"genes.markers": ["GENE000", "GENE001"], "data.cache_dir": str(tmp_path / "cache")})
    samples = load_samples(cfg)
    held = samples[-1].sample_id
    run = train(cfg, tmp_path / "run", [held], samples=samples, describe={"variant": "v", "variant_overrides": {"model.tau": 2.0}})
    info = json.loads((run / "run.json").read_text())
    assert info["markers"] == ["GENE000", "GENE001"] and info["test_ids"] == [held]
    assert info["genes"] == (run / "genes.txt").read_text().split()
    assert info["gene_sets"]["top_k_expressed_and_variable"] == [50, 150, 250]
    before = predict_sample(load_run(run), samples[-1])

    moved = tmp_path / "moved"
    shutil.move(str(data), str(moved))

    def no_data_lookups(*a, **k):
        raise AssertionError("prediction consulted the training data folder")

    monkeypatch.setattr(fit_module, "resolve_manifest", no_data_lookups)
    monkeypatch.setattr(fit_module, "resolve_markers", no_data_lookups)
    after = predict_sample(load_run(run), _read_moved(moved, held))
    meta = after.uns["cmrcnet"]
    assert list(meta["markers"]) == ["GENE000", "GENE001"] and meta["variant"] == "v"
    assert float(meta["variant_overrides"]["model.tau"]) == 2.0
    np.testing.assert_array_equal(after.layers["predicted"], before.layers["predicted"])


@pytest.mark.slow
@pytest.mark.realdata
def test_her2st_markers_survive_moving_the_data(her2st_dir, tmp_path):
    """The real case: markers come from the her2st manifest (found by the data folder) at training
    time; after the folder is renamed, prediction gives the same markers and the same numbers."""
    src = tmp_path / "her2st"
    for sec, pat in (("C2", "C"), ("C3", "C")):  # a two-section partial copy made of symlinks
        for rel in (f"ST-cnts/{sec}.tsv.gz", f"ST-spotfiles/{sec}_selection.tsv"):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).symlink_to(her2st_dir / rel)
        (src / "ST-imgs" / pat).mkdir(parents=True, exist_ok=True)
        (src / "ST-imgs" / pat / sec).symlink_to(her2st_dir / "ST-imgs" / pat / sec)
    cfg = make_config("ridge", "tiny", {"data.path": str(src), "data.cache_dir": str(tmp_path / "cache")})
    samples = load_samples(cfg)
    run = train(cfg, tmp_path / "run", ["C3"], samples=samples)
    before = predict_sample(load_run(run), samples[1])
    assert "ERBB2" in list(before.uns["cmrcnet"]["markers"])
    src.rename(tmp_path / "elsewhere")
    after = predict_sample(load_run(run), _read_moved(tmp_path / "elsewhere", "C3"))
    assert list(after.uns["cmrcnet"]["markers"]) == list(before.uns["cmrcnet"]["markers"])
    np.testing.assert_array_equal(after.layers["predicted"], before.layers["predicted"])


def test_adding_a_method_is_one_file(synth, tmp_path):
    """docs/architecture.md's walk-through, executed: the file registers a method that trains,
    predicts, gets its plot colour and needs nothing else."""
    import importlib.util
    import re

    from cmrcnet.models import base
    from cmrcnet.plots import method_colour

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    path = tmp_path / "mymethod.py"
    path.write_text("\n".join(line[3:] if line.startswith("   ") else line for line in code.splitlines()))
    spec = importlib.util.spec_from_file_location("mymethod", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mymethod"] = module
    try:
        spec.loader.exec_module(module)
        cfg = _cfg(synth, "mymethod", **{"train.epochs": 1})
        samples = load_samples(cfg)
        run = train(cfg, tmp_path / "run", [samples[-1].sample_id], samples=samples)
        pred = predict_sample(load_run(run), samples[-1])
        assert pred.uns["cmrcnet"]["method"] == "mymethod" and np.isfinite(pred.layers["predicted"]).all()
        assert method_colour("mymethod") == "#9467bd"
    finally:
        base._REGISTRY.pop("mymethod", None)
        sys.modules.pop("mymethod", None)


def test_runs_saved_before_run_json_still_load(synth, tmp_path):
    """An older model.pt (no "run" entry) loads; markers are re-derived once, with a warning."""
    import torch

    cfg = _cfg(synth, "ridge", **{"genes.markers": ["GENE003"]})
    samples = load_samples(cfg)
    run = train(cfg, tmp_path / "run", [samples[-1].sample_id], samples=samples)
    payload = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    del payload["run"]
    torch.save(payload, run / "model.pt")
    with pytest.warns(UserWarning, match="older cmrcnet without its markers"):
        old = load_run(run)
    assert old.markers == ["GENE003"]
    assert predict_sample(old, samples[-1]).n_obs == samples[-1].n_spots


@pytest.mark.parametrize("faster,want", [(False, "32-true"), (True, "bf16-mixed")])
def test_auto_precision_is_resolved_and_recorded(synth, tmp_path, monkeypatch, faster: bool, want: str):
    """train.precision=auto: the trainer gets the probe's choice and run.json records it."""
    import lightning

    import cmrcnet.runtime as rt

    monkeypatch.setattr(rt, "bf16_is_faster", lambda device="cpu": faster)
    seen = {}
    real = lightning.Trainer

    def trainer(*a, **kw):
        seen["precision"] = kw.get("precision")
        return real(*a, **kw)

    monkeypatch.setattr(lightning, "Trainer", trainer)
    cfg = _cfg(synth, **{"train.precision": "auto", "train.epochs": 1, "train.max_steps": 1})
    samples = load_samples(cfg)
    run = train(cfg, tmp_path / "run", [samples[-1].sample_id], samples=samples)
    info = json.loads((run / "run.json").read_text())
    assert seen["precision"] == want
    assert info["precision"] == want

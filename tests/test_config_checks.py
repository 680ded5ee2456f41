"""Every ``--set`` key is typed and range-checked from its dataclass (issue 16: ``train.epochs=abc``)."""

from __future__ import annotations

import pytest

from cmrcnet.config import load_yaml, make_config
from cmrcnet.errors import ConfigError
from cmrcnet.models import available_methods

BAD_OVERRIDES = [
    ("train.epochs", "abc", "expected an integer"),
    ("train.epochs", "2.5", "expected an integer"),
    ("train.epochs", "0", "must be >= 1"),
    ("train.lr", "-1", "must be > 0"),
    ("train.lr", "nan", "finite"),
    ("train.lr", "fast", "expected a number"),
    ("train.batch_size", "true", "expected an integer"),
    ("train.augment", "maybe", "true/false"),
    ("train.precision", "fp8", "must be one of"),
    ("train.max_steps", "0", "must be >= 1 or -1"),
    ("split.val_fraction", "1.5", "must be <= 0.9"),
    ("split.scheme", "loo-everything", "must be one of"),
    ("genes.n_hvg", "-5", "must be >= 1"),
    ("genes.selection", "test", "must be one of"),
    ("patches.size_um", "0", "must be > 0"),
    ("patches.size_px", "inf", "expected an integer"),
    ("retrieval.top_k", "0", "must be >= 1"),
    ("retrieval.backend", "annoy", "must be one of"),
    ("seed", "-1", "must be >= 0"),
    ("seed", "x", "expected an integer"),
]


@pytest.mark.parametrize("method", available_methods())
@pytest.mark.parametrize(("key", "value", "message"), BAD_OVERRIDES, ids=[f"{k}={v}" for k, v, _ in BAD_OVERRIDES])
def test_set_bad_value_is_a_config_error_for_every_method(method: str, key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        make_config(method, "tiny", {key: value})
    assert key in str(e.value)


@pytest.mark.parametrize(
    ("method", "key", "value", "message"),
    [
        ("histogene", "model.depth", "abc", "expected an integer"),
        ("histogene", "model.depth", "0", "must be >= 1"),
        ("histogene", "model.dropout", "1.2", "must be < 1"),
        ("cmrcnet", "model.mask_ratio", "abc", "expected a number"),
        ("cmrcnet", "model.mask_ratio", "1", "must be < 1"),
        ("cmrcnet", "model.embed_dim", "-3", "must be >= 1"),
        ("bleep", "model.reconstruction", "perhaps", "true/false"),
        ("ridge", "model.n_components", "1.5", "expected an integer"),
        ("ridge", "model.alpha", "nan", "finite"),
        ("stnet", "model.tta", "2", "true/false"),
    ],
)
def test_set_bad_model_value_is_a_config_error(method: str, key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        make_config(method, "tiny", {key: value})
    assert key in str(e.value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("train.epochs", "3", 3),
        ("train.epochs", "3.0", 3),
        ("train.lr", "1e-3", 1e-3),
        ("train.lr", "1", 1.0),
        ("train.devices", "auto", "auto"),
        ("train.devices", "2", 2),
        ("train.max_steps", "-1", -1),
        ("genes.target_sum", "null", None),
        ("genes.markers", "ERBB2,GATA3", ["ERBB2", "GATA3"]),
        ("retrieval.index", "{nprobe: 8}", {"nprobe": 8}),
        ("data.skip_bad_samples", "true", True),
    ],
)
def test_set_good_values_are_typed(key: str, value: str, expected) -> None:
    cfg = make_config("cmrcnet", "tiny", {key: value})
    section, _, name = key.rpartition(".")
    got = getattr(getattr(cfg, section), name) if section else getattr(cfg, name)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("method", ["cmrcnet", "bleep", "stnet"])
def test_none_is_a_choice_where_it_is_one_and_a_reset_where_the_key_is_optional(method: str) -> None:
    """``--set model.frozen_views=none`` picks the choice; ``model.encoder_weights=none`` resets."""
    cfg = make_config(method, "cpu", {"model.frozen_views": "none", "model.encoder_weights": "none"})
    assert cfg.model["frozen_views"] == "none" and cfg.model["encoder_weights"] is None
    with pytest.raises(ConfigError, match="encoder_mode"):
        make_config(method, "cpu", {"model.encoder_mode": "none"})


def test_yaml_config_values_are_checked_too(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: abc\n")
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_yaml(p)
    p.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match="train.lr: must be > 0"):
        load_yaml(p)


@pytest.mark.parametrize("method", ["ridge", "bleep"])
def test_cli_set_epochs_abc_is_one_line_before_any_work(method: str, tmp_path, capsys) -> None:
    from cmrcnet.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tmp_path), "--test", "X", "--out", str(tmp_path / "r"), "--method", method,
              "--set", "train.epochs=abc"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "train.epochs: expected an integer" in err
    assert "Traceback" not in err and not (tmp_path / "r").exists()

"""Leave-one-out folds, seeded validation spots, JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmrcnet.data.splits import Fold, load_split, make_folds, save_split, validation_mask
from cmrcnet.errors import ConfigError, InputError


def test_loo_sample_sorted_and_exhaustive():
    folds = make_folds(["C2", "A1", "B1"], None, "loo-sample", seed=3)
    assert [f.test for f in folds] == [["A1"], ["B1"], ["C2"]]
    assert [f.index for f in folds] == [0, 1, 2]
    assert folds[0].train == ["B1", "C2"]
    assert all(f.scheme == "loo-sample" and f.seed == 3 for f in folds)
    for f in folds:
        assert not set(f.train) & set(f.test)
        assert sorted(f.train + f.test) == ["A1", "B1", "C2"]
    assert make_folds(["B1", "C2", "A1"], None) == make_folds(["C2", "A1", "B1"], None)


def test_loo_patient_groups_sections():
    patients = {"A1": "A", "A2": "A", "B1": "B", "C1": "C", "C2": "C"}
    folds = make_folds(list(patients), patients, "loo-patient")
    assert [f.test for f in folds] == [["A1", "A2"], ["B1"], ["C1", "C2"]]
    assert folds[1].train == ["A1", "A2", "C1", "C2"]


def test_fold_errors():
    with pytest.raises(InputError, match="at least 2 patients"):
        make_folds(["A1", "A2"], {"A1": "A", "A2": "A"}, "loo-patient")
    with pytest.raises(InputError, match="patient"):
        make_folds(["A1", "B1"], None, "loo-patient")
    with pytest.raises(InputError, match="no patient id for sample"):
        make_folds(["A1", "B1"], {"A1": "A"}, "loo-patient")
    with pytest.raises(InputError, match="at least 2 samples"):
        make_folds(["A1"], None)
    with pytest.raises(InputError, match="duplicated"):
        make_folds(["A1", "A1"], None)
    with pytest.raises(ConfigError):
        make_folds(["A1", "B1"], None, "kfold")


def test_validation_mask_seeded_and_independent_of_other_samples():
    m = validation_mask({"A": 100, "B": 37}, 0.2, seed=0)
    assert m["A"].dtype == bool and m["A"].shape == (100,) and m["A"].sum() == 20
    assert m["B"].sum() == 7
    again = validation_mask({"A": 100, "B": 37}, 0.2, seed=0)
    np.testing.assert_array_equal(m["A"], again["A"])
    alone = validation_mask({"A": 100}, 0.2, seed=0)
    np.testing.assert_array_equal(m["A"], alone["A"])
    other = validation_mask({"A": 100}, 0.2, seed=1)
    assert not np.array_equal(m["A"], other["A"])
    assert not np.array_equal(m["A"][:37], m["B"])  # samples get different draws


def test_validation_mask_edge_cases():
    m = validation_mask({"tiny": 3, "one": 1, "none": 0}, 0.01, seed=0)
    assert m["tiny"].sum() == 1 and m["one"].sum() == 0 and m["none"].shape == (0,)
    assert validation_mask({"A": 10}, 0.0, 0)["A"].sum() == 0
    assert validation_mask({"A": 2}, 0.9, 0)["A"].sum() == 1  # keeps a training spot
    with pytest.raises(ConfigError):
        validation_mask({"A": 10}, 1.0, 0)


def test_save_load_roundtrip(tmp_path):
    fold = make_folds(["A1", "B1", "C1"], None, seed=7)[1]
    masks = validation_mask({"A1": 50, "C1": 20}, 0.1, seed=7)
    path = tmp_path / "split.json"
    save_split(path, fold, masks, extra={"genes": ["X", "Y"]})
    obj = json.loads(path.read_text())
    assert obj["val_spots"]["A1"] == np.flatnonzero(masks["A1"]).tolist()
    assert obj["extra"]["genes"] == ["X", "Y"]
    fold2, masks2 = load_split(path)
    assert fold2 == fold
    assert set(masks2) == {"A1", "C1"}
    for k in masks:
        np.testing.assert_array_equal(masks2[k], masks[k])
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]  # atomic: no temp left

    save_split(path, fold)
    fold3, none = load_split(path)
    assert fold3 == fold and none is None


def test_load_split_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_split(tmp_path / "x.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not a valid split"):
        load_split(bad)
    bad.write_text(json.dumps({"fold": {"index": 0}}))
    with pytest.raises(InputError, match="not a valid split"):
        load_split(bad)
    assert isinstance(Fold(0, ["a"], ["b"], "loo-sample", 0), Fold)

"""Readers of the legacy-ST layouts (her2st, STUtility), format detection, pixel size, bad input."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cmrcnet.data.pixelsize import estimate_pitch_px, estimate_um_per_px
from cmrcnet.data.readers import (
    attach_lowres,
    detect_format,
    list_sample_ids,
    read_dataset,
    read_sample,
    verify_image,
)
from cmrcnet.data.readers.legacy_st import write_legacy_st
from cmrcnet.data.synthetic import make_synthetic_samples
from cmrcnet.errors import InputError

HER2ST = {  # section: (spots in both files, genes, image W, image H, one-file spot ids)
    "B4": (283, 15289, 9272, 9923, ["18x20"]),
    "C2": (187, 15706, 9274, 9911, []),
    "C3": (180, 15821, 9270, 9936, ["13x9", "17x14"]),
    "C4": (184, 15842, 9278, 9916, ["11x17", "17x14", "18x20"]),
    "C5": (181, 15721, 9272, 9901, ["13x9", "18x20"]),
    "C6": (178, 15772, 9288, 9907, ["17x14"]),
}
MOB_SPOTS = {"MOB1": 379, "MOB2": 407, "MOB3": 438, "MOB4": 403}


# -- real data ------------------------------------------------------------------------------------
def test_detect_and_list(her2st_dir: Path, mob_dir: Path, synthetic_dir: Path) -> None:
    assert detect_format(her2st_dir) == "her2st"
    assert detect_format(mob_dir) == "legacy-st"
    assert detect_format(synthetic_dir) == "hest"
    assert list_sample_ids(her2st_dir) == sorted(HER2ST)
    assert list_sample_ids(mob_dir) == sorted(MOB_SPOTS)


def test_her2st_all_sections(her2st_dir: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = read_dataset(her2st_dir)
    msgs = [str(w.message) for w in caught]
    assert [s.sample_id for s in samples] == sorted(HER2ST)
    for s in samples:
        n, genes, w, h, one_file = HER2ST[s.sample_id]
        assert (s.n_spots, s.n_genes, s.image.size) == (n, genes, (w, h))
        assert s.patient_id == s.sample_id[0] and s.dataset == "her2st" and s.platform == "legacy-st"
        assert 0.68 < s.um_per_px < 0.70 and s.pixel_size_source == "estimated"
        assert (s.spot_diameter_um, s.pitch_um) == (100.0, 200.0)
        assert 140 < s.spot_diameter_px < 150  # README: a spot is about 145 px across
        X = s.adata.X
        assert sp.isspmatrix_csr(X) and np.issubdtype(X.dtype, np.integer)
        assert s.adata.obs_names.is_unique and s.adata.var_names.is_unique
        assert s.adata.obsm["spatial"].dtype == np.float64
        reported = [m for m in msgs if m.startswith(f"{s.sample_id}:")]
        if one_file:  # never silent: counts, the file names and the ids are named
            assert len(reported) == 1
            msg = reported[0]
            assert f"{len(one_file)} spot(s)" in msg and f"{s.sample_id}_selection.tsv" in msg
            assert f"{s.sample_id}.tsv.gz" in msg and all(k in msg for k in one_file)
        else:
            assert not reported


def test_her2st_values_match_source(her2st_dir: Path, her2st_c2) -> None:
    s = her2st_c2
    spots = pd.read_csv(her2st_dir / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    row = spots.iloc[0]
    key = f"{int(row.x)}x{int(row.y)}"
    i = s.adata.obs_names.get_loc(key)
    assert np.allclose(s.adata.obsm["spatial"][i], [row.pixel_x, row.pixel_y])
    assert (s.adata.obs["array_col"].iloc[i], s.adata.obs["array_row"].iloc[i]) == (row.x, row.y)
    counts = pd.read_csv(her2st_dir / "ST-cnts" / "C2.tsv.gz", sep="\t", index_col=0, nrows=3)
    for k in counts.index:
        j = s.adata.obs_names.get_loc(k)
        assert np.array_equal(s.adata.X[j].toarray().ravel(), counts.loc[k].to_numpy())


def test_mob_sections(mob_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = read_dataset(mob_dir)
    for s in samples:
        assert s.n_spots == MOB_SPOTS[s.sample_id] and s.n_genes == 1000
        assert s.image.size == (1905, 1905)
        assert 6.0 < s.um_per_px < 6.5 and s.pixel_size_source == "estimated"
        assert s.patient_id == s.sample_id  # grouping lives in samples.tsv / the manifest, not here
        var = s.adata.var
        assert var["gene_ids"].str.startswith("ENSMUSG").all()
        assert {"Penk", "Doc2g", "Cdhr1", "Kctd12", "Apod", "Nrgn", "Mbp"} <= set(var.index)


def test_samples_table_sets_patients(mob_dir: Path, tmp_path: Path) -> None:
    for p in mob_dir.iterdir():  # symlinks: never copy or touch the shared data
        os.symlink(p, tmp_path / p.name)
    (tmp_path / "samples.tsv").write_text("sample_id\tpatient_id\nMOB1\t1\nMOB2\t1\nMOB3\t2\nMOB4\t2\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = read_sample(tmp_path, "MOB3")
    assert s.patient_id == "2"


def test_read_dataset_selection_and_name(mob_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (s,) = read_dataset(mob_dir, sample_ids=["MOB2"], dataset="mob-test")
    assert s.sample_id == "MOB2" and s.dataset == "mob-test"
    with pytest.raises(InputError, match="MOB9"):
        read_dataset(mob_dir, sample_ids=["MOB9"])
    with pytest.raises(InputError, match="unknown format"):
        read_dataset(mob_dir, fmt="nope")


# -- pixel size -----------------------------------------------------------------------------------
def _square(n: int = 12, pitch: float = 290.0, noise: float = 0.0, angle: float = 0.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    r, c = np.divmod(np.arange(n * n), n)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    xy = (np.column_stack([c, r]) * pitch) @ rot.T + 500 + rng.normal(0, noise, (n * n, 2))
    return xy, np.column_stack([r, c])


def test_pitch_square_grid_with_noise() -> None:
    xy, rc = _square(noise=8.0)
    assert estimate_pitch_px(xy, rc) == pytest.approx(290.0, rel=0.01)
    assert estimate_pitch_px(xy) < 290.0  # nearest-neighbour minimum is biased low under noise
    assert estimate_um_per_px(xy, 200.0, rc) == pytest.approx(200 / 290, rel=0.01)


def test_pitch_hex_grid() -> None:
    r, c = np.divmod(np.arange(200), 20)
    col = 2 * c + (r % 2)
    xy = np.column_stack([(c + 0.5 * (r % 2)) * 50.0, r * 50.0 * np.sqrt(3) / 2])
    assert estimate_pitch_px(xy, np.column_stack([r, col])) == pytest.approx(50.0, rel=1e-6)
    assert estimate_pitch_px(xy) == pytest.approx(50.0, rel=1e-6)


def test_pitch_missing_spots_and_bad_input() -> None:
    xy, rc = _square()
    keep = np.random.default_rng(1).random(len(xy)) < 0.5
    assert estimate_pitch_px(xy[keep], rc[keep]) == pytest.approx(290.0, rel=1e-6)
    with pytest.raises(InputError):
        estimate_pitch_px(np.zeros((3, 2)))
    with pytest.raises(InputError):
        estimate_um_per_px(xy, -1.0)


# -- synthetic her2st-layout fixtures for bad input ---------------------------------------------------
def _small_sample(n_spots: int = 30):
    (s,) = make_synthetic_samples(n_samples=1, n_patients=1, n_spots=n_spots, n_genes=8, seed=3)
    s.sample_id, s.patient_id = "A1", "A"
    return s


@pytest.fixture()
def st_dir(tmp_path: Path) -> Path:
    return write_legacy_st(_small_sample(), tmp_path / "ds", layout="her2st")


def _counts(root: Path) -> Path:
    return root / "ST-cnts" / "A1.tsv.gz"


def _spots(root: Path) -> Path:
    return root / "ST-spotfiles" / "A1_selection.tsv"


def _image(root: Path) -> Path:
    return root / "ST-imgs" / "A" / "A1" / "A1.png"


def test_small_her2st_roundtrip(st_dir: Path) -> None:
    src = _small_sample()
    s = read_sample(st_dir, "A1")
    assert (s.adata.X != src.adata.X).nnz == 0
    assert np.array_equal(s.coords_px, src.coords_px)
    assert list(s.adata.obs_names) == list(src.adata.obs_names)
    assert s.um_per_px == pytest.approx(src.um_per_px, rel=1e-9)


def test_legacy_flat_layout_with_gene_table(tmp_path: Path) -> None:
    src = _small_sample()
    ids = [f"ENSG{i:011d}.{i % 3 + 1}" for i in range(src.n_genes)]
    src.adata.var["gene_ids"] = ids
    root = write_legacy_st(src, tmp_path / "flat", layout="legacy-st")
    names = [f"SYM{i}" for i in range(src.n_genes)]
    names[1] = names[0]  # duplicated symbol -> made unique
    table = pd.DataFrame({"gene_id": [g.split(".")[0] if i % 2 else g for i, g in enumerate(ids)],
                          "gene_type": "protein_coding", "gene_name": names})
    table.to_csv(root / "human_genes.tsv.gz", sep="\t", index=False)
    assert detect_format(root) == "legacy-st"
    s = read_sample(root, "A1")
    assert list(s.adata.var["gene_ids"]) == ids
    assert list(s.adata.var_names[:3]) == ["SYM0", "SYM0-1", "SYM2"]
    assert s.patient_id == "A1"


def test_missing_files(st_dir: Path) -> None:
    _image(st_dir).unlink()
    with pytest.raises(InputError, match="no H&E image"):
        read_sample(st_dir, "A1")
    _spots(st_dir).unlink()
    with pytest.raises(InputError, match="spot table not found"):
        read_sample(st_dir, "A1")
    with pytest.raises(InputError, match="no sample 'Z9'"):
        read_sample(st_dir, "Z9")


def test_unknown_folder(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="no supported dataset found") as e:
        detect_format(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="not found"):
        detect_format(tmp_path / "absent")


def test_spots_outside_image(st_dir: Path) -> None:
    df = pd.read_csv(_spots(st_dir), sep="\t")
    df.loc[:1, "pixel_x"] = 1e6
    df.to_csv(_spots(st_dir), sep="\t", index=False)
    msg = r"2 spot\(s\) lie outside the 140 x 120 image A1.png: 1x1 \(1000000, 20\)"
    with warnings.catch_warnings(), pytest.raises(InputError, match=msg) as e:
        warnings.simplefilter("ignore")  # the grid fit also complains about the broken coordinates
        read_sample(st_dir, "A1")
    assert e.value.path == _spots(st_dir)


def test_no_overlap(st_dir: Path) -> None:
    df = pd.read_csv(_counts(st_dir), sep="\t", index_col=0)
    df.index = [f"{i + 100}x{i + 100}" for i in range(len(df))]
    df.to_csv(_counts(st_dir), sep="\t")
    with pytest.raises(InputError, match="no spot of counts table"):
        read_sample(st_dir, "A1")


@pytest.mark.parametrize(
    ("value", "match"),
    [(-3, "negative"), ("abc", "non-numeric"), (1.5, "whole numbers")],
)
def test_bad_counts(st_dir: Path, value, match: str) -> None:
    df = pd.read_csv(_counts(st_dir), sep="\t", index_col=0).astype(object)
    df.iloc[2, 3] = value
    df.to_csv(_counts(st_dir), sep="\t")
    with pytest.raises(InputError, match=match) as e:
        read_sample(st_dir, "A1")
    assert e.value.path == _counts(st_dir)


def test_duplicate_barcodes(st_dir: Path) -> None:
    df = pd.read_csv(_counts(st_dir), sep="\t", index_col=0)
    pd.concat([df, df.iloc[:1]]).to_csv(_counts(st_dir), sep="\t")
    with pytest.raises(InputError, match="duplicate spots"):
        read_sample(st_dir, "A1")
    df.to_csv(_counts(st_dir), sep="\t")
    spots = pd.read_csv(_spots(st_dir), sep="\t")
    pd.concat([spots, spots.iloc[:1]]).to_csv(_spots(st_dir), sep="\t", index=False)
    with pytest.raises(InputError, match="duplicate array positions"):
        read_sample(st_dir, "A1")


def test_empty_sample(st_dir: Path) -> None:
    spots = pd.read_csv(_spots(st_dir), sep="\t")
    spots.assign(selected=0).to_csv(_spots(st_dir), sep="\t", index=False)
    with pytest.raises(InputError, match="no spot has selected == 1"):
        read_sample(st_dir, "A1")
    spots.to_csv(_spots(st_dir), sep="\t", index=False)
    df = pd.read_csv(_counts(st_dir), sep="\t", index_col=0)
    df.iloc[:, :0].to_csv(_counts(st_dir), sep="\t")
    with pytest.raises(InputError, match="empty"):
        read_sample(st_dir, "A1")


def test_selected_column_respected(st_dir: Path) -> None:
    spots = pd.read_csv(_spots(st_dir), sep="\t")
    spots.loc[:4, "selected"] = 0
    spots.to_csv(_spots(st_dir), sep="\t", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # deselected spots present in counts are not "mismatches"
        s = read_sample(st_dir, "A1")
    assert s.n_spots == 25


def test_one_sided_spots_are_reported(st_dir: Path) -> None:
    df = pd.read_csv(_counts(st_dir), sep="\t", index_col=0)
    df.iloc[1:].to_csv(_counts(st_dir), sep="\t")
    with pytest.warns(UserWarning, match=r"A1: 1 spot\(s\) in spot table A1_selection.tsv but not in counts A1.tsv.gz"):
        s = read_sample(st_dir, "A1")
    assert s.n_spots == 29


def test_truncated_image_header(st_dir: Path) -> None:
    _image(st_dir).write_bytes(_image(st_dir).read_bytes()[:20])
    with pytest.raises(InputError, match="unreadable image"):
        read_sample(st_dir, "A1")


def test_truncated_jpeg_body(st_dir: Path) -> None:
    from PIL import Image

    png = _image(st_dir)
    jpg = png.with_suffix(".jpg")
    Image.open(png).save(jpg, quality=90)
    png.unlink()
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    s = read_sample(st_dir, "A1")  # the header is intact: reading succeeds...
    with pytest.raises(InputError, match="unreadable image"):
        verify_image(s)  # ...and decoding catches the truncated body


def test_attach_images_hires_and_lowres() -> None:
    from cmrcnet.data.readers import attach_images

    s = _small_sample()
    attach_images(s, hires_side=100, lowres_side=50)
    entry = s.adata.uns["spatial"]["A1"]
    sf = entry["scalefactors"]
    for key, side in (("hires", 100), ("lowres", 50)):
        img = entry["images"][key]
        assert img.dtype == np.uint8 and max(img.shape[:2]) == side and img.shape[2] == 3
        assert sf[f"tissue_{key}_scalef"] == pytest.approx(side / 140)
    assert sf["spot_diameter_fullres"] == pytest.approx(s.spot_diameter_px)
    attach_lowres(s, max_side=70)  # the older name: hires of that side, and a lowres
    assert max(s.adata.uns["spatial"]["A1"]["images"]["hires"].shape[:2]) == 70

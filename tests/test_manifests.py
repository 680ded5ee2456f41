"""Dataset manifests (cmrcnet.data.manifest) and the ``cmrcnet datasets`` command."""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import pytest
import yaml

from cmrcnet.data.manifest import (
    XENIUM_CONTROL_REGEX,
    Manifest,
    check_hest_folder,
    check_markers_against,
    find_manifest_for_path,
    list_manifests,
    load_manifest,
    load_manifest_file,
)
from cmrcnet.errors import ConfigError, InputError

DATA_DIR = Path(os.environ.get("CMRCNET_DATA_DIR", "/work/shared/data"))
ALL = ["coad", "her2st", "idc", "idc_lymphnode", "mob", "psc", "read", "skcm"]
PAPER = ["idc_lymphnode", "skcm", "read", "coad", "idc", "psc"]
METHODS = ["STNet", "HisToGene", "BLEEP", "CMRCNet-50", "CMRCNet-500"]


# ----------------------------------------------------------------------------- loading


def test_list_manifests():
    assert list_manifests() == ALL


@pytest.mark.parametrize("name", ALL)
def test_every_manifest_loads_and_validates(name):
    m = load_manifest(name)
    assert isinstance(m, Manifest)
    assert m.name == name and m.path is not None and m.path.stem == name
    assert m.title and m.species and m.notes
    assert m.samples and len(set(m.sample_ids())) == len(m.samples)
    assert set(m.patients()) == set(m.sample_ids())
    assert m.markers and len(set(m.markers)) == len(m.markers)
    assert m.n_hvg == 1000 and m.combine == "union"
    if m.platform == "xenium":
        assert m.drop_probes_regex == XENIUM_CONTROL_REGEX
        assert m.is_control_probe("BLANK_0001") and m.is_control_probe("NegControlProbe_00042")
        assert not m.is_control_probe("EPCAM")
    else:
        assert m.drop_probes_regex is None and not m.is_control_probe("BLANK_0001")


@pytest.mark.parametrize("name", PAPER)
def test_paper_manifests_have_table1(name):
    m = load_manifest(name)
    assert m.format == "hest" and m.species == "Homo sapiens"
    t1 = m.paper_results["table1"]
    assert list(t1) == METHODS
    for row in t1.values():
        assert set(row) == {"HEG", "HVG", "Marker"}
        assert all(0 < v < 1 for v in row.values())
    # Table 4 repeats CMRCNet-500's HEG/HVG per dataset: it pins the Table 1 reconstruction.
    t4 = m.paper_results["table4"]
    assert t4["CMRCNet-500"] == {k: t1["CMRCNet-500"][k] for k in ("HEG", "HVG")}
    assert set(t4) == {"cTransPath", "CMRCNet-500"}
    assert set(m.paper_results["table2"]) == {"STNet", "HisToGene", "BLEEP", "CMRCNet"}


def test_table1_numbers_quoted_in_paper_text():
    # "For the SKCM dataset, CMRCNet-50 achieves PCC values of 0.3420 for HEGs and 0.1966 for HVGs"
    skcm = load_manifest("skcm").paper_results["table1"]
    assert (skcm["CMRCNet-50"]["HEG"], skcm["CMRCNet-50"]["HVG"]) == (0.3420, 0.1966)
    # marker genes: "0.2704 vs 0.1921 (BLEEP) ... vs 0.0628 (STNet)": the SKCM block
    assert (skcm["CMRCNet-50"]["Marker"], skcm["BLEEP"]["Marker"], skcm["STNet"]["Marker"]) == (0.2704, 0.1921, 0.0628)
    # COAD: "0.3872 vs 0.3080 (STNet)", "0.4611 vs 0.3715", BLEEP 0.3509 / 0.4185
    coad = load_manifest("coad").paper_results["table1"]
    assert (coad["CMRCNet-50"]["HEG"], coad["STNet"]["HEG"], coad["BLEEP"]["HEG"]) == (0.3872, 0.3080, 0.3509)
    assert (coad["CMRCNet-50"]["HVG"], coad["STNet"]["HVG"], coad["BLEEP"]["HVG"]) == (0.4611, 0.3715, 0.4185)


def test_sample_ids_unique_across_manifests():
    seen: dict[str, str] = {}
    for name in ALL:
        for sid in load_manifest(name).sample_ids():
            assert sid not in seen, f"{sid} in both {seen.get(sid)} and {name}"
            seen[sid] = name


def test_specific_contents():
    lymph = load_manifest("idc_lymphnode")
    assert "RND" not in lymph.markers and "RND" in lymph.notes and len(lymph.markers) == 9
    assert load_manifest("her2st").patients() == {"B4": "B", "C2": "C", "C3": "C", "C4": "C", "C5": "C", "C6": "C"}
    assert load_manifest("mob").patients() == {"MOB1": "1", "MOB2": "1", "MOB3": "2", "MOB4": "2"}
    assert load_manifest("her2st").markers == load_manifest("idc").markers
    assert load_manifest("mob").species == "Mus musculus"
    assert "two patients" in load_manifest("read").notes


@pytest.mark.parametrize("alias", ["COAD", "Coad", "IDC-LymphNode", "LYMPH_IDC", " skcm "])
def test_names_case_insensitive_and_aliases(alias):
    assert load_manifest(alias).name in ALL


def test_unknown_name_lists_available():
    with pytest.raises(ConfigError) as e:
        load_manifest("brca")
    msg = str(e.value)
    assert "brca" in msg and all(n in msg for n in ALL)


# ----------------------------------------------------------------------------- user-written manifests

VALID = {
    "name": "mine",
    "title": "My data",
    "platform": "visium",
    "format": "hest",
    "species": "Homo sapiens",
    "samples": [{"id": "S1", "patient": "P1"}, {"id": "S2", "patient": 2}],
    "markers": ["EPCAM"],
    "gene_selection": {"n_hvg": 500, "combine": "intersection"},
}


def _write(tmp_path: Path, d, name="m.yaml") -> Path:
    p = tmp_path / name
    p.write_text(d if isinstance(d, str) else yaml.safe_dump(d))
    return p


def test_user_manifest_file(tmp_path):
    p = _write(tmp_path, VALID)
    m = load_manifest_file(p)
    assert m.patients() == {"S1": "P1", "S2": "2"} and m.n_hvg == 500 and m.combine == "intersection"
    assert m.paper_results == {} and m.notes == "" and m.drop_probes_regex is None
    assert load_manifest(str(p)).name == "mine"  # a path works where a name does


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"platform": "slide-seq"}, "platform"),
        ({"format": "anndata"}, "format"),
        ({"samples": []}, "samples"),
        ({"samples": [{"id": "S1", "patient": "P"}, {"id": "S1", "patient": "P"}]}, "duplicate"),
        ({"samples": [{"id": "S1"}]}, "patient"),
        ({"gene_selection": {"n_hvg": 0}}, "n_hvg"),
        ({"gene_selection": {"combine": "sum"}}, "combine"),
        ({"gene_selection": {"drop_probes_regex": "(["}}, "regex"),
        ({"gene_selection": {"nhvg": 10}}, "nhvg"),
        ({"markers": "EPCAM"}, "markers"),
        ({"markers": ["A", "A"]}, "duplicates"),
        ({"paper_results": {"table1": {"X": {"HEG": "high"}}}}, "number"),
        ({"sampels": []}, "sampels"),
        ({"name": None}, "name"),
    ],
)
def test_invalid_manifest_names_file_and_problem(tmp_path, change, needle):
    d = {**VALID, **change}
    p = _write(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        load_manifest_file(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_missing_required_key(tmp_path):
    d = dict(VALID)
    del d["species"]
    with pytest.raises(ConfigError, match="species"):
        load_manifest_file(_write(tmp_path, d))


def test_unreadable_manifest_is_input_error(tmp_path):
    with pytest.raises(InputError):
        load_manifest_file(tmp_path / "absent.yaml")
    with pytest.raises(InputError, match="YAML"):
        load_manifest_file(_write(tmp_path, "name: [unclosed"))
    with pytest.raises(ConfigError, match="mapping"):
        load_manifest_file(_write(tmp_path, "- a\n- b\n"))


# ----------------------------------------------------------------------------- HEST folders


def _fake_hest(root: Path, ids) -> Path:
    (root / "st").mkdir(parents=True, exist_ok=True)
    for i in ids:
        (root / "st" / f"{i}.h5ad").write_bytes(b"")
    return root


def test_check_hest_folder_all_present(tmp_path):
    m = load_manifest("coad")
    hest = _fake_hest(tmp_path / "hest", m.sample_ids())
    assert check_hest_folder(hest, m) == m.sample_ids()


def test_check_hest_folder_missing_lists_ids_and_fetch_snippet(tmp_path):
    m = load_manifest("idc")
    hest = _fake_hest(tmp_path / "hest", [i for i in m.sample_ids() if i != "TENX99"])
    with pytest.raises(InputError) as e:
        check_hest_folder(hest, m)
    msg = str(e.value)
    assert "TENX99" in msg and "NCBI783" not in msg.split("ids_to_query")[1]
    assert "snapshot_download" in msg and "allow_patterns" in msg and "MahmoodLab/hest" in msg
    assert "ids_to_query = ['TENX99']" in msg


def test_check_hest_folder_absent_dir_and_wrong_format(tmp_path):
    with pytest.raises(InputError, match="snapshot_download"):
        check_hest_folder(tmp_path / "nope", load_manifest("psc"))
    with pytest.raises(ConfigError, match="not HEST"):
        check_hest_folder(tmp_path, load_manifest("her2st"))


def test_fetch_snippet_is_valid_python():
    src = load_manifest("read").fetch_snippet()
    compile(src, "<snippet>", "exec")
    assert "ids_to_query = ['ZEN36', 'ZEN40', 'ZEN48', 'ZEN49']" in src


# ----------------------------------------------------------------------------- finding a manifest for a folder


def test_find_manifest_for_fake_layouts(tmp_path):
    her = tmp_path / "her2st" / "ST-cnts"
    her.mkdir(parents=True)
    for s in ("C2", "C3"):
        (her / f"{s}.tsv.gz").write_bytes(b"")
    assert find_manifest_for_path(tmp_path / "her2st").name == "her2st"

    mob = tmp_path / "mob"
    mob.mkdir()
    for s in ("MOB1", "MOB2", "MOB3", "MOB4"):
        (mob / f"{s}.tsv").write_text("")
        (mob / f"alignment_table_{s}.tsv").write_text("")
    (mob / "mouse_genes.tsv.gz").write_bytes(b"")
    assert find_manifest_for_path(mob).name == "mob"

    coad = _fake_hest(tmp_path / "hest_coad", ["TENX111", "TENX148"])
    assert find_manifest_for_path(coad).name == "coad"
    assert find_manifest_for_path(coad / "st" / "TENX111.h5ad").name == "coad"

    # a HEST folder holding two whole datasets is ambiguous
    both = _fake_hest(tmp_path / "hest_all", load_manifest("coad").sample_ids() + load_manifest("skcm").sample_ids())
    assert find_manifest_for_path(both) is None
    # a folder with only unknown samples matches nothing
    assert find_manifest_for_path(_fake_hest(tmp_path / "other", ["TENX1", "TENX2"])) is None
    assert find_manifest_for_path(tmp_path / "does-not-exist") is None


@pytest.mark.parametrize("name", ["her2st", "mob"])
def test_find_manifest_for_shared_data(name):
    folder = DATA_DIR / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not available")
    assert find_manifest_for_path(folder).name == name


# ----------------------------------------------------------------------------- markers vs real gene symbols


def _her2st_header(section: str) -> list[str]:
    path = DATA_DIR / "her2st" / "ST-cnts" / f"{section}.tsv.gz"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    with gzip.open(path, "rt") as f:
        return f.readline().rstrip("\n").split("\t")[1:]


def _mob_symbols() -> list[str]:
    counts, genes = DATA_DIR / "mob" / "MOB1.tsv", DATA_DIR / "mob" / "mouse_genes.tsv.gz"
    if not (counts.is_file() and genes.is_file()):
        pytest.skip("mob data not available")
    with open(counts) as f:
        ids = f.readline().rstrip("\n").split("\t")[1:]
    with gzip.open(genes, "rt") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    to_sym = {r[0].split(".")[0]: r[2] for r in rows}
    return [to_sym[i.split(".")[0]] for i in ids if i.split(".")[0] in to_sym]


def test_her2st_markers_vs_count_header():
    m = load_manifest("her2st")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # C2 has every marker: no warning at all
        present, unknown = check_markers_against(m, _her2st_header("C2"))
    assert present == m.markers and unknown == []


def test_her2st_c5_lacks_pgr_and_it_is_reported():
    m = load_manifest("her2st")
    with pytest.warns(UserWarning, match="PGR"):
        present, unknown = check_markers_against(m, _her2st_header("C5"))
    assert unknown == ["PGR"] and len(present) == len(m.markers) - 1


def test_mob_markers_vs_mapped_symbols():
    m = load_manifest("mob")
    symbols = _mob_symbols()
    assert len(symbols) == 1000
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        present, unknown = check_markers_against(m, symbols)
    # every marker is reported exactly once, as present or unknown; unknown ones warn
    assert sorted(present + unknown) == sorted(m.markers)
    assert bool(unknown) == any(issubclass(w.category, UserWarning) for w in rec)
    assert unknown == []  # as documented in docs/datasets.md: all ten are among the 1,000 genes


def test_unknown_markers_warned_not_dropped():
    m = load_manifest("mob")
    m.markers = m.markers + ["NotAGene"]
    with pytest.warns(UserWarning, match="NotAGene"):
        present, unknown = check_markers_against(m, ["Penk", "MBP"])
    assert present == ["Penk", "MBP"]  # case-insensitive hit returned in the data's spelling
    assert "NotAGene" in unknown and "Doc2g" in unknown


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli():
    from typer.testing import CliRunner

    import cmrcnet.cli as c

    if not any(getattr(cmd, "name", None) == "datasets" for cmd in c.app.registered_commands):
        c._register()
    return CliRunner(), c.app


def test_cli_lists_manifests(cli):
    runner, app = cli
    r = runner.invoke(app, ["datasets"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for name in ALL:
        assert name in r.output
    assert "TENX111" in r.output and "visium" in r.output


def test_cli_shows_one_manifest(cli):
    runner, app = cli
    r = runner.invoke(app, ["datasets", "COAD"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for s in ("TENX147", "CLCA1", "0.3872", "0.4478", "cTransPath", "snapshot_download", "allow_patterns",
              "cmrcnet benchmark --data HEST_DIR --dataset COAD"):
        assert s in r.output, s
    r = runner.invoke(app, ["datasets", "mob"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "Penk" in r.output and "snapshot_download" not in r.output


def test_cli_unknown_and_check(cli, tmp_path):
    runner, app = cli
    r = runner.invoke(app, ["datasets", "nope"])
    assert isinstance(r.exception, ConfigError) and "available" in str(r.exception)
    m = load_manifest("skcm")
    hest = _fake_hest(tmp_path / "hest", m.sample_ids())
    r = runner.invoke(app, ["datasets", "skcm", "--check", str(hest)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "all 2 samples present" in r.output
    (hest / "st" / "TENX117.h5ad").unlink()
    r = runner.invoke(app, ["datasets", "skcm", "--check", str(hest)])
    assert isinstance(r.exception, InputError) and "TENX117" in str(r.exception)

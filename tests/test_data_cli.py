"""``cmrcnet data info|download|convert|synthetic``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmrcnet.data.readers import read_dataset
from cmrcnet.data.readers.legacy_st import write_legacy_st
from cmrcnet.data.synthetic import make_synthetic_samples
from cmrcnet.errors import InputError

runner = CliRunner()


def _app():
    """The root app with sub-commands registered once (``main`` registers on every call)."""
    from cmrcnet import cli

    if not any(g.name == "data" for g in cli.app.registered_groups):
        cli._register()
    return cli.app


def _rows(output: str, ids: list[str]) -> dict[str, str]:
    return {i: next(line for line in output.splitlines() if line.strip().startswith(i + " ")) for i in ids}


def test_info_her2st(her2st_dir: Path) -> None:
    r = runner.invoke(_app(), ["data", "info", str(her2st_dir)])
    assert r.exit_code == 0, r.output
    rows = _rows(r.output, ["B4", "C2", "C3", "C4", "C5", "C6"])
    assert "283" in rows["B4"] and "9272x9923" in rows["B4"] and "est." in rows["B4"]
    assert "187" in rows["C2"] and "15,706" in rows["C2"] and "0.68" in rows["C2"]
    assert "warning:" in r.output and "18x20" in r.output  # one-file spots are reported


def test_info_mob_with_format(mob_dir: Path) -> None:
    r = runner.invoke(_app(), ["data", "info", str(mob_dir), "--format", "legacy-st", "--samples", "MOB1,MOB3"])
    assert r.exit_code == 0, r.output
    rows = _rows(r.output, ["MOB1", "MOB3"])
    assert "379" in rows["MOB1"] and "438" in rows["MOB3"] and "1905x1905" in rows["MOB1"]


def test_synthetic_then_info_check_images(tmp_path: Path) -> None:
    dest = tmp_path / "syn"
    r = runner.invoke(_app(), ["data", "synthetic", str(dest), "--n-samples", "3", "--n-spots", "20", "--n-genes", "7"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(_app(), ["data", "info", str(dest), "--check-images"])
    assert r.exit_code == 0, r.output
    rows = _rows(r.output, ["SYN1", "SYN2", "SYN3"])
    assert all(" 20 " in row and " 7 " in row and "10.0000" in row for row in rows.values())


def test_convert_to_hest(tmp_path: Path) -> None:
    samples = make_synthetic_samples(n_samples=2, n_spots=25, n_genes=9)
    for s in samples:
        s.sample_id, s.patient_id = "A" + s.sample_id[-1], "A"
        write_legacy_st(s, tmp_path / "st", layout="her2st")
    r = runner.invoke(_app(), ["data", "convert", str(tmp_path / "st"), "--to-hest", str(tmp_path / "hest"), "--patches"])
    assert r.exit_code == 0, r.output
    back = read_dataset(tmp_path / "hest")
    assert [b.sample_id for b in back] == ["A1", "A2"] and all(b.pixel_size_source == "estimated" for b in back)
    assert (tmp_path / "hest" / "patches" / "A1.h5").is_file()
    for s, b in zip(samples, back):
        assert (s.adata.X != b.adata.X).nnz == 0


def test_download_command(her2st_dir: Path, tmp_path: Path) -> None:
    import http.server
    import threading
    from functools import partial

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(her2st_dir)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        args = ["data", "download", "her2st", "--dest", str(tmp_path / "d"), "--base-url", url, "--sections", "C2", "-q"]
        r = runner.invoke(_app(), args)
        assert r.exit_code == 0, r.output
        assert (tmp_path / "d" / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg").stat().st_size == (
            her2st_dir / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg"
        ).stat().st_size
    finally:
        httpd.shutdown()
        httpd.server_close()
    r = runner.invoke(_app(), ["data", "download", "other", "--dest", str(tmp_path / "d")])
    assert isinstance(r.exception, InputError)


def test_bad_folder_errors_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    proc = subprocess.run(
        [sys.executable, "-c", "from cmrcnet.cli import main; main()", "data", "info", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "no supported dataset found" in err and str(tmp_path) in err


@pytest.mark.parametrize("args", [["info", "{p}", "--format", "visium"], ["info", "{p}", "--samples", "Z9"]])
def test_info_errors_raise_input_error(mob_dir: Path, args: list[str]) -> None:
    r = runner.invoke(_app(), ["data", *[a.format(p=mob_dir) for a in args]])
    assert r.exit_code != 0 and isinstance(r.exception, InputError)

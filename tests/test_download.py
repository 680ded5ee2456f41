"""her2st downloader against a local HTTP server (never the internet)."""

from __future__ import annotations

import filecmp
import http.server
import threading
from functools import partial
from pathlib import Path

import pytest

from cmrcnet.data.download import DEFAULT_HER2ST_URL, DownloadError, HER2ST_IMAGES, download_her2st, her2st_files
from cmrcnet.errors import InputError


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range support (to exercise resume), quiet, counting GETs."""

    requests: list[str] = []
    ranges: list[str] = []

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802
        type(self).requests.append(self.path)
        rng = self.headers.get("Range")
        if rng:
            type(self).ranges.append(rng)
        path = Path(self.translate_path(self.path))
        if not rng or not path.is_file():
            return super().do_GET()
        start = int(rng.split("=")[1].split("-")[0])
        data = path.read_bytes()
        if start >= len(data):
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture(scope="module")
def server(her2st_dir: Path):
    handler = partial(_Handler, directory=str(her2st_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _same(src: Path, dest: Path, sections: list[str]) -> None:
    for s in sections:
        for rel in her2st_files(s):
            assert filecmp.cmp(src / rel, dest / rel, shallow=False), rel
    assert not list(dest.rglob("*.part")) and not list(dest.rglob(".*tmp*"))


def test_default_url_is_the_public_repo() -> None:
    assert DEFAULT_HER2ST_URL.startswith("https://github.com/almaan/her2st/")
    assert set(HER2ST_IMAGES) == {"B4", "C2", "C3", "C4", "C5", "C6"}


def test_download_one_section_then_skip(server: str, her2st_dir: Path, tmp_path: Path) -> None:
    dest = download_her2st(tmp_path / "h", base_url=server, sections=["C2"], progress=False)
    _same(her2st_dir, dest, ["C2"])
    _Handler.requests.clear()
    download_her2st(dest, base_url=server, sections=["C2"], progress=False)
    assert _Handler.requests == []  # complete files are skipped


def test_download_all_and_read(server: str, her2st_dir: Path, tmp_path: Path) -> None:
    dest = download_her2st(tmp_path / "all", base_url=server + "/", progress=True)
    _same(her2st_dir, dest, list(HER2ST_IMAGES))
    from cmrcnet.data.readers import detect_format, list_sample_ids

    assert detect_format(dest) == "her2st" and list_sample_ids(dest) == sorted(HER2ST_IMAGES)


def test_download_resumes_partial_file(server: str, her2st_dir: Path, tmp_path: Path) -> None:
    rel = her2st_files("C3")[2]
    part = tmp_path / "r" / (rel + ".part")
    part.parent.mkdir(parents=True)
    src = (her2st_dir / rel).read_bytes()
    part.write_bytes(src[:100_000])
    _Handler.ranges.clear()
    download_her2st(tmp_path / "r", base_url=server, sections=["C3"], progress=False)
    _same(her2st_dir, tmp_path / "r", ["C3"])
    assert _Handler.ranges == ["bytes=100000-"]  # only the missing tail was fetched


def test_http_error_names_url(server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"HTTP 404 .* for http://127\.0\.0\.1:\d+/nope/ST-cnts/C2\.tsv\.gz"):
        download_her2st(tmp_path / "x", base_url=server + "/nope", sections=["C2"], progress=False)
    assert not (tmp_path / "x" / "ST-cnts" / "C2.tsv.gz").exists()


def test_unreachable_and_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="download failed"):
        download_her2st(tmp_path, base_url="http://127.0.0.1:9", sections=["C2"], progress=False, timeout=2)
    with pytest.raises(InputError, match="unknown her2st section 'A1'"):
        download_her2st(tmp_path, sections=["A1"], progress=False)

"""Download the public her2st sections (counts, spot tables, full-resolution H&E images).

Files keep the repository's relative layout under ``dest`` (``ST-cnts/``,
``ST-spotfiles/``, ``ST-imgs/{patient}/{section}/``), so ``dest`` is directly a her2st
dataset folder. Each file is streamed to ``{name}.part`` and renamed when complete:
an existing final file is complete and skipped; an interrupted ``.part`` is resumed
with an HTTP Range request when the server supports it (else restarted).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from cmrcnet.errors import CmrcnetError, InputError

#: The data folder of the public almaan/her2st GitHub repository.
DEFAULT_HER2ST_URL = "https://github.com/almaan/her2st/raw/master/data"

#: Sections whose full-resolution image is public, and that image's file name.
HER2ST_IMAGES: dict[str, str] = {
    "B4": "BT10737_D2_HE.jpg",
    "C2": "5714_HE_BT_C2.jpg",
    "C3": "5714_HE_BT_D1.jpg",
    "C4": "5714_HE_BT_D2.jpg",
    "C5": "5714_HE_BT_E1.jpg",
    "C6": "5714_HE_BT_E2.jpg",
}

CHUNK = 1 << 16


class DownloadError(CmrcnetError):
    """A file could not be fetched (HTTP error, network failure)."""


def her2st_files(section: str) -> list[str]:
    """Relative paths of the three files of one section."""
    if section not in HER2ST_IMAGES:
        raise InputError(f"unknown her2st section {section!r} (choose from {', '.join(HER2ST_IMAGES)})")
    patient = section[0]
    return [
        f"ST-cnts/{section}.tsv.gz",
        f"ST-spotfiles/{section}_selection.tsv",
        f"ST-imgs/{patient}/{section}/{HER2ST_IMAGES[section]}",
    ]


def download_her2st(
    dest: str | Path,
    base_url: str = DEFAULT_HER2ST_URL,
    sections: list[str] | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Fetch the given (default: all six) her2st sections into ``dest``; returns ``dest``."""
    dest = Path(dest)
    sections = list(HER2ST_IMAGES) if not sections else list(sections)
    rels = [rel for s in sections for rel in her2st_files(s)]
    todo = [rel for rel in rels if not (dest / rel).is_file()]
    if not todo:
        return dest
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        for rel in todo:
            url = base_url.rstrip("/") + "/" + rel
            fetch(url, dest / rel, bar, timeout)
    return dest


def fetch(url: str, path: Path, bar=None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``path`` via ``path.part`` (resumed if present); atomic rename at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "cmrcnet"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - URL is user-configurable by design
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range beyond end: the .part is already complete
            os.replace(part, path)
            return path
        raise DownloadError(f"download failed: HTTP {e.code} {e.reason} for {url}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"download failed: {reason} for {url}") from None
    with resp:
        resumed = have and resp.status == 206
        mode = "ab" if resumed else "wb"
        length = resp.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length else None
        task = bar.add_task(path.name, total=total, completed=have if resumed else 0) if bar is not None else None
        try:
            with open(part, mode) as fh:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    fh.write(chunk)
                    if task is not None:
                        bar.advance(task, len(chunk))
        except OSError as e:
            raise DownloadError(f"download interrupted ({e}) for {url}; run again to resume") from None
    got = part.stat().st_size
    if total is not None and got != total:
        raise DownloadError(f"download incomplete: got {got} of {total} bytes for {url}; run again to resume")
    os.replace(part, path)
    return path

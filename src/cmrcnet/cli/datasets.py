"""``cmrcnet datasets [NAME]``: list the dataset manifests, or show one in detail."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cmrcnet.data.manifest import (
    Manifest,
    check_hest_folder,
    list_manifests,
    load_manifest,
)

_METHOD_ORDER = ("STNet", "HisToGene", "BLEEP", "CMRCNet-50", "CMRCNet-500", "CMRCNet", "cTransPath")


def _console() -> Console:
    from cmrcnet.cli import stdout_console

    return stdout_console(highlight=False)


def _ordered(methods) -> list[str]:
    known = [m for m in _METHOD_ORDER if m in methods]
    return known + [m for m in methods if m not in known]


def _list_table() -> Table:
    t = Table(title="Dataset manifests (cmrcnet datasets NAME for details)", show_lines=False)
    t.add_column("name", style="bold", no_wrap=True)
    t.add_column("platform", no_wrap=True)
    t.add_column("format", no_wrap=True)
    t.add_column("#samples", justify="right")
    t.add_column("sample ids")
    t.add_column("#patients", justify="right")
    t.add_column("#markers", justify="right")
    t.add_column("paper", justify="center")
    for name in list_manifests():
        m = load_manifest(name)
        t.add_row(
            m.name,
            m.platform,
            m.format,
            str(len(m.samples)),
            Text(", ".join(m.sample_ids())),
            str(len(set(m.patients().values()))),
            str(len(m.markers)),
            "yes" if "table1" in m.paper_results else "-",
        )
    return t


def _results_table(m: Manifest, key: str, title: str, ours: bool = True) -> Table | None:
    table = m.paper_results.get(key)
    if not isinstance(table, dict) or not table:
        return None
    metrics: list[str] = []
    for row in table.values():
        for k in row:
            if k not in metrics:
                metrics.append(k)
    t = Table(title=title)
    t.add_column("method", style="bold", no_wrap=True)
    for k in metrics:
        t.add_column(f"{k} (paper)", justify="right")
    for method in _ordered(list(table)):
        row = table[method]
        t.add_row(method, *[f"{row[k]:.4f}" if k in row else "" for k in metrics])
    return t


def show_manifest(m: Manifest, console: Console, hest_dir: Path | None = None) -> None:
    console.print(Text(f"{m.name}: {m.title}", style="bold"))
    info = Table(show_header=False, box=None, pad_edge=False)
    info.add_column(style="cyan", no_wrap=True)
    info.add_column(overflow="fold")
    info.add_row("platform", m.platform)
    info.add_row("format", m.format)
    info.add_row("species", m.species)
    if m.aliases:
        info.add_row("aliases", ", ".join(m.aliases))
    info.add_row(
        "gene selection",
        Text(
            f"top {m.n_hvg} HVGs per sample, {m.combine}"
            + (f"; drop probes matching {m.drop_probes_regex}" if m.drop_probes_regex else "")
        ),
    )
    info.add_row("markers", Text(f"{len(m.markers)}: " + ", ".join(m.markers)))
    if m.reference:
        info.add_row("reference", Text(m.reference))
    if m.path is not None:
        info.add_row("manifest file", Text(str(m.path)))
    console.print(info)

    samples = Table(title="samples")
    samples.add_column("sample id", no_wrap=True)
    samples.add_column("patient", no_wrap=True)
    for s in m.samples:
        samples.add_row(s.id, s.patient)
    console.print(samples)

    res = m.paper_results
    if res:
        if res.get("source"):
            console.print(Text(f"Published numbers: {res['source']}"))
        ds = res.get("dataset")
        if isinstance(ds, dict) and ds:
            parts = [f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in ds.items()]
            console.print(Text("Paper's dataset: " + ", ".join(parts)))
        for key, title in (
            ("table1", "Table 1: top-50 HEG / HVG / marker genes, PCC"),
            ("table2", "Table 2: top 150 / 250 genes, PCC"),
            ("table4", "Table 4: vs the cTransPath foundation model, PCC"),
        ):
            t = _results_table(m, key, title)
            if t is not None:
                console.print(t)
    else:
        console.print(Text("No published numbers for this dataset."))

    if m.notes:
        console.print(Text("Notes: ", style="bold") + Text(m.notes))

    if m.format == "hest":
        console.print(Text("Fetch with HEST's own download instructions (cmrcnet never downloads HEST):", style="bold"))
        # soft_wrap: never wrap code lines, so they can be copied as they are
        console.print(Text(m.fetch_snippet()), soft_wrap=True)
        console.print(
            Text(
                f"Then: cmrcnet datasets {m.name} --check HEST_DIR\n"
                f"      cmrcnet benchmark --data HEST_DIR --dataset {m.name.upper()} "
                "--methods cmrcnet,bleep,stnet,histogene,ridge --split loo-sample --seeds 1,2,3 "
                "--preset paper --out DIR"
            ),
            soft_wrap=True,
        )
    if hest_dir is not None:
        present = check_hest_folder(hest_dir, m)
        console.print(Text(f"{hest_dir}: all {len(present)} samples present ({', '.join(present)})", style="green"))


def datasets(
    name: Optional[str] = typer.Argument(
        None, help="Manifest name (case-insensitive) or path of a manifest YAML file; omit to list all."
    ),
    check: Optional[Path] = typer.Option(
        None, "--check", help="HEST folder to check for this dataset's samples (st/{id}.h5ad)."
    ),
) -> None:
    """List the dataset manifests, or show one: samples, patients, markers, the paper's numbers."""
    console = _console()
    if name is None:
        if check is not None:
            raise typer.BadParameter("--check needs a dataset NAME")
        console.print(_list_table())
        return
    show_manifest(load_manifest(name), console, hest_dir=check)


def register(app: typer.Typer) -> None:
    app.command("datasets")(datasets)

"""Command line: a thin layer over library functions (Typer + rich).

Sub-command modules: ``data`` (info, download, convert), ``datasets`` (manifests), ``encoders``,
``run`` (train, predict, demo), ``bench`` (benchmark, report).
Errors of type :class:`cmrcnet.errors.CmrcnetError` are printed as one line, exit code 2.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from cmrcnet.errors import CmrcnetError

app = typer.Typer(
    name="cmrcnet",
    help="Predict spatially resolved gene expression from H&E histology.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


_registered = False


def _register() -> None:
    """Attach the sub-commands once (idempotent, so tests may call ``main`` repeatedly)."""
    global _registered
    if _registered:
        return
    _registered = True
    from cmrcnet.cli import bench, data, datasets, encoders, run

    app.add_typer(data.app, name="data", help="Inspect, download and convert datasets.")
    datasets.register(app)
    encoders.register(app)
    run.register(app)
    bench.register(app)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings about the user's data are one readable line, not a source excerpt."""
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    import warnings

    warnings.showwarning = _show_warning
    _register()
    try:
        app(args=argv, standalone_mode=True)
    except CmrcnetError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)

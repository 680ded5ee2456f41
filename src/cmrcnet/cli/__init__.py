"""Command line: a thin layer over library functions (Typer + rich).

Sub-command modules: ``data`` (info, download, convert), ``datasets`` (manifests), ``encoders``,
``run`` (train, predict, demo), ``bench`` (benchmark, report).
Errors of type :class:`cmrcnet.errors.CmrcnetError` are printed as one line, exit code 2.
"""

from __future__ import annotations

import signal
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from cmrcnet.errors import CmrcnetError

app = typer.Typer(
    name="cmrcnet",
    help="Predict spatially resolved gene expression from H&E histology.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


class _PipeConsole(Console):
    """When stdout is redirected or piped, lines are not wrapped and each table is rendered as wide
    as its content, so nothing is truncated or folded (``cmrcnet datasets > file``); on a terminal
    it is rich's console."""

    def print(self, *objects, **kwargs) -> None:  # type: ignore[override]
        from rich.measure import Measurement

        if self.is_terminal:
            return super().print(*objects, **kwargs)

        need = 80
        for o in objects:
            if not isinstance(o, str) and hasattr(o, "__rich_measure__"):
                need = max(need, Measurement.get(self, self.options.update_width(1_000_000), o).maximum)
        kwargs.setdefault("soft_wrap", True)
        old = self.width
        self.width = need
        try:
            super().print(*objects, **kwargs)
        finally:
            self.width = old


def stdout_console(**kwargs) -> Console:
    """The console commands print results on (see :class:`_PipeConsole`)."""
    return _PipeConsole(**kwargs)

#: Texts of the warnings already shown: a warning that is also logged (or repeated) prints once.
_shown: set[str] = set()


def _version(value: bool) -> None:
    if value:
        import cmrcnet

        typer.echo(f"cmrcnet {cmrcnet.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Predict spatially resolved gene expression from H&E histology."""


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


def show_warning_once(text: str) -> None:
    """Print ``warning: text`` on stderr unless that text was already shown (as a warning or a log)."""
    text = str(text).strip()
    if text in _shown:
        return
    _shown.add(text)
    err_console.print(Text.assemble(("warning:", "yellow"), " ", text), highlight=False, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings about the user's data are one readable line, not a source excerpt."""
    show_warning_once(str(message))


def _terminate(signum, frame) -> None:
    """SIGTERM / SIGHUP (``kill``, a batch scheduler's time limit): unwind like Ctrl-C, so atomic
    writes remove their temporary files instead of leaving them behind (exit code 130)."""
    sys.stderr.write(f"interrupted: signal {signum}; stopping, no partial output file is kept\n")
    sys.stderr.flush()
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    import warnings

    warnings.showwarning = _show_warning
    _shown.clear()
    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            try:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # keep nohup's ignored SIGHUP
                    previous[sig] = signal.signal(sig, _terminate)
            except ValueError:  # not the main thread (tests calling main from a thread)
                pass
    _register()
    try:
        from typer._click import exceptions as cx
    except ImportError:  # typer releases that use click itself
        from click import exceptions as cx
    try:
        rv = app(args=argv, standalone_mode=False)
    except CmrcnetError as e:
        _error(str(e))
        sys.exit(2)
    except KeyboardInterrupt:  # typer turns it into exit code 130 itself; this is a fallback
        sys.exit(130)
    except cx.UsageError as e:  # a missing or malformed option: one line too, not a usage box
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()
        else:
            cmd = e.ctx.command_path if getattr(e, "ctx", None) is not None else "cmrcnet"
            _error(f"{e.format_message()} (see '{cmd} --help')")
        sys.exit(e.exit_code)
    except cx.ClickException as e:
        _error(e.format_message())
        sys.exit(e.exit_code)
    except cx.Abort:
        _error("aborted")
        sys.exit(1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.exit(rv if isinstance(rv, int) else 0)


def _error(text: str) -> None:
    err_console.print(Text.assemble(("error:", "bold red"), " ", text), highlight=False, soft_wrap=True)

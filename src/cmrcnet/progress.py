"""Progress of long steps (patch cutting, training epochs, whole-slide chunks), on a terminal or not.

On a terminal: a rich progress bar with rate and ETA. Off a terminal (``nohup``, SLURM,
``2> log``): plain log lines on the ``cmrcnet.progress`` logger every
:func:`interval_seconds` (``$CMRCNET_PROGRESS_SECONDS``, default 30 s) and a last line when
the step took longer than that, e.g.::

    12:04:31 predicting: 40,960/182,311 spots (22.5%), 310 spots/s, ETA 7m 36s

The CLI routes that logger to stderr whatever ``--verbose`` says; library users see the
lines when they configure logging at INFO.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Callable, Iterator

log = logging.getLogger("cmrcnet.progress")

#: Default seconds between two plain progress lines.
DEFAULT_INTERVAL = 30.0


def interval_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("CMRCNET_PROGRESS_SECONDS", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def format_duration(seconds: float) -> str:
    """``7m 36s``, ``1h 02m``, ``12s``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {(s % 3600) // 60:02d}m"


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class LineProgress:
    """Plain progress lines with rate and ETA, at most one per ``interval`` seconds."""

    def __init__(self, desc: str, total: int | None, unit: str, interval: float | None = None) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.interval = interval_seconds() if interval is None else interval
        self.done = 0
        self.t0 = self.last = time.monotonic()
        self.lines = 0

    def line(self) -> str:
        dt = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / dt
        if self.total:
            left = max(self.total - self.done, 0)
            eta = format_duration(left / rate) if rate > 0 else "?"
            return (f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.1f}%), "
                    f"{rate:,.1f} {self.unit}/s, ETA {eta}")
        return f"{self.desc}: {self.done:,} {self.unit}, {rate:,.1f} {self.unit}/s"

    def advance(self, n: int = 1) -> None:
        self.done += int(n)
        now = time.monotonic()
        if now - self.last >= self.interval and (self.total is None or self.done < self.total):
            self.last = now
            self.lines += 1
            log.info("%s", self.line())

    def finish(self) -> None:
        dt = time.monotonic() - self.t0
        if self.lines or dt >= self.interval:
            rate = self.done / max(dt, 1e-9)
            log.info("%s: %s %s in %s (%s %s/s)", self.desc, f"{self.done:,}", self.unit, format_duration(dt),
                     f"{rate:,.1f}", self.unit)


@contextlib.contextmanager
def progress_reporter(desc: str, total: int | None, unit: str = "items", console=None,
                      interval: float | None = None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``: a rich bar (rate, ETA) on a terminal, plain log lines off one."""
    if stderr_is_terminal():
        from rich.console import Console
        from rich.errors import LiveError
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskProgressColumn,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task) -> Text:
                return Text(f"{task.speed:,.1f} {unit}/s" if task.speed else f"- {unit}/s")

        con = console if console is not None and console.stderr else Console(stderr=True)
        bar = Progress(TextColumn(desc), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), RateColumn(),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=con, transient=True)
        try:
            bar.start()
        except LiveError:  # another live display is active: fall back to lines
            bar = None
        if bar is not None:
            task = bar.add_task(desc, total=total)
            try:
                yield lambda n=1: bar.advance(task, n)
            finally:
                bar.stop()
            return
    lp = LineProgress(desc, total, unit, interval)
    yield lp.advance
    lp.finish()


class CohortProgress:
    """Progress of a cohort of slides: one bar (or line series) for the current slide and one overall,
    both with rate and ETA; :meth:`slide` starts the next slide, the returned callable advances both."""

    def __init__(self, total: int, unit: str = "spots", console=None) -> None:
        self.total, self.unit, self.console = total, unit, console
        self.bar = None
        self.overall = LineProgress("all slides", total, unit)

    def __enter__(self) -> "CohortProgress":
        if stderr_is_terminal():
            from rich.console import Console
            from rich.errors import LiveError
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            con = self.console if self.console is not None and self.console.stderr else Console(stderr=True)
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TaskProgressColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=con, transient=True)
            try:
                self.bar.start()
                self.all_task = self.bar.add_task("all slides", total=self.total)
                self.slide_task = None
            except LiveError:
                self.bar = None
        return self

    def slide(self, name: str, n: int) -> Callable[[int], None]:
        if self.bar is not None:
            if self.slide_task is not None:
                self.bar.remove_task(self.slide_task)
            self.slide_task = task = self.bar.add_task(name, total=n)

            def advance(k: int = 1) -> None:
                self.bar.advance(task, k)
                self.bar.advance(self.all_task, k)

            return advance
        if getattr(self, "_line", None) is not None:
            self._line.finish()
        self._line = line = LineProgress(name, n, self.unit)

        def advance_lines(k: int = 1) -> None:
            line.advance(k)
            self.overall.advance(k)

        return advance_lines

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif getattr(self, "_line", None) is not None:
            self._line.finish()

"""Progress bars on stderr (rich), switched off when stderr is not a terminal (logs stay clean)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_console = Console(stderr=True)
log = logging.getLogger(__name__)


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s")


class Bar:
    """Handle to one progress bar. Without a terminal, a job of 500 items or more logs a line at every tenth of the
    way instead (a shorter one is over before a log would need signs of life)."""

    def __init__(self, progress: Progress, task_id, description: str, total: int, unit: str):
        self._progress, self._task = progress, task_id
        self._description, self._total, self._unit = description, total, unit
        self._done, self._next_log, self._start = 0, max(1, total // 10), time.perf_counter()
        self._log_lines = progress.disable and total >= 500  # long jobs in logs (clusters, nohup) show signs of life

    def advance(self, n: int = 1, info: str | None = None) -> None:
        """Move the bar on by ``n`` items and optionally replace its free text (e.g. the running loss)."""
        if info is None:
            self._progress.update(self._task, advance=n)
        else:
            self._progress.update(self._task, advance=n, info=info)
        self._done += n
        if self._log_lines and self._done >= self._next_log and self._done < self._total:
            self._next_log += max(1, self._total // 10)
            elapsed = time.perf_counter() - self._start
            rate = self._done / elapsed if elapsed else 0.0
            eta = (self._total - self._done) / rate if rate else float("nan")
            log.info("%s: %d/%d %s, %.1f %s/s, eta %.0f s %s", self._description, self._done, self._total, self._unit,
                     rate, self._unit, eta, info or "")


def _in_notebook() -> bool:
    """Whether a Jupyter kernel can show rich's bar: its stderr is no terminal, and rich draws there with ipywidgets."""
    if not _console.is_jupyter:
        return False
    try:
        import ipywidgets  # noqa: F401 - without it rich only warns, and draws nothing
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def progress_bar(description: str, total: int, unit: str = "it") -> Iterator[Bar]:
    """A bar with count, rate, free text, elapsed time and ETA."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=_console,
        transient=True,
        # Under torchrun, rank 0 only; and none with `cxr -q` ("only warnings and errors"), which sets the cxr
        # logger's own level (a script using cxr as a library leaves it unset, and keeps its bars).
        disable=not (sys.stderr.isatty() or _in_notebook()) or os.environ.get("RANK", "0") != "0"
        or logging.getLogger("cxr").level > logging.INFO,
    )
    with progress:
        yield Bar(progress, progress.add_task(escape(description), total=total, info=""), description, total, unit)

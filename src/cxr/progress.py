"""Progress bars on stderr (rich), switched off when stderr is not a terminal (logs stay clean)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
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


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s")


class Bar:
    """Handle to one progress bar."""

    def __init__(self, progress: Progress, task_id):
        self._progress, self._task = progress, task_id

    def advance(self, n: int = 1, info: str | None = None) -> None:
        """Move the bar on by ``n`` items and optionally replace its free text (e.g. the running loss)."""
        if info is None:
            self._progress.update(self._task, advance=n)
        else:
            self._progress.update(self._task, advance=n, info=info)


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
        disable=not sys.stderr.isatty(),
    )
    with progress:
        yield Bar(progress, progress.add_task(description, total=total, info=""))

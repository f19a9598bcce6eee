"""Progress bars: drawn on a terminal or in a notebook, and otherwise a log line at every tenth of a long job."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from cxr import progress


def _bar_disabled(monkeypatch, *, tty: bool, notebook: bool = False) -> bool:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    monkeypatch.setattr(progress, "_in_notebook", lambda: notebook)
    monkeypatch.setattr(progress._console, "is_jupyter", False)  # drawn nowhere: only the decision is under test
    with progress.progress_bar("x", 3) as bar:
        bar.advance(3)
        return bar._progress.disable


def test_a_bar_shows_on_a_terminal_and_in_a_notebook_only(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert not _bar_disabled(monkeypatch, tty=True)
    assert not _bar_disabled(monkeypatch, tty=False, notebook=True)  # a kernel's stderr is no terminal
    assert _bar_disabled(monkeypatch, tty=False)


def test_no_bar_on_other_ranks_or_under_quiet(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert _bar_disabled(monkeypatch, tty=True)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(logging.getLogger("cxr"), "level", logging.WARNING)  # what `cxr -q` sets
    assert _bar_disabled(monkeypatch, tty=True)


def test_a_notebook_without_ipywidgets_gets_no_bar(monkeypatch):
    # rich draws in Jupyter with ipywidgets; without it, it only warns.
    monkeypatch.setattr(progress._console, "is_jupyter", True)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import fails
    assert not progress._in_notebook()
    monkeypatch.setitem(sys.modules, "ipywidgets", types.ModuleType("ipywidgets"))
    assert progress._in_notebook()
    monkeypatch.setattr(progress._console, "is_jupyter", False)
    assert not progress._in_notebook()


@pytest.mark.parametrize("total, lines", [(499, 0), (500, 9), (1003, 10)])
def test_without_a_terminal_a_long_job_logs_every_tenth(monkeypatch, caplog, total, lines):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setattr(progress, "_in_notebook", lambda: False)
    monkeypatch.delenv("RANK", raising=False)
    caplog.set_level(logging.INFO, logger="cxr")
    with progress.progress_bar("decode", total, unit="img") as bar:
        for _ in range(total):
            bar.advance(info="loss 0.1")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decode:")]
    assert len(logged) == lines  # not at the end: the job's own last line says it is done
    if lines:
        assert logged[0].startswith(f"decode: {total // 10}/{total} img,") and "img/s" in logged[0]
        assert logged[0].endswith("loss 0.1")

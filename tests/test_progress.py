"""Progress bars: drawn on a terminal or in a notebook, and otherwise a log line at every tenth of a long job."""

from __future__ import annotations

import contextlib
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
    # `cxr` without -q sets INFO: bars stay on there (only a level above INFO, -q, turns them off)
    monkeypatch.setattr(logging.getLogger("cxr"), "level", logging.INFO)
    assert not _bar_disabled(monkeypatch, tty=True)


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


def test_a_log_line_gives_the_rate_and_the_time_left_and_the_bar_its_free_text(monkeypatch, caplog):
    # The line at every tenth is all a log has of a long job: its rate and ETA must be of the items done and left,
    # and the bar's free text (training's running loss) must reach the bar, not only the log line.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setattr(progress, "_in_notebook", lambda: False)
    monkeypatch.delenv("RANK", raising=False)
    caplog.set_level(logging.INFO, logger="cxr")
    clock = [0.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    with progress.progress_bar("decode", 1000, unit="img") as bar:
        clock[0] = 1.0  # 100 images in a second
        bar.advance(100, info="loss 0.25")
        assert bar._progress.tasks[0].fields["info"] == "loss 0.25"
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decode:")]
    assert logged == ["decode: 100/1000 img, 100.0 img/s, eta 9 s loss 0.25"]


def test_evaluation_shows_its_progress(monkeypatch, caplog, tmp_path):
    # cxr evaluate of Kermany's 5,232 images had said nothing for 13 minutes: its forward passes have a bar, and
    # without a terminal a line at every tenth.
    import numpy as np
    import torch

    from cxr.demo import SAMPLE_DIR
    from cxr.evaluate import evaluate_model, predict_logits

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setattr(progress, "_in_notebook", lambda: False)
    monkeypatch.delenv("RANK", raising=False)
    caplog.set_level(logging.INFO, logger="cxr")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 2))
    images = np.zeros((600, 16, 16), np.uint8)
    logits = predict_logits(net, images, mean=0.5, std=0.25, device=torch.device("cpu"), batch_size=7,
                            progress="evaluating test")
    assert logits.shape == (600, 2)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluating test:")]
    assert len(logged) == 9 and logged[0].startswith("evaluating test: 63/600 img")  # 9 passes of 7, then a tenth
    caplog.clear()
    predict_logits(net, images, mean=0.5, std=0.25, device=torch.device("cpu"))
    assert not caplog.records  # none asked for (training's validation, predict's own batches)
    shown = []
    real = progress.progress_bar
    monkeypatch.setattr(progress, "progress_bar", lambda name, *a, **k: shown.append(name) or real(name, *a, **k))
    evaluate_model("default", SAMPLE_DIR / "test", tmp_path / "ev", device="cpu")
    assert "evaluating test" in shown


def test_explaining_shows_its_progress(monkeypatch, tmp_path):
    # cxr explain of 50 files had said nothing for minutes: a bar, advanced for each file, readable or not.
    from cxr.demo import SAMPLE_DIR
    from cxr.explain import explain_files

    advanced = []
    real = progress.progress_bar

    @contextlib.contextmanager
    def spy(name, total, *a, **k):
        with real(name, total, *a, **k) as bar:
            monkeypatch.setattr(bar, "advance", lambda n=1, info=None: advanced.append((name, total, n)))
            yield bar

    monkeypatch.setattr(progress, "progress_bar", spy)
    files = sorted((SAMPLE_DIR / "test" / "NORMAL").iterdir())[:2]
    (tmp_path / "bad.jpeg").write_bytes(b"not an image")
    explain_files("default", [*files, tmp_path / "bad.jpeg"], tmp_path / "out", device="cpu")
    assert advanced == [("explain", 3, 1)] * 3

"""A training process SIGKILLed while building the cache, mid-epoch, while writing a checkpoint and while writing the
evaluation, resumed each time with ``cxr train --resume``: the run completes, no file is ever corrupt, and in
``--deterministic`` CPU mode the result equals an uninterrupted run's, bit for bit.

The kills are real (SIGKILL from the kernel to the whole process group); ``crash_driver.py`` only chooses the moment.
Random moments, many more of them, are in ``scripts/crash_campaign.py`` (results in RELIABILITY.md).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cxr.config import load_config
from cxr.data import _read_pack, cache_folder
from cxr.model import load_checkpoint

from .conftest import TINY_TRAIN

DRIVER = Path(__file__).with_name("crash_driver.py")


class Runs:
    """``crash_driver.py --serve``: each run is a forked child that leads its own process group (see the driver)."""

    def __init__(self, log_dir: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(DRIVER.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
        self.log_dir, self.n = log_dir, 0
        # Its own session: a SIGKILL of a child's process group can never reach pytest.
        self.server = subprocess.Popen([sys.executable, str(DRIVER), "--serve"], env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, start_new_session=True)

    def run(self, kill_at: str, argv: list[str], cache: Path) -> tuple[int, str]:
        """Exit status (negative: the signal that ended it) and the log of one ``cxr`` run."""
        self.n += 1
        log = self.log_dir / f"run{self.n}.log"
        request = {"kill_at": kill_at, "argv": [str(a) for a in argv], "env": {"CXR_CACHE_DIR": str(cache)},
                   "log": str(log)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        answer = self.server.stdout.readline()
        assert answer, "the crash driver died"
        return json.loads(answer)["status"], log.read_text()

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


@pytest.fixture
def runs(tmp_path):
    r = Runs(tmp_path)
    yield r
    r.close()


def assert_killed(result: tuple[int, str]) -> str:
    status, log = result
    assert status == -signal.SIGKILL, f"not killed at the hook (exit status {status}): {log[-2000:]}"
    return log


def assert_run_dir_sound(run: Path) -> dict[str, object]:
    """Every file a run directory shows under its own name parses completely; returns what each held."""
    seen: dict[str, object] = {}
    for p in sorted(run.iterdir()):
        if p.name.startswith("."):
            continue  # a temporary file: never read by anything
        if p.suffix == ".pt":
            ckpt = load_checkpoint(p)
            assert all(torch.isfinite(t).all() for t in ckpt.state_dict.values() if t.is_floating_point()), p
            seen[p.name] = ckpt.epoch
        elif p.suffix == ".csv":
            with open(p, newline="") as f:
                rows = list(csv.DictReader(f))
            seen[p.name] = len(rows)
        elif p.suffix == ".yaml":
            seen[p.name] = load_config(p).epochs
        elif p.suffix == ".json":
            seen[p.name] = json.loads(p.read_text())
    return seen


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".*.tmp"))


def cached_images(folder: Path, size: int) -> dict[str, bytes]:
    """digest -> pixels of every image in the folder's finished packs."""
    out = {}
    for pack in sorted(folder.glob("*.npy")):
        digests, images = _read_pack(pack, size)
        out.update({d.tobytes().hex(): im.tobytes() for d, im in zip(digests, images, strict=True)})
    return out


def assert_cache_entries_exact(cache: Path, reference: Path, size: int) -> int:
    """Every image in ``cache``'s finished packs is byte-identical to the uninterrupted run's image."""
    ours, ref = cached_images(cache, size), cached_images(reference, size)
    for digest, pixels in ours.items():
        assert pixels == ref[digest], digest
    return len(ours)


@pytest.mark.slow
def test_sigkill_at_every_stage_then_resume_equals_uninterrupted_run(tmp_path, tiny_dataset, runs):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump({**TINY_TRAIN, "epochs": 3, "deterministic": True}))
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref_cache, cache = tmp_path / "ref-cache", tmp_path / "cache"
    ref_entries = cache_folder(load_config(cfg_file, {"cache_dir": str(ref_cache)}))
    entries = cache_folder(load_config(cfg_file, {"cache_dir": str(cache)}))
    start = ["train", "--config", cfg_file, "--data", tiny_dataset, "--no-report", "--output"]
    resume = ["train", "--resume", run, "--no-report"]

    # The uninterrupted reference.
    status, log = runs.run("none", [*start, ref], ref_cache)
    assert status == 0, log

    # 1. While building the cache: the 2nd pack is half-written when the process group dies.
    size = TINY_TRAIN["image_size"]
    assert_killed(runs.run("cache:2", [*start, run], cache))
    assert assert_cache_entries_exact(entries, ref_entries, size) == 8  # the first pack's 8 images, each exact
    assert len(temporaries(entries)) == 1  # the half-written 2nd pack, under a name no run reads
    assert "last.pt" not in assert_run_dir_sound(run)

    # 1b. While writing last.pt after epoch 1: best.pt (written first) is there, last.pt is not. The resume starts
    # again from epoch 1, as for a run with no checkpoint (it had been refused as a run whose last.pt was deleted).
    assert_killed(runs.run("save:last.pt:1", resume, cache))
    state = assert_run_dir_sound(run)
    assert state["best.pt"] == 1 and "last.pt" not in state

    # 2. While writing last.pt after epoch 2: the half-written file is a temporary one; last.pt still holds epoch 1.
    assert_killed(runs.run("save:last.pt:2", resume, cache))
    state = assert_run_dir_sound(run)
    assert state["last.pt"] == 1 and state["history.csv"] == 1
    assert len(temporaries(run)) == 1
    assert assert_cache_entries_exact(entries, ref_entries, size) == 40  # the cache build finished on resume

    # 3. Mid-epoch: before this process's 5th optimiser step (epochs 2 and 3 have 3 steps each).
    log = assert_killed(runs.run("step:5", resume, cache))
    assert "resuming" in log and "after epoch 1" in log
    state = assert_run_dir_sound(run)
    assert state["last.pt"] == 2 and state["history.csv"] == 2
    assert temporaries(run) == []  # the resumed run removed the partial last.pt of step 2

    # 4. While writing the evaluation: metrics.json is complete under its temporary name, not yet renamed.
    assert_killed(runs.run("replace:metrics.json:1", resume, cache))
    state = assert_run_dir_sound(run)
    assert state["last.pt"] == 3 and "metrics.json" not in state

    # 5. Resumed with no fault: it completes.
    status, log = runs.run("none", resume, cache)
    assert status == 0, log
    assert temporaries(run) == []

    got, want = assert_run_dir_sound(run), assert_run_dir_sound(ref)
    assert got.keys() == want.keys()
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(run / name), load_checkpoint(ref / name)
        assert a.epoch == b.epoch and a.threshold == b.threshold, name
        for k in b.state_dict:
            assert torch.equal(a.state_dict[k], b.state_dict[k]), (name, k)
    assert got["metrics.json"] == want["metrics.json"]
    columns = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_auroc")
    with open(run / "history.csv") as f, open(ref / "history.csv") as g:
        assert [[r[c] for c in columns] for r in csv.DictReader(f)] == [[r[c] for c in columns]
                                                                         for r in csv.DictReader(g)]
    for split in ("train", "val", "test"):
        a = np.genfromtxt(run / f"predictions_{split}.csv", delimiter=",", skip_header=1, usecols=2)
        b = np.genfromtxt(ref / f"predictions_{split}.csv", delimiter=",", skip_header=1, usecols=2)
        assert np.array_equal(a, b)

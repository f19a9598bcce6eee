"""torchrun on the CPU (gloo): 2-process training matches one process with the same global batch; sharded prediction
equals single-process prediction."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxr.model import build_model, load_checkpoint
from cxr.train import seed_everything

from .conftest import make_dataset, read_csv


@pytest.fixture(scope="module", autouse=True)
def _torchrun_temporary_folder(tmp_path_factory):
    """torchrun leaves torchelastic_* folders in the temporary folder: this module's launches use one of their own
    (they had piled up in the machine's /tmp)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp_path_factory.mktemp("torchrun-tmp")))
        yield

# 24 training images after the carve, global batch 8: 3 steps per epoch, 2 epochs.
FLAGS = ["--image-size", "32", "--batch-size", "8", "--epochs", "2", "--weights", "none", "--patience", "0",
         "--device", "cpu", "--seed", "0", "--no-report"]
CONFIG = "val_fraction: 0.25\nwarmup_epochs: 0.5\neval_batch_size: 32\n"


# `cxr` with batch norm frozen (eval-mode statistics, as when fine-tuning). On the CPU each process normalises with
# its own half batch's statistics (SyncBatchNorm is CUDA-only), which alone moves a 6-step run by ~30 % of its update
# (measured); frozen, everything else about DDP (sampler, per-image augmentation seeds, loss normalisation over the
# global batch, gradient averaging) must match the single process up to float summation order.
FROZEN_BN_CXR = """
import sys
from torch import nn
import cxr.train
from cxr.cli import main

build = cxr.train.build_model

def frozen_bn_model(*args, **kwargs):
    model = build(*args, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train = lambda mode=True, m=m: nn.Module.train(m, False)
    return model

cxr.train.build_model = frozen_bn_model
sys.exit(main(sys.argv[1:]))
"""


def _run(args: list[str], nproc: int = 1, script=None) -> subprocess.CompletedProcess:
    """``cxr ARGS`` (or ``python SCRIPT ARGS``), under torchrun with ``nproc`` > 1."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    target = [str(script)] if script else ["-m", "cxr"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run([*launcher, *target, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def _update(run) -> dict[str, torch.Tensor]:
    """What training changed: final weights minus the (seeded, hence shared) initial weights."""
    seed_everything(0)
    init = build_model("densenet121", "none").state_dict()
    final = load_checkpoint(run / "last.pt").state_dict
    return {k: final[k].double() - init[k].double() for k in init if init[k].is_floating_point()}


def _relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)
    den = sum(float((b[k] ** 2).sum()) for k in b)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = make_dataset(root / "data")
    config = root / "tiny.yaml"
    config.write_text(CONFIG)
    script = root / "frozen_bn_cxr.py"
    script.write_text(FROZEN_BN_CXR)
    common = ["train", "--data", data, "--config", config, "--cache-dir", root / "cache"]
    single = root / "single"
    _run([*common, "--output", single, *FLAGS], script=script)
    ddp = root / "ddp"
    proc = _run([*common, "--output", ddp, *FLAGS], nproc=2, script=script)
    # The classic DDP mistake, as a control: the batch size taken per process, so the global batch doubles.
    doubled = root / "doubled"
    _run([*common, "--output", doubled, *FLAGS, "--batch-size", "16"], script=script)
    return data, single, ddp, doubled, proc, script


def test_two_processes_match_one_with_the_same_global_batch(runs):
    _, single, ddp, doubled, _, _ = runs
    # Tolerance: the weights' change over the run (final minus the shared seeded initial weights) may differ by 15 %
    # of its norm; measured 7.8 % in bf16 (1.6 % after one step: Adam's first steps are ~lr * sign(gradient), so the
    # few weights whose gradient is ~0 flip with float summation order), 0.43 % in fp32. The control differs by 73 %.
    d_ddp = _relative_distance(_update(ddp), _update(single))
    d_doubled = _relative_distance(_update(doubled), _update(single))
    assert d_ddp < 0.15, d_ddp
    assert d_doubled > 0.5, d_doubled
    h1, h2 = read_csv(single / "history.csv"), read_csv(ddp / "history.csv")
    assert len(h1) == len(h2) == 2
    for a, b in zip(h1, h2, strict=True):  # measured: within 0.15 %
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=0.01)
        assert float(b["val_loss"]) == pytest.approx(float(a["val_loss"]), rel=0.01)
        assert float(b["lr"]) == pytest.approx(float(a["lr"]), rel=1e-6)


def test_only_rank_zero_writes_and_the_run_completes(runs):
    data, _, ddp, _, proc, script = runs
    # Each split's pixels were prepared once for the node, into one file that both ranks mapped.
    assert len(list((Path(data).parent / "cache").glob("v*/splits/*.npy"))) == 3  # train, val, test
    assert "no shared copy" not in proc.stderr and "damaged shared copy" not in proc.stderr
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["stop_reason"] == "finished 2 epochs"
    assert proc.stderr.count("epoch 2/2  lr") == 1  # one log line per epoch, from rank 0
    assert not [f for f in ddp.iterdir() if f.name.startswith(".")]  # no temporary files left behind
    # --resume under torchrun extends the run.
    _run(["train", "--resume", ddp, "--epochs", "3", "--no-report"], nproc=2, script=script)
    assert load_checkpoint(ddp / "last.pt").epoch == 3
    assert len(read_csv(ddp / "history.csv")) == 3
    # Weight averaging under torchrun: every rank averages, rank 0 alone recomputes batch norm and decides.
    proc = _run(["train", "--resume", ddp, "--swa-epochs", "1", "--no-report"], nproc=2, script=script)
    assert proc.stderr.count("weight average of epoch 4:") == 1
    assert load_checkpoint(ddp / "swa.pt").extra["averaged_epochs"] == [4, 4]
    assert json.loads((ddp / "summary.json").read_text())["swa"]["last_epoch"] == 4


def test_sharded_prediction_under_torchrun_equals_one_process(runs, tmp_path):
    data, single, _, _, _, _ = runs
    # In fp32: bf16, predict's default where the CPU is fast at it (AVX512-BF16, AMX), moved P by 1.3e-4 when a
    # shard's batches held other images. Equal to float precision then (the last digits can move; SCALING.md).
    _run(["predict", "--model", single, data, "--output", tmp_path / "one.json", "--device", "cpu", "--amp", "off"])
    _run(["predict", "--model", single, data, "--output", tmp_path / "two.json", "--device", "cpu", "--amp", "off"],
         nproc=2)
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert two["note"] == one["note"] and len(two["predictions"]) == len(one["predictions"]) > 0
    for a, b in zip(two["predictions"], one["predictions"], strict=True):
        assert {k: v for k, v in a.items() if k != "prob_pneumonia"} == {
            k: v for k, v in b.items() if k != "prob_pneumonia"}
        assert a["prob_pneumonia"] == pytest.approx(b["prob_pneumonia"], abs=1e-5)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["one.json", "two.json"]  # the shard files were merged


def test_a_dataset_error_under_torchrun_is_one_line_on_every_rank(tmp_path):
    # The first rank prepares the data while the others wait. Before, when it stopped with a one-line DataError, the
    # others died at the barrier with gloo's "Connection closed by peer" traceback.
    import shutil

    data = make_dataset(tmp_path / "data")
    shutil.rmtree(data / "train" / "PNEUMONIA")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run([*launcher, "-m", "cxr", "train", "--data", str(data), "--output", str(tmp_path / "run"),
                           *FLAGS], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert proc.returncode != 0
    assert "class folder PNEUMONIA/ is missing" in proc.stderr
    assert "stopping, because a node's first rank could not prepare the data" in proc.stderr
    # torchrun's own launcher then reports the failed children (with a traceback of its own); before that, the two
    # ranks' output holds no traceback.
    ours = proc.stderr[:proc.stderr.index("torch/distributed/elastic")]
    assert "Traceback" not in ours and "Connection closed" not in ours, ours
    assert ours.count("cxr train: error:") == 2, ours


# Rank 1 sees other data than rank 0, as a second node with its own copy of --data can: one training image fewer, or a
# validation split without PNEUMONIA.
OTHER_DATA_CXR = """
import dataclasses
import os
import sys
import cxr.train
from cxr.cli import main

split_dataset = cxr.train.split_dataset

def other_data(*args, **kwargs):
    splits = split_dataset(*args, **kwargs)
    if os.environ["RANK"] == "1":
        name = sys.argv[1]
        kept = splits[name].samples[1:] if name == "train" else [s for s in splits[name].samples if s.label == 0]
        splits[name] = dataclasses.replace(splits[name], samples=kept)
    return splits

cxr.train.split_dataset = other_data
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(("lost", "said"), [
    ("train", "process 1 prepared a different train split: 23 images against rank 0's 24 images"),
    ("val", "process 1 prepared a different val split: 4 images against rank 0's 8 images")])
def test_ranks_that_prepared_different_data_stop_alike_before_training(tmp_path, lost, said):
    # Each node prepares its own copy of --data and nothing compared them: a node with an extra image trained on
    # another split (exit 0); a node whose val split lost a class stopped with one line while rank 0 died with gloo's
    # "Connection closed by peer" traceback.
    script = tmp_path / "other_data.py"
    script.write_text(OTHER_DATA_CXR)
    data = make_dataset(tmp_path / "data")
    (tmp_path / "tiny.yaml").write_text(CONFIG)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.Popen([*launcher, str(script), lost, "train", "--data", str(data), "--output",
                             str(tmp_path / "run"), "--config", str(tmp_path / "tiny.yaml"), *FLAGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "CXR_DIST_TIMEOUT": "60"})
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the job hung")
    assert proc.returncode != 0
    ours = stderr[:stderr.find("torch/distributed/elastic")]
    assert ours.count(f"cxr train: error: {said}; the data differ between nodes") == 2, ours  # rank 0 and rank 1
    assert "Traceback" not in ours and "Connection closed" not in ours, ours
    assert "epoch 1/2" not in ours  # nothing trained
    assert not (tmp_path / "run").exists()  # a new run refused for its data leaves no run directory


# A rank that fails in the middle of training: here rank 1's third optimiser step.
FAILING_RANK_CXR = """
import os
import sys
import torch
from cxr.cli import main

step = torch.optim.Adam.step
calls = []

def failing_step(self, *args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        raise RuntimeError("CUDA out of memory (injected on rank 1)")
    return step(self, *args, **kwargs)

torch.optim.Adam.step = failing_step
sys.exit(main(sys.argv[1:]))
"""


def _scripted_run(tmp_path: Path, name: str, text: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a 2-process ``train`` run by ``text`` (a script standing in for cxr, with a
    fault injected) on a tiny dataset in ``tmp_path``."""
    script = tmp_path / name
    script.write_text(text)
    data = make_dataset(tmp_path / "data")
    (tmp_path / "tiny.yaml").write_text(CONFIG)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    argv = [*launcher, str(script), "train", "--data", str(data), "--output", str(tmp_path / "run"), "--config",
            str(tmp_path / "tiny.yaml"), *FLAGS]
    return argv, {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "CXR_DIST_TIMEOUT": "60"}


def test_a_rank_that_fails_mid_run_ends_the_job_at_once(tmp_path):
    # The failing rank waited at shutdown's barrier while the other waited in the gradients' all-reduce: the job hung,
    # without a word, for CXR_DIST_TIMEOUT (two hours by default). Now the failing rank leaves and torchrun ends
    # the other at once; a hang here runs into the test's 90 s limit.
    argv, env = _scripted_run(tmp_path, "failing.py", FAILING_RANK_CXR)
    # Its own process group, so that a hang (the regression) is ended whole: the ranks are torchrun's children.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env)
    try:
        _, stderr = proc.communicate(timeout=90)  # about 8 s when it works
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the job did not end when rank 1 failed")
    assert proc.returncode != 0
    assert "injected on rank 1" in stderr


# Rank 1's second batch becomes NaN (its inputs, as a bad image or an overflow would make them).
NAN_ON_RANK_1_CXR = """
import os
import sys
import cxr.train
from cxr.cli import main

normalize = cxr.train.normalize
calls = []

def poisoned(x, *args, **kwargs):
    calls.append(1)
    out = normalize(x, *args, **kwargs)
    return out * float("nan") if os.environ["RANK"] == "1" and len(calls) == 2 else out

cxr.train.normalize = poisoned
sys.exit(main(sys.argv[1:]))
"""


def test_a_nan_loss_on_one_rank_is_said_as_nan_on_every_rank(tmp_path):
    # Rank 0, whose own loss was finite, had said "the training loss became 1.2839770317077637 at epoch 1, step 2".
    argv, env = _scripted_run(tmp_path, "nan.py", NAN_ON_RANK_1_CXR)
    # Both ranks stop at the same step; torchrun ends the other as soon as it sees the first gone (its agent looks
    # every 0.1 s), which had cut the second's line off in one CI run of this 2-core machine: it looks every 15 s here
    # (at 5 s, a whole suite's run on the 2-core machine still saw one line once, in session 27).
    argv[4:4] = ["--monitor-interval=15"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if "the training loss became" in line]
    assert len(said) == 2 and all("became nan at epoch 1, step 2;" in line for line in said), proc.stderr[-3000:]


# Rank 1 finds no shared copy of the splits (as where its node's first rank could not write one).
NO_SHARED_COPY_ON_RANK_1_CXR = """
import os
import sys
import cxr.data
from cxr.cli import main

open_shared = cxr.data._open_shared
cxr.data._open_shared = lambda *a, **kw: None if os.environ["RANK"] == "1" else open_shared(*a, **kw)
sys.exit(main(sys.argv[1:]))
"""


def test_warnings_every_rank_finds_alike_are_said_once_and_a_ranks_own_with_its_rank(tmp_path):
    # Non-main ranks logged from WARNING: "1 unreadable image(s) skipped" came once per process.
    script = tmp_path / "no_shared_copy.py"
    script.write_text(NO_SHARED_COPY_ON_RANK_1_CXR)
    data = make_dataset(tmp_path / "data")
    (data / "train" / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "tiny.yaml").write_text(CONFIG)
    proc = _run(["train", "--data", data, "--output", tmp_path / "run", "--config", tmp_path / "tiny.yaml", *FLAGS,
                 "--epochs", "1"], nproc=2, script=script)
    assert proc.stderr.count("1 unreadable image(s) skipped") == 1, proc.stderr
    assert proc.stderr.count("no shared copy of the train split") == 1
    assert "rank 1: no shared copy of the train split" in proc.stderr


def test_one_image_per_process_is_refused_where_batch_norm_is_per_process(tmp_path):
    data = make_dataset(tmp_path / "data")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run([*launcher, "-m", "cxr", "train", "--data", str(data), "--output", str(tmp_path / "run"),
                           *FLAGS, "--batch-size", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0  # torchrun's own status: 1 when a child fails
    assert "1 image per process; batch norm needs two: use --batch-size 4 or more" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("batch", "said"), [
    # the counts that work, not "a count that divides 5", which led to 5 processes of 1 image, refused in turn
    (5, "this run's global batch (5, in its config.yaml) cannot be split over 2 processes; resume it with a single "
        "process"),
    (2, "this run's global batch (2, in its config.yaml) over 2 processes is 1 image per process; batch norm needs "
        "two: resume it with a single process"),
    (9, "this run's global batch (9, in its config.yaml) cannot be split over 2 processes; resume it with 1 or 3 "
        "processes")])
def test_a_resume_whose_batch_does_not_split_over_the_processes_asks_for_another_count(tmp_path, batch, said):
    # It had asked for another --batch-size, which --resume refuses.
    from cxr.config import load_config, save_config

    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "data").mkdir()
    save_config(load_config(overrides={"data": str(tmp_path / "data"), "output": str(run), "batch_size": batch,
                                       "weights": "none", "device": "cpu"}), run / "config.yaml")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run([*launcher, "-m", "cxr", "train", "--resume", str(run)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert proc.returncode != 0
    assert proc.stderr.count(f"cxr train: error: {said}") == 1, proc.stderr  # said by rank 0


def test_the_process_group_waits_for_a_rank_building_the_cache(monkeypatch):
    # NCCL gives up on a collective after 10 minutes by default, while local rank 0 may build the cache alone for 20:
    # the group is made with CXR_DIST_TIMEOUT seconds (two hours by default).
    import datetime

    import torch.distributed as dist

    import cxr.distributed as d
    from cxr.errors import UsageError

    calls = []
    monkeypatch.setattr(d, "_OURS", False)  # put back after the test: no group was really started here
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    d.init(torch.device("cpu"))
    assert calls == [("gloo", {"timeout": datetime.timedelta(hours=2)})]
    monkeypatch.setenv("CXR_DIST_TIMEOUT", "90")
    assert d.dist_timeout() == datetime.timedelta(seconds=90)
    monkeypatch.setenv("CXR_DIST_TIMEOUT", str(d.MAX_DIST_TIMEOUT))  # the bound itself is allowed, as the error says
    assert d.dist_timeout() == datetime.timedelta(weeks=1)
    for bad in ("0", "soon", "nan", "9.3e9"):  # the last passed, then broke torch's store with a C++ trace
        monkeypatch.setenv("CXR_DIST_TIMEOUT", bad)
        with pytest.raises(UsageError, match="CXR_DIST_TIMEOUT"):
            d.dist_timeout()


def test_a_rank_on_cuda_joins_with_nccl_on_its_local_gpu_and_its_group_is_cxrs_to_end(monkeypatch):
    # A second node's rank 3 (local rank 1) takes its node's GPU 1, not GPU 3 (no such GPU there), joins with NCCL,
    # and the group it started is cxr's: shutdown() waits for the others, then ends it (with failed=True at once).
    import torch.distributed as dist

    import cxr.distributed as d

    calls = []
    monkeypatch.setattr(d, "_OURS", False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(str(device)))
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    info, device = d.init(torch.device("cuda"))
    assert (info, str(device), calls) == (d.DistInfo(3, 4, 1), "cuda:1", ["cuda:1", "nccl"]) and d._OURS
    monkeypatch.setattr(d, "_started", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    calls.clear()
    d.shutdown()
    assert calls == ["barrier", "destroy"] and not d._OURS
    d._OURS = True
    calls.clear()
    d.shutdown(failed=True)  # the others wait in another collective: a barrier would never end
    assert calls == ["destroy"]


def test_a_second_nodes_first_rank_prepares_its_nodes_data_and_does_not_write(monkeypatch):
    # The node's local rank 0 runs the block first, whatever its global rank, and says when it failed; only global
    # rank 0 writes. Global ranks in their place had been right on one node only.
    import cxr.distributed as d
    from cxr.errors import CxrError

    for name, value in (("RANK", "2"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    info = d.env_info()
    assert info == d.DistInfo(2, 4, 0) and info.active and not info.main
    events = []
    failed_somewhere = [False]
    monkeypatch.setattr(d, "_any_rank", lambda flag: events.append(flag) or flag or failed_somewhere[0])
    with d.local_main_first(info):
        events.append("block")
    assert events == ["block", False]  # first the block, then the collective the others wait in
    events.clear()
    with pytest.raises(ValueError), d.local_main_first(info):
        events.append("block")
        raise ValueError("a dataset it cannot use")
    assert events == ["block", True]  # the others are told
    events.clear()
    second = d.DistInfo(3, 4, 1)
    with d.local_main_first(second):
        events.append("block")
    assert events == [False, "block"]  # after the node's first rank
    failed_somewhere[0] = True
    with pytest.raises(CxrError, match="rank 3: stopping, because a node's first rank could not prepare"), \
            d.local_main_first(second):
        events.append("not run")
    assert "not run" not in events


def test_a_ranks_own_warning_names_its_rank_on_rank_0_too(monkeypatch, caplog):
    # Under torchrun every rank's own warning says which rank had it, rank 0's as well (its node's disk, say).
    import logging

    import cxr.distributed as d

    logger = logging.getLogger("cxr.test_own_warning")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.INFO, logger="cxr"):
        d.own_warning(logger, "cache disk full on %s", "node0")
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert said == [(d.OWN_WARNING, "rank 0: cache disk full on node0")]
    caplog.clear()
    monkeypatch.setenv("WORLD_SIZE", "1")
    with caplog.at_level(logging.INFO, logger="cxr"):
        d.own_warning(logger, "cache disk full")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, "cache disk full")]


def test_a_process_group_cxr_did_not_start_is_left_alone(monkeypatch):
    # cxr.train.train ended with shutdown(), which destroyed any process group: a notebook's own as well.
    import socket

    import torch.distributed as dist

    import cxr.distributed as d

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(d, "_OURS", False)
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        d.shutdown()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_leaving_after_a_ctrl_c_during_import_torch_is_no_second_traceback(monkeypatch):
    # A Ctrl-C in the first second of `cxr predict` left torch half-imported; leaving the (never started) process
    # group imported it again and raised ("partially initialized module 'torch'") over "interrupted".
    import cxr.distributed as d

    monkeypatch.setitem(sys.modules, "torch.distributed", None)  # its import now raises, as a half-import does
    assert d._started() is False
    d.shutdown(failed=True)


def test_each_predicting_rank_takes_its_own_gpu(monkeypatch):
    # `torchrun --nproc-per-node 4 -m cxr predict`: every rank had resolved "auto" to torch.device("cuda"), GPU 0.
    from cxr.distributed import rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    assert [rank_device(d) for d in ("auto", "cuda", "cuda:2", "cpu")] == ["cuda:1", "cuda:1", "cuda:2", "cpu"]
    monkeypatch.setenv("LOCAL_RANK", "3")  # four processes, two GPUs: they share them
    assert rank_device("auto") == "cuda:1"
    for name, value in (("RANK", "3"), ("LOCAL_RANK", "0")):  # a second node's first rank: its node's GPU 0
        monkeypatch.setenv(name, value)
    assert rank_device("auto") == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("auto") == "auto"
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rank_device("auto") == "auto"

"""Faults and hostile files: a full or read-only disk while writing checkpoints and results, NaN and infinite losses,
and checkpoints built to run code when unpickled. Each test checks what the user sees (one clear line) and what is
left on disk (the last good checkpoint, unchanged; nothing half-written).

Disk full and read-only are real where the machine allows it (root with mount rights: a small tmpfs, remounted
read-only), and simulated otherwise (an ``OSError`` with the same errno raised where the library writes).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cxr.train
from cxr.cli import main as cxr_main
from cxr.config import load_config
from cxr.errors import CheckpointError, UsageError, WriteError
from cxr.fileio import atomic_write_text
from cxr.model import Checkpoint, build_model, load_checkpoint, read_state_dict_file, save_checkpoint
from cxr.train import TrainingError, train, train_one_epoch

from .conftest import TINY_TRAIN


def tiny(data: Path, out: Path, **kw):
    return load_config(overrides={**TINY_TRAIN, "data": str(data), "output": str(out), **kw})


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finite(ckpt: Checkpoint) -> bool:
    return all(torch.isfinite(t).all() for t in ckpt.state_dict.values() if t.is_floating_point())


def no_temporaries(folder: Path) -> bool:
    return not any(folder.rglob(".*.tmp"))


def _mount_tmpfs(where: Path, size_mb: int) -> str | None:
    """Mount a tmpfs of ``size_mb`` at ``where``; None, or why it cannot be done here."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "needs root and mount(8)"
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else f"mount failed: {proc.stderr.strip()}"


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size_mb) -> Path or None``: a real small file system (None where mounting is not allowed: why, in
    ``mount.why``)."""
    mounted = []

    def mount(size_mb: int) -> Path | None:
        where = tmp_path / f"fs{len(mounted)}"
        mount.why = _mount_tmpfs(where, size_mb)  # a test that skips says why (root without mount rights: a container)
        if mount.why is not None:
            return None
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_under_the_shared_split_file_falls_back_not_sigbus(tmpfs, caplog):
    # The torchrun split file was a sparse memory map: on a full disk the first write to a page killed the process
    # with SIGBUS, without a word. Now its blocks are reserved first and a full disk falls back to memory.
    from cxr.demo import SAMPLE_DIR

    fs = tmpfs(1)
    if fs is None:
        pytest.skip(f"a small tmpfs cannot be mounted here: {tmpfs.why}")
    # 16 images at 400 px, 160 kB each: more than the 1 MB file system holds. In a child process: a SIGBUS there
    # fails this test instead of killing the test run.
    code = ("import sys; from cxr.config import load_config; from cxr.data import prepare_shared, scan; "
            f"cfg = load_config(overrides={{'image_size': 400, 'cache_dir': {str(fs / 'cache')!r}}}); "
            f"p = prepare_shared(scan({str(SAMPLE_DIR / 'test')!r})['test'], cfg, build=True); "
            "print(type(p.images).__name__, len(p.labels))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]  # -7 (SIGBUS) before
    assert proc.stdout.split() == ["ndarray", "16"]
    assert "cannot write the shared copy of the test split" in proc.stderr and "No space left" in proc.stderr
    assert not list((fs / "cache").rglob("splits/*.npy")) and not list((fs / "cache").rglob("splits/.*.tmp"))


def _remount_read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)


# ------------------------------------------------------------------------------------------------ disk full


def test_disk_full_while_writing_a_checkpoint_stops_cleanly_and_the_run_resumes(tmp_path, tiny_dataset, tmpfs, capsys):
    """Epoch 1's checkpoints fit, epoch 2's last.pt does not: one line naming the file and the cause, exit 1, last.pt
    still epoch 1 byte for byte, no temporary file left; once there is room, --resume finishes the run."""
    # best.pt is 28 MB and last.pt (with Adam's state) 84 MB: 150 MB holds epoch 1's pair but not a second last.pt.
    fs = tmpfs(150)
    run = (fs if fs is not None else tmp_path) / "run"
    seen = {}
    real_save, real_open = cxr.train._save_epoch, builtins.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        if "w" in mode and isinstance(file, str | os.PathLike) and Path(file).name.startswith(".last.pt."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        def save_epoch(run_dir, model, *args, **kwargs):
            if args[3]["epoch"] == 2:
                seen["last.pt"] = digest(run_dir / "last.pt")
                if fs is None:  # simulated: the write of last.pt fails as on a full disk
                    mp.setattr(builtins, "open", full_disk_open)
            return real_save(run_dir, model, *args, **kwargs)

        mp.setattr(cxr.train, "_save_epoch", save_epoch)
        code = cxr_main(["train", "--data", str(tiny_dataset), "--output", str(run), "--epochs", "2", "--batch-size",
                         "8", "--image-size", "32", "--val-fraction", "0.25", "--patience", "0", "--device", "cpu",
                         "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("cxr train: error: cannot write ") and "last.pt: No space left on device" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert digest(run / "last.pt") == seen["last.pt"] and load_checkpoint(run / "last.pt").epoch == 1
    assert finite(load_checkpoint(run / "best.pt"))
    assert no_temporaries(run)

    if fs is not None:  # make room, as a user would
        subprocess.run(["mount", "-o", "remount,size=400m", str(fs)], check=True, capture_output=True)
    assert cxr_main(["train", "--resume", str(run), "--no-report"]) == 0
    assert load_checkpoint(run / "last.pt").epoch == 2 and (run / "metrics.json").is_file()


def test_read_only_output_refuses_with_one_line_and_keeps_the_old_files(tmp_path, tiny_dataset, tmpfs, monkeypatch,
                                                                         capsys):
    """A checkpoint, metrics.json and a new run directory on a read-only file system: WriteError naming the path and
    the cause; the files that were there are unchanged."""
    fs = tmpfs(200)
    out = fs if fs is not None else tmp_path / "out"
    out.mkdir(exist_ok=True)
    torch.manual_seed(0)
    cfg = load_config(overrides={"image_size": 32})
    ckpt = Checkpoint("densenet121", build_model("densenet121", "none").state_dict(), cfg, epoch=1)
    save_checkpoint(ckpt, out / "best.pt")
    atomic_write_text(out / "metrics.json", "{}\n")
    before = {p.name: digest(p) for p in out.iterdir()}

    if fs is not None:
        _remount_read_only(fs)
        expect = errno.EROFS
    elif os.geteuid() != 0:
        out.chmod(0o555)
        expect = errno.EACCES
    else:  # root without mount rights: permission bits do not stop root, so the refusal is simulated
        import tempfile

        real_mkstemp, real_mkdir = tempfile.mkstemp, os.mkdir

        def inside(path) -> bool:
            return Path(path).resolve().is_relative_to(out.resolve())

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and inside(dir):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real_mkstemp(*args, dir=dir, **kwargs)

        def mkdir(path, *args, **kwargs):
            if inside(path):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "mkdir", mkdir)
        expect = errno.EROFS
    try:
        for write in (lambda: save_checkpoint(ckpt, out / "best.pt"),
                      lambda: atomic_write_text(out / "metrics.json", '{"new": 1}\n')):
            with pytest.raises(WriteError) as e:
                write()
            assert e.value.errno == expect and str(e.value).startswith(f"cannot write {out}/")
            assert os.strerror(expect) in str(e.value)

        # The same through the command line: a new run directory inside it.
        code = cxr_main(["train", "--data", str(tiny_dataset), "--output", str(out / "run"), "--device", "cpu",
                         "--no-report"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and err[-1].startswith(f"cxr train: error: cannot write {out}/run")
        assert "Traceback" not in "\n".join(err)

        # And an evaluation report (metrics.json, predictions) into the folder that holds the old one.
        code = cxr_main(["evaluate", "--model", str(out / "best.pt"), "--data", str(tiny_dataset / "test"), "--output",
                         str(out), "--device", "cpu", "--no-report"])
        err = capsys.readouterr().err.strip().splitlines()
        # It names the folder itself: it is refused before anything is predicted (cxr.fileio.check_writable).
        assert code == 1 and err[-1] == f"cxr evaluate: error: cannot write {out}: {os.strerror(expect)}"
        assert "Traceback" not in "\n".join(err)
        assert {p.name: digest(p) for p in out.iterdir()} == before
    finally:
        if fs is None and os.geteuid() != 0:
            out.chmod(0o755)


# ----------------------------------------------------------------------------------------------- NaN and inf


def _poison_batches(monkeypatch, which: set[int]) -> None:
    """Make the listed training batches (counted from 1 over the whole run) all NaN after normalisation."""
    real = cxr.train.normalize
    calls = [0]

    def normalize(x, *args, **kwargs):
        calls[0] += 1
        out = real(x, *args, **kwargs)
        return out * float("nan") if calls[0] in which else out

    monkeypatch.setattr(cxr.train, "normalize", normalize)


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, tiny_dataset, monkeypatch, capsys):
    run = tmp_path / "run"
    _poison_batches(monkeypatch, {4})  # epoch 2, step 1 (3 steps per epoch)
    saved = {}
    real_save = cxr.train._save_epoch

    def save_epoch(run_dir, *args, **kwargs):
        real_save(run_dir, *args, **kwargs)
        saved.update({name: digest(run_dir / name) for name in ("best.pt", "last.pt")})

    monkeypatch.setattr(cxr.train, "_save_epoch", save_epoch)
    code = cxr_main(["train", "--data", str(tiny_dataset), "--output", str(run), "--epochs", "3", "--batch-size", "8",
                     "--image-size", "32", "--val-fraction", "0.25", "--device", "cpu", "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1] == ("cxr train: error: the training loss became nan at epoch 2, step 1; stopped, leaving the "
                       "checkpoints of earlier epochs, if any, as they were; train again into a new --output with a "
                       "lower --lr, or with nan_policy: skip in a --config file")
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(run / name)
        assert ckpt.epoch == 1 and finite(ckpt) and digest(run / name) == saved[name]
    assert (run / "history.csv").read_text().count("\n") == 2  # header and epoch 1
    assert not (run / "metrics.json").exists()


def test_infinite_loss_stops_before_the_step(tiny_dataset):
    """An infinite loss (not NaN) is caught as well, before it reaches the weights."""
    model, loader, cfg = _one_epoch_setup(tiny_dataset)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class InfLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, y):
            return super().forward(logits, y) * float("inf")

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(TrainingError, match=r"the training loss became inf at epoch 1, step 1"):
        _epoch(model, loader[:1], cfg, optimizer, criterion=InfLoss(reduction="sum"))
    # Only batch-norm running statistics moved (the forward pass ran); no parameter was stepped.
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def _one_epoch_setup(tiny_dataset, nan_policy: str = "stop"):
    from cxr.data import prepare, scan

    cfg = load_config(overrides={**TINY_TRAIN, "data": str(tiny_dataset), "scheduler": "none", "batch_size": 4,
                                 "nan_policy": nan_policy})
    prepared = prepare(scan(tiny_dataset)["train"], cfg)
    x = torch.from_numpy(prepared.images[:16]).unsqueeze(1)
    y = torch.from_numpy(prepared.labels[:16])
    loader = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
    torch.manual_seed(0)
    return build_model("densenet121", "none"), loader, cfg


def _epoch(model, loader, cfg, optimizer, criterion=None):
    criterion = criterion or torch.nn.CrossEntropyLoss(reduction="sum")
    return train_one_epoch(model, loader, criterion, optimizer, cfg=cfg, device=torch.device("cpu"), bf16=False,
                           channels_last=False, epoch=0, steps_per_epoch=len(loader), total_steps=len(loader))


@pytest.mark.parametrize("fault", ["nan-input", "inf-gradient"])
def test_skipped_batch_leaves_exactly_the_state_of_a_run_without_it(tiny_dataset, fault):
    """nan_policy: skip. Batches 1, bad, 3, 4 give bit for bit the weights, batch-norm statistics and optimiser state
    of batches 1, 3, 4: no step, and the forward pass's update of the running statistics undone."""
    torch.use_deterministic_algorithms(True)
    try:
        model_a, loader, cfg = _one_epoch_setup(tiny_dataset, "skip")
        model_b = build_model("densenet121", "none")
        model_b.load_state_dict(model_a.state_dict())
        opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-3)
        opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-3)

        flag = {"on": False}

        class Batches(list):  # tells the gradient hook which batch is running
            def __iter__(self):
                for i, batch in enumerate(list.__iter__(self)):
                    flag["on"] = i == 1
                    yield batch

        bad_x, bad_y = loader[1]
        if fault == "nan-input":
            bad = (bad_x.float() * float("nan"), bad_y)  # NaN activations: they would poison the running statistics
        else:
            bad = (bad_x, bad_y)  # a finite loss, but an infinite gradient on the classifier
            model_a.classifier.weight.register_hook(lambda g: g * float("inf") if flag["on"] else g)
        out_a = _epoch(model_a, Batches([loader[0], bad, loader[2], loader[3]]), cfg, opt_a)
        flag["on"] = False
        out_b = _epoch(model_b, [loader[0], loader[2], loader[3]], cfg, opt_b)
    finally:
        torch.use_deterministic_algorithms(False)
    assert out_a["skipped_batches"] == 1 and out_b["skipped_batches"] == 0
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for k in sb:
        assert torch.equal(sa[k], sb[k]), k
    for pa, pb in zip(opt_a.state.values(), opt_b.state.values(), strict=True):
        assert all(torch.equal(pa[k], pb[k]) for k in pb)


def test_skip_policy_run_completes_and_counts_the_skipped_batch(tmp_path, tiny_dataset, monkeypatch, caplog):
    import json

    _poison_batches(monkeypatch, {2})
    run = train(tiny(tiny_dataset, tmp_path / "run", nan_policy="skip"))
    assert json.loads((run / "summary.json").read_text())["skipped_batches"] == 1
    assert "epoch 1, step 2: non-finite loss or gradient (loss nan); batch skipped" in caplog.text
    for name in ("best.pt", "last.pt"):
        assert finite(load_checkpoint(run / name))
    assert np.isfinite(json.loads((run / "metrics.json").read_text())["val"]["auroc"])


def test_weights_that_went_bad_are_never_saved(tmp_path, tiny_dataset, monkeypatch):
    """A last guard: NaN in the weights after an epoch stops the run before any checkpoint is written. It is checked
    before validation, whose AUROC had raised scikit-learn's "Input contains NaN" (a traceback) instead."""
    real_epoch = cxr.train.train_one_epoch

    def epoch_then_corrupt(model, *args, **kwargs):
        out = real_epoch(model, *args, **kwargs)
        if kwargs["epoch"] == 1:
            with torch.no_grad():
                next(model.parameters())[0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(cxr.train, "train_one_epoch", epoch_then_corrupt)
    with pytest.raises(TrainingError, match="the weights hold NaN or infinite values after epoch 2"):
        train(tiny(tiny_dataset, tmp_path / "run"))
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(tmp_path / "run" / name)
        assert ckpt.epoch == 1 and finite(ckpt)


# ------------------------------------------------------------------------------- checkpoints that run code


class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _Popen:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


def _evil_files(folder: Path, marker: Path) -> dict[str, Path]:
    """Checkpoints whose unpickling runs code: three payloads, three places, zip and legacy formats, protocols 0-5."""
    cfg = load_config(overrides={"image_size": 32})
    good = {"format": "cxr-checkpoint", "format_version": 1, "arch": "densenet121", "config": cfg.to_dict(),
            "class_names": ["NORMAL", "PNEUMONIA"], "threshold": 0.5, "epoch": 1,
            "state_dict": {"w": torch.zeros(2)}, "extra": {}}
    files = {}
    for payload in (_System, _Exec, _Popen):
        for place in ("top", "state_dict", "extra"):
            obj = dict(good)
            if place == "top":
                obj["payload"] = payload(marker)
            elif place == "state_dict":
                obj["state_dict"] = {"w": payload(marker)}
            else:
                obj["extra"] = {"optimizer": payload(marker)}
            path = folder / f"{payload.__name__}-{place}.pt"
            torch.save(obj, path)
            files[path.name] = path
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # torch's legacy (non-zip) format, and bare pickles
        if protocol >= 2:
            path = folder / f"legacy-p{protocol}.pt"
            torch.save({**good, "payload": _System(marker)}, path, _use_new_zipfile_serialization=False,
                       pickle_protocol=protocol)
            files[path.name] = path
        path = folder / f"pickle-p{protocol}.pt"
        path.write_bytes(pickle.dumps({**good, "payload": _Exec(marker)}, protocol=protocol))
        files[path.name] = path
    return files


@contextlib.contextmanager
def spawn_audit():
    """Record process-spawning audit events (os.system, subprocess.Popen, exec*, spawn, fork) inside the block."""
    events: list[str] = []
    active = [True]
    watched = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork")

    def hook(event, args):
        if active[0] and event.startswith(watched):
            events.append(event)

    sys.addaudithook(hook)  # audit hooks cannot be removed; this one goes quiet when the block ends
    try:
        yield events
    finally:
        active[0] = False


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoints_that_run_code_are_refused_everywhere_and_nothing_runs(tmp_path, tiny_dataset, capsys):
    """Every way cxr reads a model file (a checkpoint, a run directory, --weights, --resume, the service, predict)
    refuses every crafted file, and nothing ran: no marker file, no process spawned (audit hook). The same files do
    run their code when unpickled naively, so the refusal is what stopped them."""
    from cxr.serve import create_app

    marker = tmp_path / "pwned"
    files = _evil_files(tmp_path, marker)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(f"data: {tiny_dataset}\nimage_size: 32\ndevice: cpu\n")
    image = next((tiny_dataset / "test" / "NORMAL").iterdir())

    readers = {
        "load_checkpoint": lambda p: load_checkpoint(p),
        "run directory": lambda p: (shutil.copy(p, run_dir / "best.pt"), load_checkpoint(run_dir)),
        "--weights": lambda p: read_state_dict_file(p),
        "build_model": lambda p: build_model("densenet121", str(p)),
        "--resume": lambda p: (shutil.copy(p, run_dir / "last.pt"), train(resume=run_dir)),
        "service": lambda p: create_app(p, device="cpu"),
    }
    refused = 0
    with spawn_audit() as events:
        for path in files.values():
            for how, read in readers.items():
                with pytest.raises(CheckpointError, match="not a" if how in ("--weights", "build_model") else
                                   "refused|damaged"):
                    read(path)
                refused += 1
            assert cxr_main(["predict", "--model", str(path), str(image)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith(f"cxr predict: error: {path}: not a cxr checkpoint"), err
            refused += 1
    assert not marker.exists() and events == []
    assert refused == len(files) * (len(readers) + 1)

    # Control: each file does run its payload when unpickled without the guard.
    ran = 0
    for path in files.values():
        with contextlib.suppress(Exception):
            torch.load(path, weights_only=False)
        if not marker.exists():
            with contextlib.suppress(Exception):
                pickle.loads(path.read_bytes())
        for _ in range(50):  # Popen's child may take a moment
            if marker.exists():
                break
            import time

            time.sleep(0.02)
        ran += marker.exists()
        marker.unlink(missing_ok=True)
    assert ran == len(files)


@pytest.mark.parametrize("fsync", [True, False])
def test_atomic_write_syncs_the_file_then_its_folder(tmp_path, monkeypatch, fsync):
    # Durable against a power cut: the file's bytes, then the rename (the folder's entry). Cache entries opt out.
    import stat

    from cxr import fileio

    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real(fd)

    monkeypatch.setattr(fileio.os, "fsync", spy)
    with fileio.atomic_path(tmp_path / "out.txt", fsync=fsync) as tmp:
        tmp.write_text("done")
    assert (tmp_path / "out.txt").read_text() == "done"
    assert synced == (["file", "folder"] if fsync else [])


def test_a_run_refused_after_the_write_check_leaves_no_empty_output_folder(tmp_path, tiny_dataset, capsys):
    # The write check creates the output folder to try it; a run that then fails (no data, no model) leaves none.
    from cxr.fileio import check_writable

    base = tmp_path / "out"
    base.mkdir()

    assert check_writable(base / "a" / "b", folder=True) == base / "a" / "b"
    check_writable(base / "c" / "out.csv")
    assert sorted(p.name for p in base.iterdir()) == []
    (base / "kept").mkdir()
    check_writable(base / "kept", folder=True)
    assert (base / "kept").is_dir()  # a folder that was there stays

    for argv in (["evaluate", "--model", "default", "--data", str(base / "nosuch"), "--output",
                  str(base / "ev" / "out"), "--device", "cpu", "--no-report"],
                 ["explain", "--model", str(base / "nosuch.pt"), "--output", str(base / "ex"),
                  str(tiny_dataset / "test")]):
        assert cxr_main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert "nosuch" in err[-1] and "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in base.iterdir()) == ["kept"]


def test_a_new_run_whose_data_fails_leaves_no_run_directory(tmp_path, tiny_dataset, capsys):
    # Before, OUTPUT/config.yaml stayed behind after "no train split", and looked like a run to --resume.
    run = tmp_path / "runs" / "new"
    code = cxr_main(["train", "--data", str(tiny_dataset / "test"), "--output", str(run), "--device", "cpu",
                     "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no train split" in err[-1] and "Traceback" not in "\n".join(err)
    assert not run.exists() and not (tmp_path / "runs").exists()

    # A folder that was there already is kept, without what the failed run wrote into it.
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    assert cxr_main(["train", "--data", str(tiny_dataset / "test"), "--output", str(run), "--device", "cpu",
                     "--no-report"]) == 2
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]

    # ... and a config.yaml that was there (here the run's own --config) is not deleted with the run's files.
    (run / "config.yaml").write_text("epochs: 3\n")
    assert cxr_main(["train", "--config", str(run / "config.yaml"), "--data", str(tiny_dataset / "test"),
                     "--output", str(run), "--device", "cpu", "--no-report"]) == 2
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "notes.txt"]
    assert load_config(run / "config.yaml").epochs == 3


def test_the_write_check_survives_another_shard_removing_the_folder_it_just_made(tmp_path, monkeypatch):
    # torchrun shards probe one new folder at once: one's clean-up can remove it between another's mkdir and mkstemp.
    import tempfile

    from cxr import fileio

    real, calls = tempfile.mkstemp, []

    def racing_mkstemp(*args, **kwargs):
        calls.append(kwargs["dir"])
        if len(calls) == 1:
            Path(kwargs["dir"]).rmdir()  # the other shard's clean-up, just now
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return real(*args, **kwargs)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", racing_mkstemp)
    fileio.check_writable(tmp_path / "new" / "preds.shard-0-of-2.csv")
    assert len(calls) == 2 and not (tmp_path / "new").exists()
    # ... or between mkdir's EEXIST and its own look, which Python's mkdir(exist_ok=True) then calls "File exists"
    # (two threads explaining into one new folder had met it)
    real_mkdir, made = Path.mkdir, []

    def racing_mkdir(self, *args, **kwargs):
        made.append(self)
        if len(made) == 1:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", real)
    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    fileio.check_writable(tmp_path / "other" / "explanations.csv")
    assert len(made) == 2 and not (tmp_path / "other").exists()


def test_a_run_no_longer_than_its_warm_up_still_decays(tiny_dataset, monkeypatch):
    # One epoch at the default warmup_epochs 1: every step was warm-up, and the run ended at its peak learning rate.
    import dataclasses

    model, loader, cfg = _one_epoch_setup(tiny_dataset)
    cfg = dataclasses.replace(cfg, scheduler="cosine", warmup_epochs=1.0, lr=1e-3)
    rates = []
    real_set_lr = cxr.train._set_lr
    monkeypatch.setattr(cxr.train, "_set_lr", lambda opt, lr: rates.append(lr) or real_set_lr(opt, lr))
    _epoch(model, loader, cfg, torch.optim.Adam(model.parameters(), lr=1e-3))
    assert len(rates) == 4
    assert rates[1] == pytest.approx(1e-3)  # warm-up over half the run: 0.5e-3, 1e-3
    assert rates[0] < rates[1] and rates[2] == pytest.approx(1e-3) and rates[3] == pytest.approx(0.5e-3)  # cosine


def test_a_flag_given_again_on_resume_is_compared_as_the_setting_it_is(tmp_path, monkeypatch):
    # --weights runs/old/best.pt and its absolute path are one setting (the second had been refused as a change).
    from cxr.train import _same_setting

    monkeypatch.chdir(tmp_path)
    assert _same_setting("weights", "runs/old/best.pt", str(tmp_path / "runs/old/best.pt"))
    assert _same_setting("data", "d", str(tmp_path / "d")) and not _same_setting("data", "d", "e")
    assert not _same_setting("weights", "none", "default") and _same_setting("weights", "default", "default")
    assert not _same_setting("lr", 1e-3, 1e-4) and _same_setting("lr", 1e-3, 0.001)


def test_a_run_that_trained_on_is_never_restarted_for_want_of_its_last_pt(tmp_path):
    # best.pt of epoch 1 alone is a first epoch killed before last.pt (restarted, as it always was); with epochs in
    # history.csv it is a run whose best epoch happened to be 1 (restarting it replaced its history and metrics).
    from cxr.train import _trained_past_epoch_1

    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, epoch=1),
                    tmp_path / "best.pt")
    assert _trained_past_epoch_1(tmp_path) is None
    (tmp_path / "history.csv").write_text("epoch,lr\n")  # a header only: nothing trained yet
    assert _trained_past_epoch_1(tmp_path) is None
    (tmp_path / "history.csv").write_text("epoch,lr\n1,0.001\n2,0.0005\n")
    assert "history.csv" in _trained_past_epoch_1(tmp_path)
    (tmp_path / "history.csv").unlink()
    (tmp_path / "best.pt").write_bytes(b"not a checkpoint")
    assert "cannot be read" in _trained_past_epoch_1(tmp_path)


def test_train_puts_the_process_back_as_it_was(tmp_path, tiny_dataset):
    # A notebook that trained found deterministic mode on (through a later run without it), CUBLAS_WORKSPACE_CONFIG
    # set and its random generators re-seeded with the run's seed. And overrides given without resume were ignored.
    import random

    from cxr.train import train

    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    run = train(tiny(tiny_dataset, tmp_path / "run", epochs=1, deterministic=True), overrides={"max_train_batches": 1})
    assert load_config(run / "config.yaml").max_train_batches == 1
    # And with overrides alone (no cfg), as a notebook may call it: they had been ignored, "no data" the answer.
    alone = train(overrides={**TINY_TRAIN, "data": str(tiny_dataset), "output": str(tmp_path / "alone"), "epochs": 1,
                             "max_train_batches": 1})
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert load_config(alone / "config.yaml").data == str(tiny_dataset)
    # A second run from another thread while one runs is refused: the two had shared the random generators (neither
    # the model it trains alone) and one's end switched the other's deterministic mode off mid-run.
    import threading

    import cxr.train

    held, done = threading.Event(), threading.Event()

    def other_run():  # stands for a train() in progress in another thread
        with cxr.train._RUNNING:
            held.set()
            done.wait(60)

    thread = threading.Thread(target=other_run)
    thread.start()
    try:
        assert held.wait(60)
        with pytest.raises(UsageError, match="already running in this process"):
            train(tiny(tiny_dataset, tmp_path / "second", epochs=1))
        assert not (tmp_path / "second").exists()
    finally:
        done.set()
        thread.join()
    assert train(resume=alone).is_dir()  # and once it has ended, a run goes on


def test_a_file_held_open_on_windows_is_waited_for_then_named(tmp_path, monkeypatch):
    # Windows refuses to rename onto a file another program has open (history.csv in Excel): the write is retried a
    # while, and then the error says what to do. Emulated: sys.platform and a replace that is refused.

    import cxr.fileio
    from cxr.errors import WriteError

    monkeypatch.setattr(cxr.fileio.sys, "platform", "win32")
    monkeypatch.setattr(cxr.fileio.time, "sleep", lambda s: None)
    real, refusals = os.replace, []

    def held_open(src, dst):
        if len(refusals) < 2:
            refusals.append(dst)
            raise PermissionError(13, "Access is denied")
        real(src, dst)

    monkeypatch.setattr(cxr.fileio.os, "replace", held_open)
    atomic_write_text(tmp_path / "history.csv", "epoch\n")  # closed after two tries: written
    assert (tmp_path / "history.csv").read_text() == "epoch\n" and len(refusals) == 2
    monkeypatch.setattr(cxr.fileio.os, "replace", lambda src, dst: (_ for _ in ()).throw(PermissionError(13, "no")))
    with pytest.raises(WriteError, match="open in another program"):
        atomic_write_text(tmp_path / "history.csv", "epoch\n1\n")
    assert (tmp_path / "history.csv").read_text() == "epoch\n" and not list(tmp_path.glob(".*.tmp"))


def test_stale_temporary_files_are_removed_and_a_users_tmp_file_is_not(tmp_path):
    # On resume, the run folder's hidden .NAME.XXXX.tmp files (a write killed midway) are removed; a file of the
    # user's that merely ends in .tmp is none of cxr's.
    from cxr.fileio import remove_stale_temps

    (tmp_path / "notes.tmp").write_text("mine")
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".folder.tmp").mkdir()
    assert remove_stale_temps(tmp_path) == [tmp_path / ".last.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".folder.tmp", "notes.tmp"]


def test_an_output_that_is_a_link_is_written_where_it_points(tmp_path):
    # `ln -s shared/preds.csv preds.csv; cxr predict ... --output preds.csv`: the link had become a file of its own
    # and shared/preds.csv kept the old predictions.
    from cxr.fileio import atomic_write_text

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "preds.csv").write_text("old")
    (tmp_path / "preds.csv").symlink_to(Path("shared") / "preds.csv")
    (tmp_path / "dangling.csv").symlink_to(tmp_path / "shared" / "new.csv")
    atomic_write_text(tmp_path / "preds.csv", "new")
    atomic_write_text(tmp_path / "dangling.csv", "made")
    assert (tmp_path / "preds.csv").is_symlink() and (tmp_path / "shared" / "preds.csv").read_text() == "new"
    assert (tmp_path / "dangling.csv").is_symlink() and (tmp_path / "shared" / "new.csv").read_text() == "made"


# ------------------------------------------------------------------------------------------------ Windows, emulated


def test_a_durable_write_flushes_a_descriptor_open_for_writing(tmp_path, monkeypatch):
    # Windows' fsync (_commit) fails with EBADF on a descriptor opened read-only: every output of cxr had been
    # "cannot write ...: Bad file descriptor" there. Emulated: fsync refuses a read-only descriptor.
    import fcntl

    from cxr import fileio

    real = os.fsync

    def windows_fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real(fd)

    monkeypatch.setattr(os, "fsync", windows_fsync)
    fileio.atomic_write_text(tmp_path / "out.txt", "kept\n")
    assert (tmp_path / "out.txt").read_text() == "kept\n"


def test_a_windows_lock_is_undone_before_its_close_and_its_file_removed_after(tmp_path, monkeypatch):
    # An open file cannot be removed on Windows (every run folder kept its lock file), and a lock left to the close is
    # released "depending upon available system resources". Emulated with a stand-in msvcrt.
    import types

    from cxr import train as train_mod

    events = []
    fake = types.SimpleNamespace(LK_UNLCK=0, LK_NBLCK=2, locking=lambda fd, mode, n: events.append(("lock", mode)))
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    monkeypatch.setattr(sys, "platform", "win32")
    real_close = os.close
    monkeypatch.setattr(os, "close", lambda fd: events.append(("close", fd)) or real_close(fd))
    path = tmp_path / ".cxr-train.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    real_unlink = Path.unlink

    def windows_unlink(self, *a, **k):
        if any(e == ("close", fd) for e in events):
            return real_unlink(self, *a, **k)
        raise PermissionError(13, "in use by another process", str(self))

    monkeypatch.setattr(Path, "unlink", windows_unlink)
    train_mod._release(fd, path)
    assert events == [("lock", 0), ("close", fd)] and not path.exists()


def test_training_accuracy_calls_a_tie_pneumonia_as_validation_and_every_command_do(tiny_dataset):
    # Equal logits are P(PNEUMONIA) 0.5, which the threshold 0.5 calls PNEUMONIA; training counted argmax, NORMAL.
    from cxr.data import prepare, scan

    model, _, cfg = _one_epoch_setup(tiny_dataset)
    prepared = prepare(scan(tiny_dataset)["train"], cfg)
    pick = np.r_[np.flatnonzero(prepared.labels == 0)[:4], np.flatnonzero(prepared.labels == 1)[:8]]
    loader = [(torch.from_numpy(prepared.images[pick[i:i + 4]]).unsqueeze(1),
               torch.from_numpy(prepared.labels[pick[i:i + 4]])) for i in range(0, 12, 4)]
    torch.nn.init.zeros_(model.classifier.weight)  # every image's two logits are 0: a tie
    torch.nn.init.zeros_(model.classifier.bias)
    row = _epoch(model, loader, cfg, torch.optim.SGD(model.parameters(), lr=0.0))
    labels = torch.cat([y for _, y in loader])
    assert 0 < labels.float().mean() < 1
    assert row["train_acc"] == pytest.approx(float(labels.float().mean()))
    # validate() too: its argmax had called the tie NORMAL, giving the share of NORMAL (4 of 12) as val_acc.
    from cxr.data import Prepared
    from cxr.train import validate

    val = Prepared("val", prepared.images[pick], prepared.labels[pick], samples=[])
    out = validate(model, val, torch.nn.CrossEntropyLoss(reduction="sum"), cfg=cfg, device=torch.device("cpu"),
                   bf16=False, channels_last=False)
    assert out["val_acc"] == pytest.approx(float(labels.float().mean())) == pytest.approx(8 / 12)


def test_the_step_and_validation_losses_are_trainings_class_weighted_smoothed_mean():
    # Pinned: a step's loss is the class-weighted mean, the weighted sum over the batch's weight sum (over len(y) it
    # would be off by the weights' mean), and validate() uses training's class weights and label smoothing (without
    # either, val_loss, which picks best.pt and stops early, would be another loss than train_loss). No test had
    # unequal weights with smoothing: here two images of each class, weights 2 and 2/3, smoothing 0.2.
    from cxr.data import Prepared
    from cxr.model import normalize
    from cxr.train import validate

    cfg = load_config(overrides={"epochs": 1, "batch_size": 4, "scheduler": "none", "eval_batch_size": 8})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x, y = torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8), torch.tensor([0, 0, 1, 1])
    weight = torch.tensor([2.0, 2 / 3])
    with torch.no_grad():
        logits = model(normalize(x, cfg.mean, cfg.std))
    criterion = torch.nn.CrossEntropyLoss(weight=weight, reduction="sum")
    row = train_one_epoch(model, [(x, y)], criterion, torch.optim.SGD(model.parameters(), lr=0.0), cfg=cfg,
                          device=torch.device("cpu"), bf16=False, channels_last=False, epoch=0, steps_per_epoch=1,
                          total_steps=1)
    expect = torch.nn.functional.cross_entropy(logits, y, weight=weight).item()
    assert row["train_loss"] == pytest.approx(expect, rel=1e-5)
    assert expect != pytest.approx(criterion(logits, y).item() / len(y), rel=1e-3)
    smoothed = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.2, reduction="sum")
    out = validate(model, Prepared("val", x.squeeze(1).numpy(), y.numpy(), samples=[]), smoothed, cfg=cfg,
                   device=torch.device("cpu"), bf16=False, channels_last=False)
    expect = torch.nn.functional.cross_entropy(logits, y, weight=weight, label_smoothing=0.2).item()
    assert out["val_loss"] == pytest.approx(expect, rel=1e-5)
    # Neither leaving the weights nor the smoothing out gives that number.
    for other in (torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.2),
                  torch.nn.functional.cross_entropy(logits, y, weight=weight)):
        assert other.item() != pytest.approx(expect, rel=1e-3)


def test_outputs_are_written_with_the_permissions_the_umask_gives(tmp_path):
    # Written through a temporary file (mkstemp makes it 0600): without the chmod, every checkpoint, CSV and
    # metrics.json was unreadable by the colleagues of a shared group, and no test had looked.
    import stat

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "metrics.json", "{}")
        os.umask(0o027)
        atomic_write_text(tmp_path / "group.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "group.json").stat().st_mode) == 0o640


def test_writing_a_file_never_sets_the_process_umask_to_0(tmp_path, monkeypatch):
    # The umask was read by setting it to 0 and back on every write (outputs and cache packs): files that other
    # threads of the process created in that instant came out group- and world-writable. Linux shows it unchanged.
    import stat

    from cxr.data import _write_pack

    set_to, real = [], os.umask
    old = real(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: set_to.append(mask) or real(mask))
        atomic_write_text(tmp_path / "metrics.json", "{}")
        pack = _write_pack(tmp_path / "cache", ["00" * 32], [np.zeros((4, 4), np.uint8)])
    finally:
        real(old)
    if sys.platform.startswith("linux"):
        assert 0 not in set_to
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o640  # still the mode a plain open() gives
    assert stat.S_IMODE(pack.stat().st_mode) == 0o640


def test_a_line_break_in_a_file_name_forges_no_log_line(capsys):
    # The formatter kept every line break of a formatted message, those of its arguments too: a file named
    # "bad\nINFO fake.jpeg" printed a second, forged line. The template's own line breaks stay.
    import logging

    from cxr.fileio import PrintableFormatter
    from cxr.images import ImageError

    fmt = PrintableFormatter("%(levelname)s %(message)s")

    def formatted(msg, *args):
        return fmt.format(logging.LogRecord("cxr", logging.WARNING, __file__, 1, msg, args, None))

    assert formatted("skipping unreadable image: %s", "bad\nINFO fake.jpeg") == \
        "WARNING skipping unreadable image: bad\\nINFO fake.jpeg"
    assert formatted("skipping: %s", ImageError("a\nb.png", "not an image")).count("\n") == 0
    assert formatted("first line\nsecond: %d of %s", 3, "x") == "WARNING first line\nsecond: 3 of x"


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, theirs, ...), from /proc."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").iterdir():
            with contextlib.suppress(OSError):
                kids = [int(c) for c in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


ORPHAN_SCRIPT = """
import sys, time

import cxr.data as d
from cxr.config import load_config


def slow(*args):  # decoding that takes its time: the workers are busy when their parent is killed
    time.sleep(120)


if __name__ == "__main__":
    import multiprocessing

    multiprocessing.set_start_method(sys.argv[3])
    d._cache_chunk = slow
    cfg = load_config(overrides={"image_size": 32, "cache_dir": sys.argv[2]})
    d.prepare(d.scan(sys.argv[1])["train"], cfg, workers=2)
"""


@pytest.mark.skipif(not Path(f"/proc/self/task/{os.getpid()}/children").exists(),
                    reason="reads /proc/PID/task/*/children (Linux with CONFIG_PROC_CHILDREN)")
@pytest.mark.parametrize("start", ["fork", "forkserver"])  # forkserver: Python 3.14's default on Linux
def test_cache_workers_end_when_their_parent_is_killed(tmp_path, tiny_dataset, start):
    # SIGKILL to the main process alone (the OOM killer, a container stopped) left its cache-building workers waiting
    # on their queue for good, 400 MB each, holding the run's lock inherited by fork: --resume was refused.
    import time

    script = tmp_path / "orphans.py"
    script.write_text(ORPHAN_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_dataset), str(tmp_path / "cache"), start],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    children: list[int] = []
    try:
        for _ in range(600):  # the workers start when the pool gets its first chunk
            with contextlib.suppress(OSError):
                children = _descendants(proc.pid)
            if len(children) >= 2 + (start == "forkserver") or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert len(children) >= 2 and proc.poll() is None, (children, proc.returncode)
        time.sleep(0.5)  # the workers' initializer has run
        proc.kill()  # and not reaped until the workers are gone: a zombie main process had kept them alive

        def alive(pid: int) -> bool:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                return False
            return state != "Z"  # a zombie has ended; only its entry waits for a parent to read it

        deadline = time.monotonic() + 10
        while any(map(alive, children)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, children)), [c for c in children if alive(c)]
        proc.wait()
    finally:
        for pid in [proc.pid, *children]:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)


def _sigint_ignored() -> bool:
    import signal

    return signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_cache_workers_leave_ctrl_c_to_the_main_process():
    # A worker that took the terminal's SIGINT died with a traceback, and its broken pool could reach the main process
    # before its own KeyboardInterrupt: "killed (out of memory?)", exit 1, in 3 of 19 Ctrl-C's of a cache build.
    import multiprocessing
    import signal
    from concurrent.futures import ProcessPoolExecutor

    from cxr.data import end_with_parent

    # Python's own Ctrl-C handler in the main process, as in a terminal (a background job of a shell without job
    # control, as CI runs the suite, ignores SIGINT from the start, and its workers with it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"), initializer=end_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            assert pool.submit(_sigint_ignored).result(timeout=60)
        assert not _sigint_ignored()  # the main process's own is untouched
    finally:
        signal.signal(signal.SIGINT, previous)


def _closed_in_a_loader_worker(fds: list[int]) -> list[bool]:
    from cxr.train import loader_worker_init

    loader_worker_init(0)
    import signal

    closed = [signal.getsignal(signal.SIGTERM) == signal.SIG_IGN == signal.getsignal(signal.SIGHUP)]
    for fd in fds:
        try:
            os.fstat(fd)
            closed.append(False)
        except OSError:
            closed.append(True)
    return closed


def test_data_loading_workers_give_up_the_locks_they_inherit(tmp_path, monkeypatch):
    # The main process killed alone (the OOM killer), its forked data-loading workers had held the run's lock some
    # 6 s more: a --resume meanwhile was refused as if another run trained there.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import cxr.train
    from cxr.fileio import held_lock_descriptors, output_lock

    run_fd = os.open(tmp_path / "run.lock", os.O_RDONLY | os.O_CREAT)
    monkeypatch.setitem(cxr.train._HELD_RUNS, str(tmp_path), run_fd)
    with output_lock(tmp_path / "out"):
        (out_fd,) = held_lock_descriptors()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            assert pool.submit(_closed_in_a_loader_worker, [out_fd, run_fd]).result(timeout=60) == [True, True, True]
        os.fstat(out_fd)  # the main process's own are held still
    os.close(run_fd)


def test_a_torchscript_export_to_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, tmpfs):
    # torch.jit.save wrote the file itself: a full disk aborted the process in C++ (exit 134, 21 frames of its stack)
    # and left the temporary file. In a process of its own, as that abort ends the process.
    fs = tmpfs(1)
    if fs is None:
        pytest.skip(f"a small tmpfs cannot be mounted here: {tmpfs.why}")
    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, threshold=0.5),
                    tmp_path / "m.pt")
    proc = subprocess.run([sys.executable, "-m", "cxr", "export", "--model", str(tmp_path / "m.pt"), "--format",
                           "torchscript", "--output", str(fs / "m.ts")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"cxr export: error: cannot write {fs / 'm.ts'}: No space left on " \
        "device; the existing file, if any, is unchanged", proc.stderr
    assert "Traceback" not in proc.stderr and "c10" not in proc.stderr and not list(fs.iterdir())


def test_an_output_on_a_full_disk_is_refused_before_the_work(tmpfs):
    # The check made an empty file, which a full disk allows: predict and evaluate did all their work, then failed
    # to write the results.
    from cxr.fileio import check_writable

    fs = tmpfs(1)
    if fs is None:
        pytest.skip(f"a small tmpfs cannot be mounted here: {tmpfs.why}")
    filler = fs / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    with pytest.raises(WriteError, match="No space left on device"):
        check_writable(fs / "p.csv")
    with pytest.raises(WriteError, match="No space left on device"):
        check_writable(fs / "ev", folder=True)
    assert sorted(p.name for p in fs.iterdir()) == ["filler"]  # nothing left behind
    filler.unlink()
    assert check_writable(fs / "p.csv") == fs / "p.csv" and not list(fs.iterdir())
    # ramfs counts no blocks at all (free 0 of 0): writable, not full
    ram = fs.parent / "ram"
    ram.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(ram)], capture_output=True).returncode == 0:
        try:
            assert check_writable(ram / "p.csv") == ram / "p.csv"
        finally:
            subprocess.run(["umount", "-l", str(ram)], capture_output=True)


def test_an_output_folder_held_by_one_thread_is_refused_to_another(tmp_path):
    # The lock nests within a process (evaluate, then its report): it had nested across threads too, letting a second
    # thread in and removing the lock file under it when the first left.
    import threading

    from cxr.errors import FolderInUse
    from cxr.fileio import output_lock

    held, release, seen = threading.Event(), threading.Event(), []

    def first():
        with output_lock(tmp_path / "out"), output_lock(tmp_path / "out"):  # the same thread: nested
            held.set()
            release.wait(30)

    t = threading.Thread(target=first)
    t.start()
    assert held.wait(30)
    try:
        with output_lock(tmp_path / "out"):
            seen.append("entered")
    except FolderInUse as e:
        seen.append(str(e))
    release.set()
    t.join(30)
    assert len(seen) == 1 and "is in use by another" in seen[0]
    assert not (tmp_path / "out" / ".cxr-output.lock").exists()
    with output_lock(tmp_path / "out"):  # free again
        pass


def test_train_returns_the_run_directory_whole(tmp_path, monkeypatch):
    # A relative output came back relative, and named another folder after a notebook's os.chdir.
    from pathlib import Path

    import cxr.train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cxr.train, "_train_run", lambda *a: Path("runs/a"))
    assert cxr.train.train(load_config(overrides={"data": "d", "output": "runs/a"})) == tmp_path / "runs" / "a"


def test_a_run_stopped_between_its_first_best_pt_and_last_pt_is_pointed_to_resume(tmp_path):
    # A fresh run into it was told to delete the folder, where --resume starts it again.
    from cxr.config import save_config
    from cxr.errors import UsageError
    from cxr.model import Checkpoint, build_model, save_checkpoint
    from cxr.train import _refuse_occupied

    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, epoch=1), run / "best.pt")
    with pytest.raises(UsageError, match=f"stopped in its first epoch .*start it again with --resume {run}"):
        _refuse_occupied(run, False)
    (run / "history.csv").write_text("epoch,train_loss\n1,0.5\n2,0.4\n")  # trained further: not to be restarted
    with pytest.raises(UsageError, match="holds a trained model"):
        _refuse_occupied(run, False)

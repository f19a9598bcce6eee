"""SIGKILL campaign: real ``cxr train`` processes killed at random moments, then resumed until the run completes.

    python scripts/crash_campaign.py --trials 20 --seed 0 --workdir /tmp/cxr-crash [--window run|training]
                                     [--json results.json]

One uninterrupted ``--deterministic`` run is the reference (and gives the run time T). Each trial starts a fresh run
with a fresh image cache, SIGKILLs the whole process group (trainer and cache workers) after a delay drawn uniformly
from [0, T] (``--window run``), or from the part of the reference run between its run directory appearing and its
last epoch's checkpoint (``--window training``: cache build, epochs and checkpoint writes, not start-up or the final
evaluation, which take most of T), then resumes it (``cxr train --resume``; or the first command again if the kill
came before the run directory had its config.yaml), killing the resumed process too with probability 1/2, at most
``--max-kills`` times, and finally lets it finish. After every kill it records the stage the run was in (from what
is on disk) and checks:

* every file the run directory shows under its own name parses completely (checkpoints load, CSV and JSON parse);
* every cache entry under its own name is byte-identical to the reference run's entry (nothing a later run would
  trust is partial or wrong);

and at the end of each trial that ``best.pt`` and ``last.pt`` (weights, epoch, threshold), ``metrics.json`` and the
predictions equal the reference's exactly. The process exits non-zero on any mismatch. Results: RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

CONFIG = {"image_size": 32, "batch_size": 8, "epochs": 3, "val_fraction": 0.25, "weights": "none",
          "warmup_epochs": 0.5, "patience": 0, "device": "cpu", "eval_batch_size": 32, "deterministic": True}


def make_data(root: Path, per_class: int = 40, test_per_class: int = 8) -> Path:
    """``root/{train,test}/{NORMAL,PNEUMONIA}`` from the bundled sample (enough train images for the parallel cache)."""
    from cxr.demo import SAMPLE_DIR

    for split, n in (("train", per_class), ("test", test_per_class)):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted((SAMPLE_DIR / split / cls).glob("*.jpeg"))[:n]:
                shutil.copy(f, root / split / cls / f.name)
    return root


def start(args: list[str], cache: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "CXR_CACHE_DIR": str(cache), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "cxr", *args], env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*.npy") if not p.name.startswith("."))


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp")) if folder.exists() else []


def stage(run: Path, cache: Path, n_entries: int, epochs: int) -> str:
    """What the run was doing when it was killed, from what is on disk."""
    from cxr.model import load_checkpoint

    temps = [p.name.split(".")[1] for p in temporaries(run)]
    if not (run / "config.yaml").exists():
        return "start-up (no run directory yet)"
    if any(t in ("last", "best") for t in temps):
        return "writing a checkpoint"
    if temps:
        return f"writing {sorted(temps)[0]}"
    if len(entries(cache)) < n_entries:
        return "building the cache"
    done = load_checkpoint(run / "last.pt").epoch if (run / "last.pt").exists() else 0
    return f"training epoch {done + 1}" if done < epochs else "final evaluation"


def check_sound(run: Path) -> None:
    """Every file shown under its own name parses completely."""
    from cxr.config import load_config
    from cxr.model import load_checkpoint

    for p in run.iterdir():
        if p.name.startswith("."):
            continue
        if p.suffix == ".pt":
            load_checkpoint(p)
        elif p.suffix == ".csv":
            with open(p, encoding="utf-8", newline="") as f:
                list(csv.DictReader(f))
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".yaml":
            load_config(p)


def check_cache(cache: Path, ref_cache: Path) -> int:
    found = entries(cache)
    for p in found:
        ref = ref_cache / p.relative_to(cache)
        if p.read_bytes() != ref.read_bytes():
            raise AssertionError(f"cache entry {p} differs from the reference")
    return len(found)


def compare(run: Path, ref: Path) -> None:
    import torch

    from cxr.model import load_checkpoint

    for name in ("best.pt", "last.pt"):
        a, b = load_checkpoint(run / name), load_checkpoint(ref / name)
        if (a.epoch, a.threshold) != (b.epoch, b.threshold) or any(
                not torch.equal(a.state_dict[k], b.state_dict[k]) for k in b.state_dict):
            raise AssertionError(f"{run / name} differs from the uninterrupted run's")
    for name in ("metrics.json", "predictions_train.csv", "predictions_val.csv", "predictions_test.csv"):
        if (run / name).read_text() != (ref / name).read_text():
            raise AssertionError(f"{run / name} differs from the uninterrupted run's")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-kills", type=int, default=3, help="kills per trial at most")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cxr-crash-campaign"))
    ap.add_argument("--window", choices=["run", "training"], default="run", help="when the kills are drawn from")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    data = make_data(work / "data")
    cfg = work / "config.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    first = ["train", "--config", str(cfg), "--data", str(data), "--no-report", "--output"]

    t0 = time.monotonic()
    ref, ref_cache = work / "ref", work / "ref-cache"
    proc = start([*first, str(ref)], ref_cache, work / "ref.log")
    marks = {}  # when the run directory appeared, and when the last epoch's history row did
    while proc.poll() is None:
        now = time.monotonic() - t0
        if "dir" not in marks and (ref / "config.yaml").exists():
            marks["dir"] = now
        if "trained" not in marks and (ref / "history.csv").exists() and \
                (ref / "history.csv").read_text().count("\n") > CONFIG["epochs"]:
            marks["trained"] = now
        time.sleep(0.01)
    if proc.returncode != 0:
        print((work / "ref.log").read_text()[-3000:])
        return 1
    duration = time.monotonic() - t0
    window = (0.0, duration) if args.window == "run" else (marks["dir"], marks["trained"])
    n_entries = len(entries(ref_cache))
    print(f"reference run: {duration:.1f} s, {n_entries} cache entries; kills drawn from {window[0]:.1f}-"
          f"{window[1]:.1f} s", flush=True)

    stages: collections.Counter[str] = collections.Counter()
    kills = processes = not_killed = 0
    for trial in range(args.trials):
        run, cache, log = work / f"run{trial}", work / f"cache{trial}", work / f"run{trial}.log"
        trial_kills = 0
        while True:
            command = ["train", "--resume", str(run), "--no-report"] if (run / "config.yaml").exists() \
                else [*first, str(run)]
            processes += 1
            proc = start(command, cache, log)
            kill = trial_kills == 0 or (trial_kills < args.max_kills and rng.random() < 0.5)
            if not kill:
                if proc.wait() != 0:
                    raise SystemExit(f"trial {trial}: the final run failed:\n{log.read_text()[-3000:]}")
                break
            try:
                proc.wait(timeout=rng.uniform(*window))
                not_killed += 1  # it finished before the kill came
                break
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            trial_kills += 1
            kills += 1
            where = stage(run, cache, n_entries, CONFIG["epochs"])
            stages[where] += 1
            if run.exists():
                check_sound(run)
            n = check_cache(cache, ref_cache)
            print(f"trial {trial}: kill {trial_kills} while {where} ({n}/{n_entries} cache entries, "
                  f"{len(temporaries(cache))} temporary)", flush=True)
        check_sound(run)
        compare(run, ref)
        if temporaries(run):
            raise AssertionError(f"{run}: temporary files left after the run completed")
        print(f"trial {trial}: completed after {trial_kills} kill(s), identical to the reference", flush=True)

    result = {"trials": args.trials, "seed": args.seed, "window": args.window,
              "window_seconds": [round(w, 1) for w in window], "kills": kills, "processes": processes,
              "finished_before_the_kill": not_killed, "stages": dict(stages.most_common()),
              "reference_seconds": round(duration, 1), "cache_entries": n_entries,
              "all_identical_to_reference": True, "wall_seconds": round(time.monotonic() - t0, 1)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput of ``cxr train`` on one process against ``torchrun`` with N processes (gloo on the CPU, NCCL
on GPUs), measured in the same run, interleaved.

Each configuration trains ``--epochs 2`` with ``--max-train-batches`` steps per epoch on the same data, global batch
and image size, and the figure is epoch 2's ``images_per_s`` from ``history.csv`` (global images per second of the
training loop; epoch 1 carries the warm-up of allocators and caches).

    python benchmarks/ddp_scaling.py --runs 5                        # CPU: 1 process x 2 threads vs 2 x 1
    python benchmarks/ddp_scaling.py --device cuda --procs 1 2 4 8   # a GPU node
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cxr.demo import SAMPLE_DIR


def run_once(data: str, out: Path, procs: int, threads: int, args: argparse.Namespace) -> float:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m"] \
        if procs > 1 else [sys.executable, "-m"]
    cmd = [*launcher, "cxr", "-q", "train", "--data", data, "--output", str(out), "--epochs", "2",
           "--max-train-batches", str(args.steps), "--batch-size", str(args.batch_size), "--image-size",
           str(args.image_size), "--weights", "none", "--device", args.device, "--patience", "0", "--no-report",
           "--cache-dir", str(args.cache_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with open(out / "history.csv", encoding="utf-8", newline="") as f:
        return float(list(csv.DictReader(f))[-1]["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SAMPLE_DIR), help="dataset (default: the bundled sample, 300 train images)")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU threads shared out among the processes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32, help="the global batch")
    ap.add_argument("--steps", type=int, default=6, help="training steps per epoch")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "cxr-bench-cache")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    results: dict[int, list[float]] = {p: [] for p in args.procs}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.runs):
            for procs in args.procs:  # interleaved, so drifting machine load hits every configuration alike
                threads = max(1, args.cores // procs) if args.device == "cpu" else 1
                t = time.perf_counter()
                ips = run_once(args.data, Path(tmp) / f"r{r}-p{procs}", procs, threads, args)
                results[procs].append(ips)
                print(f"run {r + 1}: {procs} process(es) x {threads} thread(s): {ips:.1f} img/s "
                      f"({time.perf_counter() - t:.0f} s wall)", flush=True)
    base = results[args.procs[0]]
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "load_before": load_before, "load_after": os.getloadavg(),
        # The speed-up is taken in each round (the configurations ran back to back), then its median: a round slowed
        # by other jobs slows both sides of its own ratio, not one side of a ratio of medians.
        "results": {p: {"median": statistics.median(v), "min": min(v), "max": max(v),
                        "ratio": statistics.median(r := [x / y for x, y in zip(v, base, strict=True)]),
                        "ratio_min": min(r), "ratio_max": max(r), "runs": v} for p, v in results.items()},
    }
    print(f"{'procs':>5} {'median img/s':>13} {'min':>7} {'max':>7} {'x vs ' + str(args.procs[0]) + ', per round':>17}")
    for p, s in summary["results"].items():
        print(f"{p:>5} {s['median']:>13.1f} {s['min']:>7.1f} {s['max']:>7.1f} "
              f"{s['ratio']:>5.2f} [{s['ratio_min']:.2f}, {s['ratio_max']:.2f}]")
    print(f"load average before {load_before[0]:.2f}, after {summary['load_after'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

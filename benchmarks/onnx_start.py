"""Figure 4d: ``cxr predict --backend onnx`` with a checkpoint (the bundled model), end to end from process start,
with the ONNX export's cache empty (what every start cost before the cache: the export runs) and filled (a later
start reads the export), seconds.

Whole processes, interleaved round by round: ``cold`` runs with a fresh, empty ``CXR_CACHE_DIR`` each time;
``warm`` with one cache folder filled before the rounds. One full-resolution JPEG is predicted.

    python benchmarks/onnx_start.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ORIGINALS, REPO, cell, dump_json, header, loadavg, ratio_cell

IMAGE = ORIGINALS / "val" / "PNEUMONIA" / "person1946_bacteria_4874.jpeg"


def run_once(cmd: list[str], cache: Path) -> float:
    env = {**os.environ, "CXR_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, env=env)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--image", type=Path, default=IMAGE)
    p.add_argument("--json")
    args = p.parse_args(argv)
    load_before = loadavg()
    cmd = [sys.executable, "-m", "cxr", "predict", "--backend", "onnx", "--model", "default", str(args.image)]
    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-onnx-start-"))
    try:
        warm = tmp / "warm"
        run_once(cmd, warm)  # fills the cache: the export, once
        assert list((warm / "onnx").glob("*.onnx")), "the export was not kept in the cache"
        times: dict[str, list[float]] = {"cold (empty cache: exports)": [], "warm (cache filled: reads it)": []}
        for r in range(args.rounds):
            cold = tmp / f"cold{r}"
            times["cold (empty cache: exports)"].append(run_once(cmd, cold))
            shutil.rmtree(cold, ignore_errors=True)
            times["warm (cache filled: reads it)"].append(run_once(cmd, warm))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    header(argv, "onnx_start.py", args.rounds, load_before)
    print("| start | seconds, median [min, max] |")
    print("|---|---:|")
    for name, values in times.items():
        print(f"| {name} | {cell(values, '.2f')} |")
    cold, warm_ = times.values()
    print(f"\ncold / warm, per round: {ratio_cell(cold, warm_)} (median of medians: "
          f"{statistics.median(cold) / statistics.median(warm_):.1f}x)")
    dump_json(args.json, {"seconds": times})
    return 0


if __name__ == "__main__":
    sys.exit(main())

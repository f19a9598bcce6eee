"""Figure 9: the training loader's workers under Python 3.14's default start method, and as cxr starts them.

Python 3.14 made ``forkserver`` the default start method on Linux, and torch's DataLoader takes the default. A
forkserver worker is a fresh interpreter that gets the dataset pickled, and torch pickles a tensor by moving its
storage into shared memory (``/dev/shm``): the whole training split, once per rank, before the first batch. cxr's
dataset holds the split's pixels, so ``cxr train`` now starts its loader workers by fork on Linux
(:func:`cxr.train.loader_start_method`), as every Python before 3.14 did by default; they share the pixels' pages.

Each variant runs in a fresh process (forkserver is made the default there, as on 3.14) that prepares the training
split from a warm cache, then iterates the ``cxr train`` loader (:class:`cxr.train.TrainBatches`, augmentation on,
no model) for ``--epochs`` epochs. It reports the seconds to each epoch's first batch, the seconds of each whole
epoch, and how much ``/dev/shm`` grew. Variants alternate within each round; each cell is the median over rounds
and epochs, with the min and max.

    python benchmarks/loader_start.py --data ../shared/data/kermany-224 --workers 2 --epochs 3 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SHARED_DATA, cell, header, loadavg

VARIANTS = {"Python 3.14 default (forkserver)": "inherit", "cxr (fork on Linux)": "cxr"}


def shm_used_mb() -> float:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize / 2**20


def child(variant: str, data: str, cache: str, size: int, workers: int, epochs: int) -> None:
    import multiprocessing

    multiprocessing.set_start_method("forkserver", force=True)  # what Python 3.14 gives on Linux
    from cxr import train
    from cxr.config import load_config
    from cxr.data import prepare, scan

    if variant == "inherit":  # the DataLoader left to the process's default, as before the change
        train.loader_start_method = lambda: None
    cfg = load_config(overrides={"image_size": size, "cache_dir": cache, "num_workers": workers, "batch_size": 32})
    batches = train.TrainBatches(prepare(scan(data)["train"], cfg), cfg)
    base, grown, starts, whole = shm_used_mb(), 0.0, [], []
    for epoch in range(epochs):
        t = time.perf_counter()
        n = 0
        for k, (x, _) in enumerate(batches.loader(epoch)):
            if k == 0:
                starts.append(time.perf_counter() - t)
                grown = max(grown, shm_used_mb() - base)
            n += len(x)
        whole.append(time.perf_counter() - t)
    print(json.dumps({"starts": starts, "epochs": whole, "shm_mb": grown, "images": n,
                      "shared": batches.dataset.images.is_shared()}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED_DATA / "kermany-224"), help="a dataset root with a train split")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.data, args.cache, args.size, args.workers, args.epochs)
        return 0
    load_before = loadavg()

    from cxr.config import load_config
    from cxr.data import prepare, scan

    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-loader-"))
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    try:
        cache = str(tmp / "cache")
        prepare(scan(args.data)["train"], load_config(overrides={"image_size": args.size, "cache_dir": cache}))
        for r in range(args.rounds):
            for name, variant in VARIANTS.items():
                out = subprocess.run([sys.executable, __file__, "--child", variant, "--cache", cache,
                                      "--data", args.data, "--size", str(args.size), "--workers", str(args.workers),
                                      "--epochs", str(args.epochs)], check=True, capture_output=True, text=True)
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                got = results[name][-1]
                print(f"round {r + 1}/{args.rounds} (load {loadavg()}): {name}: first batch "
                      f"{[round(s, 2) for s in got['starts']]} s, epochs {[round(s, 2) for s in got['epochs']]} s, "
                      f"/dev/shm +{got['shm_mb']:.0f} MB", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    header(argv, "loader_start.py", args.rounds, load_before)
    first = next(iter(results.values()))[0]
    print(f"{args.data} train split at {args.size} px ({first['images']} images per epoch), {args.workers} workers, "
          f"{args.epochs} epochs per process\n")
    print("| loader workers started by | seconds to an epoch's first batch | seconds per epoch, no model | "
          "/dev/shm grew, MB | split moved to shared memory |")
    print("|---|---:|---:|---:|---|")
    for name, runs in results.items():
        starts = [s for run in runs for s in run["starts"]]
        whole = [s for run in runs for s in run["epochs"]]
        shm = [run["shm_mb"] for run in runs]
        print(f"| {name} | {cell(starts, '.2f')} | {cell(whole, '.2f')} | {cell(shm, '.0f')} | "
              f"{', '.join(sorted({str(run['shared']) for run in runs}))} |")
    a, b = (results[n] for n in VARIANTS)
    per_round = [statistics.median(x["epochs"]) / statistics.median(y["epochs"]) for x, y in zip(a, b, strict=True)]
    print(f"\nepoch time, 3.14 default / cxr, per round: {cell(per_round, '.2f')}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Figure 5: how cost grows. Training images/s and peak memory (RSS) against image size and batch size; cache size
per image; what 100k and 1M images would need.

Each configuration runs in its own child process (peak RSS is a per-process high-water mark), interleaved with the
others round by round. A child reads the prepared split from the cache, builds the model as ``cxr train`` does, runs
one warm-up step, then times ``--steps`` whole steps through ``cxr.train.train_one_epoch`` (``benchmarks/ours.py``)
at the defaults of this machine (bf16 autocast where the CPU has bf16 instructions), and reports its images/s, its
peak RSS after loading the data and its peak RSS at the end.

    python benchmarks/scaling.py --rounds 5                  # sizes 128/224/320 at batch 32, batches 16/32/64 at 224
    python benchmarks/scaling.py --rounds 3 --grid           # all nine combinations
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import cell, dump_json, header, loadavg, make_fullres_dataset

HERE = Path(__file__).resolve().parent


def worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    from common import peak_rss_mb
    from ours import Trainer, prepare_train

    from cxr.config import load_config
    from cxr.model import use_bf16, use_channels_last

    cfg = load_config(overrides={"cache_dir": args.cache, "batch_size": args.batch, "image_size": args.size,
                                 "weights": "none"})
    prepared = prepare_train(args.data, cfg)
    rss_data = peak_rss_mb()
    cpu = torch.device("cpu")
    trainer = Trainer(prepared, cfg, bf16=use_bf16(cfg, cpu), channels_last=use_channels_last(cfg, cpu))
    trainer.run(1)
    n, seconds = trainer.run(args.steps)
    print(json.dumps({"images_per_s": n / seconds, "rss_after_data_mb": rss_data, "peak_rss_mb": peak_rss_mb(),
                      "images": len(prepared.labels), "bf16": trainer.bf16}))
    return 0


def memory_worker(args: argparse.Namespace) -> int:
    """Peak RSS that prepare() adds over the process's own, for one split (cold or warm cache per ``--cache``)."""
    from common import peak_rss_mb

    from cxr.config import load_config
    from cxr.data import prepare, scan

    split = scan(args.data)["train"]
    cfg = load_config(overrides={"cache_dir": args.cache, "image_size": args.size})
    before = peak_rss_mb()
    prepared = prepare(split, cfg)
    print(json.dumps({"images": len(prepared.labels), "pixels_mb": prepared.images.nbytes / 2**20,
                      "peak_rss_added_mb": peak_rss_mb() - before}))
    return 0


def memory(args: argparse.Namespace) -> int:
    """How much RAM prepare() needs per MB of cached pixels, cold (decoding) and warm (reading the cache)."""
    load_before = loadavg()
    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-scaling-"))
    try:
        root = make_fullres_dataset(tmp / "data", args.repeat)
        cmd = [sys.executable, str(HERE / "scaling.py"), "--memory-worker", "--size", "224", "--cache",
               str(tmp / "cache"), "--data", str(root.parent)]
        rows = {}
        for state in ("cold", "warm"):
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[state] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print(f"command: python benchmarks/scaling.py --memory --repeat {args.repeat}; load average before {load_before}, "
          f"after {loadavg()}")
    for state, r in rows.items():
        print(f"prepare(), {state} cache, {r['images']} images at 224 px: pixels {r['pixels_mb']:.0f} MB, peak RSS "
              f"added {r['peak_rss_added_mb']:.0f} MB ({r['peak_rss_added_mb'] / r['pixels_mb']:.2f}x the pixels)")
    return 0


def print_cache_table(per_image: dict[int, dict]) -> None:
    print(f"\n{next(iter(per_image.values()))['entries']} images per size")
    print("| image size | cache per image (bytes in packs) | on disk (bytes, file-system blocks) | in memory (bytes) |")
    print("|---:|---:|---:|---:|")
    for size, v in per_image.items():
        print(f"| {size} | {v['bytes']:.0f} | {v['disk_bytes']:.0f} | {size * size} |")


def cache_bytes(folder: Path, size: int) -> tuple[int, int, int]:
    """(images, bytes in the pack files, bytes the file system allocates for them)."""
    from cxr.data import _read_pack

    files = list(folder.glob("*.npy"))
    images = sum(len(_read_pack(f, size)[0]) for f in files)
    return images, sum(f.stat().st_size for f in files), sum(f.stat().st_blocks * 512 for f in files)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=2, help="copies of each of the 116 originals (default 2: 232)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 224, 320])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--grid", action="store_true", help="every size with every batch (default: a cross at 224 / 32)")
    p.add_argument("--memory", action="store_true",
                   help="instead: the RAM prepare() needs per MB of pixels (use --repeat 20 or more)")
    p.add_argument("--cache-only", action="store_true", help="only build the caches and print their size per image")
    p.add_argument("--json")
    # Child-process modes.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.memory_worker:
        return memory_worker(args)
    if args.memory:
        return memory(args)
    load_before = loadavg()

    from cxr.config import load_config
    from cxr.data import cache_folder, prepare, scan

    if args.grid:
        configs = [(s, b) for s in args.sizes for b in args.batches]
    else:
        configs = [(s, 32) for s in args.sizes] + [(224, b) for b in args.batches if b != 32]
    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-scaling-"))
    try:
        root = make_fullres_dataset(tmp / "data", args.repeat)
        split = scan(root.parent)["train"]
        per_image = {}
        for size in sorted({s for s, _ in configs}):
            cfg = load_config(overrides={"cache_dir": str(tmp / "cache"), "image_size": size})
            prepare(split, cfg)
            n, nbytes, disk = cache_bytes(cache_folder(cfg), size)
            per_image[size] = {"entries": n, "bytes": nbytes / n, "disk_bytes": disk / n}
        if args.cache_only:
            print_cache_table(per_image)
            return 0
        results: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
        for r in range(args.rounds):
            for size, batch in configs:
                cmd = [sys.executable, str(HERE / "scaling.py"), "--worker", "--size", str(size), "--batch", str(batch),
                       "--steps", str(args.steps), "--threads", str(args.threads), "--cache", str(tmp / "cache"),
                       "--data", str(root.parent)]
                for attempt in (1, 2):  # other jobs on a shared machine can kill a child (memory); say so, retry once
                    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                    if out.returncode == 0:
                        break
                    print(f"{size}px/b{batch}: child exited with {out.returncode} (attempt {attempt}):\n"
                          f"{out.stderr[-2000:]}", file=sys.stderr)
                else:
                    raise SystemExit(f"{size}px/b{batch}: the child failed twice")
                results[(size, batch)].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} (load {loadavg()}): " + ", ".join(
                f"{s}px/b{b} {v[-1]['images_per_s']:.1f} img/s {v[-1]['peak_rss_mb']:.0f} MB"
                for (s, b), v in results.items()), file=sys.stderr, flush=True)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    header(argv, "scaling.py", args.rounds, load_before)
    n_images = next(iter(results.values()))[0]["images"]
    print(f"DenseNet-121 training, {args.steps} timed steps per run after one warm-up step, {n_images} images in "
          f"memory, torch threads {args.threads}, bf16 {next(iter(results.values()))[0]['bf16']}; "
          "one child process per run\n")
    base = results.get((224, 32))
    print("| image size | batch | images/s | vs 224 px / batch 32 | peak RSS (MB) | RSS after loading the data (MB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for (size, batch), runs in results.items():
        ips = [r["images_per_s"] for r in runs]
        ratio = cell([a / b["images_per_s"] for a, b in zip(ips, base, strict=True)], ".2f") + "x" if base else "-"
        print(f"| {size} | {batch} | {cell(ips)} | {ratio} | {cell([r['peak_rss_mb'] for r in runs], '.0f')} | "
              f"{cell([r['rss_after_data_mb'] for r in runs], '.0f')} |")
    print_cache_table(per_image)
    medians = {c: statistics.median(r["images_per_s"] for r in runs) for c, runs in results.items()}
    dump_json(args.json, {"args": vars(args), "results": {f"{s}x{b}": v for (s, b), v in results.items()},
                          "medians": {f"{s}x{b}": v for (s, b), v in medians.items()}, "cache_per_image": per_image,
                          "load_before": load_before, "load_after": loadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Figure 1: building the image cache from full-resolution JPEGs, images/s, against a naive PIL loop and MONAI.

The 116 Kermany originals (1,000 to 2,900 px wide) are copied ``--repeat`` times into a temporary folder, each copy
with distinct bytes (so the content-keyed cache cannot reuse one copy's entry for another). Each round times, in
turn, on a cold cache (a fresh cache folder per run):

* ``naive PIL``: one process, ``Image.open(f).convert("L").resize((224, 224), BICUBIC)`` per file, nothing stored;
* ``cxr prepare``: :func:`cxr.data.prepare` exactly as training calls it (SHA-256 of every file, decode, bicubic
  resize, atomic write of a pack of up to 64 images), full decode or JPEG draft mode (``draft: true``), 1 worker or
  one per core;
* ``cxr prepare, warm``: the same call again once the cache holds every entry (what every later epoch and run pays);
* ``MONAI CacheDataset``: peer 2's cache build (PIL load, channel first, resize, scale intensity), in memory only.

Then it measures what draft mode changes in the pixels, on the 116 originals (draft vs full decode, both through
:func:`cxr.images.load_image`), and checks that the naive loop and cxr's full decode give the same pixels.

    python benchmarks/cache_build.py --repeat 12 --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import (
    ORIGINALS,
    dump_json,
    fresh_dir,
    header,
    interleaved,
    loadavg,
    make_fullres_dataset,
    print_table,
    timed,
)
from PIL import Image


def naive(files: list[Path], size: int) -> int:
    for f in files:
        with Image.open(f) as im:
            np.asarray(im.convert("L").resize((size, size), Image.Resampling.BICUBIC))
    return len(files)


def pixel_difference(size: int) -> dict:
    from cxr.images import load_image

    files = sorted(ORIGINALS.glob("*/*/*.jpeg"))
    mad, worst_pixel, naive_equal = [], 0, 0
    for f in files:
        full = load_image(f, size).astype(np.int16)
        draft = load_image(f, size, draft=True).astype(np.int16)
        mad.append(float(np.abs(full - draft).mean()))
        worst_pixel = max(worst_pixel, int(np.abs(full - draft).max()))
        with Image.open(f) as im:
            naive_equal += bool((np.asarray(im.convert("L").resize((size, size), Image.Resampling.BICUBIC)) ==
                                 full).all())
    return {"files": len(files), "mad_mean": statistics.mean(mad), "mad_median": statistics.median(mad),
            "mad_worst": max(mad), "max_abs_pixel": worst_pixel, "naive_equals_cxr_full": naive_equal}


def profile(args: argparse.Namespace) -> int:
    """Where a cold cache build's time goes, per image, for full and draft decoding (one worker, in-process)."""
    import cProfile
    import pstats
    import shutil

    from cxr.config import load_config
    from cxr.data import prepare, scan

    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-cache-"))
    try:
        split = scan(make_fullres_dataset(tmp / "data", args.repeat))["train"]
        n = len(split.samples)
        print(f"cProfile of cxr.data.prepare, {n} images, 1 worker, cold cache; load {loadavg()}")
        for draft in (False, True):
            cfg = load_config(overrides={"image_size": args.size, "cache_dir": str(fresh_dir(tmp / "cache")),
                                         "draft": draft})
            prof = cProfile.Profile()
            prof.runcall(prepare, split, cfg, workers=1)
            stats = pstats.Stats(prof)
            total = sum(v[2] for v in stats.stats.values())  # own time of every function
            top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:6]
            print(f"{'draft' if draft else 'full'} decode: {1e3 * total / n:.1f} ms/image of own time; "
                  + ", ".join(f"{fn[2]} {1e3 * v[2] / n:.2f} ms ({100 * v[2] / total:.0f}%)" for fn, v in top))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def parts(args: argparse.Namespace) -> int:
    """Where one cold draft entry's time goes: each step of cxr.data._cache_chunk timed on its own (one process)."""
    import hashlib
    import io
    import shutil
    import time

    from cxr import data
    from cxr.images import read_file

    files = sorted(ORIGINALS.glob("*/*/*.jpeg"))
    totals: dict[str, float] = {}
    PACK = 64  # noqa: N806 (prepare's chunk size on a few thousand images)

    def step(name, fn):
        start = time.perf_counter()
        out = fn()
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        return out

    def decode(raw: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(raw), formats=["JPEG"]) as im:
            im.draft("L", (args.size, args.size))
            im.load()
            return np.array(im)

    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-parts-"))
    chunk: list[tuple[str, np.ndarray]] = []
    try:
        for rep in range(args.rounds):
            for f in files:
                raw = step("read the file", lambda f=f: read_file(f))
                digest = step("SHA-256", lambda raw=raw: hashlib.sha256(raw).hexdigest())
                digest = hashlib.sha256(f"{digest}{rep}".encode()).hexdigest()  # a new entry in every round
                small = step("JPEG decode at draft scale", lambda raw=raw: decode(raw))
                pixels = step("bicubic resize", lambda a=small: data.resize_square(a, args.size))
                chunk.append((digest, pixels))
                if len(chunk) == PACK or (rep == args.rounds - 1 and f == files[-1]):
                    step("pack write (a 64th per image)", lambda c=chunk: data._write_pack(tmp, *zip(*c, strict=True)))
                    chunk = []
        # For comparison (not in the sum): the layout before session 4, one file per image.
        for k in range(args.rounds * len(files)):
            one = tmp / f"{k % 256:02x}"
            one.mkdir(exist_ok=True)
            step("(not in the sum) one file per image instead", lambda d=one, k=k: np.save(d / f"{k}.npy", pixels))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = args.rounds * len(files)
    print(f"one cold draft entry, {n} images ({args.rounds} x the {len(files)} originals) -> {args.size} px; load "
          f"{loadavg()}")
    for name, seconds in totals.items():
        print(f"{name}: {1e3 * seconds / n:.3f} ms")
    print(f"sum: {1e3 * sum(v for k, v in totals.items() if not k.startswith('(')) / n:.3f} ms per image")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=12, help="copies of each of the 116 originals (default 12: 1,392)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes for the parallel variants (default: one per core)")
    p.add_argument("--no-monai", dest="monai", action="store_false", help="leave out the MONAI CacheDataset build")
    p.add_argument("--profile", action="store_true",
                   help="instead: cProfile one cold prepare() per decode mode (1 worker) and print the top functions")
    p.add_argument("--parts", action="store_true",
                   help="instead: time each step of a cold draft entry on the 116 originals, --rounds times")
    p.add_argument("--json")
    args = p.parse_args(argv)
    load_before = loadavg()
    if args.profile:
        return profile(args)
    if args.parts:
        return parts(args)

    import torch

    from cxr.config import load_config
    from cxr.data import prepare, scan

    torch.set_num_threads(1)  # only MONAI's resize uses torch; PIL and cxr's workers are single-threaded anyway
    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-cache-"))
    try:
        root = make_fullres_dataset(tmp / "data", args.repeat)
        split = scan(root)["train"]
        files = [Path(s.path) for s in split.samples]
        base = load_config(overrides={"image_size": args.size, "cache_dir": str(tmp / "cache")})

        def cold(draft: bool, workers: int):
            cfg = dataclasses.replace(base, draft=draft)

            def run() -> tuple[int, float]:
                fresh_dir(tmp / "cache")
                n, seconds = timed(lambda: len(prepare(split, cfg, workers=workers).labels))
                assert n == len(files)
                return n, seconds
            return run

        def warm() -> tuple[int, float]:
            cfg = dataclasses.replace(base, draft=True)
            return timed(lambda: len(prepare(split, cfg, workers=args.workers).labels))

        w = args.workers
        variants = {
            "naive PIL, 1 process": lambda: timed(lambda: naive(files, args.size)),
            "cxr prepare, full decode, 1 worker": cold(False, 1),
            f"cxr prepare, full decode, {w} workers": cold(False, w),
            "cxr prepare, draft, 1 worker": cold(True, 1),
            f"cxr prepare, draft, {w} workers": cold(True, w),
            f"cxr prepare, warm cache, {w} workers": warm,
        }
        if args.monai:
            import peer_monai
            from monai.transforms import Compose

            deterministic = Compose(peer_monai.make_transforms(args.size).transforms[:4])

            def monai_build() -> tuple[int, float]:
                from monai.data import CacheDataset

                data = peer_monai.file_list(str(root))
                return timed(lambda: len(CacheDataset(data, deterministic, cache_rate=1.0, num_workers=w,
                                                      progress=False)))
            variants[f"MONAI CacheDataset, {w} threads"] = monai_build
        results = interleaved(variants, args.rounds)
        pixels = pixel_difference(args.size)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    header(argv, "cache_build.py", args.rounds, load_before)
    print(f"{len(files)} full-resolution JPEGs ({args.repeat} distinct copies of each of the 116 originals) -> "
          f"{args.size}x{args.size} uint8; cold cache per run; torch threads 1\n")
    print_table(results, {"naive PIL": "naive PIL, 1 process"})
    print(f"\ndraft vs full decode over the {pixels['files']} originals, {args.size} px: mean absolute difference per "
          f"image mean {pixels['mad_mean']:.2f}, median {pixels['mad_median']:.2f}, worst {pixels['mad_worst']:.2f} "
          f"grey levels; largest single-pixel difference {pixels['max_abs_pixel']}; naive PIL == cxr full decode on "
          f"{pixels['naive_equals_cxr_full']}/{pixels['files']} files")
    dump_json(args.json, {"args": vars(args), "results": results, "pixels": pixels, "load_before": load_before,
                          "load_after": loadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Figure 2: one epoch of data loading from the cache, with training augmentation and no model, images/s.

Against: the training throughput of the model on the same machine in the same run (``cxr train`` step, default
switches, loading included; target: the loader is >= 20x faster, i.e. loading is < 5 % of a step), peer 1's loader
(ImageFolder decoding and resizing the full-resolution JPEG on every access; target: >= 10x) and peer 2's (MONAI
``CacheDataset``: cached deterministic part, random transforms per epoch).

The cache is built once before the rounds (figure 1 times that). cxr's loader is the one ``cxr train`` builds
(``benchmarks/ours.py``): ``XrayDataset`` + ``train_transform`` (rotation, shift, scale, brightness, contrast) with
``DistributedSampler`` and a DataLoader, at ``num_workers`` 0 (what ``auto`` gives on the CPU) and with 2 workers;
and, as before/after rows, in a process at 2 intra-op threads with the augmentation pinned to one thread (the
library now) and not (``BeforePinning``, the library before this issue).

    python benchmarks/loader.py --repeat 20 --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import torch
from common import dump_json, header, interleaved, loadavg, make_fullres_dataset, print_table, timed

from cxr.data import XrayDataset


class BeforePinning(XrayDataset):
    """``XrayDataset.__getitem__`` as it was before this issue: the augmentation at the process's thread count.

    Only for the before/after row; everything else in this script uses the library's class.
    """

    def __getitem__(self, i: int):
        x = self.images[i].unsqueeze(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i))
            x = self.transform(x)
        return x, self.labels[i]


def micro(args: argparse.Namespace, load_before: str) -> int:
    """Per-image augmentation and per-batch collation at 1 and 2 intra-op threads, interleaved over rounds."""
    import time

    from torch.utils.data import default_collate

    from cxr.config import load_config
    from cxr.data import train_transform

    transform = train_transform(load_config())
    images = torch.randint(0, 256, (args.batch_size, 1, 224, 224), dtype=torch.uint8)
    samples = [(x, torch.tensor(0)) for x in images]
    out: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            for x in images:
                transform(x)
            out.setdefault(f"augmentation, ms per image, {threads} thread(s)", []).append(
                1e3 * (time.perf_counter() - start) / len(images))
            start = time.perf_counter()
            for _ in range(10):
                default_collate(samples)
            out.setdefault(f"collate, ms per batch of {args.batch_size}, {threads} thread(s)", []).append(
                1e2 * (time.perf_counter() - start))
        print(f"round {r + 1}/{args.rounds} (load {loadavg()})", file=sys.stderr)
    from common import cell

    print(f"command: python benchmarks/loader.py --micro --rounds {args.rounds}; load average before {load_before}, "
          f"after {loadavg()}; median [min, max] over rounds")
    for k, v in out.items():
        print(f"{k}: {cell(v, '.2f')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=20, help="copies of each of the 116 originals (default 20: 2,320)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of this process (default 1)")
    p.add_argument("--peer-batches", type=int, default=6, help="batches per run for the peers' loaders (default 6)")
    p.add_argument("--train-steps", type=int, default=2, help="training steps per run for the model rate (default 2)")
    p.add_argument("--micro", action="store_true",
                   help="instead: time one image's augmentation and one batch's collation at 1 and 2 threads")
    p.add_argument("--json")
    args = p.parse_args(argv)
    load_before = loadavg()
    if args.micro:
        return micro(args, load_before)
    torch.set_num_threads(args.threads)

    import peer_monai
    import peer_tutorial
    from ours import Trainer, prepare_train, train_loader

    from cxr.config import load_config
    from cxr.model import use_bf16, use_channels_last

    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-loader-"))
    try:
        root = make_fullres_dataset(tmp / "data", args.repeat)
        cfg = load_config(overrides={"cache_dir": str(tmp / "cache"), "batch_size": args.batch_size, "weights": "none"})
        prepared = prepare_train(root.parent, cfg)
        n = len(prepared.labels)
        workers = min(2, os.cpu_count() or 1)

        def ours(num_workers: int, threads: int | None = None, dataset_class: type[XrayDataset] = XrayDataset):
            c = dataclasses.replace(cfg, num_workers=num_workers)

            def run() -> tuple[int, float]:
                if threads:
                    torch.set_num_threads(threads)
                try:
                    return timed(lambda: sum(len(y) for _, y in train_loader(prepared, c,
                                                                             dataset_class=dataset_class)))
                finally:
                    torch.set_num_threads(args.threads)
            return run

        tutorial = peer_tutorial.make_loader(str(root), args.batch_size)
        monai = peer_monai.make_loader(peer_monai.make_dataset(str(root)), args.batch_size)
        cpu = torch.device("cpu")
        trainer = Trainer(prepared, cfg, bf16=use_bf16(cfg, cpu), channels_last=use_channels_last(cfg, cpu))
        trainer.run(1)  # warm-up: first-step allocations and kernel choices
        variants = {
            "cxr loader, num_workers 0 (the CPU default)": ours(0),
            f"cxr loader, num_workers {workers}": ours(workers),
            "cxr loader, num_workers 0, process at 2 intra-op threads": ours(0, threads=2),
            "before: the same, augmentation at the process's 2 threads": ours(0, threads=2,
                                                                             dataset_class=BeforePinning),
            "peer 1 loader: ImageFolder, full-res JPEG": lambda: timed(
                lambda: peer_tutorial.load_only(tutorial, args.peer_batches)),
            f"peer 2 loader: MONAI CacheDataset, {monai.num_workers} workers": lambda: timed(
                lambda: peer_monai.load_only(monai, args.peer_batches)),
            f"cxr train step (bf16 {trainer.bf16}, loading included)": lambda: trainer.run(args.train_steps),
        }
        results = interleaved(variants, args.rounds)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    header(argv, "loader.py", args.rounds, load_before)
    print(f"{n} cached 224 px images per cxr epoch; peers {args.peer_batches} batches of {args.batch_size} per run; "
          f"the model: {args.train_steps} steps of {args.batch_size}; torch threads {args.threads} unless stated\n")
    train_key = next(k for k in results if k.startswith("cxr train step"))
    print_table(results, {"the model's training": train_key, "peer 1 loader": next(k for k in results if
                                                                                   k.startswith("peer 1"))})
    dump_json(args.json, {"args": vars(args), "results": results, "load_before": load_before, "load_after": loadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

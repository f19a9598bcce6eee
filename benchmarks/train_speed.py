"""Figure 3: training throughput at 224 px, images/s, whole step (loading included), against both peers.

Every variant trains DenseNet-121 from random weights on the same full-resolution JPEGs (the 116 originals, copied
``--repeat`` times), at ``--batch-size``, for ``--steps`` steps per run, after one warm-up run each:

* peer 1 (``benchmarks/peer_tutorial.py``): ImageFolder decodes and resizes every JPEG on every access, fp32, NCHW;
* peer 2 (``benchmarks/peer_monai.py``): MONAI CacheDataset (built before the rounds) + MONAI DenseNet121, fp32;
* cxr, through ``cxr.train.train_one_epoch`` and the loader ``cxr train`` builds (``benchmarks/ours.py``), from the
  cache (built before the rounds): every combination of bf16 autocast and channels_last (the row that
  ``amp: auto`` / ``channels_last: auto`` pick on this machine is marked), then the defaults with another torch
  thread count, and with ``torch.compile`` if asked for: each option's share.

All variants run with ``--threads`` intra-op threads except the one that changes it.

    python benchmarks/train_speed.py --rounds 5 --steps 3 --batch-size 16
    python benchmarks/train_speed.py --rounds 5 --compile      # adds cxr + torch.compile (minutes to compile)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import dump_json, header, interleaved, loadavg, make_fullres_dataset, peer_loaders, print_table
from torch import nn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=2, help="copies of each of the 116 originals (default 2: 232)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="training steps per run (default 3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; see BENCHMARKS.md)")
    p.add_argument("--other-threads", type=int, default=2, help="the thread count of the 'threads' variant")
    p.add_argument("--other-threads-steps", type=int, default=1,
                   help="steps per run of the 'threads' variant (default 1: it can be 10x slower on a busy machine)")
    p.add_argument("--compile", action="store_true", help="add a torch.compile variant")
    p.add_argument("--no-peers", dest="peers", action="store_false")
    p.add_argument("--json")
    args = p.parse_args(argv)
    load_before = loadavg()
    torch.set_num_threads(args.threads)

    from ours import Trainer, prepare_train

    from cxr.config import load_config
    from cxr.model import use_bf16, use_channels_last

    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-train-"))
    try:
        root = make_fullres_dataset(tmp / "data", args.repeat)
        cfg = load_config(overrides={"cache_dir": str(tmp / "cache"), "batch_size": args.batch_size,
                                     "weights": "none", "image_size": 224})
        prepared = prepare_train(root.parent, cfg)

        def ours(bf16: bool, channels_last: bool, compile: bool = False, threads: int | None = None,
                 steps: int | None = None):
            trainer = Trainer(prepared, dataclasses.replace(cfg, compile=compile), bf16=bf16,
                              channels_last=channels_last, compile=compile)

            def run() -> tuple[int, float]:
                torch.set_num_threads(threads or args.threads)
                try:
                    return trainer.run(steps or args.steps)
                finally:
                    torch.set_num_threads(args.threads)
            start = time.perf_counter()
            torch.set_num_threads(threads or args.threads)
            trainer.run(1)  # warm-up: first-step allocations, kernel choices (and the compilation)
            torch.set_num_threads(args.threads)
            if compile:
                print(f"torch.compile warm-up (compilation included): {time.perf_counter() - start:.0f} s",
                      file=sys.stderr)
            return run

        variants = {}
        if args.peers:
            def peer(module, loader):
                model = module.make_model()
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
                criterion = nn.CrossEntropyLoss()

                def run() -> tuple[int, float]:
                    start = time.perf_counter()
                    n = module.train_steps(model, loader, optimizer, criterion, args.steps)
                    return n, time.perf_counter() - start
                run()
                return run

            for label, (module, loader) in peer_loaders(root, args.batch_size).items():
                variants[label] = peer(module, loader)
        cpu = torch.device("cpu")
        default = (use_bf16(cfg, cpu), use_channels_last(cfg, cpu))
        names = {(False, False): "cxr, all switches off (fp32, NCHW)", (True, False): "cxr bf16 autocast",
                 (False, True): "cxr channels_last", (True, True): "cxr bf16 + channels_last"}
        for (bf16, channels_last), name in names.items():
            mark = " (defaults here)" if (bf16, channels_last) == default else ""
            variants[name + mark] = ours(bf16, channels_last)
        variants[f"cxr defaults, {args.other_threads} threads"] = ours(*default, threads=args.other_threads,
                                                                       steps=args.other_threads_steps)
        if args.compile:
            variants["cxr defaults + torch.compile"] = ours(*default, compile=True)
        results = interleaved(variants, args.rounds)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    header(argv, "train_speed.py", args.rounds, load_before)
    print(f"DenseNet-121, 224 px, batch {args.batch_size}, {args.steps} steps per run (loading included), random init; "
          f"{len(prepared.labels)} images; torch threads {args.threads} unless stated\n")
    refs = {"all off": "cxr, all switches off (fp32, NCHW)"}
    if args.peers:
        refs = {"peer 1": "peer 1: tutorial (ImageFolder full-res, fp32)",
                "peer 2": "peer 2: MONAI (CacheDataset, fp32)", **refs}
    print_table(results, refs)
    dump_json(args.json, {"args": vars(args), "results": results, "load_before": load_before, "load_after": loadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Figure 6: the GPU. Training and inference images/s at 224 px and the wall time of a whole default training run.

Run in its short form on one H200 in session 11 (BENCHMARKS.md, figure 6: ``--no-peers --repeat 20 --steps 8
--rounds 3``, 73 s). The full form, for a session with more device time:

    python benchmarks/gpu.py --rounds 5         # training + inference rounds, both peers (peer 2 needs MONAI)
    python benchmarks/gpu.py --rounds 5 --compile --full-run

Training, interleaved round by round, every variant on the same data (the 116 originals copied ``--repeat`` times),
``--batch-size`` images per step, ``--steps`` steps per run (by default about one epoch of Kermany's train split)
after a warm-up run:

* peer 1 (``peer_tutorial.py``): ImageFolder decoding full-resolution JPEGs, default DataLoader, fp32, NCHW;
* peer 2 (``peer_monai.py``): MONAI CacheDataset + DenseNet121, fp32, its DataLoader with workers;
* cxr (``ours.py``: ``cxr.train.train_one_epoch`` and the loader ``cxr train`` builds): switches off (fp32, NCHW);
  the CUDA defaults (bf16 autocast + channels_last, uint8 batches normalised on the GPU); the defaults with
  ``--workers`` DataLoader workers (the augmentation runs per image on the CPU, so one process cannot feed an
  H100: the config's ``num_workers``, whose default ``auto`` gives up to 8 on CUDA); and with ``torch.compile`` if
  ``--compile``. The "no workers" variants set ``num_workers`` 0 explicitly.

Inference: ``cxr.evaluate.predict_logits`` on uint8 batches (fp32, and bf16 + channels_last). ``--full-run`` times
``cxr train`` with its defaults (20 epochs, batch 32, early stopping) on ``../shared/data/kermany-224`` as a
subprocess, cache build included.

Augmentation on the GPU is not in cxr yet: the per-image torchvision v2 transforms run in loader workers. The
``loader only`` row (cxr's loader with ``--workers`` workers, no model) shows whether that caps the training rate.
Pass ``--device cpu`` with tiny settings to check the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    SHARED_DATA,
    dump_json,
    header,
    interleaved,
    loadavg,
    make_fullres_dataset,
    peer_loaders,
    print_table,
    timed,
)
from torch import nn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeat", type=int, default=45,
                   help="copies of each of the 116 originals (default 45: 5,220, about Kermany's train split)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    # A run is an epoch's worth of steps (5,220 images / 256), so the loader workers' start-up at each epoch, which
    # `cxr train` pays too (non-persistent workers), weighs as much as it does there; 8 steps overstated it.
    p.add_argument("--steps", type=int, default=20, help="training steps per run (default 20: about one epoch)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers for the 'with workers' variants")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-peers", dest="peers", action="store_false")
    p.add_argument("--full-run", action="store_true", help="also time a whole default `cxr train` on kermany-224")
    p.add_argument("--json")
    args = p.parse_args(argv)
    load_before = loadavg()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True

    from ours import Trainer, prepare_train, train_loader

    from cxr.config import load_config
    from cxr.evaluate import predict_logits
    from cxr.model import use_bf16, use_channels_last

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-gpu-"))
    try:
        root = make_fullres_dataset(tmp / "data", args.repeat)
        cfg = load_config(overrides={"cache_dir": str(tmp / "cache"), "batch_size": args.batch_size,
                                     "weights": "none", "device": args.device})
        prepared = prepare_train(root.parent, cfg)
        bf16, channels_last = use_bf16(cfg, device), use_channels_last(cfg, device)

        def ours(bf16: bool, channels_last: bool, workers: int = 0, compile: bool = False):
            c = dataclasses.replace(cfg, num_workers=workers, compile=compile)
            trainer = Trainer(prepared, c, bf16=bf16, channels_last=channels_last, compile=compile, device=device)
            start = time.perf_counter()
            trainer.run(1)
            print(f"warm-up {time.perf_counter() - start:.0f} s", file=sys.stderr)
            return lambda: trainer.run(args.steps)

        variants = {}
        if args.peers:
            def peer(module, loader):
                model = module.make_model().to(device)
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
                criterion = nn.CrossEntropyLoss()

                def steps() -> int:
                    n = module.train_steps(model, loader, optimizer, criterion, args.steps, device)
                    sync()  # inside the timer, as cxr's Trainer.run does: queued GPU work counts for both
                    return n

                def run() -> tuple[int, float]:
                    return timed(steps)
                run()
                return run

            for label, (module, loader) in peer_loaders(root, args.batch_size).items():
                variants[label] = peer(module, loader)
        variants["cxr, all switches off (fp32, NCHW)"] = ours(False, False)
        defaults = f"cxr defaults (bf16 {bf16}, channels_last {channels_last})"
        variants[f"{defaults}, num_workers 0"] = ours(bf16, channels_last)
        variants[f"cxr defaults, num_workers {args.workers}"] = ours(bf16, channels_last, args.workers)
        if args.compile:
            variants[f"cxr defaults + compile, num_workers {args.workers}"] = ours(bf16, channels_last, args.workers,
                                                                                  compile=True)
        loader_cfg = dataclasses.replace(cfg, num_workers=args.workers)
        variants[f"loader only: cxr, num_workers {args.workers}, no model"] = lambda: timed(
            lambda: sum(len(y) for _, y in train_loader(prepared, loader_cfg, device=device)))
        train = interleaved(variants, args.rounds)

        net = Trainer(prepared, cfg, bf16=False, channels_last=False, device=device).model.eval()
        images = torch.from_numpy(prepared.images[:args.batch_size])

        def infer(bf16: bool, channels_last: bool):
            model = copy.deepcopy(net)  # Module.to(memory_format=...) works in place
            if channels_last:
                model = model.to(memory_format=torch.channels_last)

            def run() -> tuple[int, float]:
                start = time.perf_counter()
                for _ in range(args.steps):
                    predict_logits(model, images, mean=cfg.mean, std=cfg.std, device=device,
                                   batch_size=args.batch_size, bf16=bf16, channels_last=channels_last)
                sync()
                return args.steps * len(images), time.perf_counter() - start
            run()
            return run
        inference = interleaved({"inference fp32, NCHW": infer(False, False),
                                 f"inference bf16 {bf16}, channels_last {channels_last}": infer(bf16, channels_last)},
                                args.rounds)
        full = None
        if args.full_run:
            data = SHARED_DATA / "kermany-224"
            cmd = [sys.executable, "-m", "cxr", "train", "--data", str(data), "--output", str(tmp / "run"),
                   "--cache-dir", str(tmp / "cache-full"), "--device", args.device, "--weights", "none"]
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            full = (" ".join(cmd[1:]), time.perf_counter() - start)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    header(argv, "gpu.py", args.rounds, load_before)
    print(f"DenseNet-121, 224 px, batch {args.batch_size}, {args.steps} steps per run, random init, on {device}\n")
    refs = {"all off": "cxr, all switches off (fp32, NCHW)"}
    if args.peers:
        refs = {"peer 1": "peer 1: tutorial (ImageFolder full-res, fp32)",
                "peer 2": "peer 2: MONAI (CacheDataset, fp32)", **refs}
    print_table(train, refs)
    print()
    print_table(inference, {"fp32": "inference fp32, NCHW"})
    if full:
        print(f"\nwhole default training run: `python {full[0]}`: {full[1]:.0f} s (cache build, evaluation included)")
    dump_json(args.json, {"args": vars(args), "train": train, "inference": inference, "full_run": full,
                          "load_before": load_before, "load_after": loadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a training step's time goes: torch.profiler over cxr's step (``cxr.train.train_one_epoch``), by operator.

Not a timing benchmark (the profiler adds overhead); it says which operators dominate, with each speed switch.

    python benchmarks/profile_step.py --batch-size 16 --steps 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from common import loadavg, machine, make_fullres_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ours import Trainer, prepare_train
    from torch.profiler import ProfilerActivity, profile

    from cxr.config import load_config

    print(f"machine: {machine()}; load {loadavg()}")
    print(f"command: python benchmarks/profile_step.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_fullres_dataset(Path(tmp) / "data", 1)
        cfg = load_config(overrides={"cache_dir": str(Path(tmp) / "cache"), "batch_size": args.batch_size})
        prepared = prepare_train(root.parent, cfg)
        for bf16, channels_last in ((False, False), (True, False), (True, True)):
            trainer = Trainer(prepared, cfg, bf16=bf16, channels_last=channels_last)
            trainer.run(1)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                n, seconds = trainer.run(args.steps)
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]
            print(f"bf16 {bf16}, channels_last {channels_last}: {n / seconds:.1f} images/s under the profiler; "
                  "self CPU time by operator:")
            print("  " + ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Images per forward pass on the CPU: passes capped at 8 images' worth of 224 px pixels (as shipped, session 24)
against whole user batches (32 for ``cxr predict``, 64 for ``cxr evaluate`` and validation, as before).

The bundled model (DenseNet-121, 224 px) predicts the same ``--images`` images of the bundled sample, repeated, through
``cxr.evaluate.predict_logits`` (what predict, evaluate, the service and training's validation call), in fp32 (the
arithmetic of ``cxr evaluate``) and, where the CPU is fast at it, in bf16 with channels_last (``cxr predict``'s
``amp auto``). The baseline is the same code with the cap lifted, so the two differ in the pass size alone; their
probabilities are compared first (fp32: equal to float rounding; bf16: the labels agree).

    python benchmarks/forward_batch.py --rounds 5 --images 64
    python benchmarks/forward_batch.py --memory --rounds 3 --images 64   # peak memory: a fresh process per variant
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import numpy as np
import torch
from common import REPO, header, interleaved, loadavg, peak_rss_mb, print_table, timed

import cxr.evaluate
from cxr.evaluate import load_for_inference, predict_logits, probabilities
from cxr.images import load_image
from cxr.model import use_bf16

SAMPLE = REPO / "src" / "cxr" / "sample" / "kermany-mini" / "test"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=64, help="images predicted per variant per round")
    ap.add_argument("--memory", action="store_true", help="peak resident memory of each variant, in a fresh process")
    ap.add_argument("--one", nargs=3, type=int, metavar=("BATCH", "CAPPED", "BF16"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    load_before = loadavg()
    if args.memory:
        return memory(argv, args)

    run = load_for_inference("default", device="cpu", amp="off")
    files = sorted(SAMPLE.glob("*/*.jpeg"))
    images = np.stack([load_image(f, 224) for f in files] * (-(-args.images // len(files))))[:args.images]
    cap = cxr.evaluate.CPU_FORWARD_PIXELS
    device = torch.device("cpu")
    bf16 = use_bf16(dataclasses.replace(run.cfg, amp="auto"), device)

    def logits(batch: int, capped: bool, fast: bool) -> torch.Tensor:
        cxr.evaluate.CPU_FORWARD_PIXELS = cap if capped else 10 ** 12
        try:
            return predict_logits(run.net, images, mean=run.cfg.mean, std=run.cfg.std, device=device,
                                  batch_size=batch, bf16=fast, channels_last=fast)
        finally:
            cxr.evaluate.CPU_FORWARD_PIXELS = cap

    if args.one:  # a fresh process of --memory: one prediction of the images, then its peak memory
        batch, capped, fast = args.one
        logits(batch, bool(capped), bool(fast))
        print(json.dumps({"peak_mb": peak_rss_mb()}))
        return None
    cases = [("fp32, batch 64 (evaluate)", 64, False)] + ([("bf16, batch 32 (predict)", 32, True)] if bf16 else [])
    checks = []
    for name, batch, fast in cases:
        a, b = probabilities(logits(batch, True, fast)), probabilities(logits(batch, False, fast))
        flips = int(((a >= run.threshold) != (b >= run.threshold)).sum())
        checks.append(f"{name}: max |dP| {np.abs(a - b).max():.2g}, labels that differ {flips}")
        if not fast:
            assert np.abs(a - b).max() < 1e-5, "fp32 probabilities differ beyond rounding"

    variants = {}
    for name, batch, fast in cases:
        for capped in (True, False):
            label = f"{name}, {'8 a pass (shipped)' if capped else f'{batch} a pass (before)'}"
            variants[label] = (lambda b=batch, c=capped, f=fast: timed(lambda: logits(b, c, f) is not None
                                                                      and args.images))
    results = interleaved(variants, args.rounds)
    header(argv, "forward_batch.py", args.rounds, load_before)
    print(f"torch threads: {torch.get_num_threads()}; {args.images} images of 224 px; " + "; ".join(checks))
    print_table(results, {f"before ({name.split(',')[0]})": f"{name}, {batch} a pass (before)"
                          for name, batch, _ in cases})


def memory(argv: list[str] | None, args: argparse.Namespace) -> None:
    """Peak resident memory of one prediction of the images per variant, each in a fresh process (the model and the
    images are in both), the variants in turn within each round."""
    load_before = loadavg()
    from cxr.config import Config

    fast = use_bf16(Config(amp="auto"), torch.device("cpu"))
    cases = [("fp32, batch 64", 64, 0)] + ([("bf16, batch 32", 32, 1)] if fast else [])
    peaks: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name, batch, bf16 in cases:
            for capped in (1, 0):
                label = f"{name}, {'8 a pass (shipped)' if capped else f'{batch} a pass (before)'}"
                out = subprocess.run([sys.executable, __file__, "--images", str(args.images), "--one", str(batch),
                                      str(capped), str(bf16)], capture_output=True, text=True, check=True)
                peaks.setdefault(label, []).append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f} MB" for k, v in peaks.items()),
              file=sys.stderr, flush=True)
    header(argv, "forward_batch.py", args.rounds, load_before)
    print(f"{args.images} images of 224 px, one prediction in a fresh process per variant")
    print_table(peaks, {f"before ({name.split(',')[0]})": f"{name}, {batch} a pass (before)"
                        for name, batch, _ in cases}, unit="peak MB")


if __name__ == "__main__":
    main(sys.argv[1:])

"""How much a model's predictions depend on the arithmetic: bf16 autocast + channels_last against fp32, same images.

``amp: auto`` computes in bf16 on CPUs with bf16 instructions (and on GPUs) and in fp32 elsewhere, so ``cxr predict``
on two machines can disagree on an image whose probability lies near the threshold (as ``cxr evaluate`` could until it
computed in fp32 by default). This predicts a ``NORMAL/`` +
``PNEUMONIA/`` folder both ways on the CPU (bf16 is emulated where the CPU lacks it: slower, the same rounding) and
prints the differences in P(PNEUMONIA), the images on opposite sides of the threshold, and each way's confusion.

    python scripts/numerics_check.py --data runs/val748
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from model_on_folder import model_and_folder

from cxr.evaluate import probabilities


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a folder with NORMAL/ and PNEUMONIA/")
    ap.add_argument("--model", default="default")
    ap.add_argument("--cache-dir", help="image cache (default: the model config's)")
    args = ap.parse_args(argv)

    probs = {}
    for bf16 in (False, True):
        ckpt, prepared, logits = model_and_folder(args.model, args.data, args.cache_dir, bf16=bf16)
        probs["bf16" if bf16 else "fp32"] = probabilities(logits(prepared.images))
    labels, t = np.asarray(prepared.labels), ckpt.threshold
    d = np.abs(probs["bf16"] - probs["fp32"])
    print(f"{args.model} on {len(labels)} images of {args.data}, threshold {t:.4f}")
    print(f"|P(bf16) - P(fp32)|: mean {d.mean():.2g}, median {np.median(d):.2g}, max {d.max():.2g}")
    for name, p in probs.items():
        pred = p >= t
        cm = [[int(((labels == c) & (pred == k)).sum()) for k in (0, 1)] for c in (0, 1)]
        print(f"{name}: accuracy {(pred == labels).mean():.4f}, confusion matrix {cm}")
    for i in np.flatnonzero((probs["bf16"] >= t) != (probs["fp32"] >= t)):
        print(f"  label differs: {Path(prepared.samples[i].path).name} (class {labels[i]}): "
              f"fp32 {probs['fp32'][i]:.4f}, bf16 {probs['bf16'][i]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

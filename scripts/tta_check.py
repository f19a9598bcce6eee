"""Would test-time augmentation help? Predictions as they are and averaged over augmented views, for comparison.

Every image of a ``NORMAL/`` + ``PNEUMONIA/`` folder is predicted as it is and under ``--views`` draws of the
model's own training augmentation (its config's rotation, shift, scale, brightness and contrast; draw ``k`` of image
``i`` seeded by (seed, k, i), so a rerun gives the same views). The test-time-augmented prediction averages the
logits of the image as it is and its views. Both sets go to ``OUT/as_is/predictions_val.csv`` and
``OUT/tta/predictions_val.csv`` in ``cxr evaluate``'s format, so that ``scripts/compare_predictions.py`` can measure
the difference with a paired bootstrap:

    python scripts/tta_check.py --data runs/val748 --views 8 --out runs/tta-val748
    cd runs/tta-val748 && python ../../scripts/compare_predictions.py as_is/predictions_val.csv tta/predictions_val.csv

One recipe, fixed before looking: the training augmentation, 8 views plus the image itself, logits averaged. Trying
several recipes on the validation images and keeping the best would be choosing on noise.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
from model_on_folder import model_and_folder

from cxr.config import CLASS_NAMES
from cxr.data import XrayDataset, train_transform
from cxr.evaluate import probabilities


def write(path: Path, samples, labels: np.ndarray, probs: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "prob_pneumonia"])
        for s, y, p in zip(samples, labels, probs, strict=True):
            w.writerow([s.path, CLASS_NAMES[int(y)], f"{p:.6f}"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a folder with NORMAL/ and PNEUMONIA/")
    ap.add_argument("--model", default="default")
    ap.add_argument("--views", type=int, default=8, help="augmented views per image, besides the image itself")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", required=True, help="folder for the two prediction files")
    ap.add_argument("--cache-dir", help="image cache (default: the model config's)")
    args = ap.parse_args(argv)

    ckpt, prepared, logits = model_and_folder(args.model, args.data, args.cache_dir)
    cfg = ckpt.config

    as_is = logits(prepared.images)
    views = XrayDataset(prepared, train_transform(cfg), seed=args.seed)
    total = as_is.clone()
    for k in range(args.views):
        views.set_epoch(k)
        total += logits(torch.stack([views[i][0][0] for i in range(len(views))]))
        print(f"view {k + 1}/{args.views}", file=sys.stderr, flush=True)
    tta = total / (args.views + 1)
    out = Path(args.out)
    write(out / "as_is" / "predictions_val.csv", prepared.samples, prepared.labels, probabilities(as_is))
    write(out / "tta" / "predictions_val.csv", prepared.samples, prepared.labels, probabilities(tta))
    print(f"{args.model}: {len(prepared.labels)} images from {args.data}, {cfg.image_size} px, {args.views} views; "
          f"wrote {out}/as_is and {out}/tta")
    return 0


if __name__ == "__main__":
    sys.exit(main())

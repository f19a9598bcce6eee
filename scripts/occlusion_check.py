"""Does a model lean on the region above the lungs? Predictions with a band of each image hidden, top against bottom.

The Grad-CAM grids of the bundled model put its NORMAL evidence on the upper mediastinum and the clavicles, above the
lungs (MODEL_CARD.md). This checks that reading by occlusion: every image of a ``NORMAL/`` + ``PNEUMONIA/`` folder is
predicted as it is, with its top band (a fraction of the height) filled with the image's mean grey, and, as a
control that also changes the picture without touching the upper chest, with its bottom band filled the same way.
For each class it prints the mean P(PNEUMONIA) and how many labels change at the model's threshold. A model that
reads the lungs should move little under either band; one that reads the top band should move far more under it.

    python scripts/occlusion_check.py --data runs/val748 --band 0.2
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from model_on_folder import model_and_folder

from cxr.config import CLASS_NAMES
from cxr.evaluate import probabilities


def occlude(images: np.ndarray, band: float, where: str) -> np.ndarray:
    out = images.copy()
    rows = round(band * images.shape[1])
    fill = images.reshape(len(images), -1).mean(axis=1).round().astype(np.uint8)[:, None, None]
    if where == "top":
        out[:, :rows] = fill
    else:
        out[:, images.shape[1] - rows:] = fill
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a folder with NORMAL/ and PNEUMONIA/")
    ap.add_argument("--model", default="default")
    ap.add_argument("--band", type=float, default=0.2, help="fraction of the image height to hide (default 0.2)")
    ap.add_argument("--cache-dir", help="image cache (default: the model config's)")
    args = ap.parse_args(argv)

    ckpt, prepared, logits = model_and_folder(args.model, args.data, args.cache_dir)
    cfg = ckpt.config
    labels = prepared.labels

    def probs(images: np.ndarray) -> np.ndarray:
        return probabilities(logits(images))

    base = probs(prepared.images)
    print(f"{args.model}: {len(labels)} images from {args.data}, {cfg.image_size} px, threshold {ckpt.threshold:.3f}, "
          f"band {args.band:.0%} of the height filled with the image's mean grey")
    print("| class | n | P(PNEUMONIA) as is | top band hidden | bottom band hidden | labels changed: top / bottom |")
    print("|---|---:|---:|---:|---:|---:|")
    variants = {w: probs(occlude(prepared.images, args.band, w)) for w in ("top", "bottom")}
    for c, name in enumerate(CLASS_NAMES):
        m = labels == c
        flips = [int(((v[m] >= ckpt.threshold) != (base[m] >= ckpt.threshold)).sum()) for v in variants.values()]
        print(f"| {name} | {int(m.sum())} | {base[m].mean():.3f} | {variants['top'][m].mean():.3f} | "
              f"{variants['bottom'][m].mean():.3f} | {flips[0]} / {flips[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

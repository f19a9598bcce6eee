"""Peer 2: MONAI's equivalent, as its docs and tutorials show it (``pip install -e '.[bench]'``).

A list of ``{"img": path, "label": k}`` dicts; dictionary transforms; ``CacheDataset`` runs the deterministic
transforms once (load, channel first, resize to 224, scale intensity to 0..1) and keeps the results in memory, so
each epoch runs only the random ones (``RandAffined`` with our ranges: rotation +-10 degrees, shift +-5 %, scale
0.9-1.1; ``RandScaleIntensityd`` +-20 %; ``RandAdjustContrastd`` gamma 0.8-1.2); ``monai.data.DataLoader``;
``monai.networks.nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)``; fp32, NCHW; Adam and
cross-entropy, the loop of MONAI's 2D classification tutorial.

PILReader's ``converter`` makes every image one grey channel (2 of the 116 Kermany originals are stored as RGB),
the documented way to change what PIL returns.

    python benchmarks/peer_monai.py --data DIR/train --steps 5
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader
from monai.networks.nets import DenseNet121
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    RandAdjustContrastd,
    RandAffined,
    RandScaleIntensityd,
    Resized,
    ScaleIntensityd,
)
from torch import nn

CLASSES = ("NORMAL", "PNEUMONIA")


def _grey(image):
    return image.convert("L")


def file_list(root: str) -> list[dict]:
    return [{"img": str(f), "label": k} for k, cls in enumerate(CLASSES) for f in sorted((Path(root) / cls).glob("*"))]


def make_transforms(size: int = 224) -> Compose:
    return Compose([
        LoadImaged(keys="img", reader="PILReader", converter=_grey, image_only=True),
        EnsureChannelFirstd(keys="img"),
        Resized(keys="img", spatial_size=(size, size)),
        ScaleIntensityd(keys="img"),
        # CacheDataset caches everything above; everything below runs per epoch.
        RandAffined(keys="img", prob=1.0, rotate_range=math.radians(10), translate_range=(0.05 * size, 0.05 * size),
                    scale_range=(0.1, 0.1), padding_mode="zeros"),
        RandScaleIntensityd(keys="img", factors=0.2, prob=1.0),
        RandAdjustContrastd(keys="img", gamma=(0.8, 1.2), prob=1.0),
    ])


def make_dataset(root: str, size: int = 224, cache_workers: int | None = None) -> CacheDataset:
    return CacheDataset(data=file_list(root), transform=make_transforms(size), cache_rate=1.0,
                        num_workers=cache_workers or os.cpu_count(), progress=False)


def make_loader(dataset: CacheDataset, batch_size: int = 32) -> DataLoader:
    # The tutorials use 4 to 10 workers on a workstation; here, one per core.
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=min(4, os.cpu_count() or 1))


def make_model() -> nn.Module:
    return DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)


def train_steps(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                steps: int, device: torch.device | str = "cpu") -> int:
    """``steps`` training steps, loading included; returns the number of images seen."""
    model.train()
    seen = 0
    for batch in itertools.islice(loader, steps):  # not enumerate + break: that loaded one more batch, timed
        inputs, labels = batch["img"].to(device), batch["label"].to(device)
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    return seen


def load_only(loader: DataLoader, batches: int) -> int:
    seen = 0
    for batch in itertools.islice(loader, batches):  # enumerate + break had loaded (and timed) one batch more
        seen += len(batch["label"])
    return seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder with NORMAL/ and PNEUMONIA/")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    start = time.perf_counter()
    dataset = make_dataset(args.data)
    print(f"cached {len(dataset)} images in {time.perf_counter() - start:.1f} s")
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    n = train_steps(model, make_loader(dataset, args.batch_size), optimizer, nn.CrossEntropyLoss(), args.steps)
    print(f"{n} images in {time.perf_counter() - start:.1f} s: {n / (time.perf_counter() - start):.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

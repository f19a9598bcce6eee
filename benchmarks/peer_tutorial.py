"""Peer 1: the plain pipeline most PyTorch tutorials show, written the way they write it.

``torchvision.datasets.ImageFolder`` opens and decodes every full-resolution JPEG in every epoch (its default loader
converts to RGB), ``Resize((224, 224))``, ``ToTensor``, ``Normalize`` with the ImageNet mean and std; a default
``DataLoader`` (no workers); torchvision's DenseNet-121 with a new two-class head; fp32, NCHW; Adam and
cross-entropy. No augmentation (the issue's definition of the peer; augmentation would only make it slower).

    python benchmarks/peer_tutorial.py train --data DIR/train --steps 5    # DIR/train/{NORMAL,PNEUMONIA}/*.jpeg
    python benchmarks/peer_tutorial.py predict IMAGE.jpeg                  # one image, end to end from start-up

The figure scripts import :func:`make_loader`, :func:`make_model` and :func:`train_steps` from here.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, models, transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_transform(size: int = 224) -> transforms.Compose:
    return transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def make_loader(root: str, batch_size: int = 32, size: int = 224) -> DataLoader:
    dataset = datasets.ImageFolder(root, transform=make_transform(size))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True)


def make_model() -> nn.Module:
    model = models.densenet121(weights=None)
    model.classifier = nn.Linear(model.classifier.in_features, 2)
    return model


def train_steps(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                steps: int, device: torch.device | str = "cpu") -> int:
    """``steps`` training steps, loading included; returns the number of images seen."""
    model.train()
    seen = 0
    for images, labels in itertools.islice(loader, steps):  # not enumerate + break: that loaded one more, timed
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    return seen


def load_only(loader: DataLoader, batches: int) -> int:
    """Iterate ``batches`` batches without a model; returns the number of images."""
    seen = 0
    for _, labels in itertools.islice(loader, batches):  # enumerate + break had loaded (and timed) one batch more
        seen += len(labels)
    return seen


@torch.no_grad()
def predict(path: str) -> float:
    """P(class 1) for one image: the tutorial's inference cell (random weights: the cost does not depend on them)."""
    from PIL import Image

    model = make_model().eval()
    x = make_transform()(Image.open(path).convert("RGB")).unsqueeze(0)
    return torch.softmax(model(x), dim=1)[0, 1].item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--batch-size", type=int, default=32)
    pr = sub.add_parser("predict")
    pr.add_argument("image")
    args = p.parse_args(argv)
    if args.cmd == "predict":
        print(f"{args.image}: P(class 1) = {predict(args.image):.3f}")
        return 0
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    n = train_steps(model, make_loader(args.data, args.batch_size), optimizer, nn.CrossEntropyLoss(), args.steps)
    print(f"{n} images in {time.perf_counter() - start:.1f} s: {n / (time.perf_counter() - start):.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""cxr's own training path, assembled from the library the way :func:`cxr.train.train` assembles it.

The loader is :class:`cxr.train.TrainBatches`, the one ``cxr train`` uses (one process here); the step is
:func:`cxr.train.train_one_epoch` itself, so the timings are of the code a user runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from cxr.config import Config
from cxr.data import Prepared, XrayDataset, prepare, scan
from cxr.model import build_model
from cxr.train import TrainBatches, class_weights, train_one_epoch


def prepare_train(root: str | Path, cfg: Config) -> Prepared:
    """The ``train`` split of a dataset root, decoded through the cache (built here if cold)."""
    return prepare(scan(root)["train"], cfg)


def train_loader(prepared: Prepared, cfg: Config, epoch: int = 0, device: torch.device | None = None, *,
                 dataset_class: type[XrayDataset] = XrayDataset):
    """The training DataLoader of ``cxr train`` for one epoch (one process)."""
    return TrainBatches(prepared, cfg, device=device, dataset_class=dataset_class).loader(epoch)


class Trainer:
    """Model, optimiser and loss as ``cxr train`` builds them; :meth:`run` times whole steps, loading included."""

    def __init__(self, prepared: Prepared, cfg: Config, *, bf16: bool, channels_last: bool, compile: bool = False,
                 device: str | torch.device = "cpu") -> None:
        self.prepared, self.cfg = prepared, cfg
        self.device = torch.device(device)
        self.bf16, self.channels_last = bf16, channels_last
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch, cfg.weights).to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.step_model = torch.compile(model) if compile else model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.criterion = nn.CrossEntropyLoss(weight=class_weights(prepared.labels), reduction="sum").to(self.device)
        self.epoch = 0

    def run(self, steps: int) -> tuple[int, float]:
        """``steps`` training steps through :func:`cxr.train.train_one_epoch`: (images, wall seconds)."""
        loader = train_loader(self.prepared, self.cfg, self.epoch, self.device)
        start = time.perf_counter()
        row = train_one_epoch(self.step_model, loader, self.criterion, self.optimizer, cfg=self.cfg,
                              device=self.device, bf16=self.bf16, channels_last=self.channels_last, epoch=self.epoch,
                              steps_per_epoch=steps, total_steps=1000 * steps)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.epoch += 1
        self.last = row
        # The images the steps trained on: fewer than steps x batch when the data ran out first.
        return round(row["images_per_s"] * row["seconds"]), seconds

"""Shared by the model-checking scripts: a model on the CPU and a labelled folder, prepared as ``cxr evaluate`` does."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from cxr.data import Prepared, prepare, scan
from cxr.evaluate import predict_logits
from cxr.model import Checkpoint, load_checkpoint, use_bf16, use_channels_last


def model_and_folder(model: str, data: str, cache_dir: str | None = None, *, bf16: bool | None = None
                     ) -> tuple[Checkpoint, Prepared, Callable[[np.ndarray | torch.Tensor], torch.Tensor]]:
    """The checkpoint, the folder's images (``NORMAL/`` + ``PNEUMONIA/``) at the model's size, and a function giving
    the model's logits for uint8 images, with the model config's speed settings (bf16, channels_last); ``bf16`` True
    or False overrides the config's choice for this machine."""
    ckpt = load_checkpoint(model)
    cfg = ckpt.config
    if cache_dir:
        cfg = dataclasses.replace(cfg, cache_dir=cache_dir)
    device = torch.device("cpu")
    net = ckpt.build(device)
    if bf16 is not None:
        cfg = dataclasses.replace(cfg, amp="on" if bf16 else "off", channels_last="on" if bf16 else "off")
    channels_last = use_channels_last(cfg, device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    (split,) = scan(data, require_both_classes=True).values()
    prepared = prepare(split, cfg)

    def logits(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return predict_logits(net, images, mean=cfg.mean, std=cfg.std, device=device, bf16=use_bf16(cfg, device),
                              channels_last=channels_last)

    return ckpt, prepared, logits

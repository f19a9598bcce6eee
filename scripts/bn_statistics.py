"""How much a checkpoint's validation loss depends on where its batch-norm statistics come from.

For each checkpoint of a run directory, the validation loss (cxr train's class-weighted cross-entropy) with the
statistics stored in it, then recomputed over the un-augmented training images, then over one pass of augmented
training batches (what ``cxr train --swa-epochs`` does for the weight average). The split and config are the run's.

    python scripts/bn_statistics.py runs/kermany192-v2-swa1e-4 last.pt swa.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from cxr.config import load_config
from cxr.data import prepare
from cxr.model import autocast, load_checkpoint, normalize, use_bf16, use_channels_last
from cxr.train import class_weights, recompute_batch_norm, split_dataset, validate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run directory of cxr train")
    ap.add_argument("checkpoints", nargs="+", help="checkpoint file names in it (last.pt, swa.pt, best.pt)")
    args = ap.parse_args(argv)

    cfg = load_config(args.run / "config.yaml")
    device = torch.device("cpu")
    splits = split_dataset(cfg, args.run, True, write=False)
    prepared = {name: prepare(splits[name], cfg) for name in ("train", "val")}
    criterion = nn.CrossEntropyLoss(weight=class_weights(prepared["train"].labels), reduction="sum")
    bf16, channels_last = use_bf16(cfg, device), use_channels_last(cfg, device)

    def val_loss(model: nn.Module) -> float:
        return validate(model, prepared["val"], criterion, cfg=cfg, device=device, bf16=bf16,
                        channels_last=channels_last)["val_loss"]

    def plain_images(model: nn.Module) -> None:
        images = prepared["train"].images
        batches = (normalize(torch.as_tensor(images[i:i + cfg.eval_batch_size]).unsqueeze(1), cfg.mean, cfg.std,
                             channels_last) for i in range(0, len(images), cfg.eval_batch_size))
        with torch.no_grad(), autocast(device, bf16):
            torch.optim.swa_utils.update_bn(batches, model)
        model.eval()

    print("| checkpoint | own statistics | un-augmented train images | augmented train batches |")
    print("|---|---:|---:|---:|")
    for name in args.checkpoints:
        model = load_checkpoint(args.run / name).build(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        own = val_loss(model)
        plain_images(model)
        plain = val_loss(model)
        recompute_batch_norm(model, prepared["train"], cfg, device, epoch=100)
        print(f"| {name} | {own:.4f} | {plain:.4f} | {val_loss(model):.4f} |", flush=True)


if __name__ == "__main__":
    main()

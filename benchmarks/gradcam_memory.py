"""Grad-CAM's peak memory and time: the graph from the explained block on (as shipped, session 22) against the whole
network's graph (the input and every parameter requiring gradients, as cxr computed it before).

Each round runs each variant in a fresh process (so its peak resident memory is its own): the bundled model, a batch
of ``--batch`` random 224 px images, one call of ``cxr.explain.heatmaps_for_images`` (as shipped) or of the old
computation reproduced below, after one warm-up call on one image. The maps of the two are checked equal to 1e-5.

    python benchmarks/gradcam_memory.py --rounds 3 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import cell, header, loadavg, ratio_cell

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from cxr.explain import heatmaps_for_images
from cxr.model import load_checkpoint, normalize

variant, batch = sys.argv[1], int(sys.argv[2])
ckpt = load_checkpoint("default")
net = ckpt.build("cpu").eval()
images = np.random.default_rng(0).integers(0, 256, (batch, 224, 224), dtype=np.uint8)


def whole_graph(images):
    # cxr before session 22: the input and every parameter require gradients, so autograd keeps every activation
    captured = []
    hook = net.features.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        x = normalize(torch.from_numpy(images)[:, None], ckpt.config.mean, ckpt.config.std).requires_grad_(True)
        logits = net(x).float()
        (grads,) = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), captured[-1])
    finally:
        hook.remove()
    cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * captured[-1]).sum(dim=1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    low = cam.flatten(1).min(1).values[:, None, None]
    return ((cam - low) / (cam.flatten(1).max(1).values[:, None, None] - low)).numpy()


def shipped(images):
    # one pass of them all, as figure 11 measured it: since session 24 the CPU's passes are capped at 8 images of
    # 224 px (figure 14), which would mix that change into this comparison
    import cxr.evaluate

    cxr.evaluate.CPU_FORWARD_PIXELS = 10 ** 12
    return heatmaps_for_images(net, images, mean=ckpt.config.mean, std=ckpt.config.std, target=1,
                               batch_size=len(images))[0]


run = whole_graph if variant == "whole graph" else shipped
run(images[:1])
start = time.perf_counter()
maps = run(images)
seconds = time.perf_counter() - start
np.save(sys.argv[3], maps)
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

VARIANTS = ("whole graph", "shipped")


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    load_before = loadavg()
    results: dict[str, dict[str, list[float]]] = {v: {"seconds": [], "peak_mb": []} for v in VARIANTS}
    maps_file = {v: f"/tmp/cxr-bench-gradcam-{os.getpid()}-{i}.npy" for i, v in enumerate(VARIANTS)}
    for r in range(args.rounds):
        for v in VARIANTS:
            out = subprocess.run([sys.executable, "-c", CHILD, v, str(args.batch), maps_file[v]], capture_output=True,
                                 text=True, check=True)
            for k, value in json.loads(out.stdout.strip().splitlines()[-1]).items():
                results[v][k].append(value)
        same = np.abs(np.load(maps_file["shipped"]) - np.load(maps_file["whole graph"])).max()
        if same > 1e-5:
            raise SystemExit(f"the maps differ by {same}")
        print(f"round {r + 1}/{args.rounds} (load {loadavg()}): " + ", ".join(
            f"{v} {results[v]['peak_mb'][-1]:.0f} MB {results[v]['seconds'][-1]:.2f} s" for v in VARIANTS)
              + f"; maps differ by {same:.1e}", file=sys.stderr, flush=True)
    for f in maps_file.values():
        os.remove(f)
    header(argv, "gradcam_memory.py", args.rounds, load_before)
    base = results["whole graph"]
    print(f"| Grad-CAM of {args.batch} images at 224 px | peak resident MB, median [min, max] | vs whole graph | "
          "seconds | vs whole graph |")
    print("|---|---:|---:|---:|---:|")
    for v in VARIANTS:
        print(f"| {v} | {cell(results[v]['peak_mb'], '.0f')} | {ratio_cell(results[v]['peak_mb'], base['peak_mb'])} | "
              f"{cell(results[v]['seconds'], '.2f')} | {ratio_cell(results[v]['seconds'], base['seconds'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

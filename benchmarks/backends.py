"""CPU latency and throughput of the inference backends, measured in the same run: PyTorch (fp32, and bf16 autocast
without and with channels_last where the CPU has bf16 instructions) and ONNX Runtime (fp32, the model exported in
memory).

Each round times every backend in turn (interleaved, so background load hits them alike): latency is one image per
call (the service's case), throughput is ``--batch`` images per call. The table gives the median over rounds with
the min and max, and each backend's ratios to ONNX Runtime's latency and to PyTorch fp32's throughput, taken per
round.

    python benchmarks/backends.py                          # random-init DenseNet-121 at 224 px (speed only)
    python benchmarks/backends.py --model runs/cxr --rounds 5 --batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cell, loadavg, ratio_cell


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}")


def tiny_or_given(model: str | None, image_size: int, tmp: Path) -> str:
    """The model to time: the one given, or a random-init DenseNet-121 (timings do not depend on the weights)."""
    if model:
        return model
    from cxr.config import load_config
    from cxr.model import Checkpoint, build_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp / "random-densenet121.pt"
    save_checkpoint(Checkpoint("densenet121", build_model("densenet121", "none").state_dict(),
                               load_config(overrides={"image_size": image_size})), path)
    return str(path)


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint or run directory (default: random-init DenseNet-121)")
    p.add_argument("--image-size", type=int, default=224, help="for the random-init model (default 224)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; the table shows median [min, max] (default 5)")
    p.add_argument("--latency-calls", type=int, default=20, help="single-image calls per round (median taken)")
    p.add_argument("--batch", type=int, default=32, help="images per call for throughput (default 32)")
    p.add_argument("--batches", type=int, default=3, help="batched calls per round (default 3)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads for both backends (0: their default)")
    p.add_argument("--json", help="also write the raw numbers here")
    args = p.parse_args(argv)
    load_before = loadavg()

    from cxr.evaluate import predict_logits
    from cxr.export import load_onnx_predictor
    from cxr.model import cpu_has_fast_bf16, load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = load_checkpoint(tiny_or_given(args.model, args.image_size, Path(tmp)))
    cfg = ckpt.config
    net = ckpt.build("cpu")
    onnx = load_onnx_predictor(ckpt, threads=args.threads)
    cpu = torch.device("cpu")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, cfg.image_size, cfg.image_size), dtype=np.uint8)

    net_cl = ckpt.build("cpu").to(memory_format=torch.channels_last)

    def torch_fn(bf16: bool, channels_last: bool = False):
        model = net_cl if channels_last else net
        return lambda x: predict_logits(model, x, mean=cfg.mean, std=cfg.std, device=cpu, batch_size=len(x),
                                        bf16=bf16, channels_last=channels_last)

    backends = {"torch fp32": torch_fn(False)}
    if cpu_has_fast_bf16():
        backends["torch bf16"] = torch_fn(True)
        backends["torch bf16 + channels_last"] = torch_fn(True, True)
    backends["onnxruntime fp32"] = lambda x: onnx.predict_uint8(x, batch_size=len(x))

    for fn in backends.values():  # warm-up: first calls allocate and pick kernels
        fn(images[:1])
        fn(images)
    results: dict[str, dict[str, list[float]]] = {k: {"latency_ms": [], "images_per_s": []} for k in backends}
    for r in range(args.rounds):
        for name, fn in backends.items():
            lat = statistics.median(timed(lambda fn=fn: fn(images[:1]), args.latency_calls))
            batch_times = timed(lambda fn=fn: fn(images), args.batches)
            results[name]["latency_ms"].append(1e3 * lat)
            results[name]["images_per_s"].append(args.batch / statistics.median(batch_times))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {v['latency_ms'][-1]:.1f} ms, {v['images_per_s'][-1]:.1f} img/s" for k, v in results.items()),
            file=sys.stderr)

    # Ratios are taken per round (the backends ran back to back in it), then their median [min, max].
    fast, base = "onnxruntime fp32", "torch fp32"
    print(f"\nmachine: {machine()}")
    print(f"model: {ckpt.arch} at {cfg.image_size} px ({'given' if args.model else 'random init'}); "
          f"{args.rounds} rounds, median [min, max]")
    print(f"command: python benchmarks/backends.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"load average (1/5/15 min) before {load_before}, after {loadavg()}\n")
    print(f"| backend | latency, 1 image (ms) | vs {fast} | throughput, batch {args.batch} (images/s) | vs {base} |")
    print("|---|---:|---:|---:|---:|")
    for name, v in results.items():
        lat, ips = v["latency_ms"], v["images_per_s"]
        print(f"| {name} | {cell(lat)} | {ratio_cell(lat, results[fast]['latency_ms']) if name != fast else '1'} | "
              f"{cell(ips)} | {ratio_cell(ips, results[base]['images_per_s']) if name != base else '1'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "args": vars(args), "results": results},
                                              indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Figure 4b: ``cxr predict`` on one full-resolution JPEG, end to end from process start, seconds (target < 3 s).

Times whole processes, interleaved round by round: ``cxr predict`` with the bundled model on PyTorch (at its
default thread count, and with ``--threads 1``); the same with ``--backend onnx`` on the bundled model exported once
to an ``.onnx`` file (``cxr export``, before the rounds); peer 1's inference (``benchmarks/peer_tutorial.py
predict``: torchvision DenseNet-121, the tutorial transform); and two floors, ``python -c "import torch"`` and
``python -c "import torch, torchvision"``. ``--importtime`` adds the import time of the heavy packages in one
``cxr predict`` start-up (``python -X importtime``); ``--hyperfine`` also runs ``hyperfine`` (if installed) on the
cxr commands as a cross-check.

    python benchmarks/predict_cli.py --rounds 7 --importtime
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ORIGINALS, REPO, cell, dump_json, header, loadavg

IMAGE = ORIGINALS / "val" / "PNEUMONIA" / "person1946_bacteria_4874.jpeg"


def run_once(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - start


PACKAGES = ("torch", "torchvision", "numpy", "PIL", "rich", "safetensors", "onnxruntime", "sklearn", "yaml")


def import_breakdown(cmd: list[str]) -> list[tuple[str, float]]:
    """Cumulative import seconds of the heavy packages in one run of ``cmd`` (a Python command), and in all."""
    out = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True, cwd=REPO)
    found: dict[str, float] = {}
    total = 0.0
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, name = line.split("|")
        if not cumulative.strip().isdigit():
            continue
        if name.startswith(" ") and not name.startswith("  "):
            total += int(cumulative) / 1e6  # top level: each import counted once
        if name.strip() in PACKAGES:  # a package's own line comes once, at whatever depth it was first imported
            found[name.strip()] = int(cumulative) / 1e6
    return [("all imports", total), *sorted(found.items(), key=lambda kv: -kv[1])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--image", type=Path, default=IMAGE)
    p.add_argument("--importtime", action="store_true", help="also break one start-up down by package")
    p.add_argument("--hyperfine", action="store_true", help="also run hyperfine on the cxr commands")
    p.add_argument("--json")
    args = p.parse_args(argv)
    load_before = loadavg()
    py = sys.executable
    cxr = str(Path(py).parent / "cxr")
    img = str(args.image)
    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-predict-"))
    try:
        onnx = tmp / "bundled.onnx"
        subprocess.run([cxr, "export", "--model", "default", "--format", "onnx", "--output", str(onnx)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        commands = {
            "cxr predict (PyTorch, bundled model)": [cxr, "predict", "--model", "default", img],
            "cxr predict --threads 1 (PyTorch, bundled model)": [cxr, "predict", "--threads", "1", "--model",
                                                                 "default", img],
            "cxr predict --backend onnx (bundled model as .onnx)": [cxr, "predict", "--backend", "onnx", "--model",
                                                                    str(onnx), img],
            "peer 1: tutorial inference script": [py, str(REPO / "benchmarks" / "peer_tutorial.py"), "predict", img],
            "floor: python -c 'import torch'": [py, "-c", "import torch"],
            "floor: python -c 'import torch, torchvision'": [py, "-c", "import torch, torchvision"],
        }
        for cmd in commands.values():  # warm the page cache and .pyc files
            run_once(cmd)
        times: dict[str, list[float]] = {k: [] for k in commands}
        for r in range(args.rounds):
            for name, cmd in commands.items():
                times[name].append(run_once(cmd))
            print(f"round {r + 1}/{args.rounds} (load {loadavg()}): " + ", ".join(
                f"{k.split(' (')[0]} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr, flush=True)
        breakdown = import_breakdown([py, "-m", "cxr", "predict", "--model", "default", img]) if args.importtime \
            else []
        hyperfine = ""
        if args.hyperfine and shutil.which("hyperfine"):
            keys = [k for k in commands if k.startswith("cxr")]
            out = subprocess.run(["hyperfine", "-N", "--warmup", "1", "--runs", str(args.rounds), "--export-json",
                                  str(tmp / "hf.json"), *[" ".join(commands[k]) for k in keys]],
                                 capture_output=True, text=True, cwd=REPO)
            if out.returncode == 0:
                hf = json.loads((tmp / "hf.json").read_text())["results"]
                hyperfine = "; ".join(f"{k}: median {r['median']:.2f} s [{r['min']:.2f}, {r['max']:.2f}]"
                                      for k, r in zip(keys, hf, strict=True))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    header(argv, "predict_cli.py", args.rounds, load_before)
    print(f"one {args.image.name} ({args.image.stat().st_size // 1000} kB JPEG); whole process, wall seconds; "
          f"threads: each program's default ({os.cpu_count()} logical cores)\n")
    ours = times["cxr predict (PyTorch, bundled model)"]
    print("| command | seconds, median [min, max] | vs cxr predict (PyTorch) | target < 3 s |")
    print("|---|---:|---:|---|")
    for name, v in times.items():
        ratio = cell([a / b for a, b in zip(v, ours, strict=True)], ".2f") + "x"
        met = ("met" if sorted(v)[len(v) // 2] < 3 else "missed") if name.startswith("cxr") else ""
        print(f"| {name} | {cell(v, '.2f')} | {ratio} | {met} |")
    if breakdown:
        print("\none `cxr predict` start-up, import time by top-level package (python -X importtime, cumulative s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in breakdown))
    if hyperfine:
        print(f"\nhyperfine cross-check ({args.rounds} runs each, not interleaved): {hyperfine}")
    dump_json(args.json, {"args": vars(args), "times": times, "import_breakdown": breakdown, "hyperfine": hyperfine,
                          "load_before": load_before, "load_after": loadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

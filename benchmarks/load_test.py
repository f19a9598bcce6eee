"""Load test of the web service on loopback: N concurrent clients posting a real X-ray for T seconds.

Reports, per run and as median [min, max] over runs: requests, errors (anything but 200, target 0), p50 and p99
latency as the client sees it, and throughput. Starts the service itself in a child process (``--model``), or
targets one already running (``--url``).

    python benchmarks/load_test.py --clients 4 --duration 10 --runs 5                 # random-init DenseNet-121
    python benchmarks/load_test.py --model runs/cxr --backend onnx --clients 8 --duration 20 --runs 5
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --no-heatmap
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import loadavg

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "cxr" / "sample" / "kermany-mini" / "test" / "PNEUMONIA"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_model(path: Path, image_size: int) -> Path:
    """A random-init DenseNet-121 checkpoint: the service's speed does not depend on the weights."""
    import torch

    from cxr.config import load_config
    from cxr.model import Checkpoint, build_model, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(Checkpoint("densenet121", build_model("densenet121", "none").state_dict(),
                               load_config(overrides={"image_size": image_size})), path)
    return path


def start_service(model: str, backend: str, port: int, max_concurrency: int, threads: int | None) -> subprocess.Popen:
    code = ("import logging, sys; logging.basicConfig(level=logging.WARNING); from cxr.serve import serve; "
            f"serve({model!r}, '127.0.0.1', {port}, backend={backend!r}, max_concurrency={max_concurrency}, "
            f"threads={threads}, max_queue=1024, device='cpu', log_level='warning')")
    return subprocess.Popen([sys.executable, "-c", code])


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 180) -> None:
    import httpx2 as httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the service exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer /api/v1/health within {timeout:.0f} s")


async def one_run(url: str, image: bytes, clients: int, duration: float, heatmap: bool) -> dict:
    import httpx2 as httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    target = f"{url}/api/v1/predict?heatmap={'true' if heatmap else 'false'}"
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        start = time.perf_counter()
        stop = start + duration

        async def worker() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    r = await client.post(target, files={"file": ("xray.jpeg", image, "image/jpeg")})
                    key = None if r.status_code == 200 else f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    key = type(e).__name__
                if key is None:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors[key] = errors.get(key, 0) + 1

        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1e3
    return {"requests": len(latencies) + sum(errors.values()), "errors": sum(errors.values()), "error_kinds": errors,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "throughput_rps": len(latencies) / elapsed, "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running service (default: start one)")
    where.add_argument("--model", help="checkpoint or run directory to serve (default: random-init DenseNet-121)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument("--image-size", type=int, default=224, help="for the random-init model (default 224)")
    p.add_argument("--max-concurrency", type=int, default=2, help="the service's worker threads (default 2)")
    p.add_argument("--threads", type=int, help="the service's intra-op threads per prediction (default: its own)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("--runs", type=int, default=5, help="runs; the summary is median [min, max] (default 5)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the first run (default 3)")
    p.add_argument("--no-heatmap", dest="heatmap", action="store_false", help="ask for predictions only")
    p.add_argument("--image", type=Path, default=sorted(SAMPLE.glob("*.jpeg"))[0], help="the X-ray to send")
    p.add_argument("--json", help="also write the raw numbers here")
    args = p.parse_args(argv)
    load_before = loadavg()

    image = args.image.read_bytes()
    proc, tmp = None, None
    url = args.url.rstrip("/") if args.url else None
    try:
        if url is None:
            model = args.model
            if model is None:
                tmp = tempfile.TemporaryDirectory()
                model = str(random_model(Path(tmp.name) / "random-densenet121.pt", args.image_size))
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start_service(model, args.backend, port, args.max_concurrency, args.threads)
        wait_ready(url, proc)
        if args.warmup > 0:
            asyncio.run(one_run(url, image, args.clients, args.warmup, args.heatmap))
        runs = []
        for i in range(args.runs):
            r = asyncio.run(one_run(url, image, args.clients, args.duration, args.heatmap))
            runs.append(r)
            print(f"run {i + 1}/{args.runs}: {r['requests']} requests, {r['errors']} errors {r['error_kinds'] or ''}"
                  f" p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, {r['throughput_rps']:.2f} req/s",
                  file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if tmp is not None:
            tmp.cleanup()

    def cell(key: str, fmt: str) -> str:
        v = [r[key] for r in runs]
        return f"{statistics.median(v):{fmt}} [{min(v):{fmt}}, {max(v):{fmt}}]"

    print(f"\ncommand: python benchmarks/load_test.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"load average (1/5/15 min) before {load_before}, after {loadavg()}")
    heat = "n/a" if args.backend == "onnx" else "on" if args.heatmap else "off"
    threads = "the service's default" if args.threads is None else args.threads
    print(f"{args.clients} clients x {args.duration:g} s, {args.runs} runs, backend {args.backend}, heatmap {heat}, "
          f"max_concurrency {args.max_concurrency}, threads {threads}, {os.cpu_count()} logical cores; "
          "median [min, max]\n")
    print("| errors | p50 latency (ms) | p99 latency (ms) | throughput (req/s) |")
    print("|---:|---:|---:|---:|")
    print(f"| {sum(r['errors'] for r in runs)} | {cell('p50_ms', '.0f')} | {cell('p99_ms', '.0f')} | "
          f"{cell('throughput_rps', '.2f')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs},
                                              indent=2), encoding="utf-8")
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the benchmark scripts: the machine line, the full-resolution test set, interleaved timing, tables.

Every figure is measured the same way: the variants (our path and its peers) run in turn inside one round, A, B, C,
A, B, C, ..., so that the background load of a shared machine hits them alike; each cell is the median over rounds
with the min and max, and the ratio column is the median of the per-round ratios (a round's variants ran within
seconds of each other, so their ratio holds even when absolute times drift).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ORIGINALS = SHARED_DATA / "kermany-original-sample"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def loadavg() -> str:
    """The 1/5/15-minute load averages (the machine is shared: say how busy it was)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3])
    except OSError:
        return "n/a"


def machine() -> str:
    """CPU model, cores, GPU (if any), library versions and torch's thread count."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        flags = ", AVX512-BF16" if "avx512_bf16" in text else ""
        flags += ", AMX" if "amx_bf16" in text else ""
    except OSError:
        pass
    return (f"{cpu_model()}{flags}, {os.cpu_count()} logical cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads by default)")


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_fullres_dataset(dst: Path, repeat: int, originals: Path = ORIGINALS) -> Path:
    """``dst/train/{NORMAL,PNEUMONIA}/`` holding each original JPEG ``repeat`` times, every copy with distinct bytes.

    A few bytes after the JPEG end-of-image marker make each copy's SHA-256 unique (decoders stop at the marker, so
    the pixels are the original's): the cache, keyed by content, cannot serve one copy from another. The class is
    the original's class folder; train and val originals are pooled.
    """
    files = sorted(originals.glob("*/*/*.jpeg"))
    if not files:
        raise SystemExit(f"no JPEG originals under {originals} (expected */NORMAL|PNEUMONIA/*.jpeg)")
    root = dst / "train"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True, exist_ok=True)
    for f in files:
        data = f.read_bytes()
        for k in range(repeat):
            (root / f.parent.name / f"r{k:03d}_{f.name}").write_bytes(data + b"\0cxr-benchmark-copy-%d" % k)
    return root


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def interleaved(variants: dict[str, Callable[[], tuple[int, float]]], rounds: int, *,
                label: str = "images/s") -> dict[str, list[float]]:
    """Run every variant once per round, in turn; each returns (items, seconds). Returns items/s per round."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        parts = []
        for name, fn in variants.items():
            n, seconds = fn()
            out[name].append(n / seconds)
            parts.append(f"{name} {out[name][-1]:.1f}")
        print(f"round {r + 1}/{rounds} (load {loadavg()}): {label}: " + ", ".join(parts), file=sys.stderr, flush=True)
    return out


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    """(fn's item count, wall seconds)."""
    t = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t


def cell(values: list[float], fmt: str = ".1f") -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def ratio_cell(a: list[float], b: list[float]) -> str:
    """Median [min, max] of the per-round ratios a/b (rounds paired)."""
    return cell([x / y for x, y in zip(a, b, strict=True)], ".2f") + "x"


def print_table(results: dict[str, list[float]], reference: dict[str, str], *, unit: str = "images/s",
                notes: dict[str, str] | None = None) -> None:
    """Markdown table: one row per variant, its rate and its ratio to each named reference variant."""
    refs = list(reference.items())
    head = f"| variant | {unit}, median [min, max] |" + "".join(f" vs {label} |" for label, _ in refs)
    print(head)
    print("|---|---:|" + "---:|" * len(refs))
    for name, v in results.items():
        ratios = "".join(f" {ratio_cell(v, results[key]) if key != name else '1'} |" for _, key in refs)
        print(f"| {name}{(' — ' + notes[name]) if notes and name in notes else ''} | {cell(v)} |{ratios}")


def peer_loaders(root: Path, batch_size: int) -> dict[str, tuple[object, object]]:
    """The two peers' training loaders on a dataset root, by table label: {label: (peer module, loader)}."""
    import peer_monai
    import peer_tutorial

    return {
        "peer 1: tutorial (ImageFolder full-res, fp32)": (peer_tutorial,
                                                           peer_tutorial.make_loader(str(root), batch_size)),
        "peer 2: MONAI (CacheDataset, fp32)": (peer_monai,
                                                peer_monai.make_loader(peer_monai.make_dataset(str(root)), batch_size)),
    }


def header(argv: list[str] | None, script: str, rounds: int, load_before: str) -> None:
    print(f"\nmachine: {machine()}")
    print(f"command: python benchmarks/{script} {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{rounds} rounds, interleaved; load average (1/5/15 min) before {load_before}, after {loadavg()}\n")


def dump_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")

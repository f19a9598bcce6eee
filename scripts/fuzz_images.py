"""Long fuzzing campaign for the image loaders: tests/test_fuzz_images.py with N times the CI's case counts.

    python scripts/fuzz_images.py --scale 20 --runs 5 [--seed 1] [--plain 100000] [--memory-gb 4] [--json out.json]

1. ``--runs`` pytest runs of tests/test_fuzz_images.py (hypothesis seeds ``seed``, ``seed + 1``...), each with
   ``CXR_FUZZ_SCALE=scale``, in a child process whose address space is capped (``RLIMIT_AS``): a case that tried to
   allocate without bound fails as a MemoryError (which the tests do not accept) instead of taking the machine down;
   a crash of a C decoder shows as the child dying on a signal; a hang as hypothesis's per-case deadline (20 s).
   Several runs with different seeds rather than one long one: each explores from a different start.
2. ``--plain`` cases of the same byte mutations drawn by a seeded ``random.Random`` with no hypothesis around them,
   the process's resident memory read every 10 000 cases: flat if nothing leaks.

Prints, and writes with --json, the number of cases per generator and outcome (decoded / refused with ImageError),
wall times, peak resident memory and exit statuses. Results: RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pytest_runs(scale: float, runs: int, seed: int, memory_gb: float) -> dict:
    cap = int(memory_gb * (1 << 30))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    total: dict[str, int] = {}
    out = {"runs": [], "address_space_cap_gb": memory_gb}
    for i in range(runs):
        report = Path(tempfile.mkdtemp()) / "outcomes.json"
        env = {**os.environ, "CXR_FUZZ_SCALE": str(scale), "CXR_FUZZ_REPORT": str(report),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
                   f"--hypothesis-seed={seed + i}", "tests/test_fuzz_images.py"]
        t0 = time.monotonic()
        proc = subprocess.run(command, cwd=ROOT, env=env, preexec_fn=limit, capture_output=True, text=True)
        outcomes = json.loads(report.read_text()) if report.exists() else {}
        for k, v in outcomes.items():
            total[k] = total.get(k, 0) + v
        print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
        out["runs"].append({
            "command": " ".join([f"CXR_FUZZ_SCALE={scale:g}", "python", *command[1:]]),
            "exit_status": proc.returncode, "cases": sum(outcomes.values()),
            "wall_seconds": round(time.monotonic() - t0, 1),
            "summary": proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""})
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    out["outcomes"] = dict(sorted(total.items()))
    out["cases"] = sum(total.values())
    return out


def plain(n: int, seed: int) -> dict:
    """Seeded random mutations of the seed files, no hypothesis: outcomes and resident memory over time."""
    import logging
    import random

    sys.path.insert(0, str(ROOT))
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    import tests.test_fuzz_images as fuzz

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text(encoding="utf-8").split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    rng, names, memory = random.Random(seed), sorted(fuzz.SEEDS), []
    fuzz.OUTCOMES.clear()
    t0, slowest = time.monotonic(), 0.0
    for i in range(n):
        name = names[i % len(names)]
        mutations = []
        for _ in range(rng.randint(1, 8)):
            op, pos = rng.choice(["flip", "insert", "delete", "truncate", "repeat", "int"]), rng.randrange(1 << 30)
            mutations.append({"flip": (op, pos, rng.randrange(256)),
                              "insert": (op, pos, rng.randbytes(rng.randint(1, 64))),
                              "delete": (op, pos, rng.randint(1, 512)), "truncate": (op, pos),
                              "repeat": (op, pos, rng.randint(1, 512), rng.randint(1, 16)),
                              "int": (op, pos, rng.choice(fuzz._INTERESTING), rng.choice(["<H", ">H", "<I", ">I"]))
                              }[op])
        data = fuzz.mutate(fuzz.SEEDS[name], mutations)
        if rng.random() < 0.5:
            data = fuzz.fix_png_crcs(data)
        t = time.monotonic()
        fuzz.check(data, name, "plain")
        slowest = max(slowest, time.monotonic() - t)
        if i % 10_000 == 0 or i == n - 1:
            memory.append([i + 1, round(rss_mb(), 1)])
    return {"cases": n, "seed": seed, "outcomes": dict(fuzz.OUTCOMES), "slowest_case_seconds": round(slowest, 3),
            "rss_mb_by_case": memory, "wall_seconds": round(time.monotonic() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=20, help="multiple of the CI's number of cases per generator")
    ap.add_argument("--runs", type=int, default=5, help="pytest runs, each with its own hypothesis seed")
    ap.add_argument("--seed", type=int, default=1, help="first hypothesis seed (the CI's runs are derandomized)")
    ap.add_argument("--plain", type=int, default=100_000, help="seeded random mutations without hypothesis")
    ap.add_argument("--memory-gb", type=float, default=4.0, help="address-space cap of the fuzzing processes")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = {"hypothesis": pytest_runs(args.scale, args.runs, args.seed, args.memory_gb) if args.runs else None,
              "plain": plain(args.plain, args.seed) if args.plain else None}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return max([r["exit_status"] for r in (result["hypothesis"] or {}).get("runs", [])] or [0])


if __name__ == "__main__":
    sys.exit(main())

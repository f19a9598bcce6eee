"""OpenMP's wait policy on a 2-core machine, quiet and busy: what ``OMP_WAIT_POLICY=PASSIVE`` costs and saves.

PyTorch's CPU kernels run on OpenMP (GNU libgomp in the pip wheels), whose idle threads spin before they sleep. When
another process holds a core, a spinning thread takes the time slices the thread doing the work needs, and every
parallel region waits for a thread that is not running. This script measures, in the same run:

* ``cxr predict --model default IMAGE`` on one full-resolution JPEG (whole process, at torch's default thread count);
* training steps at 224 px, batch 16, at two intra-op threads (``scaling.py``'s child: ``cxr.train.train_one_epoch``);

each with libgomp's default policy and with ``OMP_WAIT_POLICY=PASSIVE`` set for the child, on a quiet machine and with
one competing process busy on a core (``--competitor python``: a pure-Python loop; ``torch``: a one-thread PyTorch
matrix product loop, as another user's ``OMP_NUM_THREADS=1`` training would be), started in a session of its own
(``--session new``, the default: another terminal's or user's job, in its own scheduler autogroup) or in this
script's (``--session same``). Every
child runs under a time limit (``--limit``); a child that hits it is counted at the limit, so the busy default-policy
figures are upper bounds on the speed when marked so.

    python benchmarks/omp_wait.py --rounds 3 --competitor torch                 # competitor in its own session
    python benchmarks/omp_wait.py --rounds 3 --competitor torch --session same  # competitor in this session
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ORIGINALS, REPO, cell, dump_json, header, loadavg, make_fullres_dataset

HERE = Path(__file__).resolve().parent
IMAGE = ORIGINALS / "val" / "PNEUMONIA" / "person1946_bacteria_4874.jpeg"


def child(cmd: list[str], policy: str | None, limit: float) -> tuple[float, str, bool]:
    """(wall seconds, stdout, timed out) of one child process with the given OMP_WAIT_POLICY (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO, env=env, timeout=limit)
    except subprocess.TimeoutExpired:
        return limit, "", True
    return time.perf_counter() - start, out.stdout, False


COMPETITORS = {
    # another user's pure-Python job
    "python": "while True: pass",
    # another user's PyTorch job at one thread (as `OMP_NUM_THREADS=1 cxr train` would be)
    "torch": "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True: a @ a",
}


def spinner(kind: str, new_session: bool) -> subprocess.Popen:
    # In its own session, the competitor is in its own scheduler autogroup (Linux's sched_autogroup, on by default on
    # desktop and many server kernels), as a job started from another terminal or by another user would be.
    return subprocess.Popen([sys.executable, "-c", COMPETITORS[kind]], start_new_session=new_session)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed training steps per child (default 2)")
    p.add_argument("--limit", type=float, default=120.0, help="seconds before a child is stopped (default 120)")
    p.add_argument("--competitor", choices=sorted(COMPETITORS), default="python",
                   help="what the busy rounds compete with (default python)")
    p.add_argument("--session", choices=("new", "same"), default="new",
                   help="start the competitor in a new session (default; another terminal's job) or in this one")
    p.add_argument("--json")
    args = p.parse_args(argv)
    load_before = loadavg()
    cxr = [sys.executable, "-m", "cxr", "predict", "--model", "default", str(IMAGE)]
    # cxr's inference commands set PASSIVE themselves where it is unset (since session 3): the default-policy child
    # runs them with that switched off, or both rows measured PASSIVE.
    cxr_default = [sys.executable, "-c", "import sys, cxr.cli as c; c._PASSIVE_WAIT_COMMANDS = frozenset(); "
                   "sys.exit(c.main(sys.argv[1:]))", "predict", "--model", "default", str(IMAGE)]
    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-omp-"))
    results: dict[str, list[float]] = {}
    capped: dict[str, int] = {}
    try:
        root = make_fullres_dataset(tmp / "data", 1)
        train = [sys.executable, str(HERE / "scaling.py"), "--worker", "--threads", "2", "--size", "224", "--batch",
                 "16", "--steps", str(args.steps), "--cache", str(tmp / "cache"), "--data", str(root.parent)]
        child(train, None, 600)  # fills the cache, so that every timed child reads it
        for r in range(args.rounds):
            for load in ("quiet", "busy"):
                other = spinner(args.competitor, args.session == "new") if load == "busy" else None
                try:
                    for policy in (None, "PASSIVE"):
                        name = f"{load}, {'OMP_WAIT_POLICY=PASSIVE' if policy else 'default policy'}"
                        seconds, _, hit = child(cxr if policy else cxr_default, policy, args.limit)
                        results.setdefault(f"cxr predict (s), {name}", []).append(seconds)
                        capped[f"cxr predict (s), {name}"] = capped.get(f"cxr predict (s), {name}", 0) + hit
                        _, out, hit = child(train, policy, args.limit)
                        rate = json.loads(out.strip().splitlines()[-1])["images_per_s"] if not hit else \
                            16 * args.steps / args.limit
                        results.setdefault(f"training (images/s), {name}", []).append(rate)
                        capped[f"training (images/s), {name}"] = capped.get(f"training (images/s), {name}", 0) + hit
                finally:
                    if other is not None:
                        other.kill()
                        other.wait()
            print(f"round {r + 1}/{args.rounds} (load {loadavg()}): "
                  + ", ".join(f"{k} {v[-1]:.2f}" for k, v in results.items()), file=sys.stderr, flush=True)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    def mark(key: str) -> str:
        return f" ({capped[key]} of {args.rounds} hit the {args.limit:.0f} s limit)" if capped[key] else ""

    header(argv, "omp_wait.py", args.rounds, load_before)
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    print(f"competitor: {args.competitor}, {args.session} session; sched_autogroup_enabled: "
          f"{autogroup.read_text(encoding='utf-8').strip() if autogroup.exists() else 'n/a'}\n")
    print("| measure | default policy, median [min, max] | OMP_WAIT_POLICY=PASSIVE | PASSIVE vs default (paired) |")
    print("|---|---:|---:|---:|")
    for what in ("cxr predict (s)", "training (images/s)"):
        for load in ("quiet", "busy"):
            a, b = f"{what}, {load}, default policy", f"{what}, {load}, OMP_WAIT_POLICY=PASSIVE"
            ratio = [y / x if what.startswith("training") else x / y for x, y in zip(results[a], results[b],
                                                                                      strict=True)]
            print(f"| {what}, {load} | {cell(results[a], '.2f')}{mark(a)} | {cell(results[b], '.2f')}{mark(b)} | "
                  f"{cell(ratio, '.2f')}x faster |")
    dump_json(args.json, {"args": vars(args), "results": results, "capped": capped, "load_before": load_before,
                          "load_after": loadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Figure 8: memory that the training split's pixels take on one node with N ranks, per rank and in all.

Each rank of a torchrun needs every training image (each epoch's permutation spans the whole split). Until session 6
every rank prepared its own copy in its own memory, so a node held the pixels N times. Now the node's first rank
prepares the split into one file in the cache and every rank maps it (:func:`cxr.data.prepare_shared`): the page
cache holds the pixels once, and it can evict them under pressure, where private memory would have to be swapped.

This runs N processes the way ``cxr train`` under torchrun does (the first prepares, the others start when it has
finished), with the cache already built, for both ways: ``in memory`` (:func:`cxr.data.prepare` in every process,
as before) and ``shared file`` (:func:`cxr.data.prepare_shared`). Each process reads every pixel once (an epoch's
worth), then, while all N are alive, reports from ``/proc/self/smaps_rollup``: its anonymous (private, unevictable)
memory and its proportional set size (PSS: shared pages divided among the processes that map them). The sum of PSS
over the N processes is what the node holds for them. One measurement per way and N: page counts, not timings, do
not vary between runs.

    python benchmarks/ddp_memory.py --data ../shared/data/kermany-224 --procs 1 2 4 --size 224
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import tempfile
from pathlib import Path

from common import SHARED_DATA, header, loadavg


def smaps() -> dict[str, float]:
    """This process's memory from /proc/self/smaps_rollup, in MB."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text(encoding="utf-8").splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) / 1024
    return out


def rank(index: int, shared: bool, data: str, cache: str, size: int, ready, alive, results) -> None:
    from cxr.config import load_config
    from cxr.data import prepare, prepare_shared, scan

    cfg = load_config(overrides={"image_size": size, "cache_dir": cache})
    if index:  # in order, as local_main_first: the first builds, the others start once it has finished
        ready[index - 1].wait()
    split = scan(data)["train"]
    prepared = prepare_shared(split, cfg, build=index == 0) if shared else prepare(split, cfg)
    ready[index].set()
    checksum = int(prepared.images.sum(dtype="uint64"))  # every pixel read once, like an epoch
    alive.wait()
    m = smaps()
    results.put((index, checksum, prepared.images.nbytes / 2**20, m["Anonymous"], m["Pss"], m["Rss"]))
    alive.wait()


def measure(procs: int, shared: bool, data: str, cache: str, size: int) -> list[tuple]:
    ctx = mp.get_context("spawn")
    ready, alive, results = [ctx.Event() for _ in range(procs)], ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=rank, args=(i, shared, data, cache, size, ready, alive, results))
               for i in range(procs)]
    for w in workers:
        w.start()
    rows = sorted(results.get(timeout=900) for _ in workers)
    for w in workers:
        w.join()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED_DATA / "kermany-224"), help="a dataset root with a train split")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv)
    load_before = loadavg()

    from cxr.config import load_config
    from cxr.data import prepare, scan

    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-ddpmem-"))
    try:
        cache = str(tmp / "cache")
        prepare(scan(args.data)["train"], load_config(overrides={"image_size": args.size, "cache_dir": cache}))
        table = []
        for n in args.procs:
            for shared in (False, True):
                rows = measure(n, shared, args.data, cache, args.size)
                assert len({r[1] for r in rows}) == 1, "the ranks saw different pixels"
                table.append((n, "shared file" if shared else "in memory", rows))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    header(argv, "ddp_memory.py", 1, load_before)  # "1 rounds": page counts, measured once
    pixels = table[0][2][0][2]
    print(f"{args.data} train split at {args.size} px: {pixels:.0f} MB of pixels per copy\n")
    print("| ranks | split held | anonymous MB per rank (first, others) | PSS MB per rank (first, others) | "
          "sum of PSS over the ranks, MB |")
    print("|---:|---|---:|---:|---:|")
    for n, way, rows in table:
        first, others = rows[0], rows[1:]
        other_anon = f", {max(r[3] for r in others):.0f}" if others else ""
        other_pss = f", {max(r[4] for r in others):.0f}" if others else ""
        print(f"| {n} | {way} | {first[3]:.0f}{other_anon} | {first[4]:.0f}{other_pss} | "
              f"{sum(r[4] for r in rows):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

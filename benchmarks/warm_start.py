"""Figure 7: a run's start on a warm image cache, with and without the digest memo.

Every image is already in the cache; what a later run (or rank) still pays before its first batch is: list the
files, find each file's SHA-256 (the cache key), look the digests up in the packs, copy the pixels out. Without the
memo every file is read and hashed again; with it, a file whose ``stat()`` is unchanged is not read.

The 116 Kermany originals (1,000 to 2,900 px wide) are copied ``--repeat`` times with distinct bytes into a temporary
folder, and the cache is built once. Each round then times, in turn, ``prepare(scan(root)["train"], cfg)`` (what
``cxr evaluate`` runs; ``cxr train`` does the same through its split):

* ``memo off``: :class:`cxr.data.DigestMemo` replaced by one that holds nothing and keeps nothing, so every file is
  hashed, as before the memo existed;
* ``memo on``: the memo as shipped (filled by the cache build).

``--cold`` drops the kernel's page cache before each variant (root only: ``/proc/sys/vm/drop_caches``), as for a
run that starts after the files have left memory, or a dataset larger than it.

    python benchmarks/warm_start.py --repeat 12 --rounds 5 [--cold]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import dump_json, header, interleaved, loadavg, make_fullres_dataset, print_table, timed


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=12, help="copies of each of the 116 originals (default 12: 1,392)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--cold", action="store_true", help="drop the page cache before each variant (needs root)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    load_before = loadavg()

    from cxr import data
    from cxr.config import load_config
    from cxr.data import prepare, scan

    class NoMemo(data.DigestMemo):
        def get(self, paths):
            return {}

        def put(self, entries):
            pass

    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-warm-"))
    try:
        root = make_fullres_dataset(tmp / "data", args.repeat)
        cfg = load_config(overrides={"image_size": args.size, "cache_dir": str(tmp / "cache"), "draft": True})
        data._RACY_NS = 0  # the copies were written a moment ago; let the build remember them
        built = prepare(scan(root)["train"], cfg)
        n = len(built.labels)
        memo_rows = len(data.DigestMemo(cfg.cache_dir).get([s.path for s in built.samples]))
        print(f"{n} images ({sum(f.stat().st_size for f in root.rglob('*.jpeg')) / 1e6:.0f} MB of JPEG) cached, "
              f"{memo_rows} in the memo", file=sys.stderr)
        assert memo_rows == n

        def variant(memo_class):
            def run() -> tuple[int, float]:
                if args.cold:
                    drop_page_cache()
                real = data.DigestMemo
                data.DigestMemo = memo_class
                try:
                    got, seconds = timed(lambda: len(prepare(scan(root)["train"], cfg).labels))
                finally:
                    data.DigestMemo = real
                assert got == n
                return got, seconds
            return run

        variants = {"memo off (hash every file)": variant(NoMemo), "**memo on**": variant(data.DigestMemo)}
        results = interleaved(variants, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    header(argv, "warm_start.py", args.rounds, load_before)
    print(f"{n} full-resolution JPEGs, {args.size} px draft cache, page cache {'dropped' if args.cold else 'warm'}\n")
    print_table(results, {"memo off": "memo off (hash every file)"})
    dump_json(args.json, {"images": n, "cold": args.cold, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

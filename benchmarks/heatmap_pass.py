"""One request of the service with a heatmap, in fp32: the probability from Grad-CAM's own forward pass (as shipped,
session 23) against a forward pass of its own before Grad-CAM's (as the service did before).

Both variants run in one process on one engine (the bundled model, ``amp off``, the CPU), in turn within each round:
``run_prediction`` on the same JPEG (a Kermany original from the bundled sample), ``--requests`` times per round. The
baseline is the shipped engine with its one-pass method turned off, so the two differ in that alone; their answers
(probability, label, heatmap PNG) are checked identical first.

    python benchmarks/heatmap_pass.py --rounds 5 --requests 5
"""

from __future__ import annotations

import argparse
import sys

from common import REPO, header, interleaved, loadavg, print_table, timed

from cxr.serve import load_engine, run_prediction


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=5, help="requests per variant per round")
    args = ap.parse_args(argv)
    load_before = loadavg()

    engine = load_engine("default", "torch", "cpu", amp="off")
    two_pass = load_engine("default", "torch", "cpu", amp="off")
    two_pass.predict_with_heatmap = lambda image: None  # the service before: predict, then Grad-CAM
    path = sorted((REPO / "src" / "cxr" / "sample" / "kermany-mini" / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    data = path.read_bytes()

    a, b = run_prediction(engine, data, path.name), run_prediction(two_pass, data, path.name)
    same = ("probability", "label", "heatmap")
    assert all(a[k] == b[k] for k in same), "the two variants answer differently"

    def requests(eng) -> tuple[int, float]:
        return timed(lambda: [run_prediction(eng, data, path.name) for _ in range(args.requests)] and args.requests)

    results = interleaved({"one pass (shipped)": lambda: requests(engine),
                           "two passes (before)": lambda: requests(two_pass)}, args.rounds, label="requests/s")
    header(argv, "heatmap_pass.py", args.rounds, load_before)
    print(f"file: {path.name}; answers identical (probability {a['probability']:.6f}, label {a['label']})")
    print_table(results, {"two passes": "two passes (before)"}, unit="requests/s")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Figure 10: the bootstrap behind every ``ci95`` in metrics.json (``cxr evaluate``, and the end of ``cxr train``).

Each round times, in turn and for each split size, the 1,000 bootstrap resamples' metrics:

* ``scikit-learn per resample`` (the baseline): the loop cxr ran until session 15, reproduced below, which called
  :func:`cxr.evaluate.compute_metrics` (scikit-learn's ``confusion_matrix``, ``roc_auc_score`` and
  ``average_precision_score``, plus the calibration) on every resample;
* ``draw counts`` (as shipped): the same resamples (same generator, same redraws), each one's metrics from the
  number of times each image was drawn (``cxr.evaluate._bootstrap_values`` and ``_Resampler``);

and, as shipped, the whole :func:`cxr.evaluate.confidence_intervals`: those resamples, then the jackknife that BCa's
acceleration needs (since session 20: one metric computation per image, or per block of images beyond 1,000) and the
Wilson intervals.

Both variants must give the same resample values (checked to 1e-9 each round). The scores are synthetic, drawn once
per size with a fixed seed: 27 % NORMAL as in Kermany's train split, P(PNEUMONIA) from Beta distributions like a good
model's, rounded to 4 decimals so that ties occur.

    python benchmarks/confidence_intervals.py --rounds 5 --sizes 624,748,4484
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from common import cell, dump_json, header, loadavg, ratio_cell, timed


def baseline_values(labels, probs, threshold, *, n_boot=1000, seed=0):
    """The resamples' metrics as cxr computed them before session 15: compute_metrics (scikit-learn) on each."""
    from sklearn.metrics import confusion_matrix

    from cxr.evaluate import CI_METRICS, compute_metrics

    labels, probs = np.asarray(labels, np.int64), np.asarray(probs, np.float64)
    both = len(np.unique(labels)) == 2
    rng = np.random.default_rng(seed)
    values = {k: [] for k in CI_METRICS}
    while len(values["accuracy"]) < n_boot:
        idx = rng.integers(0, len(labels), len(labels))
        if both and labels[idx].min() == labels[idx].max():
            continue
        # As compute_metrics was then: its confusion matrix by scikit-learn (NumPy's count since session 22, which
        # would take a quarter of this baseline away), the rest as it is.
        confusion_matrix(labels[idx], (probs[idx] >= threshold).astype(np.int64), labels=[0, 1])
        m = compute_metrics(labels[idx], probs[idx], threshold)
        for k in CI_METRICS:
            values[k].append(np.nan if m[k] is None else m[k])
    return {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}


def shipped_values(labels, probs, threshold, *, n_boot=1000, seed=0):
    from cxr.evaluate import _bootstrap_values, _Resampler

    return _bootstrap_values(_Resampler(labels, probs, threshold), labels, np.arange(len(labels)), n_boot, seed)


def scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) >= 0.27).astype(np.int64)
    probs = np.where(labels == 1, rng.beta(8, 1, n), rng.beta(1, 8, n))
    return labels, np.round(probs, 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sizes", default="624,748,4484", help="split sizes, comma-separated")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--json")
    args = p.parse_args(argv)
    load_before = loadavg()

    import cxr.evaluate as ev

    sizes = [int(s) for s in args.sizes.split(",")]
    data = {n: scores(n) for n in sizes}
    seconds: dict[tuple[int, str], list[float]] = {}
    for r in range(args.rounds):
        for n, (labels, probs) in data.items():
            got = {}
            for name, fn in (("baseline", baseline_values), ("ours", shipped_values)):
                got[name], s = timed(lambda y=labels, p=probs, f=fn: f(y, p, 0.5, n_boot=args.n_boot))
                seconds.setdefault((n, name), []).append(s)
            _, s = timed(lambda y=labels, p=probs: ev.confidence_intervals(y, p, 0.5, n_boot=args.n_boot))
            seconds.setdefault((n, "whole"), []).append(s)
            for k, v in got["baseline"].items():
                assert np.allclose(v, got["ours"][k], rtol=1e-9, atol=0, equal_nan=True), (n, k)
            print(f"round {r + 1}/{args.rounds} (load {loadavg()}) n={n}: baseline "
                  f"{seconds[n, 'baseline'][-1]:.3f} s, ours {seconds[n, 'ours'][-1]:.3f} s, whole "
                  f"{seconds[n, 'whole'][-1]:.3f} s", file=sys.stderr)

    header(argv, "confidence_intervals.py", args.rounds, load_before)
    print(f"{args.n_boot} bootstrap resamples' metrics; seconds per call, median [min, max]\n")
    print("| images | scikit-learn per resample (baseline), s | draw counts (ours), s | speed-up | "
          "confidence_intervals() whole (BCa, Wilson), s |")
    print("|---:|---:|---:|---:|---:|")
    for n in sizes:
        base, ours, whole = seconds[n, "baseline"], seconds[n, "ours"], seconds[n, "whole"]
        print(f"| {n:,} | {cell(base, '.2f')} | {cell(ours, '.3f')} | {ratio_cell(base, ours)} | "
              f"{cell(whole, '.3f')} |")
    dump_json(args.json, {"n_boot": args.n_boot, "seconds": {f"{n} {k}": v for (n, k), v in seconds.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

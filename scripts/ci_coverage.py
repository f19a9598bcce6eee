"""How often cxr's 95 % intervals hold the true value: a simulation of splits whose true metrics are known.

Scores are drawn on the logit scale, N(+d/2, 1) for PNEUMONIA and N(-d/2, 1) for NORMAL, so the true sensitivity,
specificity and AUROC are normal probabilities (AUPRC and F1 from two million draws), and each simulated split is
passed to :func:`cxr.evaluate.confidence_intervals` at threshold 0.5. ``--patients DIR`` instead draws patients with as
many images as the patients of a Kermany-named dataset have (``DIR/{NORMAL,PNEUMONIA}``), each patient with its own
offset (``--spread``, the standard deviation of that offset) shared by its images, and compares the intervals that
resample images with those that resample patients.

    python scripts/ci_coverage.py --d 4.74 --prevalence 0.742 --n 748 --reps 500      # a split like val748
    python scripts/ci_coverage.py --patients ../shared/data/kermany-224/train --per-class 100 --reps 300
    python scripts/ci_coverage.py --d 4.5 --prevalence 0.62 --n 45,100 --reps 300 --n-boot 500  # near-perfect, small
    python scripts/ci_coverage.py --patients ../shared/data/kermany-224/train --per-class 60 --normal-patients 3 \
        --reps 200 --n-boot 200                                                                # few NORMAL patients
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from scipy.stats import norm
from sklearn.metrics import average_precision_score

from cxr.evaluate import confidence_intervals, interval_patients, rate_patients


def independent(d: float, prevalence: float, sizes: list[int], reps: int, n_boot: int) -> None:
    big = np.random.default_rng(99)
    y = big.random(2_000_000) < prevalence
    z = big.normal(0, 1, y.size) + np.where(y, d / 2, -d / 2)
    sens = spec = float(norm.cdf(d / 2))
    prec = prevalence * sens / (prevalence * sens + (1 - prevalence) * (1 - spec))
    true = {"accuracy": sens, "sensitivity": sens, "specificity": spec, "precision": prec,
            "f1": 2 * prec * sens / (prec + sens), "auroc": float(norm.cdf(d / np.sqrt(2))),
            "auprc": float(average_precision_score(y, z))}
    print("true:", {k: round(v, 4) for k, v in true.items()})
    rng = np.random.default_rng(12345)
    for n in sizes:
        held, high, none, done, start = Counter(), Counter(), Counter(), 0, time.perf_counter()
        while done < reps:
            labels = (rng.random(n) < prevalence).astype(int)
            if labels.min() == labels.max():
                continue
            probs = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + np.where(labels == 1, d / 2, -d / 2))))
            ci = confidence_intervals(labels, probs, 0.5, n_boot=n_boot, seed=done)
            for k, v in true.items():
                if ci[k] is None:  # every resample alike (a split without an error): no interval, since session 26
                    none[k] += 1
                    continue
                held[k] += ci[k][0] <= v <= ci[k][1]
                high[k] += v < ci[k][0]
            done += 1
        print(f"n {n}: held the true value, of the splits given an interval (in brackets: share whose interval lay "
              "above it; share given none; share held, a none counted as a miss, as the [1, 1] it had been):",
              {k: f"{held[k] / max(reps - none[k], 1):.3f} ({high[k] / max(reps - none[k], 1):.3f}; "
                  f"{none[k] / reps:.3f}; {held[k] / reps:.3f})" for k in true},
              f"{time.perf_counter() - start:.0f} s")


def patient_sizes(folder: Path) -> dict[int, list[int]]:
    """Images per patient in each class folder, by cxr's patient ids (Kermany names)."""
    from cxr.data import patient_id

    out = {}
    for label, name in ((0, "NORMAL"), (1, "PNEUMONIA")):
        counts = Counter(patient_id(p.name) for p in (folder / name).iterdir() if p.is_file())
        out[label] = list(counts.values())
    return out


def clustered(sizes: dict[int, list[int]], per_class: int, spread: float, reps: int, n_boot: int,
              normal_patients: int | None = None) -> None:
    within, centre = 0.7, {1: 2.0, 0: -2.5}
    scale = np.hypot(spread, within)
    true = {"sensitivity": float(norm.cdf(centre[1] / scale)), "specificity": float(norm.cdf(-centre[0] / scale)),
            "auroc": float(norm.cdf((centre[1] - centre[0]) / (np.sqrt(2) * scale)))}
    print("true:", {k: round(v, 4) for k, v in true.items()}, f"(patient spread {spread}, within {within})")
    rng = np.random.default_rng(7)
    hows = ("images", "patients", "cxr")  # cxr: as write_evaluation chooses (interval_patients, rate_patients)
    held = {how: Counter() for how in hows}
    width = {how: Counter() for how in hows}
    start = time.perf_counter()
    for r in range(reps):
        labels, logits, patients = [], [], []
        for label in (1, 0):
            for k in rng.choice(sizes[label], per_class if label or normal_patients is None else normal_patients):
                offset = centre[label] + rng.normal(0, spread)
                patients += [f"{label}-{len(labels)}"] * int(k)
                labels += [label] * int(k)
                logits += list(offset + rng.normal(0, within, int(k)))
        labels, probs = np.array(labels), 1 / (1 + np.exp(-np.array(logits)))
        for how, given in (("images", None), ("patients", patients), ("cxr", None)):
            if how == "cxr":
                chosen, _ = interval_patients("sim", labels, patients)
                ci = confidence_intervals(labels, probs, 0.5, n_boot=n_boot, seed=r, patients=chosen,
                                          rate_patients=rate_patients("sim", patients, say=False))
            else:
                ci = confidence_intervals(labels, probs, 0.5, n_boot=n_boot, seed=r, patients=given)
            for k, v in true.items():
                if ci[k] is not None:  # none: every resample alike (counted a miss here)
                    held[how][k] += ci[k][0] <= v <= ci[k][1]
                    width[how][k] += ci[k][1] - ci[k][0]
    for how in held:
        print(f"resampling {how}: held the true value (mean width):",
              {k: f"{held[how][k] / reps:.3f} ({width[how][k] / reps:.3f})" for k in true})
    print(f"{time.perf_counter() - start:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=float, default=3.5, help="distance of the two classes' mean logits")
    p.add_argument("--prevalence", type=float, default=0.625, help="share of PNEUMONIA")
    p.add_argument("--n", default="100,300", help="split sizes, comma-separated")
    p.add_argument("--patients", type=Path, help="a Kermany-named class folder pair to take patient sizes from")
    p.add_argument("--per-class", type=int, default=100, help="patients per class (with --patients)")
    p.add_argument("--spread", type=float, default=1.5, help="standard deviation of a patient's offset")
    p.add_argument("--normal-patients", type=int, help="NORMAL patients, if not --per-class (with --patients)")
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--n-boot", type=int, default=1000)
    args = p.parse_args(argv)
    if args.patients:
        clustered(patient_sizes(args.patients), args.per_class, args.spread, args.reps, args.n_boot,
                  args.normal_patients)
    else:
        independent(args.d, args.prevalence, [int(x) for x in args.n.split(",")], args.reps, args.n_boot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compare two models' predictions on the same images: log loss, Brier score, AUROC, and the paired difference.

Reads ``predictions_<split>.csv`` files written by ``cxr evaluate`` (columns path, label, prob_pneumonia, ...), for
the same images (matched by path), and prints per model the mean log loss (unweighted, and with inverse class-frequency
weights from the file's own labels: like cxr train's ``val_loss``, which weighs by the train split's counts, and equal
to it only where those match; both log losses clip P to [1e-7, 1 - 1e-7]), the Brier score and AUROC, then a paired
bootstrap of the differences (B minus A; 1,000 resamples of the images), so that "better on validation" is a measured
statement.

    python scripts/compare_predictions.py runs/eval-v1/predictions_val.csv runs/eval-v2/predictions_val.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from cxr.evaluate import _Resampler


def read(path: str) -> dict[str, tuple[int, float]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    label_of = {"NORMAL": 0, "PNEUMONIA": 1, "0": 0, "1": 1}
    # normpath: "/a/main/../runs/x.jpeg" (a relative --data from another folder) is "/a/runs/x.jpeg"
    return {os.path.normpath(r["path"]): (label_of[r["label"]], float(r["prob_pneumonia"])) for r in rows}


def scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    raw, p = p, np.clip(p, 1e-7, 1 - 1e-7)
    counts = np.bincount(y, minlength=2)
    weights = (len(y) / (2 * counts))[y]  # inverse class frequency, as cxr.train.class_weights
    nll = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    # AUROC from the probabilities as they are, as metrics.json and the bootstrap below rank them: the clip tied
    # 0.99999994 with 1.0 and moved the printed AUROC outside its own interval.
    return {"log_loss": float(log_loss(y, p, labels=[0, 1])), "weighted_log_loss": float((weights * nll).sum() /
            weights.sum()), "brier": float(brier_score_loss(y, p)), "auroc": float(roc_auc_score(y, raw))}


class Resampled:
    """:func:`scores` of a resample from the count of draws of each image (``np.bincount``), as cxr's own
    bootstrap does (cxr.evaluate._Resampler, whose AUROC it uses): the same numbers, without scikit-learn's checks
    of its inputs on every resample, which made 1,000 resamples take about 25 s."""

    def __init__(self, y: np.ndarray, p: np.ndarray):
        self.y, self.p = y, np.clip(p, 1e-7, 1 - 1e-7)
        self.nll = -(y * np.log(self.p) + (1 - y) * np.log(1 - self.p))
        self.sq = (self.p - y) ** 2
        self.ranks = _Resampler(y, p, 0.5)

    def scores(self, idx: np.ndarray) -> dict[str, float]:
        w = np.bincount(idx, minlength=len(self.y)).astype(np.float64)
        counts = np.bincount(self.y, weights=w, minlength=2)
        cw = w * (len(idx) / (2 * counts))[self.y]
        return {"log_loss": float((w * self.nll).sum() / w.sum()),
                "weighted_log_loss": float((cw * self.nll).sum() / cw.sum()),
                "brier": float((w * self.sq).sum() / w.sum()), "auroc": self.ranks.metrics(idx)["auroc"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="predictions CSV of model A (the current one)")
    ap.add_argument("b", help="predictions CSV of model B (the candidate)")
    ap.add_argument("--boot", type=int, default=1000)
    args = ap.parse_args(argv)
    a, b = read(args.a), read(args.b)
    if set(a) != set(b):
        print(f"the two files hold different images ({len(set(a) ^ set(b))} differ)", file=sys.stderr)
        return 2
    paths = sorted(a)
    y = np.array([a[k][0] for k in paths])
    if any(a[k][0] != b[k][0] for k in paths):
        print("the two files disagree on labels", file=sys.stderr)
        return 2
    pa, pb = np.array([a[k][1] for k in paths]), np.array([b[k][1] for k in paths])
    sa, sb = scores(y, pa), scores(y, pb)
    print(f"{len(y)} images ({int((y == 0).sum())} NORMAL / {int(y.sum())} PNEUMONIA)")
    print("| measure | A | B | B - A, 95 % paired bootstrap |")
    print("|---|---:|---:|---:|")
    rng = np.random.default_rng(0)
    diffs: dict[str, list[float]] = {k: [] for k in sa}
    ra, rb = Resampled(y, pa), Resampled(y, pb)
    while len(diffs["log_loss"]) < args.boot:
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        da, db = ra.scores(idx), rb.scores(idx)
        for k in diffs:
            diffs[k].append(db[k] - da[k])
    for k in sa:
        lo, hi = np.percentile(diffs[k], [2.5, 97.5])
        print(f"| {k} | {sa[k]:.4f} | {sb[k]:.4f} | {sb[k] - sa[k]:+.4f} [{lo:+.4f}, {hi:+.4f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

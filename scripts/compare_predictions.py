"""Compare two models' predictions on the same images: log loss, Brier score, AUROC, and the paired difference.

Reads ``predictions_<split>.csv`` files written by ``cxr evaluate`` (columns path, label, prob_pneumonia, ...), for
the same images (matched by path), and prints per model the mean log loss (unweighted, and with inverse class-frequency
weights from the file's own labels: like cxr train's ``val_loss``, which weighs by the train split's counts, and equal
to it only where those match; both log losses clip P to [1e-7, 1 - 1e-7]), the Brier score and AUROC, then a paired
bootstrap of the differences (B minus A; 1,000 resamples, percentile intervals), so that "better on validation" is a
measured statement.

The bootstrap resamples patients, each with all of its images, as ``cxr evaluate``'s intervals do: images of one
patient are alike, and resampling them as if independent made the intervals too narrow (Kermany's pneumonia patients
have 2.4 images on average). Each image's patient is read as ``cxr train`` reads it (cxr.data.file_patient_id): a
Kermany file name, a DICOM file's PatientID (where the file is still there to read), or ``--patient-pattern``, a
regular expression searched in the path as the CSV gives it (its first group, or the whole match). Images with none
of these are their own patients; where no patient has several images, or a class has fewer than 5 patients, the
images are resampled, and the output says which.

    python scripts/compare_predictions.py runs/eval-v1/predictions_val.csv runs/eval-v2/predictions_val.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from cxr.config import CLASS_NAMES
from cxr.data import PATTERN_PATIENT, Sample, file_patient_id
from cxr.evaluate import _cluster_index, _Resampler, interval_patients, patients_of


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


def patients(paths: list[str], y: np.ndarray, pattern: str = "") -> list[str]:
    """Each image's patient, as :func:`cxr.evaluate.patients_of` names them for the intervals (an image whose
    patient is not known is its own)."""
    samples = []
    for path, label in zip(paths, y, strict=True):
        m = re.search(pattern, path) if pattern else None
        found = (m.group(1) if m.re.groups else m.group(0)) if m else None
        patient = PATTERN_PATIENT + found if found else file_patient_id(Path(path))
        samples.append(Sample(path, int(label), patient))
    return patients_of(samples)


class Resampled:
    """:func:`scores` of a resample from the number of times each image was drawn, as cxr's own bootstrap does
    (cxr.evaluate._Resampler, whose AUROC it uses): the same numbers, without scikit-learn's checks of its inputs on
    every resample, which made 1,000 resamples take about 25 s."""

    def __init__(self, y: np.ndarray, p: np.ndarray):
        self.y, self.p = y, np.clip(p, 1e-7, 1 - 1e-7)
        self.nll = -(y * np.log(self.p) + (1 - y) * np.log(1 - self.p))
        self.sq = (self.p - y) ** 2
        self.ranks = _Resampler(y, p, 0.5)

    def scores(self, w: np.ndarray) -> dict[str, float]:
        """The scores of a resample that holds image i ``w[i]`` times."""
        counts = np.bincount(self.y, weights=w, minlength=2)
        cw = w * (w.sum() / (2 * counts))[self.y]
        return {"log_loss": float((w * self.nll).sum() / w.sum()),
                "weighted_log_loss": float((cw * self.nll).sum() / cw.sum()),
                "brier": float((w * self.sq).sum() / w.sum()), "auroc": self.ranks.metrics_weighted(w)["auroc"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="predictions CSV of model A (the current one)")
    ap.add_argument("b", help="predictions CSV of model B (the candidate)")
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--patient-pattern", default="", metavar="REGEX",
                    help="regular expression whose first group (or whole match) in an image's path names its patient")
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
    if len(np.unique(y)) < 2:  # no resample could hold both classes: the loop below had never ended
        print(f"the files hold {CLASS_NAMES[int(y[0])] if len(y) else 'no'} images only: AUROC and the paired "
              "bootstrap need both classes", file=sys.stderr)
        return 2
    pa, pb = np.array([a[k][1] for k in paths]), np.array([b[k][1] for k in paths])
    sa, sb = scores(y, pa), scores(y, pb)
    try:
        re.compile(args.patient_pattern)
    except re.error as e:
        print(f"--patient-pattern {args.patient_pattern!r}: {e}", file=sys.stderr)
        return 2
    resampled, _ = interval_patients("compared", y, patients(paths, y, args.patient_pattern))
    clusters = _cluster_index(resampled, len(y))
    n_clusters = int(clusters.max()) + 1
    what = f"{n_clusters} patients" if resampled is not None else "the images, as if independent"
    print(f"{len(y)} images ({int((y == 0).sum())} NORMAL / {int(y.sum())} PNEUMONIA); the bootstrap resamples {what}")
    print("| measure | A | B | B - A, 95 % paired bootstrap |")
    print("|---|---:|---:|---:|")
    rng = np.random.default_rng(0)
    diffs: dict[str, list[float]] = {k: [] for k in sa}
    ra, rb = Resampled(y, pa), Resampled(y, pb)
    while len(diffs["log_loss"]) < args.boot:
        w = np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters)[clusters].astype(np.float64)
        if not (w[y == 0].any() and w[y == 1].any()):
            continue
        da, db = ra.scores(w), rb.scores(w)
        for k in diffs:
            diffs[k].append(db[k] - da[k])
    for k in sa:
        lo, hi = np.percentile(diffs[k], [2.5, 97.5])
        print(f"| {k} | {sa[k]:.4f} | {sb[k]:.4f} | {sb[k] - sa[k]:+.4f} [{lo:+.4f}, {hi:+.4f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

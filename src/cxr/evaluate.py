"""Evaluation: probabilities from a model, a decision threshold chosen on validation, metrics, artifacts.

Outputs of :func:`write_evaluation` (stable names, read by reports):

* ``metrics.json``: one object per split with ``n``, ``accuracy``, ``precision``, ``recall`` (= sensitivity),
  ``specificity``, ``f1``, ``auroc``, ``auprc``, the calibration of the probabilities (``brier``, ``log_loss``,
  ``ece``), ``threshold`` and ``confusion_matrix`` as ``[[TN, FP], [FN, TP]]``;
* ``predictions_<split>.csv``: ``path, label, prob_pneumonia, predicted, note`` (the research-use disclaimer).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxr.config import CLASS_NAMES, Config
from cxr.errors import CxrError, DataError, UsageError
from cxr.fileio import CSV_TEXT, MAX_NAME_BYTES, atomic_path, atomic_write_text, ensure_dir, npz_row, valid_utf8
from cxr.images import image_stem, warn_of_views
from cxr.model import (
    Checkpoint,
    autocast,
    check_model_inputs,
    exact_fp32,
    load_checkpoint,
    normalize,
    resolve_device,
    use_bf16,
    use_channels_last,
    warn_if_threshold_unchosen,
)
from cxr.predict import DISCLAIMER, threshold_decimals
from cxr.report import IN_MEMORY, expected_calibration_error

log = logging.getLogger(__name__)

@dataclass
class SplitResult:
    """Predictions for one split: paths, true labels (1 = PNEUMONIA) and P(PNEUMONIA); ``patients``, where known, the
    patient of each image (:func:`patients_of`), which the confidence intervals resample."""

    name: str
    paths: list[str]
    labels: np.ndarray
    probs: np.ndarray
    patients: list[str] | None = None


_UNKNOWN_PATIENT = "image:"  # before the path of an image whose patient is not known (its own "patient")


def patients_of(samples) -> list[str]:
    """Each sample's patient for the intervals: its patient id where one was read (a Kermany name, a DICOM header, the
    config's pattern, a CSV's patient column), else the image itself, by its content where that is known: a file's
    own name says nothing of who it shows, and byte-identical copies under two names had counted as two patients (64
    images of 32 X-rays, each twice, gave intervals of 64). Copies go with each other whatever their ids: one named
    as a Kermany patient's and one named otherwise are that patient's (a known id is kept over an unknown one)."""
    from cxr.data import EMPTY_DIGEST, patient_from_name_only, patient_key

    ids = [f"{_UNKNOWN_PATIENT}{s.path}" if patient_from_name_only(s) else patient_key(s.patient) for s in samples]
    parent = {i: i for i in ids}

    def root(i: str) -> str:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, str] = {}
    for s, i in zip(samples, ids, strict=True):
        if not s.digest or s.digest == EMPTY_DIGEST:
            continue
        if s.digest not in first:
            first[s.digest] = i
            continue
        a, b = root(first[s.digest]), root(i)
        if a != b:  # the known id stands for both
            a, b = (b, a) if a.startswith(_UNKNOWN_PATIENT) and not b.startswith(_UNKNOWN_PATIENT) else (a, b)
            parent[b] = a
    return [root(i) for i in ids]


def count_copies(samples) -> int:
    """How many of ``samples`` are byte-identical copies of an earlier one (by content digest; empty files aside)."""
    from cxr.data import EMPTY_DIGEST

    digests = [s.digest for s in samples if s.digest and s.digest != EMPTY_DIGEST]
    return len(digests) - len(set(digests))


# Fewer patients than this in a class: resampling them says nothing (every resample holds the one patient). Five
# until session 26, when a simulation (60 PNEUMONIA patients and 2-5 NORMAL ones, three alike images each, 300
# splits) had F1's interval hold the truth in 0.75 / 0.71 / 0.70 of splits with 2 / 3 / 4 NORMAL patients by the
# images' bootstrap, and 0.91 / 0.93 / 0.91 by the patients'.
MIN_PATIENTS_PER_CLASS = 2


def interval_patients(split: str, labels: np.ndarray, patients: list[str] | None) -> tuple[list[str] | None, str]:
    """The patients the bootstrap resamples, and the method the intervals record: the images' patients where some
    have several images and each class present has at least :data:`MIN_PATIENTS_PER_CLASS`; else the images (None),
    said. (:func:`rate_patients`: the patients of the rates' Wilson intervals.)

    One patient id on every image (an anonymised export's constant PatientID) is no patient: taken as unknown. With
    one or two patients in a class, every resample held the same images of it, and the intervals had zero width."""
    if rate_patients(split, patients) is None:
        return None, CI_METHOD
    labels = np.asarray(labels)
    per_class = {int(c): len({p for p, y in zip(patients, labels, strict=True) if y == c}) for c in np.unique(labels)}
    if min(per_class.values()) < MIN_PATIENTS_PER_CLASS:
        log.warning("%s split: too few patients to resample (%s), so the bootstrap of F1, AUROC and AUPRC resamples "
                    "the images as if they were independent, and their intervals are too narrow", split,
                    ", ".join(f"{n} with {CLASS_NAMES[c]}" for c, n in per_class.items()))
        return None, CI_METHOD_FEW_PATIENTS
    return list(patients), CI_METHOD_PATIENTS


def rate_patients(split: str, patients: list[str] | None, *, say: bool = True) -> list[str] | None:
    """The patients over whom the rates' Wilson intervals count the effective number of images: the images' own where
    some have several, whatever their number (with too few to resample, the images of the patients of one class had
    been taken as independent in every rate, the other class's too), unless one id is on every image (an anonymised
    export's constant PatientID: no patient, taken as unknown); else None, each image alone."""
    if patients is None or len(set(patients)) == len(patients):
        return None
    if len(set(patients)) == 1 and len(patients) > 1:
        if say:
            log.warning("%s split: all %d images have one patient id (%s): taken as unknown (an anonymised export?), "
                        "so the intervals take the images as independent", split, len(patients), patients[0])
        return None
    return list(patients)


def _as_array(images: object) -> np.ndarray | torch.Tensor:
    """``images`` as one contiguous array (a tensor as it is), or a UsageError: a list of images of mixed sizes had
    raised NumPy's ValueError."""
    if isinstance(images, torch.Tensor):
        return images
    try:
        return np.ascontiguousarray(images)
    except (ValueError, TypeError) as e:
        raise UsageError(f"expected uint8 grey images of one size (N, S, S): {e}") from None


# Pixels in one forward pass on the CPU, at most: 8 images at 224 px (24 at 128, 3 at 320). DenseNet-121 ran 1.4-1.9x
# faster per image there than at the 32-64 images of a user's batch, whose activations spill out of the caches
# (BENCHMARKS.md, figure 14); below 8 images at 224 px it was slower again.
CPU_FORWARD_PIXELS = 8 * 224 * 224


def forward_batch(batch_size: int, device: torch.device, image_size: int) -> int:
    """Images per forward pass: ``batch_size``, and on the CPU at most :data:`CPU_FORWARD_PIXELS` pixels' worth. The
    predictions depend on the pass size by float rounding alone (fp32 kernels differ with it: 3e-8 between a pass of
    one image and one of eight)."""
    if device.type != "cpu":
        return batch_size
    return max(1, min(batch_size, CPU_FORWARD_PIXELS // max(1, image_size * image_size)))


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: np.ndarray | torch.Tensor, *, mean: float, std: float,
                   device: torch.device, batch_size: int = 64, bf16: bool = False,
                   channels_last: bool = False, progress: str | None = None) -> torch.Tensor:
    """Logits (N, 2) in float32 on the CPU for uint8 images (N, S, S), in batches, without augmentation (S: the
    model's image size, ``Checkpoint.config.image_size``). ``progress``: a progress bar's description (without a
    terminal, a log line at every tenth of a long job); None, none."""
    images = _as_array(images)  # a list of images; a flipped view (negative strides) torch refuses
    check_model_inputs(images, batch_size)
    images = torch.as_tensor(images)
    model.eval()
    out = []
    step = forward_batch(batch_size, device, images.shape[-1])
    from cxr.progress import progress_bar

    # cxr evaluate of Kermany's 5,232 images had said nothing for 13 minutes on a 2-core CPU
    bar = progress_bar(progress, len(images), unit="img") if progress else contextlib.nullcontext()
    with bar as shown:
        for start in range(0, len(images), step):
            x = images[start:start + step].unsqueeze(1).to(device, non_blocking=True)
            with autocast(device, bf16):
                out.append(model(normalize(x, mean, std, channels_last)).float().cpu())
            if shown is not None:
                shown.advance(len(x))
    return torch.cat(out) if out else torch.zeros((0, 2))


@dataclass
class Inference:
    """A model ready to predict with the numerics of the inference commands (:func:`load_for_inference`)."""

    ckpt: Checkpoint
    net: torch.nn.Module
    cfg: Config  # the checkpoint's config, with this run's device and amp
    device: torch.device
    bf16: bool
    channels_last: bool
    threshold: float  # the one given, else the checkpoint's

    def probs(self, images: np.ndarray, batch_size: int = 64, progress: str | None = None) -> np.ndarray:
        """P(PNEUMONIA) of uint8 images (N, S, S), S the model's image size: bf16 autocast where chosen, else exact
        fp32 (TF32 off on CUDA). ``progress``: a progress bar's description, or None."""
        images = _as_array(images)  # a list of images; a flipped view (negative strides)
        check_model_inputs(images, batch_size, self.cfg.image_size)
        with exact_fp32(self.device, enabled=not self.bf16):
            logits = predict_logits(self.net, images, mean=self.cfg.mean, std=self.cfg.std, device=self.device,
                                    batch_size=batch_size, bf16=self.bf16, channels_last=self.channels_last,
                                    progress=progress)
        return probabilities(logits)

    def heatmaps(self, images: np.ndarray, target: int | str | np.ndarray | None = None,
                 batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """Grad-CAM maps (N, S, S) in [0, 1] and P(PNEUMONIA) (N,) of uint8 images (N, S, S), with this model's
        size, normalisation and threshold: ``target`` None explains each image's class at the threshold, as
        ``cxr explain`` does (:func:`cxr.explain.heatmaps_for_images`, in fp32 whatever ``amp``)."""
        from cxr.explain import heatmaps_for_images

        return heatmaps_for_images(self.net, _as_array(images), mean=self.cfg.mean, std=self.cfg.std, target=target,
                                   batch_size=batch_size, threshold=self.threshold, image_size=self.cfg.image_size)


def load_for_inference(model: str | os.PathLike | Checkpoint, *, device: str = "auto", amp: str = "off",
                       threshold: float | None = None) -> Inference:
    """What predict, evaluate and explain each did before they predict: load the model (warning when it is a run's
    best.pt whose threshold was never chosen and none is given), build it on the device, and decide bf16 and
    channels_last from ``device`` and ``amp``, as one setting gives one arithmetic in all three."""
    ckpt = load_checkpoint(model)
    if threshold is None:
        warn_if_threshold_unchosen(ckpt)
    dev = resolve_device(device)
    net = ckpt.build(dev)
    cfg = dataclasses.replace(ckpt.config, device=device, amp=amp)
    bf16, channels_last = use_bf16(cfg, dev), use_channels_last(cfg, dev)
    if channels_last:  # the memory format changes bf16 kernels, hence the last digits: alike in every command
        net = net.to(memory_format=torch.channels_last)
    return Inference(ckpt, net, cfg, dev, bf16, channels_last,
                     ckpt.threshold if threshold is None else float(threshold))


def probabilities(logits: torch.Tensor) -> np.ndarray:
    """P(PNEUMONIA) from two-class logits."""
    return torch.softmax(logits.float(), dim=1)[:, 1].numpy().astype(np.float64)


def _checked(labels, probs, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` (0 NORMAL, 1 PNEUMONIA) and ``probs`` (P(PNEUMONIA)) as arrays, or a UsageError saying what is
    wrong with them: a label 2 had been dropped from every count but ``n``, a NaN or a length mismatch met
    scikit-learn's errors, a threshold of 5 passed."""
    try:
        y = np.asarray(labels)
        p = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise UsageError(f"probabilities: {e}") from None
    if y.ndim != 1 or p.ndim != 1 or len(y) != len(p):
        raise UsageError(f"labels and probabilities must be two lists of one length, got shapes {y.shape} and "
                         f"{p.shape}")
    if len(y) and not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool
                       or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))) \
            or not np.isin(y, (0, 1)).all():
        bad = next((v for v in y.tolist() if v not in (0, 1)), y.tolist()[0] if len(y) else None)
        raise UsageError(f"labels must be 0 (NORMAL) or 1 (PNEUMONIA), got {bad!r}")
    if not np.all((p >= 0) & (p <= 1)):  # NaN fails too
        bad = p[~((p >= 0) & (p <= 1))][0]
        raise UsageError(f"probabilities must lie in [0, 1], got {bad!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                                  or not 0 <= threshold <= 1):
        raise UsageError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return y.astype(np.int64), p


def choose_threshold(labels: np.ndarray, probs: np.ndarray, policy: str = "youden",
                     target_sensitivity: float = 0.97) -> float:
    """Decision threshold on P(PNEUMONIA) from validation predictions (predict PNEUMONIA when prob >= threshold).

    ``youden`` maximises sensitivity + specificity - 1; ``sensitivity`` takes the highest threshold whose
    sensitivity reaches ``target_sensitivity`` (the most specific such operating point).

    Either picks an operating point between two neighbouring validation scores, and the threshold is put halfway
    between them, not on the higher one: it labels the validation images alike, and an image near the border no
    longer flips with the last bits of its score (another backend, precision or batch).
    """
    from sklearn.metrics import roc_curve

    if policy not in ("youden", "sensitivity"):
        raise UsageError(f"threshold policy {policy!r}: use youden or sensitivity")
    if policy == "sensitivity" and not (isinstance(target_sensitivity, numbers.Real)
                                        and 0 < target_sensitivity <= 1):
        raise UsageError(f"target sensitivity must be in (0, 1], got {target_sensitivity!r}")
    labels, probs = _checked(labels, probs)
    if len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if policy == "youden":
        # J in whole counts (J * P * N = TP * N - FP * P): equal J values compare equal, and the first of them, the
        # highest threshold, is taken, the most specific as the sensitivity policy takes. In floats, 1 - 1/3 and
        # 2/3 differed in the last bit, and a tie went to whichever the rounding favoured.
        n_pos, n_neg = int(np.sum(labels == 1)), int(np.sum(labels != 1))
        tps, fps = np.rint(tpr * n_pos).astype(np.int64), np.rint(fpr * n_neg).astype(np.int64)
        idx = int(np.argmax(tps * n_neg - fps * n_pos))
    elif policy == "sensitivity":
        idx = int(np.flatnonzero(tpr >= target_sensitivity)[0])
    if idx + 1 == len(thresholds):  # every validation image positive: no lower score to go halfway to
        return float(thresholds[idx])
    higher, lower = float(thresholds[idx]), float(thresholds[idx + 1])
    middle = (higher + lower) / 2
    return middle if lower < middle <= higher else higher  # scores one float apart have no middle


# The probabilities come from a float32 softmax, which resolves P near 1 only to 6e-8 (P rounds to exactly 1.0 once
# the logits differ by about 16.6) but P near 0 to 1e-38: clipped at 1e-15, a confidently wrong NORMAL image cost
# 34.5 and a PNEUMONIA image of the same logit gap 17. Both sides are clipped at float32's resolution below 1, so
# one image costs at most -log(5.96e-8) = 16.6 whichever its class.
LOG_LOSS_FLOOR = float(np.finfo(np.float32).epsneg)


def compute_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    """Classification metrics at ``threshold``, plus threshold-free AUROC and AUPRC and the probabilities'
    calibration: Brier score, log loss (natural log, unweighted; the probability of each image's true class clipped
    below at 6e-8, :data:`LOG_LOSS_FLOOR`) and expected calibration error (None when undefined)."""
    labels, probs = _checked(labels, probs, threshold)
    pred = (probs >= threshold).astype(np.int64)
    # Counted, not by scikit-learn's confusion_matrix, which refuses an empty split ("Found empty input array")
    (tn, fp), (fn, tp) = np.bincount(2 * labels + pred, minlength=4).reshape(2, 2)
    n = len(labels)

    def ratio(a: float, b: float) -> float | None:
        return float(a / b) if b else None

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    both = len(np.unique(labels)) == 2
    ranked = {k: min(1.0, v) for k, v in _Resampler(labels, probs, threshold).metrics_weighted(np.ones(n)).items()
              if k in ("auroc", "auprc")} if both else {}
    return {
        "n": int(n),
        "n_normal": int(tn + fp),
        "n_pneumonia": int(fn + tp),
        "accuracy": ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "sensitivity": recall,
        "specificity": ratio(tn, tn + fp),
        # None without PNEUMONIA images, as sensitivity: a set of NORMAL images only cannot measure it (it had read
        # 0.000 beside an interval withheld as unmeasurable).
        "f1": ratio(2 * tp, 2 * tp + fp + fn) if tp + fn else None,
        # sklearn's areas, as their intervals' resamples sum them (:class:`_Resampler`, the same to the last bits or
        # two): sklearn's own sums had given an AUPRC of 1.0000000000000002, above 1 and outside its interval.
        **({k: ranked[k] for k in ("auroc", "auprc")} if both else {"auroc": None, "auprc": None}),
        # Calibration of P(PNEUMONIA), whatever the threshold: what a user reading the probability relies on.
        "brier": float(np.mean((probs - labels) ** 2)) if n else None,
        "log_loss": float(-np.mean(np.log(np.where(labels == 1, probs, 1 - probs).clip(LOG_LOSS_FLOOR, 1))))
        if n else None,
        "ece": expected_calibration_error(labels, probs) if n else None,
        "threshold": float(threshold),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


CI_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auroc", "auprc")


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, threshold: float, *, patients=None, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict[str, list[float] | None]:
    """Bias-corrected and accelerated (BCa) bootstrap intervals (Efron 1987; ``scipy.stats.bootstrap``'s default
    method) for the main metrics, resampling the patients (each with all of its images) where ``patients`` gives each
    image's, else the images.

    Percentile intervals, which cxr gave before, sit too high near AUROC 1: in a simulation of this model's
    validation set (n = 748, AUROC 0.9996) the "95 %" interval held the true AUROC 82 % of the time, BCa's 91 %
    (RELIABILITY.md). Images of one patient are alike, so resampling images as if independent made intervals too
    narrow where patients have several images (Kermany's pneumonia patients have 2.4 on average).

    Where both classes are present, resamples that lack one are redrawn, so every interval is over well-defined
    values. A one-class set (a folder of NORMAL images only, say) still gets intervals for what it defines: accuracy
    and specificity, or accuracy and sensitivity (and from :func:`confidence_intervals`, precision where any image was
    called PNEUMONIA); no AUROC or AUPRC, and no F1 for NORMAL images only.

    Each resample's metrics are those :func:`compute_metrics` gives for its images, computed from how often each
    image was drawn (:class:`_Resampler`). Through scikit-learn, whose checks of its inputs cost ~12 ms a resample
    whatever the split's size, 1,000 resamples took 12 s (BENCHMARKS.md, figure 10). BCa's acceleration comes from a
    jackknife that leaves out one patient (or image) at a time, or one of 1,000 random blocks of them where there are
    more.
    """
    labels, probs = _checked(labels, probs, threshold)
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0 < level < 1:
        raise UsageError(f"level must be a fraction in (0, 1), e.g. 0.95, got {level!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 10:
        raise UsageError(f"n_boot must be a whole number >= 10 (1,000 is usual), got {n_boot!r}")
    if not len(labels):
        return {k: None for k in CI_METRICS}
    both = len(np.unique(labels)) == 2
    clusters = _cluster_index(patients, len(labels))
    n_clusters = int(clusters.max()) + 1
    resampler = _Resampler(labels, probs, threshold)
    values = _bootstrap_values(resampler, labels, clusters, n_boot, seed)
    point = resampler.metrics_weighted(np.ones(len(labels)))
    jackknife = _jackknife(resampler, clusters, n_clusters, labels == 1, both, seed)
    # A metric undefined in every resample (precision when nothing is called PNEUMONIA) has no interval: None, not
    # NaN, which JSON cannot carry. Nor has F1 in a set of NORMAL images only (see compute_metrics). Nor has one that
    # every resample gives alike (a small split without an error): it had read [1, 1], and such "95 %" intervals of
    # AUROC held the true one in 16-43 % of simulated splits of 45-100 images.
    out: dict[str, list[float] | None] = {}
    for k in CI_METRICS:
        v = values[k][np.isfinite(values[k])]
        alike = bool(len(v)) and point[k] is not None and bool(np.all(np.abs(v - point[k]) <= 1e-12))  # AUPRC: sums
        out[k] = None if not len(v) or point[k] is None or alike else _bca(v, point[k], jackknife[k], level)
    return out


def _bootstrap_values(resampler: _Resampler, labels: np.ndarray, clusters: np.ndarray, n_boot: int,
                      seed: int) -> dict[str, np.ndarray]:
    """Each metric of ``n_boot`` resamples of the patients (``clusters``: each image's, 0..G-1), NaN where a resample
    leaves it undefined; resamples that lack a class present in ``labels`` are drawn again."""
    n_clusters = int(clusters.max()) + 1
    positive = labels == 1
    both = positive.any() and not positive.all()
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {k: [] for k in CI_METRICS}
    while len(values["accuracy"]) < n_boot:
        # With one image a patient, the draws (and so every resample) are the image bootstrap's.
        w = np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters)[clusters].astype(np.float64)
        if both and not (w[positive].any() and w[~positive].any()):
            continue
        m = resampler.metrics_weighted(w)
        for k in CI_METRICS:
            values[k].append(np.nan if m[k] is None else m[k])
    return {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}


def _cluster_index(patients, n: int) -> np.ndarray:
    """Each image's patient as an index 0..G-1 (in order of first appearance); each image its own without
    ``patients``."""
    if patients is None:
        return np.arange(n)
    if len(patients) != n:
        raise UsageError(f"patients: one for each image, got {len(patients)} for {n} images")
    _, first, inverse = np.unique(np.asarray(patients, dtype=object).astype(str), return_index=True,
                                  return_inverse=True)
    return np.argsort(np.argsort(first))[inverse.reshape(-1)]  # numbered as they first appear


_JACKKNIFE_BLOCKS = 1000  # leave-one-out jackknife up to this many patients (or images); random blocks beyond


def _jackknife(resampler: _Resampler, clusters: np.ndarray, n_clusters: int, positive: np.ndarray, both: bool,
               seed: int) -> dict[str, np.ndarray]:
    """Each metric with one patient (or one block of them) left out at a time, for BCa's acceleration."""
    if n_clusters <= _JACKKNIFE_BLOCKS:
        blocks = clusters
        n_blocks = n_clusters
    else:
        assign = np.random.default_rng([seed, 1]).permutation(n_clusters) % _JACKKNIFE_BLOCKS
        blocks, n_blocks = assign[clusters], _JACKKNIFE_BLOCKS
    out: dict[str, list[float]] = {k: [] for k in CI_METRICS}
    for b in range(n_blocks):
        w = (blocks != b).astype(np.float64)
        if not w.any() or (both and not (w[positive].any() and w[~positive].any())):
            continue
        m = resampler.metrics_weighted(w)
        for k in CI_METRICS:
            out[k].append(np.nan if m[k] is None else m[k])
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def _bca(values: np.ndarray, estimate: float, jackknife: np.ndarray, level: float) -> list[float]:
    """The BCa interval of bootstrap ``values`` around ``estimate`` (Efron and Tibshirani, 1993, 14.3)."""
    from scipy.stats import norm

    below = (np.sum(values < estimate) + 0.5 * np.sum(values == estimate)) / len(values)
    lo, hi = (1 - level) / 2, (1 + level) / 2
    jack = jackknife[np.isfinite(jackknife)]
    d = jack.mean() - jack if len(jack) else np.zeros(1)
    spread = float(np.sum(d ** 2))
    a = float(np.sum(d ** 3)) / (6 * spread ** 1.5) if spread > 0 else 0.0
    if not 0 < below < 1:  # every resample on one side of the estimate: no bias correction can be made
        qs = [lo, hi]
    else:
        z0 = norm.ppf(below)
        qs = [float(norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))) for z in norm.ppf([lo, hi])]
    return [float(np.percentile(values, 100 * q)) for q in qs]


class _Resampler:
    """:data:`CI_METRICS` of resamples of one set of predictions, each from the count of draws of every image.

    The images are sorted by score once and grouped into distinct scores; a resample is then a weight per image
    (``np.bincount`` of its indices) and its metrics are sums over the groups, with no sorting. AUROC is the
    Mann-Whitney statistic with ties counted half, which is the area under the ROC curve that
    ``sklearn.metrics.roc_auc_score`` computes; AUPRC is ``average_precision_score``'s step sum over the distinct
    scores, highest first.
    """

    def __init__(self, labels: np.ndarray, probs: np.ndarray, threshold: float):
        self.n = len(labels)
        self.order = np.argsort(probs, kind="stable")
        scores = probs[self.order]
        self.positive = labels[self.order] == 1
        self.group = np.r_[0, np.cumsum(scores[1:] != scores[:-1])]  # index of each image's distinct score, ascending
        self.n_groups = int(self.group[-1]) + 1
        self.called = probs[self.order] >= threshold

    def metrics(self, idx: np.ndarray) -> dict[str, float | None]:
        """The metrics of the images ``idx`` (with repeats)."""
        return self.metrics_weighted(np.bincount(idx, minlength=self.n).astype(np.float64))

    def metrics_weighted(self, weights: np.ndarray) -> dict[str, float | None]:
        """The metrics of the images taken ``weights[i]`` times each (in the images' own order)."""
        w = np.asarray(weights, dtype=np.float64)[self.order]
        pos_w, neg_w = np.where(self.positive, w, 0.0), np.where(self.positive, 0.0, w)
        tp, fn = pos_w[self.called].sum(), pos_w[~self.called].sum()
        fp, tn = neg_w[self.called].sum(), neg_w[~self.called].sum()
        n_pos, n_neg = tp + fn, fp + tn

        def ratio(a: float, b: float) -> float | None:
            return float(a / b) if b else None

        out = {"accuracy": ratio(tp + tn, n_pos + n_neg), "sensitivity": ratio(tp, n_pos),
               "specificity": ratio(tn, n_neg), "precision": ratio(tp, tp + fp),
               "f1": ratio(2 * tp, 2 * tp + fp + fn) if n_pos else None, "auroc": None, "auprc": None}
        if n_pos and n_neg:
            pos = np.bincount(self.group, pos_w, minlength=self.n_groups)
            neg = np.bincount(self.group, neg_w, minlength=self.n_groups)
            below = np.cumsum(neg) - neg  # NORMAL weight strictly below each distinct score
            out["auroc"] = float(np.sum(pos * (below + neg / 2)) / (n_pos * n_neg))
            drawn = (pos + neg) > 0  # a score no image of the resample has is no threshold
            tps, fps = np.cumsum(pos[drawn][::-1]), np.cumsum(neg[drawn][::-1])
            recall_steps = np.diff(np.r_[0.0, tps / n_pos])
            out["auprc"] = float(np.sum(recall_steps * tps / (tps + fps)))
        return out


CI_METHOD = ("Wilson score for accuracy, sensitivity, specificity and precision; BCa bootstrap of the images "
             "for f1, auroc and auprc")
CI_METHOD_FEW_PATIENTS = ("Wilson score for accuracy, sensitivity, specificity and precision, over the effective "
                          "number of images (design effect of the patients' several images; as many as the patients "
                          "for a rate of 0 or 1); BCa bootstrap of the images for f1, auroc and auprc, resampled as if "
                          f"independent: too few patients (fewer than {MIN_PATIENTS_PER_CLASS} in a class)")
CI_METHOD_PATIENTS = ("Wilson score for accuracy, sensitivity, specificity and precision, over the effective number of "
                      "images (design effect of the patients' several images; as many as the patients for a rate of "
                      "0 or 1); BCa bootstrap of the patients, each with all of its images, for f1, auroc and auprc "
                      "(byte-identical copies of an image are one patient's in both)")


def confidence_intervals(labels: np.ndarray, probs: np.ndarray, threshold: float, *, patients=None,
                         n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                         rate_patients=None) -> dict[str, list[float] | None]:
    """95 % intervals of the main metrics (:data:`CI_METHOD`, or :data:`CI_METHOD_PATIENTS` with ``patients``).

    The four rates are binomial proportions at a fixed threshold, so they get Wilson score intervals: the bootstrap
    of a rate of 0 or 1 (193 of 193 NORMAL images right, say) is [1, 1], as if it were certain, where Wilson gives
    [0.98, 1]. Where patients have several images, whose results go together, a rate's Wilson interval is taken over
    the effective number of images, n divided by the design effect (the ratio estimator's variance over the
    patients, against the binomial one; never below 1, so never narrower than Wilson's over all n). F1, AUROC and
    AUPRC are no proportions and keep :func:`bootstrap_ci`. ``rate_patients``: the patients of the rates' intervals
    where they are not ``patients`` (too few to resample in the bootstrap, enough to tell the rates' design effect).
    """
    ci = bootstrap_ci(labels, probs, threshold, patients=patients, n_boot=n_boot, seed=seed, level=level)
    labels, probs = _checked(labels, probs, threshold)
    pred = (probs >= threshold).astype(np.int64)
    clusters = _cluster_index(patients if rate_patients is None else rate_patients, len(labels))
    hit = pred == labels
    for k, among in {"accuracy": np.ones(len(labels), bool), "sensitivity": labels == 1,
                     "specificity": labels == 0, "precision": pred == 1}.items():
        ci[k] = _wilson(hit[among], clusters[among], level) if among.any() else None
    return ci


def _wilson(hits: np.ndarray, clusters: np.ndarray, level: float) -> list[float]:
    """Wilson's score interval of the proportion of ``hits``, over the effective number of images where the
    ``clusters`` (patients) hold several."""
    from scipy.stats import binomtest, norm

    n = len(hits)
    p = float(hits.mean())
    n_eff = float(n)
    _, cluster = np.unique(clusters, return_inverse=True)
    m, y = np.bincount(cluster), np.bincount(cluster, weights=hits.astype(np.float64))
    if len(m) < n and 0 < p < 1 and len(m) > 1:
        ratio_var = len(m) / (len(m) - 1) * float(np.sum((y - p * m) ** 2)) / n ** 2
        design_effect = ratio_var / (p * (1 - p) / n)
        n_eff = n / max(design_effect, 1.0)
    elif len(m) < n:
        # All right (or all wrong): no spread to measure the patients' likeness by. As many as the patients, the
        # most their images can be worth: 100 images of 10 patients, all right, had read as 100 independent ones.
        # Hence 100 of 100 right reads [0.72, 1] and 99 of 100 [0.95, 1.00] where the one error's patient had 9
        # images right (which shows them unalike): kept, and said in README, since copies of an image must add no
        # certainty at 0 or 1 either (tests/test_evaluate.py, the tripled set).
        n_eff = float(len(m))
    if n_eff == n:  # independent images: scipy's Wilson interval, to the last digit
        interval = binomtest(int(hits.sum()), n).proportion_ci(confidence_level=level, method="wilson")
        return [float(interval.low), float(interval.high)]
    z = float(norm.ppf((1 + level) / 2))
    centre = (p + z * z / (2 * n_eff)) / (1 + z * z / n_eff)
    half = z / (1 + z * z / n_eff) * np.sqrt(p * (1 - p) / n_eff + z * z / (4 * n_eff ** 2))
    return [0.0 if p == 0 else max(0.0, float(centre - half)), 1.0 if p == 1 else min(1.0, float(centre + half))]


def write_predictions(path: str | os.PathLike, result: SplitResult, threshold: float) -> None:
    """``predictions_<split>.csv``: path, true label, P(PNEUMONIA), predicted label, and the disclaimer."""
    with atomic_path(path) as tmp:
        _write_predictions_to(tmp, result, threshold)


def _write_predictions_to(path: Path, result: SplitResult, threshold: float) -> None:
    with open(path, "w", **CSV_TEXT) as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "prob_pneumonia", "predicted", "note"])
        for p, y, prob in zip(result.paths, result.labels, result.probs, strict=True):
            w.writerow([p, CLASS_NAMES[int(y)], repr(float(prob)), CLASS_NAMES[int(prob >= threshold)], DISCLAIMER])


def write_evaluation(out_dir: str | os.PathLike, results: list[SplitResult], threshold: float,
                     extra: dict | None = None, n_boot: int = 1000) -> dict:
    """Write ``metrics.json`` and one ``predictions_<split>.csv`` per split; return the metrics.

    Each split's metrics include ``ci95``, 95 % intervals by :func:`confidence_intervals` (``n_boot`` bootstrap
    resamples; 0 to skip), and ``ci95_method``.
    """
    out = Path(out_dir)
    ensure_dir(out)
    try:  # the splits of an earlier evaluation into this folder, whose predictions files go below
        earlier = set(json.loads((out / "metrics.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        earlier = set()
    metrics = {}
    # The threshold as the console, the log and the report show it: with the decimals that keep every probability
    # below it below it as shown ("threshold 0.002" had stood above images at P 0.00200 labelled NORMAL).
    shown = f"{threshold:.{threshold_decimals(threshold, [p for r in results for p in r.probs])}f}"
    for r in results:
        metrics[r.name] = {**compute_metrics(r.labels, r.probs, threshold), "threshold_shown": shown}
        if n_boot:
            patients, method = interval_patients(r.name, r.labels, r.patients)
            metrics[r.name]["ci95"] = confidence_intervals(r.labels, r.probs, threshold, n_boot=n_boot,
                                                           patients=patients,
                                                           rate_patients=rate_patients(r.name, r.patients, say=False))
            metrics[r.name]["ci95_method"] = method
        known = [p for p in r.patients or [] if not p.startswith(_UNKNOWN_PATIENT)]
        if r.patients and len(known) == len(r.patients):  # patients counted only where every image's is known
            metrics[r.name]["n_patients"] = len(set(known))
        if extra and r.name in extra:
            metrics[r.name].update(extra[r.name])
    # Every split's numbers first, then the files, metrics.json last, after an earlier one is gone: written split by
    # split, an interruption (or a failure) in the second split's intervals had left the first split's predictions of
    # the new model beside the old model's metrics.json, and a report was made of the mix. The new predictions are
    # all written (beside, as temporary files) before the earlier metrics.json goes: a disk that filled up had cost
    # an earlier evaluation its metrics.json, while the error said the file was unchanged.
    text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"
    with contextlib.ExitStack() as written_last:  # each file put in place as the stack closes, after the unlink
        for r in results:
            _write_predictions_to(written_last.enter_context(atomic_path(out / f"predictions_{r.name}.csv")), r,
                                  threshold)
        with contextlib.suppress(FileNotFoundError):
            (out / "metrics.json").unlink()
        # ... and the report of the earlier results with it: stopped before the new report, an evaluation (or a
        # lengthened run) had left a report of another model beside these results.
        from cxr.report import remove_report

        remove_report(out)
    atomic_write_text(out / "metrics.json", text)
    written = [out / f"predictions_{r.name}.csv" for r in results]
    for split in sorted(earlier - set(metrics)):  # only files cxr wrote: a predictions_x.csv of `cxr predict` stays
        old = out / f"predictions_{split}.csv"
        if isinstance(split, str) and "/" not in split and "\\" not in split and old.is_file():
            if any(old.samefile(new) for new in written):
                continue  # a case-insensitive file system: predictions_Test.csv is the predictions_test.csv written
            old.unlink()
            log.info("removed %s, an earlier evaluation's predictions (not of these results)", old)
    return metrics


# The published file names of the images the bundled model was trained and validated on: the whole official Kermany
# train and val splits (scripts/bundled_training_names.py writes it).
BUNDLED_TRAINING_NAMES = Path(__file__).resolve().parent / "weights" / "kermany-224-trainval-names.txt.gz"


@dataclass
class Development:
    """What can be told of the images a model was trained or validated on (:func:`development_images`).

    ``count(split, samples)``: how many of the samples are such images by content (or, for the bundled model, by the
    published names); ``what(split)`` says what they are. ``named`` and ``sharing``: of the other samples, how many
    have the file name of one (a resized or re-encoded copy, such as Kermany's full-resolution originals of its 224 px
    copies, is no byte-identical file), and how many belong to a patient who has images there. Each is None where it
    cannot be told for the split. ``own(split, samples)``: of a split named train or val, how many are the run's own
    train and val images where it recorded them (``n_run_train``, ``n_run_val``; those that are not 0), which the
    other counts leave out as expected there.
    """

    count: Callable[[str, list], int | None]
    what: Callable[[str], str]
    named: Callable[[str, list], int | None] = lambda split, samples: None
    sharing: Callable[[str, list], int | None] = lambda split, samples: None
    own: Callable[[str, list], dict[str, int]] = lambda split, samples: {}

    def __iter__(self):  # count, what = development_images(...)
        return iter((self.count, self.what))


def development_images(ckpt, mid: str) -> Development | None:
    """Where it can be told, how many images of an evaluated split the model was trained or validated on (a
    :class:`Development`); else None.

    - The bundled model, and a model fine-tuned from it (``--weights default``): images with the file names of
      Kermany's official train and val splits, the images it was developed on. A copy of the Kaggle or Mendeley
      dataset keeps those names; its ``train`` folder is no test of this model. (By name, since those originals are
      not byte for byte the 224 px copies it was trained on.)
    - A model in a run directory (and the runs it was fine-tuned from): images whose content digest is that of one in
      its ``split.csv``'s train or val; besides, images with the name of one there (a name the run's train and val
      hold once: ``IM-0001-0001`` in every patient's folder of an OsiriX export is no one image), and images of
      patients with images there (patient ids read from names, DICOM headers or the run's pattern, not a file's own
      name). The run's own train and val images, evaluated where they are, are not counted: they are expected to be
      so. The name and patient counts had been missing: the Kermany originals of a run's 224 px training images had
      been reported as 0 of 16 seen.
    """
    import gzip

    from cxr.data import follow_moved_data, patient_from_name_only, patient_key, read_split_csv
    from cxr.export import file_sha256
    from cxr.model import BUNDLED_MODEL

    # (does it apply to a split of this name, is a sample one, what such samples are, whether it goes by file name)
    checks = []
    bundled = BUNDLED_MODEL.is_file() and file_sha256(BUNDLED_MODEL)[:12] == mid
    bases, from_bundled = _fine_tuned_from(ckpt)
    if (bundled or from_bundled) and BUNDLED_TRAINING_NAMES.is_file():
        with gzip.open(BUNDLED_TRAINING_NAMES, "rt", encoding="utf-8") as f:
            names = {_name_key(n) for n in f.read().split()}
        # By name without its extension, in any case: the same X-ray as DICOM or PNG was missed.
        checks.append((lambda split: True, lambda s: _name_key(Path(s.path).name) in names,
                       "named as images of the official Kermany train and val splits, which the bundled model was "
                       "trained on" + ("" if bundled else " (this model was fine-tuned from it)"), True))
    record = Path(ckpt.path).parent / "split.csv" if ckpt.path and not bundled else None
    own_paths: dict[str, set[str]] = {}  # the run's own train and val images, where it recorded them
    digests: set[str] = set()
    name_counts: dict[str, int] = {}
    patients: set[str] = set()
    for path, own in ([(record, True)] if record is not None else []) + [(b, False) for b in bases]:
        if not path.is_file():
            continue
        try:
            # where the run's config.yaml says its data is now, as its split.csv given as --data is read: the run's
            # own images, moved with their data, had been counted as images seen in training
            recorded = follow_moved_data(path, read_split_csv(path))
            development = [s for name in ("train", "val") for s in recorded.get(name, [])]
        except (OSError, ValueError, KeyError, csv.Error) as e:
            log.warning("%s: not readable (%s), so images this model was trained on cannot be told", path, e)
            continue
        seen = {s.digest for s in development if s.digest}
        if own:
            own_paths = {name: {os.path.realpath(s.path) for s in recorded.get(name, [])} for name in ("train", "val")}
        digests |= seen
        for s in development:
            if npz_row(s.path):  # a row's "name" is its index: no name of an image (see named, below)
                continue
            key = _name_key(Path(s.path).name)
            name_counts[key] = name_counts.get(key, 0) + 1
        patients |= {patient_key(s.patient) for s in development if not patient_from_name_only(s)}
        # A base run's images count in every split (a fine-tuned run's carved val held the base run's images, and
        # scored 1.000 without a word).
        checks.append((lambda split: True, lambda s, seen=seen: s.digest in seen,
                       f"in the train or val split of the run that trained the model ({path})" if own else
                       f"in the train or val split of a run it was fine-tuned from ({path})", False))
    if not checks:
        return None

    def others(split: str, samples) -> list | None:
        """The samples to judge: not the run's own train and val images in its train or val split, where they are
        expected; None when that leaves none (the run's own train split, say)."""
        if split in ("train", "val") and own_paths:  # by real path: --data through a link or ../ is the same data
            samples = [s for s in samples if not any(os.path.realpath(s.path) in p for p in own_paths.values())]
            if not samples:
                return None
        return list(samples)

    def own(split: str, samples) -> dict[str, int]:
        if split not in ("train", "val") or not own_paths:
            return {}
        real = [os.path.realpath(s.path) for s in samples]
        counts = {f"n_run_{name}": sum(r in paths for r in real) for name, paths in own_paths.items()}
        return {k: n for k, n in counts.items() if n}

    def count(split: str, samples) -> int | None:
        judged = others(split, samples)
        # Rows of an .npz have no file names: a check by name cannot tell (PneumoniaMNIST's val rows, Kermany
        # training images, had been counted 0 of 60 seen in training by the bundled model)
        rows = bool(judged) and all(npz_row(s.path) for s in judged)
        mine = [is_one for applies, is_one, _, by_name in checks if applies(split) and not (by_name and rows)]
        return sum(any(f(s) for f in mine) for s in judged) if mine and judged is not None else None

    def what(split: str) -> str:  # only the checks that apply to the split
        return ", or ".join(w for applies, _, w, _ in checks if applies(split))

    unique = {key for key, n in name_counts.items() if n == 1}

    def named(split: str, samples) -> int | None:
        judged = others(split, samples)
        if judged is None or not unique:
            return None
        # Not rows of an .npz: a row's index is no name (the withheld PneumoniaMNIST test rows 524..623 had been said
        # to have the names of training images, rows of train_images with those indices).
        return sum(not (s.digest and s.digest in digests) and not npz_row(s.path)
                   and _name_key(Path(s.path).name) in unique for s in judged)

    def sharing(split: str, samples) -> int | None:
        judged = others(split, samples)
        if judged is None or not patients:
            return None
        return sum(not patient_from_name_only(s) and patient_key(s.patient) in patients for s in judged)

    return Development(count, what, named, sharing, own)


def count_development(developed_on: Development, split: str, samples) -> dict[str, int]:
    """A split's counts of :class:`Development` as its metrics record them (``n_seen_in_training``,
    ``n_named_as_training``, ``n_sharing_patients``: those that can be told), each said in a warning when not 0."""
    out = {}
    for key, n in (("n_seen_in_training", developed_on.count(split, samples)),
                   ("n_named_as_training", developed_on.named(split, samples)),
                   ("n_sharing_patients", developed_on.sharing(split, samples))):
        if n is not None:
            out[key] = n
    seen, named, sharing = (out.get(k, 0) for k in ("n_seen_in_training", "n_named_as_training",
                                                     "n_sharing_patients"))
    if seen:
        log.warning("%s split: %d of its %d images are %s, so its metrics there overstate how the model does on new "
                    "images", split, seen, len(samples), developed_on.what(split))
    if named:
        log.warning("%s split: %d of its %d images have the file names of images in the train or val split of the "
                    "run that trained the model (or one it was fine-tuned from), though not their bytes: if they are "
                    "the same X-rays (resized or re-encoded copies), its metrics there overstate how the model does "
                    "on new images", split, named, len(samples))
    if sharing:
        log.warning("%s split: %d of its %d images belong to patients who have images in the train or val split of "
                    "the run that trained the model (by the patient ids in its split.csv): its metrics there "
                    "overstate how the model does on new patients", split, sharing, len(samples))
    return out


def _name_key(name: str) -> str:
    """A file name without its image extensions (``IM-0115-0001.jpeg.dcm``, a converter's, has two), lower case."""
    while (stem := image_stem(name)) != name:
        name = stem
    return name.lower()


def _is_the_bundled_model(path: Path) -> bool:
    """Whether ``path`` is the bundled model's file, or a copy of it (the same bytes): a model fine-tuned from it by
    path had not been checked for the Kermany images it was trained on, as one given ``--weights default`` is."""
    from cxr.model import BUNDLED_MODEL

    try:
        if not path.is_file() or path.stat().st_size != BUNDLED_MODEL.stat().st_size:
            return False
        if path.resolve() == BUNDLED_MODEL.resolve():
            return True
        from cxr.export import file_sha256

        return file_sha256(path) == file_sha256(BUNDLED_MODEL)  # remembered: not hashed again at each look
    except OSError:
        return False


def _fine_tuned_from(ckpt) -> tuple[list[Path], bool]:
    """The split.csv files of the runs whose weights this model started from (``--weights RUN`` or its checkpoint,
    followed back through their own config.yaml), and whether that chain starts at the bundled model."""
    from cxr.config import load_config

    records: list[Path] = []
    weights, visited = ckpt.config.weights, set()
    while weights not in ("", "none", "imagenet"):
        path = Path(weights)
        if weights == "default" or _is_the_bundled_model(path):  # by name, or its file by path (a copy, too)
            return records, True
        run = path if path.is_dir() else path.parent
        if run.resolve() in visited or not (run / "split.csv").is_file():
            break
        visited.add(run.resolve())
        records.append(run / "split.csv")
        try:
            weights = load_config(run / "config.yaml").weights
        except CxrError:
            break
    return records, False


def evaluate_model(model: str | os.PathLike, data: str | os.PathLike, output: str | os.PathLike, *,
                   threshold: float | None = None, device: str = "auto", cache_dir: str | None = None,
                   batch_size: int = 64, amp: str = "off", patient_pattern: str | None = None) -> dict:
    """Evaluate a checkpoint (or run directory) on every split found at ``data``; write the artifacts to ``output``.

    ``patient_pattern`` reads each image's patient from its path (:func:`cxr.data.file_patient_id`), for the
    intervals and the count of images of training patients; None: the model's training config's (a run trained
    with one folder per patient had been evaluated with each image its own patient), "" none.

    The decision threshold is the checkpoint's (chosen on validation at training time) unless ``threshold``
    is given. ``amp`` "off" (the default) predicts in fp32, TF32 off on CUDA, so that bf16 does not move the
    metrics on machines that have it; "auto" uses bf16 where it is fast, as training does. On an H200 bf16 moved
    P(PNEUMONIA) of the bundled model by up to 0.014 and turned one of 748 validation labels (MODEL_CARD.md).
    """
    from cxr.config import compiles_as_regex, default_cache_dir
    from cxr.data import check_output_outside_data, is_split_csv, prepare, scan
    from cxr.export import model_id
    from cxr.fileio import check_paths, check_writable, output_lock
    from cxr.predict import check_inference_args

    # None had been pathlib's TypeError; a cache_dir of bytes, a folder named "b'/tmp/x'" here
    check_paths(data=data, output=output, **({} if cache_dir is None else {"cache_dir": cache_dir}))
    check_inference_args(threshold=threshold, amp=amp, batch_size=batch_size)
    if patient_pattern is not None and not isinstance(patient_pattern, str) or patient_pattern \
            and not compiles_as_regex(patient_pattern):
        raise UsageError(f"--patient-pattern {patient_pattern!r}: not a regular expression Python can compile")
    if patient_pattern is not None and (Path(data).suffix.lower() == ".npz" or Path(data).suffix.lower() == ".csv"
                                        and os.path.isfile(data) and is_split_csv(data)):
        # It had been ignored without a word: a split.csv carries the run's own patients, an .npz's rows no paths
        raise UsageError(f"--patient-pattern reads image paths below class folders; {Path(data).name} has none to "
                         "read (a run's split.csv carries its patients, an .npz's rows have no paths): drop it")
    check_output_outside_data(output, data)  # its pictures among the images would be X-rays the next time
    check_writable(output, folder=True)  # now, not after the predictions
    check_writable(Path(output) / "metrics.json")  # a folder of that name failed only after predicting everything
    if any((Path(output) / name).is_file() for name in ("best.pt", "last.pt", "history.csv")):
        # Its metrics.json (the training's, on train, val and test) would be replaced, and its report would mix both.
        raise UsageError(f"--output {output}: a training run's folder, whose metrics.json and predictions this would "
                         f"replace; give another folder (say {Path(output) / ('eval-' + Path(data).name)})")
    # Held to the end (and through the CLI's report): two evaluations into one folder at once had left one model's
    # metrics.json beside the other's predictions and report.
    with output_lock(output, "cxr evaluate or cxr report"):
        run = load_for_inference(model, device=device, amp=amp, threshold=threshold)
        ckpt = run.ckpt
        # Recorded, so that `cxr report OUT` can draw the heatmaps with the same model later.
        # A Checkpoint given in memory has no file to name (its empty path had been recorded as the current folder).
        model_ref = ("default" if isinstance(model, str) and model == "default"
                     else str(Path(ckpt.path).resolve()) if ckpt.path else IN_MEMORY)
        mid = model_id(ckpt)  # the name `cxr predict` gives the same file
        # The cache is this machine's, not the one recorded by whoever trained the model.
        cfg = dataclasses.replace(run.cfg, cache_dir=cache_dir or default_cache_dir())
        pattern = ckpt.config.patient_pattern if patient_pattern is None else patient_pattern
        # A CSV listing's rows with no split are named after it, as a folder of class folders is (they had been
        # "train", which a report reads as the images a model learnt from).
        splits = scan(data, require_both_classes=False, patient_pattern=pattern,
                      unsplit=valid_utf8(Path(os.path.abspath(data)).stem))
        for name in splits:  # a split's name is its folder's, and names the output files: checked before the work
            longest = f"predictions_{name}.csv"  # one byte longer than flythrough_<name>.mp4
            if len(os.fsencode(longest)) > MAX_NAME_BYTES:
                raise UsageError(f"{data}: the folder name {name[:40]}... is too long for the file names of its "
                                 f"results ({longest[:20]}...: {len(os.fsencode(longest))} bytes, at most "
                                 f"{MAX_NAME_BYTES}); give --data a link to it with a shorter name")
        t = run.threshold
        developed_on = development_images(ckpt, mid)
        results, failures, unusable = [], {}, (Path(data).name, 0, "no images")
        for split in splits.values():
            prepared = prepare(split, cfg)
            if split.recorded:
                changed = [s.path for s in prepared.samples if split.recorded.get(s.path, s.digest) != s.digest]
                if changed:
                    log.warning("%s split: %d of its images are not what %s recorded (changed since), e.g. %s: its "
                                "metrics are not the run's", split.name, len(changed), data, changed[0])
            if not len(prepared.samples):
                reason = prepared.failures[0][1] if prepared.failures else "no images"
                log.warning("%s: no metrics for split %r: none of its %d images could be read (first: %s)",
                            data, split.name, len(split.samples), reason)
                unusable = (split.name, len(split.samples), reason)
                continue
            results.append(SplitResult(split.name, [s.path for s in prepared.samples], prepared.labels,
                                       run.probs(prepared.images, batch_size, f"evaluating {split.name}"),
                                       patients_of(prepared.samples)))
            failures[split.name] = {"n_unreadable": len(prepared.failures),
                                    # which, and why: the count alone had left them to the console's log
                                    "unreadable": [{"path": path, "reason": why} for path, why in prepared.failures],
                                    "threshold_source": "model" if threshold is None else "given",
                                    "model": model_ref, "model_id": mid, "data": str(Path(data).resolve()),
                                    "inference_dtype": "bfloat16" if run.bf16 else "float32"}
            views = warn_of_views([s.path for s in prepared.samples if not npz_row(s.path)], f"{split.name} split")
            if views:  # a study's lateral beside its PA view: scored, and counted, as if it were one
                failures[split.name]["n_not_frontal"] = len(views)
            if split.not_found:  # listed by a CSV, not there: n had been smaller without a word in the results
                failures[split.name].update({"n_not_found": len(split.not_found),
                                             "not_found": [{"path": f, "reason": r} for f, r in split.not_found]})
            copies = count_copies(prepared.samples)
            if copies:  # counted once in the intervals (patients_of), and said: nothing had
                failures[split.name]["n_copies"] = copies
                log.warning("%s split: %d of its %d images are byte-identical copies of others in it: each set counts "
                            "once in the intervals (its metrics count every image)", split.name, copies,
                            len(prepared.samples))
            if developed_on is not None:
                failures[split.name].update(count_development(developed_on, split.name, prepared.samples))
                # The run's own train and val images (`--data RUN/split.csv`, or the data it was trained on): its report
                # had shown those rows as results on new images, without the training report's word of caution.
                own = developed_on.own(split.name, prepared.samples)
                failures[split.name].update(own)
                for key, what in (("n_run_train", "training images"),
                                  ("n_run_val", "validation images, on which its epoch and threshold were chosen")):
                    if own.get(key):
                        log.info("%s split: %d of its %d images are the run's own %s: its metrics there are no measure "
                                 "of new images", split.name, own[key], len(prepared.samples), what)
        if not results:
            name, n, reason = unusable
            raise DataError(f"{data}: none of the {n} images of split {name!r} could be read (first: {reason})")
        return write_evaluation(output, results, t, extra=failures)


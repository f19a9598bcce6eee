"""Evaluation: probabilities from a model, a decision threshold chosen on validation, metrics, artifacts.

Outputs of :func:`write_evaluation` (stable names, read by reports):

* ``metrics.json``: one object per split with ``n``, ``accuracy``, ``precision``, ``recall`` (= sensitivity),
  ``specificity``, ``f1``, ``auroc``, ``auprc``, the calibration of the probabilities (``brier``, ``log_loss``,
  ``ece``), ``threshold`` and ``confusion_matrix`` as ``[[TN, FP], [FN, TP]]``;
* ``predictions_<split>.csv``: ``path, label, prob_pneumonia, predicted, note`` (the research-use disclaimer).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxr.config import CLASS_NAMES
from cxr.errors import CxrError, DataError, UsageError
from cxr.fileio import CSV_TEXT, MAX_NAME_BYTES, atomic_path, atomic_write_text, ensure_dir
from cxr.images import image_stem
from cxr.model import autocast, check_model_inputs, normalize
from cxr.predict import DISCLAIMER
from cxr.report import IN_MEMORY, expected_calibration_error

log = logging.getLogger(__name__)

@dataclass
class SplitResult:
    """Predictions for one split: paths, true labels (1 = PNEUMONIA) and P(PNEUMONIA)."""

    name: str
    paths: list[str]
    labels: np.ndarray
    probs: np.ndarray


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: np.ndarray | torch.Tensor, *, mean: float, std: float,
                   device: torch.device, batch_size: int = 64, bf16: bool = False,
                   channels_last: bool = False) -> torch.Tensor:
    """Logits (N, 2) in float32 on the CPU for uint8 images (N, S, S), in batches, without augmentation (S: the
    model's image size, ``Checkpoint.config.image_size``)."""
    check_model_inputs(images, batch_size)
    images = torch.as_tensor(images)
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].unsqueeze(1).to(device, non_blocking=True)
        with autocast(device, bf16):
            out.append(model(normalize(x, mean, std, channels_last)).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, 2))


def probabilities(logits: torch.Tensor) -> np.ndarray:
    """P(PNEUMONIA) from two-class logits."""
    return torch.softmax(logits.float(), dim=1)[:, 1].numpy().astype(np.float64)


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

    labels = np.asarray(labels)
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
    else:
        raise ValueError(f"unknown threshold policy {policy!r}")
    if idx + 1 == len(thresholds):  # every validation image positive: no lower score to go halfway to
        return float(thresholds[idx])
    higher, lower = float(thresholds[idx]), float(thresholds[idx + 1])
    middle = (higher + lower) / 2
    return middle if lower < middle <= higher else higher  # scores one float apart have no middle


def compute_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    """Classification metrics at ``threshold``, plus threshold-free AUROC and AUPRC and the probabilities'
    calibration: Brier score, log loss (natural log, unweighted) and expected calibration error (None when
    undefined)."""
    from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    pred = (probs >= threshold).astype(np.int64)
    (tn, fp), (fn, tp) = confusion_matrix(labels, pred, labels=[0, 1])
    n = len(labels)

    def ratio(a: float, b: float) -> float | None:
        return float(a / b) if b else None

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    both = len(np.unique(labels)) == 2
    return {
        "n": int(n),
        "n_normal": int(tn + fp),
        "n_pneumonia": int(fn + tp),
        "accuracy": ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "sensitivity": recall,
        "specificity": ratio(tn, tn + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "auroc": float(roc_auc_score(labels, probs)) if both else None,
        "auprc": float(average_precision_score(labels, probs)) if both else None,
        # Calibration of P(PNEUMONIA), whatever the threshold: what a user reading the probability relies on.
        "brier": float(np.mean((probs - labels) ** 2)) if n else None,
        "log_loss": float(-np.mean(np.log(np.where(labels == 1, probs, 1 - probs).clip(1e-15, 1)))) if n else None,
        "ece": expected_calibration_error(labels, probs) if n else None,
        "threshold": float(threshold),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


CI_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auroc", "auprc")


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, threshold: float, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap confidence intervals (images resampled with replacement) for the main metrics.

    Where both classes are present, resamples that lack one are redrawn, so every interval is over well-defined
    values. A one-class set (a folder of NORMAL images only, say) still gets intervals for what it defines: accuracy
    and specificity, or accuracy and sensitivity (and from :func:`confidence_intervals`, precision where any image was
    called PNEUMONIA); no AUROC or AUPRC, and no F1 for NORMAL images only.

    Each resample's metrics are those :func:`compute_metrics` gives for ``labels[idx], probs[idx]``, computed from
    how often each image was drawn (:class:`_Resampler`). Through scikit-learn, whose checks of its inputs cost
    ~12 ms a resample whatever the split's size, 1,000 resamples took 12 s (BENCHMARKS.md, figure 10).
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if not len(labels):
        return {k: None for k in CI_METRICS}
    both = len(np.unique(labels)) == 2
    rng = np.random.default_rng(seed)
    resampler = _Resampler(labels, probs, threshold)
    values: dict[str, list[float]] = {k: [] for k in CI_METRICS}
    while len(values["accuracy"]) < n_boot:
        idx = rng.integers(0, len(labels), len(labels))
        if both and labels[idx].min() == labels[idx].max():
            continue
        m = resampler.metrics(idx)
        for k in CI_METRICS:
            values[k].append(np.nan if m[k] is None else m[k])
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    # A metric undefined in every resample (precision when nothing is called PNEUMONIA) has no interval: None, not
    # NaN, which JSON cannot carry. Nor has F1 in a set of NORMAL images only: it is 0 in every resample with a false
    # alarm, an interval of [0, 0] that reads as certainty about a score the set cannot measure. (Of PNEUMONIA images
    # only it is defined, and kept.)
    out = {k: [float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi))] if not np.isnan(v).all() else None
           for k, v in values.items()}
    if not both and not labels.any():
        out["f1"] = None
    return out


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
        w = np.bincount(idx, minlength=self.n)[self.order].astype(np.float64)
        pos_w, neg_w = np.where(self.positive, w, 0.0), np.where(self.positive, 0.0, w)
        tp, fn = pos_w[self.called].sum(), pos_w[~self.called].sum()
        fp, tn = neg_w[self.called].sum(), neg_w[~self.called].sum()
        n_pos, n_neg = tp + fn, fp + tn

        def ratio(a: float, b: float) -> float | None:
            return float(a / b) if b else None

        out = {"accuracy": ratio(tp + tn, self.n), "sensitivity": ratio(tp, n_pos), "specificity": ratio(tn, n_neg),
               "precision": ratio(tp, tp + fp), "f1": ratio(2 * tp, 2 * tp + fp + fn), "auroc": None, "auprc": None}
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


CI_METHOD = ("Wilson score for accuracy, sensitivity, specificity and precision; percentile bootstrap of the images "
             "for f1, auroc and auprc")


def confidence_intervals(labels: np.ndarray, probs: np.ndarray, threshold: float, *, n_boot: int = 1000,
                         seed: int = 0, level: float = 0.95) -> dict[str, list[float] | None]:
    """95 % intervals of the main metrics (:data:`CI_METHOD`).

    The four rates are binomial proportions at a fixed threshold, so they get Wilson score intervals: the percentile
    bootstrap of a rate of 0 or 1 (193 of 193 NORMAL images right, say) is [1, 1], as if it were certain, where
    Wilson gives [0.98, 1]. F1, AUROC and AUPRC are no proportions and keep :func:`bootstrap_ci`.
    """
    from scipy.stats import binomtest

    ci = bootstrap_ci(labels, probs, threshold, n_boot=n_boot, seed=seed, level=level)
    labels = np.asarray(labels, dtype=np.int64)
    pred = (np.asarray(probs, dtype=np.float64) >= threshold).astype(np.int64)
    tp, tn = int(np.sum((pred == 1) & (labels == 1))), int(np.sum((pred == 0) & (labels == 0)))
    counts = {"accuracy": (tp + tn, len(labels)), "sensitivity": (tp, int(np.sum(labels == 1))),
              "specificity": (tn, int(np.sum(labels == 0))), "precision": (tp, int(np.sum(pred == 1)))}
    for k, (hits, n) in counts.items():
        if n:
            interval = binomtest(hits, n).proportion_ci(confidence_level=level, method="wilson")
            ci[k] = [float(interval.low), float(interval.high)]
        else:
            ci[k] = None
    return ci


def write_predictions(path: str | os.PathLike, result: SplitResult, threshold: float) -> None:
    """``predictions_<split>.csv``: path, true label, P(PNEUMONIA), predicted label, and the disclaimer."""
    with atomic_path(path) as tmp, open(tmp, "w", **CSV_TEXT) as f:
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
    for r in results:
        metrics[r.name] = compute_metrics(r.labels, r.probs, threshold)
        if n_boot:
            metrics[r.name]["ci95"] = confidence_intervals(r.labels, r.probs, threshold, n_boot=n_boot)
            metrics[r.name]["ci95_method"] = CI_METHOD
        if extra and r.name in extra:
            metrics[r.name].update(extra[r.name])
        write_predictions(out / f"predictions_{r.name}.csv", r, threshold)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
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
    cannot be told for the split.
    """

    count: Callable[[str, list], int | None]
    what: Callable[[str], str]
    named: Callable[[str, list], int | None] = lambda split, samples: None
    sharing: Callable[[str, list], int | None] = lambda split, samples: None

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

    from cxr.data import patient_from_name_only, read_split_csv
    from cxr.export import file_sha256
    from cxr.model import BUNDLED_MODEL

    checks = []  # (does it apply to a split of this name, is a sample one, what such samples are)
    bundled = BUNDLED_MODEL.is_file() and file_sha256(BUNDLED_MODEL)[:12] == mid
    bases, from_bundled = _fine_tuned_from(ckpt)
    if (bundled or from_bundled) and BUNDLED_TRAINING_NAMES.is_file():
        with gzip.open(BUNDLED_TRAINING_NAMES, "rt", encoding="utf-8") as f:
            names = {_name_key(n) for n in f.read().split()}
        # By name without its extension, in any case: the same X-ray as DICOM or PNG was missed.
        checks.append((lambda split: True, lambda s: _name_key(Path(s.path).name) in names,
                       "named as images of the official Kermany train and val splits, which the bundled model was "
                       "trained on" + ("" if bundled else " (this model was fine-tuned from it)")))
    record = Path(ckpt.path).parent / "split.csv" if ckpt.path and not bundled else None
    own_paths: set[str] = set()  # the run's own train and val images, where it recorded them
    digests: set[str] = set()
    name_counts: dict[str, int] = {}
    patients: set[str] = set()
    for path, own in ([(record, True)] if record is not None else []) + [(b, False) for b in bases]:
        if not path.is_file():
            continue
        try:
            development = [s for name in ("train", "val") for s in read_split_csv(path).get(name, [])]
        except (OSError, ValueError, KeyError, csv.Error) as e:
            log.warning("%s: not readable (%s), so images this model was trained on cannot be told", path, e)
            continue
        seen = {s.digest for s in development if s.digest}
        if own:
            own_paths = {s.path for s in development}
        digests |= seen
        for s in development:
            key = _name_key(Path(s.path).name)
            name_counts[key] = name_counts.get(key, 0) + 1
        patients |= {s.patient for s in development if not patient_from_name_only(s)}
        # A base run's images count in every split (a fine-tuned run's carved val held the base run's images, and
        # scored 1.000 without a word).
        checks.append((lambda split: True, lambda s, seen=seen: s.digest in seen,
                       f"in the train or val split of the run that trained the model ({path})" if own else
                       f"in the train or val split of a run it was fine-tuned from ({path})"))
    if not checks:
        return None

    def others(split: str, samples) -> list | None:
        """The samples to judge: not the run's own train and val images in its train or val split, where they are
        expected; None when that leaves none (the run's own train split, say)."""
        if split in ("train", "val") and own_paths:
            samples = [s for s in samples if s.path not in own_paths]
            if not samples:
                return None
        return list(samples)

    def count(split: str, samples) -> int | None:
        judged = others(split, samples)
        mine = [is_one for applies, is_one, _ in checks if applies(split)]
        return sum(any(f(s) for f in mine) for s in judged) if mine and judged is not None else None

    def what(split: str) -> str:  # only the checks that apply to the split
        return ", or ".join(w for applies, _, w in checks if applies(split))

    unique = {key for key, n in name_counts.items() if n == 1}

    def named(split: str, samples) -> int | None:
        judged = others(split, samples)
        if judged is None or not unique:
            return None
        return sum(not (s.digest and s.digest in digests) and _name_key(Path(s.path).name) in unique for s in judged)

    def sharing(split: str, samples) -> int | None:
        judged = others(split, samples)
        if judged is None or not patients:
            return None
        return sum(not patient_from_name_only(s) and s.patient in patients for s in judged)

    return Development(count, what, named, sharing)


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


def _fine_tuned_from(ckpt) -> tuple[list[Path], bool]:
    """The split.csv files of the runs whose weights this model started from (``--weights RUN`` or its checkpoint,
    followed back through their own config.yaml), and whether that chain starts at the bundled model."""
    from cxr.config import load_config

    records: list[Path] = []
    weights, visited = ckpt.config.weights, set()
    while weights not in ("", "none", "imagenet"):
        if weights == "default":
            return records, True
        path = Path(weights)
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
                   batch_size: int = 64, amp: str = "off") -> dict:
    """Evaluate a checkpoint (or run directory) on every split found at ``data``; write the artifacts to ``output``.

    The decision threshold is the checkpoint's (chosen on validation at training time) unless ``threshold``
    is given. ``amp`` "off" (the default) predicts in fp32, TF32 off on CUDA, so that bf16 does not move the
    metrics on machines that have it; "auto" uses bf16 where it is fast, as training does. On an H200 bf16 moved
    P(PNEUMONIA) of the bundled model by up to 0.014 and turned one of 748 validation labels (MODEL_CARD.md).
    """
    import dataclasses

    from cxr.config import default_cache_dir
    from cxr.data import check_output_outside_data, prepare, scan
    from cxr.export import model_id
    from cxr.fileio import check_writable
    from cxr.model import exact_fp32, load_checkpoint, resolve_device, use_bf16, use_channels_last
    from cxr.predict import check_inference_args

    check_inference_args(threshold=threshold, amp=amp, batch_size=batch_size)
    check_output_outside_data(output, data)  # its pictures among the images would be X-rays the next time
    check_writable(output, folder=True)  # now, not after the predictions
    check_writable(Path(output) / "metrics.json")  # a folder of that name failed only after predicting everything
    if any((Path(output) / name).is_file() for name in ("best.pt", "last.pt", "history.csv")):
        # Its metrics.json (the training's, on train, val and test) would be replaced, and its report would mix both.
        raise UsageError(f"--output {output}: a training run's folder, whose metrics.json and predictions this would "
                         f"replace; give another folder (say {Path(output) / ('eval-' + Path(data).name)})")
    ckpt = load_checkpoint(model)
    # Recorded, so that `cxr report OUT` can draw the heatmaps with the same model later.
    # A Checkpoint given in memory has no file to name (its empty path had been recorded as the current folder).
    model_ref = ("default" if isinstance(model, str) and model == "default"
                 else str(Path(ckpt.path).resolve()) if ckpt.path else IN_MEMORY)
    mid = model_id(ckpt)  # the name `cxr predict` gives the same file
    cfg = ckpt.config
    # The cache is this machine's, not the one recorded by whoever trained the model.
    cfg = dataclasses.replace(cfg, cache_dir=cache_dir or default_cache_dir(), device=device, amp=amp)
    dev = resolve_device(device)
    bf16 = use_bf16(cfg, dev)
    net = ckpt.build(dev)
    if use_channels_last(cfg, dev):
        net = net.to(memory_format=torch.channels_last)
    splits = scan(data, require_both_classes=False)
    for name in splits:  # a split's name is its folder's, and names the output files: checked before the work
        longest = f"flythrough_{name}.mp4"
        if len(os.fsencode(longest)) > MAX_NAME_BYTES:
            raise UsageError(f"{data}: the folder name {name[:40]}... is too long for the file names of its results "
                             f"({longest[:20]}...: {len(os.fsencode(longest))} bytes, at most {MAX_NAME_BYTES}); "
                             "give --data a link to it with a shorter name")
    t = ckpt.threshold if threshold is None else float(threshold)
    developed_on = development_images(ckpt, mid)
    results, failures = [], {}
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
        with exact_fp32(dev, enabled=not bf16):
            logits = predict_logits(net, prepared.images, mean=cfg.mean, std=cfg.std, device=dev,
                                    batch_size=batch_size, bf16=bf16, channels_last=use_channels_last(cfg, dev))
        results.append(SplitResult(split.name, [s.path for s in prepared.samples], prepared.labels,
                                   probabilities(logits)))
        failures[split.name] = {"n_unreadable": len(prepared.failures),
                                "threshold_source": "model" if threshold is None else "given",
                                "model": model_ref, "model_id": mid, "data": str(Path(data).resolve()),
                                "inference_dtype": "bfloat16" if bf16 else "float32"}
        if developed_on is not None:
            failures[split.name].update(count_development(developed_on, split.name, prepared.samples))
    if not results:
        name, n, reason = unusable
        raise DataError(f"{data}: none of the {n} images of split {name!r} could be read (first: {reason})")
    return write_evaluation(output, results, t, extra=failures)


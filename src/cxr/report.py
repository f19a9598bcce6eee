"""Pictures and one self-contained ``report.html`` from a run's saved artifacts (never by retraining).

Reads what training and evaluation wrote (``config.yaml``, ``summary.json``, ``history.csv``, ``metrics.json``,
``predictions_<split>.csv``; see :mod:`cxr.train` and :mod:`cxr.evaluate`) and writes, beside them::

    report.html                  everything below embedded (base64), so the file opens offline on its own
    report/history.png           loss, accuracy and learning rate per epoch, best epoch marked
    report/confusion_<split>.png counts and row-normalised
    report/roc_pr.png            ROC and precision-recall curves with the threshold's operating point
    report/calibration.png       reliability diagram with the expected calibration error, 95 % intervals per bin
    report/grid_<split>.png      most confident right, most confident wrong and borderline images, with heatmaps
    report/flythrough_<split>.mp4  each image in turn (see :mod:`cxr.video`)

A section whose artifact is missing (an evaluation folder has no history; a run still training has no metrics)
is left out. Heatmaps need the model (a run's ``best.pt``, or ``model=``); without one the images are shown plain.

Research software, not a medical device.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime
import html
import json
import logging
import math
import numbers
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr import __version__
from cxr.config import CLASS_NAMES, DEFAULT_MAX_PIXELS, MAX_PER_GROUP, MAX_VIDEO_IMAGES, Config
from cxr.errors import UsageError
from cxr.fileio import (
    CSV_READ,
    atomic_path,
    atomic_write_text,
    check_paths,
    check_writable,
    display_name,
    ensure_dir,
    image_name,
    npz_row,
    shorten_middle,
    valid_utf8,
)
from cxr.predict import leans_away, percent_text, prob_text, score_text, threshold_decimals

log = logging.getLogger(__name__)

IN_MEMORY = "(a Checkpoint in memory)"  # metrics.json's "model" of an evaluation given no model file (cxr.evaluate)
DISCLAIMER = ("Research software, not a medical device. These results describe a model on a data set; "
              "they are not a diagnosis and must not be used for clinical decisions.")
SPLIT_ORDER = ("train", "val", "test")

# Okabe-Ito: distinguishable with the common colour-vision deficiencies. Lines also differ in style and marker.
OKABE_ITO = {"orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73", "yellow": "#F0E442", "blue": "#0072B2",
             "vermillion": "#D55E00", "purple": "#CC79A7", "black": "#000000", "grey": "#666666"}
SPLIT_STYLE = {"train": (OKABE_ITO["orange"], "--", "o"), "val": (OKABE_ITO["blue"], "-", "s"),
               "test": (OKABE_ITO["green"], "-.", "^")}
RIGHT_COLOUR, WRONG_COLOUR = OKABE_ITO["blue"], OKABE_ITO["vermillion"]
# Text in the wrong colour: vermillion darkened to 5.9:1 on white (the frame's #D55E00 is 3.9:1, below WCAG's 4.5:1
# for the grid's "✗ wrong" captions, the most important labels in it).
WRONG_TEXT = "#A84800"
MATRIX_CMAP = "cividis"
_RC = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8.5, "axes.grid": True,
       "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False, "savefig.facecolor": "white",
       # Titles and legends hold split and folder names: a "$" in one is text, not TeX (it broke or altered them).
       "text.parse_math": False}


# ------------------------------------------------------------------------------------------------ artifacts


@dataclass
class SplitPredictions:
    """One ``predictions_<split>.csv``: paths, true labels (1 = PNEUMONIA) and P(PNEUMONIA)."""

    name: str
    paths: list[str]
    labels: np.ndarray
    probs: np.ndarray


@dataclass
class RunArtifacts:
    """What a run directory or an evaluation folder holds; each part is None (or empty) when absent."""

    root: Path
    config: dict | None = None
    summary: dict | None = None
    history: list[dict[str, float]] | None = None
    metrics: dict[str, dict] = field(default_factory=dict)
    predictions: dict[str, SplitPredictions] = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        """Evaluated splits, train, val, test first."""
        names = set(self.metrics) | set(self.predictions)
        return sorted(names, key=lambda n: (SPLIT_ORDER.index(n) if n in SPLIT_ORDER else len(SPLIT_ORDER), n))

    @property
    def threshold(self) -> float | None:
        """The decision threshold the predictions were made at (from ``metrics.json``)."""
        for m in self.metrics.values():
            if m.get("threshold") is not None:
                return float(m["threshold"])
        return None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_history(path: str | os.PathLike) -> list[dict[str, float]]:
    """``history.csv`` as one dict of floats per epoch (empty cells become NaN)."""
    rows = []
    with open(path, **CSV_READ) as f:
        for row in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()})
    return rows


def read_predictions(path: str | os.PathLike, name: str) -> SplitPredictions:
    """One ``predictions_<split>.csv`` (columns path, label, prob_pneumonia, predicted, and note, which is not read)."""
    paths, labels, probs = [], [], []
    with open(path, **CSV_READ) as f:
        reader = csv.DictReader(f)
        missing = {"path", "label", "prob_pneumonia"} - set(reader.fieldnames or [])
        if missing:
            raise UsageError(f"{path}: not a predictions file (no column {', '.join(sorted(missing))})")
        for row in reader:
            label = row["label"].strip().upper()
            if label not in CLASS_NAMES:
                raise UsageError(f"{path}: unknown label {row['label']!r} for {row['path']}")
            try:
                prob = float(row["prob_pneumonia"])
            except (TypeError, ValueError):
                prob = math.nan
            if not 0 <= prob <= 1:  # an edited file: said here, not as a calibration error dropping the image
                raise UsageError(f"{path}: prob_pneumonia {row['prob_pneumonia']!r} for {row['path']} is not a "
                                 "probability (a number from 0 to 1)")
            paths.append(row["path"])
            labels.append(CLASS_NAMES.index(label))
            probs.append(prob)
    return SplitPredictions(name, paths, np.array(labels, np.int64), np.array(probs, np.float64))


def load_artifacts(run_dir: str | os.PathLike) -> RunArtifacts:
    """Read every artifact present in a run directory or an evaluation output folder.

    Raises:
        UsageError: the folder does not exist or holds none of the artifacts.
    """
    import yaml

    root = Path(run_dir)
    if not root.is_dir():
        raise UsageError(f"{root}: no such run directory")
    art = RunArtifacts(root)
    if (root / "config.yaml").is_file():
        try:
            config = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise UsageError(f"{root / 'config.yaml'}: not valid YAML{at}") from None
        if config is not None and not isinstance(config, dict):
            raise UsageError(f"{root / 'config.yaml'}: not a config (a YAML mapping of fields)")
        art.config = config or {}
    art.summary = _read_json(root / "summary.json")
    swa = (art.summary or {}).get("swa")
    if swa is not None and not (isinstance(swa, dict) and all(
            isinstance(swa.get(k), numbers.Real) and not isinstance(swa.get(k), bool)
            for k in ("first_epoch", "last_epoch", "lr", "val_loss", "best_epoch_val_loss"))
            and isinstance(swa.get("kept"), bool)):
        # Edited or from elsewhere: a text for an epoch had failed the curves' plot with a TypeError
        log.warning("report: %s: its weight-averaging entry is not what cxr train writes: left out",
                    root / "summary.json")
        art.summary = {k: v for k, v in art.summary.items() if k != "swa"}
    if (root / "history.csv").is_file():
        art.history = read_history(root / "history.csv") or None
    art.metrics = _read_json(root / "metrics.json") or {}
    for f in sorted(root.glob("predictions_*.csv")):
        name = f.stem.removeprefix("predictions_")
        if art.metrics and name not in art.metrics:
            # Left by an earlier evaluation into the same folder: not part of the metrics this report shows.
            log.warning("report: ignoring %s: metrics.json has no %r split (an earlier evaluation's file?)", f, name)
            continue
        art.predictions[name] = read_predictions(f, name)
    if art.predictions and not art.metrics and not (root / "metrics.json").exists():
        # cxr evaluate writes metrics.json last, after removing an earlier one: its absence beside predictions files
        # is an evaluation that did not finish, whose files may be of two models
        log.warning("report: %s has predictions files but no metrics.json (an evaluation that did not finish?): they "
                    "may not be of one model; run cxr evaluate again", root)
    if not (art.history or art.metrics or art.predictions):
        raise UsageError(f"{root}: neither a run directory nor an evaluation folder (no history.csv, metrics.json "
                         "or predictions_<split>.csv)")
    return art


# ---------------------------------------------------------------------------------------------- numbers


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """ECE of P(PNEUMONIA): the count-weighted mean gap between mean probability and observed frequency over
    ``n_bins`` equal-width bins (the last bin includes 1.0), the bins of :func:`reliability_bins`."""
    conf, freq, count = reliability_bins(labels, probs, n_bins)
    if not count.sum():
        return math.nan
    return float(np.sum(count / count.sum() * np.abs(freq - conf)))


def bin_index(probs: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Each probability's bin of ``n_bins`` equal-width bins, ``floor(p * n_bins)`` (1.0 in the last): the bins of the
    calibration error, its diagram and the histogram under it alike (np.histogram's float edges had put 0.3, 0.6 and
    0.7 one bin lower than the error did)."""
    return np.minimum((np.asarray(probs, np.float64) * n_bins).astype(np.int64), n_bins - 1)


def reliability_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> tuple[np.ndarray, ...]:
    """Per non-empty bin of ``n_bins`` equal-width bins (the last includes 1.0): mean probability, observed frequency
    of PNEUMONIA, count."""
    labels, probs = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    if not np.all((probs >= 0) & (probs <= 1)):  # NaN included: it fell in no bin, and 1.5 in the last
        raise ValueError("probabilities must lie in [0, 1] for a calibration error")
    bins = bin_index(probs, n_bins)
    conf, freq, count = [], [], []
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            conf.append(probs[sel].mean())
            freq.append(labels[sel].mean())
            count.append(int(sel.sum()))
    return np.array(conf), np.array(freq), np.array(count, np.int64)


def bin_intervals(freq: np.ndarray, count: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score intervals (scipy) for each bin's observed frequency of PNEUMONIA, as :func:`reliability_bins`
    gives them: a bin of 2 images says little, one of 500 a lot, and the diagram should show which is which."""
    from scipy.stats import binomtest

    lo, hi = [], []
    for f, n in zip(np.asarray(freq, np.float64), np.asarray(count), strict=True):
        ci = binomtest(round(f * n), int(n)).proportion_ci(confidence_level=level, method="wilson")
        lo.append(ci.low)
        hi.append(ci.high)
    return np.array(lo, np.float64), np.array(hi, np.float64)


def margin(probs: np.ndarray, threshold: float) -> np.ndarray:
    """How far each probability is from the threshold, as a share of the room on its side (0 on it, 1 at 0 or 1)."""
    probs = np.asarray(probs, np.float64)
    above = (probs - threshold) / max(1.0 - threshold, 1e-12)
    below = (threshold - probs) / max(threshold, 1e-12)
    return np.where(probs >= threshold, above, below)


# An image is borderline only when nearer the threshold than the end of its side (P 0.25-0.75 at threshold 0.5).
BORDERLINE_MARGIN = 0.5


def _check_count(name: str, value: int, most: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= most:
        raise UsageError(f"{name} must be a whole number from 1 to {most}, got {value!r}")


def select_examples(labels: np.ndarray, probs: np.ndarray, threshold: float,
                    per_group: int = 4) -> dict[str, list[int]]:
    """Indices of informative examples: most confident right, most confident wrong, borderline.

    "Confident" is :func:`margin`. Wrong are chosen first, so that a row of errors is never empty while there are
    errors, even when all of them lie near the threshold. Borderline come next: the images nearest the threshold,
    but only those nearer to it than to 0 or 1 (margin below ``BORDERLINE_MARGIN``), so a small set with no image
    near the threshold leaves the group empty rather than filling it with sure ones. Right take the most confident of
    the rest, so an image sitting on the threshold is not shown as a sure one. Right and wrong take half from each
    true class where they can, so one class cannot fill the row. No image is in two groups.
    """
    _check_count("per_group", per_group, MAX_PER_GROUP)
    labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
    m = margin(probs, threshold)
    right = (probs >= threshold).astype(np.int64) == labels
    free = np.ones(len(m), bool)

    def confident(mask: np.ndarray) -> list[int]:
        mask = mask & free
        by_class = [[int(i) for i in np.flatnonzero(mask & (labels == c))[np.argsort(-m[mask & (labels == c)],
                                                                                      kind="stable")]]
                    for c in (0, 1)]
        chosen = by_class[0][: per_group // 2] + by_class[1][: per_group - per_group // 2]
        rest = sorted(set(by_class[0] + by_class[1]) - set(chosen), key=lambda i: -m[i])
        chosen += rest[: per_group - len(chosen)]
        return sorted(chosen, key=lambda i: -m[i])

    wrong = confident(~right)
    free[wrong] = False
    near = [int(i) for i in np.argsort(m, kind="stable") if free[i] and m[i] < BORDERLINE_MARGIN][:per_group]
    free[near] = False
    return {"most confident right": confident(right), "most confident wrong": wrong, "borderline": near}


# ------------------------------------------------------------------------------------------------ figures


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def _save(fig, path: Path, dpi: int = 110) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def _split_style(name: str) -> tuple[str, str, str]:
    return SPLIT_STYLE.get(name, (OKABE_ITO["purple"], ":", "D"))


def plot_history(history: list[dict[str, float]], best_epoch: int | None = None, averaged: dict | None = None,
                 resumed_after: Sequence[int] = ()):
    """Loss, accuracy (with validation AUROC) and learning rate per epoch; the best epoch marked on each, and the
    weight-averaging epochs shaded (``averaged``: the ``swa`` entry of summary.json), with the average's validation
    loss. ``resumed_after``: the epochs after which a session resumed the run (a lengthened schedule's learning rate
    jumps there, which read as a fault without the mark)."""
    import matplotlib as mpl
    from matplotlib.ticker import MaxNLocator

    epochs = [int(h["epoch"]) for h in history]
    with mpl.rc_context(_RC):
        fig = _figure(figsize=(12.5, 3.9))
        ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
        train_c, train_ls, train_m = _split_style("train")
        val_c, val_ls, val_m = _split_style("val")
        ax_loss.plot(epochs, [h["train_loss"] for h in history], train_ls, color=train_c, marker=train_m, label="train")
        ax_loss.plot(epochs, [h["val_loss"] for h in history], val_ls, color=val_c, marker=val_m, label="validation")
        ax_loss.set(title="Loss per epoch", xlabel="epoch", ylabel="cross-entropy loss")
        ax_acc.plot(epochs, [h["train_acc"] for h in history], train_ls, color=train_c, marker=train_m,
                    label="train accuracy")
        ax_acc.plot(epochs, [h["val_acc"] for h in history], val_ls, color=val_c, marker=val_m,
                    label="validation accuracy")
        if any(not math.isnan(h.get("val_auroc", math.nan)) for h in history):
            ax_acc.plot(epochs, [h["val_auroc"] for h in history], ":", color=OKABE_ITO["green"], marker="^",
                        label="validation AUROC")
        ax_acc.set(title="Accuracy per epoch", xlabel="epoch", ylabel="accuracy (at 0.5) / AUROC")
        ax_lr.plot(epochs, [h["lr"] for h in history], "-", color=OKABE_ITO["black"], marker=".",
                   label="learning rate")
        ax_lr.set(title="Learning rate (at epoch end)", xlabel="epoch", ylabel="learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if averaged:
            ax_loss.plot([averaged["last_epoch"]], [averaged["val_loss"]], "*", color=OKABE_ITO["purple"],
                         markersize=12, label="weight average, validation")
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if averaged:
                ax.axvspan(averaged["first_epoch"] - 0.5, averaged["last_epoch"] + 0.5, color=OKABE_ITO["purple"],
                           alpha=0.08, label="weights averaged")
            if best_epoch is not None:
                ax.axvline(best_epoch, color=OKABE_ITO["purple"], linestyle=":", linewidth=2,
                           label=f"best epoch ({best_epoch})")
            for k, after in enumerate(resumed_after):
                ax.axvline(after + 0.5, color=OKABE_ITO["grey"], linestyle="--", linewidth=1.2,
                           label="resumed (--resume)" if k == 0 else None)
            if len(epochs) == 1:
                ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
            else:
                ax.margins(x=0.06)  # keeps the best-epoch line off the frame when it is the last epoch
            ax.legend(loc="best")
    return fig


def _other_splits_note(predictions: dict[str, SplitPredictions], shown: str, threshold: float) -> str:
    """HTML: the splits with predictions that a picture of ``shown`` leaves out, how many of each are wrong, and how
    to see them."""
    parts = [f"{html.escape(display_name(name))} ({int(np.sum((p.probs >= threshold) != p.labels))} wrong of "
             f"{len(p.labels)})" for name, p in predictions.items() if name != shown]
    return (f" Not pictured here: {', '.join(parts)}; <code>cxr report DIR --split NAME</code> shows another split's "
            "images." if parts else "")


def _split_label(name: str, limit: int = 28) -> str:
    """A split's name as the pictures show it: drawable, and a long one shortened in the middle (a folder named
    ``hospital_A_external_validation_cohort_2024_full_resolution`` had run two panels' titles into each other and
    the legends over the curves)."""
    from cxr.video import drawable

    return shorten_middle(drawable(display_name(name)), limit)


def _split_labels(names: Sequence[str], limit: int = 28) -> dict[str, str]:
    """:func:`_split_label` of each split a picture shows together, told apart: where two would read alike when
    shortened (``cohort_2024_hospital_A_external_test_set`` and ``..._B_...``), longer, up to whole."""
    from cxr.video import drawable

    # as drawn: a character the font lacks is drawn as its escape (\u91ab), six characters for one
    longest = max((len(drawable(display_name(n))) for n in names), default=0)
    for n in range(limit, max(limit, longest) + 1):  # at the longest, every name whole
        labels = {name: _split_label(name, n) for name in names}
        if len(set(labels.values())) == len(labels):
            break
    return labels


def plot_confusion(matrix: Sequence[Sequence[int]], split: str, class_names: Sequence[str] = CLASS_NAMES):
    """Two panels for one split: counts, and row-normalised (each true class sums to 1)."""
    import matplotlib as mpl

    cm = np.asarray(matrix, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    # A true class with no image has no rate (not 0 %: the caption calls the diagonal specificity and sensitivity).
    norm = np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)
    cmap = mpl.colormaps[MATRIX_CMAP].with_extremes(bad="#eeeeee")
    with mpl.rc_context({**_RC, "axes.grid": False}):
        fig = _figure(figsize=(10.0, 3.9))
        fig.get_layout_engine().set(wspace=0.12)
        axes = fig.subplots(1, 2)
        shown = _split_label(split)  # a folder's name in Chinese script had been empty boxes
        panels = ((cm, f"{shown}: counts (n = {int(cm.sum())})", lambda i, j: f"{int(cm[i, j])}"),
                  (norm, f"{shown}: row-normalised", lambda i, j: "–\n(no images)" if np.isnan(norm[i, j])
                   else f"{percent_text(norm[i, j])}\n({int(cm[i, j])})"))
        for ax, (values, title, text) in zip(axes, panels, strict=True):
            vmax = 1 if values is norm else max(values.max(), 1)
            im = ax.imshow(values, cmap=cmap, vmin=0, vmax=1 if values is norm else vmax)
            for i in range(2):
                for j in range(2):
                    r, g, b, _ = cmap(values[i, j] / (1 if values is norm else vmax))
                    light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
                    ax.text(j, i, text(i, j), ha="center", va="center", fontsize=12,
                            color="black" if light else "white")
            ax.set_xticks([0, 1], [f"{c}" for c in class_names])
            ax.set_yticks([0, 1], [f"{c}" for c in class_names])
            ax.set(title=title, xlabel="predicted class", ylabel="true class")
            fig.colorbar(im, ax=ax, shrink=0.85, label="share of true class" if values is norm else "images")
    return fig


def _operating_point(labels: np.ndarray, probs: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(false-positive rate, recall, precision) at ``threshold``."""
    pred = probs >= threshold
    pos, neg = labels == 1, labels == 0
    tpr = float(pred[pos].mean()) if pos.any() else math.nan
    fpr = float(pred[neg].mean()) if neg.any() else math.nan
    precision = float(labels[pred].mean()) if pred.any() else math.nan
    return fpr, tpr, precision


def plot_roc_pr(predictions: Sequence[SplitPredictions], threshold: float):
    """ROC and precision-recall curves per split, AUROC and AUPRC in the legend, the threshold's operating point."""
    import matplotlib as mpl
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.lines import Line2D
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    with mpl.rc_context(_RC):
        fig = _figure(figsize=(11.5, 5.0))
        ax_roc, ax_pr = fig.subplots(1, 2)
        ax_roc.plot([0, 1], [0, 1], color=OKABE_ITO["grey"], linestyle=":", linewidth=1, label="chance")
        points, chance = [], []  # legend keys, one per split, drawn as on the axes
        label = _split_labels([p.name for p in predictions])
        for p in predictions:
            if len(np.unique(p.labels)) < 2:
                continue
            colour, ls, marker = _split_style(p.name)
            fpr, tpr, _ = roc_curve(p.labels, p.probs)
            precision, recall, _ = precision_recall_curve(p.labels, p.probs)
            auroc, auprc = roc_auc_score(p.labels, p.probs), average_precision_score(p.labels, p.probs)
            ax_roc.plot(fpr, tpr, ls, color=colour, linewidth=2,
                        label=f"{label[p.name]}: AUROC {score_text(auroc)} (n={len(p.labels)})")
            ax_pr.plot(recall, precision, ls, color=colour, linewidth=2, drawstyle="steps-post",
                       label=f"{label[p.name]}: AUPRC {score_text(auprc)} (n={len(p.labels)})")
            ax_pr.axhline(p.labels.mean(), color=colour, linestyle=":", linewidth=1)
            op_fpr, op_tpr, op_prec = _operating_point(p.labels, p.probs, threshold)
            ax_roc.plot(op_fpr, op_tpr, marker, color=colour, markersize=10, markeredgecolor="black")
            ax_pr.plot(op_tpr, op_prec, marker, color=colour, markersize=10, markeredgecolor="black")
            # Smaller than on the axes so that three splits' markers fit one legend key side by side.
            points.append(Line2D([], [], linestyle="none", marker=marker, color=colour, markersize=7,
                                 markeredgecolor="black"))
            chance.append(Line2D([], [], linestyle=":", color=colour, linewidth=1))
        one_class = [label[p.name] for p in predictions if len(np.unique(p.labels)) < 2]
        for ax in (ax_roc, ax_pr):
            if one_class and not points:  # nothing drawn: say why rather than show empty axes
                ax.text(0.5, 0.5, f"undefined: {', '.join(one_class)} holds one class only", ha="center",
                        va="center", fontsize=10, parse_math=False)
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.02, 1.02)
            ax.set_aspect("equal")
        ax_roc.set(title="ROC curve", xlabel="false-positive rate (1 - specificity)",
                   ylabel="true-positive rate (sensitivity)")
        ax_pr.set(title="Precision-recall curve (PNEUMONIA positive)", xlabel="recall (sensitivity)",
                  ylabel="precision")
        shown = f"{threshold:.{threshold_decimals(threshold, [q for p in predictions for q in p.probs])}f}"
        keys = {ax_roc: [(points, f"operating point at threshold {shown}")],
                ax_pr: [(points, f"operating point at threshold {shown}"),
                        (chance, "chance (share of PNEUMONIA)")]}
        for ax, loc in ((ax_roc, "lower right"), (ax_pr, "lower left")):
            handles, labels = ax.get_legend_handles_labels()
            for artists, label in keys[ax]:
                if artists:
                    handles.append(tuple(artists))
                    labels.append(label)
            if handles:  # none in the precision-recall panel of one-class splits: no empty box
                ax.legend(handles, labels, loc=loc, handler_map={tuple: HandlerTuple(ndivide=None)})
    return fig


def plot_calibration(predictions: Sequence[SplitPredictions], n_bins: int = 10):
    """Reliability diagram of P(PNEUMONIA) per split with its ECE, and the histogram of probabilities below it."""
    import matplotlib as mpl

    with mpl.rc_context(_RC):
        fig = _figure(figsize=(6.8, 7.4))
        ax, ax_hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
        ax.plot([0, 1], [0, 1], color=OKABE_ITO["grey"], linestyle=":", label="perfectly calibrated")
        edges = np.linspace(0, 1, n_bins + 1)
        drawn = [p for p in predictions if len(p.labels)]
        label = _split_labels([p.name for p in drawn])
        for i, p in enumerate(drawn):
            colour, ls, marker = _split_style(p.name)
            conf, freq, count = reliability_bins(p.labels, p.probs, n_bins)
            lo, hi = bin_intervals(freq, count)
            ece = expected_calibration_error(p.labels, p.probs, n_bins)
            # The line joins neighbouring bins only: drawn across an empty bin, it showed data where there was none.
            filled = np.unique(bin_index(p.probs, n_bins))
            gap = np.flatnonzero(np.diff(filled) > 1) + 1
            ax.plot(np.insert(conf, gap, np.nan), np.insert(freq, gap, np.nan), linestyle=ls, color=colour,
                    marker=marker, linewidth=2, label=f"{label[p.name]}: ECE {score_text(ece)} (n={len(p.labels)})")
            # Splits often share a bin at nearly the same confidence: their bars stand side by side (the points stay
            # where they are), each drawn in its split's line style.
            dodge = (i - (len(drawn) - 1) / 2) * 0.01
            bars = ax.errorbar(conf + dodge, freq, yerr=np.clip([freq - lo, hi - freq], 0, None), fmt="none",
                               ecolor=colour, capsize=3, elinewidth=1)
            bars.lines[2][0].set_linestyle(ls)
            ax_hist.hist((bin_index(p.probs, n_bins) + 0.5) / n_bins, bins=edges, histtype="step", color=colour,
                         linestyle=ls, linewidth=2,
                         weights=np.full(len(p.probs), 1 / len(p.probs)), label=label[p.name])
        ax.set(title=f"Reliability diagram ({n_bins} equal-width bins, 95 % Wilson intervals)",
               ylabel="observed share of PNEUMONIA",
               xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))  # the fullest bins sit near 0 and 1, their bars dodged outward
        ax.legend(loc="best")  # upper left had hidden an under-confident model's points, which lie there
        ax_hist.set(xlabel="predicted P(pneumonia)", ylabel="share of images")
        ax_hist.legend(loc="best")  # upper center had hidden the bars of the middle bins
    return fig


@dataclass
class GridTile:
    """One image of the example grid."""

    image: np.ndarray  # (S, S) uint8
    heatmap: np.ndarray | None
    label: int
    prob: float
    path: str


def _grid_table(groups: dict[str, list[GridTile]], threshold: float, decimals: int) -> str:
    """The example grid's images as a table, folded: what the picture shows (which files, right or wrong) had been
    pixels only, out of a screen reader's reach."""
    rows = [[name, display_name(image_name(t.path)), CLASS_NAMES[t.label], CLASS_NAMES[int(t.prob >= threshold)],
             "right" if int(t.prob >= threshold) == t.label else "wrong", prob_text(t.prob, threshold, decimals)]
            for name, tiles in groups.items() for t in tiles]
    if not rows:
        return ""
    return ("<details><summary>These examples as a table</summary>"
            + _table(["group", "file", "true", "predicted", "result", "P(pneumonia)"], rows, numeric_from=5,
                     label="example images") + "</details>")


GRID_COLUMNS = 6  # tiles in a row of the report's grid, at most: wider, a page showed them too small to read


def plot_grid(groups: dict[str, list[GridTile]], threshold: float, split: str, columns: int = 4, decimals: int = 3):
    """Rows of example images (one row per group, e.g. most confident right), each captioned with truth,
    prediction and probability, framed blue when right and vermillion when wrong, heatmap overlaid. ``decimals``: those
    the threshold is shown with (:func:`cxr.predict.threshold_decimals`)."""
    import matplotlib as mpl
    from matplotlib import cm, colors

    from cxr.images import heat_legend_cmap, overlay
    from cxr.video import drawable

    rows = [(name, tiles) for name, tiles in groups.items()]
    # A file's name, or where several tiles share it (one folder per patient, img1.dcm in each), its folder's name
    # too: a confidently wrong image could not be traced to its patient.
    names = Counter(image_name(t.path) for _, tiles in rows for t in tiles)

    def caption(path: str) -> str:
        name = image_name(path)
        return name if names[name] < 2 or npz_row(path) else f"{Path(path).parent.name}/{name}"

    # A group with no images (say, no wrong prediction) gets one line of text, not a blank row of tiles.
    heights = [math.ceil(len(t) / columns) if t else 0.2 for _, t in rows]
    with_heat = any(t.heatmap is not None for _, tiles in rows for t in tiles)
    with mpl.rc_context({**_RC, "axes.grid": False}):
        fig = _figure(figsize=(2.55 * columns + 0.4, 3.05 * sum(heights) + (1.15 if with_heat else 0.2) + 0.3))
        # One sub-figure per group (its own heading), a thin one for the heatmap's colour scale, one for the notice.
        ratios = [3.05 * h for h in heights] + ([1.0] if with_heat else []) + [0.3]  # the scale's label: two lines
        subfigs = list(np.atleast_1d(fig.subfigures(len(ratios), 1, height_ratios=ratios)))
        for sub, (name, tiles) in zip(subfigs[:len(rows)], rows, strict=True):
            sub.suptitle(f"{name} ({_split_label(split, 60)})", fontsize=12, fontweight="bold", x=0.02, ha="left",
                         parse_math=False)
            if not tiles:
                empty = "no other image near the threshold" if name == "borderline" else "no images in this group"
                sub.text(0.02, 0.1, empty, fontsize=10, va="bottom")
                continue
            axes = np.atleast_1d(sub.subplots(math.ceil(len(tiles) / columns), columns)).reshape(-1)
            for ax in axes:
                ax.set_axis_off()
            for ax, tile in zip(axes, tiles, strict=False):
                pred = int(tile.prob >= threshold)
                ok = pred == tile.label
                colour = RIGHT_COLOUR if ok else WRONG_COLOUR
                ax.set_axis_on()
                ax.imshow(overlay(tile.image, tile.heatmap))
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_color(colour)
                    spine.set_linewidth(4)
                shown = prob_text(tile.prob, threshold, decimals)
                flat = tile.heatmap is not None and not tile.heatmap.any()  # nothing raised the class's score
                ax.set_title(f"{'✓ right' if ok else '✗ wrong'}   P(pneumonia) {shown}\n"
                             f"true {CLASS_NAMES[tile.label]} · pred {CLASS_NAMES[pred]}"
                             + ("\nheatmap flat: no region raised it" if flat else "")
                             # short: the tile's width (a longer line ran into the next tile)
                             + (f"\nmap of {CLASS_NAMES[pred]}; leans {CLASS_NAMES[1 - pred]}"
                                if tile.heatmap is not None and not flat and leans_away(tile.prob, pred) else ""),
                             fontsize=9.5, color=WRONG_TEXT if not ok else "black")
                ax.set_xlabel(shorten_middle(drawable(caption(tile.path)), 30), fontsize=7.5,
                              color=OKABE_ITO["grey"], parse_math=False)
        subfigs[-1].text(0.5, 0.5, DISCLAIMER, ha="center", va="center", fontsize=7.5, color=OKABE_ITO["grey"])
        if with_heat:
            cax = subfigs[-2].add_axes((0.3, 0.66, 0.4, 0.15))
            # as the overlay shows it over mid grey (the bare colour map's purples appear on no picture), and on what:
            # the model's square input, which a clinician had no word of (a chest 1.2-1.6x wider squashed to square)
            subfigs[-2].colorbar(cm.ScalarMappable(colors.Normalize(0, 1), heat_legend_cmap()), cax=cax,
                                 orientation="horizontal",
                                 label="heatmap: relative importance for the predicted class (Grad-CAM), as laid over "
                                       "mid grey\non the model's square input (the X-ray's aspect ratio not kept)")
    return fig




# -------------------------------------------------------------------------------------------- images


class _PixelSource:
    """Load model inputs for prediction paths: image files, or ``file.npz#split/index`` array entries."""

    def __init__(self, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = False):
        self.size, self.max_pixels, self.draft = size, max_pixels, draft
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self.failed: dict[str, None] = {}  # the paths that could not be read, once each, in order

    def load(self, path: str) -> np.ndarray | None:
        import zipfile

        from cxr.data import npz_pixels
        from cxr.errors import DataError
        from cxr.images import ImageError, load_image, resize_square

        try:
            row = npz_row(path)
            if row is not None:
                file, split, index = row
                key = (file, f"{split}_images")
                if key not in self._arrays:  # each access to an npz member decompresses all of it: once per array
                    with np.load(file, allow_pickle=False) as npz:
                        self._arrays[key] = npz_pixels(np.asarray(npz[key[1]]), f"{file}: {key[1]}")
                return resize_square(self._arrays[key][index], self.size)
            return load_image(path, self.size, max_pixels=self.max_pixels, draft=self.draft)
        except (ImageError, DataError, OSError, KeyError, ValueError, IndexError, EOFError, zipfile.BadZipFile) as e:
            if path not in self.failed:  # once each: the grid and the video both asked, and two read as four
                log.warning("report: skipping an image that can no longer be read: %s (%s)", path, e)
                self.failed[path] = None
            return None

    def close(self) -> None:
        self._arrays.clear()


@dataclass
class _Explainer:
    """The model and its preprocessing, for heatmaps (absent when no model is known)."""

    net: object | None
    size: int
    mean: float
    std: float
    batch_size: int = 16
    source: str | None = None  # the checkpoint read, for the heatmaps and the image size
    draft: bool = False  # the model's JPEG decoding (cfg.draft), so that its images are the inputs it was measured on
    max_pixels: int = DEFAULT_MAX_PIXELS
    other_model_id: str | None = None  # that checkpoint's model_id, when it is not the model the metrics measured
    given: bool = False  # the checkpoint came from --model (else from the run, or the file the evaluation named)

    def heatmaps(self, images: np.ndarray, classes: np.ndarray) -> list[np.ndarray | None]:
        if self.net is None or not len(images):
            return [None] * len(images)
        from cxr.explain import heatmaps_for_images

        maps, _ = heatmaps_for_images(self.net, images, mean=self.mean, std=self.std, target=classes,
                                      batch_size=self.batch_size, image_size=self.size)
        return list(maps)


def _explainer(art: RunArtifacts, model: str | os.PathLike | None, device: str, heatmaps: bool) -> _Explainer:
    from cxr.model import load_checkpoint, resolve_device, resolve_model_path

    config, default = art.config or {}, Config()  # a run's config.yaml, and what its absent fields mean
    size = int(config.get("image_size", default.image_size))
    mean, std = float(config.get("mean", default.mean)), float(config.get("std", default.std))
    draft = bool(config.get("draft", default.draft))
    max_pixels = int(config.get("max_pixels", default.max_pixels))
    source, named = model, False
    if source is None:
        try:
            source = resolve_model_path(art.root)
        except Exception:  # an evaluation folder has no checkpoint, but names the model it evaluated
            source = next((m["model"] for m in art.metrics.values() if isinstance(m, dict) and m.get("model")), None)
            if source is not None and source != "default" and not Path(source).is_file():
                if heatmaps:
                    why = "was a Checkpoint in memory, not a file" if source == IN_MEMORY else "is gone"
                    log.warning("report: the model evaluated, %s, %s; images are shown without heatmaps (pass "
                                "--model)", source, why)
                source = None
            elif source is not None and heatmaps:  # with heatmaps off the model only gives the image size
                named = True  # said below, once it is known to be the model measured
    if source is None:
        if heatmaps:
            log.info("report: no model found for %s, images are shown without heatmaps", art.root)
        return _Explainer(None, size, mean, std, draft=draft, max_pixels=max_pixels)
    ckpt = load_checkpoint(source)
    cfg = ckpt.config
    net = ckpt.build(resolve_device(device)) if heatmaps else None
    other = None
    measured = sorted({m["model_id"] for m in art.metrics.values() if isinstance(m, dict) and m.get("model_id")})
    if measured:  # an evaluation's report: is the model drawn (--model, or the file it names) the one it measured?
        from cxr.export import model_id

        mid = model_id(ckpt)
        if mid not in measured:
            other = mid
            # The file an evaluation names can change after it (a run resumed): it had been drawn without a word.
            what = f"--model {source}" if model is not None else f"{source}, the file the evaluation named, now"
            log.warning("report: %s (model_id %s) is not the model that %s measured (model_id %s): its heatmaps and "
                        "preprocessing are shown beside another model's figures", what, mid, art.root,
                        ", ".join(measured))
    if art.config is None and other is None:  # an evaluation's model: its training config (never another model's)
        art.config = cfg.to_dict()
    if named and other is None:
        log.info("report: heatmaps from %s, the model evaluated", source)
    return _Explainer(net, cfg.image_size, cfg.mean, cfg.std, source=str(source), draft=cfg.draft,
                      max_pixels=cfg.max_pixels, other_model_id=other, given=model is not None)


def _interval_note(metrics: dict) -> str:
    if not any(m.get("ci95") for m in metrics.values()):
        return ""
    methods = [m.get("ci95_method", "") for m in metrics.values()]
    if any("BCa" in m for m in methods):
        # The method's whole text: a fallback's "images resampled as if independent: too few patients" names
        # patients too, and had been reported as the patients' bootstrap.
        by_patient = ["bootstrap of the patients" in m for m in methods if m]
        unit = ("patients (each with all of its images)" if all(by_patient) else "images" if not any(by_patient)
                else "patients (each with all of its images) in the splits whose patients have several images, else of "
                "the images")
        note = ("Below each value: its 95 % interval, Wilson score for accuracy, sensitivity, specificity and "
                f"precision, a BCa bootstrap of the {unit} for F1, AUROC and AUPRC (none where every resample gives "
                "the same value, as when no image is classified or ranked wrongly, which is no certainty, or every "
                "score is the same).")
        if any(by_patient) or any("effective number" in m for m in methods):
            note += (" Where patients have several images, the rates' Wilson intervals count the effective number of "
                     "images (n over the design effect of the patients' several images)"
                     + (", and the bootstrap resamples patients." if any(by_patient) else "."))
        fallbacks = [name for name, m in metrics.items() if "as if independent" in m.get("ci95_method", "")]
        if fallbacks:
            named = html.escape(", ".join(display_name(n) for n in fallbacks))  # split names are a folder's: text
            note += (f" {named}: patients have several images, but the bootstrap resampled the images as if "
                     "independent (too few patients in a class), so the F1, AUROC and AUPRC intervals are too narrow.")
        return note
    if any(methods):  # metrics.json of cxr before 12/2026, session 20
        return ("Below each value: its 95 % interval, Wilson score for accuracy, sensitivity, specificity and "
                "precision, a percentile bootstrap of the images for F1, AUROC and AUPRC.")
    return "Below each value: its 95 % bootstrap interval (images resampled)."  # metrics.json of cxr before 12/2026


def _model_name(ref: str | os.PathLike | None, model_id: str | None = None) -> str:
    # the word only, as resolve_model_path takes it: Path("default") is a folder of that name
    name = "the bundled model (default)" if isinstance(ref, str) and ref == "default" else str(ref)
    return f"{name} (model_id {model_id})" if model_id else name


def _gather(pred: SplitPredictions, indices: Sequence[int], pixels: _PixelSource, explainer: _Explainer,
            threshold: float, known: dict[int, GridTile] | None = None, remember: bool = False) -> list[GridTile]:
    """Load the images at ``indices`` and their heatmaps (explaining the predicted class); unreadable ones dropped.
    ``known``: tiles already made, by index, used again, and with ``remember`` added to (the grid's: the video of
    the same split had decoded and explained them a second time; the video's many are not kept)."""
    known = {} if known is None else known
    loaded = [(i, pixels.load(pred.paths[i])) for i in indices if i not in known]
    loaded = [(i, im) for i, im in loaded if im is not None]
    maps = explainer.heatmaps(np.stack([im for _, im in loaded]),
                              np.array([int(pred.probs[i] >= threshold) for i, _ in loaded])) if loaded else []
    made = {i: GridTile(im, heat, int(pred.labels[i]), float(pred.probs[i]), pred.paths[i])
            for (i, im), heat in zip(loaded, maps, strict=True)}
    if remember:
        known.update(made)
    return [known[i] if i in known else made[i] for i in indices if i in known or i in made]


def pick_video_indices(pred: SplitPredictions, threshold: float, select: str = "sample",
                       max_images: int | None = None, seed: int = 0) -> list[int]:
    """Which images the video shows, in order.

    ``sample``: up to ``max_images`` (default 60) drawn at random (seeded), in random order, so the tally mixes both
    classes; ``errors``: the wrong predictions, up to ``max_images`` (default 60), in file order; ``all``: every
    image in file order, up to ``max_images`` (default :data:`MAX_VIDEO_IMAGES`; it had ignored both, and made an
    87-minute video of 5,216 images given 20).
    """
    if max_images is None:
        max_images = MAX_VIDEO_IMAGES if select == "all" else 60
    _check_count("max_images", max_images, MAX_VIDEO_IMAGES)
    n = len(pred.paths)
    if select == "all":
        if n > max_images:
            log.warning("report: the video shows the first %d of the %d images (at most %d)", max_images, n,
                        max_images)
        return list(range(min(n, max_images)))
    if select == "errors":
        wrong = np.flatnonzero((pred.probs >= threshold).astype(np.int64) != pred.labels)
        return [int(i) for i in wrong[:max_images]]
    if select == "sample":
        rng = np.random.default_rng(seed)
        return [int(i) for i in rng.permutation(n)[:max_images]]
    raise UsageError(f"video selection {select!r}: use sample, errors or all")


# -------------------------------------------------------------------------------------------------- HTML


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


class _Html(str):
    """A table cell that is already HTML (not escaped again)."""


def _fmt(v) -> str:
    if isinstance(v, _Html):
        return str(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return score_text(v)
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence], numeric_from: int = 1, label: str = "table") -> str:
    """A table whose first column names its rows (``<th scope=row>``), in a box that scrolls sideways where the page
    is narrower than the table (on a phone the metrics' columns ran off the page): a region named ``label`` that the
    keyboard can reach, to scroll it (axe: scrollable-region-focusable)."""
    head = "".join(f"<th scope='col'>{html.escape(h)}</th>" for h in header)
    # A row's name is a split's (a folder's): its bidirectional overrides and control codes shown as escapes.
    def cell(j: int, c) -> str:
        if j == 0 and numeric_from > 0:
            return f"<th scope='row'>{_fmt(display_name(c) if isinstance(c, str) else c)}</th>"
        return f"<td class='{'num' if j >= numeric_from else ''}'>{_fmt(c)}</td>"

    body = "".join("<tr>" + "".join(cell(j, c) for j, c in enumerate(r)) + "</tr>" for r in rows)
    return (f"<div class='table' tabindex='0' role='region' aria-label='{html.escape(label)}'><table><thead><tr>"
            f"{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _figure_html(path: Path, alt: str, caption: str, more: str = "") -> str:
    """A picture and its caption, and ``more`` (HTML) below them. On a narrow screen the picture alone scrolls
    sideways, in a region the keyboard can reach; the whole figure had, and its caption scrolled out of view."""
    return (f"<figure><div class='scroll' tabindex='0' role='region' aria-label='{html.escape(alt)}'>"
            f"<img src='{_data_uri(path, 'image/png')}' alt='{html.escape(alt)}'></div>"
            f"<figcaption>{caption}</figcaption>{more}</figure>")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1b1b1b;
background:#fafafa;line-height:1.45}
main{max-width:1200px;margin:0 auto;padding:1.2rem 1.5rem 3rem}
h1{font-size:1.6rem;margin:.2rem 0}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd;
padding-bottom:.2rem}
.note{background:#fff4e0;border-left:5px solid #E69F00;padding:.6rem .9rem;margin:.8rem 0;font-weight:600}
.meta{color:#555;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0;background:white;font-size:.92rem}
th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:left}th{background:#f0f0f0}td.num{text-align:right;
font-variant-numeric:tabular-nums}
figure{margin:1rem 0;background:white;border:1px solid #e3e3e3;padding:.6rem}
figure img,figure video{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:#444;font-size:.9rem;margin-top:.4rem}
tbody th{background:white;font-weight:600}
.table{overflow-x:auto;max-width:100%}
li{overflow-wrap:anywhere}
.ci{color:#666;font-size:.78rem;white-space:nowrap}
pre{background:#f3f3f3;padding:.7rem;overflow:auto;font-size:.85rem}
@media screen and (max-width:700px){.scroll{overflow-x:auto}figure img{width:640px;max-width:none}}
@media print{
body{background:white}main{max-width:none;padding:0}
h2{break-after:avoid;page-break-after:avoid}
figure,table,.note{break-inside:avoid;page-break-inside:avoid}
details::details-content{content-visibility:visible;display:block}
nav{display:none}
video::-webkit-media-controls{display:none!important}
}
"""


def _html(art: RunArtifacts, sections: list[tuple[str, str, str]], model_note: str) -> str:
    title = f"cxr report: {display_name(art.root.name)}"  # a folder's name: U+202E had reversed the title
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    nav = " · ".join(f"<a href='#{sid}'>{html.escape(name)}</a>" for sid, name, _ in sections)
    body = "".join(f"<section id='{sid}'><h2>{html.escape(name)}</h2>{content}</section>"
                   for sid, name, content in sections)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='generator' content='{GENERATOR} {__version__}'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><main><h1>{html.escape(title)}</h1>"
            f"<p class='note' role='note'>{html.escape(DISCLAIMER)}</p>"
            f"<p class='meta'>{html.escape(display_name(str(art.root.resolve())))} · generated {html.escape(now)} · "
            f"{html.escape(model_note)}</p><nav class='meta'>{nav}</nav>{body}"
            f"<p class='note'>{html.escape(DISCLAIMER)}</p></main>"
            # A printout shows what closed <details> hold (the unreadable files, the config): no CSS opens them in
            # every browser.
            "<script>addEventListener('beforeprint',()=>document.querySelectorAll('details')"
            ".forEach(d=>{d.open=true}))</script></body></html>")


# ------------------------------------------------------------------------------------------------ the report


def _number(value: object, spec: str) -> str:
    """``value`` formatted as a number where it is one, else as the text it is."""
    return format(value, spec) if isinstance(value, numbers.Real) and not isinstance(value, bool) else str(value)


def _data_html(art: RunArtifacts, explainer: _Explainer, own_config: bool) -> str:
    """The report's Data section: images per split (and the unreadable ones), and the facts of the run or
    evaluation that its numbers rest on."""
    summary = art.summary or {}
    counts = summary.get("counts") or {s: {"NORMAL": m.get("n_normal"), "PNEUMONIA": m.get("n_pneumonia")}
                                       for s, m in art.metrics.items()}
    # a training run's summary lists them; cxr evaluate's metrics.json since session 21
    unreadable = summary.get("unreadable") or {s: m["unreadable"] for s, m in art.metrics.items()
                                               if isinstance(m.get("unreadable"), list)}
    rows = [[s, c.get("NORMAL"), c.get("PNEUMONIA"), (c.get("NORMAL") or 0) + (c.get("PNEUMONIA") or 0),
             len(unreadable.get(s, [])) if s in unreadable else art.metrics.get(s, {}).get("n_unreadable")]
            for s, c in counts.items()]
    facts = []
    # Where val came from: carved, it pools the train folder and the dataset's own val folder (16 images in Kermany's
    # release), and a val row of 46 beside a val folder of 16 had gone unexplained.
    if own_config and art.config and "val" in counts:
        if art.config.get("val_source", "carve") == "carve":
            facts.append("<li>val: carved from the train and val splits together, patient-disjoint "
                         f"({float(art.config.get('val_fraction', 0.15)):.0%} of the patients; the rest is train)</li>")
        else:
            facts.append("<li>val: the dataset's own val split (--val-source folder)</li>")
    # `cxr evaluate` names its model in each split's metrics (model_id in later versions); training's metrics do not.
    evaluated = list(dict.fromkeys(_model_name(m["model"], m.get("model_id")) for m in art.metrics.values()
                                   if m.get("model")))
    if evaluated:
        facts.append(f"<li>model evaluated: {html.escape(display_name(', '.join(evaluated)))}</li>")
    if explainer.other_model_id:
        facts.append(f"<li><strong>images drawn with another model</strong>: "
                     f"{html.escape(display_name(_model_name(explainer.source, explainer.other_model_id)))}, "
                     # the file an evaluation named may have changed since (a run resumed): no --model then
                     f"{'given by --model' if explainer.given else 'the file the evaluation named, changed since'}; "
                     "its heatmaps are not those of the model evaluated</li>")
    sources = list(dict.fromkeys(m["data"] for m in art.metrics.values() if m.get("data") and "model" in m))
    if sources:
        facts.append(f"<li>data evaluated: {html.escape(display_name(', '.join(sources)))}</li>")
    seen = [f"{display_name(s)} {m['n_seen_in_training']} of {m['n']}" for s, m in art.metrics.items()
            if m.get("n_seen_in_training")]
    if seen:
        facts.append("<li><strong>images the model was trained or validated on</strong>: "
                     f"{html.escape(', '.join(seen))}; its metrics on those splits overstate how it does on new "
                     "images</li>")
    # `cxr evaluate --data RUN/split.csv` (or of the run's own data): rows that read like results on new images
    for key, text, after in (
            ("n_run_train", "the run's own training images", "trained on, so no measure of new images"),
            ("n_run_val", "the run's own validation images",
             "its epoch and threshold were chosen on them, so the metrics there are optimistic")):
        counted = [f"{display_name(s)} {m[key]} of {m['n']}" for s, m in art.metrics.items() if m.get(key)]
        if counted:
            facts.append(f"<li><strong>{text}</strong>: {html.escape(', '.join(counted))}; {after}</li>")
    # The training log had said these; the report, which is what is shown, had not.
    for key, text, after in (
            ("n_named_as_training", "images with the file names of training or validation images",
             "not byte-identical to them; if they are the same X-rays (resized or re-encoded copies), the metrics "
             "there overstate how the model does on new images"),
            ("n_sharing_patients", "images of patients who have training or validation images",
             "the metrics there overstate how the model does on new patients")):
        counted = [f"{display_name(s)} {m[key]} of {m['n']}" for s, m in art.metrics.items() if m.get(key)]
        if counted:
            facts.append(f"<li><strong>{text}</strong>: {html.escape(', '.join(counted))}; {after}</li>")
    dtypes = list(dict.fromkeys(m["inference_dtype"] for m in art.metrics.values() if m.get("inference_dtype")))
    if dtypes:
        facts.append(f"<li>predictions computed in {html.escape(', '.join(dtypes))}</li>")
    if summary.get("in_progress"):
        facts.append("<li><strong>run in progress or interrupted</strong>: "
                     f"{html.escape(str(summary['in_progress']))}</li>")
    elif art.history and art.summary is None:  # a first session stopped before its end writes no summary.json
        facts.append("<li><strong>run in progress or interrupted</strong>: no summary.json yet, so no final "
                     "evaluation and no threshold chosen on validation; <code>cxr train --resume</code> ends the run"
                     "</li>")
    sessions = summary.get("sessions") or []
    # After a --resume, the wall time is the last session's alone: said so, and the sessions named (it had read as the
    # whole run's time).
    wall = "wall time (s)" if len(sessions) < 2 else f"wall time of the last of {len(sessions)} sessions (s)"
    if len(sessions) > 1:
        facts.append("<li>trained in sessions: resumed after epoch "
                     f"{html.escape(', '.join(str(x.get('after_epoch')) for x in sessions[1:]))}</li>")
    for key, name in (("stop_reason", "stopped"), ("epochs_run", "epochs run"), ("best_epoch", "best epoch"),
                      ("device", "device"), ("wall_seconds_this_session", wall), ("data", "data")):
        if summary.get(key) is not None:
            facts.append(f"<li>{html.escape(name)}: {html.escape(display_name(str(summary[key])))}</li>")
    swa = summary.get("swa")
    if swa:
        # escaped: a summary.json from elsewhere is text like any other (its epochs had gone into the page as HTML)
        facts.append("<li>" + html.escape(
            f"weight averaging: epochs {swa['first_epoch']}-{swa['last_epoch']} at learning rate "
            f"{_number(swa['lr'], '.2g')}; validation loss of the average {_number(swa['val_loss'], '.4f')} against "
            f"{_number(swa['best_epoch_val_loss'], '.4f')} for the best single epoch, so the model is "
            f"{'the average' if swa['kept'] else 'that epoch'}") + "</li>")
    data_html = _table(["split", "NORMAL", "PNEUMONIA", "total", "unreadable"], rows, label="images per split") \
        if rows else \
        "<p>No data counts recorded.</p>"
    bad = [(s, u) for s, items in unreadable.items() for u in items]
    if bad:
        data_html += "<details><summary>unreadable files (" + str(len(bad)) + ")</summary><ul>" + "".join(
            f"<li>{html.escape(display_name(s))}: {html.escape(display_name(u.get('path', '')))}: "
            f"{html.escape(display_name(u.get('reason', '').removeprefix(u.get('path', '') + ': ')))}</li>"
            for s, u in bad) + "</ul></details>"  # the reason names the file too: once is enough
    # files a CSV listing names that are not there: n had been smaller with no word of why
    not_found = summary.get("not_found") or {s: m["not_found"] for s, m in art.metrics.items()
                                             if isinstance(m.get("not_found"), list)}
    missing = [(s, u) for s, items in not_found.items() for u in items]
    if missing:
        data_html += ("<details><summary>listed in the CSV but not there, left out (" + str(len(missing))
                      + ")</summary><ul>" + "".join(
                          f"<li>{html.escape(display_name(s))}: {html.escape(display_name(u.get('path', '')))}: "
                          f"{html.escape(display_name(u.get('reason', '')))}</li>" for s, u in missing)
                      + "</ul></details>")
    return data_html + (f"<ul>{''.join(facts)}</ul>" if facts else "")


def _metrics_html(art: RunArtifacts, splits: Sequence[str], own_config: bool, shown_threshold: str) -> str:
    """The report's Metrics section: each split's metrics with their intervals, and at what threshold."""
    cols = ("n", "accuracy", "recall", "specificity", "precision", "f1", "auroc", "auprc")
    metric_rows = []
    for s in splits:
        m = art.metrics.get(s)
        if m is None:
            continue
        ece = expected_calibration_error(art.predictions[s].labels, art.predictions[s].probs) \
            if s in art.predictions else None
        ci = m.get("ci95") or {}
        cells = []
        for c in cols:
            key = "sensitivity" if c == "recall" else c
            value, interval = m.get(c), ci.get(key)
            # a bootstrap interval of one point (every resample alike, as metrics.json of cxr before session 26
            # recorded it: [1, 1]) is none, as the note says
            if value is not None and interval and None not in interval and interval[0] != interval[1]:
                cells.append(_Html(f"{score_text(value)}<br><span class='ci'>{score_text(interval[0])}–"
                                   f"{score_text(interval[1])}</span>"))
            else:
                cells.append(value)
        metric_rows.append([s, *cells, ece])
    header = ["split", "n", "accuracy", "sensitivity", "specificity", "precision", "F1", "AUROC", "AUPRC", "ECE"]
    given = any(m.get("threshold_source") == "given" for m in art.metrics.values())
    chosen = ("set by hand (--threshold)" if given else "chosen on this run's validation split" if own_config
              else "the model's own, chosen on the validation split of its training run")
    # The val row of a run: its threshold (and epoch) were chosen on those images, which makes its figures
    # optimistic, and its intervals do not count the choice. It had stood beside test without a word.
    if own_config and not given and "val" in art.metrics:
        chosen += (", so the val row is optimistic: the threshold and the epoch were chosen on those very "
                   "images, which its intervals do not count")
    elif not given and any(m.get("n_run_val") for m in art.metrics.values()):  # evaluate of the run's own split
        chosen += (", on images that are here too (the run's own validation images: see Data), so their rows are "
                   "optimistic, which their intervals do not count")
    return (_table(header, metric_rows, label="metrics") +
            f"<p class='meta'>At decision threshold P(pneumonia) ≥ {shown_threshold}, {chosen}. "
            "Sensitivity = recall of PNEUMONIA, specificity = recall of NORMAL; AUROC and AUPRC do not "
            "depend on the threshold; ECE = expected calibration error (10 bins). "
            + _interval_note(art.metrics) + "</p>")


def make_report(run_dir: str | os.PathLike, *, output: str | os.PathLike | None = None,
                model: str | os.PathLike | None = None, video: bool = True, heatmaps: bool = True,
                grid_split: str | None = None, grid_per_group: int = 4, video_split: str | None = None,
                video_select: str = "sample", video_max_images: int | None = None, seconds_per_image: float = 1.0,
                frame_size: tuple[int, int] = (640, 360), fps: float = 5.0, device: str = "auto",
                seed: int = 0) -> Path:
    """Make every picture of a run (or an evaluation folder) from its artifacts, and ``report.html`` with them.

    Args:
        run_dir: a training run directory, or an evaluation output folder (metrics.json + predictions).
        output: where ``report.html`` and ``report/`` go (default ``run_dir``).
        model: checkpoint or run directory for the heatmaps (default: ``run_dir``'s best.pt, if any).
        video: write the fly-through MP4 and embed it.
        heatmaps: overlay Grad-CAM heatmaps on the grid and the video (needs a model).
        grid_split, video_split: which split's images to show (default test, else val, else the last one).
        grid_per_group: images per grid row group (most confident right / wrong, borderline).
        video_select: ``sample`` | ``errors`` | ``all`` (see :func:`pick_video_indices`).
        video_max_images: at most this many images in the video (default 60; with ``all``, 10,000).
        seconds_per_image, frame_size, fps: the video's timing and (width, height) in pixels.
        device: where the model runs for the heatmaps.
        seed: for the video's random sample.

    Returns:
        The path of ``report.html``.
    """
    from cxr.errors import VideoError
    from cxr.video import VideoItem, even_frame_size, write_flythrough

    check_paths(run_dir=run_dir, **({} if output is None else {"output": output}))
    _check_count("grid_per_group", grid_per_group, MAX_PER_GROUP)  # -2 had been "all but two" (a slice's end)
    if video_max_images is not None:
        _check_count("video_max_images", video_max_images, MAX_VIDEO_IMAGES)
    if video:
        if isinstance(frame_size, np.ndarray):  # np.array([640, 360]) was a size before, and stays one
            frame_size = tuple(frame_size.tolist())
        if not (isinstance(frame_size, Sequence) and len(frame_size) == 2 and all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in frame_size)) \
                or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (seconds_per_image, fps)):
            raise UsageError(f"frame_size must be (width, height) in whole pixels and seconds_per_image and fps "
                             f"numbers, got {frame_size!r}, {seconds_per_image!r} and {fps!r}")
        frame_size = even_frame_size(*frame_size)  # fail before minutes of work, not after
        # as frame_size: it was logged as "no video" and went on (infinity too, an OverflowError in the writer)
        if not (0 < seconds_per_image <= 60 and 0 < fps <= 60):  # fps 1e9 ran for good
            raise UsageError(f"seconds per image and fps must be > 0 and at most 60, got {seconds_per_image} and {fps}")
    art = load_artifacts(run_dir)
    out = Path(output) if output is not None else art.root
    if out.resolve() != art.root.resolve() and any((out / n).is_file() for n in ("best.pt", "last.pt", "history.csv",
                                                                                   "metrics.json")):
        # Another run's (or evaluation's) report was replaced, and its pictures removed.
        raise UsageError(f"--output {out}: the folder of other results, whose report would be replaced; give another "
                         f"folder (say {out / ('report-' + art.root.name)})")
    check_writable(out / "report.html")  # a folder of that name failed after the pictures were made
    pics = out / "report"
    ensure_dir(pics)
    written: set[Path] = set()
    earlier = _written_by_cxr(out)  # the pictures of the report there before

    def made(path: Path) -> Path:  # a picture this report writes (the others in report/ are an earlier one's)
        written.add(path)
        # Listed at once, with the earlier report's: a report that fails midway leaves no picture unlisted, which
        # no later report would remove.
        atomic_write_text(pics / PICTURES_LIST, json.dumps(sorted({p.name for p in earlier | written})) + "\n")
        return path
    # A run directory has its own config.yaml; an evaluation folder has none, and _explainer fills in the
    # checkpoint's, which is the model's training config (its data and output are not this evaluation's).
    own_config = art.config is not None
    explainer = _explainer(art, model, device, heatmaps)
    threshold = art.threshold if art.threshold is not None else 0.5
    splits = art.splits
    preds = [art.predictions[s] for s in splits if s in art.predictions]
    # Shown with more than three decimals when an image below it would show as on it (cxr.predict.prob_text).
    decimals = threshold_decimals(threshold, [q for p in preds for q in p.probs])
    shown_threshold = f"{threshold:.{decimals}f}"
    sections: list[tuple[str, str, str]] = []  # (id, title, html)

    def default_split(asked: str | None) -> str | None:
        if asked is not None:
            if asked not in art.predictions:
                raise UsageError(f"split {asked!r} has no predictions in {art.root} (have: "
                                 f"{', '.join(art.predictions) or 'none'})")
            return asked
        for name in ("test", "val"):
            if name in art.predictions:
                return name
        return next(reversed(art.predictions), None)

    gsplit, vsplit = default_split(grid_split), default_split(video_split)  # a wrong name fails before any work

    summary = art.summary or {}
    swa = summary.get("swa")
    sections.append(("data", "Data", _data_html(art, explainer, own_config)))
    if art.metrics:
        sections.append(("metrics", "Metrics", _metrics_html(art, splits, own_config, shown_threshold)))

    if art.history:
        best = summary.get("best_epoch")
        if best is None and not (swa and swa.get("kept")):
            losses = [h["val_loss"] for h in art.history]
            best = int(art.history[int(np.nanargmin(losses))]["epoch"]) if not all(map(math.isnan, losses)) else None
        resumed = [int(x["after_epoch"]) for x in summary.get("sessions") or [] if x.get("after_epoch")]
        path = made(_save(plot_history(art.history, best, swa, resumed), pics / "history.png"))
        sections.append(("training", "Training curves", _figure_html(
            path, "loss, accuracy and learning rate per epoch",
            "Loss and accuracy per epoch on train (dashed) and validation (solid), with the learning rate. "
            + ("The dotted line marks the best epoch (lowest validation loss)"
               + (", whose weights are the model. " if not (swa and swa.get("kept")) else ". ") if best else "")
            + ("The shaded epochs' weights were averaged; the star is the average's validation loss"
               + (", and the average is the model. " if swa.get("kept") else ". ") if swa else "")
            + ("Dashed grey lines: where the run was resumed. " if resumed else "")
            + "Training accuracy is measured on augmented images while the weights change, validation after the "
            "epoch. The loss is class-weighted, as training minimises it"
            + (", in bf16 as training computed it: the metrics table's figures (unweighted log loss, fp32) differ "
               "from the curves in their last digits. " if summary.get("bf16") else ". "))))

    cms = []
    for s in splits:
        m = art.metrics.get(s)
        if m and "confusion_matrix" in m:
            path = made(_save(plot_confusion(m["confusion_matrix"], s), pics / f"confusion_{s}.png"))
            (tn, fp), (fn, tp) = m["confusion_matrix"]  # what the picture shows, for a screen reader too
            cms.append(_figure_html(path, f"confusion matrix for {display_name(s)}: true NORMAL, {tn} predicted "
                                    f"NORMAL and {fp} predicted PNEUMONIA; true PNEUMONIA, {fn} predicted NORMAL and "
                                    f"{tp} predicted PNEUMONIA",
                                    f"{html.escape(display_name(s))}: rows are the true class, columns the "
                                    f"prediction at threshold {shown_threshold}. Row-normalised: the diagonal is "
                                    "specificity (NORMAL) and sensitivity (PNEUMONIA)."))
    if cms:
        sections.append(("confusion", "Confusion matrices", "".join(cms)))

    if preds:
        path = made(_save(plot_roc_pr(preds, threshold), pics / "roc_pr.png"))
        sections.append(("curves", "ROC and precision-recall", _figure_html(
            path, "ROC and precision-recall curves",
            f"One curve per split; the large markers are the operating point at threshold {shown_threshold}. The "
            "dotted horizontal lines in the precision-recall panel are each split's share of PNEUMONIA (what a model "
            "that guesses gets).")))
        path = made(_save(plot_calibration(preds), pics / "calibration.png"))
        sections.append(("calibration", "Calibration", _figure_html(
            path, "reliability diagram",
            "Points on the diagonal mean that a predicted probability p comes true a share p of the time; the "
            "expected calibration error (ECE) is the count-weighted mean distance from it. The bars are 95 % Wilson "
            "intervals for each bin's observed share: a bin of a few images says little. Below: how the predicted "
            "probabilities are spread.")))

    pixels = _PixelSource(explainer.size, explainer.max_pixels, draft=explainer.draft)
    model_note = ("heatmaps: Grad-CAM" if explainer.net is not None else "heatmaps off" if not heatmaps
                  else "no model: images shown without heatmaps")
    grid_tiles: dict[int, GridTile] = {}  # the grid's, by index: the video of the same split shows some again
    try:
        if gsplit is not None:
            p = art.predictions[gsplit]
            groups = select_examples(p.labels, p.probs, threshold, grid_per_group)
            tiles = {name: _gather(p, idx, pixels, explainer, threshold, grid_tiles, remember=True)
                     for name, idx in groups.items()}
            # No wider than the largest group (--per-group 100000 had drawn 100,000 columns, for good), nor than
            # GRID_COLUMNS: --per-group 50 had drawn one strip of 50, shown at 23 px a tile on the page. A group of
            # more takes several rows.
            columns = max(1, min(grid_per_group, GRID_COLUMNS, max((len(t) for t in tiles.values()), default=1)))
            grid = plot_grid(tiles, threshold, gsplit, columns=columns, decimals=decimals)
            path = made(_save(grid, pics / f"grid_{gsplit}.png"))
            sections.append(("examples", "Examples", _figure_html(
                path, f"example images from {display_name(gsplit)} (listed in the table below the picture)",
                f"Images from {html.escape(display_name(gsplit))}: the most confident right and wrong predictions "
                "(half from each true class where possible) and the ones nearest the threshold (only those nearer to "
                "it than to 0 or 1, and not already among the wrong); the right row takes the most confident of the "
                "others, so on a small split it can hold images near the threshold too. Blue frame and ✓: "
                "right; vermillion frame and ✗: wrong. "
                + ("The heatmap (Grad-CAM on the last convolutional block, explaining the predicted class) shows "
                   "which regions raised that class's score; it is not a segmentation of disease."
                   if explainer.net is not None else "")
                # One split is pictured: a train split's only error had gone unseen, with nothing said of it.
                + _other_splits_note(art.predictions, gsplit, threshold),
                _grid_table(tiles, threshold, decimals))))

        path = None
        if video and vsplit is not None:
            p = art.predictions[vsplit]
            idx = pick_video_indices(p, threshold, video_select, video_max_images, seed)
            items = []
            for start in range(0, len(idx), 32):  # Grad-CAM batches of 32 images
                for t in _gather(p, idx[start:start + 32], pixels, explainer, threshold,
                                 grid_tiles if vsplit == gsplit else None):
                    items.append(VideoItem(t.path, t.label, t.prob, t.image, t.heatmap))
            if items:
                try:
                    path = made(write_flythrough(items, pics / f"flythrough_{vsplit}.mp4", threshold=threshold,
                                                 frame_size=frame_size, seconds_per_image=seconds_per_image, fps=fps,
                                                 title=vsplit, poster=pics / f"flythrough_{vsplit}.png"))
                    made(pics / f"flythrough_{vsplit}.png")
                except Exception as e:  # the video is one part of the report: the rest is written without it
                    why = str(e) if isinstance(e, VideoError) else f"{e.__class__.__name__}: {e}"
                    log.warning("report: no video: %s", why)
                    if not isinstance(e, VideoError):  # a fault of the video's own: the traceback at debug level
                        log.debug("the video failed", exc_info=True)
                    with contextlib.suppress(OSError):  # its poster, written with the first frame, shows no video
                        (pics / f"flythrough_{vsplit}.png").unlink()
                    # Said in the report too: without it, the page read as one made with --no-video.
                    sections.append(("video", "Fly-through video", (
                        f"<p class='note'>No video: it could not be written ({html.escape(display_name(why))}). "
                        "The rest of the report is complete.</p>")))
            else:
                log.info("report: no video: no %s in %s", "wrong prediction" if video_select == "errors" else "image",
                         vsplit)
                sections.append(("video", "Fly-through video", (
                    f"<p class='meta'>No video: {html.escape(video_select)} selects no image of "
                    f"{html.escape(display_name(vsplit))}"
                    f"{' (no prediction there is wrong)' if video_select == 'errors' else ''}."
                    "</p>")))
            if path is not None:
                shown_for = max(1, round(seconds_per_image * fps)) / fps  # whole frames: what the video shows
                which = ("all of them" if len(items) == len(p.paths) else
                         "the first, in file order" if video_select == "all" else html.escape(video_select))
                size_mb = path.stat().st_size / 1e6
                sections.append(("video", "Fly-through video", (
                    f"<figure><video controls muted playsinline preload='auto' width='{frame_size[0]}' "
                    # a name for a screen reader ("video" alone had been read); its text: the predictions files
                    f"aria-label='fly-through video of {len(items)} images from {html.escape(display_name(vsplit))}, "
                    "each with its prediction, probability and truth' "
                    f"poster='{_data_uri(path.with_suffix('.png'), 'image/png')}' "
                    f"src='{_data_uri(path, 'video/mp4')}'></video><figcaption>{len(items)} images from "
                    f"{html.escape(display_name(vsplit))} ("
                    # "sample" of a split the video shows whole had read as a part of it
                    f"{which}), "
                    f"{shown_for:g} s each, "
                    f"{'with heatmap, ' if explainer.net is not None else ''}"
                    f"prediction, probability, truth and a running tally. Also saved as "
                    f"{html.escape(display_name(str(path.relative_to(out))))} ({size_mb:.1f} MB). "
                    f"{html.escape(DISCLAIMER)}</figcaption></figure>")))
    finally:
        pixels.close()
    if pixels.failed:
        missing = (f"<p class='note'>{len(pixels.failed)} image(s) could not be read for the pictures, e.g. "
                   f"{html.escape(display_name(next(iter(pixels.failed))))}. Paths are as recorded in the predictions "
                   "files; relative ones are taken from the current directory "
                   f"({html.escape(display_name(os.getcwd()))}).</p>")
        sections.append(("missing", "Images not found", missing))

    if art.config:
        import yaml

        config = f"<pre>{html.escape(yaml.safe_dump(art.config, sort_keys=False))}</pre>"
        if own_config:
            sections.append(("config", "Configuration",
                             f"<details><summary>resolved config (config.yaml)</summary>{config}</details>"))
        else:
            sections.append(("config", "Training configuration of the model", (
                f"<p class='meta'>From the checkpoint {html.escape(display_name(_model_name(explainer.source)))}: how "
                "that model was trained. Its data and output are the training run's, not this evaluation's (the "
                "images evaluated are in the predictions files).</p>"
                "<details><summary>training config (from the checkpoint)</summary>"
                f"{config}</details>")))

    report = out / "report.html"
    # An earlier report's pictures that this one did not make again (its video with --no-video now, the confusion
    # matrices and grid of splits no longer evaluated) are not this report's: they had stayed beside it in report/.
    # Only what that report listed as its own goes: files of the same names put there by someone else stay.
    # Paths that are not UTF-8 (a folder from another system's encoding) appear escaped (\\udcff), as in the figures.
    atomic_write_text(report, valid_utf8(_html(art, sections, model_note)))
    atomic_write_text(pics / PICTURES_LIST, json.dumps(sorted(p.name for p in written)) + "\n")
    log.info("wrote %s", report)
    for old in sorted(earlier):
        if old not in written:
            old.unlink(missing_ok=True)
            log.info("report: removed %s, a picture of an earlier report", old.name)
    return report


PICTURES_LIST = ".cxr-pictures.json"  # in report/: the pictures the report beside it wrote, and only those
GENERATOR = "cxr report"  # in report.html's <meta name="generator">: a report that cxr wrote


def _written_by_cxr(folder: Path) -> set[Path]:
    """The pictures in ``folder/report/`` that the report there listed as its own; for a report of a cxr that kept no
    list, those its page embeds byte for byte (it embedded every one)."""
    pics = folder / "report"
    try:
        names = json.loads((pics / PICTURES_LIST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        names = None
    if isinstance(names, list):
        return {pics / n for n in names
                if isinstance(n, str) and "/" not in n and "\\" not in n and (pics / n).is_file()}
    if not _is_cxr_report(folder / "report.html") or not pics.is_dir():
        return set()
    page = (folder / "report.html").read_text(encoding="utf-8", errors="replace")
    return {p for p in pics.iterdir() if p.is_file() and p.stat().st_size < 100_000_000
            and base64.b64encode(p.read_bytes()).decode() in page}


def _is_cxr_report(page: Path) -> bool:
    """A report.html that cxr wrote: its generator mark, or (before the mark) its title."""
    try:
        head = page.read_text(encoding="utf-8", errors="replace")[:2000]
    except OSError:
        return False
    return f"<meta name='generator' content='{GENERATOR}" in head or "<title>cxr report: " in head


def remove_report(folder: str | os.PathLike) -> bool:
    """Delete the report of a run or evaluation folder (a ``report.html`` that cxr wrote, and the pictures it listed in
    ``report/``), so that an earlier one does not stand beside results it no longer describes (``--no-report``, or a
    report that failed). Files cxr did not write stay. Returns whether there was one."""
    folder = Path(folder)
    page = folder / "report.html"
    found = sorted(_written_by_cxr(folder)) + ([page] if _is_cxr_report(page) else [])
    for f in found:
        f.unlink(missing_ok=True)
    (folder / "report" / PICTURES_LIST).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (folder / "report").rmdir()  # only when empty: anything else there is not cxr's
    return bool(found)

"""Prediction on files and folders with a trained model: P(PNEUMONIA) and a label per readable file.

Research software, not a medical device: a prediction is not a diagnosis.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import math
import operator
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cxr.errors import UsageError
from cxr.fileio import CSV_READ, CSV_TEXT, atomic_path, atomic_write_text, check_paths, spreadsheet_cells
from cxr.images import EXPLAIN_SUFFIX, ImageError, is_image_file, load_image  # noqa: F401 - EXPLAIN_SUFFIX lived here

log = logging.getLogger(__name__)

DISCLAIMER = "Research software, not a medical device: predictions are not a diagnosis."


@dataclass
class Prediction:
    """One file's result; ``error`` is set (and the probability and label empty) when the file could not be read.

    ``threshold`` and ``model_id`` say which decision rule and which model file (:func:`cxr.export.model_id`) gave
    it, so that a predictions file can be traced to its model.
    """

    path: str
    prob_pneumonia: float | None = None
    label: str | None = None
    error: str | None = None
    threshold: float | None = None
    model_id: str | None = None
    # what the file's DICOM header says against its being a frontal chest X-ray (cxr.images.dicom_view_note), which
    # `cxr predict` fills: one warning had named the first alone, and the results had nothing to set the others aside by
    input_note: str | None = None




def check_inference_args(*, threshold: float | None = None, amp: str = "auto", batch_size: int = 1) -> None:
    """The arguments the CLI checks with its flags, checked for library callers too: a threshold outside 0..1 (or NaN)
    had labelled everything alike and ended evaluate in a JSON error, an ``amp`` typo ran fp32 without a word, and a
    batch size of 0 was range()'s ValueError.

    Raises:
        UsageError: naming the argument and the value.
    """
    import numbers

    if threshold is not None:
        try:  # any number: NumPy's and torch's scalars too; not True, which would be 1
            value = math.nan if isinstance(threshold, bool) else float(threshold)
        except (TypeError, ValueError):
            value = math.nan
        if not 0 <= value <= 1:
            raise UsageError(f"threshold must be a number from 0 to 1, got {threshold!r}")
    if amp not in ("auto", "on", "off"):
        raise UsageError(f"amp must be auto, on or off, got {amp!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise UsageError(f"batch_size must be a whole number >= 1, got {batch_size!r}")


def threshold_decimals(threshold: float, probs: Iterable[float] = ()) -> int:
    """Decimals to show ``threshold`` with beside ``probs``: three, or more (up to 17, where two doubles in (0, 1)
    differ) when a probability below it would show as equal to it. At three, the bundled model's 0.57463 shows as
    0.575, and an image at P = 0.5746 would read "P 0.575, threshold 0.575, NORMAL"."""
    below = [float(p) for p in probs if p < threshold]
    for d in range(3, 18):
        shown = float(f"{threshold:.{d}f}")
        # nor a threshold inside (0, 1) shown as 0 or 1: 0.99996 is no "1.000", which reads as "never PNEUMONIA"
        if all(float(f"{p:.{d}f}") < shown for p in below) and (shown not in (0.0, 1.0) or threshold in (0.0, 1.0)):
            return d
    return 17


def score_text(x: float) -> str:
    """A metric with three decimals, or as many more (up to six) as it takes for a value inside (0, 1) not to read as
    0 or 1: the bundled model's validation AUROC, 0.9996, had read "1.000" on the service page, the report and the
    evaluate table. Nearer still (an AUROC of 1 - 1/(n_pos * n_neg) of some 30,000 images each), ">0.999999" or
    "<0.000001", never "1.000000". A value within 1e-12 of 0 or 1 is float rounding of an exact one (a bootstrap's
    perfect AUPRC came out 0.9999999999999999): no count of images below a million of each class makes one."""
    x = float(x)
    if 0 < min(x, 1 - x) < 1e-12:
        x = float(round(x))
    for d in range(3, 7):
        text = f"{x:.{d}f}"
        if not (0 < x < 1 and float(text) in (0.0, 1.0)):
            return text
    return ">0.999999" if x > 0.5 else "<0.000001"


def percent_text(rate: float) -> str:
    """A rate as a percentage with one decimal, or as many more (up to four) as it takes for a rate inside (0, 1) not
    to read 0 % or 100 %: a specificity of 2499 of 2500 had read "100.0%" beside "0.0% (1)" in the report's confusion
    matrix, and the video's running accuracy "100.0%" beside its one wrong."""
    for d in range(1, 5):
        text = f"{rate:.{d}%}"
        if not (0 < rate < 1 and float(text[:-1]) in (0.0, 100.0)):
            return text
    return ">99.99%" if rate > 0.5 else "<0.01%"


def threshold_text(threshold: float) -> str:
    """A threshold alone: three decimals, or more where it would show as 0 or 1 (:func:`threshold_decimals`)."""
    return f"{threshold:.{threshold_decimals(threshold)}f}"


def leans_away(prob: float, cls: int) -> bool:
    """Whether the model's output leans away from class ``cls`` (0 NORMAL, 1 PNEUMONIA), the class a heatmap explains:
    so for a P between 0.5 and the threshold, labelled one class while its log-odds favour the other. Its Grad-CAM
    map still shows what raised that class's score, where anything did; the pictures say which way the output leans,
    so that the map is not read as the reason for the label."""
    return (prob < 0.5) if cls == 1 else (prob > 0.5)


def prob_text(p: float, threshold: float | None = None, decimals: int = 3) -> str:
    """A probability with three decimals that never claims certainty (``>0.999`` rather than ``1.000``).

    Beside a ``threshold`` shown with ``decimals`` (:func:`threshold_decimals`), with as many more as it takes for the
    two numbers shown to compare as the two compare: never "P 0.575" below a threshold shown as 0.575."""
    # Judged on the text shown, not on the number: the double 0.9995 lies just above the decimal and had read "1.000".
    if float(f"{p:.3f}") >= 1:
        return ">0.999"
    if float(f"{p:.3f}") <= 0:
        return "<0.001"
    if threshold is None:
        return f"{p:.3f}"
    shown_threshold = float(f"{threshold:.{decimals}f}")
    for d in range(3, max(decimals, 3) + 1):
        text = f"{p:.{d}f}"
        if (float(text) >= shown_threshold) == (p >= threshold):
            return text
    return f"{p:.{decimals}f}"


def _is_pattern(path: str | os.PathLike) -> bool:
    """A wildcard pattern that names no file itself (a file may be called ``x[1].jpeg``)."""
    return any(c in str(path) for c in "*?[") and not os.path.exists(path)


def path_list(paths: list[str | os.PathLike] | str | os.PathLike) -> list[str | os.PathLike]:
    """The paths given, as a list: one path alone is one (not its characters: an absolute one had walked "/" first),
    a generator is read once (Path.glob had lost the files an existence check consumed), and anything that is no path
    (None, bytes, a NumPy array, an image) is a UsageError naming its type."""
    if isinstance(paths, (str, os.PathLike)):
        return [paths]
    if paths is None or isinstance(paths, bytes) or not isinstance(paths, Iterable):
        raise UsageError(f"paths: a file or folder, or a list of them, got {type(paths).__name__}")
    paths = list(paths)
    check_paths(**{f"paths[{i}]": p for i, p in enumerate(paths) if not isinstance(p, (str, os.PathLike))})
    return paths


def listed_files(paths: list[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Files :func:`collect_files` listed, taken as they are (one path alone is one file: a string had been taken as
    its characters, each "no such file")."""
    return [Path(p) for p in path_list(paths)]


def collect_files(paths: list[str | os.PathLike] | str | os.PathLike, *,
                  skip: Path | None = None) -> list[Path]:
    """Files as given (a name that is no file too, where another path given exists: its reading fails, and says so;
    where none exists, a UsageError), and image files
    (:func:`cxr.images.is_image_file`) found recursively in folders (sorted;
    hidden files and folders skipped; linked folders followed). ``skip``: a folder whose files are not collected (an
    output folder inside an input folder). Grad-CAM pictures (``*_gradcam.png``, what ``cxr explain`` writes) found in
    a folder are left out with a warning: predicting a folder after explaining into it would otherwise read them as
    X-rays. Named one by one, they are taken. A ``.csv`` file given is a list of images: the files of its ``path``
    column (:func:`cxr.data.listed_files`)."""
    from cxr.data import walk_files

    paths = path_list(paths)
    if sys.platform == "win32":  # cmd and PowerShell hand `scans\*.jpeg` over as it is: expanded here, as a shell would
        paths = [m for p in paths for m in (sorted(glob.glob(str(p))) if _is_pattern(p) else [p]) or [p]]
    if paths and not any(os.path.lexists(p) for p in paths):  # a typo in the one folder given: said now, not after
        # loading the model and writing a file of error rows (every shard of a job array had exited 0 on it)
        raise UsageError(f"{paths[0]}: no such file or directory" if len(paths) == 1 else
                         f"none of the {len(paths)} paths given exists, e.g. {paths[0]}: no such file or directory")
    files: list[Path] = []
    for p in map(Path, paths):
        # a worklist: the files of its path column, in its order (a picture named .csv, by its content, is a picture)
        if p.suffix.lower() == ".csv" and p.is_file() and not is_image_file(p):
            from cxr.data import listed_files

            files += map(Path, listed_files(p))
            continue
        if p.is_dir():
            everything = walk_files(p, skip=skip)
            found = [f for f in everything if is_image_file(f)]
            if len(found) < len(everything):
                images = set(found)
                other = [f for f in everything if f not in images]
                log.warning("%s: ignoring %d file(s) that are not JPEG, PNG or DICOM by name or content, or are "
                            "DICOM objects without an image (a DICOMDIR, a report, a presentation state), e.g. %s",
                            p, len(other), other[0])
            pictures = [f for f in found if f.name.lower().endswith(EXPLAIN_SUFFIX)]
            if pictures:
                log.warning("%s: left out %d Grad-CAM picture(s) written by cxr explain (*%s), e.g. %s; name them "
                            "as files to predict them anyway", p, len(pictures), EXPLAIN_SUFFIX, pictures[0])
                found = [f for f in found if not f.name.lower().endswith(EXPLAIN_SUFFIX)]
            files += found
        else:  # a file, or a name that is none (a typo, a link to nothing): its row says so when it is read, as for
            # any file that cannot be read; one such name among thousands had stopped the whole run before it began
            files.append(p)
    return files


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0-based shard ``i`` of ``n``) as a tuple, or a UsageError."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: use I/N, e.g. 0/4 for the first of four shards") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N (shards count from 0: the last of {max(n, 1)} is "
                         f"{max(n, 1) - 1}/{max(n, 1)})")
    return i, n


def select_shard(files: list[Path], shard: tuple[int, int] | None) -> list[Path]:
    """Shard ``i`` of ``n``: the ``i``-th of ``n`` contiguous, near-equal blocks of ``files``.

    Contiguous blocks, so that the parts written in shard order concatenate to the single-process order.
    """
    if shard is None:
        return files
    try:
        i, n = (operator.index(x) for x in shard)
    except (TypeError, ValueError):
        raise UsageError(f"shard {shard!r}: give (i, n), two whole numbers") from None
    if n < 1 or not 0 <= i < n:  # (5, 2) had predicted nothing without a word, (0, 0) divided by zero
        raise UsageError(f"shard {shard!r}: need 0 <= i < n")
    return files[len(files) * i // n:len(files) * (i + 1) // n]


def predict_files(model: str | os.PathLike, paths: list[str | os.PathLike], *, device: str = "auto",
                  threshold: float | None = None, batch_size: int = 32,
                  shard: tuple[int, int] | None = None, amp: str = "auto", listed: bool = False) -> list[Prediction]:
    """Predict every file under ``paths`` (or shard ``(i, n)`` of them, see :func:`select_shard`).

    ``listed``: ``paths`` are files :func:`collect_files` already listed (a shard's part of them), taken as they are:
    a shard whose every file has gone since gets their error rows, where listing them again refused the shard.

    Unreadable files get an ``error`` instead of a prediction. ``amp`` "auto" computes in bf16 where the device is
    fast at it; "off" in fp32 (TF32 off on CUDA), the arithmetic of ``cxr evaluate``'s default, whose probabilities it
    then gives to the last bits (exactly when the images are batched alike: another batch size may run other kernels).
    """
    from cxr.evaluate import load_for_inference
    from cxr.export import model_id

    check_inference_args(threshold=threshold, amp=amp, batch_size=batch_size)
    files = select_shard(listed_files(paths) if listed else collect_files(paths), shard)
    # bf16 where the device is fast at it (auto): the speed of training's numerics. `cxr evaluate` computes in fp32
    # unless told otherwise; `--amp off` here gives its probabilities to the last bit.
    run = load_for_inference(model, device=device, amp=amp, threshold=threshold)
    ckpt, cfg, t = run.ckpt, run.cfg, run.threshold

    def probs_of(images: np.ndarray) -> np.ndarray:
        return run.probs(images, batch_size)

    return predict_in_batches(files, probs_of, image_size=cfg.image_size, max_pixels=cfg.max_pixels,
                              class_names=ckpt.class_names, threshold=t, batch_size=batch_size,
                              model_id=model_id(ckpt), draft=cfg.draft)


def predict_in_batches(files: list[Path], probs_of, *, image_size: int, max_pixels: int, class_names: list[str],
                       threshold: float, batch_size: int, model_id: str | None = None,
                       draft: bool = False) -> list[Prediction]:
    """Decode ``files`` a batch at a time (memory stays flat) and turn ``probs_of(uint8 (N, S, S))`` into
    predictions, in input order; unreadable files get an ``error``. Shared by the PyTorch and ONNX backends.
    ``draft``: the model's JPEG decoding (its config's ``draft``), as its training and ``cxr evaluate`` decode.
    """
    from cxr.progress import progress_bar

    results: list[tuple[int, Prediction]] = []  # by position in `files`: a file given twice is two rows in place
    try:  # a batch interrupted halfway gives none of its rows
        with progress_bar("predict", len(files), unit="img") as bar:
            for start in range(0, len(files), batch_size):
                images, good, batch = [], [], []
                for i, f in enumerate(files[start:start + batch_size], start):
                    try:
                        images.append(load_image(f, image_size, max_pixels=max_pixels, draft=draft))
                        good.append((i, f))
                    except ImageError as e:
                        batch.append((i, Prediction(str(f), error=str(e), threshold=threshold, model_id=model_id)))
                if images:
                    for (i, f), prob in zip(good, probs_of(np.stack(images)), strict=True):
                        batch.append((i, Prediction(str(f), float(prob), class_names[int(prob >= threshold)],
                                                    threshold=threshold, model_id=model_id)))
                results += batch
                bar.advance(len(batch))
    except KeyboardInterrupt:
        # Ctrl-C an hour into a PACS export had lost every prediction made: they go with the interruption, for the
        # CLI to write (as `cxr explain` lists the pictures it made).
        raise Interrupted([p for _, p in sorted(results, key=lambda r: r[0])], len(files)) from None
    return [p for _, p in sorted(results, key=lambda r: r[0])]


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C during predictions, with the ``predictions`` of the batches finished before it (in input order) and
    the ``total`` number of files."""

    def __init__(self, predictions: list[Prediction], total: int) -> None:
        super().__init__(f"stopped after {len(predictions)} of {total} file(s)")
        self.predictions, self.total = predictions, total


def partial_path(output: str | os.PathLike) -> Path:
    """Where an interrupted ``cxr predict --output preds.csv`` writes what it had done: ``preds.partial.csv`` (not
    ``preds.csv``, which a pipeline would take for the whole job)."""
    out = Path(output)
    return out.with_name(f"{out.stem}.partial{out.suffix}")


def _check_suffix(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".json"):
        raise UsageError(f"{path}: a predictions file is named .csv or .json")
    return suffix


def predictions_file_size(path: str | os.PathLike, files: Sequence[str | os.PathLike]) -> int:
    """About the most bytes :func:`write_predictions_file` writes to ``path`` for ``files`` (errors aside, whose
    messages vary), so that a disk without room for them is said before the work
    (:func:`cxr.fileio.check_free_space`)."""
    # Generous, since a refusal costs less than a lost job: each row's path twice (an unreadable file's error repeats
    # it), as JSON escapes it (\\uXXXX, six bytes a character beyond ASCII), and room for an error's reason.
    csv_file = _check_suffix(path) == ".csv"
    per_row = (160 if csv_file else 230) + 200  # the disclaimer on each CSV row, or JSON's keys and indents; a reason
    size = (lambda f: len(os.fsencode(f))) if csv_file else (lambda f: len(json.dumps(f)))
    return 1024 + sum(2 * size(os.fspath(f)) + per_row for f in files)


def write_predictions_file(path: str | os.PathLike, predictions: list[Prediction]) -> None:
    """Write predictions as ``.csv`` or ``.json`` (by extension), atomically."""
    suffix = _check_suffix(path)
    with atomic_path(path) as tmp, open(tmp, "w", **CSV_TEXT) as f:
        if suffix == ".json":
            json.dump({"note": DISCLAIMER, "predictions": [asdict(p) for p in predictions]}, f, indent=2)
        else:
            w = csv.writer(f)
            # note: the disclaimer on every row, so that no copy or filtered excerpt of the file loses it
            w.writerow(["path", "prob_pneumonia", "label", "error", "threshold", "model_id", "input_note", "note"])
            for p in predictions:
                prob = "" if p.prob_pneumonia is None else repr(float(p.prob_pneumonia))
                t = "" if p.threshold is None else repr(float(p.threshold))
                path, error = spreadsheet_cells(p.path, p.error or "")
                w.writerow([path, prob, p.label or "", error, t, p.model_id or "", p.input_note or "", DISCLAIMER])


def read_predictions_file(path: str | os.PathLike) -> list[Prediction]:
    """Predictions from a file written by :func:`write_predictions_file`."""
    suffix = _check_suffix(path)
    try:
        with open(path, **CSV_READ) as f:
            if suffix == ".json":
                return [Prediction(**p) for p in json.load(f)["predictions"]]
            # threshold and model_id: absent from the files of earlier cxr versions
            return [Prediction(r["path"], float(r["prob_pneumonia"]) if r["prob_pneumonia"] else None,
                               r["label"] or None, r["error"] or None,
                               float(r["threshold"]) if r.get("threshold") else None, r.get("model_id") or None,
                               r.get("input_note") or None)
                    for r in csv.DictReader(f)]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path}: not a cxr predictions file ({e})") from None


def shard_path(output: str | os.PathLike, shard: tuple[int, int]) -> Path:
    """Where shard ``(i, n)`` of ``output`` is written: ``preds.csv`` -> ``preds.shard-00001-of-00004.csv``."""
    out = Path(output)
    i, n = shard
    return out.with_name(f"{out.stem}.shard-{i:05d}-of-{n:05d}{out.suffix}")


def manifest_path(part: str | os.PathLike) -> Path:
    """The manifest beside a shard file: ``preds.shard-00000-of-00004.csv.manifest.json``."""
    return Path(f"{part}.manifest.json")


def files_digest(files: list[Path]) -> str:
    """SHA-256 of the file list, as given and in order: equal for shards that saw the same list."""
    return hashlib.sha256("\n".join(map(str, files)).encode("utf-8", "surrogateescape")).hexdigest()


def write_shard_manifest(part: str | os.PathLike, files: list[Path]) -> None:
    """What shard ``part`` was cut from (the whole list's length and digest), for :func:`merge_shards` to check."""
    atomic_write_text(manifest_path(part), json.dumps({"files": len(files), "files_sha256": files_digest(files)})
                      + "\n")


def _check_manifests(out: Path, parts: list[Path], rows: list[int]) -> None:
    manifests = []
    for part in parts:
        try:
            m = json.loads(manifest_path(part).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            m = None
        ok = isinstance(m, dict) and isinstance(m.get("files"), int) and isinstance(m.get("files_sha256"), str)
        manifests.append(m if ok else None)
    if any(m is None for m in manifests):
        log.warning("%s: some shard files have no readable manifest (written by an older cxr?), so cxr cannot check "
                    "that every shard saw the same files", out)
        return
    if len({(m["files"], m["files_sha256"]) for m in manifests}) > 1:
        counts = sorted({m["files"] for m in manifests})
        raise UsageError(f"{out}: the shards were cut from different file lists (files added, removed or renamed "
                         f"between the runs; list lengths {counts}), so merging would lose or repeat files; run "
                         "every shard again on the same files")
    if sum(rows) != manifests[0]["files"]:
        raise UsageError(f"{out}: the shard files hold {sum(rows)} predictions for a list of "
                         f"{manifests[0]['files']} files (a shard file edited or cut short?); run the shards again")


def merge_shards(output: str | os.PathLike, *, remove: bool = False, count: int | None = None) -> list[Prediction]:
    """Concatenate the shard files of ``output`` in shard order into ``output`` (equal to a single-process run).

    Every shard ``0..n-1`` of one ``n`` must be present, cut from the same file list (their manifests say); ``remove``
    deletes the parts and their manifests after the merged file is written. ``count``: merge the parts of ``n =
    count`` only (a torchrun knows its own; parts of an earlier run with another count are then left alone).
    """
    out = Path(output)
    _check_suffix(out)
    pattern = re.compile(rf"^{re.escape(out.stem)}\.shard-(\d{{5}})-of-(\d{{5}}){re.escape(out.suffix)}$")
    found: dict[int, set[int]] = {}
    for f in out.parent.iterdir() if out.parent.is_dir() else ():
        if (m := pattern.match(f.name)) and count in (None, int(m[2])):
            found.setdefault(int(m[2]), set()).add(int(m[1]))
    if not found:
        raise UsageError(f"no shard files {shard_path(out, (0, 1)).name.replace('00000-of-00001', '*-of-*')} "
                         f"beside {out}")
    if len(found) > 1:
        raise UsageError(f"shard files of {out} from runs with different shard counts: {sorted(found)}; delete "
                         f"those of the run you do not want ({out.stem}.shard-*-of-N{out.suffix}, with their "
                         "manifests)")
    (n, have), = found.items()
    missing = sorted(set(range(n)) - have)
    if missing:
        raise UsageError(f"{out}: of its {n} shards (0 to {n - 1}), shard{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(map(str, missing))} {'are' if len(missing) > 1 else 'is'} missing; run "
                         f"{'them' if len(missing) > 1 else 'it'} first")
    parts = [shard_path(out, (i, n)) for i in range(n)]
    read = [read_predictions_file(part) for part in parts]
    _check_manifests(out, parts, [len(r) for r in read])
    merged = [p for r in read for p in r]
    rules = {(p.model_id, p.threshold) for p in merged if p.model_id is not None}
    if len(rules) > 1:
        shown = ", ".join(f"model {m} at threshold {float(t)!r}" for m, t in sorted(rules))  # all digits: they differ
        raise UsageError(f"{out}: the shards were predicted by different models or thresholds ({shown}); run them "
                         "again with one")
    write_predictions_file(out, merged)
    if remove:
        for part in parts:
            part.unlink()
            manifest_path(part).unlink(missing_ok=True)
    return merged

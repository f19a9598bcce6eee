"""Datasets: find the images, carve a patient-disjoint validation split, decode each image once into a cache.

Data flows one way: files -> :func:`scan` (records, no pixels) -> :func:`carve_validation` (which record goes
where) -> :func:`prepare` (cached uint8 arrays, one per split) -> :class:`XrayDataset` (tensors, augmented
for training only).

Layouts read by :func:`scan`:

* a dataset root ``DIR/{train,val,test}/{NORMAL,PNEUMONIA}/...`` (any subset of splits; names case-insensitive);
* a single split folder ``DIR/{NORMAL,PNEUMONIA}/...``, keyed by its own name (e.g. ``test``);
* a MedMNIST-style ``.npz`` with ``<split>_images`` and ``<split>_labels`` for any of the three splits;
* a run's ``split.csv``: the splits it trained, validated and tested on, carved validation split included;
* a CSV listing images (:func:`scan_image_list`): ``path`` and ``label``, ``split`` and ``patient`` if wished.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import numbers
import os
import re
import sqlite3
import stat
import sys
import tempfile
import time
import unicodedata
import uuid
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from cxr.config import CLASS_NAMES, DEFAULT_MAX_PIXELS, Config, usable_cores
from cxr.distributed import own_warning
from cxr.errors import CxrError, DataError, UsageError, WriteError
from cxr.fileio import CSV_READ, CSV_TEXT, FORMULA_START, _umask, atomic_path, npz_row, valid_utf8
from cxr.images import (
    EXPLAIN_SUFFIX,
    IMAGE_EXTENSIONS,
    ImageError,
    check_not_blank,
    dicom_patient_id,
    image_stem,
    is_image_file,
    load_image,
    read_file,
    resize_square,
    stretch_range,
)
from cxr.progress import progress_bar
from cxr.tv import import_torchvision

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# A CSV listing's split cells may also say training and testing: not folder names, where a testing/ of unlabelled
# images beside train/ had then been refused as a split without class folders
_LISTED_SPLIT_ALIASES = {**_SPLIT_ALIASES, "training": "train", "testing": "test"}

# Bumped whenever decoding, resizing or the cache's layout changes, so that old cache entries are never trusted.
# 2: images stored in packs, not one file each. 3: 16-bit colour and grey + alpha PNGs refused (PIL had kept each
# sample's high byte; old caches hold those decodes). 4: blank images refused, EXIF Orientation applied. 5: DICOM pixel
# padding and palettes applied, DICOM without a preamble read. 6: 16-bit and DICOM stretched between percentiles, not
# min..max; MONOCHROME2 with an INVERSE Presentation LUT Shape inverted; an enhanced DICOM's functional group window.
# 7: DICOM images of modalities that are no radiograph (CT, MR, ...) refused (a warm cache had served them still).
PREPROCESS_VERSION = 7

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-\d+", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-\d+", re.IGNORECASE),
)


@dataclass(frozen=True)
class Sample:
    """One image: where it is, its label (1 = PNEUMONIA), its patient id and its content digest."""

    path: str
    label: int
    patient: str
    digest: str = ""


@dataclass
class Split:
    """The records of one split. ``images`` holds raw pixels for array sources (``.npz``), else None."""

    name: str
    samples: list[Sample]
    images: np.ndarray | None = None
    recorded: dict[str, str] | None = None  # path -> SHA-256, as a run's split.csv recorded them
    # (path, reason) of the files a CSV listing gives this split that are not there, or are no regular files: said
    # in metrics.json and summary.json, not only in one warning naming the first
    not_found: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Images per class name."""
        labels = np.array([s.label for s in self.samples], dtype=np.int64)
        return {name: int((labels == i).sum()) for i, name in enumerate(CLASS_NAMES)}


@dataclass
class Prepared:
    """A split ready for a model: images decoded and resized, with what could not be read."""

    name: str
    images: np.ndarray  # (N, S, S) uint8
    labels: np.ndarray  # (N,) int64
    samples: list[Sample]
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _kermany_patient(filename: str) -> str | None:
    """The patient id in a Kermany file name, in the dataset's own case (``IM-0001``, also from ``im-0001-0002.JPEG``,
    which is the same patient), or None."""
    stem = Path(filename).stem
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(stem)
        if m:
            return m.group(1).lower() if m.group(1).lower().startswith("person") else m.group(1).upper()
    return None


def _unambiguous_kermany_patient(filename: str) -> str | None:
    """The patient of a Kermany name no other convention makes (``person12_virus_3``, ``NORMAL2-IM-0012-0001``), or
    None: OsiriX's and Horos' ``IM-<series>-<n>.dcm`` repeat ``IM-0001`` in every patient's folder."""
    found = _kermany_patient(filename)
    return found if found is not None and not found.startswith("IM-") else None


def patient_id(filename: str) -> str:
    """Patient id from a Kermany file name (``person12_virus_3`` -> ``person12``); else the name without its image
    extension (a DICOM named by its UID, ``1.2.840.113619.2.55.3.1``, keeps its last part: it is no extension)."""
    found = _kermany_patient(filename)
    if found is not None:
        return found
    return image_stem(filename)


_DICOM_PATIENT = "dicom:"  # before a patient id read from a DICOM header's PatientID
PATTERN_PATIENT = "pattern:"  # before a patient id matched by the config's patient_pattern
SPLIT_CSV_COLUMNS = ("split", "path", "label", "patient", "sha256")  # a run's split.csv
LISTED_PATIENT = "listed:"  # before a patient id given in the patient column of a CSV listing images


def patient_key(patient: str) -> str:
    """The id that tells one patient from another whatever source gave it: a CSV listing's patient cell and a DICOM
    header's PatientID both name a hospital's id (an MRN), so ``listed:X`` and ``dicom:X`` are one patient. (A
    patient column filled on some rows only, the header read for the others, had put one patient's images in train
    and val under a log that called the split patient-disjoint.)"""
    for prefix in (LISTED_PATIENT, _DICOM_PATIENT):
        if patient.startswith(prefix):
            return "id:" + patient[len(prefix):]
    return patient


def hospital_id(value: str) -> str:
    """A hospital's patient id as a patient cell and its own file's DICOM header are compared: NFC, case and spaces
    aside, and an all-digit id without its leading zeros (a spreadsheet writes the header's ``00003`` as ``3``). Only
    for that link: two cells ``A12`` and ``a12``, or ``007`` and ``7``, stay two patients (a site may mean two)."""
    value = unicodedata.normalize("NFC", value).strip().casefold()
    return (value.lstrip("0") or "0") if value.isdigit() else value


def file_patient_id(path: Path, class_dir: Path | None = None, pattern: str = "") -> str:
    """The patient id of an image file, by the first rule that gives one:

    1. ``pattern``, a regular expression searched in the path below ``class_dir`` (folders joined by "/"): its first
       group, or the whole match, as ``pattern:<id>``;
    2. for a file not named ``.jpg``/``.jpeg``/``.png``, the PatientID in its DICOM header (only the header is read),
       as ``dicom:<PatientID>``: a PACS export names its files by UID, and OsiriX's and Horos' ``IM-<series>-<n>.dcm``
       look like Kermany names (whose rule had made one patient of each series number, across patients);
    3. a Kermany file name (:func:`patient_id`); for a file not named as JPEG or PNG, only one no other convention
       makes (not OsiriX's bare ``IM-<series>-<n>``);
    4. else the file is one patient, named by its path below ``class_dir`` without its image extension. The folders
       are part of it: ``IMG_0001.jpg`` of two patients' folders is two patients, not one.

    The id is in Unicode's NFC form: a folder ``Zoë`` written by macOS (NFD) and one written on Linux (NFC) are one
    patient (they had gone one to train, one to validation, and the split was said to be patient-disjoint).
    """
    return unicodedata.normalize("NFC", _file_patient_id(path, class_dir, pattern))


def _file_patient_id(path: Path, class_dir: Path | None, pattern: str) -> str:
    below = path.relative_to(class_dir).as_posix() if class_dir is not None else path.name
    if pattern:
        m = re.search(pattern, below)
        found = (m.group(1) if m.re.groups else m.group(0)) if m else None
        if found:  # a group that took no part, or matched nothing, gives no id: the other rules do
            return PATTERN_PATIENT + found
    if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
        found = dicom_patient_id(path)
        if found is not None:
            return _DICOM_PATIENT + found
        if _name_patient(path.name) is None:  # OsiriX's IM-0001-0001.dcm without a PatientID: no patient in its name
            return image_stem(below)
    return patient_id(below)


def _name_patient(filename: str) -> str | None:
    """The patient a file's name gives (Kermany's convention), or None. For a file that is not JPEG or PNG by name
    (DICOM), only a name no other convention makes: OsiriX's and Horos' ``IM-<series>-<n>.dcm`` repeat ``IM-0001`` in
    every patient's folder, and without a PatientID had made one patient of unrelated patients of both classes."""
    if Path(filename).suffix.lower() in (".jpg", ".jpeg", ".png"):
        return _kermany_patient(filename)
    return _unambiguous_kermany_patient(filename)


def patient_from_name_only(sample: Sample) -> bool:
    """Whether a sample's patient id is merely its own file's name or path (rule 4 of :func:`file_patient_id`)."""
    return (_name_patient(Path(sample.path).name) is None
            and not sample.patient.startswith((_DICOM_PATIENT, PATTERN_PATIENT, LISTED_PATIENT)))


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex): the cache key and the duplicate detector."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def class_of_folder(name: str) -> int | None:
    """The class a folder's name gives, in any case and with spaces around it ignored (``"NORMAL "``, whose space a
    file manager shows as nothing, had been left out as "not a class" and its class said to be missing), or None."""
    name = name.strip().upper()
    return CLASS_NAMES.index(name) if name in CLASS_NAMES else None


def _split_of(name: str) -> str | None:
    """The split a folder's name gives (``validation`` is val), as :func:`class_of_folder` reads names, or None."""
    return _SPLIT_ALIASES.get(name.strip().lower())


def _class_dirs(split_dir: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for child in sorted(split_dir.iterdir()):
        label = class_of_folder(child.name)
        if label is not None and child.is_dir():
            if label in found:  # NORMAL and normal: one would be dropped, which one decided by the listing order
                raise DataError(f"{split_dir}: two folders for class {CLASS_NAMES[label]}, {found[label].name} and "
                                f"{child.name}; merge them into one")
            found[label] = child
    return found


def walk_files(folder: Path, *, skip: Path | None = None) -> list[Path]:
    """Every file under ``folder``, recursively and sorted, hidden files and folders (``.name``: ``.ipynb_checkpoints``,
    ``.Trash``, ...) left out. Links that lead nowhere are left out with a warning (they had vanished silently).

    Folders reached through symbolic links are followed (``Path.rglob`` skips them before Python 3.13, silently
    losing images that a dataset keeps elsewhere), each real folder once, so a link loop ends. ``skip``: a folder
    below ``folder`` whose contents are left out (an output folder inside the input, say); ``folder`` itself is
    always walked, even when it is ``skip`` (``cxr explain DIR --output DIR``).
    """
    files, seen, broken = [], set(), []
    skip_id = _folder_id(skip) if skip is not None else None
    root_id = _folder_id(folder)
    for top, dirs, names in os.walk(folder, followlinks=True):
        here = _folder_id(Path(top))
        if here in seen or (skip_id is not None and here == skip_id != root_id):
            dirs[:] = []
            continue
        seen.add(here)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            p = Path(top) / n
            if n.startswith("."):
                continue
            if p.is_file():
                files.append(p)
            elif p.is_symlink() and not p.exists():
                broken.append(p)
    if broken:
        log.warning("%s: skipping %d link(s) to nothing, e.g. %s -> %s", folder, len(broken), broken[0],
                    os.readlink(broken[0]))
    return sorted(files)


def _folder_id(path: Path) -> tuple[int, int | str] | None:
    """A folder's identity (device, inode), or None where it cannot be read. Python's docs: ``st_ino`` identifies the
    file only "if non-zero" (some Windows file systems give 0): its real path then, as the case-insensitive name Windows
    compares (with 0 for all, sub-folders were taken for folders already walked, and every --output for one inside
    --data)."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not st.st_ino:
        return -1, os.path.normcase(os.path.realpath(path))
    return st.st_dev, st.st_ino


def _list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files under ``folder`` (recursive, sorted; see :func:`cxr.images.is_image_file`) and the other files,
    which are ignored. Pictures of ``cxr explain`` (``*_gradcam.png``) are left out, with a warning, as ``cxr
    predict`` leaves them out: explained into a class folder, they had been scored and trained on as X-rays."""
    images, other, pictures = [], [], []
    for p in walk_files(folder):
        if p.name.lower().endswith(EXPLAIN_SUFFIX):
            pictures.append(p)
        else:
            (images if is_image_file(p) else other).append(p)
    if pictures:
        log.warning("%s: left out %d Grad-CAM picture(s) written by cxr explain (*%s), e.g. %s", folder,
                    len(pictures), EXPLAIN_SUFFIX, pictures[0])
    return images, other


def scan_folder(split_dir: Path, name: str, *, require_both_classes: bool = True, patient_pattern: str = "") -> Split:
    """Records of one split folder with class sub-folders (patient ids: :func:`file_patient_id`).

    Raises:
        DataError: a class folder is missing or holds no image files (unless ``require_both_classes`` is
            False, in which case at least one class must have images).
    """
    dirs = _class_dirs(split_dir)
    _say_what_is_left_out(split_dir, dirs)
    samples: list[Sample] = []
    problems = []
    for label, cls in enumerate(CLASS_NAMES):
        if label not in dirs:
            problems.append(f"{split_dir}: class folder {cls}/ is missing")
            others = [] if require_both_classes else _other_image_folders(split_dir, dirs)
            if others:
                # Beside folders no class takes (bacteria/ and virus/): a layout of other classes, whose one class
                # found had been scored alone, exit 0 (accuracy 0.000 of 10 NORMAL images, 12 pneumonias unseen)
                raise DataError(f"{split_dir}: class folder {cls}/ is missing, and folders of images that are not a "
                                f"class are there ({', '.join(repr(p.name) for p in others[:5])}): "
                                f"put each class's images in {' and '.join(c + '/' for c in CLASS_NAMES)} (for "
                                "instance bacteria/ and virus/ together in PNEUMONIA/)")
            continue
        images, other = _list_images(dirs[label])
        _refuse_other_class_inside(dirs[label], label, images)
        if other:
            log.warning("%s: ignoring %d file(s) that are not JPEG, PNG or DICOM by name (%s) or content, or are "
                        "DICOM objects without an image (a DICOMDIR, a report, a presentation state), e.g. %s",
                        dirs[label], len(other), ", ".join(sorted(IMAGE_EXTENSIONS)), other[0].name)
        if not images:
            problems.append(f"{dirs[label]}: class folder holds no image files")
        samples += [Sample(str(p), label, file_patient_id(p, dirs[label], patient_pattern)) for p in images]
    if problems and (require_both_classes or not samples):
        raise DataError("; ".join(problems))
    for p in problems:
        log.warning("%s", p)  # the message holds folder names: as an argument, a line break in one is escaped
    return Split(name, samples)


def _refuse_other_class_inside(class_dir: Path, label: int, images: list[Path]) -> None:
    """Refuse a folder named for the other class inside a class folder (``PNEUMONIA/NORMAL/``, a folder dropped into
    its neighbour in a file manager): its images had been labelled by the outer folder without a word, NORMAL X-rays
    scored as missed pneumonias and trained on as such."""
    inside: dict[Path, int] = {}
    for p in images:
        parts = p.relative_to(class_dir).parts[:-1]
        for i, part in enumerate(parts):
            if class_of_folder(part) == 1 - label:
                folder = class_dir.joinpath(*parts[:i + 1])
                inside[folder] = inside.get(folder, 0) + 1
                break
    if inside:
        folder, n = next(iter(inside.items()))
        other = CLASS_NAMES[1 - label]
        raise DataError(f"{folder}: a folder named {other} inside the {CLASS_NAMES[label]} class folder, with {n} "
                        f"image(s) that would be labelled {CLASS_NAMES[label]}"
                        f"{f' ({len(inside)} such folders)' if len(inside) > 1 else ''}; move its images into "
                        f"{class_dir.parent / other}, or rename the folder if they are {CLASS_NAMES[label]}")


# What cxr's own commands leave in a folder they write: such a folder beside a class folder is not a class of images
OUTPUT_MARKERS = ("metrics.json", "summary.json", "explanations.csv", "report.html")


def _other_image_folders(split_dir: Path, class_dirs: dict[int, Path]) -> list[Path]:
    """The folders beside a split's class folders that no class takes and that hold an image file (hidden ones, and
    the outputs of cxr's commands, left out: an evaluation written into a one-class folder, as allowed, had made the
    next evaluation of it refuse the folder)."""
    return [p for p in sorted(_children(split_dir))
            if not p.name.startswith(".") and p not in class_dirs.values() and _is_dir(p)
            and not any((p / m).is_file() for m in OUTPUT_MARKERS)
            and any(is_image_file(f) and not f.name.lower().endswith(EXPLAIN_SUFFIX) for f in walk_files(p))]


def _say_what_is_left_out(split_dir: Path, class_dirs: dict[int, Path]) -> None:
    """Warn of the folders and files beside the class folders, which no class takes (a COVID/ folder, loose images):
    they had been left out without a word, at any log level."""
    try:
        others = [p for p in sorted(split_dir.iterdir())
                  if not p.name.startswith(".") and p not in class_dirs.values()]
    except OSError:
        return
    folders = [repr(p.name) if p.name != p.name.strip() else p.name for p in others if p.is_dir()]
    files = [p.name for p in others if not p.is_dir()]
    if folders:
        log.warning("%s: ignoring %d folder(s) that are not a class (%s): %s", split_dir, len(folders),
                    ", ".join(CLASS_NAMES), ", ".join(folders[:5]) + (", ..." if len(folders) > 5 else ""))
    if files:
        log.warning("%s: ignoring %d file(s) beside the class folders (an image belongs in NORMAL/ or PNEUMONIA/), "
                    "e.g. %s", split_dir, len(files), files[0])


def npz_pixels(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 (N, H, W) pixels from an ``.npz`` array of N images, (N, H, W) or channels-last (N, H, W, 1 | 3).

    The whole array decides how values become 0..255: uint8 as it is; other integers within 0..255 cast; floats
    within 0..1 (torchvision's ``ToTensor`` convention) times 255, and floats within 0..255 reaching at least 127.5
    cast, each allowing 5 % of the range beyond either end (a bicubic resize overshoots: clipped; it had sent a
    whole array to the per-image stretch, and moved sensitivity from 0.73 to 0.93); anything else (16-bit, wider
    integers, other floats) stretched per image as a 16-bit PNG or DICOM file of it would be
    (:func:`cxr.images.stretch_range`), and said so.
    Three channels become grey with ITU-R 601 luma, as PIL converts colour files. ``where`` names the array in errors.
    """
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        channels = images.shape[-1]
    elif images.ndim == 3:
        channels = 0
    else:
        raise DataError(f"{where}: images must be (N, H, W) or (N, H, W, 1|3), not {images.shape}")
    if 0 in images.shape[1:3]:
        raise DataError(f"{where}: images of {images.shape[1]}x{images.shape[2]} pixels: an image needs at least 1x1")
    if images.dtype.kind not in "uif":
        raise DataError(f"{where}: images of dtype {images.dtype} (need integer or float pixels)")
    if images.dtype == np.uint8 and channels == 0:
        return images
    if images.size == 0:
        return np.zeros(images.shape[:3], np.uint8)
    lo, hi = images.min(), images.max()
    if images.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError(f"{where}: pixel values include NaN or infinity")
    if images.dtype.kind in "ui" and lo >= 0 and hi <= 255:
        mode, scale = "cast", 1.0
    elif images.dtype.kind == "f" and lo >= -0.05 and hi <= 1.05:
        mode, scale = "cast", 255.0
    elif images.dtype.kind == "f" and lo >= -12.75 and 127.5 <= hi <= 267.75:
        # 8-bit values as floats; an array of a small range (z-scores, 0..2) is no such thing, and had been cast to
        # black (AUROC 0.500), where before it was stretched
        mode, scale = "cast", 1.0
    else:
        mode, scale = "stretch", 1.0
        log.warning("%s: pixel values from %g to %g, neither 0..255 nor 0..1: each image is stretched to its own "
                    "range, as a 16-bit PNG or DICOM file is read", where, float(lo), float(hi))
    out = np.empty(images.shape[:3], np.uint8)
    for k in range(0, len(images), 256):  # float32 working copies of a bounded number of images
        x = images[k:k + 256].astype(np.float32)
        if channels == 3:
            x = x @ np.array([0.299, 0.587, 0.114], np.float32)
        elif channels == 1:
            x = x[..., 0]
        if mode == "stretch":  # per image, as a 16-bit PNG or DICOM file of it is read (cxr.images.stretch_range)
            for i in range(len(x)):
                lo_i, hi_i = stretch_range(x[i], row=x.shape[-1])
                x[i] = (x[i] - lo_i) * (255.0 / (hi_i - lo_i)) if hi_i > lo_i else 0
        else:
            x *= scale
        out[k:k + 256] = np.clip(np.rint(x), 0, 255)
    return out


def _csv_dialect(path: Path) -> tuple[list[str], str]:
    """The column names of a CSV file's first line (a byte-order mark left out) and its delimiter: a comma, or the
    semicolon or tab of a header that holds no comma (Excel's CSV in locales whose decimal mark is a comma, a
    tab-separated file named .csv). A workbook or UTF-16 text saved under a .csv name is said to be one."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK\x03\x04"):
            raise UsageError(f"{path}: an Excel workbook (or another zip file), not a CSV: save it as \"CSV UTF-8\"")
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise UsageError(f"{path}: UTF-16 text (Excel's \"Unicode Text\"), not a CSV in UTF-8: save it as \"CSV "
                             "UTF-8\"")
        with open(path, **CSV_READ) as f:
            first = f.readline()
    except (OSError, ValueError) as e:  # not text: UnicodeDecodeError
        raise UsageError(f"{path}: not a readable CSV file ({type(e).__name__}: {e})") from None
    delimiter = next((d for d in (";", "\t") if "," not in first and d in first), ",")
    try:
        return next(csv.reader([first], delimiter=delimiter), []), delimiter
    except csv.Error as e:
        raise UsageError(f"{path}: not a readable CSV file ({e})") from None


def _csv_columns(path: Path) -> list[str]:
    """The column names of a CSV file's first line."""
    return _csv_dialect(path)[0]


def is_split_csv(path: str | os.PathLike) -> bool:
    """Whether a CSV file is a run's ``split.csv`` (by its columns), not a list of images of one's own."""
    return set(SPLIT_CSV_COLUMNS) <= set(_csv_columns(Path(path)))


# The columns of a CSV listing images, by their names with case, spaces and punctuation left out ("Patient ID" is
# patientid): a patient column named otherwise had been ignored without a word, and one patient's images carved into
# both train and val.
_LIST_COLUMNS = {"path": "path", "label": "label", "split": "split", "patient": "patient", "patientid": "patient",
                 "mrn": "patient"}


def _list_column(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def scan_image_list(path: str | os.PathLike, *, patient_pattern: str = "", unsplit: str = "train") -> dict[str, Split]:
    """The splits of a CSV listing images, one a row: a spreadsheet of labels, or images kept in one folder per
    patient or study, used where they are (no class folders of links to make).

    Columns (names in any case, spaces and punctuation aside; others are left alone):

    * ``path``: the image file, relative to the CSV's folder (a link to it followed) or absolute; a relative path
      with backslashes (written on Windows) is read with slashes where only that is there;
    * ``label``: NORMAL or PNEUMONIA (any case), or 0 / 1;
    * ``split`` (if wished): train, val (or validation) or test; ``unsplit`` (train) where the column or cell is
      empty (``cxr evaluate`` names those rows after the CSV, as a folder of class folders is named after itself);
    * ``patient`` (or ``patient id``, ``mrn``; if wished): the patient's id, which keeps a patient's images on one
      side of a carved validation split; where the column or cell is empty, the id is found as for a file in a class
      folder (:func:`file_patient_id`, the CSV's folder in the place of the class folder). A DICOM header's own
      PatientID (read for a file not named ``.jpg``/``.jpeg``/``.png``) that is not the cell's is counted in one
      warning, the cell used: a spreadsheet sorted on one column only moves cells off their files.

    A row that cannot be read, or two columns of one meaning, is a :class:`UsageError` naming its line or columns;
    labels and splits it cannot read are gathered over the whole file and refused at once, each value with its count
    of rows and first line, as are rows listing a file again (by any path to it) with another label, split or patient.
    Rows listing a file again with the same label, split and patient (RSNA's files have a row a finding box) are
    counted in one warning, the file taken once. Rows of empty cells are passed over (Excel writes ``,,,`` for rows
    once used). Listed files that are not there, or are no regular files, are counted in one warning, naming the
    first's line, and skipped where they are decoded, as an unreadable image is; none there is an error.
    """
    path = Path(path).absolute()
    base = Path(os.path.realpath(path.parent))  # "../img" from the CSV's real folder, as opening it goes
    columns, delimiter = _csv_dialect(path)
    names: dict[str, str] = {}
    for c in columns:
        meaning = _LIST_COLUMNS.get(_list_column(c))
        if meaning in names:
            raise UsageError(f"{path}: columns {names[meaning]!r} and {c!r} both give the {meaning}: keep one")
        if meaning:
            names[meaning] = c
    out: dict[str, list[Sample]] = {}
    first: dict[str, tuple[int, str, str, str]] = {}  # each file's (by its real path) first line, label, split, patient
    again: list[tuple[int, int]] = []  # (line, first line) of a row repeating its file's first one
    conflicts: list[tuple[int, int, str, str]] = []  # (first line, line, path, what differs) of one file's rows
    absent: list[tuple[int, str, str, str]] = []  # (line, file, why, split)
    compared = 0  # rows of a patient cell whose DICOM header names a patient
    from_header = 0  # rows without a patient cell whose DICOM header names one
    other_id: list[tuple[int, str, str]] = []  # (line, cell, header id) of those naming another
    bad: dict[str, dict[str, list[int]]] = {"label": {}, "split": {}}  # each bad value's rows and first line
    try:
        with open(path, **CSV_READ) as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            for row in reader:
                line = reader.line_num

                def cell(column: str, row: dict = row) -> str:
                    value = row.get(names[column]) if column in names else None
                    return value if isinstance(value, str) else ""  # a short row: None; a long one's rest: a list

                if not any(isinstance(v, str) and v.strip() for v in row.values()):
                    continue
                file, label = cell("path"), cell("label").strip().upper()
                if not file.strip() or "\0" in file:
                    raise UsageError(f"{path}, line {line}: no image path" if not file.strip() else
                                     f"{path}, line {line}: a NUL character in the path")
                if label in ("0", "1"):
                    label = CLASS_NAMES[int(label)]
                split = _LISTED_SPLIT_ALIASES.get(cell("split").strip().lower()) if cell("split").strip() else unsplit
                if label not in CLASS_NAMES or split is None:  # gathered, and said at once (the next had waited a run)
                    for column, wrong in (("label", label not in CLASS_NAMES), ("split", split is None)):
                        if wrong:
                            bad[column].setdefault(cell(column), [0, line])[0] += 1
                    continue
                key = _listed_file(base, file)
                real = os.path.realpath(key)
                listed_patient = unicodedata.normalize("NFC", cell("patient").strip())
                if real in first:  # RSNA's row a finding box; or two labels, or one image twice in the training data
                    line0, label0, split0, patient0 = first[real]
                    differ = [said for said, same in ((f"label {label0} then {label}", label0 == label),
                                                      (f"split {split0} then {split}", split0 == split),
                                                      (f"patient {patient0!r} then {listed_patient!r}",
                                                       patient0 == listed_patient)) if not same]
                    if differ:
                        conflicts.append((line0, line, file, ", ".join(differ)))
                    else:
                        again.append((line, line0))
                    continue
                first[real] = (line, label, split, listed_patient)
                try:
                    if not stat.S_ISREG(os.stat(key).st_mode):  # a folder; a FIFO or device had hung the scan
                        absent.append((line, file, "not a regular file", split))
                        continue
                except OSError as e:
                    absent.append((line, file, e.strerror or "not there", split))
                    continue
                patient = listed_patient
                if patient:
                    if Path(key).suffix.lower() not in (".jpg", ".jpeg", ".png"):  # a regular file (above): no FIFO
                        header = dicom_patient_id(key)
                        if header is not None:
                            compared += 1
                            if hospital_id(header) != hospital_id(patient):
                                other_id.append((line, patient, header))
                            elif header != patient:  # the header's own spelling of it (00003 for a cell's 3), so
                                # that the rows that take the header's id meet this one: they had been two patients
                                patient = header
                    patient = LISTED_PATIENT + patient
                else:  # a file elsewhere (absolute, or by ../) by its whole path: its name alone had been its id
                    below = key.startswith(os.path.join(str(base), ""))
                    patient = file_patient_id(Path(key), base if below else Path(Path(key).anchor), patient_pattern)
                    from_header += patient.startswith(_DICOM_PATIENT)
                out.setdefault(split, []).append(Sample(key, CLASS_NAMES.index(label), patient))
    except (OSError, ValueError, csv.Error) as e:
        raise UsageError(f"{path}: not a readable CSV file ({type(e).__name__}: {e})") from None
    refused = [_bad_values(column, bad[column], expected) for column, expected in
               (("label", "NORMAL or PNEUMONIA (any case), or 0 or 1"), ("split", "train, val or test")) if bad[column]]
    if conflicts:
        named = "; ".join(f"lines {a} and {b}: {file} is listed twice, {what}" for a, b, file, what in conflicts[:2])
        more = f"; and {len(conflicts) - 2} more" if len(conflicts) > 2 else ""
        refused.append(f"{len(conflicts)} row{'s list' if len(conflicts) > 1 else ' lists'} a file already listed with "
                       f"another label, split or patient ({named}{more}): a file has one label, split and patient")
    if refused:
        raise UsageError(f"{path}: {'; '.join(refused)}")
    if again:
        line, line0 = again[0]
        log.warning("%s: %d row%s a file already listed with the same label, split and patient (first: line %d, as "
                    "line %d): each file is taken once", path, len(again), "s list" if len(again) > 1 else " lists",
                    line, line0)
    if other_id:  # a spreadsheet sorted on one column only: its patients, and maybe labels, on other files
        line, in_cell, in_header = other_id[0]
        every = len(other_id) == compared > 1
        why = ("as in an export whose header ids were replaced (anonymised)" if every else
               "a spreadsheet sorted on one column only moves cells off their files (labels too?)")
        if from_header:  # two sets of ids, which meet nowhere: one patient's images on both sides of the carve
            n = from_header
            why += (f"; and the {n} row{'s' if n > 1 else ''} without a cell take{'' if n > 1 else 's'} the header's "
                    "PatientID, which the cells do not match: one patient's images may fall on both sides of the "
                    "carved validation split; fill the column on every row, or on none")
        elif every:
            why += ", probably harmless"
        log.warning("%s: the DICOM header's PatientID differs from the patient cell on %s %d rows compared (first: "
                    "line %d, cell %r, header %r): %s; the patient cell is used", path,
                    "every one of its" if every else f"{len(other_id)} of its", compared, line, in_cell, in_header,
                    why)
    listed = sum(map(len, out.values())) + len(absent)
    if not listed:
        raise DataError(f"{path}: lists no images")
    if not any(out.values()):
        line, file, why, _ = absent[0]
        raise DataError(f"{path}: none of its {listed} images can be read (line {line}: {file}: {why}; a relative "
                        f"path is read from the CSV's folder, {base})")
    splits = {name: Split(name, out[name]) for name in [*SPLITS, *sorted(set(out) - set(SPLITS))] if out.get(name)}
    for line, file, why, split in absent:
        if split in splits:
            splits[split].not_found.append((_listed_file(base, file), f"line {line}: {why}"))
    if absent:
        line, file, why, _ = absent[0]
        # Those of a split with no file there have no split to be listed under: named here, every one (the warning
        # had said all were listed in the results)
        alone = [(line, file, split) for line, file, _, split in absent if split not in splits]
        unlisted = ("; each is listed under not_found in summary.json or metrics.json" if not alone else
                    f"; {len(alone)} of them, of split{'s' if len({a[2] for a in alone}) > 1 else ''} "
                    f"{', '.join(sorted({a[2] for a in alone}))} with no file there, are named here only "
                    f"({', '.join(f'line {n}: {f}' for n, f, _ in alone[:5])}{', ...' if len(alone) > 5 else ''}), "
                    "the others under not_found in summary.json or metrics.json")
        log.warning("%s: %d of its %d listed images are left out, not there or no regular files (line %d: %s: %s)%s",
                    path, len(absent), listed, line, file, why, unlisted)
    return splits


def _bad_values(column: str, values: dict[str, list[int]], expected: str, most: int = 5) -> str:
    """The bad values of a column of a CSV listing images, each with its count of rows and first line (at most
    ``most`` named), and what was expected: ``label 'No Finding' on 31 rows (first line 4), ...: expected ...``."""
    said = []
    for value, (rows, line) in list(values.items())[:most]:
        where = f"(first line {line})" if rows > 1 else f"(line {line})"
        said.append(f"{value!r} on {rows} {where}" if said else
                    f"{column} {value!r} on {rows} row{'s' if rows > 1 else ''} {where}")
    more = f", and {len(values) - most} more" if len(values) > most else ""
    return f"{', '.join(said)}{more}: expected {expected}"


def listed_files(path: str | os.PathLike) -> list[str]:
    """The files a CSV lists in its ``path`` column (read as :func:`scan_image_list` reads it, relative to the CSV's
    folder; other columns, a label among them, left alone), in its order: ``cxr predict worklist.csv``. Files not
    there are listed all the same (their rows say so when they are read)."""
    path = Path(path).absolute()
    base = Path(os.path.realpath(path.parent))
    columns, delimiter = _csv_dialect(path)
    column = next((c for c in columns if _LIST_COLUMNS.get(_list_column(c)) == "path"), None)
    if column is None:
        raise UsageError(f"{path}: a CSV of images to predict needs a path column; it has "
                         f"{', '.join(map(repr, columns)) or 'none'}")
    try:
        with open(path, **CSV_READ) as f:
            cells = [(row.get(column) or "") for row in csv.DictReader(f, delimiter=delimiter)]
    except (OSError, ValueError, csv.Error) as e:
        raise UsageError(f"{path}: not a readable CSV file ({type(e).__name__}: {e})") from None
    if any("\0" in c for c in cells):
        raise UsageError(f"{path}: a NUL character in a path")
    files, seen, again = [], set(), 0
    for c in cells:
        if c.strip():
            file = _listed_file(base, c)
            real = os.path.realpath(file)
            if real in seen:  # RSNA's row a finding box: predicted and counted twice
                again += 1
                continue
            seen.add(real)
            files.append(file)
    if again:
        log.warning("%s: %d row(s) list a file already listed: each file is predicted once", path, again)
    return files


def _listed_file(base: Path, file: str) -> str:
    """The file a CSV listing images names: relative to ``base``, or absolute; with slashes for a Windows path's
    backslashes, or without spaces around it, where only that is there."""
    def full(name: str) -> str:
        return os.path.normpath(name if os.path.isabs(name) else base / name)

    first = full(file)
    if os.path.lexists(first):
        return first
    for other in (file.strip(), file.replace("\\", "/"), file.strip().replace("\\", "/")):
        if other != file and os.path.lexists(full(other)):
            return full(other)
    # RSNA's files list a patientId, the stem of its file: "<id>.dcm" (a UID's last part is no extension: image_stem)
    stem = file.strip().replace("\\", "/")
    if image_stem(stem) == stem and os.path.lexists(full(stem + ".dcm")):
        return full(stem + ".dcm")
    return first


def refind_files(recorded: dict[str, list[Sample]], found: dict[str, Split],
                 cache_dir: str | os.PathLike | None = None) -> tuple[dict[str, list[Sample]], int]:
    """Recorded image files that are not where split.csv says, found again among ``found`` by their content digest:
    a CSV listing images moved with them, where the move cannot be told from the paths (the CSV reached through a
    link, or listing them by ``../``; a run had found them all gone). ``found``'s files are hashed only when some are
    missing (through the digest memo of ``cache_dir``). Returns the rows and how many moved."""
    here = {s.path for split in found.values() for s in split.samples}
    if all(s.path in here or not s.digest for samples in recorded.values() for s in samples):
        return recorded, 0
    taken = {s.path for samples in recorded.values() for s in samples if s.path in here}
    free: dict[str, list[str]] = {}
    for split in found.values():
        for s in add_digests(split, cache_dir).samples:
            if s.path not in taken and s.digest and s.digest != EMPTY_DIGEST:
                free.setdefault(s.digest, []).append(s.path)
    moved = 0
    out: dict[str, list[Sample]] = {}
    for name, samples in recorded.items():
        out[name] = []
        for s in samples:
            if s.path not in here and free.get(s.digest):
                s = replace(s, path=free[s.digest].pop(0))
                moved += 1
            out[name].append(s)
    return out, moved


def refind_rows(recorded: dict[str, list[Sample]], found: dict[str, Split]) -> tuple[dict[str, list[Sample]], int]:
    """A run's recorded rows of an ``.npz`` found again by their pixels' digest where the row at the recorded index
    holds other pixels now (the arrays reordered, or rows taken out, since): mapped by index, a resumed run had gone
    on with other images than it had, images it had trained on in its validation split, under a warning that they
    "changed". Returns the rows (each at the path of the row that holds its pixels now) and how many moved.

    Rows whose pixels are nowhere in ``found`` stay as recorded (said to have changed, as an edited file is), unless
    others moved: then a row's index means nothing, and that is a :class:`DataError`.
    """
    here = {s.path: s.digest for split in found.values() for s in split.samples}

    def in_place(s: Sample) -> bool:
        return not s.digest or here.get(s.path) == s.digest

    every = [s for samples in recorded.values() for s in samples]
    taken = {s.path for s in every if in_place(s)}
    free: dict[tuple[str, str], list[str]] = {}  # (file, digest) -> the rows holding those pixels, not yet taken
    for split in found.values():
        for s in split.samples:
            row = npz_row(s.path)
            if row is not None and s.path not in taken:
                free.setdefault((row[0], s.digest), []).append(s.path)
    moved, lost = 0, []
    out: dict[str, list[Sample]] = {}
    for name, samples in recorded.items():
        out[name] = []
        for s in samples:
            row = npz_row(s.path)
            if row is not None and not in_place(s):
                if free.get((row[0], s.digest)):
                    s = replace(s, path=free[(row[0], s.digest)].pop(0))
                    moved += 1
                else:
                    lost.append(s.path)
            out[name].append(s)
    if moved and lost:
        raise DataError(f"{npz_row(lost[0])[0]}: its rows are in another order than the run recorded, and {len(lost)} "
                        f"recorded row(s) hold pixels found nowhere in it now (e.g. {lost[0]}): start a new run")
    return out, moved


def _scan_split_csv(path: Path) -> dict[str, Split]:
    """The splits a run recorded in its ``split.csv``: a carved validation split is no folder, and this is the one way
    to score it again (with another model, threshold or machine). The files are read and hashed afresh."""
    try:
        recorded = read_split_csv(path)
    except (OSError, KeyError, ValueError) as e:
        raise UsageError(f"{path}: not a split.csv of a cxr run (columns split, path, label, patient, sha256): "
                         f"{type(e).__name__}: {e}") from None
    if not recorded:
        raise DataError(f"{path}: lists no images")
    recorded = follow_moved_data(path, recorded)
    files = {row[0] for samples in recorded.values() for s in samples if (row := npz_row(s.path)) is not None}
    if files:
        return _scan_recorded_rows(path, recorded, files)
    every = [s.path for samples in recorded.values() for s in samples]
    if not any(_may_be_there(p) for p in every):  # one line, not one warning an image and "none could be read"
        raise DataError(f"{path}: none of its {len(every)} images is where it says (e.g. {every[0]}); if the data "
                        f"moved, set data: in {path.parent / 'config.yaml'} to where it is now, and they are read "
                        "there")
    order = [n for n in SPLITS if n in recorded] + sorted(set(recorded) - set(SPLITS))
    # Digests cleared: the files are hashed again, so that one changed since the run is decoded as it is now (and
    # said to have changed: `recorded`).
    return {name: Split(name, [replace(s, digest="") for s in recorded[name]],
                        recorded={s.path: s.digest for s in recorded[name] if s.digest}) for name in order}


def _scan_recorded_rows(path: Path, recorded: dict[str, list[Sample]], files: set[str]) -> dict[str, Split]:
    """A split.csv of a run trained on an ``.npz``: its rows read from the ``.npz`` again, found by their pixels'
    digests where the arrays were reordered since (a carved validation split can be scored again this way only;
    this had been refused)."""
    every = [s for samples in recorded.values() for s in samples]
    if len(files) > 1 or any(npz_row(s.path) is None for s in every):
        raise UsageError(f"{path}: lists rows of {len(files)} .npz file(s) and other files; a run's split.csv lists "
                         "images of one data set")
    (file,) = files
    if not os.path.isfile(file):
        raise DataError(f"{path}: its images are rows of {file}, which is not there; if the data moved, set data: in "
                        f"{path.parent / 'config.yaml'} to where it is now, and they are read there")
    found = _scan_npz(Path(file))
    recorded, moved = refind_rows(recorded, found)
    if moved:
        log.warning("%s: %d of its rows are at other indices in %s now (the arrays reordered since): each is read "
                    "where its pixels are", path, moved, file)
    by_path = {s.path: (name, i) for name, split in found.items() for i, s in enumerate(split.samples)}
    missing = [s.path for samples in recorded.values() for s in samples if s.path not in by_path]
    if missing:
        raise DataError(f"{path}: {len(missing)} of its rows are not in {file} now (it holds fewer), e.g. "
                        f"{missing[0]}")
    order = [n for n in SPLITS if n in recorded] + sorted(set(recorded) - set(SPLITS))
    splits = {}
    for name in order:
        sources = [by_path[s.path] for s in recorded[name]]
        images = np.stack([found[src].images[i] for src, i in sources]) if sources else None
        splits[name] = Split(name, [found[src].samples[i] for src, i in sources], images,
                             recorded={s.path: s.digest for s in recorded[name] if s.digest})
    return splits


def _may_be_there(path: str) -> bool:
    """False only where ``path`` is surely not there (not where it cannot be read: that is said when it is read)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def rebase(path: str, old: str, new: str) -> str:
    """``path`` below the folder ``old`` as the same path below ``new`` (a data set that moved); others as they are.
    For CSV files listing images, ``path`` below the folder of ``old`` as below the folder of ``new`` (moved with its
    images, a run had found them all gone)."""
    if old.lower().endswith(".csv") and new.lower().endswith(".csv"):
        old, new = os.path.dirname(old), os.path.realpath(os.path.dirname(new))
    rest = path[len(old):]
    return new + rest if path.startswith(old) and rest[:1] in ("/", "\\", "#") else path


def follow_moved_data(split_csv: Path, recorded: dict[str, list[Sample]]) -> dict[str, list[Sample]]:
    """A run's split.csv whose images are not where it says, read where the run's ``config.yaml`` now says its data
    is (edited after the data moved), from where its ``summary.json`` says the data was: as ``cxr train --resume``
    follows it, which writes split.csv anew; before any resume, evaluate had found every image gone."""
    def there(path: str) -> bool:  # a row of an .npz is there where its file is (its own "path" never exists)
        row = npz_row(path)
        return os.path.exists(row[0] if row is not None else path)

    every = [s.path for samples in recorded.values() for s in samples]
    if all(there(p) for p in every):
        return recorded
    try:
        old = json.loads((split_csv.parent / "summary.json").read_text(encoding="utf-8"))["data"]
        new = (yaml.safe_load((split_csv.parent / "config.yaml").read_text(encoding="utf-8")) or {})["data"]
        old, new = str(Path(old).absolute()), str(Path(new).absolute())
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return recorded
    if old == new or not os.path.exists(new):
        return recorded
    moved = {name: [replace(s, path=rebase(s.path, old, new)) for s in samples] for name, samples in recorded.items()}
    if new.lower().endswith(".csv"):
        # listed through a link, or by ../: where the files went cannot be told from the paths; found by content (a
        # CSV that cannot be read is said where it is read as data, not here)
        with contextlib.suppress(CxrError):
            if not is_split_csv(new):
                moved, _ = refind_files(moved, scan_image_list(new))
    found = sum(there(s.path) for samples in moved.values() for s in samples)
    if found <= sum(there(p) for p in every):
        return recorded
    log.info("%s: its images are read below %s, where the run's config.yaml says its data is now (it was %s)",
             split_csv, os.path.dirname(new) if new.lower().endswith(".csv") else new,
             os.path.dirname(old) if old.lower().endswith(".csv") else old)
    return moved


def _scan_npz(path: Path) -> dict[str, Split]:
    import zipfile

    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        # numpy's message for a file that is no .npy or .npz suggests allow_pickle=True: advice to run what a pickle
        # holds, not cxr's to pass on
        reason = "not a NumPy file" if "allow_pickle" in str(e) else str(e)
        raise DataError(f"{path}: not a readable .npz file ({reason})") from None
    splits = {}
    if not isinstance(npz, np.lib.npyio.NpzFile):  # np.load reads a .npy (one array) too, whatever the suffix
        raise DataError(f"{path}: holds one array (a .npy file), not the named arrays of an .npz (train_images, "
                        "train_labels, ...)")
    with npz:
        # A key cxr does not read (test_image, validation_images) had been passed over without a word, and its split
        # with it.
        known = {f"{name}_{kind}" for name in SPLITS for kind in ("images", "labels")}
        other = sorted(k for k in npz.files if k not in known
                       or k.endswith("_labels") and k.removesuffix("_labels") + "_images" not in npz.files)
        if other:
            log.warning("%s: ignoring %s (cxr reads %s)", path, ", ".join(other),
                        ", ".join(f"{name}_images/_labels" for name in SPLITS))
        for name in SPLITS:
            if f"{name}_images" not in npz.files:
                continue
            if f"{name}_labels" not in npz.files:
                raise DataError(f"{path}: has {name}_images but no {name}_labels")
            arrays = {}
            for key in (f"{name}_images", f"{name}_labels"):
                try:  # members are read (and decompressed) here: a damaged archive shows up now, named
                    arrays[key] = np.asarray(npz[key])
                except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                    raise DataError(f"{path}: cannot read {key} ({e})") from None
            images, labels = arrays[f"{name}_images"], arrays[f"{name}_labels"]
            if labels.ndim > 1 and labels.size != len(labels):
                # one-hot or multi-label (ChestMNIST's 14 columns) had been "N images but 2N labels"
                raise DataError(f"{path}: {name}_labels has shape {labels.shape}: cxr needs one label per image, 0 "
                                "(NORMAL) or 1 (PNEUMONIA), shaped (N,) or (N, 1)")
            labels = labels.reshape(-1)
            if images.ndim == 0:  # len() of a 0-d array had ended in a traceback
                raise DataError(f"{path}: {name}_images is a single value, not an array of images")
            if len(images) != len(labels):
                raise DataError(f"{path}: {len(images)} {name}_images but {len(labels)} {name}_labels")
            if not len(labels):
                raise DataError(f"{path}: {name}_images holds no images")
            if labels.dtype.kind not in "uifb" or not set(np.unique(labels).tolist()) <= {0, 1}:
                raise DataError(f"{path}: {name}_labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
            images = npz_pixels(images, f"{path}: {name}_images")
            # Each row's digest, so that a carved validation split keeps byte-identical images on one side.
            samples = [Sample(f"{path}#{name}/{i}", int(y), f"{name}/{i}", hashlib.sha256(im.tobytes()).hexdigest())
                       for i, (y, im) in enumerate(zip(labels, images, strict=True))]
            splits[name] = Split(name, samples, images)
    if not splits:
        raise DataError(f"{path}: no <split>_images keys (expected any of {', '.join(s + '_images' for s in SPLITS)})")
    return splits


def check_output_outside_data(output: str | os.PathLike, data: str | os.PathLike) -> None:
    """Refuse an output folder that is the dataset's root or inside one of its splits or class folders: a run or
    evaluation wrote its files among the data, and its pictures would be scanned as X-rays the next time.

    Folders are compared by identity (device and inode), not by name: on a case-insensitive file system (macOS,
    Windows) ``DATA/Train`` is ``data/train``, and a split or class folder that is a link is where it leads (the scan
    follows it). ``--data`` a split folder (``DATA/test``) guards the dataset it belongs to as well."""
    out, root = Path(output).resolve(), Path(data).resolve()
    if root.is_file():
        return  # an .npz or a split.csv: no folder of images to write into
    folders = set(_SPLIT_ALIASES) | {c.lower() for c in CLASS_NAMES}  # names as _split_of and class_of_folder read them
    # The output and each of its folders that exist, each with the name of the one below it (the output's own first).
    names = ["", out.name, *(p.name for p in out.parents)]
    chain = [(_folder_id(p), below) for p, below in zip([out, *out.parents], names, strict=False)]
    roots = [root] + ([root.parent] if root.name.strip().lower() in folders else [])
    tops = [d for r in roots for d in _children(r) if d.name.strip().lower() in folders and _is_dir(d)]
    # and every folder the scan reaches below them: one that is a link (a class folder, a patient's) leads elsewhere,
    # and an output below its target was scanned as X-rays by the next run (its report's pictures in training)
    guarded = {i for d in tops for i in _folders_reached(d)} - {None}
    within = any(i in guarded for i, _ in chain)
    same = _folder_id(root)
    if same is not None and chain[0][0] == same:
        raise UsageError(f"--output {output}: the dataset itself; give a folder outside the data, say "
                         f"{root.parent / 'runs' / root.name}")
    if within or any(same is not None and i == same and below.strip().lower() in folders for i, below in chain[1:]):
        raise UsageError(f"--output {output}: inside a folder of --data; give a folder outside the data, say "
                         f"{roots[-1].parent / 'runs' / roots[-1].name}")


def _folders_reached(top: Path) -> set:
    """The identities (:func:`_folder_id`) of ``top`` and every folder below it that the scan walks (links followed,
    hidden folders left out, as :func:`walk_files` does), each once, so a link loop ends."""
    seen: set = set()
    for folder, dirs, _ in os.walk(top, followlinks=True):
        here = _folder_id(Path(folder))
        if here in seen:
            dirs[:] = []
            continue
        seen.add(here)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return seen


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a folder that can be listed but not entered: Python 3.11's is_dir raises
        return False


def _children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def scan(root: str | os.PathLike, *, require_both_classes: bool = True, patient_pattern: str = "",
         unsplit: str = "train") -> dict[str, Split]:
    """Find the splits of a dataset root, a single split folder or an ``.npz`` (see the module docstring).
    ``patient_pattern``: see :func:`file_patient_id`; ``unsplit``: the split of a CSV listing's rows that name none
    (:func:`scan_image_list`)."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such file or directory")
    # Absolute paths in split.csv and predictions_<split>.csv, so reports and resumes work from any directory.
    root = root.absolute()
    if root.is_file():
        if root.suffix.lower() == ".csv":
            if is_split_csv(root):
                return _scan_split_csv(root)
            columns = _csv_columns(root)
            if {"path", "label"} <= {_LIST_COLUMNS.get(_list_column(c)) for c in columns}:  # as scan_image_list reads
                return scan_image_list(root, patient_pattern=patient_pattern, unsplit=unsplit)
            raise UsageError(f"{root}: a CSV of images needs the columns path and label (split and patient if wished), "
                             f"or is a run's split.csv; it has {', '.join(map(repr, columns)) or 'none'}")
        if root.suffix.lower() != ".npz":
            raise UsageError(f"{root}: expected a folder, an .npz file, a CSV listing images or a run's split.csv")
        return _scan_npz(root)
    subdirs = sorted(c for c in root.iterdir() if c.is_dir())
    split_dirs: dict[str, Path] = {}
    for d in subdirs:
        name = _split_of(d.name)
        if name in split_dirs:  # val and validation: one would be dropped, which one decided by the listing order
            raise DataError(f"{root}: two folders for split {name}, {split_dirs[name].name} and {d.name}; merge them "
                            "into one")
        if name:
            split_dirs[name] = d
    if split_dirs:
        return {name: scan_folder(split_dirs[name], name, require_both_classes=require_both_classes,
                                  patient_pattern=patient_pattern)
                for name in SPLITS if name in split_dirs}
    if any(class_of_folder(d.name) is not None for d in subdirs):
        # One split, named after its folder: "data", not ".." for --data ..; a name that is not UTF-8 escaped, as
        # it is a key of metrics.json, a file name (predictions_<split>.csv) and a title in the report.
        name = valid_utf8((root.resolve() if root.name in ("", "..") else root).name)
        return {name: scan_folder(root, name, require_both_classes=require_both_classes,
                                  patient_pattern=patient_pattern)}
    # The Kaggle archive unpacks to chest_xray/chest_xray/ (and __MACOSX/ beside it): name the folder one level down
    # that holds the data, and what was seen here.
    below = [d for d in subdirs if not d.name.startswith((".", "__MACOSX"))
             and any(_is_dir(e) and (_split_of(e.name) or class_of_folder(e.name) is not None) for e in _children(d))]
    hint = f"; the data seems to be one folder down: --data {below[0]}" if len(below) == 1 else ""
    seen = f"only {', '.join(sorted(d.name for d in subdirs)[:8])}" if subdirs else "no folders at all"
    raise DataError(f"{root}: found neither split folders (train/val/test) nor class folders (NORMAL/PNEUMONIA), "
                    f"{seen}{hint}")


def add_digests(split: Split, cache_dir: str | os.PathLike | None = None) -> Split:
    """Fill in each file sample's content digest (array sources carry theirs from :func:`scan`: their pixels').

    With ``cache_dir``, a file whose ``stat()`` has not changed since it was hashed takes its digest from the
    cache's :class:`DigestMemo` instead of being read again, and the digests computed here are remembered there. A
    file that cannot be read gets an empty digest: its decode, later, reports why and skips it.
    """
    if split.images is not None:
        return split
    todo = [s.path for s in split.samples if not s.digest]
    if not todo:
        return split
    memo = DigestMemo(cache_dir) if cache_dir is not None else None
    known = memo.get(todo) if memo is not None else {}

    def one(path: str) -> tuple[str, StatKey | None]:
        try:
            st = os.stat(path)
            key = stat_key(st)
            if path in known and known[path][0] == key:
                return known[path][1], None
            return file_digest(path), key if settled(st) else None
        except OSError:
            return "", None

    if len(todo) >= 64:
        # Hashing, reading and stat() release the GIL, so threads use every core without starting processes.
        with ThreadPoolExecutor(max_workers=min(usable_cores(), 8)) as pool:
            found = dict(zip(todo, pool.map(one, todo), strict=True))
    else:
        found = {path: one(path) for path in todo}
    if memo is not None:
        memo.put((path, key, digest) for path, (digest, key) in found.items() if key is not None and digest)
    return replace(split, samples=[replace(s, digest=s.digest or found[s.path][0]) for s in split.samples])


# ------------------------------------------------------------------------------------------ the digest memo
#
# Content digests key the cache, and a digest means reading every byte of the file: at 1 GB/s about 17 minutes per
# terabyte of full-resolution X-rays, on every run and on every rank, although the cache already holds the pixels.
# The memo remembers each file's digest beside what stat() said of it when it was hashed (size, modification and
# change times in ns, inode, device), as git's index does: a file whose stat() still says the same is not read again.
# Writing the file, copying or moving another over it, or touching it changes one of those fields, and it is hashed
# again. A file changed within the same clock tick as the stat() that preceded its hashing could keep an identical
# stat(), so files modified less than two seconds before they were hashed are not remembered ("racy" entries in git).

StatKey = tuple[int, int, int, int, int]
_MEMO_FILE = "digests.sqlite"
_RACY_NS = 2_000_000_000  # two seconds: FAT's timestamp granularity, the coarsest in use
_memo_warned: set[str] = set()


def stat_key(st: os.stat_result) -> StatKey:
    """What must be unchanged for a remembered digest to be trusted."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def settled(st: os.stat_result) -> bool:
    """Whether a file last changed long enough ago that its digest may be remembered (see the note above)."""
    return max(st.st_mtime_ns, st.st_ctime_ns) < time.time_ns() - _RACY_NS


class DigestMemo:
    """SHA-256 digests of files remembered by their ``stat()``, in ``CACHE_DIR/digests.sqlite``.

    SQLite (in the standard library) because several runs may share one cache folder: its locking lets them read
    and write the memo at once. The memo only saves work: when it cannot be read or written (a read-only or damaged
    file, a file system without working locks) cxr says so once and hashes the files instead.
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.path = Path(cache_dir) / _MEMO_FILE

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=60)
        con.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, stat TEXT NOT NULL, "
                    "sha256 TEXT NOT NULL)")
        return con

    def _unusable(self, e: Exception) -> None:
        if str(self.path) not in _memo_warned:
            _memo_warned.add(str(self.path))
            own_warning(log, "digest memo %s not usable (%s): hashing every file instead", self.path, e)

    def get(self, paths: Sequence[str]) -> dict[str, tuple[StatKey, str]]:
        """The remembered (stat key, digest) of each of ``paths`` the memo holds."""
        absolute = {_memo_key(p): p for p in paths}
        found: dict[str, tuple[StatKey, str]] = {}
        try:
            with contextlib.closing(self._connect()) as con:
                keys = list(absolute)
                for k in range(0, len(keys), 500):  # SQLite caps the number of parameters of one statement
                    chunk = keys[k:k + 500]
                    rows = con.execute(f"SELECT path, stat, sha256 FROM digests WHERE path IN "
                                       f"({','.join('?' * len(chunk))})", chunk)
                    for path, stat, digest in rows:
                        found[absolute[path]] = (tuple(int(v) for v in stat.split(":")), digest)
        except (sqlite3.Error, OSError, ValueError) as e:
            self._unusable(e)
            return {}
        return found

    def put(self, entries: Iterable[tuple[str, StatKey, str]]) -> None:
        """Remember (path, stat key, digest) entries, replacing what the memo held for those paths."""
        rows = [(_memo_key(p), ":".join(map(str, key)), digest) for p, key, digest in entries]
        if not rows:
            return
        try:
            with contextlib.closing(self._connect()) as con, con:
                con.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?)", rows)
        except (sqlite3.Error, OSError, ValueError) as e:
            self._unusable(e)


def _memo_key(path: str) -> bytes:
    """A file's key in the memo: its absolute path as the file system's bytes. As text, a name that is not valid UTF-8
    (bytes from another system's encoding) cannot be stored, and ended every run after its last image. (Text keys
    that an older cxr stored are simply never found again, and those files hashed once more.)"""
    return os.fsencode(os.path.abspath(path))


def _groups(samples: Sequence[Sample]) -> np.ndarray:
    """Group index per sample: same patient or byte-identical content means same group (union-find). A DICOM file
    whose patient came from its header and whose name is an unambiguous Kermany one (``person12_...``,
    ``NORMAL2-IM-...``) joins that name's patient too: either id may be the one that ties images together (a per-file
    anonymised PatientID in Kermany-named files had let 18 patients straddle the split). A bare ``IM-0001-0001.dcm`` is
    OsiriX's series 1 of any patient: not joined."""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, s in enumerate(samples):
        named = _unambiguous_kermany_patient(Path(s.path).name) if s.patient.startswith(_DICOM_PATIENT) else None
        for key in (("patient", patient_key(s.patient)), ("digest", s.digest), ("patient", named or "")):
            if key[1] in ("", EMPTY_DIGEST):  # empty files are alike, and no picture of anyone
                continue
            j = first.setdefault(key, i)
            parent[find(i)] = find(j)
    return np.array([find(i) for i in range(len(samples))])


EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()  # of every empty file: no image, so no copy of another


def _digest_or_blank(path: str) -> str:
    """A file's SHA-256, or "" where it cannot be read (its decode, later, says why; the carve must not stop on it)."""
    try:
        return file_digest(path)
    except OSError:
        return ""


def validation_folds(fraction: float, max_folds: int = 20) -> tuple[int, int]:
    """(m, n): the carved validation split is ``m`` of ``n`` folds. One fold of ``round(1 / fraction)`` where that is
    within 0.01 of ``fraction`` (0.15 is 1 of 7, 0.2 is 1 of 5: the carve of earlier cxr versions); else the fewest
    folds, up to ``max_folds``, whose ``m / n`` is within 0.01 (0.3 is 3 of 10, 0.4 is 2 of 5); else the nearest
    ``m / n`` there is. One fold of ``round(1 / fraction)`` alone had made 0.4 a half. Each fold needs a patient of
    each class, so the carve passes the rarer class's patient count as ``max_folds``."""
    n = max(2, round(1 / fraction))
    if abs(1 / n - fraction) <= 0.01 and n <= max(2, max_folds):
        return 1, n
    options = [(m, k) for k in range(2, max(2, min(20, max_folds)) + 1) for m in range(1, k)]
    close = [mk for mk in options if abs(mk[0] / mk[1] - fraction) <= 0.01]
    if close:
        return min(close, key=lambda mk: (mk[1], abs(mk[0] / mk[1] - fraction)))
    return min(options, key=lambda mk: (abs(mk[0] / mk[1] - fraction), mk[1]))


def _merged_by_name_hint(pool: Sequence[Sample]) -> str:
    """Where one patient id read from file names (Kermany's rule) spans folders of other names, or both classes, the
    likely cause of too few patients, and what to do: OsiriX and Horos export ``<patient>/IM-0001-0001.jpg`` in every
    patient's folder, which the rule made one patient (20 patients of both classes had been "only 1 NORMAL patient",
    with no word of why)."""
    spread: dict[str, tuple[set[str], set[int]]] = {}
    for s in pool:
        if not s.patient.startswith((_DICOM_PATIENT, PATTERN_PATIENT)) and _name_patient(Path(s.path).name):
            folders, labels = spread.setdefault(s.patient, (set(), set()))
            folders.add(Path(s.path).parent.name)
            labels.add(s.label)
    wide = [(p, f, lab) for p, (f, lab) in spread.items() if len(f) > 1 or len(lab) > 1]
    if not wide:
        return ""
    patient, folders, labels = max(wide, key=lambda w: len(w[1]))
    return (f"; {len(wide)} patient id(s) read from file names span several folders or both classes ({patient} in "
            f"{len(folders)} folders{', both classes' if len(labels) > 1 else ''}): file names such as "
            "IM-0001-0001.jpg repeat in every patient's folder (an OsiriX or Horos export); set --patient-pattern to "
            "the part of the path that names the patient ('^([^/]+)/' for one folder per patient)")


def carve_validation(pool: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split ``pool`` into (train, val): class-stratified, and patient-disjoint.

    Images of one patient, and byte-identical images, always land on the same side. Uses scikit-learn's
    ``StratifiedGroupKFold`` and keeps the first ``m`` of its ``n`` folds as validation (:func:`validation_folds`).
    Samples without a digest (straight from :func:`scan`) are hashed here, so that copies are known; the returned
    samples carry their digests.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if not (isinstance(fraction, numbers.Real) and 0 < fraction <= 0.5):  # NaN too
        raise UsageError(f"validation fraction must be above 0 and at most 0.5, got {fraction!r}")
    if not (isinstance(seed, numbers.Integral) and 0 <= seed < 2**32):
        raise UsageError(f"split seed must be a whole number from 0 to 2**32 - 1, got {seed!r}")
    # Without digests no copies are grouped: 31 byte-identical pairs had straddled the split, under a warning that
    # said they were kept together.
    pool = [s if s.digest else replace(s, digest=_digest_or_blank(s.path)) for s in pool]
    labels = np.array([s.label for s in pool])
    groups = _groups(pool)
    per_class = [len(np.unique(groups[labels == label])) for label in range(len(CLASS_NAMES))]
    n_val_folds, n_splits = validation_folds(fraction, max_folds=min(per_class))
    for cls, n_groups in zip(CLASS_NAMES, per_class, strict=True):
        if not n_groups:  # a one-class .npz had been told of "only 0 NORMAL patients" and folds
            raise DataError(f"no {cls} image among the {len(pool)} to carve a validation split from: training needs "
                            "images of both classes")
        # Too few patients for folds near the fraction asked (1 of 4 for 1/7, say) is refused, not carved as another.
        # (1e-9: 1/5 - 0.15 is 0.05000000000000002, and 5 patients a class had been refused for 0.15)
        if n_groups < n_splits or abs(n_val_folds / n_splits - fraction) > 0.05 + 1e-9:
            label = CLASS_NAMES.index(cls)
            from_headers = sum(s.patient.startswith(_DICOM_PATIENT) for s in pool if s.label == label)
            hint = (f"; {from_headers} of its images take their patient from a DICOM PatientID: where an anonymiser "
                    "gave them all one, set --patient-pattern to say which part of the path names the patient")\
                if from_headers else _merged_by_name_hint(pool)
            raise DataError(f"only {n_groups} {cls} patients: too few to carve a validation split of {fraction:.0%} "
                            f"({n_val_folds} of {n_splits} folds, each holding patients of both classes; use the "
                            "dataset's own val split with --val-source folder: a val/ folder, val_images in an .npz, "
                            f"or rows of split val in a CSV listing){hint}")
    # Counted whether or not such ids collide: unrelated patients' IMG_0001.jpg had once shared an id, which hid this
    # warning while one patient's images landed on both sides.
    unnamed = sum(patient_from_name_only(s) for s in pool)
    rows = sum(npz_row(s.path) is not None for s in pool)
    if not unnamed:
        log.info("every patient id comes from a Kermany-style file name, a DICOM PatientID, patient_pattern or a "
                 "CSV's patient column: the validation split is patient-disjoint")
    elif rows == unnamed:  # patient_pattern reads paths, and an array's rows have none
        log.warning("the %d images of an .npz carry no patient ids, so the carved validation split is only "
                    "image-disjoint (byte-identical images are kept together), and validation results will be "
                    "optimistic where one patient has several images; where the data set has its own validation split, "
                    "use it with --val-source folder", rows)
    else:
        log.warning("%d of %d images have no patient id from a Kermany-style file name (person12_virus_3.jpeg), a "
                    "DICOM file's PatientID or the config's patient_pattern: each is taken as its own patient, so for "
                    "them the carved validation split is only image-disjoint (byte-identical images are kept "
                    "together), and validation results will be optimistic where one patient has several images. Set "
                    "patient_pattern (\"^([^/]+)/\" for one folder per patient), list the images in a CSV with a "
                    "patient column, or split by patient yourself and use --val-source folder", unnamed, len(pool))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = splitter.split(np.zeros(len(pool)), labels, groups)
    val_idx = set(np.concatenate([next(folds)[1] for _ in range(n_val_folds)]).tolist())
    share = len(val_idx) / len(pool)
    if abs(share - fraction) > 0.05 + 1e-9:
        # One id over much of the data (an anonymiser's ANONYMOUS on 40 of 60 files) had carved 3 images of 60 for
        # validation, on which the threshold was then chosen, without a word.
        ids, counts = np.unique(groups, return_counts=True)
        big = ids[np.argmax(counts)]
        members = [s for s, g in zip(pool, groups, strict=True) if g == big]
        said = (f"the carved validation split holds {len(val_idx)} of the {len(pool)} images ({100 * share:.0f}%), "
                f"not about {100 * fraction:.0f}%")
        # one patient large enough to explain it, and far larger than most (not 2 images among patients of 1 or 2)
        if len(members) / len(pool) >= abs(share - fraction) and len(members) >= 3 * np.median(counts):
            log.warning("%s: patients are kept whole, and the largest, %s, has %d images (%.0f%%)%s; where one id "
                        "stands for many patients (an anonymiser's placeholder), set --patient-pattern or give the "
                        "patients in a CSV's patient column", said, members[0].patient, len(members),
                        100 * len(members) / len(pool), " of both classes" if len({s.label for s in members}) > 1
                        else "")
        else:  # few images: folds of whole patients come in uneven sizes (16 images had always been warned of)
            log.info("%s: its %d folds hold whole patients, and so few images come in uneven folds", said, n_splits)
    return ([s for i, s in enumerate(pool) if i not in val_idx],
            [s for i, s in enumerate(pool) if i in val_idx])


def write_split_csv(path: str | os.PathLike, splits: dict[str, list[Sample]]) -> None:
    """Record which image went to which split, so that a run can be repeated (``RUN_DIR/split.csv``)."""
    with atomic_path(path) as tmp, open(tmp, "w", **CSV_TEXT) as f:
        w = csv.writer(f)
        w.writerow(SPLIT_CSV_COLUMNS)
        for name, samples in splits.items():
            for s in samples:
                w.writerow([name, s.path, CLASS_NAMES[s.label], _patient_cell(s.patient), s.digest])


def _patient_cell(patient: str) -> str:
    """A patient id as split.csv's cell: one that a spreadsheet would run as a formula (a file ``=HYPERLINK(...).png``
    is its own patient) gets a leading ``'``, as does one that begins with ``'``, so that reading takes exactly one
    back off (the paths are absolute, which no spreadsheet reads as a formula)."""
    return "'" + patient if patient.startswith((*FORMULA_START, "'")) else patient


def read_split_csv(path: str | os.PathLike) -> dict[str, list[Sample]]:
    """Read a ``split.csv`` written by :func:`write_split_csv`. A row that is not whole (a short or hand-edited line:
    a cell missing, a label other than NORMAL or PNEUMONIA, a NUL in a path) is a UsageError naming the file and its
    line; they had ended in tracebacks of their own."""
    out: dict[str, list[Sample]] = {}
    with open(path, **CSV_READ) as f:
        reader = csv.DictReader(f)
        if not set(SPLIT_CSV_COLUMNS) <= set(reader.fieldnames or ()):
            raise UsageError(f"{path}: not a split.csv of a cxr run (columns split, path, label, patient, sha256; it "
                             f"has {', '.join(reader.fieldnames or ()) or 'none'})")
        for row in reader:
            cells = [row.get(k) for k in SPLIT_CSV_COLUMNS]
            if any(c is None for c in cells) or not cells[0] or not cells[1] or "\0" in cells[1] \
                    or cells[2] not in CLASS_NAMES:
                raise UsageError(f"{path}, line {reader.line_num}: not a row of a split.csv (split, path, label "
                                 f"NORMAL or PNEUMONIA, patient, sha256), got {list(row.values())!r}")
            split, file, label, patient, digest = cells
            # NFC, as file_patient_id gives them now: a run of before wrote a macOS folder's NFD name, and its test
            # images of those training patients had gone uncounted.
            patient = unicodedata.normalize("NFC", patient[1:] if patient.startswith("'") else patient)
            out.setdefault(split, []).append(Sample(file, CLASS_NAMES.index(label), patient, digest))
    return out


# ---------------------------------------------------------------------------------------------- the cache
#
# A cache folder holds packs: each pack is one ``.npy`` file with the images of one chunk of a build. Its array is
# 1-D uint8: the k images' SHA-256 digests (32 bytes each) first, then their k pixel arrays (size x size each), so a
# lookup reads only the front of each pack. One file per chunk instead of one per image: creating a small file cost
# 0.07 to 0.9 ms on the benchmark machine's ext4, up to a fifth of a draft image's time (BENCHMARKS.md, figure 1),
# and costs milliseconds on the network file systems of clusters.

_DIGEST_BYTES = 32
_PACK_IMAGES = 64  # images per pack at most: the work an interrupted build can lose per worker


def cache_folder(cfg: Config) -> Path:
    """Cache entries for one set of preprocessing parameters live together; a change starts a new folder.

    ``max_pixels`` decides which images are refused, not their pixels, but an entry is served without decoding
    again: a limit lowered after the cache was filled had refused nothing. A limit other than the default has a
    folder of its own (the default's keeps its name, so no cache is built again)."""
    limit = "" if cfg.max_pixels == DEFAULT_MAX_PIXELS else f"-max{cfg.max_pixels}"
    return Path(cfg.cache_dir) / f"v{PREPROCESS_VERSION}-size{cfg.image_size}-{'draft' if cfg.draft else 'full'}{limit}"


def end_with_parent(main: int | None = None) -> None:
    """Initializer of worker processes: end when the process that started them ends. Killed alone (the OOM killer, a
    SIGKILL or SIGTERM to the main process, a container stopped), it had left its cache-building workers waiting on
    their queue for good, 400 MB each, holding the run's lock (inherited by fork): ``--resume`` was refused until
    they were found and killed. Linux ends them at once (``PR_SET_PDEATHSIG``); elsewhere a thread sees the parent
    gone within half a second. ``main``: the process that made the pool, watched too: under the forkserver start
    method (Python 3.14's default on Linux) a worker's parent is the fork server, which outlived it.

    Ctrl-C is the main process's to handle (it cancels the work, and the workers end with it): a worker that took
    the terminal's SIGINT had died with a traceback, and its broken pool could reach the main process before its own
    KeyboardInterrupt, said as a worker "killed (out of memory?)", exit 1 (3 of 19 tries)."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # there, another user's (PermissionError)
            return True
        try:  # a zombie, killed but not yet reaped by its own parent, answers os.kill too
            return Path(f"/proc/{pid}/stat").read_text(encoding="latin-1").rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True

    def watch() -> None:
        while os.getppid() == parent and (main is None or alive(main)):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="cxr-end-with-parent", daemon=True).start()


def _read_pack(path: Path, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A pack's (digests (k, 32), images (k, size, size)), memory-mapped; None for a file that is not a whole pack.

    Raises:
        OSError: the file could not be read or mapped now (gone, no permission, no memory): not the pack's fault,
            and no reason to remove it.
    """
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError):  # the file is damaged: numpy's "cannot reshape", "not a pickle", a bad header;
        # EOFError: empty (0 bytes, a file never written out before a power cut), which had ended the run
        return None
    row = _DIGEST_BYTES + size * size
    if arr.dtype != np.uint8 or arr.ndim != 1 or arr.size == 0 or arr.size % row:
        return None
    k = arr.size // row
    return arr[: k * _DIGEST_BYTES].reshape(k, _DIGEST_BYTES), arr[k * _DIGEST_BYTES:].reshape(k, size, size)


def _packs(folder: Path) -> list[Path]:
    """The folder's finished packs (temporary files start with a dot and are never read)."""
    try:
        return sorted(p for p in folder.iterdir() if p.suffix == ".npy" and not p.name.startswith("."))
    except OSError:  # no cache yet
        return []


def cache_lookup(folder: Path, size: int, digests: set[str]) -> dict[str, tuple[Path, int]]:
    """Where each of ``digests`` that the cache holds is stored: digest -> (pack, row). Damaged packs are skipped."""
    found: dict[str, tuple[Path, int]] = {}
    for path in _packs(folder):
        try:
            pack = _read_pack(path, size)
        except OSError as e:  # kept: a valid pack that cannot be mapped now (a memory limit) had been removed
            log.debug("cache pack %s cannot be read now (%s): skipped", path, e)
            continue
        if pack is None:  # cut short (or not a pack): said and removed, as a pack whose checksum fails is (README)
            own_warning(log, "cache pack %s is damaged (not a whole pack: cut short?): removed; any of its images "
                        "needed are decoded again", path)
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        for row, raw in enumerate(pack[0]):
            digest = raw.tobytes().hex()
            if digest in digests:
                found.setdefault(digest, (path, row))
    return found


def _write_pack(folder: Path, digests: Sequence[str], images: Sequence[np.ndarray]) -> Path:
    """Store decoded images as one pack: a temporary file renamed into place, so an interrupted build leaves no pack
    a later run would trust. Its name comes from its digests, so two runs caching the same chunk write one pack, and
    ends in the CRC-32 of its contents (:func:`_pack_is_whole`). Not fsynced: a pack is cheap to rebuild, and its size
    and checksum are checked when read. The temporary name is random and made exclusively (``mkstemp``), so two runs
    filling one cache do not collide: one named by the process id had collided between containers sharing a cache
    volume, whose processes have the same ids, and one build had truncated the other's pack as it was read.
    """
    k, size = len(images), images[0].shape[0]
    blob = np.empty(k * (_DIGEST_BYTES + size * size), np.uint8)
    blob[: k * _DIGEST_BYTES] = np.frombuffer(b"".join(bytes.fromhex(d) for d in digests), np.uint8)
    np.stack(images, out=blob[k * _DIGEST_BYTES:].reshape(k, size, size))
    name = hashlib.sha256("".join(digests).encode()).hexdigest()[:32]
    path = folder / f"{name}-{zlib.crc32(blob):08x}.npy"
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            np.save(f, blob, allow_pickle=False)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would keep a shared cache's packs from its other users
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise WriteError.from_os_error(path, e) from e
    return path


def _cache_chunk(chunk: list[tuple[int, str, str]], folder: str, size: int, draft: bool, max_pixels: int
                 ) -> tuple[str, list[tuple[int, str, str, StatKey | None]], np.ndarray | None]:
    """Decode one chunk of images and store them as one pack (runs in a worker process).

    ``chunk`` holds (index in the split, path, digest or ""). Each file is read once: its bytes are hashed when the
    digest is not known yet, and decoded from memory. Returns the pack's path ("" when nothing decoded) and
    (index, digest, error, stat key) per image, the decoded ones first and in pack order; the stat key, taken before
    the read, comes with a digest computed here that the digest memo may keep (else None). The pixels travel through
    the pack, not the pipe, unless ``folder`` is "" (no writable cache): then they come back as a third item.
    """
    done, failed, digests, images = [], [], [], []
    for i, path, digest in chunk:
        key = None
        try:
            if not digest:
                with contextlib.suppress(OSError):  # read_file says what is wrong with the file
                    st = os.stat(path)
                    key = stat_key(st) if settled(st) else None
            data = read_file(path)
            # Always the digest of the bytes decoded here: one given by the caller was computed earlier (a memo, or
            # a split made before the build), and a file replaced meanwhile would otherwise file its pixels under
            # the old content's digest, for good, served to every later file with that content.
            digest = hashlib.sha256(data).hexdigest()
            images.append(load_image(data, size, name=path, max_pixels=max_pixels, draft=draft))
        except ImageError as e:
            failed.append((i, digest, str(e), key))
            continue
        digests.append(digest)
        done.append((i, digest, "", key))
    if not folder:
        return "", done + failed, np.stack(images) if images else None
    try:
        pack = str(_write_pack(Path(folder), digests, images)) if images else ""
    except OSError:  # the cache's disk is full (it was writable when checked): these pixels come back by the pipe
        return "", done + failed, np.stack(images)
    return pack, done + failed, None


_full_warned: set[str] = set()  # cache folders already said to be full (or to refuse a pack's write)
_unwritable_warned: set[str] = set()  # cache folders already said to be unwritable: once a process, not once a split


def _cache_writable(folder: Path) -> bool:
    """Whether cache packs can be written in ``folder``; if not, say so (once per folder and process), and images
    are decoded without it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        cache = str(folder.parent if folder.name == "splits" else folder)  # the packs' folder, or its splits/ inside
        if cache not in _unwritable_warned:
            _unwritable_warned.add(cache)
            own_warning(log, "cannot write to the image cache %s (%s): decoding without it, so again on every run; set "
                        "--cache-dir or CXR_CACHE_DIR to a writable folder", folder, e.strerror or e)
        return False
    return True


def prepare(split: Split, cfg: Config, *, workers: int | None = None, out: Path | None = None) -> Prepared:
    """Decode and resize every image of ``split`` to ``cfg.image_size``, through the on-disk cache.

    Entries are keyed by file content (SHA-256) and preprocessing parameters, so renamed or copied files
    reuse them and an edited file or a changed parameter is decoded again. Unreadable images are skipped
    with a warning and listed in ``failures``. The returned samples carry their digests: on a cold cache, samples
    that came without one are hashed in the workers, from the bytes they decode.

    With ``out`` (a file split: see :func:`prepare_shared`), the pixels go into that ``.npy`` file instead of memory,
    written under a temporary name and renamed into place once whole; the returned images map it. Rows past the
    readable images' count are left unused.
    """
    size = cfg.image_size
    n = len(split.samples)
    # Every image goes straight into one preallocated array, so the peak is the data's size once, not twice.
    if out is None or n == 0:
        return _fill(split, cfg, np.empty((n, size, size), np.uint8), workers)
    # Never read: not a finished .npy name. Random, not the process id alone, which containers sharing a cache volume
    # have alike: one build's file had been truncated by the other's, and the loser removed the winner's .npy.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size))
        # The file is sparse until written: reserve its blocks now, so that a full disk is an error here and not a
        # SIGBUS (the process killed without a word) when a page of the mapping is first written.
        if hasattr(os, "posix_fallocate"):  # not on macOS or Windows, where a full disk is found as pages are written
            with open(tmp, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        prepared = _fill(split, cfg, images, workers)
        images.flush()
        # Every reference to the mapping goes before the rename: Windows refuses to rename a mapped file.
        prepared = replace(prepared, images=None)
        del images
        os.replace(tmp, out)
    except WriteError:
        raise
    except OSError as e:
        raise WriteError.from_os_error(out, e) from e
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return replace(prepared, images=np.load(out, mmap_mode="c")[:len(prepared.labels)])


def _fill(split: Split, cfg: Config, images: np.ndarray, workers: int | None) -> Prepared:
    """:func:`prepare`'s work, into ``images`` (N, S, S); returns the Prepared split with its rows (compacted)."""
    size = cfg.image_size
    n = len(split.samples)
    failures: list[tuple[str, str]] = []
    if split.images is not None:
        digests = [s.digest for s in split.samples]
        ok = np.ones(n, dtype=bool)
        for i, im in enumerate(split.images):
            try:
                check_not_blank(im, split.samples[i].path)  # as a blank file is: the model calls them PNEUMONIA
            except ImageError as e:
                ok[i] = False
                failures.append((split.samples[i].path, str(e)))
                log.warning("skipping unreadable image: %s", e)
                continue
            images[i] = resize_square(im, size)
        return _compact(split, images, ok, digests, failures)

    folder = cache_folder(cfg)
    warm = bool(_packs(folder))
    if warm and not all(s.digest for s in split.samples):
        # A lookup needs every digest (remembered ones are not read again); on a cold cache the workers hash instead.
        split = add_digests(split, cfg.cache_dir)
    digests = [s.digest for s in split.samples]
    ok = np.zeros(n, dtype=bool)
    by_pack: dict[Path, list[tuple[int, int]]] = {}
    found = cache_lookup(folder, size, {d for d in digests if d}) if warm else {}
    for i, d in enumerate(digests):
        if d in found:
            pack, row = found[d]
            by_pack.setdefault(pack, []).append((i, row))
    for pack, rows in by_pack.items():
        try:
            whole = _copy_from_pack(pack, size, rows, images, ok)
        except OSError as e:  # gone since the lookup, or not readable now: decoded again, the pack left alone
            log.debug("cache pack %s cannot be read now (%s): its images are decoded again", pack, e)
            continue
        if not whole:
            # Damaged on disk (or gone since the lookup): its images are decoded again, into a new pack.
            own_warning(log, "cache pack %s is damaged (its checksum or size is not what was written): its %d image(s) "
                        "are decoded again", pack, len(rows))
            with contextlib.suppress(OSError):
                pack.unlink()
    todo = [(i, s.path, s.digest) for i, s in enumerate(split.samples) if not ok[i]]

    if todo:
        workers = workers or min(usable_cores(), 8)
        # Small chunks balance the workers; large ones amortise a pack's file (64 images: about 3 MB at 224 px).
        per_chunk = max(8, min(_PACK_IMAGES, -(-len(todo) // (4 * workers))))
        chunks = [todo[k:k + per_chunk] for k in range(0, len(todo), per_chunk)]
        store = _cache_writable(folder)
        spec = (str(folder) if store else "", size, cfg.draft, cfg.max_pixels)
        pool = None
        if workers > 1 and len(todo) >= 32:
            # Workers only run PIL and NumPy (never torch), so the platform's default start method is safe.
            pool = ProcessPoolExecutor(max_workers=workers, initializer=end_with_parent, initargs=(os.getpid(),))
            results = pool.map(_cache_chunk, chunks, *([x] * len(chunks) for x in spec))
        else:
            results = (_cache_chunk(chunk, *spec) for chunk in chunks)
        paths = [s.path for s in split.samples]
        hashed: list[tuple[str, StatKey, str]] = []
        try:
            with progress_bar(f"caching {split.name}", total=len(todo), unit="img") as bar:
                for pack, outcome, pixels in results:
                    stored = [(i, row) for row, (i, _, error, _) in enumerate(outcome) if not error]
                    if stored and pack:
                        try:
                            copied = _copy_from_pack(Path(pack), size, stored, images, ok)
                        except OSError:  # gone: another process cleaning the cache (it had ended the run)
                            copied = False
                        if not copied:
                            # just written by a worker, and removed or changed since: decoded again, here
                            log.warning("cache pack %s was removed or changed as soon as it was written (another "
                                        "process cleaning the cache?): its %d image(s) are decoded again", pack,
                                        len(stored))
                            chunk = [(i, paths[i], outcome[row][1]) for i, row in stored]
                            _, redone, pixels = _cache_chunk(chunk, "", size, cfg.draft, cfg.max_pixels)
                            if any(error for _, _, error, _ in redone):
                                raise DataError(f"cache pack {pack} vanished or is damaged while in use, and its "
                                                "images could not be decoded again; run again")
                            for (i, _), picture in zip(stored, pixels, strict=True):
                                images[i], ok[i] = picture, True
                    elif stored:  # no writable cache: the pixels came back with the outcome
                        if store and str(folder) not in _full_warned:  # once a process, not once a split
                            _full_warned.add(str(folder))
                            own_warning(log, "could not write to the image cache %s (disk full?): decoding without it "
                                        "where it fails; free space or set --cache-dir", folder)
                        for i, row in stored:
                            images[i], ok[i] = pixels[row], True
                    for i, digest, error, key in outcome:
                        digests[i] = digest
                        if key is not None and digest:
                            hashed.append((paths[i], key, digest))
                        if error:
                            failures.append((paths[i], error))
                            log.warning("skipping unreadable image: %s", error)
                    bar.advance(len(outcome))
        except BrokenProcessPool:
            raise CxrError(f"the worker processes decoding {split.name}'s images stopped: one was killed (out of "
                           "memory?), or, on macOS and Windows, a script calling cxr lacks its guard: `if __name__ "
                           "== '__main__':` (the workers import the script again)") from None
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        if store:
            DigestMemo(cfg.cache_dir).put(hashed)  # the next run's lookup need not read these files again
    return _compact(split, images, ok, digests, failures)


def _compact(split: Split, images: np.ndarray, ok: np.ndarray, digests: list[str],
             failures: list[tuple[str, str]]) -> Prepared:
    """The Prepared split of the rows that were read (``ok``)."""
    n = len(split.samples)
    rows = np.flatnonzero(ok)
    if len(rows) < n:  # close the gaps of unreadable images in place (rows only move forward)
        for dst, src in enumerate(rows):
            if dst != src:
                images[dst] = images[src]
        images = images[:len(rows)]
    kept = [replace(split.samples[i], digest=digests[i]) for i in rows]
    labels = np.array([s.label for s in kept], np.int64)
    return Prepared(split.name, images, labels, kept, failures)


def prepare_shared(split: Split, cfg: Config, *, build: bool) -> Prepared:
    """:func:`prepare` for the processes of one node (the ranks of a torchrun): the pixels once per node, not per rank.

    The process with ``build`` prepares the split into one ``.npy`` file in the cache folder (``splits/``, named from
    the split's name, paths and digests), with a JSON file beside it for the rows and the unreadable images; every
    process then maps that file copy-on-write, never writing it, so the node's page cache holds the pixels once and
    each process's own memory holds none of them. The other processes must start after the builder has finished
    (:func:`cxr.distributed.local_main_first`); one that finds no file (the builder failed) prepares in memory. A
    later run of the same split (``--resume``, or the same data and split again) maps the file already there: delete
    ``splits/`` when no run uses it to get the disk space back. Array sources (``.npz``) are prepared in memory.
    """
    if split.images is not None or not split.samples:
        return prepare(split, cfg)
    if build and not _cache_writable(cache_folder(cfg) / "splits"):
        return prepare(split, cfg)
    split = add_digests(split, cfg.cache_dir)
    # max_pixels decides which images are refused, so a file made under another limit is another split's.
    name = hashlib.sha256(json.dumps([split.name, cfg.max_pixels, [[s.path, s.digest] for s in split.samples]]
                                     ).encode()).hexdigest()
    npy = cache_folder(cfg) / "splits" / f"{name[:32]}.npy"
    meta = npy.with_suffix(".json")
    shared = _open_shared(split, cfg, npy, meta)
    if shared is not None:  # built by this node's first process, or by an earlier run of the same split
        return shared
    if not build:
        own_warning(log, "no shared copy of the %s split in %s: preparing it in this process", split.name, npy.parent)
        return prepare(split, cfg)
    written = False  # the .npy put in place by this process: only then is it this process's to remove
    try:
        prepared = prepare(split, cfg, out=npy)
        written = True
        index = {s.path: i for i, s in enumerate(split.samples)}
        record = {"kept": [[index[s.path], s.digest] for s in prepared.samples], "failures": prepared.failures,
                  "crc32": _pixels_crc(prepared.images)}
        with atomic_path(meta, fsync=False) as tmp:  # written last: its presence says the .npy is whole
            tmp.write_text(json.dumps(record), encoding="utf-8")
    except WriteError as e:  # a full disk, say: each process prepares its own copy, as without torchrun
        own_warning(log, "cannot write the shared copy of the %s split (%s): every process prepares its own",
                    split.name, e)
        if written:
            with contextlib.suppress(OSError):
                npy.unlink()
        return prepare(split, cfg)
    return prepared


def _open_shared(split: Split, cfg: Config, npy: Path, meta: Path) -> Prepared | None:
    """The split as :func:`prepare_shared` stored it, mapped; None when it is not there or not whole.

    Every process checks the pixels against the CRC-32 recorded beside them, reading the file once: bytes changed on
    disk with the size kept had been trained on as they were (a zeroed file gave all-blank images, and the run ended
    well). ``zlib.crc32`` ran at 2.3 GB/s over 100 MB in memory (one core of a shared 2-core machine): 0.1 s for
    Kermany's 5,216 training images at 224 px, about 20 s a process for a million (plus reading them from disk).
    """
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
        images = np.load(npy, mmap_mode="c")
        kept = [replace(split.samples[i], digest=d) for i, d in record["kept"]]
        failures = [(path, reason) for path, reason in record["failures"]]
        if images.shape[1:] != (cfg.image_size, cfg.image_size) or len(images) < len(kept):
            raise ValueError(f"it holds an array of shape {images.shape}")
        images = images[:len(kept)]
        if "crc32" not in record:  # made by a cxr before the checksum: nothing to tell its pixels by
            raise ValueError("it has no checksum (made by an earlier cxr): it is made again")
        if _pixels_crc(images) != record["crc32"]:
            raise ValueError("its pixels are not what was written: their CRC-32 differs")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        own_warning(log, "ignoring the damaged shared copy %s (%s)", npy, e)
        return None
    return Prepared(split.name, images, np.array([s.label for s in kept], np.int64), kept, failures)


def _pixels_crc(images: np.ndarray) -> str:
    """CRC-32 of a split's pixels, as 8 hex digits, read a few thousand rows at a time (a mapped file stays mapped)."""
    crc = 0
    for start in range(0, len(images), 4096):
        crc = zlib.crc32(np.ascontiguousarray(images[start:start + 4096]), crc)
    return f"{crc:08x}"


def _pack_is_whole(pack: Path, read: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether a pack's contents are what was written: the CRC-32 its name ends in (``<name>-<crc>.npy``; packs of
    a cxr before session 20 carry none and are taken as they are). Bytes changed on disk with the size kept had been
    served as the images' pixels for good."""
    stem = pack.stem
    crc = stem.rpartition("-")[2] if "-" in stem else ""
    if len(crc) != 8:
        return True
    whole = zlib.crc32(read[0]) if read[0].size else 0
    whole = zlib.crc32(read[1], whole)
    return f"{whole:08x}" == crc


def _copy_from_pack(pack: Path, size: int, rows: list[tuple[int, int]], images: np.ndarray, ok: np.ndarray) -> bool:
    """Copy pack rows into ``images`` (``rows``: (index in images, row in the pack)) and mark them ``ok``; False, and
    nothing copied, where the pack is cut short or not what was written (its checksum); OSError where it cannot be
    read now."""
    read = _read_pack(pack, size)
    if read is None or not _pack_is_whole(pack, read):
        return False
    for i, row in rows:
        images[i] = read[1][row]
        ok[i] = True
    return True


# ------------------------------------------------------------------------------------------- torch datasets


def train_transform(cfg: Config):
    """Random augmentation for training, applied to one uint8 (1, S, S) tensor.

    Small affine changes (rotation, shift, scale) and brightness/contrast: the variation between X-ray
    machines and positioning. No vertical flip (never seen in practice) and no horizontal flip by default
    (a mirrored chest puts the heart on the right; set ``hflip: true`` to allow it).
    """
    import_torchvision()  # torchvision without torch._dynamo (cxr.tv)
    from torchvision.transforms import v2

    ops = [
        v2.RandomAffine(degrees=cfg.rotation, translate=(cfg.translate, cfg.translate),
                        scale=(cfg.scale_min, cfg.scale_max), interpolation=v2.InterpolationMode.BILINEAR),
        v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast),
    ]
    if cfg.hflip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops)


class XrayDataset:
    """Map-style dataset over a :class:`Prepared` split: yields (uint8 tensor (1, S, S), label).

    Normalisation happens on the device, batch-wise (see :func:`cxr.model.normalize`), so batches stay uint8
    until then. The random augmentation of image ``i`` in an epoch is seeded by ``(seed, epoch, i)``: the same
    whichever process, loader worker or batch draws it, so a run under torchrun sees the same augmented images as
    a single process, and a resumed run the same as an uninterrupted one.
    """

    def __init__(self, prepared: Prepared, transform=None, seed: int = 0):
        import torch

        self.images = torch.from_numpy(prepared.images)
        self.labels = torch.from_numpy(prepared.labels)
        self.transform = transform
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of ``epoch`` (call before each epoch's loader is iterated)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        import torch

        x = self.images[i].unsqueeze(0)
        if self.transform is not None:
            # One image is too small to share between threads: with the process's intra-op threads (one per core),
            # each small op of the augmentation waits at a barrier for a thread the OS may not be running. On the
            # shared 2-core benchmark machine the loader was 2.9x faster pinned to one thread at a load of 5-6 and
            # no slower at 2-3, for the same pixels (BENCHMARKS.md, figure 2). Loader workers have 1 thread anyway.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
                    # Modulo 2**64, torch's seed range: a --seed from 1,844,675 on overflowed it at the first batch.
                    # Below, the value and so every augmentation are unchanged.
                    torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i)) % 2**64)
                    x = self.transform(x)
            finally:
                torch.set_num_threads(threads)
        return x, self.labels[i]

"""Datasets: find the images, carve a patient-disjoint validation split, decode each image once into a cache.

Data flows one way: files -> :func:`scan` (records, no pixels) -> :func:`carve_validation` (which record goes
where) -> :func:`prepare` (cached uint8 arrays, one per split) -> :class:`XrayDataset` (tensors, augmented
for training only).

Layouts read by :func:`scan`:

* a dataset root ``DIR/{train,val,test}/{NORMAL,PNEUMONIA}/...`` (any subset of splits; names case-insensitive);
* a single split folder ``DIR/{NORMAL,PNEUMONIA}/...``, keyed by its own name (e.g. ``test``);
* a MedMNIST-style ``.npz`` with ``<split>_images`` and ``<split>_labels`` for any of the three splits.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cxr.config import CLASS_NAMES, Config
from cxr.errors import DataError, UsageError, WriteError
from cxr.fileio import atomic_path
from cxr.images import IMAGE_EXTENSIONS, ImageError, load_image, read_file, resize_square
from cxr.progress import progress_bar
from cxr.tv import import_torchvision

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

# Bumped whenever decoding or resizing changes, so that old cache entries are never trusted.
PREPROCESS_VERSION = 1

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


def patient_id(filename: str) -> str:
    """Patient id from a Kermany file name (``person12_virus_3`` -> ``person12``); the stem if none matches."""
    stem = Path(filename).stem
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(stem)
        if m:
            return m.group(1)
    return stem


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex): the cache key and the duplicate detector."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _class_dirs(split_dir: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for child in split_dir.iterdir():
        if child.is_dir() and child.name.upper() in CLASS_NAMES:
            found[CLASS_NAMES.index(child.name.upper())] = child
    return found


def _list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files under ``folder`` (recursive, sorted) and the other files, which are ignored."""
    images, other = [], []
    for p in sorted(folder.rglob("*")):
        if p.name.startswith(".") or not p.is_file():
            continue
        (images if p.suffix.lower() in IMAGE_EXTENSIONS else other).append(p)
    return images, other


def scan_folder(split_dir: Path, name: str, *, require_both_classes: bool = True) -> Split:
    """Records of one split folder with class sub-folders.

    Raises:
        DataError: a class folder is missing or holds no image files (unless ``require_both_classes`` is
            False, in which case at least one class must have images).
    """
    dirs = _class_dirs(split_dir)
    samples: list[Sample] = []
    problems = []
    for label, cls in enumerate(CLASS_NAMES):
        if label not in dirs:
            problems.append(f"{split_dir}: class folder {cls}/ is missing")
            continue
        images, other = _list_images(dirs[label])
        if other:
            log.warning("%s: ignoring %d file(s) without an image extension (%s), e.g. %s", dirs[label], len(other),
                        ", ".join(sorted(IMAGE_EXTENSIONS)), other[0].name)
        if not images:
            problems.append(f"{dirs[label]}: class folder holds no image files")
        samples += [Sample(str(p), label, patient_id(p.name)) for p in images]
    if problems and (require_both_classes or not samples):
        raise DataError("; ".join(problems))
    for p in problems:
        log.warning(p)
    return Split(name, samples)


def _scan_npz(path: Path) -> dict[str, Split]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    splits = {}
    with npz:
        for name in SPLITS:
            if f"{name}_images" not in npz.files:
                continue
            if f"{name}_labels" not in npz.files:
                raise DataError(f"{path}: has {name}_images but no {name}_labels")
            images = np.asarray(npz[f"{name}_images"])
            labels = np.asarray(npz[f"{name}_labels"]).reshape(-1).astype(np.int64)
            if images.ndim == 4 and images.shape[-1] in (1, 3):
                images = images.mean(axis=-1) if images.shape[-1] == 3 else images[..., 0]
            if images.ndim != 3 or len(images) != len(labels):
                raise DataError(f"{path}: {name}_images must be (N, H, W) with N matching {name}_labels")
            if not set(np.unique(labels)) <= {0, 1}:
                raise DataError(f"{path}: {name}_labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
            images = images.astype(np.uint8) if images.dtype != np.uint8 else images
            samples = [Sample(f"{path}#{name}/{i}", int(y), f"{name}/{i}") for i, y in enumerate(labels)]
            splits[name] = Split(name, samples, images)
    if not splits:
        raise DataError(f"{path}: no <split>_images keys (expected any of {', '.join(s + '_images' for s in SPLITS)})")
    return splits


def scan(root: str | os.PathLike, *, require_both_classes: bool = True) -> dict[str, Split]:
    """Find the splits of a dataset root, a single split folder or an ``.npz`` (see the module docstring)."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such file or directory")
    # Absolute paths in split.csv and predictions_<split>.csv, so reports and resumes work from any directory.
    root = root.absolute()
    if root.is_file():
        if root.suffix.lower() != ".npz":
            raise UsageError(f"{root}: expected a folder or an .npz file")
        return _scan_npz(root)
    subdirs = {c.name.lower(): c for c in root.iterdir() if c.is_dir()}
    split_dirs = {_SPLIT_ALIASES[n]: d for n, d in subdirs.items() if n in _SPLIT_ALIASES}
    if split_dirs:
        return {name: scan_folder(split_dirs[name], name, require_both_classes=require_both_classes)
                for name in SPLITS if name in split_dirs}
    if any(n.upper() in CLASS_NAMES for n in subdirs):
        return {root.name: scan_folder(root, root.name, require_both_classes=require_both_classes)}
    raise DataError(f"{root}: found neither split folders (train/val/test) nor class folders (NORMAL/PNEUMONIA)")


def add_digests(split: Split) -> Split:
    """Fill in each file sample's content digest (array sources keep an empty digest)."""
    if split.images is not None:
        return split
    todo = [s.path for s in split.samples if not s.digest]
    if len(todo) >= 64:
        # Hashing and reading release the GIL, so threads use every core without starting processes.
        with ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 8)) as pool:
            found = dict(zip(todo, pool.map(file_digest, todo), strict=True))
    else:
        found = {path: file_digest(path) for path in todo}
    return replace(split, samples=[replace(s, digest=s.digest or found[s.path]) for s in split.samples])


def _groups(samples: Sequence[Sample]) -> np.ndarray:
    """Group index per sample: same patient or byte-identical content means same group (union-find)."""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, s in enumerate(samples):
        for key in (("patient", s.patient), ("digest", s.digest)):
            if key[1] == "":
                continue
            j = first.setdefault(key, i)
            parent[find(i)] = find(j)
    return np.array([find(i) for i in range(len(samples))])


def carve_validation(pool: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split ``pool`` into (train, val): class-stratified, and patient-disjoint.

    Images of one patient, and byte-identical images, always land on the same side. Uses scikit-learn's
    ``StratifiedGroupKFold`` with ``round(1 / fraction)`` folds and keeps the first fold as validation.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, round(1 / fraction))
    labels = np.array([s.label for s in pool])
    groups = _groups(pool)
    if len(np.unique(groups)) < n_splits:
        raise DataError(f"only {len(np.unique(groups))} patients: too few to carve a validation split "
                        f"of {fraction:.0%} (use the dataset's own val folder with --val-source folder)")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(pool)), labels, groups))
    return [pool[i] for i in sorted(train_idx)], [pool[i] for i in sorted(val_idx)]


def write_split_csv(path: str | os.PathLike, splits: dict[str, list[Sample]]) -> None:
    """Record which image went to which split, so that a run can be repeated (``RUN_DIR/split.csv``)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "path", "label", "patient", "sha256"])
        for name, samples in splits.items():
            for s in samples:
                w.writerow([name, s.path, CLASS_NAMES[s.label], s.patient, s.digest])


def read_split_csv(path: str | os.PathLike) -> dict[str, list[Sample]]:
    """Read a ``split.csv`` written by :func:`write_split_csv`."""
    out: dict[str, list[Sample]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            sample = Sample(row["path"], CLASS_NAMES.index(row["label"]), row["patient"], row["sha256"])
            out.setdefault(row["split"], []).append(sample)
    return out


# ---------------------------------------------------------------------------------------------- the cache


def cache_folder(cfg: Config) -> Path:
    """Cache entries for one set of preprocessing parameters live together; a change starts a new folder."""
    return Path(cfg.cache_dir) / f"v{PREPROCESS_VERSION}-size{cfg.image_size}-{'draft' if cfg.draft else 'full'}"


def _entry_path(folder: Path, digest: str) -> Path:
    return folder / digest[:2] / f"{digest}.npy"


def _cache_job(job: tuple[str, str, str, int, bool, int]) -> tuple[str, str, np.ndarray | None, str]:
    """Fill one cache entry (runs in a worker process). Returns (path, digest, pixels or None, error).

    The file is read once: its bytes are hashed (when the digest is not known yet) and decoded from memory. With
    the digest computed here, an entry another run already made is read back instead of decoded again.
    """
    path, digest, folder, size, draft, max_pixels = job
    try:
        data = read_file(path)
        if not digest:
            digest = hashlib.sha256(data).hexdigest()
            cached = _read_entry(_entry_path(Path(folder), digest), size)
            if cached is not None:
                return path, digest, cached, ""
        pixels = load_image(data, size, name=path, max_pixels=max_pixels, draft=draft)
    except ImageError as e:
        return path, digest, None, str(e)
    _write_entry(_entry_path(Path(folder), digest), pixels)
    return path, digest, pixels, ""


def _write_entry(entry: Path, pixels: np.ndarray) -> None:
    """Store one entry: a temporary file renamed into place, so an interrupted build leaves no entry a later run
    would trust. Not fsynced: an entry is cheap to rebuild and its shape and type are checked when read
    (:func:`_read_entry`), while the flush took as long as the decoding (BENCHMARKS.md, figure 1). Still atomic
    against a killed process. The temporary name holds the process id, so two runs filling one cache do not collide.
    """
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        if not entry.parent.is_dir():
            entry.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, pixels, allow_pickle=False)
        os.replace(tmp, entry)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise WriteError.from_os_error(entry, e) from e


def _read_entry(entry: Path, size: int) -> np.ndarray | None:
    try:
        arr = np.load(entry, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.shape == (size, size) and arr.dtype == np.uint8 else None


def prepare(split: Split, cfg: Config, *, workers: int | None = None) -> Prepared:
    """Decode and resize every image of ``split`` to ``cfg.image_size``, through the on-disk cache.

    Entries are keyed by file content (SHA-256) and preprocessing parameters, so renamed or copied files
    reuse them and an edited file or a changed parameter is decoded again. Unreadable images are skipped
    with a warning and listed in ``failures``. The returned samples carry their digests: samples that came without
    one are hashed in the workers, from the bytes they decode.
    """
    size = cfg.image_size
    n = len(split.samples)
    # Every image goes straight into one preallocated array, so the peak is the data's size once, not twice.
    images = np.empty((n, size, size), np.uint8)
    if split.images is not None:
        for i, im in enumerate(split.images):
            images[i] = resize_square(im, size)
        return Prepared(split.name, images, np.array([s.label for s in split.samples], np.int64), split.samples)

    folder = cache_folder(cfg)
    ok = np.zeros(n, dtype=bool)
    digests = [s.digest for s in split.samples]
    jobs, job_rows = [], []
    for i, s in enumerate(split.samples):
        arr = _read_entry(_entry_path(folder, s.digest), size) if s.digest else None
        if arr is not None:
            images[i], ok[i] = arr, True
        else:
            jobs.append((s.path, s.digest, str(folder), size, cfg.draft, cfg.max_pixels))
            job_rows.append(i)

    failures: list[tuple[str, str]] = []
    if jobs:
        workers = workers or min(os.cpu_count() or 1, 8)
        results_iter = map(_cache_job, jobs)
        pool = None
        if workers > 1 and len(jobs) >= 32:
            # Workers only run PIL and NumPy (never torch), so the platform's default start method is safe.
            pool = ProcessPoolExecutor(max_workers=workers)
            results_iter = pool.map(_cache_job, jobs, chunksize=8)
        try:
            with progress_bar(f"caching {split.name}", total=len(jobs), unit="img") as bar:
                for i, (path, digest, arr, error) in zip(job_rows, results_iter, strict=True):
                    if arr is None:
                        failures.append((path, error))
                        log.warning("skipping unreadable image: %s", error)
                    else:
                        images[i], ok[i], digests[i] = arr, True, digest
                    bar.advance()
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    rows = np.flatnonzero(ok)
    if len(rows) < n:  # close the gaps of unreadable images in place (rows only move forward)
        for dst, src in enumerate(rows):
            if dst != src:
                images[dst] = images[src]
        images = images[:len(rows)]
    kept = [replace(split.samples[i], digest=digests[i]) for i in rows]
    labels = np.array([s.label for s in kept], np.int64)
    return Prepared(split.name, images, labels, kept, failures)


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
                    torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i))
                    x = self.transform(x)
            finally:
                torch.set_num_threads(threads)
        return x, self.labels[i]

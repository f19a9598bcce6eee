"""Training: ``train(cfg)`` builds data, model and optimiser, runs epochs, keeps the best checkpoint, evaluates it.

Run directory (``cfg.output``)::

    config.yaml          resolved config
    split.csv            which image went to train / val / test
    history.csv          one row per epoch
    last.pt              checkpoint after the latest epoch, with optimiser state (for --resume)
    best.pt              checkpoint with the lowest validation loss, with the decision threshold
    swa.pt               with swa_epochs: the averaged weights (also best.pt when their validation loss is lowest)
    metrics.json         evaluation of best.pt on train, val (and test)
    predictions_<split>.csv
    summary.json         data counts, unreadable files, stop reason, wall time
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import hashlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxr.config import CLASS_NAMES, Config, default_cache_dir, load_config, save_config, usable_cores
from cxr.data import (
    EMPTY_DIGEST,
    PATTERN_PATIENT,
    PREPROCESS_VERSION,
    SPLITS,
    Prepared,
    Sample,
    Split,
    XrayDataset,
    add_digests,
    carve_validation,
    check_output_outside_data,
    class_of_folder,
    is_split_csv,
    patient_from_name_only,
    patient_key,
    prepare,
    prepare_shared,
    read_split_csv,
    rebase,
    refind_files,
    refind_rows,
    scan,
    train_transform,
    write_split_csv,
)
from cxr.distributed import (
    OWN_WARNING,
    DistInfo,
    all_gather_ints,
    all_reduce_sum,
    barrier,
    broadcast_floats,
    env_info,
    local_main_first,
)
from cxr.distributed import init as init_distributed
from cxr.distributed import shutdown as shutdown_distributed
from cxr.errors import ConfigError, CxrError, DataError, UsageError, WriteError
from cxr.evaluate import (
    SplitResult,
    choose_threshold,
    patients_of,
    predict_logits,
    probabilities,
    write_evaluation,
)
from cxr.fileio import (
    CSV_TEXT,
    atomic_path,
    atomic_write_text,
    check_writable,
    ensure_dir,
    missing_folders,
    npz_row,
    remove_empty_folders,
    remove_stale_temps,
)
from cxr.fileio import NO_LOCKS as _NO_LOCKS
from cxr.fileio import release_lock as _release
from cxr.fileio import try_lock as _try_lock
from cxr.images import EXPLAIN_SUFFIX, warn_of_views
from cxr.model import (
    Checkpoint,
    autocast,
    build_model,
    exact_fp32,
    load_checkpoint,
    normalize,
    resolve_device,
    save_checkpoint,
    starting_model,
    use_bf16,
    use_channels_last,
)
from cxr.predict import threshold_text
from cxr.progress import progress_bar

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_auroc", "seconds",
                   "images_per_s")


class TrainingError(CxrError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------------- data


def _check_classes(name: str, samples: list[Sample]) -> None:
    present = {s.label for s in samples}
    if present != {0, 1}:
        have = ", ".join(CLASS_NAMES[i] for i in sorted(present)) or "no images"
        raise DataError(f"the {name} split must hold both NORMAL and PNEUMONIA images; it has {have}")


def split_dataset(cfg: Config, run_dir: Path, resume: bool, write: bool = True,
                  recorded_data: str | None = None) -> dict[str, Split]:
    """Scan ``cfg.data`` and decide the train / val / test records; written to (or, on resume, read from) split.csv.

    The split is a pure function of the files and the config, so every DDP rank computes the same one; only the
    rank with ``write`` records it. ``recorded_data``: where the data was when the run began (its last.pt's config);
    a resumed run whose data has moved since (``data`` edited in config.yaml) follows it, split.csv's paths with it.
    """
    if resume and not os.path.exists(cfg.data):
        raise DataError(f"{cfg.data}: no such file or directory; if the data moved, set data: in "
                        f"{run_dir / 'config.yaml'} to where it is now, and the run follows it")
    found = scan(cfg.data, patient_pattern=cfg.patient_pattern)
    if "train" not in found:
        raise DataError(f"{cfg.data}: no train split (expected a train/ folder, train_images in the .npz, or rows of "
                        "split train, or no split, in a CSV listing images)")
    arrays = {name: s.images for name, s in found.items()}
    split_csv = run_dir / "split.csv"
    if resume and split_csv.is_file():
        try:
            recorded = read_split_csv(split_csv)
        except ValueError as e:  # not text (UnicodeDecodeError); a row that is not whole says so itself
            raise UsageError(f"{split_csv}: not a split.csv of a cxr run: {e}") from None
        by_path = {s.path: (name, i) for name, split in found.items() for i, s in enumerate(split.samples)}
        old, new = str(Path(recorded_data or cfg.data).absolute()), str(Path(cfg.data).absolute())
        if old != new:  # moved: the same files below the new root (split.csv's paths are absolute)
            # Only paths not found as they are: under torchrun the other ranks read the split.csv rank 0 has just
            # rewritten, and a dataset moved into a folder of its own (data/ into data/data/) was moved twice there.
            recorded = {name: [s if s.path in by_path else dataclasses.replace(s, path=rebase(s.path, old, new))
                               for s in samples] for name, samples in recorded.items()}
        recorded, moved = refind_rows(recorded, found)
        listing = Path(cfg.data).suffix.lower() == ".csv"
        if listing:  # moved through a link, or listed by ../: found by content
            recorded, refound = refind_files(recorded, found, cfg.cache_dir)
            if refound and write:
                log.info("%d of the images %s recorded are found elsewhere now, by their content: %s follows them",
                         refound, split_csv, split_csv.name)
        else:
            refound = 0
        missing = [s.path for samples in recorded.values() for s in samples if s.path not in by_path]
        if missing and listing:  # a CSV listing images: a row removed, or its file
            raise DataError(f"{split_csv}: {len(missing)} recorded image(s) are not listed in {cfg.data} now, or not "
                            f"there, e.g. {missing[0]}; list them (and put them back) to go on with this run's split, "
                            "or start a new run")
        if missing:
            there = [m for m in missing if os.path.isfile(m)]
            if there:  # there, but left out of the scan (as explain pictures are, which an earlier cxr had listed)
                why = (f"pictures of `cxr explain` (*{EXPLAIN_SUFFIX}), which data scans now leave out"
                       if all(m.lower().endswith(EXPLAIN_SUFFIX) for m in there) else "files the data scan leaves out")
                raise DataError(f"{split_csv}: {len(there)} recorded image(s) are {why}, e.g. {there[0]}; this "
                                "run cannot go on with its split: start a new run")
            raise DataError(f"{split_csv}: {len(missing)} recorded image(s) are gone, e.g. {missing[0]}; put them "
                            "back to go on with this run's split (if the data moved, set data: in its config.yaml), "
                            "or start a new run")
        # A label changed since (a CSV's cell edited, an .npz's labels): the resumed run had trained on the new one
        # without a word, and split.csv kept the old, which `cxr evaluate` of it then scored against.
        relabelled = [s for samples in recorded.values() for s in samples
                      if found[by_path[s.path][0]].samples[by_path[s.path][1]].label != s.label]
        if relabelled:
            raise DataError(f"{split_csv}: {len(relabelled)} recorded image(s) have another label in {cfg.data} now, "
                            f"e.g. {relabelled[0].path} (recorded as {CLASS_NAMES[relabelled[0].label]}): this run "
                            "cannot go on with its split; start a new run")
        if (old != new or moved or refound) and write:  # `cxr evaluate --data RUN/split.csv` finds them there too
            write_split_csv(split_csv, recorded)
        if old != new and write:
            log.info("the data moved from %s to %s: %s follows it", old, new, split_csv)
        if moved and write:
            log.warning("%d of the rows %s recorded are at other indices in %s now (its arrays reordered since): "
                        "each is found by its pixels, and %s follows them", moved, split_csv, cfg.data, split_csv.name)
        known = {s.path for samples in recorded.values() for s in samples}
        added = [path for path in by_path if path not in known]
        if added and write:  # a resume keeps its split: images added since were left out without a word
            log.warning("%s holds %d image(s) that %s does not list (added since the run began), e.g. %s: the resumed "
                        "run goes on with the split it recorded and leaves them out; start a new run to use them",
                        cfg.data, len(added), split_csv, added[0])
        splits = {}
        for name, samples in recorded.items():
            sources = [by_path[s.path] for s in samples]
            images = None
            if all(arrays[src] is not None for src, _ in sources):
                images = np.stack([arrays[src][i] for src, i in sources]) if sources else None
            splits[name] = Split(name, [found[src].samples[i] for src, i in sources], images,
                                 recorded={s.path: s.digest for s in samples if s.digest})
        _listed_not_found(splits, found, cfg)
        return splits

    train = add_digests(found["train"], cfg.cache_dir)
    test = found.get("test")
    if cfg.val_source == "folder":
        if "val" not in found:
            raise DataError(f"{cfg.data}: --val-source folder, but there is no val split")
        splits = {"train": train, "val": add_digests(found["val"], cfg.cache_dir)}
    else:
        # The given val folder (16 images in the Kermany release) joins the pool the validation split is carved from.
        pool = train.samples + (add_digests(found["val"], cfg.cache_dir).samples if "val" in found else [])
        if "val" in found and write:  # said: a user's own val folder had been partly trained on without a word
            log.info("the data set's own val split (%d images) is pooled with train and the validation split carved "
                     "from both; --val-source folder keeps it as the validation split", len(found["val"].samples))
        images = None
        if train.images is not None:
            sources = [train.images] + ([found["val"].images] if "val" in found else [])
            if len({a.shape[1:] for a in sources}) > 1:  # np.concatenate's own ValueError had been the message
                raise DataError(f"{cfg.data}: train_images are {'x'.join(map(str, sources[0].shape[1:]))} and "
                                f"val_images {'x'.join(map(str, sources[1].shape[1:]))} pixels: the validation split "
                                "is carved from both together, so they must be of one size (or use --val-source "
                                "folder to keep val_images apart)")
            images = np.concatenate(sources)
        index = {s.path: i for i, s in enumerate(pool)}
        tr, va = carve_validation(pool, cfg.val_fraction, cfg.split_seed)
        pick = (lambda samples: images[[index[s.path] for s in samples]]) if images is not None else (lambda _: None)
        splits = {"train": Split("train", tr, pick(tr)), "val": Split("val", va, pick(va))}
    if test is not None:
        splits["test"] = add_digests(test, cfg.cache_dir)
    _listed_not_found(splits, found, cfg)
    _check_classes("train", splits["train"].samples)
    _check_classes("val", splits["val"].samples)
    if write:
        _warn_of_ids_and_overlap(splits, cfg)
        for name, split in splits.items():  # a study's lateral beside its PA view, learnt from as if it were one
            warn_of_views([s.path for s in split.samples if not npz_row(s.path)], f"{name} split")
        write_split_csv(split_csv, {name: s.samples for name, s in splits.items()})
    return splits


def _listed_not_found(splits: dict[str, Split], found: dict[str, Split], cfg: Config) -> None:
    """Give ``splits`` the files a CSV listing names for them that are not there: a carved train split those of the
    pool it was carved from (train and val rows), for summary.json to list."""
    pooled = ("train", "val") if cfg.val_source != "folder" else ("train",)
    for name, split in splits.items():
        sources = pooled if name == "train" else () if name == "val" and cfg.val_source != "folder" else (name,)
        split.not_found = [x for source in sources if source in found for x in found[source].not_found]


def _warn_of_ids_and_overlap(splits: dict[str, Split], cfg: Config) -> None:
    """Say what the run would otherwise hide: a patient_pattern that matched no path; val images (the dataset's own
    val folder) in train, and test images in train or val, byte for byte or by a patient id read from their names,
    headers or the pattern (a split that shares them scores higher than new patients would; nothing had said so, and
    the threshold is chosen on val); one image file under both classes."""
    every = [s for split in splits.values() for s in split.samples]
    if cfg.patient_pattern and not any(s.patient.startswith(PATTERN_PATIENT) for s in every):
        log.warning("patient_pattern %r matched none of the %d image paths (it is searched in each path below its "
                    "class folder, e.g. %s)", cfg.patient_pattern, len(every), _below_class_folder(every[0].path))
    for name, earlier in (("val", ("train",)), ("test", ("train", "val"))):
        if name not in splits:
            continue
        development = [s for other in earlier for s in splits[other].samples]
        digests = {s.digest for s in development if s.digest} - {EMPTY_DIGEST}
        patients = {patient_key(s.patient) for s in development if not patient_from_name_only(s)}
        later = splits[name].samples
        copies = sum(bool(s.digest) and s.digest in digests for s in later)
        shared = sum(not patient_from_name_only(s) and patient_key(s.patient) in patients for s in later)
        if copies or shared:
            log.warning("%s split: %d of its %d images are byte-identical to images in %s, and %d belong to patients "
                        "who also have images there (split.csv lists the patient ids): its metrics will overstate how "
                        "the model does on new patients%s", name, copies, len(later), " or ".join(earlier), shared,
                        "; the decision threshold is chosen on them too" if name == "val" else "")
    labels: dict[str, set[int]] = {}
    for s in every:
        if s.digest and s.digest != EMPTY_DIGEST:  # empty files are alike, and unreadable: said as such
            labels.setdefault(s.digest, set()).add(s.label)
    both = [s.path for s in every if len(labels.get(s.digest, ())) > 1]
    if both:
        log.warning("%d image files are byte-identical to an image of the other class (e.g. %s): the same picture is "
                    "taught, and scored, as NORMAL and as PNEUMONIA; remove the wrong copies", len(both),
                    both[0])


def _warn_of_changed_images(splits: dict[str, Split], prepared: dict[str, Prepared], run_dir: Path) -> None:
    """A resumed run whose images changed since split.csv recorded them (edited in place): it trains on and is
    measured against what they are now, and nothing had said so (``cxr evaluate`` of split.csv did)."""
    for name, split in splits.items():
        if not split.recorded:
            continue
        changed = [s.path for s in prepared[name].samples if split.recorded.get(s.path, s.digest) != s.digest]
        if changed:
            log.warning("%s split: %d of its images are not what %s recorded (changed since, or read otherwise by "
                        "this cxr version), e.g. %s: the resumed run goes on with them as they are now, and differs "
                        "from one that ran through",
                        name, len(changed), run_dir / "split.csv", changed[0])


def _record_what_was_read(splits: dict[str, Split], prepared: dict[str, Prepared], run_dir: Path) -> None:
    """A new run's split.csv with the digests of the bytes its cache build decoded, where an image changed between
    the split's hashing and its decoding: split.csv had kept the old content's digest, and ``cxr evaluate`` then
    counted the image trained on as never seen (``n_seen_in_training`` 0)."""
    read = {s.path: s.digest for p in prepared.values() for s in p.samples if s.digest}
    changed = [s.path for split in splits.values() for s in split.samples
               if s.digest and read.get(s.path, s.digest) != s.digest]
    if not changed:
        return
    log.warning("%d image(s) changed while the run read them, e.g. %s: %s records what was trained on", len(changed),
                changed[0], run_dir / "split.csv")
    write_split_csv(run_dir / "split.csv", {name: [dataclasses.replace(s, digest=read.get(s.path, s.digest))
                                                   for s in split.samples] for name, split in splits.items()})


def _below_class_folder(path: str) -> str:
    parts = Path(path).parts
    at = max((i for i, p in enumerate(parts) if class_of_folder(p) is not None), default=len(parts) - 2)
    return "/".join(parts[at + 1:])


# ------------------------------------------------------------------------------------------- optimisation


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up to ``base_lr``, then cosine decay to zero, as a pure function of the step (exact on resume)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """``n / (classes * count)`` per class (scikit-learn's "balanced"), so each class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=len(CLASS_NAMES)).astype(np.float64)
    return torch.tensor(len(labels) / (len(CLASS_NAMES) * np.maximum(counts, 1)), dtype=torch.float32)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# A run stopped for non-finite numbers: what it leaves. Before its first epoch ends it has written no checkpoint at all
# (the message had promised "the last good checkpoint" there too).
_KEPT = ", leaving the checkpoints of earlier epochs, if any, as they were"


def _finite(tensors) -> bool:
    """Whether every floating-point tensor holds only finite values (one device sync)."""
    checks = [torch.isfinite(t).all() for t in tensors if t is not None and t.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def train_one_epoch(model: nn.Module, loader, criterion: nn.CrossEntropyLoss, optimizer: torch.optim.Optimizer, *,
                    cfg: Config, device: torch.device, bf16: bool, channels_last: bool, epoch: int,
                    steps_per_epoch: int, total_steps: int, info: DistInfo | None = None,
                    constant_lr: float | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, accuracy, images/s, the share of time spent waiting for data and
    the number of batches skipped for a non-finite loss or gradient.

    ``criterion`` sums (``reduction="sum"``); each step's loss is normalised by the class weight of the *global*
    batch (summed over ranks), so that under DDP, which averages gradients over ranks, a step means the same as one
    single-process step on the whole batch.

    A non-finite loss raises :class:`TrainingError` (``cfg.nan_policy == "stop"``), or (``"skip"``) the batch is
    dropped as if it had not been drawn: no optimiser step, and batch-norm running statistics restored.

    ``constant_lr`` replaces the schedule for the whole epoch (the weight-averaging epochs).
    """
    world = info.world if info is not None else 1
    skip_bad = cfg.nan_policy == "skip"
    skipped = 0
    model.train()
    # At most half the run: a run no longer than its warm-up (one epoch at the default warmup_epochs 1) had ended at
    # the peak learning rate, never decayed, and kept the weights of its largest steps.
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps // 2)
    totals = torch.zeros(4, dtype=torch.float64)  # weighted loss sum, weight sum, correct, seen
    wait = 0.0
    start = t_data = time.perf_counter()
    if constant_lr is not None:
        _set_lr(optimizer, constant_lr)
    label = f"epoch {epoch + 1}/{cfg.epochs}" if constant_lr is None else f"epoch {epoch + 1} (weight averaging)"
    with progress_bar(label, total=steps_per_epoch * cfg.batch_size, unit="img") as bar:
        # islice, not a break at steps_per_epoch: that drew (and augmented) one batch more under max_train_batches
        for step, (x, y) in enumerate(itertools.islice(loader, steps_per_epoch)):
            wait += time.perf_counter() - t_data
            if cfg.scheduler == "cosine" and constant_lr is None:
                _set_lr(optimizer, cosine_lr(epoch * steps_per_epoch + step, total_steps, warmup, cfg.lr))
            x = normalize(x.to(device, non_blocking=True), cfg.mean, cfg.std, channels_last)
            y = y.to(device, non_blocking=True)
            # The forward pass updates batch-norm running statistics; a skipped batch must not leave them poisoned.
            saved = [b.detach().clone() for b in model.buffers()] if skip_bad else None
            with autocast(device, bf16):
                logits = model(x)
            summed = criterion(logits.float(), y)
            weight = criterion.weight[y].sum() if criterion.weight is not None else torch.tensor(float(len(y)))
            # The loss summed over ranks too: a rank whose own loss was finite had reported it as the non-finite one
            # ("the training loss became 1.28...") when another rank's was NaN.
            shared = all_reduce_sum(torch.stack([weight.detach().float().to(device),
                                                 (~torch.isfinite(summed.detach())).float(), summed.detach()]))
            bad = shared[1] > 0  # decided alike on every rank, so no rank is left waiting in a collective
            if bad and not skip_bad:
                raise TrainingError(f"the training loss became {shared[2].item()} at epoch {epoch + 1}, step "
                                    f"{step + 1}; stopped{_KEPT}; train again into a new --output with a lower "
                                    "--lr, or with nan_policy: skip in a --config file")
            optimizer.zero_grad(set_to_none=True)
            if not bad:
                loss = summed * world / shared[0]
                loss.backward()
                # Gradients are averaged over ranks by now, so every rank reaches the same verdict.
                bad = skip_bad and not _finite(p.grad for p in model.parameters())
            if bad:
                with torch.no_grad():
                    for b, old in zip(model.buffers(), saved, strict=True):
                        b.copy_(old)
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                log.warning("epoch %d, step %d: non-finite loss or gradient (loss %s); batch skipped "
                            "(nan_policy: skip)", epoch + 1, step + 1, shared[2].item())
                t_data = time.perf_counter()
                continue
            optimizer.step()
            called = (logits[:, 1] >= logits[:, 0]).long()  # PNEUMONIA at P >= 0.5, as validate and every command
            totals += torch.tensor([summed.item(), weight.item(), int((called == y).sum()), len(y)],
                                   dtype=torch.float64)
            bar.advance(len(y) * world, info=f"loss {totals[0] / totals[1]:.4f}")
            t_data = time.perf_counter()
    seconds = time.perf_counter() - start
    loss_w, weight_sum, correct, seen = all_reduce_sum(totals.to(device)).tolist()
    if skipped and not seen:
        raise TrainingError(f"every batch of epoch {epoch + 1} gave a non-finite loss or gradient; stopped, keeping "
                            "the last good checkpoint (try a lower --lr)")
    return {"skipped_batches": skipped,
            "train_loss": loss_w / max(weight_sum, 1e-12), "train_acc": correct / max(seen, 1), "seconds": seconds,
            "images_per_s": seen / seconds if seconds else 0.0, "data_wait": wait / seconds if seconds else 0.0}


def validate(model: nn.Module, val: Prepared, criterion: nn.CrossEntropyLoss, *, cfg: Config, device: torch.device,
             bf16: bool, channels_last: bool) -> dict[str, float]:
    """Validation loss (same class-weighted loss as training), accuracy at 0.5 and AUROC."""
    from sklearn.metrics import roc_auc_score

    logits = predict_logits(model, val.images, mean=cfg.mean, std=cfg.std, device=device,
                            batch_size=cfg.eval_batch_size, bf16=bf16, channels_last=channels_last)
    labels = torch.from_numpy(val.labels)
    weight = criterion.weight.cpu() if criterion.weight is not None else None
    loss = float(nn.functional.cross_entropy(logits, labels, weight=weight, label_smoothing=criterion.label_smoothing))
    # PNEUMONIA at P >= 0.5, as everywhere else (argmax gave NORMAL where the two logits are equal).
    called = (logits[:, 1] >= logits[:, 0]).long()
    return {"val_loss": loss, "val_acc": float((called == labels).float().mean()),
            "val_auroc": float(roc_auc_score(val.labels, probabilities(logits)))}


def _write_history(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", **CSV_TEXT) as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


# ------------------------------------------------------------------------------------------------ the run


# What ``--resume`` may change: more epochs (the cosine schedule stretches to the new end), another device, weight
# averaging added after the schedule (e.g. to a finished run), and the loader's worker count, which changes no batch
# (each image's augmentation is seeded by seed, epoch and index), and the cache folder, which changes no pixel.
RESUMABLE = ("device", "epochs", "swa_epochs", "swa_lr", "num_workers", "cache_dir")


def _resolve_resume(resume: str | os.PathLike, overrides: dict) -> tuple[Config, Checkpoint | None]:
    run_dir = Path(resume)
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"--resume {run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    output = overrides.get("output")
    if output is not None and Path(output).resolve() != run_dir.resolve():
        # It was dropped without a word, and the run given to --resume trained on, in place.
        raise UsageError(f"--resume {run_dir} continues the run in its own folder; --output {output} cannot move it "
                         f"(copy the folder first to branch it: cp -r {run_dir} {output}, then --resume {output})")
    # The flags of the original command may be given again: only a value that differs is refused.
    given = {k: v for k, v in overrides.items() if v is not None and k not in ("output",) + RESUMABLE}
    as_given = load_config(overrides=given, base=cfg)  # the flags' values as the fields' types ("4" -> 4)
    changed = sorted(k for k in given if not _same_setting(k, getattr(as_given, k), getattr(cfg, k)))
    if changed:
        raise UsageError(f"--resume continues a run as configured; only --epochs, --device, --swa-epochs, "
                         f"--swa-lr, --num-workers and --cache-dir may change (got {', '.join(changed)}, which differ "
                         f"from {run_dir / 'config.yaml'})")
    # Through load_config, so that the flags' values are read as the fields' types (--num-workers 4 is "4" there)
    cfg = load_config(overrides={"output": str(run_dir), **{k: overrides[k] for k in RESUMABLE
                                                             if overrides.get(k) is not None}}, base=cfg)
    last = run_dir / "last.pt"
    trained = _trained_past_epoch_1(run_dir) if not last.is_file() and (run_dir / "best.pt").is_file() else None
    if trained:
        # --resume without last.pt starts the run again: right for one killed in its first epoch (best.pt is written
        # before last.pt, and history.csv after it, so a kill between the two leaves an epoch-1 best.pt and no history,
        # which the restart writes again alike). Here the run had trained further, or finished, and it was trained
        # again from epoch 1 over its best.pt, history and metrics.
        raise UsageError(f"--resume {run_dir}: its last.pt is gone, and {trained} that a fresh start would replace; "
                         "--resume needs last.pt to continue")
    state = load_checkpoint(last) if last.is_file() else None
    if state is None:  # killed in its first epoch: said, as the start of a run it is (it had said nothing)
        log.info("%s has no last.pt (stopped during its first epoch): starting it again from epoch 1", run_dir)
    if state is not None:
        # config.yaml edited since (by hand, or by another cxr): applied mid-run without a word, or ending in a raw
        # load_state_dict error for another arch. Where the data or cache now live may change; nothing else.
        saved, now = state.config.to_dict(), cfg.to_dict()
        edited = sorted(k for k in now if k not in ("output", "data", "cache_dir") + RESUMABLE
                        and k in saved and saved[k] != now[k])
        if edited:
            raise UsageError(f"--resume {run_dir}: config.yaml differs from the config saved in last.pt in "
                             f"{', '.join(edited)}; a run continues as it began (only data and cache_dir may be "
                             "edited there)")
    if state is not None and cfg.epochs < state.config.epochs:
        # Accepted before: config.yaml said the smaller number, the cosine schedule shrank mid-run (or, below the
        # epochs done, nothing trained and summary.json gave no stop reason).
        raise UsageError(f"--resume {run_dir} --epochs {cfg.epochs}: this run's schedule is {state.config.epochs} "
                         f"epochs ({state.epoch} done) and cannot be shortened; leave --epochs out to finish it")
    if state is not None and cfg.epochs > state.config.epochs:
        # A longer schedule can extend a run that finished it, not one that stopped early or went on to averaging:
        # say so, instead of recording the new --epochs in config.yaml and training nothing.
        stop_reason = state.extra.get("stop_reason", "")
        if state.extra.get("swa_start") is not None:
            raise UsageError(f"--resume {run_dir} --epochs {cfg.epochs}: this run's schedule of {state.config.epochs} "
                             "epochs is over and weight averaging has begun, so it cannot be lengthened; start a new "
                             "run (or change --swa-epochs)")
        if stop_reason.startswith("early stopping"):
            raise UsageError(f"--resume {run_dir} --epochs {cfg.epochs}: this run stopped early ({stop_reason}), so "
                             "more epochs would not train it further; start a new run")
    if overrides.get("cache_dir") is None and os.path.abspath(cfg.cache_dir) != os.path.abspath(default_cache_dir()):
        # A run of cxr before 12/2026 recorded the default cache folder of the machine it began on, which a resume
        # elsewhere created unasked: said (once the resume is known to go on), with the way to this machine's
        log.info("the cache folder is %s, as %s records it (this machine's default is %s; --cache-dir changes it)",
                 cfg.cache_dir, run_dir / "config.yaml", default_cache_dir())
    return cfg, state


def _trained_past_epoch_1(run_dir: Path) -> str | None:
    """What shows that a run directory holds more than a first epoch killed before its last.pt: a summary (it
    finished), an epoch in history.csv, or a best.pt of a later epoch; an unreadable best.pt counts too (nothing is
    replaced on a guess). None when there is nothing of the kind."""
    best = run_dir / "best.pt"
    advice = f"(start a new run with --weights {best} to train on)"
    if (run_dir / "summary.json").is_file():
        return f"it finished (summary.json), with a best.pt {advice}"
    with contextlib.suppress(OSError):
        if len((run_dir / "history.csv").read_text(encoding="utf-8").strip().splitlines()) > 1:
            return f"it trained epochs (history.csv), with a best.pt {advice}"
    try:
        epoch = load_checkpoint(best).epoch
    except CxrError as e:
        return f"its best.pt cannot be read ({e}); move the folder aside and start again"
    return f"it holds the best.pt of epoch {epoch} {advice}" if epoch > 1 else None


def _same_setting(field: str, a, b) -> bool:
    """Whether two values of a config field are the same setting (paths: the same place, however written)."""
    paths = field in ("data", "cache_dir") or field == "weights" and not {a, b} & {"none", "imagenet", "default"}
    if paths and isinstance(a, str) and isinstance(b, str):
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def _check_starting_weights(cfg: Config) -> None:
    """``--weights`` names something loadable into ``--arch``: said now, not after the data is hashed and cached.

    The model is built once here and again, seeded, in :func:`_train`: ImageNet's weights are downloaded (or found
    missing, offline) here, and a state dict or cxr model that does not fit ``--arch`` is refused here.
    """
    if cfg.weights == "none":
        return
    build_model(cfg.arch, cfg.weights)
    source = starting_model(cfg.weights)
    if source is None:
        return
    theirs = source.config
    if (theirs.mean, theirs.std) != (cfg.mean, cfg.std):
        log.warning("--weights %s was trained on images normalised with mean %g, std %g; this run uses mean %g, "
                    "std %g (set mean and std in a config file to match)", source.path, theirs.mean, theirs.std,
                    cfg.mean, cfg.std)
    if theirs.image_size != cfg.image_size:
        log.info("--weights %s was trained at %d px; this run trains at %d px", source.path, theirs.image_size,
                 cfg.image_size)


def train(cfg: Config | None = None, *, resume: str | os.PathLike | None = None,
          overrides: dict | None = None) -> Path:
    """Train, keep the best checkpoint by validation loss, choose the threshold on validation, evaluate.

    Under ``torchrun`` every rank calls this: the global batch (``cfg.batch_size``) is split over the ranks, rank 0
    validates, writes every file and evaluates at the end; the others train and wait.

    The process's torch settings (deterministic algorithms, cuDNN benchmark), ``CUBLAS_WORKSPACE_CONFIG`` and the
    random generators of Python, NumPy and torch (CUDA's too where CUDA was in use before the call) are put back as
    they were when it returns or fails: a notebook that trains goes on as it was. So one call runs at a time in a
    process: a second, from another thread, raises :class:`~cxr.errors.UsageError`. (The CLI's report is not written
    here: call :func:`cxr.report.make_report`.)

    Args:
        cfg: the run's config (ignored with ``resume``).
        resume: a run directory to continue from its ``last.pt`` (or from the start if it has none).
        overrides: with ``resume``, flags that may change (:data:`RESUMABLE`); without it, applied to ``cfg``.

    Returns:
        The run directory, as an absolute path.
    """
    if cfg is not None and not isinstance(cfg, Config):  # a folder's name: an AttributeError deep inside
        raise UsageError(f"cfg must be a cxr.config.Config (cxr.config.load_config(...)), got {type(cfg).__name__} "
                         f"{cfg!r:.80}")
    if resume is None and overrides:  # they were ignored without a word
        cfg = load_config(overrides=overrides, base=cfg)
    # One run at a time in a process: two from threads had shared the global random generators (each gave another
    # model than alone) and one run's end put back the other's deterministic mode mid-run, then left it on for good.
    if not _RUNNING.acquire(blocking=False):
        raise UsageError("train() is already running in this process (another thread): a run sets process-wide "
                         "state (random generators, deterministic mode, threads) that two runs would share; run them "
                         "one after another, or in separate processes")
    try:
        with _process_state_kept():
            # whole, as data and cache_dir are recorded: relative, it named another folder after an os.chdir
            return _train_run(cfg, resume, overrides).absolute()
    finally:
        _RUNNING.release()


_RUNNING = threading.Lock()  # held by the train() call running in this process


@contextlib.contextmanager
def _process_state_kept():
    """Put back what a run changes for the whole process: it had left deterministic mode on (through a later run
    without it), CUBLAS_WORKSPACE_CONFIG set and every global random generator re-seeded; and torch's thread count,
    which a deterministic resume sets to its run's."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        # Only where the run changed it: the call imports torch._inductor, and a Ctrl-C that had left an import half
        # done (sympy, in torch.optim's setup) then ended in that import's traceback instead of "interrupted".
        if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != (
                deterministic, warn_only):
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _train_run(cfg: Config | None, resume: str | os.PathLike | None, overrides: dict | None) -> Path:
    t_start = time.perf_counter()
    state: Checkpoint | None = None
    if resume is not None:
        cfg, state = _resolve_resume(resume, overrides or {})
    if cfg is None or not cfg.data:
        raise UsageError("no data: pass --data DIR (a dataset folder, an .npz file or a CSV listing images)")
    for name in ("output", "cache_dir"):  # "" is the current folder: a run's files, or its cache, written there unasked
        if not str(getattr(cfg, name)).strip():
            raise ConfigError(f"invalid config: {name} must name a folder (an empty one is the current folder)")
    if Path(cfg.data).suffix.lower() == ".csv" and os.path.isfile(cfg.data) and is_split_csv(cfg.data):
        # scan() reads a run's split.csv for `cxr evaluate`; for training it was taken, and its val carved anew.
        raise UsageError(f"--data {cfg.data}: a run's split.csv is for cxr evaluate; to train on images listed in a "
                         "CSV, give one with the columns path and label (split and patient if wished)")
    if cfg.patient_pattern and Path(cfg.data).suffix.lower() == ".npz" and resume is None:
        # as `cxr evaluate` refuses it: accepted, it warned of matching none of the "paths", e.g. "0", a row's index
        raise UsageError(f"--patient-pattern reads image paths; the rows of {Path(cfg.data).name} have none to read: "
                         "drop it")
    cfg.validate()
    if resume is None:
        # Recorded as an absolute path, so that `--resume` works from any folder (split.csv's paths are absolute too).
        # So are starting weights from a file or run: `cxr evaluate` follows them back to the runs the model was
        # fine-tuned from, from whatever folder it runs in.
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).absolute()))
        if cfg.weights not in ("none", "imagenet", "default") and Path(cfg.weights).exists():
            cfg = dataclasses.replace(cfg, weights=str(Path(cfg.weights).absolute()))
    # The cache too, and on a resume too (where --cache-dir may change it): a relative one, resumed from another folder,
    # was a new cache there (inside the data, even)
    cfg = dataclasses.replace(cfg, cache_dir=str(Path(cfg.cache_dir).expanduser().absolute()))
    if state is None:
        # Before the data is hashed and cached, not after (a resumed run needs no starting weights: see _train).
        _check_starting_weights(cfg)
    run_dir = Path(cfg.output)
    check_output_outside_data(run_dir, Path(cfg.data))
    if env_info().main and folder_in_use(run_dir):  # its advice ("continue it with --resume") would be refused
        raise ConfigError(f"{run_dir} is in use by another cxr train (it holds {run_dir / _LOCK_NAME}); wait for it "
                          "to end, or pick another --output")

    read = _file_identity(run_dir / "last.pt") if resume is not None else None

    def occupied() -> None:
        _refuse_occupied(run_dir, resume is not None)
        # A resume read last.pt before it held the folder: another session that trained the run meanwhile (while a
        # slow torchrun rendezvous waited) had had its epochs replaced by this one's, both exiting 0.
        if resume is not None and _file_identity(run_dir / "last.pt") != read:
            raise UsageError(f"--resume {run_dir}: another cxr train went on with this run since its last.pt was read "
                             f"here; run the --resume again to go on from where that one stopped")

    occupied()
    info, device = init_distributed(resolve_device(cfg.device))
    try:
        with _run_folder_lock(run_dir, info, device, check=occupied):
            result = _train(cfg, state, run_dir, info, device, resume is not None, t_start)
    except BaseException:
        # Not at a barrier: the other ranks wait in another collective, and the job hung silently for
        # CXR_DIST_TIMEOUT (2 h) after one rank's disk filled up. torchrun ends them when this rank exits.
        shutdown_distributed(failed=True)
        raise
    shutdown_distributed()
    return result


def _refuse_occupied(run_dir: Path, resumed: bool) -> None:
    """Refuse a fresh run into a folder that holds a run (made before the work, and again under the run's lock)."""
    if not resumed and (run_dir / "last.pt").exists():
        summary = _read_summary(run_dir)
        if summary.get("stop_reason") and not summary.get("in_progress"):
            # --resume alone re-evaluated a finished run and trained nothing: the advice had not said so. A run that
            # stopped early, or went on to weight averaging, cannot be lengthened (--resume refuses it).
            longer = (f", or train it longer with --resume {run_dir} --epochs N"
                      if str(summary["stop_reason"]).startswith("finished") and not summary.get("swa") else "")
            raise UsageError(f"{run_dir} holds a finished run ({summary['stop_reason']}); pick another --output"
                             f"{longer}")
        raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --output")
    if not resumed and any((run_dir / name).is_file() for name in ("best.pt", "metrics.json", "summary.json")):
        # last.pt deleted to save its space (3x best.pt's): the finished run's model and results had been replaced
        if (run_dir / "best.pt").is_file() and (run_dir / "config.yaml").is_file() \
                and _trained_past_epoch_1(run_dir) is None:
            # stopped between its first best.pt and last.pt: --resume starts it again, which the advice had not said
            raise UsageError(f"{run_dir} holds a run stopped in its first epoch (a best.pt, no last.pt); start it "
                             f"again with --resume {run_dir}, or pick another --output")
        raise UsageError(f"{run_dir} holds a trained model (best.pt or its results); pick another --output, or delete "
                         "the folder to start over there")


def _file_identity(path: Path) -> tuple[int, int, int, int] | None:
    """A file's device, inode, size and modification time, or None where it is not there: whether it changed."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read_summary(run_dir: Path) -> dict:
    """The run's summary.json as a dict ({} where it is missing or not one)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _mark_in_progress(run_dir: Path, after_epoch: int) -> None:
    """An earlier session's summary.json, marked as this session begins: best.pt may change from the next improving
    epoch on, and its threshold is chosen at the end. A session killed meanwhile had left a folder whose summary and
    metrics said "finished" beside a newer best.pt with no threshold chosen, which the report then described."""
    path, summary = run_dir / "summary.json", _read_summary(run_dir)
    if not summary:
        return
    before = summary.get("stop_reason_before_resume") or summary.get("stop_reason")  # not nested at a second kill
    summary["stop_reason_before_resume"] = before
    summary["stop_reason"] = f"in progress: resumed after epoch {after_epoch}" + (f" (was: {before})" if before else "")
    summary["in_progress"] = (f"resumed after epoch {after_epoch}; until that session ends, best.pt may be newer than "
                              "these figures, with no threshold chosen (cxr train --resume ends it)")
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")


_LOCK_NAME = ".cxr-train.lock"


def folder_in_use(run_dir: str | os.PathLike) -> bool:
    """Whether a ``cxr train`` holds ``run_dir`` now (its lock is taken); a look, nothing held after it."""
    path = Path(run_dir) / _LOCK_NAME
    if not path.is_file():
        return False
    try:
        fd = _try_lock(path)
    except OSError:
        return False
    if fd is None:
        return True
    _release(fd)
    return False


_HELD_RUNS: dict[str, int] = {}  # run folder -> the descriptor holding its lock, in this process


def _check_still_held(run_dir: Path) -> None:
    """Refuse to write into a run folder whose lock is no longer this run's: the folder deleted while the run
    trained (its writes had made it again) and another run started there, both exiting 0 with one's config beside the
    other's checkpoints."""
    fd = _HELD_RUNS.get(str(run_dir))
    if fd is None:
        return
    try:
        ours = os.stat(run_dir / _LOCK_NAME).st_ino == os.fstat(fd).st_ino
    except OSError:
        ours = False
    if not ours:
        raise ConfigError(f"{run_dir}: its lock file {_LOCK_NAME} was removed or replaced while this run trained (the "
                          "folder deleted, or another run started in it): stopped, so as not to mix two runs' files")


@contextlib.contextmanager
def _run_folder_lock(run_dir: Path, info: DistInfo, device: torch.device | None = None,
                     check: Callable[[], None] | None = None):
    """Hold the run folder for this training (its main process does, for every rank of a torchrun): a second
    ``cxr train`` into it, fresh or ``--resume``, is refused while this one runs. Two had both exited 0, leaving
    config.yaml and split.csv of one run beside the checkpoints and metrics of the other. An advisory lock (``flock``;
    ``msvcrt`` on Windows), released by the system when the process ends however it ends. Its holder removes the
    file when the run ends (one left by a killed run is taken over by the next); a process refused touches nothing.
    ``check``: run by the main process once it holds the lock (its CxrError refuses the run on every rank): the
    checks made before it (a finished run there) had not been made again, and a run that started while a slow
    torchrun rendezvous waited had been replaced without a word.
    """
    fd, made, path = None, [], run_dir / _LOCK_NAME
    refused, failure = False, None
    if info.main:
        made = missing_folders(run_dir)
        try:
            ensure_dir(run_dir)
        except OSError as e:  # a read-only or forbidden place: the run could write nothing (a lock warning came first)
            failure = WriteError.from_os_error(run_dir, e)
            failure.replacing = False  # a folder: no "existing file unchanged"
        if failure is None:
            try:
                fd = _try_lock(path)
                refused = fd is None
            except OSError as e:
                if e.errno in _NO_LOCKS:  # a file system without locks: the run goes on, said
                    log.warning("%s: no lock on the run folder (%s); do not start another cxr train into it "
                                "meanwhile", run_dir, e.strerror or e)
                elif path.exists() and e.errno in (errno.EACCES, errno.EPERM):
                    # Another user's lock file (umask 077): whether their run still holds it cannot be told from
                    # here, so no second run goes on beside it (it had gone on, said, a review found).
                    failure = UsageError(f"{run_dir}: its lock file {path.name} is another user's and cannot be "
                                         f"opened here ({e.strerror}), so whether a cxr train runs there cannot be "
                                         f"told; if none does, delete {path}")
                else:
                    failure = WriteError.from_os_error(run_dir, e)
                    failure.replacing = False
        if failure is None and not refused and check is not None:
            try:
                check()
            except CxrError as e:
                failure = e
            if failure is not None and fd is not None:
                _release(fd, path)
                fd = None
    if info.active:  # every rank refuses alike, before any collective of the run (rank 1 had died in gloo)
        code = broadcast_floats([2.0 if failure else float(refused)], device or torch.device("cpu"))[0]
        refused = code == 1.0
        if code == 2.0 and failure is None:
            raise ConfigError(f"{run_dir}: cannot be used (the first process says why)")
    if failure is not None:
        raise failure
    if refused:
        raise ConfigError(f"{run_dir} is in use by another cxr train (it holds {path}); wait for it to end, or pick "
                          "another --output")
    if fd is not None:
        _HELD_RUNS[str(run_dir)] = fd
    try:
        yield
    finally:
        if fd is not None:
            _HELD_RUNS.pop(str(run_dir), None)
            _release(fd, path)
            remove_empty_folders(made)  # a run that failed before writing anything leaves no folder of its own


class TrainBatches:
    """The training batches of ``cxr train``: augmented dataset, sampler and one DataLoader per epoch.

    One sampler for one process and for N: each epoch's permutation depends only on (seed, epoch), and rank r takes
    its every N-th position, so the N per-rank batches of a step together hold exactly the images of the
    single-process global batch. Benchmarks build their loader here too, so they time what ``cxr train`` runs.
    """

    def __init__(self, prepared: Prepared, cfg: Config, *, rank: int = 0, world: int = 1,
                 device: torch.device | None = None, dataset_class: type[XrayDataset] = XrayDataset) -> None:
        self.cfg = cfg
        self.dataset = dataset_class(prepared, train_transform(cfg), seed=cfg.seed)
        self.per_rank_batch = cfg.batch_size // world
        # The sampler draws epoch e's order from seed + e: seed 1's epoch 0 was seed 0's epoch 1, so a sweep over
        # seeds 0-4 saw nearly one sequence of batches. Spread as the augmentation's seed is (seed 0 keeps its orders).
        self.sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True,
                                                           seed=sampler_seed(cfg.seed), drop_last=True)
        if len(self.sampler) < 2:  # one image a process: batch norm's "Expected more than 1 value", a traceback
            raise DataError(f"the training split's {len(self.dataset)} images give {len(self.sampler)} a process over "
                            f"{world} processes; batch norm needs two: use fewer processes or more images")
        self.drop_last = len(self.sampler) > self.per_rank_batch  # a batch of one breaks batch norm
        self.steps_per_epoch = max(1, len(self.sampler) // self.per_rank_batch)
        if cfg.max_train_batches:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_train_batches)
        self.pin_memory = device is not None and device.type == "cuda"
        self.workers = loader_workers(cfg, device, batch_bytes=self.per_rank_batch * cfg.image_size**2)
        n = len(self.dataset)
        if world > 1 and n < cfg.batch_size and n % world and rank == 0:
            # Each rank takes the same number of images; one process would have taken all n in its one batch.
            log.warning("the training split (%d images) is smaller than the global batch (%d): over %d processes, "
                        "%d of them sit out each epoch (not the same ones)", n, cfg.batch_size, world, n % world)

    def loader(self, epoch: int) -> torch.utils.data.DataLoader:
        """This rank's batches of ``epoch`` (0-based): its permutation and its augmentations."""
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        workers = self.workers
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.per_rank_batch, sampler=self.sampler,
                                           drop_last=self.drop_last, num_workers=workers,
                                           pin_memory=self.pin_memory, persistent_workers=False,
                                           multiprocessing_context=loader_start_method() if workers else None,
                                           worker_init_fn=loader_worker_init if workers else None)


def loader_worker_init(_worker_id: int) -> None:
    """A data-loading worker gives up the locks it inherited by fork (the run folder's, an output folder's) and ends
    with the process that started it: the main process killed alone (the OOM killer), its workers had held the run's
    lock some 6 s more, and a ``--resume`` meanwhile was refused as if another run trained there."""
    from cxr.data import end_with_parent
    from cxr.fileio import held_lock_descriptors

    for fd in held_lock_descriptors() + list(_HELD_RUNS.values()):
        with contextlib.suppress(OSError):
            os.close(fd)
    end_with_parent()
    # SIGTERM and SIGHUP sent to the whole process group (scancel, a closed terminal) are the main process's to
    # handle, as Ctrl-C is: a worker that died of one had torch print a DataLoader traceback before cxr's own line.
    # (A worker that does not end when told is ended by its loader's terminate() no longer, but with the process.)
    import signal

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def sampler_seed(seed: int) -> int:
    """The batch order's seed for ``--seed``: apart for every two seeds over any number of epochs below a million
    (torch's sampler adds the epoch), and below 2**63 with room for the epoch (a generator's seed range)."""
    return seed * 1_000_003 % 2**62


def loader_workers(cfg: Config, device: torch.device | None, batch_bytes: int = 0) -> int:
    """DataLoader worker processes per process: the config's number, or for ``num_workers: auto`` 0 on the CPU and on
    CUDA up to 8, leaving a core to each process itself (the processes on this machine share its cores).

    On the CPU the batches come from the in-memory cache and workers would compete with the model for the same cores.
    On a GPU the per-image augmentation on the CPU is the limit: on one H200 with 16 cores, 8 workers trained 2.5x as
    many images/s as none (BENCHMARKS.md, figure 6). Each worker keeps 2 batches (``batch_bytes`` each) in
    ``/dev/shm``; ``auto`` starts no more than half of its free space holds (Docker gives a container 64 MB).
    """
    if cfg.num_workers != "auto":
        return int(cfg.num_workers)
    if device is None or device.type != "cuda":
        return 0
    workers = min(8, usable_cores() // processes_per_machine() - 1)
    if batch_bytes > 0 and sys.platform == "linux":
        try:
            free = shutil.disk_usage("/dev/shm").free
        except OSError:
            free = 0
        if workers > free // (4 * batch_bytes):
            log.info("loader: %d worker(s), not %d: /dev/shm has %d MB free and each worker holds 2 batches of %.1f MB "
                     "there (a container's --shm-size raises it)", free // (4 * batch_bytes), workers, free >> 20,
                     batch_bytes / 2**20)
            workers = free // (4 * batch_bytes)
    return max(0, workers)


def processes_per_machine() -> int:
    """How many training processes share this machine: torchrun's ``LOCAL_WORLD_SIZE``; under another launcher that
    sets only ``WORLD_SIZE``, one per GPU here (at most the world size); else 1."""
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.strip().isdecimal() and int(value) >= 1:
            n = int(value)
            return n if name == "LOCAL_WORLD_SIZE" else max(1, min(n, torch.cuda.device_count() or n))
    return 1


def loader_start_method() -> str | None:
    """How loader workers start: ``fork`` on Linux, the platform's default elsewhere.

    The dataset holds the whole split's pixels (in memory, or mapped from the node's shared split file under
    torchrun). Forked workers share those pages with the process. A ``forkserver`` or ``spawn`` worker gets the
    dataset pickled, and torch pickles a tensor by moving its storage into shared memory (``/dev/shm``): a copy of
    the split per rank, on every run, that fails outright in a container with Docker's default 64 MB ``/dev/shm``.
    Python 3.14 made ``forkserver`` Linux's default, so the method is named here rather than inherited. The workers
    only index the pixels and augment them on the CPU (never CUDA), the case fork suits.
    """
    return "fork" if sys.platform == "linux" else None


def busy_cores(interval: float = 0.25) -> float | None:
    """How many cores other processes keep busy, measured over ``interval`` seconds from ``/proc/stat`` while this
    process sleeps (None where there is no ``/proc/stat``).

    Measured, not read from the load average: that average still holds this run's own cache build a minute later.
    """
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def _cpu_sample() -> tuple[int, int, float, float] | None:
    """(/proc/stat total and idle ticks, this run's CPU seconds, wall seconds), or None without /proc/stat. The run's
    CPU includes its loader workers that have ended (each epoch's end theirs), which are no one else's load."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return sum(fields[:8]), fields[3] + (fields[4] if len(fields) > 4 else 0), own, time.monotonic()


class ContentionWatch:
    """Other processes' CPU use over a whole epoch: the start-up sample of :func:`warn_if_cpu_contended` is a
    quarter of a second, and missed a machine that got busy later (a helper's 2-thread run trained at 1.8-5.3 images/s
    there against 12-14 with one thread). ``check()`` warns once per run, and only with more threads than free cores.
    """

    def __init__(self, threads: int) -> None:
        self.threads, self.warned, self.start = threads, threads <= 1, None

    def begin(self) -> None:
        if not self.warned:
            self.start = _cpu_sample()

    def check(self, images_per_s: float) -> bool:
        end = _cpu_sample() if self.start is not None and not self.warned else None
        if end is None:
            return False
        (total0, idle0, own0, wall0), (total1, idle1, own1, wall1) = self.start, end
        if total1 <= total0 or wall1 - wall0 < 5:  # too short a window to say anything
            return False
        cores = os.cpu_count() or 1
        others = cores * (1 - (idle1 - idle0) / (total1 - total0)) - (own1 - own0) / (wall1 - wall0)
        if others < 0.5 or self.threads <= cores - others + 0.5:
            return False
        self.warned = True
        log.warning("the CPU was busy through this epoch (other processes used %.1f of %d cores) and torch runs %d "
                    "threads, at %.1f images/s: OpenMP threads that wait for a busy core can make training up to 40x "
                    "slower. On a shared machine, stop and resume the run with OMP_NUM_THREADS=1 (see BENCHMARKS.md; "
                    "it then goes on otherwise than at %d threads, not bit-identical to a run that kept them; a "
                    "--deterministic run keeps them when resumed)",
                    others, cores, self.threads, images_per_s, self.threads)
        return True


def warn_if_cpu_contended(threads: int) -> bool:
    """Log a warning when other processes keep cores busy and this one runs more threads than the free cores.

    On a 2-core machine with one core held by a job in another session, two threads per process trained at 0.42 images/s
    against 18 on an idle machine (BENCHMARKS.md, "OpenMP threads on a busy machine"); one thread per process avoids
    the collapse. A quarter-second sample is a hint, not a measurement of the next hour, so this only warns.
    Returns whether it warned.
    """
    if threads <= 1:
        return False
    busy = busy_cores()
    cores = os.cpu_count() or 1
    if busy is None or busy < 0.5 or threads <= cores - busy + 0.5:
        return False
    log.warning("the CPU is busy (other processes use %.1f of %d cores) and torch runs %d threads: OpenMP threads "
                "that wait for a busy core can make training up to 40x slower. On a shared machine, run with "
                "OMP_NUM_THREADS=1 (see BENCHMARKS.md)", busy, cores, threads)
    return True


def _data_fingerprint(prepared: dict[str, Prepared], data: str) -> list[int]:
    """What this rank prepared, as integers to compare between ranks: for each split its image count (-1: no such
    split), its count of unreadable images and 16 bytes of a SHA-256 over its images' paths, labels and contents
    (paths relative to the data's folder: nodes may mount it in other places). The class weights follow from the
    training labels."""
    root = data if os.path.isdir(data) else os.path.dirname(data)

    def relative(path: str) -> str:
        try:
            return os.path.relpath(path, root)
        except ValueError:  # another drive (Windows)
            return path

    values: list[int] = []
    for name in SPLITS:
        p = prepared.get(name)
        if p is None:
            values += [-1, 0, 0, 0]
            continue
        h = hashlib.sha256(json.dumps([[[relative(s.path), s.label, s.digest] for s in p.samples],
                                       sorted(relative(f) for f, _ in p.failures)]).encode()).digest()
        values += [len(p.samples), len(p.failures), int.from_bytes(h[:8], "big", signed=True),
                   int.from_bytes(h[8:16], "big", signed=True)]
    return values


def _check_every_rank_has_the_same_data(prepared: dict[str, Prepared], data: str, info: DistInfo) -> None:
    """Raise the same DataError on every rank when any prepared other splits than rank 0 (a no-op for one process)."""
    if not info.active:
        return
    every = all_gather_ints(_data_fingerprint(prepared, data))
    for rank, theirs in enumerate(every[1:], 1):
        for k, name in enumerate(SPLITS):
            (n0, bad0, *h0), (n, bad, *h) = every[0][4 * k:4 * k + 4], theirs[4 * k:4 * k + 4]
            if n != n0:
                what = f"{_images(n)} against rank 0's {_images(n0)}"
            elif bad != bad0:
                what = f"{bad} unreadable image(s) against rank 0's {bad0}"
            elif h != h0:
                what = f"as many images as rank 0's ({n}), but other files, contents or labels"
            else:
                continue
            raise DataError(f"process {rank} prepared a different {name} split: {what}; the data differ between "
                            "nodes (or changed while the processes read them)")


def _images(n: int) -> str:
    return "none" if n < 0 else f"{n} images"


def _train(cfg: Config, state: Checkpoint | None, run_dir: Path, info: DistInfo, device: torch.device, resumed: bool,
           t_start: float) -> Path:
    # A resumed run keeps its global batch (--resume refuses another --batch-size): the process count is what changes.
    # "--batch-size 5 must divide by the 2 processes" had asked a resume for a flag it would refuse.
    kept = f"this run's global batch ({cfg.batch_size}, in its config.yaml)"
    # The process counts a resume can use: those that divide the batch, with two images a process off CUDA (the advice
    # "a count that divides 5" had led to 5 processes, then to "at most 2", which none of 5's divisors but 1 is).
    counts = [n for n in range(1, cfg.batch_size + 1) if cfg.batch_size % n == 0
              and (device.type == "cuda" or n == 1 or cfg.batch_size // n >= 2)]
    can = "a single process" if counts == [1] else f"{', '.join(map(str, counts[:-1]))} or {counts[-1]} processes"
    if cfg.batch_size % info.world:
        if resumed:
            raise ConfigError(f"{kept} cannot be split over {info.world} processes; resume it with {can}")
        raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) must divide by the {info.world} processes")
    if info.active and device.type != "cuda" and cfg.batch_size // info.world < 2:
        # Batch norm is per process off CUDA (SyncBatchNorm needs NCCL): one image a process stopped every rank with
        # "Expected more than 1 value per channel", or, at larger sizes, trained batch norm on single images.
        if resumed:
            raise ConfigError(f"{kept} over {info.world} processes is {cfg.batch_size // info.world} image per "
                              f"process; batch norm needs two: resume it with {can}")
        raise ConfigError(f"--batch-size {cfg.batch_size} over {info.world} processes is "
                          f"{cfg.batch_size // info.world} image per process; batch norm needs two: use --batch-size "
                          f"{2 * info.world} or more")
    if not info.main:  # one log, from rank 0; the others say only what happened to them alone, and errors
        logging.getLogger("cxr").setLevel(OWN_WARNING)
    made_folders: list[Path] = []  # what a new run that fails its data checks removes again: only what it created
    made_files: list[Path] = []
    if info.main:
        check_writable(run_dir, folder=True)  # a read-only output fails now, not after the cache build
        for name in ("best.pt", "last.pt", "history.csv", "metrics.json", "summary.json", "split.csv"):
            check_writable(run_dir / name)  # a folder of that name failed after the first epoch
        made_folders = missing_folders(run_dir)
        ensure_dir(run_dir)
        if resumed:
            for p in remove_stale_temps(run_dir):  # left by a process killed while writing
                log.info("removed %s, a partial write from the interrupted run", p.name)
        else:  # now: a run killed during its cache build can be resumed
            made_files = [run_dir / name for name in ("split.csv", "config.yaml") if not (run_dir / name).exists()]
            save_config(cfg, run_dir / "config.yaml")
    if resumed and not Path(cfg.data).is_absolute() and not Path(cfg.data).exists():
        raise DataError(f"{run_dir / 'config.yaml'}: data: {cfg.data} is relative to the folder the run was started "
                        "from; resume from there, or write its absolute path into config.yaml")
    if cfg.deterministic:
        # On CUDA some kernels have no deterministic form (adaptive average pooling's backward, in DenseNet and ResNet
        # alike): strict mode would stop the run at its first backward pass, so there PyTorch warns of them instead.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        if device.type == "cuda" and info.main:
            log.warning("--deterministic on CUDA: kernels without a deterministic form (PyTorch names them as they "
                        "run) still vary from run to run; bit-repeatable runs need the CPU")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not cfg.deterministic
    bf16, channels_last = use_bf16(cfg, device), use_channels_last(cfg, device)

    try:
        with local_main_first(info):  # one hashing and cache build per node; the node's other ranks reuse them
            # Without a last.pt nothing was trained: the split is carved again (the same one, from the same files and
            # seed), not read from a split.csv whose paths may be where the data was (it had moved: every image gone).
            splits = split_dataset(cfg, run_dir, resumed and state is not None, write=info.main,
                                   recorded_data=state.config.data if state is not None else None)
            if info.active:  # the pixels once per node, in one file every rank maps, not once per rank
                prepared = {name: prepare_shared(split, cfg, build=info.local_rank == 0)
                            for name, split in splits.items()}
            else:
                prepared = {name: prepare(split, cfg) for name, split in splits.items()}
        # Before the class check, which every rank then takes alike, and before any step: each node scans and
        # prepares its own copy of the data, and one with an extra image had trained on another split without a word
        # (one with an unreadable image hung in the first all-reduce for CXR_DIST_TIMEOUT).
        _check_every_rank_has_the_same_data(prepared, cfg.data, info)
        if info.main:
            _warn_of_changed_images(splits, prepared, run_dir)
            if not (resumed and state is not None):
                _record_what_was_read(splits, prepared, run_dir)
        for name in ("train", "val"):
            if len(prepared[name].labels) == 0 or len(set(prepared[name].labels.tolist())) < 2:
                raise DataError(f"the {name} split has too few readable images of each class "
                                f"({len(prepared[name].failures)} unreadable)")
    except Exception:
        if info.main and not resumed:  # a new run refused for its data leaves no run directory to mistake for one
            for p in made_files:
                p.unlink(missing_ok=True)
            remove_empty_folders(made_folders)
        raise
    if resumed and info.main:
        # Only now: a resume that fails its checks (its data moved, say) leaves the run's config as it was.
        save_config(cfg, run_dir / "config.yaml")
    summary = {
        "data": cfg.data,
        "counts": {n: dict(zip(CLASS_NAMES, np.bincount(p.labels, minlength=2).tolist(), strict=True))
                   for n, p in prepared.items()},
        "unreadable": {n: [{"path": f, "reason": r} for f, r in p.failures] for n, p in prepared.items()},
    }
    not_found = {n: [{"path": f, "reason": r} for f, r in split.not_found] for n, split in splits.items()
                 if split.not_found}
    if not_found:  # files a CSV listing names that are not there (the console's warning had named the first alone)
        summary["not_found"] = not_found
    log.info("data: %s", ", ".join(f"{n} {sum(c.values())} ({c['NORMAL']} NORMAL / {c['PNEUMONIA']} PNEUMONIA)"
                                   for n, c in summary["counts"].items()))
    n_bad = sum(len(v) for v in summary["unreadable"].values())
    if n_bad:
        log.warning("%d unreadable image(s) skipped (listed in summary.json)", n_bad)

    seed_everything(cfg.seed)
    # A resumed run's weights come from last.pt: its starting weights (a local file, or ImageNet's from the hub) need
    # not be at hand any more, on an offline node say.
    model = build_model(cfg.arch, cfg.weights if state is None else "none")
    if info.active and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.plateau_factor,
                                                         patience=cfg.plateau_patience) \
        if cfg.scheduler == "plateau" else None
    weights = class_weights(prepared["train"].labels) if cfg.class_weights else None
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing, reduction="sum").to(device)

    history: list[dict] = []
    start_epoch, best_loss, bad_epochs, stop_reason = 0, math.inf, 0, ""
    patience_loss = math.inf  # the loss early stopping last saw fall by more than min_delta (best_loss: best.pt's)
    # best.pt where it is the weight average of an earlier session: (its epochs, its loss). A later averaging epoch
    # or average must beat its loss, not only the best single epoch's (one between the two had replaced it).
    kept_average: tuple[list[int], float] | None = None
    swa_start: int | None = None  # the first weight-averaging epoch (0-based), once the schedule is over
    if state is not None:
        model.load_state_dict(state.state_dict)
        optimizer.load_state_dict(state.extra["optimizer"])
        if plateau is not None and "plateau" in state.extra:
            plateau.load_state_dict(state.extra["plateau"])
        history = list(state.extra["history"])
        start_epoch = state.epoch
        best_loss, bad_epochs = state.extra["best_val_loss"], state.extra["bad_epochs"]
        patience_loss = state.extra.get("patience_val_loss", best_loss)  # absent before 12/2026: one loss for both
        stop_reason = state.extra.get("stop_reason", "")
        swa_start = state.extra.get("swa_start")
        if swa_start is None and stop_reason.startswith("finished") and cfg.epochs > start_epoch:
            stop_reason = ""  # resumed with a larger --epochs: train on (the cosine schedule stretches to the new end)
        kept_average = _kept_average(run_dir)
        log.info("resuming %s after epoch %d", run_dir, start_epoch)
        if info.main:
            _mark_in_progress(run_dir, start_epoch)
    # What this session computes with, recorded with each session that trains an epoch: a run repeats bit for bit only
    # with the same threads, processes, device, arithmetic and torch (2 threads against 1 gave another model).
    session = {"after_epoch": start_epoch, "epochs": cfg.epochs, "swa_epochs": cfg.swa_epochs,
               "threads": torch.get_num_threads(), "processes": info.world, "device": str(device), "bf16": bf16,
               "channels_last": channels_last, "torch": str(torch.__version__),  # a str, not TorchVersion (pickled)
               "preprocessing": PREPROCESS_VERSION}  # cxr's decoding: another reads some images otherwise
    sessions = list(state.extra.get("sessions", [])) if state is not None else []
    if state is not None and not sessions:  # a run of a cxr before sessions were recorded: what its summary says
        sessions = [_unrecorded_session(run_dir)]
    recorded_threads = sessions[-1].get("threads") if sessions else None
    if cfg.deterministic and device.type == "cpu" and recorded_threads and recorded_threads != session["threads"]:
        # Bit-repeatable asks for the run's own thread count: the CPU kernels' sums depend on it.
        torch.set_num_threads(recorded_threads)
        if info.main:
            log.info("--deterministic: %d threads, as the run's earlier sessions (this process had %d)",
                     recorded_threads, session["threads"])
        session["threads"] = recorded_threads
    if sessions and info.main:
        _warn_of_changed_arithmetic(sessions[-1], session)
    if info.main:
        _write_history(run_dir / "history.csv", history)

    batches = TrainBatches(prepared["train"], cfg, rank=info.rank, world=info.world, device=device)
    if cfg.num_workers == "auto" and batches.workers and info.main:
        log.info("loader: %d worker processes%s (num_workers auto; set --num-workers to change)", batches.workers,
                 " per rank" if info.world > 1 else "")
    steps_per_epoch = batches.steps_per_epoch
    total_steps = steps_per_epoch * cfg.epochs
    step_model: nn.Module = model
    if info.active:
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                         else None)
    if cfg.compile:
        step_model = torch.compile(step_model)

    averaged = _averaged_model(model, cfg, device, channels_last, state)
    epochs_left = (start_epoch < cfg.epochs and not stop_reason or averaged is not None
                   and (swa_start is None or start_epoch < swa_start + cfg.swa_epochs))
    watch = ContentionWatch(1)  # a no-op, except on the CPU
    if device.type == "cpu" and info.main and epochs_left:
        # Here, once the data and model are ready, so that a run that fails on its input says only why.
        warned = warn_if_cpu_contended(torch.get_num_threads())
        watch = ContentionWatch(1 if warned else torch.get_num_threads())
    epoch = start_epoch - 1
    while True:
        epoch += 1
        if swa_start is None and (stop_reason or epoch >= cfg.epochs):
            if averaged is None:
                break
            swa_start = epoch  # the schedule is over (or stopped early): weight averaging follows
            log.info("%s; now %d epoch(s) of weight averaging at lr %.2e", stop_reason or "schedule over",
                     cfg.swa_epochs, cfg.swa_lr)
        if swa_start is not None and epoch >= swa_start + cfg.swa_epochs:
            break
        # Seeded per epoch (and rank), so a resumed run draws the same batches and augmentations as an
        # uninterrupted one.
        torch.manual_seed(cfg.seed * 100_019 + epoch + 7_919 * info.rank)
        loader = batches.loader(epoch)
        row: dict = {"epoch": epoch + 1}
        watch.begin()
        row.update(train_one_epoch(step_model, loader, criterion, optimizer, cfg=cfg, device=device, bf16=bf16,
                                   channels_last=channels_last, epoch=epoch, steps_per_epoch=steps_per_epoch,
                                   total_steps=total_steps, info=info,
                                   constant_lr=cfg.swa_lr if swa_start is not None else None))
        watch.check(row["images_per_s"])
        if averaged is not None and swa_start is not None:
            averaged.update_parameters(model)
        row["lr"] = optimizer.param_groups[0]["lr"]  # at the epoch's last step
        if info.main and not _finite(model.state_dict().values()):
            # Checked before validation, whose AUROC raised scikit-learn's "Input contains NaN" on such weights (a
            # traceback, and under DDP the other ranks left waiting); they are never validated nor saved.
            val = {"bad_weights": 1.0}
        else:
            val = validate(model, prepared["val"], criterion, cfg=cfg, device=device, bf16=bf16,
                           channels_last=channels_last) if info.main else {}
        keys = ("val_loss", "val_acc", "val_auroc", "bad_weights")
        row.update(zip(keys, broadcast_floats([val.get(k, 0.0) for k in keys], device), strict=True))
        if row.pop("bad_weights"):
            raise TrainingError(f"the weights hold NaN or infinite values after epoch {epoch + 1}; stopped{_KEPT}")
        if not math.isfinite(row["val_loss"]):
            raise TrainingError(f"the validation loss is {row['val_loss']} after epoch {epoch + 1}; stopped{_KEPT}")
        if plateau is not None and swa_start is None:
            plateau.step(row["val_loss"])
        history.append(row)
        # best.pt: the lowest validation loss, as README says. min_delta is early stopping's alone (as Lightning's
        # ModelCheckpoint and EarlyStopping have it): it had decided best.pt too, which kept epoch 1 at 0.757 over
        # epoch 2 at 0.658 for min_delta 0.1, with early stopping off.
        average_loss = kept_average[1] if kept_average else math.inf
        improved = row["val_loss"] < min(best_loss, average_loss)
        if improved:
            best_loss = row["val_loss"]
        if row["val_loss"] < min(patience_loss, average_loss) - cfg.min_delta:
            patience_loss, bad_epochs = row["val_loss"], 0
        else:
            bad_epochs += 1
        if swa_start is not None:
            pass  # the averaging epochs all run: early stopping ended the schedule, not them
        elif epoch + 1 == cfg.epochs:  # first: patience that runs out on the last epoch stopped nothing (and a run
            # said to have stopped early cannot be extended)
            stop_reason = f"finished {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}"
        elif cfg.patience and bad_epochs >= cfg.patience:
            stop_reason = f"early stopping: no better validation loss for {cfg.patience} epochs"
        if info.main:
            swa_state = {"swa_start": swa_start, "swa": averaged.state_dict()} if swa_start is not None else {}
            _save_epoch(run_dir, model, optimizer, plateau, cfg, row, history, best_loss, bad_epochs, stop_reason,
                        improved, {**swa_state, "sessions": [*sessions, session], "patience_val_loss": patience_loss})
        log.info("epoch %d/%d  lr %.2e  train loss %.4f acc %.3f  val loss %.4f acc@0.5 %.3f auroc %.3f  "
                 "%.0f s  %.1f img/s  data wait %.0f%%%s", epoch + 1,
                 cfg.epochs if swa_start is None else swa_start + cfg.swa_epochs, row["lr"], row["train_loss"],
                 row["train_acc"], row["val_loss"], row["val_acc"], row["val_auroc"], row["seconds"],
                 row["images_per_s"], 100 * row["data_wait"], "  *best*" if improved else "")
    swa_summary = None
    if averaged is not None and swa_start is not None and info.main:
        first, last = swa_start + 1, len(history)
        # Against an earlier session's average in best.pt too; not against this very average (kept by a finish that
        # was interrupted after it and runs again: the outcome is the same).
        earlier = kept_average[1] if kept_average and kept_average[0] != [first, last] else math.inf
        swa_summary = _finish_averaging(averaged, run_dir, prepared, criterion, cfg, device, best_loss,
                                        first=first, last=last, earlier_average=earlier)
        # Counted, not cfg.swa_epochs: a resume with a lower --swa-epochs than the epochs already averaged keeps them.
        stop_reason += f", then {len(history) - swa_start} epoch(s) of weight averaging"
    if stop_reason:
        log.info("%s", stop_reason)  # after the averaging epochs, the whole story: "finished 20 epochs, then 8 ..."
    if not info.main:
        barrier()  # wait for rank 0's evaluation, so no rank exits while the group is still in use
        return run_dir

    metrics, best = finish(run_dir, prepared, cfg, device)
    averaged_epochs = best.extra.get("averaged_epochs")
    if averaged_epochs and swa_summary is None:
        # best.pt is the weight average of an earlier session of this run (resumed with --swa-epochs 0 since): its
        # entry as that session wrote it, whole (without its rate and the best epoch's loss, the report had left it
        # out and named the best epoch's weights the model)
        earlier = _read_summary(run_dir).get("swa")
        same = isinstance(earlier, dict) and [earlier.get("first_epoch"), earlier.get("last_epoch")] == averaged_epochs
        swa_summary = {**({"lr": cfg.swa_lr, "best_epoch_val_loss": best_loss} if not same else earlier),
                       "first_epoch": averaged_epochs[0], "last_epoch": averaged_epochs[1], "val_loss": best.val_loss,
                       "kept": True}
        swa_summary.pop("best_pt_average", None)
        stop_reason += f", then weight averaging of {_epoch_range(*averaged_epochs)}"
    elif averaged_epochs and swa_summary is not None and not swa_summary["kept"]:
        # this session's average was not kept: best.pt is still an earlier one (it had been named as this one)
        swa_summary["best_pt_average"] = {"first_epoch": averaged_epochs[0], "last_epoch": averaged_epochs[1],
                                          "val_loss": best.val_loss}
    summary.update({"stop_reason": stop_reason, "epochs_run": len(history),
                    "skipped_batches": sum(int(h.get("skipped_batches", 0)) for h in history),
                    # best.pt's epoch: None where it is a weight average
                    "best_epoch": None if averaged_epochs else best.epoch,
                    "swa": swa_summary,
                    "wall_seconds_this_session": round(time.perf_counter() - t_start, 1),
                    "device": str(device), "processes": info.world, "bf16": bf16, "channels_last": channels_last,
                    "threads": torch.get_num_threads(),
                    # the sessions that trained epochs: config.yaml holds the last one's epochs only
                    "sessions": [*sessions, session] if len(history) > start_epoch else sessions})
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    barrier()
    val_m = metrics["val"]
    which = f"average of {_epoch_range(*averaged_epochs)}" if averaged_epochs else f"epoch {best.epoch}"
    log.info("best checkpoint (%s): val accuracy %.3f, sensitivity %.3f, specificity %.3f, AUROC %.3f at "
             "threshold %s -> %s", which, val_m["accuracy"], val_m["recall"], val_m["specificity"],
             val_m["auroc"], val_m.get("threshold_shown") or threshold_text(val_m["threshold"]), run_dir)
    return run_dir


_ARITHMETIC = ("threads", "processes", "device", "bf16", "channels_last", "torch", "preprocessing")


def _unrecorded_session(run_dir: Path) -> dict:
    """The earlier sessions of a run made before cxr recorded them, as far as its summary.json tells (its device,
    processes and arithmetic; not its threads or torch)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    known = {k: summary[k] for k in ("device", "processes", "bf16", "channels_last") if k in summary}
    return {"after_epoch": 0, **known, "recorded": False}


def _warn_of_changed_arithmetic(before: dict, now: dict) -> None:
    """Say when a resumed run computes otherwise than its last session did: it goes on as well, but not as the run
    would have gone on (a resume with 1 thread where it had 2 chose another threshold, 0.452 for 0.173)."""
    changed = [f"{k} {before[k]} -> {now[k]}" for k in _ARITHMETIC if k in before and before[k] != now[k]]
    if changed:
        log.warning("this session computes otherwise than the run's last one (%s): the run goes on, but will not be "
                    "bit-identical to one that ran through in one setting (summary.json lists its sessions)",
                    ", ".join(changed))
    unknown = [k for k in _ARITHMETIC if k not in before]
    if before.get("recorded") is False and unknown:  # a run of a cxr before sessions: nothing to compare (or pin)
        log.warning("the run's earlier sessions did not record their %s (an older cxr): this one goes on with %s, and "
                    "is bit-identical to a run that went through only where those are the same", ", ".join(unknown),
                    ", ".join(f"{k} {now[k]}" for k in unknown))


def _kept_average(run_dir: Path) -> tuple[list[int], float] | None:
    """best.pt's averaged epochs and validation loss where it is a weight average, else None."""
    try:
        best = load_checkpoint(run_dir / "best.pt")
    except CxrError:
        return None
    epochs = best.extra.get("averaged_epochs")
    return (list(epochs), best.val_loss) if epochs else None


def _epoch_range(first: int, last: int) -> str:
    """``epochs 2-3``, or ``epoch 4`` for one."""
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"


def _save_epoch(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, plateau, cfg: Config, row: dict,
                history: list[dict], best_loss: float, bad_epochs: int, stop_reason: str, improved: bool,
                state: dict) -> None:
    """best.pt when validation improved, then last.pt (with optimiser state, the sessions that trained the run and,
    while averaging, the running average: ``state``), then history.csv: each atomic."""
    _check_still_held(run_dir)
    weights_now = model.state_dict()
    if improved:
        save_checkpoint(Checkpoint(cfg.arch, weights_now, cfg, epoch=row["epoch"], val_loss=row["val_loss"]),
                        run_dir / "best.pt")
    extra = {"optimizer": optimizer.state_dict(), "history": history, "best_val_loss": best_loss,
             "bad_epochs": bad_epochs, "stop_reason": stop_reason, **state}
    if plateau is not None:
        extra["plateau"] = plateau.state_dict()
    save_checkpoint(Checkpoint(cfg.arch, weights_now, cfg, epoch=row["epoch"], val_loss=row["val_loss"], extra=extra),
                    run_dir / "last.pt")
    _write_history(run_dir / "history.csv", history)


def _averaged_model(model: nn.Module, cfg: Config, device: torch.device, channels_last: bool,
                    state: Checkpoint | None) -> torch.optim.swa_utils.AveragedModel | None:
    """The running weight average of the SWA epochs (None when ``cfg.swa_epochs`` is 0), restored on resume.

    It averages a plain copy of the model, with ordinary batch norm even when training uses SyncBatchNorm, so that
    rank 0 alone can recompute its statistics at the end. Every rank keeps one (the parameters are the same on all).
    """
    if not cfg.swa_epochs:
        return None
    plain = build_model(cfg.arch, "none").to(device)
    if channels_last:
        plain = plain.to(memory_format=torch.channels_last)
    plain.load_state_dict(model.state_dict())
    averaged = torch.optim.swa_utils.AveragedModel(plain)
    if state is not None and "swa" in state.extra:
        averaged.load_state_dict(state.extra["swa"])
    return averaged


def recompute_batch_norm(model: nn.Module, train: Prepared, cfg: Config, device: torch.device, epoch: int) -> None:
    """Batch-norm running statistics of ``model`` recomputed from scratch over one pass of augmented training batches
    (``epoch`` draws the augmentations), with ``torch.optim.swa_utils.update_bn``: averaged weights never ran with the
    statistics of any one epoch.

    Augmented, as training normalised them: on the bundled model's run, statistics from the un-augmented images raised
    the validation loss of the last epoch's own weights from 0.068 to 0.098, and augmented ones lowered it to 0.056.
    """
    bf16, channels_last = use_bf16(cfg, device), use_channels_last(cfg, device)
    batches = TrainBatches(train, cfg, device=device)
    loader = batches.loader(epoch)
    inputs = (normalize(x.to(device, non_blocking=True), cfg.mean, cfg.std, channels_last)
              for _, (x, _) in zip(range(batches.steps_per_epoch), loader, strict=False))
    with torch.no_grad(), autocast(device, bf16):
        torch.optim.swa_utils.update_bn(inputs, model)
    model.eval()


def _finish_averaging(averaged: torch.optim.swa_utils.AveragedModel, run_dir: Path, prepared: dict[str, Prepared],
                      criterion: nn.CrossEntropyLoss, cfg: Config, device: torch.device, best_loss: float, *,
                      first: int, last: int, earlier_average: float = math.inf) -> dict:
    """Batch-norm statistics for the average, its validation loss, swa.pt; and best.pt when its loss is lowest (below
    the best single epoch's, ``best_loss``, and an earlier session's average's in best.pt, ``earlier_average``).

    Run again on resume if the process died here: the average is in last.pt, and the outcome is the same.
    """
    model = averaged.module
    recompute_batch_norm(model, prepared["train"], cfg, device, epoch=last)
    val = validate(model, prepared["val"], criterion, cfg=cfg, device=device, bf16=use_bf16(cfg, device),
                   channels_last=use_channels_last(cfg, device))
    ckpt = Checkpoint(cfg.arch, model.state_dict(), cfg, epoch=last, val_loss=val["val_loss"],
                      extra={"averaged_epochs": [first, last]})
    save_checkpoint(ckpt, run_dir / "swa.pt")
    kept = val["val_loss"] < min(best_loss, earlier_average)
    if kept:
        save_checkpoint(ckpt, run_dir / "best.pt")
    log.info("weight average of %s: val loss %.4f acc@0.5 %.3f auroc %.3f (best single epoch: %.4f) -> %s",
             _epoch_range(first, last), val["val_loss"], val["val_acc"], val["val_auroc"], best_loss,
             "best.pt" if kept else "swa.pt only")
    return {"first_epoch": first, "last_epoch": last, "lr": cfg.swa_lr, **val, "best_epoch_val_loss": best_loss,
            "kept": kept}


def finish(run_dir: Path, prepared: dict[str, Prepared], cfg: Config,
           device: torch.device) -> tuple[dict, Checkpoint]:
    """Choose the threshold on validation with ``best.pt``, store it there, and evaluate it on every split.

    In fp32 (TF32 off on CUDA) whatever the training's arithmetic, as ``cxr evaluate`` computes by default: the
    threshold is chosen on the probabilities it will be applied to, and the metrics are those ``cxr evaluate`` gives.
    Returns the metrics and best.pt."""
    best = load_checkpoint(run_dir / "best.pt")
    model = best.build(device)
    channels_last = use_channels_last(dataclasses.replace(cfg, amp="off"), device)  # evaluate's memory format too
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    results = []
    with exact_fp32(device):
        for name, p in prepared.items():
            if not len(p.labels):  # a test split of unreadable files only: write the rest, not a traceback
                log.warning("%s split: no readable image, so no metrics for it (summary.json lists the unreadable "
                            "files)", name)
                continue
            logits = predict_logits(model, p.images, mean=cfg.mean, std=cfg.std, device=device,
                                    batch_size=cfg.eval_batch_size, bf16=False, channels_last=channels_last,
                                    progress=f"evaluating {name}")
            results.append(SplitResult(name, [s.path for s in p.samples], p.labels, probabilities(logits),
                                       patients_of(p.samples)))
    val = next(r for r in results if r.name == "val")
    best.threshold = choose_threshold(val.labels, val.probs, cfg.threshold_policy, cfg.target_sensitivity)
    best.threshold_policy = cfg.threshold_policy if cfg.threshold_policy == "youden" else \
        f"sensitivity>={cfg.target_sensitivity}"
    save_checkpoint(best, run_dir / "best.pt")
    extra = {r.name: {"inference_dtype": "float32"} for r in results}
    # As `cxr evaluate` counts them: test images this model (or the one it was fine-tuned from) was trained or
    # validated on. The run's own metrics had carried no such count, nor its report a word.
    from cxr.evaluate import count_development, development_images
    from cxr.export import model_id

    developed_on = development_images(best, model_id(best))
    for name, p in prepared.items():
        # Not its own train split: trained on, of course, whichever run's images it holds too.
        if developed_on is not None and name in extra and name != "train":
            extra[name].update(count_development(developed_on, name, p.samples))
    return write_evaluation(run_dir, results, best.threshold, extra=extra), best


"""One frozen config for a run: defaults, overlaid by a YAML file, then by command-line flags.

The resolved config is written to ``RUN_DIR/config.yaml`` and into every checkpoint, so a run can be
repeated from either.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from cxr.errors import ConfigError, UsageError

CLASS_NAMES: tuple[str, str] = ("NORMAL", "PNEUMONIA")

# The torchvision classifiers cxr builds (a one-channel stem and a two-class head; cxr.model).
ARCHS = ("densenet121", "densenet161", "densenet169", "densenet201", "resnet18", "resnet34", "resnet50")

# Mean and std of ImageNet's three channels, averaged: the grey-level statistics that one-channel
# ImageNet-pretrained weights (first convolution summed over RGB) expect.
GRAY_MEAN = 0.449
GRAY_STD = 0.226
DEFAULT_MAX_PIXELS = 100_000_000  # an image of more pixels is refused (a decompression bomb, or not an X-ray)
MAX_IMAGE_SIZE = 4096  # a side in pixels: beyond the originals' ~2000 px, and 4096^2 bytes an image in the cache
MAX_PER_GROUP = 50  # images per group of the report's prediction grid: more is no picture a page can show
MAX_VIDEO_IMAGES = 10_000  # in the report's video: nearly three hours at a second each
MAX_UPLOAD_MB = 1000  # the service holds an upload in memory whole: beyond this, a few workers run out of it


def compiles_as_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def default_cache_dir() -> str:
    """Where decoded images are cached unless told otherwise (``$CXR_CACHE_DIR`` or the XDG cache)."""
    if os.environ.get("CXR_CACHE_DIR"):
        return os.environ["CXR_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cxr")


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # "max 100000", or "200000 100000" for 2 CPUs


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, and a container's CPU quota (cgroup v2 ``cpu.max``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text(encoding="utf-8").split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


@dataclass(frozen=True)
class Config:
    """Everything that decides what a training run does.

    Groups: data and split, preprocessing and augmentation, model, optimisation, speed switches,
    decision threshold. Every field can be set in YAML under its own name; the common ones also have flags.
    """

    # Data
    data: str = ""
    output: str = "runs/cxr"
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)
    val_source: str = "carve"  # "carve": patient-disjoint split from train; "folder": the dataset's own val split
    val_fraction: float = 0.15
    split_seed: int = 0
    # A regular expression searched in each image's path below its class folder (with "/" between folders); its first
    # group (or the whole match) is the patient id, before any other rule: "^([^/]+)/" for one folder per patient.
    patient_pattern: str = ""
    max_pixels: int = DEFAULT_MAX_PIXELS
    # DataLoader workers per process, or "auto": 0 on the CPU (batches come from the in-memory cache), up to 8 per
    # process on CUDA, where the per-image augmentation on the CPU is what limits a GPU (cxr.train.loader_workers)
    num_workers: int | str = "auto"
    draft: bool = False  # JPEG draft-mode decoding when building the cache (faster on big originals)

    # Preprocessing and augmentation (training only)
    image_size: int = 224
    mean: float = GRAY_MEAN
    std: float = GRAY_STD
    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    translate: float = 0.05  # fraction of the side
    scale_min: float = 0.9
    scale_max: float = 1.1
    brightness: float = 0.2
    contrast: float = 0.2
    hflip: bool = False  # off: a mirrored chest (heart on the right) is not an image the model will ever be shown

    # Model
    arch: str = "densenet121"
    weights: str = "none"  # "imagenet", "none", a local state dict, or a cxr model to fine-tune ("default", ...)

    # Optimisation
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # "cosine" (linear warm-up, then cosine), "plateau" or "none"
    warmup_epochs: float = 1.0  # cosine's warm-up (at most half the run); plateau and none have none
    plateau_factor: float = 0.1
    plateau_patience: int = 2
    label_smoothing: float = 0.0
    class_weights: bool = True
    patience: int = 5  # early stopping on validation loss; 0 switches it off
    # early stopping: a fall of the validation loss by no more than this is none (best.pt is the lowest loss whatever)
    min_delta: float = 0.0
    max_train_batches: int = 0  # cap per epoch (0: no cap); for smoke tests and demos
    nan_policy: str = "stop"  # a non-finite loss: "stop" the run (last good checkpoint kept) or "skip" the batch
    # Stochastic weight averaging (Izmailov et al. 2018): after the schedule (or early stopping), this many more
    # epochs at the constant rate swa_lr, averaging the weights at the end of each; 0: off
    swa_epochs: int = 0
    swa_lr: float = 1e-4

    # Speed switches: correctness is the default, speed is on where it helps
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 where the device has fast bf16) | on | off
    channels_last: str = "auto"  # auto (on for CUDA, and for bf16 on the CPU) | on | off
    compile: bool = False
    deterministic: bool = False
    seed: int = 0
    eval_batch_size: int = 64

    # Decision threshold, chosen on validation after training
    threshold_policy: str = "youden"  # "youden" or "sensitivity"
    target_sensitivity: float = 0.97

    def __post_init__(self) -> None:
        # Every field as its own type, however it was set (dataclasses.replace, a NumPy scalar from a sweep, a Path):
        # epochs=1.5 trained, then no checkpoint of the run could be read back, and np.float64 stopped the YAML.
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))

    def validate(self) -> Config:
        """Raise UsageError naming the first field that makes no sense; return self otherwise."""
        for name, value in self.to_dict().items():  # inf and NaN pass most comparisons below, then crash mid-run
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"invalid config: {name} must be a finite number, got {value}")
        checks = [
            (self.arch in ARCHS, f"arch must be one of {', '.join(ARCHS)}"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2 (batch norm needs two images per batch)"),
            # DenseNet's four halvings and three poolings leave nothing of a 28 px image (a traceback once the data
            # had been hashed, cached and split); 32 px for it, as for the .npz's 28 px images (resized up).
            (self.image_size >= (32 if self.arch.startswith("densenet") else 16),
             f"image_size must be >= {32 if self.arch.startswith('densenet') else 16} for {self.arch}"),
            # 100000 had passed, to a MemoryError (382 GiB) when the cache was allocated; the originals are ~2000 px
            (self.image_size <= MAX_IMAGE_SIZE, f"image_size must be <= {MAX_IMAGE_SIZE} (a side in pixels)"),
            (self.lr > 0, "lr must be > 0"),
            (0.0 < self.val_fraction <= 0.5, "val_fraction must be above 0 and at most 0.5 (the split is made of "
             "folds, at least 2)"),
            (0 <= self.split_seed < 2**32, "split_seed must be from 0 to 2**32 - 1"),
            (not self.patient_pattern or compiles_as_regex(self.patient_pattern),
             f"patient_pattern is not a regular expression Python can compile: {self.patient_pattern!r}"),
            (0 <= self.seed < 2**32, "seed must be from 0 to 2**32 - 1"),
            (self.max_pixels >= 1, "max_pixels must be >= 1"),
            (self.num_workers == "auto" or (type(self.num_workers) is int and self.num_workers >= 0),
             "num_workers must be auto or a whole number >= 0"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (0.0 < self.plateau_factor < 1.0, "plateau_factor must be between 0 and 1"),
            (self.plateau_patience >= 0, "plateau_patience must be >= 0"),
            (self.patience >= 0, "patience must be >= 0 (0 switches early stopping off)"),
            (self.min_delta >= 0, "min_delta must be >= 0"),
            (self.max_train_batches >= 0, "max_train_batches must be >= 0 (0: no cap)"),
            (min(self.rotation, self.translate, self.brightness, self.contrast) >= 0,
             "rotation, translate, brightness and contrast must be >= 0"),
            (self.translate <= 1, "translate must be at most 1 (a fraction of the side)"),
            (self.val_source in ("carve", "folder"), "val_source must be 'carve' or 'folder'"),
            (self.scheduler in ("cosine", "plateau", "none"), "scheduler must be cosine, plateau or none"),
            (self.amp in ("auto", "on", "off"), "amp must be auto, on or off"),
            (self.channels_last in ("auto", "on", "off"), "channels_last must be auto, on or off"),
            (self.threshold_policy in ("youden", "sensitivity"), "threshold_policy must be youden or sensitivity"),
            (0.0 < self.target_sensitivity <= 1.0, "target_sensitivity must be in (0, 1]"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
            (0 < self.scale_min <= self.scale_max, "scale_min must be > 0 and <= scale_max"),
            (self.std > 0, "std must be > 0"),
            (self.nan_policy in ("stop", "skip"), "nan_policy must be stop or skip"),
            (self.swa_epochs >= 0, "swa_epochs must be >= 0"),
            (self.swa_lr > 0, "swa_lr must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid config: {message}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (YAML- and JSON-safe)."""
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in fields(Config)}
_AUTO_OR_INT = {"num_workers"}  # "auto", or a number that replaces it
_PATH_FIELDS = {"data", "output", "cache_dir", "weights"}


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML or flag value to the type of the field's default, with a clear error."""
    default = _FIELDS[name].default
    if default is dataclasses.MISSING:
        default = _FIELDS[name].default_factory()  # type: ignore[misc]
    target = type(default)
    if value is None:  # `key:` or `key: ~` in YAML, which would silently replace the default with nothing
        raise ConfigError(f"invalid config: {name} has no value (give one, or leave the line out for the default)")
    if name in _PATH_FIELDS and isinstance(value, str) and value.startswith("~"):
        # A shell expands ~ in a flag; a YAML file does not: `cache_dir: ~/.cache/x` had made a folder named "~".
        expanded = os.path.expanduser(value)
        if expanded.startswith("~"):
            raise ConfigError(f"invalid config: {name} {value!r}: no such user's home folder here")
        return expanded
    if name in _AUTO_OR_INT:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str) and value.strip().isdecimal():
            return int(value)
        raise ConfigError(f"invalid config: {name} must be auto or a whole number, got {value!r}")
    if target is str and isinstance(value, bool):  # YAML 1.1 reads on/off and yes/no as booleans
        return "on" if value else "off"
    if target in (int, float) and isinstance(value, bool):  # `patience: yes` became 1, `lr: true` 1.0
        raise ConfigError(f"invalid config: {name} must be {target.__name__}, got {value!r}")
    if type(value) is target:
        return value
    if target is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if target is str and isinstance(value, list | dict | tuple | set):  # `output: [a, b]` made a folder "['a', 'b']"
        raise ConfigError(f"invalid config: {name} must be a single value, got {value!r}")
    try:
        if target is bool:
            if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):  # np.True_
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            raise ValueError
        if target is int and not isinstance(value, (numbers.Integral, str)):  # 2.0 is 2; 1.5 (np.float32 too) is no int
            if not float(value).is_integer():
                raise ValueError
            return int(float(value))
        return target(value)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid config: {name} must be {target.__name__}, got {value!r}") from None


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                base: Config | None = None) -> Config:
    """Build a Config from defaults (or ``base``), then a YAML file, then ``overrides`` (None values ignored).

    Args:
        path: YAML file whose top level is a mapping of field names to values.
        overrides: values from flags; keys are field names.
        base: start from this config instead of the defaults (used by ``--resume``).
    """
    if overrides is not None and not isinstance(overrides, Mapping):
        raise UsageError(f"overrides must be a mapping of config fields to values, got {type(overrides).__name__}")
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise UsageError(f"{p}: a folder, not a config file")
        if not p.is_file():
            raise UsageError(f"config file not found: {p}")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader)
            loaded = {} if loaded is None else loaded  # an empty file; not [] or 0, which are no mapping either
        except UnicodeDecodeError as e:  # a Latin-1 editor's "é": a traceback before
            raise UsageError(f"{p}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); save it as "
                             "UTF-8") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None)
            raise UsageError(f"{p}: not valid YAML{where} ({problem or e.__class__.__name__})") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"{p}: the top level must be a mapping of config fields")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    # str(): YAML reads `2:` and `yes:` as an int and a bool, which had ended in a TypeError of the join
    unknown = sorted(str(k) for k in set(values) - set(_FIELDS))
    if unknown:
        import difflib

        close = {k: difflib.get_close_matches(k.replace("-", "_"), list(_FIELDS), n=1) for k in unknown}
        hints = [f"{k} (did you mean {m[0]}?)" if m else k for k, m in close.items()]
        raise ConfigError(f"unknown config field(s): {', '.join(hints)}")
    try:
        coerced = {k: _coerce(k, v) for k, v in values.items()}
        cfg = dataclasses.replace(base, **coerced) if base is not None else Config(**coerced)
        return cfg.validate()
    except ConfigError as e:
        if path is None:
            raise
        # the file named: "invalid config: lr must be > 0" had not said where (a run's config.yaml, on --resume)
        # the CLI passes every flag, None where it was not given: "and the flags given" where none was had misled
        flags = any(v is not None for v in (overrides or {}).values())
        raise ConfigError(f"{e} (settings read from {path}{' and the flags given' if flags else ''})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the later one had won without a word: an
    ``lr: 0.1`` further down a file trained at 0.1)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: the keys it brings may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice (lines {seen[key]} and {line})", key_node.start_mark)
                seen[key] = line
            except TypeError:  # an unhashable key ([a, b]): YAML's own error, below
                pass
        return super().construct_mapping(node, deep=deep)


# What a prediction needs of a saved config (the rest describes how the model was trained)
INFERENCE_FIELDS = ("arch", "image_size", "mean", "std", "max_pixels", "draft", "patient_pattern")


def config_from_dict(d: dict[str, Any], *, inference_only: bool = False) -> Config:
    """Rebuild a Config saved by ``to_dict`` (unknown keys from other versions are dropped).

    ``inference_only``: only the fields a prediction needs (:data:`INFERENCE_FIELDS`) are checked; the others are
    taken as saved, for a model trained by an earlier cxr with settings it allowed and this one refuses."""
    values = {k: v for k, v in d.items() if k in _FIELDS}
    if not inference_only:
        return load_config(overrides=values)
    cfg = Config(**{k: _coerce(k, v) for k, v in values.items() if v is not None})
    dataclasses.replace(Config(), **{k: getattr(cfg, k) for k in INFERENCE_FIELDS}).validate()
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML."""
    from cxr.fileio import atomic_write_text

    fields = cfg.to_dict()
    if os.path.abspath(fields["cache_dir"]) == os.path.abspath(default_cache_dir()):
        # The default is this machine's ($CXR_CACHE_DIR, else the XDG cache), not the run's: recorded, it had beaten
        # $CXR_CACHE_DIR on another machine's --resume or --config, and decoded into a path made there unasked.
        del fields["cache_dir"]
    atomic_write_text(path, yaml.safe_dump(fields, sort_keys=False))

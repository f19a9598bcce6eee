"""The model: a torchvision backbone with a one-channel stem and a two-class head; checkpoints; devices.

Inputs are one grey channel. With ImageNet weights the first convolution's RGB kernels are summed into
one (as timm does for ``in_chans=1``), which gives the same output as feeding the grey image three times.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import numbers
import os
import pickle
import re
import threading
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr.config import ARCHS, CLASS_NAMES, Config, config_from_dict
from cxr.errors import CheckpointError, ConfigError, CxrError, UsageError
from cxr.fileio import atomic_path
from cxr.tv import import_torchvision

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cxr-checkpoint"
CHECKPOINT_VERSION = 1

# torchvision's DenseNet files predate a module rename ("norm.1" -> "norm1"); torchvision remaps them on load.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _stem_and_head(model: nn.Module) -> tuple[str, str]:
    if hasattr(model, "features") and hasattr(model.features, "conv0"):
        return "features.conv0", "classifier"
    return "conv1", "fc"


def _set_module(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, name = dotted.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, name, module)


def _to_one_channel(model: nn.Module) -> None:
    stem_name, _ = _stem_and_head(model)
    old: nn.Conv2d = model.get_submodule(stem_name)
    new = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    with torch.no_grad():
        new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    _set_module(model, stem_name, new)


def _new_head(model: nn.Module, num_classes: int) -> None:
    _, head_name = _stem_and_head(model)
    old: nn.Linear = model.get_submodule(head_name)
    _set_module(model, head_name, nn.Linear(old.in_features, num_classes))


def _imagenet_model(arch: str) -> nn.Module:
    torchvision = import_torchvision()

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except Exception as e:  # URLError is an OSError; a cut download fails the hash check; a saved HTML page unpickles
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        name = weights.url.rsplit("/", 1)[-1]
        if (hub / name).is_file():
            raise CxrError(f"{hub / name}: ImageNet weights for {arch}, but damaged ({e.__class__.__name__}): delete "
                           f"it and copy it again from {weights.url}, or pass --weights PATH or --weights none"
                           ) from None
        raise CxrError(
            f"could not get ImageNet weights for {arch} ({e.__class__.__name__}: {e}). Without internet, copy "
            f"{name} (from {weights.url}) into {hub}/, or pass --weights PATH to a local "
            "state dict, or train from scratch with --weights none"
        ) from None


def _torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` of plain data from an open file: given a path, torch reads a name ending in .safetensors as
    safetensors, whatever the file holds (a checkpoint so named had been unreadable)."""
    with open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def _torch_save_protocol(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a torch zip file whose one pickle has torch.save's protocol (2), of which ``torch.load``
    does not warn; False for anything else (another protocol, torch's legacy format, a damaged file)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.rpartition("/")[2] == "data.pkl"]
            if len(pickles) != 1:
                return False
            with archive.open(pickles[0]) as f:
                return f.read(2) == b"\x80\x02"
    except Exception:  # zipfile raises many types for a damaged archive
        return False


def read_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.pth``/``.pt`` file (plain, or under 'state_dict'/'model') without pickled code."""
    try:
        obj = _torch_load(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: weights file not found") from None
    except Exception as e:  # torch raises many types for a file that is not a state dict
        raise CheckpointError(f"{path}: not a readable state dict ({e.__class__.__name__})") from None
    return _state_dict_in(obj, path)


def _state_dict_in(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_backbone(model: nn.Module, path: str, state: dict[str, torch.Tensor]) -> None:
    state = {(_DENSENET_OLD_KEY.sub(r"\1\2", k)): v for k, v in state.items()}
    _, head_name = _stem_and_head(model)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith(head_name)}
    # Old torchvision files predate BatchNorm's num_batches_tracked counter; its absence is harmless.
    missing = [k for k in own if k not in usable and not k.startswith(head_name)
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(f"{path}: does not fit {type(model).__name__} ({len(missing)} of {len(own)} tensors "
                              f"missing or mis-shaped, e.g. {missing[0]})")
    model.load_state_dict(usable, strict=False)


def _starting_weights(weights: str) -> Checkpoint | dict[str, torch.Tensor] | None:
    """What ``--weights`` names, loaded: a cxr model, a plain state dict, or None (``imagenet``, ``none``)."""
    if weights in ("imagenet", "none"):
        return None
    if weights != "default" and not Path(weights).exists():
        looks_like_a_path = any(c in weights for c in "/\\.")
        raise UsageError(f"--weights {weights!r}: " + ("no such file or directory; " if looks_like_a_path else "")
                         + "expected 'imagenet', 'none', 'default' (the bundled model), a run directory, or the path "
                         "of a cxr model or state dict file")
    path = resolve_model_path(weights, flag="--weights")
    if _is_safetensors(path):
        return _load_safetensors(path)
    if path.suffix.lower() == ".onnx" or _is_torchscript(path):
        kind = "an ONNX" if path.suffix.lower() == ".onnx" else "a TorchScript"
        raise CheckpointError(f"--weights {path}: {kind} file, which cannot be trained on; give the checkpoint or "
                              ".safetensors file it was exported from")
    try:
        obj = _torch_load(path)
    except Exception:  # torch raises many types; read_state_dict_file names the problem
        return read_state_dict_file(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return _checkpoint_from(obj, path)
    return _state_dict_in(obj, path)


def starting_model(weights: str) -> Checkpoint | None:
    """The cxr model that ``--weights`` names for fine-tuning (``default``, a run directory, a checkpoint or a
    ``.safetensors`` file), or None for ``imagenet``, ``none`` and plain state dicts.

    Raises:
        UsageError: ``weights`` is neither a keyword nor an existing file or run directory.
        CheckpointError: the file cannot be read.
    """
    source = _starting_weights(weights)
    return source if isinstance(source, Checkpoint) else None


def check_starting_model(source: Checkpoint, arch: str) -> None:
    """A cxr model to fine-tune must be of the architecture being trained."""
    if source.arch != arch:
        raise UsageError(f"--weights {source.path}: a cxr {source.arch} model, but this run trains {arch}; pass "
                         f"--arch {source.arch}")


def _build_from(model: nn.Module, source: Checkpoint, num_classes: int) -> None:
    """Fine-tuning: every tensor of a cxr model, the one-channel stem included; its head too when the classes match."""
    _, head_name = _stem_and_head(model)
    keep_head = len(source.class_names) == num_classes
    state = {k: v for k, v in source.state_dict.items() if keep_head or not k.startswith(head_name)}
    try:
        model.load_state_dict(state, strict=keep_head)
    except RuntimeError:
        raise CheckpointError(f"{source.path}: its weights do not fit {source.arch} (damaged, or edited by hand)"
                              ) from None


def build_model(arch: str = "densenet121", weights: str = "none", num_classes: int = len(CLASS_NAMES)) -> nn.Module:
    """A torchvision classifier with a one-channel stem and a ``num_classes`` head.

    Args:
        arch: one of :data:`ARCHS`.
        weights: ``"imagenet"`` (torchvision's weights API: download or the torch hub cache), ``"none"``
            (random initialisation), a path to a local state dict such as torchvision's ``.pth`` file (backbone
            only; a fresh head), or a cxr model to fine-tune: ``"default"`` (the bundled model), a run directory,
            a checkpoint or a ``.safetensors`` file (every weight, the head too when it has ``num_classes``).
    """
    torchvision = import_torchvision()

    if arch not in ARCHS:
        raise UsageError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    source = _starting_weights(weights)
    if isinstance(source, Checkpoint):
        check_starting_model(source, arch)
    with _INIT_LOCK:  # never while another thread has torch.nn.init switched off (_skip_init)
        if weights == "imagenet":
            model = _imagenet_model(arch)
        else:
            model = torchvision.models.get_model(arch, weights=None)
            if isinstance(source, dict):
                _load_backbone(model, weights, source)
        _to_one_channel(model)
        _new_head(model, num_classes)
        if isinstance(source, Checkpoint):
            _build_from(model, source, num_classes)
    return model


# ----------------------------------------------------------------------------------------------- devices


@functools.lru_cache(maxsize=1)
def _say_mps_is_unused() -> None:
    """Once: an Apple GPU is there and cxr does not use it (it runs on cpu or cuda)."""
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        log.info("an Apple GPU (mps) is present, but cxr runs on the CPU or CUDA only: using the CPU")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):  # None: torch's TypeError had come out
        raise UsageError(f"device: 'auto', 'cpu', 'cuda' or 'cuda:N' (or a torch.device), got {type(name).__name__}")
    if name == "auto":
        if not torch.cuda.is_available():
            _say_mps_is_unused()
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: unknown device (use auto, cpu or cuda)") from None
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta...: failed later with a traceback
        raise UsageError(f"--device {name}: cxr runs on cpu or cuda (or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UsageError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX); without them bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:  # not Linux: ask torch's own CPU feature checks (private, hence looked up), else assume none
        checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(bool(check()) for check in checks if callable(check))
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(cfg: Config, device: torch.device) -> bool:
    """bf16 autocast: on CUDA where supported, and on CPUs with bf16 instructions (1.8x faster training measured on
    an AVX512-BF16 EPYC; see BENCHMARKS.md)."""
    if cfg.amp != "auto":
        return cfg.amp == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # not where bf16 is emulated (pre-Ampere)
    return device.type == "cpu" and cpu_has_fast_bf16()


def use_channels_last(cfg: Config, device: torch.device) -> bool:
    """channels_last memory format: default on CUDA (tensor cores) and wherever bf16 autocast runs on the CPU (oneDNN's
    bf16 convolutions work channels-last: 1.4x training and 1.9x inference throughput measured on an AVX512-BF16
    EPYC, same predictions within 1e-5; BENCHMARKS.md, figures 3 and 4a); off otherwise unless asked."""
    if cfg.channels_last != "auto":
        return cfg.channels_last == "on"
    return device.type == "cuda" or (device.type == "cpu" and use_bf16(cfg, device))


@contextlib.contextmanager
def exact_fp32(device: torch.device, enabled: bool = True):
    """fp32 arithmetic on CUDA without TF32, whose 10-bit mantissa cuDNN uses for "fp32" convolutions by default
    (``torch.backends.cudnn.allow_tf32``): so that fp32 predictions on a GPU agree with a CPU's to ~1e-6. The flags
    are put back afterwards. A no-op elsewhere, and where not ``enabled`` (bf16 predictions).

    The flags are process-wide, and the service predicts in several threads at once: the first to enter turns TF32
    off and the last to leave puts it back, so that no request's fp32 forward pass runs with TF32 turned on by another
    request that finished first (nor is the setting left changed for good)."""
    global _fp32_users, _fp32_saved
    if device.type != "cuda" or not enabled:
        yield
        return
    with _FP32_LOCK:
        if _fp32_users == 0:
            _fp32_saved = _tf32_flags()
            _set_tf32_flags(_fp32_saved, off=True)
        _fp32_users += 1
    try:
        yield
    finally:
        with _FP32_LOCK:
            _fp32_users -= 1
            if _fp32_users == 0:
                _set_tf32_flags(_fp32_saved)


# torch >= 2.9 has per-backend fp32_precision settings beside the legacy allow_tf32 flags, and reading the legacy
# flags after the new ones were set raises ("a mix of the legacy and new APIs"). exact_fp32 had read the legacy ones,
# and raised where a caller had used the new; writing the new ones instead made the legacy ones raise for every other
# reader (torch's own compiler among them) inside the window. So it speaks the caller's API: the legacy flags while
# they can be read, else the new settings.
_NEW_TF32_API = hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def _tf32_flags() -> tuple:
    """The TF32 settings as found: ``("legacy", matmul, cudnn)`` or ``("new", matmul, conv, rnn)``."""
    try:
        return "legacy", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    except RuntimeError:  # set through the new API: the legacy flags cannot be read
        if not _NEW_TF32_API:
            raise
        b = torch.backends
        return "new", b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision


def _set_tf32_flags(flags: tuple, off: bool = False) -> None:
    """Put back ``flags`` (from :func:`_tf32_flags`), or with ``off`` switch TF32 off in the API they were read in."""
    b = torch.backends
    if flags[0] == "legacy":
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = (False, False) if off else flags[1:]
    else:
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = (
            ("ieee",) * 3 if off else flags[1:])


_FP32_LOCK = threading.Lock()
_fp32_users = 0  # threads inside exact_fp32 on CUDA
_fp32_saved: tuple = ()  # the TF32 flags the first of them found


def autocast(device: torch.device, enabled: bool):
    """A bf16 autocast context, or a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def check_model_inputs(images: Any, batch_size: int, image_size: int | None = None) -> None:
    """Refuse what the model would answer wrongly without an error: floats (an image in 0..1 was divided by 255
    again and read as black: a NORMAL X-ray P(PNEUMONIA) 0.99999), anything but a stack of square grey images, or
    (given ``image_size``) images of another size than the model's: a 64 px image for a 224 px model gave a number."""
    shape, dtype = tuple(images.shape), images.dtype
    s = "S" if image_size is None else image_size
    if str(dtype) not in ("uint8", "torch.uint8") or len(shape) != 3 or shape[1] != shape[2] \
            or image_size is not None and shape[1] != image_size:
        raise UsageError(f"expected uint8 grey images of shape (N, {s}, {s}) with values 0-255 (cxr.images.load_image, "
                         f"or np.asarray(pil_image.convert('L')) resized to the model's image size), got {dtype} "
                         f"{shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise UsageError(f"batch_size must be a whole number >= 1, got {batch_size!r}")


def normalize(x: torch.Tensor, mean: float, std: float, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, 1, S, S) -> float32 normalised, on whatever device ``x`` is already on."""
    x = (x.float().div_(255.0).sub_(mean)).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ----------------------------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """What a model file holds: weights plus everything needed to use them the same way."""

    arch: str
    state_dict: dict[str, torch.Tensor]
    config: Config
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    threshold: float = 0.5
    threshold_policy: str = "default"
    epoch: int = 0
    val_loss: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)  # training state for --resume (optimizer, counters)
    path: str = ""
    # weights_state() of the weights as read from ``path``: a field, so that dataclasses.replace carries it (an ad hoc
    # attribute had been dropped by a copy with other weights, which then took the file's model_id); never saved
    as_loaded: tuple | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        # as_loaded names tensors by their identity in this process: a pickled copy has others, and trusts its path
        return {**self.__dict__, "as_loaded": None}

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:  # a file edited by hand: no "pass --arch vgg" advice later
            raise CheckpointError(f"unknown arch {self.arch!r} (cxr has {', '.join(ARCHS)})")

    @property
    def preprocessing(self) -> dict[str, Any]:
        """How an image must be prepared for this model."""
        return {"image_size": self.config.image_size, "mean": self.config.mean, "std": self.config.std,
                "channels": 1, "resize": "bicubic to a square, aspect ratio not kept",
                "input": "uint8 grey levels as cxr.images.load_image decodes them (an exported model's contract "
                         "lists the steps under decoding) / 255"}

    def build(self, device: torch.device | str = "cpu") -> nn.Module:
        """The model with these weights, in eval mode, on ``device``."""
        # Built without the random initialisation that the weights overwrite anyway (6.8 % of a `cxr predict`
        # start-up, profiled; BENCHMARKS.md); load_state_dict (strict) then fills every parameter and buffer, since
        # these architectures keep none outside the state dict. Not on the meta device: initialising meta tensors
        # imports torch._dynamo, a second of start-up.
        with _skip_init():
            model = build_model(self.arch, "none", num_classes=len(self.class_names))
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError:  # torch's message lists every key: thousands of lines for a wrong architecture
            theirs, ours = set(self.state_dict), model.state_dict()
            shapes = sum(1 for k in theirs & set(ours) if tuple(self.state_dict[k].shape) != tuple(ours[k].shape))
            raise CheckpointError(
                f"{self.path or 'checkpoint'}: its weights do not fit {self.arch} with {len(self.class_names)} "
                f"classes ({len(set(ours) - theirs)} missing, {len(theirs - set(ours))} unexpected, {shapes} of "
                "another shape): damaged, or edited by hand") from None
        # A weight that is no number makes every probability NaN, which labelled every image NORMAL with exit 0 and
        # wrote "NaN" into a JSON file no strict parser reads.
        bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise CheckpointError(f"{self.path or 'checkpoint'}: damaged model: {len(bad)} of its tensors hold values "
                                  f"that are not numbers (NaN or infinite), e.g. {bad[0]}")
        return model.to(device).eval()


# Held while torch.nn.init is switched off, and by every model build: threads that build models at once (a service
# loading checkpoints, say) neither restore each other's no-ops for good nor initialise a new model with them.
_INIT_LOCK = threading.RLock()
_SKIPPING = threading.local()  # depth of _skip_init in this thread: only its own builds skip initialisation


@contextlib.contextmanager
def _skip_init():
    """Make torch.nn.init's in-place initialisers no-ops, in this thread only, while a network whose every tensor is
    loaded next is built.

    Tensors keep the uninitialised memory ``torch.empty`` gave them. The same trick as Hugging Face's
    ``no_init_weights``; torch.nn modules look the initialisers up on ``torch.nn.init`` at call time. The stand-ins
    initialise as usual in any other thread: a caller's own layers, built meanwhile in a thread of theirs, had kept
    ``torch.empty``'s memory (4 of 20,383 ``nn.Linear`` in a helper's test).
    """
    def stand_in(init):
        @functools.wraps(init)
        def init_or_skip(tensor, *args, **kwargs):
            return tensor if getattr(_SKIPPING, "depth", 0) else init(tensor, *args, **kwargs)
        return init_or_skip

    with _INIT_LOCK:  # the originals are read under the lock too, so they are never another build's stand-ins
        names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_") and callable(getattr(nn.init, n))]
        saved = {n: getattr(nn.init, n) for n in names}
        _SKIPPING.depth = getattr(_SKIPPING, "depth", 0) + 1
        try:
            for n in names:
                setattr(nn.init, n, stand_in(saved[n]))
            yield
        finally:
            _SKIPPING.depth -= 1
            for n, fn in saved.items():
                setattr(nn.init, n, fn)


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> None:
    """Write ``ckpt`` atomically as plain data (tensors, numbers, strings): loadable with ``weights_only=True``."""
    payload = {**_meta_fields(ckpt), "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
               "extra": ckpt.extra}
    # Serialised in memory, then written with plain file I/O: a full disk is then an OSError naming the cause, which
    # atomic_path reports as a WriteError (torch.save writing the file itself says "unexpected pos 576 vs 534").
    buf = io.BytesIO()
    torch.save(payload, buf)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())


BUNDLED_MODEL = Path(__file__).resolve().parent / "weights" / "cxr-densenet121-kermany.safetensors"


def resolve_model_path(model: str | os.PathLike, *, flag: str = "--model") -> Path:
    """``default`` (the bundled model), a checkpoint file, or a run directory (its ``best.pt``)."""
    if not isinstance(model, (str, os.PathLike)):  # None or a module: a TypeError of pathlib's
        raise UsageError(f"{flag}: 'default', a checkpoint file or a run directory (or a loaded cxr Checkpoint), got "
                         f"{type(model).__name__}")
    # The word, not a path: Path("default") of a run folder named so had given the bundled model's predictions.
    if isinstance(model, str) and model == "default":
        if not BUNDLED_MODEL.is_file():
            raise CheckpointError(f"the bundled model {BUNDLED_MODEL.name} is not installed; pass {flag} PATH")
        # Only where ./default could be a model: /etc/default (shell settings) had been warned of on every command.
        if any(os.path.isfile(p) for p in ("default", "default/best.pt", "default/last.pt")):
            log.warning("%s default is the bundled model, not ./default here (give ./default for that one)", flag)
        return BUNDLED_MODEL
    p = Path(model)
    if p.is_dir():
        if (p / "best.pt").is_file():
            return p / "best.pt"
        if (p / "last.pt").is_file():
            # Not taken in its place: the last epoch's training state, whose threshold was never chosen, had been used
            # at 0.5 without a word (labels that differ from the run's own).
            raise CheckpointError(f"{p}: no best.pt, the run's model; its last.pt is the last epoch's training state "
                                  f"(for --resume), with no threshold chosen on validation: give {p / 'last.pt'} "
                                  "to use it all the same")
        trained = any((p / n).exists() for n in ("summary.json", "metrics.json"))
        with contextlib.suppress(OSError, UnicodeDecodeError):  # an epoch in history.csv: trained, too
            trained = trained or len((p / "history.csv").read_text(encoding="utf-8").strip().splitlines()) > 1
        if (p / "config.yaml").is_file() and not trained:
            from cxr.train import folder_in_use

            if folder_in_use(p):  # "it stopped" had been said of a run in its first epoch, and --resume refused
                raise CheckpointError(f"{p}: a run still in its first epoch, without a model yet; wait for an epoch "
                                      "to end")
            # a run stopped before its first epoch ended
            raise CheckpointError(f"{p}: a run without a model yet (it stopped before its first epoch ended); cxr "
                                  f"train --resume {p} trains it")
        if (p / "config.yaml").is_file():  # a trained run whose checkpoints were deleted or moved
            raise CheckpointError(f"{p}: a run whose checkpoints (best.pt, last.pt) are gone; give the model file "
                                  "where it is now")
        raise CheckpointError(f"{p}: a folder without best.pt or last.pt, so not a run directory")
    if not p.exists():
        raise UsageError(f"{p}: no such model file or run directory")
    return p


def load_checkpoint(model: str | os.PathLike | Checkpoint) -> Checkpoint:
    """Load a checkpoint file or a run directory's best checkpoint, never unpickling code (a :class:`Checkpoint`
    already loaded is returned as it is: the library's functions that take a model take one too).

    Raises:
        CheckpointError: the file is not a cxr checkpoint, is damaged, or holds anything but plain data.
    """
    if isinstance(model, Checkpoint):
        return model
    ckpt = _load_checkpoint_file(resolve_model_path(model))
    ckpt.as_loaded = weights_state(ckpt.state_dict)
    return ckpt


def weights_state(state_dict: dict[str, torch.Tensor]) -> tuple:
    """Which tensors a state dict holds, and how often each was changed in place (torch's version counter): cheap, and
    enough to tell weights changed in memory since their file was read (cxr.export.model_id)."""
    return tuple((k, id(v), getattr(v, "_version", 0)) for k, v in state_dict.items())


def _load_checkpoint_file(path: Path) -> Checkpoint:
    if _is_safetensors(path):
        return _load_safetensors(path)
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(f"{path}: an ONNX file, which cxr runs only in `cxr predict` and `cxr serve` (ONNX "
                              "Runtime; from Python, cxr.onnx_backend.predict_files_onnx and create_app(..., "
                              "backend='onnx')); for this, give the checkpoint or the .safetensors file it was "
                              "exported from")
    if _is_torchscript(path):
        raise CheckpointError(f"{path}: a TorchScript file (cxr export writes them for other runtimes); give cxr the "
                              "checkpoint or the .safetensors file it was exported from")
    try:
        with contextlib.ExitStack() as quiet:
            # A foreign pickle's protocol, warned of in two lines before cxr's one. Not around torch.save's own files:
            # catch_warnings resets the process's warning registries (a notebook's warning that shows once showed
            # again after each model loaded) and puts back the filters it saved (another thread's new one lost).
            if not _torch_save_protocol(path):
                quiet.enter_context(warnings.catch_warnings())
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        # torch's message always mentions weights_only; only an unsupported global or class means objects that
        # would run code. Anything else ("Unsupported operand", "invalid load key") is a file of another kind.
        text = str(e).lower()
        reason = "refused: it holds objects other than tensors and plain data (possibly code)" \
            if "unsupported global" in text or "unsupported class" in text else "damaged, or not a torch file"
        raise CheckpointError(f"{path}: not a cxr checkpoint ({reason})") from None
    except Exception as e:  # torch.load raises many types (KeyError, EOFError, RuntimeError...) on a foreign file
        raise CheckpointError(f"{path}: not a cxr checkpoint (unreadable: {e.__class__.__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a cxr checkpoint (a torch file, but without the cxr format marker)")
    return _checkpoint_from(obj, path)


def _checkpoint_from(obj: dict[str, Any], path: Path) -> Checkpoint:
    """The Checkpoint of a file's fields (a ``torch.save`` payload, or a safetensors file's metadata and tensors)."""
    version = obj.get("format_version", 0)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: written by a newer cxr (format {version!r}, this cxr reads up to "
                              f"{CHECKPOINT_VERSION}); upgrade cxr")
    threshold = obj.get("threshold")
    if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
        # NaN or 5 labelled every image NORMAL, exit 0 (the ONNX contract check refused the same value).
        raise CheckpointError(f"{path}: damaged cxr checkpoint (threshold {threshold!r} is no probability)")
    try:
        try:
            config = config_from_dict(obj["config"])
        except ConfigError as e:
            # A setting of training that an earlier cxr allowed (val_fraction 0.6, batch_size 1): the model had been
            # refused as "damaged". Read for what a prediction needs (those fields checked), and said.
            config = config_from_dict(obj["config"], inference_only=True)
            log.warning("%s: trained with a setting this cxr no longer accepts (%s, an earlier cxr?); read as saved, "
                        "for predictions", path, str(e).removeprefix("invalid config: "))
        return Checkpoint(
            arch=obj["arch"], state_dict=obj["state_dict"], config=config,
            class_names=list(obj["class_names"]), threshold=float(obj["threshold"]),
            threshold_policy=obj.get("threshold_policy", "default"), epoch=int(obj.get("epoch", 0)),
            # Absolute: a relative one, read after a notebook's os.chdir, named no file (another model_id, no check
            # of the run's own images, and export could write over the checkpoint it was given).
            val_loss=float(obj.get("val_loss", float("nan"))), extra=obj.get("extra", {}),
            path=str(Path(path).absolute()),
        )
    except (KeyError, TypeError, ValueError, CxrError) as e:
        raise CheckpointError(f"{path}: damaged cxr checkpoint ({e.__class__.__name__}: {e})") from None


def threshold_unchosen(ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` is a run's best.pt whose threshold was never chosen on validation: training writes best.pt
    after each improving epoch, and chooses its threshold only at the end."""
    path = Path(ckpt.path) if ckpt.path else None
    # last.pt too: training state, which never carries the threshold (finish() chooses it for best.pt alone)
    return (ckpt.threshold_policy == "default" and path is not None and path.name in ("best.pt", "last.pt")
            and (path.parent / "config.yaml").is_file())


def warn_if_threshold_unchosen(ckpt: Checkpoint, threshold_flag: bool = True) -> None:
    """Say so where a run's checkpoint has no threshold chosen on validation (:func:`threshold_unchosen`). A run
    interrupted (or a resumed session still training) left one that predict, evaluate, explain and serve used at 0.5
    without a word. ``threshold_flag``: whether the command has ``--threshold`` to advise (export and serve have
    none)."""
    if threshold_unchosen(ckpt):
        path = Path(ckpt.path)
        if path.name == "last.pt":
            log.warning("%s: the last epoch's training state, not the run's model (best.pt), and its decision "
                        "threshold was never chosen on validation, so %s is used; %suse the run's best.pt", path,
                        f"{ckpt.threshold:g}", "give --threshold, or " if threshold_flag else "")
            return
        log.warning("%s: its decision threshold was never chosen on validation (the run stopped before its end, or "
                    "is still training), so %s is used; `cxr train --resume %s` ends the run%s", path,
                    f"{ckpt.threshold:g}", path.parent, ", or give --threshold" if threshold_flag else "")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file by its content (an 8-byte header length, then the JSON header), whatever its name: the
    bundled file copied to ``model.pt`` was "damaged, or not a torch file", a checkpoint named ``.safetensors`` "not a
    readable safetensors file (header too large)". A file that cannot be read is judged by its name. The header's
    length is not checked against the file's size: a file cut off in its header is then said to be a safetensors file
    cut off, not "not a torch file". At most safetensors' own limit (100 MB), which the first bytes of a torch zip or
    pickle far exceed."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return path.suffix.lower() == ".safetensors"
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000


def _is_torchscript(path: Path) -> bool:
    """A zip archive holding TorchScript code (what ``torch.jit.save`` writes), as opposed to a ``torch.save`` file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _meta_fields(ckpt: Checkpoint) -> dict[str, Any]:
    """Everything of a checkpoint but its tensors and ``extra``: one list for both file kinds, read back by
    :func:`_checkpoint_from`."""
    return {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "arch": ckpt.arch,
            "config": ckpt.config.to_dict(), "class_names": list(ckpt.class_names), "preprocessing": ckpt.preprocessing,
            "threshold": float(ckpt.threshold), "threshold_policy": ckpt.threshold_policy, "epoch": int(ckpt.epoch),
            "val_loss": float(ckpt.val_loss)}


def save_safetensors(ckpt: Checkpoint, path: str | os.PathLike, *, half: bool = True) -> None:
    """Write a deployable model file: weights (fp16 by default, half the size), with the config, class names,
    preprocessing and threshold as JSON metadata. No optimiser state; no pickle at all.
    """
    import json

    from safetensors.torch import save

    tensors = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in ckpt.state_dict.items()}
    meta = {"cxr": json.dumps({**_meta_fields(ckpt), "info": ckpt.extra.get("info", {})})}
    data = save(tensors, metadata=meta)  # bytes, written below so that a full disk is a clear WriteError
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _load_safetensors(path: Path) -> Checkpoint:
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("cxr", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: a safetensors file without cxr metadata")
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return _checkpoint_from({**meta, "state_dict": state, "extra": {"info": meta.get("info", {})}}, path)

"""Export a model to ONNX or TorchScript with its preprocessing contract inside, and run ONNX models on ONNX Runtime.

The exported graph takes what the image cache holds and returns what the decision needs::

    input   "image"          uint8 (N, 1, S, S): grey X-rays, square-resized (bicubic, aspect ratio not kept)
    output  "logits"         float32 (N, C)
    output  "probabilities"  float32 (N, C): softmax of the logits, in class_names order

The normalisation (``/255``, ``-mean``, ``/std``) is part of the graph, so a consumer cannot get it wrong. What
the graph cannot hold travels in the file: image size, mean and std (for the record), class names, the decision
threshold (predict ``class_names[1]`` when its probability >= threshold), the model id and a model card, as JSON
under the key ``cxr.contract`` (ONNX ``metadata_props``; TorchScript extra file ``cxr.json``).

Research software, not a medical device: predictions are not a diagnosis.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr import __version__
from cxr.errors import CheckpointError, UsageError
from cxr.fileio import atomic_path, check_not_an_input, check_paths, check_writable
from cxr.model import Checkpoint, load_checkpoint, threshold_unchosen, warn_if_threshold_unchosen, weights_state
from cxr.onnx_backend import (  # noqa: F401 - re-exported: ONNX Runtime inference lives there, without torch
    CONTRACT_KEY,
    CONTRACT_VERSION,
    OnnxPredictor,
    load_onnx_predictor,
    predict_files_onnx,
)

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
TORCHSCRIPT_EXTRA_FILE = "cxr.json"
ONNX_OPSET = 18
ONNX_CACHE_KEEP = 8  # exports of checkpoints kept in the cache folder (about 28 MB each for DenseNet-121)

INTENDED_USE = ("Research and teaching: studying how a convolutional network separates NORMAL from PNEUMONIA "
                "chest X-rays. Not for diagnosis, triage, screening or any other clinical decision.")
LIMITATIONS = [
    "Trained on {data}; the Kermany chest X-ray set that cxr is built around "
    "holds paediatric (1 to 5 years) anterior-posterior images from a single hospital in Guangzhou, so adult "
    "images, other projections and other sites are outside what the model has seen.",
    "Two classes only: it says nothing about any other finding, and does not separate bacterial from viral "
    "pneumonia.",
    "The probability is the model's score, not a calibrated risk for any population; the threshold was chosen "
    "on the validation split by the stated policy.",
    "A heatmap shows which regions weighed on the score (Grad-CAM), not a finding or a lesion outline.",
]


# ----------------------------------------------------------------------------------------------- the contract


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, in hex; remembered for the file as it is (its device, inode, size and modification
    time): one command names the same model several times (its id, the bundled model's, a fine-tune's start)."""
    st = os.stat(path)
    return _sha256_of(os.fspath(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=32)
def _sha256_of(path: str, stat: tuple[int, int, int, int]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_id(ckpt: Checkpoint) -> str:
    """A short, stable name for a model: the first 12 hex digits of its checkpoint file's SHA-256.

    A checkpoint that was never saved (no ``path``), or whose weights were changed in memory since
    :func:`cxr.model.load_checkpoint` read them (torch's in-place operations, or other tensors; not writes through
    ``.data`` or ``.numpy()``, which torch does not count), is named from a hash of its weights instead (a perturbed
    model had been given its file's name, its predictions filed under another model's).
    """
    if ckpt.path and Path(ckpt.path).is_file() and (ckpt.as_loaded is None
                                                    or ckpt.as_loaded == weights_state(ckpt.state_dict)):
        return file_sha256(ckpt.path)[:12]
    h = hashlib.sha256()
    for k, v in sorted(ckpt.state_dict.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


_CARD_METRICS = ("n", "accuracy", "sensitivity", "specificity", "precision", "f1", "auroc", "auprc", "threshold",
                 "ci95", "ci95_method", "n_patients")


def model_card(ckpt: Checkpoint, *, id_: str | None = None) -> dict[str, Any]:
    """What is known about a model: training data, metrics, threshold, preprocessing, intended use, limitations.

    Read from the checkpoint and, for a run directory's ``best.pt``, from the ``summary.json`` and ``metrics.json``
    training wrote beside it (metrics are only reported when they were computed at this checkpoint's threshold).
    A ``model_card.json`` beside the checkpoint, or an ``info`` dict inside it (bundled models), overrides fields.
    Server paths are reduced to their last component. ``id_``: the :func:`model_id`, if already computed.
    """
    cfg = ckpt.config
    here = Path(ckpt.path).parent if ckpt.path else None
    card: dict[str, Any] = {
        "model_id": id_ or model_id(ckpt),
        "cxr_version": __version__,
        "arch": ckpt.arch,
        "epoch": ckpt.epoch,
        "class_names": list(ckpt.class_names),
        "positive_class": ckpt.class_names[-1],
        "threshold": float(ckpt.threshold),
        "threshold_policy": ckpt.threshold_policy,
        "preprocessing": ckpt.preprocessing,
        "training_data": {"name": Path(cfg.data).name if cfg.data else None, "val_source": cfg.val_source,
                          "split_seed": cfg.split_seed},
        "metrics": None,
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
        "disclaimer": "Research software, not a medical device: predictions are not a diagnosis.",
    }
    if here is not None and Path(ckpt.path).name == "best.pt":
        summary = _read_json(here / "summary.json") or {}
        if isinstance(summary.get("counts"), dict):
            card["training_data"]["counts"] = summary["counts"]
        metrics = _read_json(here / "metrics.json") or {}
        if metrics and all(isinstance(m, dict) and abs(float(m.get("threshold", -1)) - ckpt.threshold) < 1e-9
                           for m in metrics.values()):
            card["metrics"] = {split: {k: m[k] for k in _CARD_METRICS if k in m} for split, m in metrics.items()}
    info = ckpt.extra.get("info") if isinstance(ckpt.extra, dict) else None
    overrides = [info] if isinstance(info, dict) else []
    if here is not None:
        overrides.append(_read_json(here / "model_card.json"))
    for extra in overrides:
        card.update({k: v for k, v in (extra or {}).items() if k not in ("model_id", "threshold", "class_names")})
    if card["limitations"] is LIMITATIONS:  # the first names the data (the service's page had shown "the data set
        # named under training_data", a key of this JSON)
        data = card.get("training_data")
        name = data.get("name") if isinstance(data, dict) else None
        card["limitations"] = [LIMITATIONS[0].format(data=f"the data set {name}" if isinstance(name, str) and name
                                                     else "a data set it does not name"), *LIMITATIONS[1:]]
    return card


# How cxr turns a file into the grey levels the graph takes (cxr.images.load_image does all of it; its module
# docstring is the reference): what an exported model's contract tells a system that has no cxr.
DECODING = [
    "The format is found from the content (JPEG, PNG or DICOM), not the file's extension.",
    "JPEG and PNG: an EXIF Orientation tag is applied first (the image turned upright, as viewers show it).",
    "8-bit JPEG and PNG of any mode (L, RGB, RGBA, P, LA, CMYK): PIL's convert('L'), ITU-R 601 luma with alpha "
    "dropped; the values are kept as stored, not stretched.",
    "More than 8 bits (16-bit PNG, 32-bit integer or float): stretched linearly to 0..255 between the image's "
    "0.01th and 99.99th percentile (its min and max where those are equal), rounded to the nearest integer and "
    "clipped. cxr takes the percentiles from every n-th pixel (n = size // 1,000,000 at least 1, raised until it "
    "shares no factor with the row length), sorted, the values at 0-based positions k and count - 1 - k with "
    "k = floor(0.0001 x count) (where k is 0, or those two are equal: min and max); np.percentile of all pixels "
    "differs by about a grey level at most.",
    "DICOM: the modality LUT (Rescale Slope and Intercept, or a Modality LUT Sequence), then the VOI LUT Sequence "
    "where the file has one, else the first window (Window Center/Width, VOI LUT Function), never both, as DICOM "
    "PS3.3 C.11.2 defines them (an enhanced DICOM's from its functional groups); MONOCHROME1, and MONOCHROME2 under "
    "an INVERSE Presentation LUT Shape, inverted (max - value) so that bone is bright; then the stretch of the "
    "previous step, leaving out pixels marked as padding (Pixel Padding Value and Range Limit), which become 0. "
    "Colour DICOM: ITU-R 601 luma, then the same stretch; PALETTE COLOR: its palette's luma, then the same stretch "
    "(8-bit DICOM is stretched too, unlike 8-bit JPEG and PNG). Multi-frame: the first frame.",
    "An image whose pixels all have one value (before or after these steps) is refused: nothing to classify. So is "
    "a DICOM image of a modality that is no radiograph (CT, MR, US, NM, PT, MG, XA, RF and the others of "
    "cxr.images.NOT_RADIOGRAPHS); CR, DX, OT and other or no Modality are taken.",
    "Then the square resize (input.meaning) to image_size; with draft true, a JPEG is first decoded by PIL's "
    "draft(mode 'L', (image_size, image_size)), which lets the decoder scale it down by 1/2, 1/4 or 1/8.",
]


def contract(ckpt: Checkpoint) -> dict[str, Any]:
    """Everything a consumer of an exported file needs besides the graph (see the module docstring)."""
    cfg = ckpt.config
    id_ = model_id(ckpt)
    return {
        "contract_version": CONTRACT_VERSION,
        "model_id": id_,
        "cxr_version": __version__,
        "arch": ckpt.arch,
        "epoch": ckpt.epoch,
        "class_names": list(ckpt.class_names),
        "threshold": float(ckpt.threshold),
        "image_size": cfg.image_size,
        "mean": cfg.mean,
        "std": cfg.std,
        "max_pixels": cfg.max_pixels,
        "draft": cfg.draft,
        "input": {"name": "image", "dtype": "uint8", "shape": ["N", 1, cfg.image_size, cfg.image_size],
                  "meaning": "grey levels 0-255, square-resized with PIL bicubic (aspect ratio not kept; a JPEG "
                             "decoded in draft mode first where draft is true); the graph normalises "
                             "(x / 255 - mean) / std itself"},
        # Every step of the decoding that changes the pixels, so that a system without cxr can prepare them: the
        # contract had said "grey levels 0-255" alone, and a 12-bit PNG read by PIL as "L" gave P 1.000 where cxr
        # gave 0.269, a DICOM window min-maxed by hand P 0.975 where cxr gave 0.269, a JPEG with EXIF Orientation 6
        # P 0.001 where cxr gave 0.272.
        "decoding": DECODING,
        "outputs": {"logits": "float32 (N, C)", "probabilities": "float32 (N, C), softmax, class_names order",
                    "form": "ONNX: two outputs named logits and probabilities; TorchScript: the tuple "
                            "(logits, probabilities)"},
        "decision": f"{ckpt.class_names[-1]} when probabilities[:, -1] >= threshold",
        "model_card": model_card(ckpt, id_=id_),
        # Exported from a run's best.pt before the run chose its threshold: the file's users are warned as the
        # checkpoint's are (an export had carried the placeholder 0.5 on without a word).
        **({"threshold_unchosen": True} if threshold_unchosen(ckpt) else {}),
    }


# ----------------------------------------------------------------------------------------------- export


class Deployable(nn.Module):
    """The classifier with its input normalisation and softmax: uint8 images in, logits and probabilities out."""

    def __init__(self, net: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.mean = float(mean)
        self.std = float(std)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The same float operations, in the same order, as cxr.model.normalize: the outputs match PyTorch's.
        x = (image.float() / 255.0 - self.mean) / self.std
        logits = self.net(x)
        return logits, torch.softmax(logits, dim=1)


def _as_checkpoint(model: str | os.PathLike | Checkpoint) -> Checkpoint:
    return model if isinstance(model, Checkpoint) else load_checkpoint(model)


def _deployable(ckpt: Checkpoint) -> tuple[Deployable, torch.Tensor]:
    size = ckpt.config.image_size
    module = Deployable(ckpt.build("cpu"), ckpt.config.mean, ckpt.config.std).eval()
    # A generator of its own: drawn from torch's global one, an export changed a seeded script's later numbers
    example = torch.randint(0, 256, (2, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return module, example


def onnx_model_bytes(model: str | os.PathLike | Checkpoint) -> bytes:
    """Export a checkpoint to an ONNX model (fp32, dynamic batch) and return the serialised file."""
    try:
        import onnx  # noqa: F401 - torch's exporter needs it; fail early with a clear message
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UsageError(f"ONNX export needs the onnx and onnxscript packages ({e}); pip install onnx onnxscript") \
            from None
    ckpt = _as_checkpoint(model)
    module, example = _deployable(ckpt)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter's libraries log a dozen INFO lines an export ("Removed 1091 unused nodes"): the command line hides
    # them, and a script or notebook calling this had them in its own log. Quiet for the export, then as they were.
    chatty = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in chatty]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about its own internals, nothing a user can act on
        for logger in chatty:
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        try:
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=["image"],
                                        output_names=["logits", "probabilities"], dynamic_shapes=({0: batch},),
                                        opset_version=ONNX_OPSET, external_data=False, verbose=False)
        except Exception as e:
            # The exporter wraps whatever stops it, Ctrl-C included, in its own TorchExportError.
            if _interrupted(e):
                raise KeyboardInterrupt from None
            # A read-only file system ("No usable temporary directory") had ended `cxr serve --backend onnx` in 122
            # lines of the exporter's traceback, asking for a PyTorch issue: its root cause, said in one.
            root = e
            while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
                root = root.__cause__ or root.__context__
            first = (str(root).strip().splitlines() or [""])[0][:300]
            raise CheckpointError(f"{ckpt.path or 'the model'}: the ONNX export failed ({type(root).__name__}: "
                                  f"{first}); where it can run (a writable temporary folder), `cxr export --format "
                                  "onnx --output model.onnx` writes a file to serve or predict with") from e
        finally:
            for logger, level in zip(chatty, levels, strict=True):
                logger.setLevel(level)
    proto = program.model_proto
    proto.producer_name = "cxr"
    proto.producer_version = __version__
    proto.doc_string = "cxr chest X-ray classifier (NORMAL vs PNEUMONIA). Research software, not a medical device."
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = CONTRACT_KEY, json.dumps(contract(ckpt))
    return proto.SerializeToString()


def _export_key(ckpt: Checkpoint) -> str:
    """What decides an export's bytes: the contract (the weights' hash, threshold, preprocessing, model card), the
    exporter's versions and opset, and cxr's own source (the graph is built and exported by it)."""
    import onnx
    import onnxscript

    h = hashlib.sha256(json.dumps(contract(ckpt), sort_keys=True).encode())
    for part in (torch.__version__, onnx.__version__, onnxscript.__version__, str(ONNX_OPSET)):
        h.update(b"\0" + part.encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        h.update(b"\0" + source.read_bytes())
    return h.hexdigest()[:32]


def cached_onnx_model_bytes(model: str | os.PathLike | Checkpoint, cache_dir: str | os.PathLike | None = None,
                            ) -> tuple[bytes, Path | None]:
    """:func:`onnx_model_bytes`, exported once per checkpoint and kept under ``CACHE_DIR/onnx/``.

    The export cost every start of ``cxr predict`` or ``cxr serve --backend onnx`` with a checkpoint: a one-image
    predict of DenseNet-121 took 11.6 s, against 2.5 s reading the cached file (BENCHMARKS.md, figure 4d). A later
    start with the same checkpoint, contract and exporter reads the file. The newest :data:`ONNX_CACHE_KEEP` exports
    are kept. A cache that cannot be written costs the time, not the result.

    Returns:
        The ONNX bytes and the cache file they came from (None when they were exported now).
    """
    from cxr.config import default_cache_dir

    ckpt = _as_checkpoint(model)
    try:
        key = _export_key(ckpt)
    except ImportError:
        return onnx_model_bytes(ckpt), None  # onnx_model_bytes names what to install
    folder = Path(cache_dir or default_cache_dir()) / "onnx"
    name = ckpt.path or "the model"
    # The file's name ends in its bytes' own digest: a file damaged since (a torn write, a bad disk) that still
    # parses would have given other probabilities without a word; it is exported again instead.
    for file in sorted(folder.glob(f"{key}-*.onnx")):
        with contextlib.suppress(OSError):
            data = file.read_bytes()
            if hashlib.sha256(data).hexdigest()[:16] == file.stem.rsplit("-", 1)[-1]:
                with contextlib.suppress(OSError):
                    os.utime(file)  # the newest use is what the pruning below keeps
                log.info("%s: its ONNX export read from %s", name, file)
                return data, file
            log.warning("%s: damaged (its bytes are not the ones written), exporting again", file)
            file.unlink(missing_ok=True)
    log.info("exporting %s to ONNX (once: the export is kept in %s)", name, folder)
    data = onnx_model_bytes(ckpt)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"{key}-{hashlib.sha256(data).hexdigest()[:16]}.onnx") as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        log.warning("could not keep the ONNX export in %s (%s): the next start exports it again", folder,
                    e.strerror or e)
        return data, None
    with contextlib.suppress(OSError):  # another process pruning at the same time: nothing lost either way

        def age(f: Path) -> int:
            try:
                return f.stat().st_mtime_ns
            except OSError:
                return 0

        for old in sorted(folder.glob("*.onnx"), key=age, reverse=True)[ONNX_CACHE_KEEP:]:
            old.unlink(missing_ok=True)
    return data, None


def _interrupted(error: BaseException | None) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def export_model(model: str | os.PathLike | Checkpoint, fmt: str, output: str | os.PathLike) -> Path:
    """Write ``model`` (a checkpoint file, run directory, ``default`` or a Checkpoint) as ONNX or TorchScript.

    Args:
        model: what to export.
        fmt: ``onnx`` or ``torchscript``.
        output: the file to write (atomically; an existing file is replaced).

    Returns:
        The written path. The contract (size, normalisation, threshold, class names, card) is inside the file.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: use {' or '.join(FORMATS)}")
    check_paths(output=output)
    out = Path(output)
    if out.is_dir():
        raise UsageError(f"--output {out}: is a directory; give a file name")
    # cxr predict and serve recognise ONNX files by their suffix: another name would later pass for a checkpoint, and
    # a TorchScript file named *.onnx would go to ONNX Runtime (checked here, not only by the CLI).
    if (fmt == "onnx") != (out.suffix.lower() == ".onnx"):
        raise UsageError(f"--output {out}: name an ONNX file *.onnx, and only an ONNX file")
    check_writable(out)  # now, not after an export of seconds
    ckpt = _as_checkpoint(model)
    warn_if_threshold_unchosen(ckpt, threshold_flag=False)
    if ckpt.path:
        check_not_an_input(out, [ckpt.path])  # an export over its own checkpoint lost the trained model
    if fmt == "onnx":
        data = onnx_model_bytes(ckpt)
        with atomic_path(out) as tmp:
            tmp.write_bytes(data)
    else:
        module, example = _deployable(ckpt)
        buf = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.export, but it is still what C++/mobile runtimes load.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(module, example, check_trace=False)
            # Into memory, then written by Python: saved to the file itself, a full disk had aborted the process
            # in C++ (exit 134, 21 frames of its stack) and left the temporary file.
            torch.jit.save(traced, buf, _extra_files={TORCHSCRIPT_EXTRA_FILE: json.dumps(contract(ckpt))})
        with atomic_path(out) as tmp:
            tmp.write_bytes(buf.getbuffer())
    log.info("wrote %s (%s, %.1f MB)", out, fmt, out.stat().st_size / 1e6)
    return out


def load_torchscript(path: str | os.PathLike) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """A TorchScript file written by :func:`export_model` and its contract."""
    extra = {TORCHSCRIPT_EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    try:
        return module.eval(), json.loads(extra[TORCHSCRIPT_EXTRA_FILE])
    except ValueError:
        raise CheckpointError(f"{path}: a TorchScript file without a cxr contract") from None

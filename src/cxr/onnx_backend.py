"""cxr models on ONNX Runtime: :class:`OnnxPredictor`, and ``cxr predict --backend onnx``.

Nothing here imports torch, so that ``cxr predict`` and ``cxr serve`` with an exported ``.onnx`` file run without it
(``import torch`` alone takes 1.3 to 2.4 s on the machines of BENCHMARKS.md, figure 4b, and some 450 MB). Exporting
a checkpoint, for a ``--model`` that is not an ``.onnx`` file, goes through :mod:`cxr.export` and does need torch
(the export is kept in the cache folder, so only the first start pays for it).
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr.config import DEFAULT_MAX_PIXELS
from cxr.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    from cxr.model import Checkpoint

log = logging.getLogger(__name__)

CONTRACT_KEY = "cxr.contract"  # the ONNX metadata entry holding the JSON contract (cxr.export writes it)
CONTRACT_VERSION = 1  # the contract's layout; a file of a later one is refused, not half-understood


class OnnxPredictor:
    """P(positive class) from an exported cxr ONNX model on ONNX Runtime (CPU).

    ``InferenceSession.run`` is thread-safe, so one predictor can serve concurrent requests.

    Attributes:
        contract: the JSON contract from the file (see :mod:`cxr.export`'s docstring); ``image_size``, ``threshold``,
            ``class_names``, ``model_id`` and ``card`` are copied out of it.
    """

    def __init__(self, source: str | os.PathLike | bytes, *, threads: int = 0, name: str = "",
                 warn_threshold: bool = True, threshold_flag: bool = True) -> None:
        """
        Args:
            source: an ``.onnx`` file, or its bytes (from :func:`cxr.export.onnx_model_bytes`).
            threads: intra-op threads (0: ONNX Runtime's default, one per core).
            name: what error messages call the model (default: the path).
            warn_threshold: warn where the file's threshold was never chosen (False: the caller gives its own).
            threshold_flag: whether the command has ``--threshold`` for the warning to advise (serve has none).
        """
        import onnxruntime as ort

        label = name or (str(source) if not isinstance(source, bytes) else "<onnx bytes>")
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise UsageError(f"{label}: no such ONNX file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        # Idle worker threads sleep instead of spinning: the service runs other threads (decoding, PyTorch) too.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # errors only: its warnings are about graph fusions, not the user's input
        try:
            self.session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            raise CheckpointError(f"{label}: not a readable ONNX model ({str(e).splitlines()[0][:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.contract: dict[str, Any] = json.loads(meta[CONTRACT_KEY])
            self.image_size = int(self.contract["image_size"])
            self.threshold = float(self.contract["threshold"])
            self.class_names = list(self.contract["class_names"])
            self.model_id = str(self.contract["model_id"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{label}: an ONNX model without a cxr contract (export it with cxr export)") \
                from None
        version = self.contract.get("contract_version", 0)
        if not isinstance(version, int) or version > CONTRACT_VERSION:
            raise CheckpointError(f"{label}: exported by a newer cxr (contract {version!r}, this cxr reads up to "
                                  f"{CONTRACT_VERSION}); upgrade cxr, or export the model again with this one")
        self.card: dict[str, Any] = self.contract.get("model_card") or {}
        if warn_threshold and self.contract.get("threshold_unchosen") is True:
            log.warning("%s: exported from a run's checkpoint (best.pt of a run that had not ended, or last.pt) "
                        "whose decision threshold was never chosen on validation, so %g is used; %sexport the run's "
                        "best.pt once the run has ended", label, self.threshold,
                        "give --threshold, or " if threshold_flag else "")
        # A contract edited by hand is said here in one line, not as a traceback at the first prediction.
        image = next((i for i in self.session.get_inputs() if i.name == "image"), None)
        shape = image.shape if image is not None else None
        probs = next((o for o in self.session.get_outputs() if o.name == "probabilities"), None)
        try:
            self.max_pixels = int(self.contract.get("max_pixels", DEFAULT_MAX_PIXELS))
            self.draft = self.contract.get("draft", False)  # absent from the exports of earlier cxr versions
            # A float input failed at the first prediction with a traceback; probabilities of one class or three
            # labelled every image alike, exit 0.
            fits = (shape is not None and len(shape) == 4 and image.type == "tensor(uint8)"
                    and self.max_pixels > 0 and 0 <= self.threshold <= 1 and isinstance(self.draft, bool)
                    and all(d == self.image_size for d in shape[1:] if isinstance(d, int) and d != 1)
                    and len(self.class_names) == 2 and probs is not None and len(probs.shape) == 2
                    and (not isinstance(probs.shape[1], int) or probs.shape[1] == len(self.class_names)))
        except (TypeError, ValueError):
            fits = False
        if not fits:
            raise CheckpointError(f"{label}: its cxr contract does not fit the model (input {shape} "
                                  f"{image.type if image is not None else ''}, probabilities "
                                  f"{probs.shape if probs is not None else None}, contract "
                                  f"image_size {self.contract.get('image_size')}, threshold "
                                  f"{self.contract.get('threshold')}, max_pixels {self.contract.get('max_pixels')}, "
                                  f"draft {self.contract.get('draft', False)!r}): "
                                  "damaged or edited by hand; export it again with cxr export")

    def predict_uint8(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """P(``class_names[-1]``) as float64 (N,) for uint8 images (N, S, S) or (N, 1, S, S)."""
        x = np.asarray(images)
        shape = x.shape
        if x.ndim == 3:
            x = x[:, None]
        s = self.image_size
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (1, s, s):
            raise UsageError(f"expected uint8 grey images of shape (N, {s}, {s}) with values 0-255, got {x.dtype} "
                             f"{shape}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise UsageError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        out = [self.session.run(["probabilities"], {"image": np.ascontiguousarray(x[i:i + batch_size])})[0][:, -1]
               for i in range(0, len(x), batch_size)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def load_onnx_predictor(model: str | os.PathLike | Checkpoint, *, threads: int = 0,
                        warn_threshold: bool = True, threshold_flag: bool = True) -> OnnxPredictor:
    """An :class:`OnnxPredictor` for an ``.onnx`` file, or for a checkpoint exported to ONNX (once: the export is
    kept in the cache folder, see :func:`cxr.export.cached_onnx_model_bytes`).

    Only the second needs torch (to export), and only then is it imported. ``warn_threshold``: warn, as the torch
    path does, where the threshold is a run's placeholder (False where the caller gives one); ``threshold_flag``:
    whether that warning may advise ``--threshold``.
    """
    if isinstance(model, (str, os.PathLike)) and str(model).lower().endswith(".onnx"):
        return OnnxPredictor(model, threads=threads, warn_threshold=warn_threshold, threshold_flag=threshold_flag)
    from cxr.export import _as_checkpoint, cached_onnx_model_bytes, onnx_model_bytes

    ckpt = _as_checkpoint(model)
    name = ckpt.path or "<checkpoint>"
    data, cached = cached_onnx_model_bytes(ckpt)
    try:
        return OnnxPredictor(data, threads=threads, name=name, warn_threshold=warn_threshold,
                             threshold_flag=threshold_flag)
    except CheckpointError as e:
        if cached is None:
            raise
        log.warning("the cached ONNX export %s is unusable (%s): exporting %s again", cached, e, name)
        cached.unlink(missing_ok=True)
        return OnnxPredictor(onnx_model_bytes(ckpt), threads=threads, name=name, warn_threshold=warn_threshold,
                             threshold_flag=threshold_flag)


def predict_files_onnx(model: str | os.PathLike, paths: list[str | os.PathLike], *, threshold: float | None = None,
                       batch_size: int = 32, threads: int = 0, shard: tuple[int, int] | None = None,
                       listed: bool = False) -> list:
    """``cxr predict --backend onnx``: :func:`cxr.predict.predict_files` on ONNX Runtime (CPU, fp32; ``listed`` as
    there).

    Args:
        model: an ``.onnx`` file from ``cxr export``, or a checkpoint / run directory (exported once, cached).

    Returns:
        ``list[cxr.predict.Prediction]`` in input order; unreadable files get an ``error``.
    """
    from cxr.predict import check_inference_args, collect_files, listed_files, predict_in_batches, select_shard

    check_inference_args(threshold=threshold, batch_size=batch_size)
    files = select_shard(listed_files(paths) if listed else collect_files(paths), shard)
    predictor = load_onnx_predictor(model, threads=threads, warn_threshold=threshold is None)
    t = predictor.threshold if threshold is None else float(threshold)
    return predict_in_batches(files, lambda images: predictor.predict_uint8(images, batch_size),
                              image_size=predictor.image_size, max_pixels=predictor.max_pixels,
                              class_names=predictor.class_names, threshold=t, batch_size=batch_size,
                              model_id=predictor.model_id, draft=predictor.draft)

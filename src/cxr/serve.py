"""The web service: a JSON API and a page that predict on uploaded X-rays. ``create_app`` builds it, ``serve`` runs it.

Endpoints (``/docs`` and ``/openapi.json`` describe them):

* ``POST /api/v1/predict``: one X-ray as multipart field ``file`` (JPEG, PNG or DICOM, recognised by content);
  answers the label, P(PNEUMONIA), the threshold, the model's id and version, a Grad-CAM overlay (PNG, base64)
  and timings. Query flags: ``heatmap`` (default true), ``include_image`` (the model's input as PNG).
* ``GET /api/v1/health``, ``GET /api/v1/model`` (the model card), ``GET /`` (the page, works offline).

What a bad request gets: an upload over the size limit 413; content that is not JPEG, PNG or DICOM 415; a
JPEG/PNG/DICOM that cannot be decoded 422 with the reason; a malformed form 400; too many waiting requests 503.
Nothing reaches a client as a stack trace. Uploads are parsed and decoded in memory (never written to disk),
client file names are only echoed back (never opened, never logged), and inference runs in worker threads, at
most ``max_concurrency`` at a time, so the event loop keeps answering.

Research software, not a medical device: predictions are not a diagnosis.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import json
import logging
import math
import mimetypes
import numbers
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cxr import __version__
from cxr.config import MAX_UPLOAD_MB, usable_cores
from cxr.errors import CxrError, UsageError
from cxr.fileio import display_name, shorten_middle
from cxr.images import VIEW_ADVICE, ImageError, dicom_view_note, load_image, sniff
from cxr.predict import DISCLAIMER, leans_away, prob_text

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
API = "/api/v1"
BACKENDS = ("torch", "onnx")
_MULTIPART_OVERHEAD = 64 * 1024  # boundary lines and part headers on top of the file itself
# A browser's form sends one part, curl one per -F; 1.4 million empty parts in a 20 MB body had cost 800 MB and 19 s
# of the event loop. Part headers are a line or two each.
_MAX_PARTS = 16
_MAX_PART_HEADERS = 16_000

# Nothing loads from elsewhere, so the service works on a network without internet access: the page and the API
# by construction, the OpenAPI pages (Swagger UI, ReDoc) because fastapi-offline ships their scripts and the service
# serves them (FastAPI's own pages fetch them from a CDN). Those pages start with inline scripts, so their CSP allows
# inline code, still from this server only.
_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
             "script-src 'self' 'unsafe-inline'; font-src 'self'; worker-src blob:; object-src 'none'; "
             "base-uri 'none'; frame-ancestors 'none'")
_DOCS_PATHS = ("/docs", "/redoc")


# ----------------------------------------------------------------------------------------------- engines


class Engine(Protocol):
    """What the service needs from a backend. ``predict_uint8`` and ``heatmap_png`` are called from worker threads."""

    backend: str
    model_id: str
    class_names: list[str]
    threshold: float
    image_size: int
    max_pixels: int
    draft: bool  # JPEG draft-mode decoding, as the model was trained and evaluated
    card: dict[str, Any]
    heatmap_unavailable: str | None  # why there is no heatmap, or None when there is one
    inference_dtype: str  # the arithmetic of the predictions: "bfloat16" or "float32"

    def predict_uint8(self, images: np.ndarray) -> np.ndarray: ...

    def heatmap_png(self, image: np.ndarray, target: int) -> tuple[bytes, bool]:
        """The overlay as PNG, and whether the map is flat (nothing raised the class's score)."""
        ...


def _png(rgb_or_grey: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb_or_grey)).save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def _heatmap_png(model: Any, image: np.ndarray, *, mean: float, std: float, target: int) -> tuple[bytes, bool]:
    """Grad-CAM of class ``target`` over the (S, S) uint8 ``image`` as PNG bytes (cxr.explain's Grad-CAM, overlay),
    and whether the map is flat (all zeros: nothing raised the class's score)."""
    from cxr.explain import heatmaps_for_images, overlay

    heats, _ = heatmaps_for_images(model, image[None], mean=mean, std=std, target=target)
    return _png(overlay(image, heats[0])), not heats[0].any()


@dataclass
class Explained:
    """A prediction and its heatmap from one forward pass (:meth:`TorchEngine.predict_with_heatmap`)."""

    prob: float
    heat: np.ndarray  # (S, S) float32 in [0, 1], zeros where flat
    seconds: float  # the pass (forward and the heatmap's gradient), with its wait for the heatmap model


class TorchEngine:
    """A checkpoint on PyTorch, with the numerics of ``cxr predict``: ``amp`` "auto" computes in bf16 where the device
    is fast at it, "off" in fp32 (TF32 off on CUDA), the probabilities of ``cxr evaluate``.

    Grad-CAM runs on a separate copy of the weights under a lock: it hooks a layer of the model it runs on, and a
    prediction running through the same module in another thread would fire that hook too.
    """

    backend = "torch"
    heatmap_unavailable = None

    def __init__(self, ckpt: Any, device: str = "auto", threads: int = 0, amp: str = "auto") -> None:
        import torch

        from cxr.evaluate import load_for_inference
        from cxr.export import model_card, model_id

        if threads > 0:
            torch.set_num_threads(threads)  # process-wide: PyTorch has one intra-op setting
        # The loading, device and numerics of predict, evaluate and explain (load_engine warns of an unchosen threshold)
        self._run = load_for_inference(ckpt, device=device, amp=amp, threshold=ckpt.threshold)
        self.ckpt, self.device, self.net = ckpt, self._run.device, self._run.net
        self.bf16, self.channels_last = self._run.bf16, self._run.channels_last
        self.inference_dtype = "bfloat16" if self.bf16 else "float32"
        self._cam_net = ckpt.build(self.device)
        self._cam_lock = threading.Lock()
        self.model_id = model_id(ckpt)
        self.class_names = list(ckpt.class_names)
        self.threshold = float(ckpt.threshold)
        self.image_size = ckpt.config.image_size
        self.max_pixels = ckpt.config.max_pixels
        self.draft = ckpt.config.draft
        self.card = model_card(ckpt, id_=self.model_id)

    def predict_uint8(self, images: np.ndarray) -> np.ndarray:
        """P(positive class), float64 (N,), for uint8 images (N, S, S) of the model's size S."""
        return self._run.probs(np.asarray(images))

    def heatmap_png(self, image: np.ndarray, target: int) -> tuple[bytes, bool]:
        """Grad-CAM overlay for class index ``target`` as PNG bytes, and whether the map is flat."""
        cfg = self.ckpt.config
        with self._cam_lock:
            return _heatmap_png(self._cam_net, image, mean=cfg.mean, std=cfg.std, target=target)

    def predict_with_heatmap(self, image: np.ndarray) -> Explained | None:
        """P(positive class) of the (S, S) uint8 ``image`` and the Grad-CAM map of the class the threshold gives it,
        from one forward pass; None where the predictions are not plain fp32 (bf16 or channels_last kernels give
        other last digits than Grad-CAM's fp32 pass: the caller then predicts and explains in two passes). In fp32
        the pass gives the probability of :meth:`predict_uint8` to the bit, and a request takes half the time
        (``--amp off`` on the 2-core Xeon; BENCHMARKS.md, figure 12)."""
        from cxr.explain import heatmaps_for_images

        if self.bf16 or self.channels_last:
            return None
        cfg = self.ckpt.config
        t0 = time.perf_counter()  # the wait for the lock counts as the pass's, not as the overlay's drawing
        with self._cam_lock:
            heats, probs = heatmaps_for_images(self._cam_net, image[None], mean=cfg.mean, std=cfg.std,
                                               threshold=self.threshold, image_size=cfg.image_size)
            return Explained(float(probs[0]), heats[0], time.perf_counter() - t0)


class OnnxEngine:
    """An exported model on ONNX Runtime (CPU, fp32). No heatmap: Grad-CAM needs gradients, which it does not give."""

    backend = "onnx"
    inference_dtype = "float32"
    heatmap_unavailable = ("Grad-CAM needs gradients, which the ONNX Runtime backend does not compute; "
                           "run the service with --backend torch for heatmaps")

    def __init__(self, model: Any, threads: int = 0) -> None:
        from cxr.onnx_backend import load_onnx_predictor  # no torch for an .onnx file

        self.predictor = load_onnx_predictor(model, threads=threads, threshold_flag=False)
        p = self.predictor
        self.model_id, self.class_names, self.threshold = p.model_id, p.class_names, p.threshold
        self.image_size, self.max_pixels, self.card, self.draft = p.image_size, p.max_pixels, p.card, p.draft

    def predict_uint8(self, images: np.ndarray) -> np.ndarray:
        return self.predictor.predict_uint8(images)

    def heatmap_png(self, image: np.ndarray, target: int) -> tuple[bytes, bool]:
        raise NotImplementedError(self.heatmap_unavailable)


def load_engine(model: str | os.PathLike, backend: str = "torch", device: str = "auto", threads: int = 0,
                amp: str = "auto") -> Engine:
    """The engine for ``model`` (checkpoint, run directory, ``default``, or an ``.onnx`` file for ``onnx``).

    ``amp``: bf16 autocast for the torch backend, as ``cxr predict --amp`` (auto: where the device is fast at it;
    off: fp32). ONNX Runtime computes in fp32 and refuses "on".

    ``threads``: intra-op threads per prediction (0: the library's default, one per core). With several
    predictions at once on a few cores, ``cores / max_concurrency`` avoids oversubscription (see BENCHMARKS.md).
    For the torch backend it is torch's one setting for the whole process (``torch.set_num_threads``): a service owns
    its process; in a notebook, other torch work then runs with as many threads.
    """
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: use {' or '.join(BACKENDS)}")
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 0:
        raise UsageError(f"--threads {threads}: must be a whole number >= 0")
    if amp not in ("auto", "on", "off"):
        raise UsageError(f"--amp {amp!r}: use auto, on or off")
    if backend == "onnx":
        if device not in ("auto", "cpu"):
            raise UsageError("--backend onnx runs on the CPU; drop --device or use --device cpu")
        if amp == "on":
            raise UsageError("--backend onnx computes in fp32; drop --amp on")
        if not isinstance(model, str | os.PathLike):
            raise UsageError("the onnx backend takes a model file, run directory or 'default', not a loaded Checkpoint")
        return OnnxEngine(model, threads=threads)
    if isinstance(model, str | os.PathLike) and str(model).lower().endswith(".onnx"):
        raise UsageError(f"{model}: an ONNX file needs --backend onnx")
    from cxr.model import load_checkpoint, warn_if_threshold_unchosen

    ckpt = load_checkpoint(model)
    warn_if_threshold_unchosen(ckpt, threshold_flag=False)  # the service has no --threshold
    return TorchEngine(ckpt, device=device, threads=threads, amp=amp)


# ----------------------------------------------------------------------------------------------- requests


class HttpError(Exception):
    """A request the service refuses, with the status and a message a person can act on."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def _safe_name(filename: str | None) -> str:
    """The last component of a client's file name, printable and short: it is only echoed back, never opened."""
    name = re.split(r"[\\/]", filename or "")[-1]
    # Shortened in the middle, its end kept: a DICOM without its preamble is known by its ".dcm", cut off with the
    # rest of a PACS export's name of UIDs (often over 120 characters), whose last digits tell its files apart.
    name = shorten_middle("".join(c for c in name if c.isprintable()).strip(), 120)
    return name or "upload"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"  # not "0.0 MB" for a small limit


@functools.cache
def _parser_limits() -> dict[str, int]:
    """The part-header limits named here, not those of recent python-multipart releases (8 headers, a line of 4,224
    bytes): a file name of 4,500 characters had met their "malformed body" before :data:`_MAX_PART_HEADERS` could
    say what was too long. Earlier releases have no such limits, nor the arguments."""
    import inspect

    from python_multipart.multipart import MultipartParser

    if "max_header_count" in inspect.signature(MultipartParser).parameters:
        # Its size is counted byte by byte, ours at each chunk's end: beyond any chunk's reach, so ours speaks first
        # (at 4 x 16 kB, a name of 70,000 characters in one chunk had met its "malformed" again).
        return {"max_header_count": _MAX_PART_HEADERS, "max_header_size": 2**62}
    return {}


async def read_upload(request: Request, max_bytes: int, idle_timeout: float | None = None) -> tuple[bytes, str]:
    """The bytes and file name of multipart field ``file``, parsed in memory while the body streams in.

    ``idle_timeout``: seconds the body may send nothing (as nginx's ``client_body_timeout``): a stalled upload would
    otherwise hold its connection, one of ``--max-connections``, for good, and enough of them lock the service out,
    health checks included.

    Raises:
        HttpError: 413 over ``max_bytes``, 415 not multipart/form-data, 400 malformed, 422 no ``file`` field, 408
        nothing received for ``idle_timeout`` seconds.
    """
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise HttpError(415, "send the image as multipart/form-data, in a field named 'file'")
    limit = max_bytes + _MULTIPART_OVERHEAD
    too_big = f"upload over the {_mb(max_bytes)} limit"
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HttpError(413, f"{too_big} ({_mb(int(length))} sent)")

    parts: list[dict[str, Any]] = []
    header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}
    ended = []  # the closing boundary was seen: without it, a cut-off upload would pass as a shorter file

    def on_part_begin() -> None:
        if len(parts) == _MAX_PARTS:
            raise HttpError(400, f"more than {_MAX_PARTS} form fields: send the image alone, as field 'file'")
        parts.append({"headers": {}, "header_bytes": 0, "data": bytearray(), "keep": False})

    def on_header_field(b: bytes, start: int, end: int) -> None:
        header_bytes(end - start)
        header["field"] += b[start:end]

    def on_header_value(b: bytes, start: int, end: int) -> None:
        header_bytes(end - start)
        header["value"] += b[start:end]

    def header_bytes(n: int) -> None:
        parts[-1]["header_bytes"] += n
        if parts[-1]["header_bytes"] > _MAX_PART_HEADERS:
            raise HttpError(400, f"form field headers over {_mb(_MAX_PART_HEADERS)} (a file name that long?)")

    def on_header_end() -> None:
        parts[-1]["headers"][bytes(header["field"]).lower()] = bytes(header["value"])
        header["field"], header["value"] = bytearray(), bytearray()

    def on_headers_finished() -> None:  # only the image's bytes are kept; other fields are counted, not stored
        _, disp = parse_options_header(parts[-1]["headers"].get(b"content-disposition", b""))
        parts[-1]["keep"] = disp.get(b"name") == b"file"

    def on_part_data(b: bytes, start: int, end: int) -> None:
        if parts[-1]["keep"]:
            parts[-1]["data"] += b[start:end]

    received = 0
    chunks = request.stream().__aiter__()
    try:
        # Inside the try: python-multipart refuses some boundaries (over 256 bytes) as it builds the parser.
        parser = MultipartParser(params[b"boundary"], {
            "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data, "on_end": lambda: ended.append(True)}, **_parser_limits())
        while True:
            try:
                with anyio.fail_after(idle_timeout):
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise HttpError(408, f"the upload sent nothing for {idle_timeout:g} s ({received:,} bytes received); "
                                "send it again", headers={"Connection": "close"}) from None
            received += len(chunk)
            if received > limit:
                raise HttpError(413, too_big)
            parser.write(chunk)
        parser.finalize()
    except FormParserError:
        raise HttpError(400, "malformed multipart/form-data body") from None
    except ClientDisconnect:
        raise HttpError(400, "the client went away during the upload") from None
    if not ended:
        raise HttpError(400, "incomplete multipart/form-data body (no closing boundary): the upload was cut off")

    files = []
    for part in parts:
        if part["keep"]:
            _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
            files.append((bytes(part["data"]), disp.get(b"filename", b"").decode("utf-8", "replace")))
    if len(files) != 1:
        raise HttpError(422, "send exactly one image in a form field named 'file'" if files else
                        "no form field named 'file': send the image as multipart field 'file'")
    data, filename = files[0]
    if len(data) > max_bytes:
        raise HttpError(413, f"{too_big} ({_mb(len(data))} sent)")
    if not data:
        raise HttpError(422, f"{_safe_name(filename)}: empty file")
    return data, _safe_name(filename)


def run_prediction(engine: Engine, data: bytes, name: str, *, heatmap: bool = True, include_image: bool = False,
                   max_pixels: int | None = None) -> dict[str, Any]:
    """Decode, predict and explain one upload (blocking: called in a worker thread). Returns the response body.

    Raises:
        HttpError: 415 when the content is not JPEG, PNG or DICOM; 422 when it is one but cannot be decoded.
    """
    kind = sniff(data)
    # A .dcm upload without the preamble and 'DICM' marker is tried as DICOM, as the command line reads such a file;
    # the decode then says whether it is one.
    if kind is None and os.path.splitext(name)[1].lower() not in (".dcm", ".dicom"):
        raise HttpError(415, f"{name}: not an image (content is not JPEG, PNG or DICOM)")
    marked = data[128:132] == b"DICM"
    t0 = time.perf_counter()
    try:
        image = load_image(data, engine.image_size, name=name, max_pixels=max_pixels or engine.max_pixels,
                           draft=getattr(engine, "draft", False))  # an Engine written before draft was declared
    except ImageError as e:
        if not marked and e.reason.startswith("not a DICOM file"):  # no DICOM data set in it after all
            raise HttpError(415, f"{name}: not an image (content is not JPEG, PNG or DICOM: {e.reason})") from None
        if e.reason.startswith("not an image"):  # a DICOMDIR, a report, a PDF: a non-image, not a damaged one
            raise HttpError(415, str(e)) from None
        raise HttpError(422, str(e)) from None
    t1 = time.perf_counter()
    # In fp32 the heatmap's pass gives the probability too (an Engine of another backend has no such method)
    both = getattr(engine, "predict_with_heatmap", None)
    explained = both(image) if heatmap and engine.heatmap_unavailable is None and both is not None else None
    if explained is None:
        prob = float(engine.predict_uint8(image[None])[0])
        t2 = time.perf_counter()
    else:
        prob, t2 = explained.prob, t1 + explained.seconds  # the pass counts as inference, the overlay as heatmap
    predicted = int(prob >= engine.threshold)
    overlay, note = None, None
    if heatmap and engine.heatmap_unavailable is None:
        if explained is None:
            png, flat = engine.heatmap_png(image, predicted)
        else:
            from cxr.explain import overlay as draw

            png, flat = _png(draw(image, explained.heat)), not explained.heat.any()
        overlay = {"method": "Grad-CAM", "target": engine.class_names[predicted], "flat": flat,
                   "png_base64": base64.b64encode(png).decode("ascii")}
        if flat:
            note = (f"flat: no region raised the score of {engine.class_names[predicted]}, so the picture is the "
                    "plain X-ray")
        elif leans_away(prob, predicted):  # P between 0.5 and the threshold: the map is not the label's reason
            note = (f"the map shows what raised {engine.class_names[predicted]}, the label the threshold gives; the "
                    f"model's output leans {engine.class_names[1 - predicted]} (P on that side of 0.5)")
    elif heatmap:
        note = engine.heatmap_unavailable
    else:
        note = "not requested (heatmap=false)"
    t3 = time.perf_counter()
    return {
        "filename": name,
        "label": engine.class_names[predicted],
        "probability": prob,
        "probabilities": {engine.class_names[0]: 1.0 - prob, engine.class_names[-1]: prob},
        "threshold": engine.threshold,
        "model": {"id": engine.model_id, "version": __version__, "backend": engine.backend},
        "heatmap": overlay,
        "heatmap_note": note,
        # a study's lateral beside its PA view: scored all the same, but said (the model knows frontal views only)
        "input_note": (f"by its DICOM header, {view}: {VIEW_ADVICE}, so this prediction means little"
                       if (view := dicom_view_note(data) if kind != "jpeg" and kind != "png" else None) else None),
        "image_png_base64": base64.b64encode(_png(image)).decode("ascii") if include_image else None,
        "format": kind or "dicom",  # None: a .dcm without preamble, read as DICOM
        "timing_ms": {"decode": round(1e3 * (t1 - t0), 2), "inference": round(1e3 * (t2 - t1), 2),
                      "heatmap": round(1e3 * (t3 - t2), 2)},
        "note": DISCLAIMER,
    }


# ----------------------------------------------------------------------------------------------- the app


@dataclass(frozen=True)
class Limits:
    """What one service instance accepts."""

    max_upload_bytes: int
    max_concurrency: int
    max_queue: int
    max_pixels: int | None
    upload_timeout: float | None = 30.0


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
    """The name in a ``Host`` header, lower case, without its port: ``[::1]:8000`` -> ``::1``, ``Example.org:80``
    -> ``example.org``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    # the fully qualified form, "cxr.example.org.", names the same host (a browser sends it when the URL has the dot);
    # one dot, of a name: "." or ".." stays itself (stripped, it had read as no Host at all, and passed the check)
    return name[:-1] if name.endswith(".") and name.strip(".") else name


def resolve_allowed_hosts(host: str, given: Sequence[str] | None) -> Sequence[str] | None:
    """What ``cxr serve --host HOST [--allowed-hosts ...]`` checks (None: any name).

    ``*`` allows any name. Names given are allowed with the loopback names (local health checks and a proxy that
    forwards no Host of its own keep working), written as host names: ``https://cxr.example.org:443/`` counts as
    ``cxr.example.org``. Without names, a service on the loopback address answers to its own names only (against DNS
    rebinding), one on another address to any (a public service is reached by many names).
    """
    if given is not None:
        if "*" in given:
            return None
        names = {host_name(re.sub(r"^[a-z]+://", "", g.strip(), flags=re.I).split("/", 1)[0]) for g in given}
        return tuple(sorted(names - {""} | set(LOOPBACK_HOSTS)))
    if not _is_loopback(host):
        return None
    own = host_name(host if ":" not in host.strip("[]") else f"[{host.strip('[]')}]")
    return tuple(sorted(set(LOOPBACK_HOSTS) | {own}))  # and the name it was started with (127.0.0.2 refused itself)


def resolve_cors_origins(given: Sequence[str] | str | None) -> tuple[str, ...]:
    """The origins ``--cors-origins`` lets call the API from their pages, as browsers write them in ``Origin``.

    An origin is a scheme and a host (``https://viewer.hospital.example``, a port where not the scheme's own); ``*``
    allows any. Written as browsers send it: lower case, no trailing slash, no default port (``:443`` had never
    matched). A bare host name is refused rather than never matching.
    """
    if given is None:
        return ()
    origins = []
    for g in [given] if isinstance(given, str) else list(given):
        g = str(g).strip()
        if g == "*":
            origins.append("*")
            continue
        match = re.fullmatch(r"(https?)://([^/?#\s@]+?)(?::(\d+))?/?", g, flags=re.I)
        if not match:
            raise UsageError(f"--cors-origins {g!r}: an origin is a scheme and a host name, with a port where it is "
                             "not the scheme's own, such as https://viewer.hospital.example or http://localhost:3000 "
                             "(or * for any)")
        scheme, name, port = match[1].lower(), match[2].lower(), match[3]
        if "*" in name or (port and not 0 < int(port) <= 65535):  # browsers send neither: it had never matched
            raise UsageError(f"--cors-origins {g!r}: {'a host name with * ' if '*' in name else 'a port beyond 65535 '}"
                             "never matches the Origin a browser sends; name each origin (or * alone for any)")
        default = {"http": "80", "https": "443"}[scheme]
        origins.append(f"{scheme}://{name}" + (f":{int(port)}" if port and int(port) != int(default) else ""))
    return tuple(dict.fromkeys(origins))


def _cors_settings(origins: Sequence[str]) -> dict[str, Any]:
    """starlette's CORSMiddleware's settings for ``--cors-origins``: the app's, and the refusal beyond
    ``--max-connections`` (:func:`_connection_limit`), whose 503 a page had been unable to read."""
    return {"allow_origins": list(origins), "allow_methods": ["GET", "HEAD", "POST"], "expose_headers": ["Retry-After"],
            "max_age": 600}


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is, or resolves only to, loopback addresses (127.0.0.0/8, ::1, ::ffff:127.x.y.z): 127.0.0.2, a
    name of /etc/hosts for 127.0.1.1 (Ubuntu's own host name) and 127.1 had gone unprotected."""
    import ipaddress
    import socket

    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except (OSError, UnicodeError):
        return False

    def loopback(text: str) -> bool:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        mapped = getattr(address, "ipv4_mapped", None)
        return address.is_loopback or (mapped is not None and mapped.is_loopback)

    return bool(addresses) and all(loopback(a) for a in addresses)


class AllowedHosts:
    """ASGI middleware answering 400 to a request whose ``Host`` is not one of ``names``.

    A service bound to the loopback address is reachable from the browsers of its machine; without this check a web
    page could point a name of its own at 127.0.0.1 (DNS rebinding) and use the service through the browser. A
    request without a Host header (an HTTP/1.0 health check) is let through: browsers always send one.
    """

    def __init__(self, app: Any, names: Sequence[str]) -> None:
        self.app, self.names = app, {host_name(n) for n in names}
        self.refused: set[str] = set()  # names already logged: once each, not once per request

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
            name = host_name(header)
            if name and name not in self.names:  # none or empty: an HTTP/1.0 health check (browsers send one)
                shown = display_name(name)[:100]
                advice = (f"this service answers to {', '.join(sorted(self.names))}, not to {shown!r}: if a proxy "
                          f"forwards that name, start it with --allowed-hosts {shown}")
                if name not in self.refused and len(self.refused) < 100:
                    self.refused.add(name)
                    log.warning("refused a request for host %r (400): %s", shown, advice.split(": ", 1)[1])
                await JSONResponse({"detail": advice}, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware adding security headers to every response (a strict CSP except on the OpenAPI pages)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # behind a proxy under a path (--root-path): the path within the app
            path = path[len(root):]
        csp = _DOCS_CSP if path.startswith(_DOCS_PATHS) else _CSP

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"server"]
                headers += [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                            (b"referrer-policy", b"no-referrer"), (b"content-security-policy", csp.encode()),
                            (b"cross-origin-opener-policy", b"same-origin"),
                            (b"permissions-policy", b"camera=(), microphone=(), geolocation=()")]
                if path.startswith(API):
                    headers.append((b"cache-control", b"no-store"))
                elif not any(k.lower() == b"cache-control" for k, _ in headers):
                    # The page and its script: revalidated on every load (cheap, with their ETag), so an upgraded
                    # cxr is never shown through a stale page or a mix of old page and new script.
                    headers.append((b"cache-control", b"no-cache"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class ModelRef(BaseModel):
    id: str = Field(description="first 12 hex digits of the SHA-256 of the checkpoint file")
    version: str = Field(description="cxr version serving it")
    backend: str = Field(description="torch or onnx")


class HeatmapOut(BaseModel):
    method: str
    target: str = Field(description="the class whose evidence is shown (the predicted one)")
    png_base64: str = Field(description="PNG of the model's input with the heatmap laid over it")
    flat: bool = Field(False, description="the map is zero everywhere: nothing raised the class's score")


class PredictionOut(BaseModel):
    filename: str
    label: str = Field(description="PNEUMONIA when probability >= threshold, else NORMAL")
    probability: float = Field(description="P(PNEUMONIA) by the model")
    probabilities: dict[str, float]
    threshold: float
    model: ModelRef
    heatmap: HeatmapOut | None
    heatmap_note: str | None = Field(description="why heatmap is null, that it is flat, or that the "
                                            "model's output leans away from the label the map explains")
    input_note: str | None = Field(None, description="what the DICOM header says against the upload being a frontal "
                                   "chest X-ray (a lateral or oblique view, another body part), and so against the "
                                   "prediction; null where it says nothing of the kind")
    image_png_base64: str | None = Field(description="the model's input as PNG, with include_image=true")
    format: str = Field(description="jpeg, png or dicom")
    timing_ms: dict[str, float] = Field(description="upload, queue, decode, inference, heatmap, total (server side); "
                                        "where one fp32 pass gives the prediction and the heatmap, inference is "
                                        "that pass (its wait for the model included) and heatmap the overlay's "
                                        "drawing")
    note: str


class ErrorOut(BaseModel):
    detail: str


class HealthOut(BaseModel):
    status: str
    model_id: str
    backend: str
    version: str
    uptime_s: float
    busy: int = Field(description="requests being decoded or predicted now")
    waiting: int = Field(description="requests waiting for a worker")


def _check_limits(max_upload_mb: Any, max_concurrency: Any, max_queue: Any, upload_timeout: Any,
                  max_pixels: Any) -> None:
    """A UsageError for limits of :func:`create_app` that cannot work (checked by :func:`serve` too, before it
    divides the cores by ``max_concurrency``: 0 had met a ZeroDivisionError there)."""
    def number(v, whole: bool = False) -> bool:
        return not isinstance(v, bool) and isinstance(v, numbers.Integral if whole else numbers.Real)

    if not (number(max_upload_mb) and number(max_concurrency, True) and number(max_queue, True)
            and (upload_timeout is None or number(upload_timeout))):  # "5" had met a TypeError of `<` below
        raise UsageError(f"max_upload_mb, max_concurrency, max_queue and upload_timeout must be numbers (whole for "
                         f"the two counts), got {max_upload_mb!r}, {max_concurrency!r}, {max_queue!r}, "
                         f"{upload_timeout!r}")
    if not (0 < max_upload_mb <= MAX_UPLOAD_MB) or max_concurrency < 1 or max_queue < 0 or (
            upload_timeout is not None and not upload_timeout > 0):  # NaN fails each of these, as it must
        raise UsageError(f"max_upload_mb must be > 0 and <= {MAX_UPLOAD_MB}, max_concurrency >= 1, max_queue >= 0 and "
                         "upload_timeout > 0")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral)
                                   or max_pixels < 1):
        # 0 had meant the model's default, -1 or 10.5 refused every image
        raise UsageError(f"max_pixels must be None (the model's setting) or a whole number >= 1, got {max_pixels!r}")


def create_app(model: str | os.PathLike | Engine = "default", *, backend: str = "torch", max_upload_mb: float = 20.0,
               max_concurrency: int = 2, max_queue: int = 32, device: str = "auto", threads: int = 0,
               max_pixels: int | None = None, amp: str = "auto", upload_timeout: float | None = 30.0,
               allowed_hosts: Sequence[str] | None = None, cors_origins: Sequence[str] | None = None) -> FastAPI:
    """The FastAPI application serving one model.

    Args:
        model: a checkpoint file, run directory or ``default`` (the bundled model); an ``.onnx`` file with
            ``backend="onnx"``; or a ready :class:`Engine`.
        backend: ``torch`` or ``onnx`` (ONNX Runtime, CPU; no heatmaps).
        max_upload_mb: larger uploads get 413.
        max_concurrency: predictions running at once (each in a worker thread).
        max_queue: requests allowed to wait for a worker; beyond that, 503 with ``Retry-After``.
        device: ``auto``, ``cpu`` or ``cuda`` for the torch backend.
        threads: intra-op threads per prediction (0: the library default); see :func:`load_engine`.
        max_pixels: refuse larger images (default: the model's setting), checked before decoding.
        amp: bf16 autocast for the torch backend (auto, on, off); see :func:`load_engine`.
        upload_timeout: seconds an upload may send nothing before it gets 408 and its connection is closed (None:
            no limit); see :func:`read_upload`.
        allowed_hosts: the host names requests may be addressed to (400 for others; see :class:`AllowedHosts`),
            read as ``--allowed-hosts`` reads them (:func:`resolve_allowed_hosts`: ``*`` any, URLs as their host
            names, the loopback names always); None: any.
        cors_origins: the origins whose pages may call the API from a browser (CORS; see
            :func:`resolve_cors_origins`: ``https://viewer.example``, ``*`` any); None: none, the page's own only.
    """
    cors_origins = resolve_cors_origins(cors_origins)
    _check_limits(max_upload_mb, max_concurrency, max_queue, upload_timeout, max_pixels)
    # An Engine as it is; a file, run directory, name or loaded Checkpoint through load_engine (which imports torch
    # only for the torch backend: an ONNX service runs without it).
    if allowed_hosts is not None:  # as --allowed-hosts: "*" any name, URLs as their host names, the loopback names
        # too (a name given as one string had been taken letter by letter, and "*" refused every request)
        allowed_hosts = resolve_allowed_hosts("", [allowed_hosts] if isinstance(allowed_hosts, str)
                                              else list(allowed_hosts))
    engine: Engine = model if hasattr(model, "predict_uint8") else load_engine(model, backend, device, threads, amp)
    limits = Limits(int(max_upload_mb * 1e6), max_concurrency, max_queue, max_pixels, upload_timeout)
    limiter = anyio.CapacityLimiter(max_concurrency)
    # The predictions' own threads: anyio's default pool (40) is shared with the page and the static files, and had
    # capped --max-concurrency above 40 and kept the page waiting behind the predictions
    worker_threads = anyio.CapacityLimiter(max_concurrency)
    admitted = [0]  # requests running or waiting for a worker (only touched on the event loop)
    seconds = [1.0]  # recent seconds per prediction (moving average): what a client turned away should wait

    def retry_after() -> str:
        """Seconds until the work already admitted is likely done: its requests over the workers, at recent speed."""
        return str(max(1, math.ceil(admitted[0] / limiter.total_tokens * seconds[0])))

    started = time.monotonic()

    app = FastAPIOffline(
        title="cxr", version=__version__, static_url="/static-docs",
        swagger_ui_parameters={"validatorUrl": None},  # Swagger UI would ask swagger.io to validate the schema
        description="Chest X-ray classification (NORMAL vs PNEUMONIA) with a DenseNet. " + DISCLAIMER,
    )
    app.state.engine, app.state.limits = engine, limits

    @app.exception_handler(HttpError)
    async def _refused(request: Request, exc: HttpError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        what = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in exc.errors())
        return JSONResponse({"detail": what or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A last resort (predict catches its own): the traceback goes to the log, the client gets one line.
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        if isinstance(exc, MemoryError):
            return JSONResponse({"detail": "out of memory: retry later"}, status_code=503,
                                headers={"Retry-After": retry_after()})
        return JSONResponse({"detail": "internal error: the request could not be processed"}, status_code=500)

    errors = {s: {"model": ErrorOut, "description": d} for s, d in (
        (400, "malformed multipart body"), (413, "upload over the size limit"),
        (415, "not multipart/form-data, or content that is not JPEG, PNG or DICOM"),
        (422, "no 'file' field, or an image that cannot be decoded (the message says why)"),
        (503, "too many requests waiting; retry after the number of seconds in Retry-After"))}
    upload_schema = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary",
                                "description": f"one X-ray: JPEG, PNG or DICOM, at most {max_upload_mb:g} MB"}}}}}}}

    @app.post(f"{API}/predict", response_model=PredictionOut, responses=errors, openapi_extra=upload_schema,
              summary="Predict NORMAL or PNEUMONIA for one uploaded X-ray")
    async def predict(request: Request,
                      heatmap: bool = Query(True, description="compute the Grad-CAM overlay (torch backend)"),
                      include_image: bool = Query(False, description="also return the model's input as PNG")
                      ) -> dict[str, Any]:
        t0 = time.perf_counter()
        bound = limits.max_concurrency + limits.max_queue
        busy = HttpError(503, "busy: too many requests waiting; retry shortly", {"Retry-After": retry_after()})
        if admitted[0] >= bound:  # early, so a full service does not read the upload first
            raise busy
        data, name = await read_upload(request, limits.max_upload_bytes, limits.upload_timeout)
        t1 = time.perf_counter()
        # Checked again and counted with no await in between: concurrent uploads cannot all slip past the bound.
        if admitted[0] >= bound:
            raise busy
        admitted[0] += 1

        def work() -> dict[str, Any]:
            t_start = time.perf_counter()
            out = run_prediction(engine, data, name, heatmap=heatmap, include_image=include_image,
                                 max_pixels=limits.max_pixels)
            out["timing_ms"]["queue"] = round(1e3 * (t_start - t1), 2)
            seconds[0] = 0.8 * seconds[0] + 0.2 * (time.perf_counter() - t_start)
            return out

        try:
            async with limiter:  # a worker's turn; then not spent on a client that has left meanwhile
                if await request.is_disconnected():
                    log.info("predict: the client left before its turn; not computed")
                    raise HttpError(408, "the client closed the connection before the prediction")
                result = await anyio.to_thread.run_sync(work, limiter=worker_threads)
        except HttpError:
            raise
        except Exception as e:
            # The traceback goes to the server's log; the client gets one line without internals.
            # what failed on the first line: the traceback's last line had been the only one to say it
            log.error("prediction failed: %s: %s", type(e).__name__, (str(e).strip().splitlines() or [""])[0][:300],
                      exc_info=e)
            if isinstance(e, MemoryError):
                raise HttpError(503, "out of memory: retry later", {"Retry-After": retry_after()}) from None
            raise HttpError(500, "internal error: the image could not be processed") from None
        finally:
            admitted[0] -= 1
        result["timing_ms"]["upload"] = round(1e3 * (t1 - t0), 2)
        result["timing_ms"]["total"] = round(1e3 * (time.perf_counter() - t0), 2)
        log.info("predict: %s p=%s in %.0f ms", result["label"], prob_text(result["probability"]),
                 result["timing_ms"]["total"])
        return result

    @app.head(f"{API}/health", include_in_schema=False)  # uptime checks that send HEAD
    @app.get(f"{API}/health", response_model=HealthOut, summary="Liveness and load")
    async def health() -> dict[str, Any]:
        busy = limiter.borrowed_tokens
        return {"status": "ok", "model_id": engine.model_id, "backend": engine.backend, "version": __version__,
                "uptime_s": round(time.monotonic() - started, 1), "busy": busy, "waiting": admitted[0] - busy}

    @app.head(f"{API}/model", include_in_schema=False)  # a check of which model is up, as for health
    @app.get(f"{API}/model", summary="The model card: training data, metrics, threshold, intended use")
    async def model_card() -> dict[str, Any]:
        return {**engine.card, "model_id": engine.model_id, "threshold": engine.threshold,
                "class_names": engine.class_names, "backend": engine.backend,
                "inference_dtype": getattr(engine, "inference_dtype", None),
                "served_by": f"cxr {__version__}",
                "heatmap": engine.heatmap_unavailable or "Grad-CAM of the predicted class",
                "limits": {"max_upload_mb": max_upload_mb, "max_concurrency": max_concurrency,
                           "formats": ["jpeg", "png", "dicom"]}}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    # Content types from the file name through mimetypes, which on Windows reads the registry: a .js entry of
    # text/plain there, with nosniff, and the browser runs no script (the page does nothing). Set here, not read.
    mimetypes.add_type("text/javascript", ".js")
    mimetypes.add_type("text/css", ".css")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if allowed_hosts is not None:
        app.add_middleware(AllowedHosts, names=allowed_hosts)
    if cors_origins:
        # Outside the host check, so a page allowed to call the service can read why a request was refused (a 400 for
        # its Host, a 413, a 503 and its Retry-After) rather than see a bare network error. No credentials: the API
        # has no cookies or logins.
        app.add_middleware(CORSMiddleware, **_cors_settings(cors_origins))
    # Outermost, so error responses and static files get the headers too.
    app.add_middleware(SecurityHeaders)
    return app


def http_protocol(header_timeout: float | None, cors_origins: Sequence[str] = ()) -> type | str:
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived ``header_timeout``
    seconds after it opened, or after the first byte of a later request.

    uvicorn times a connection out only while it is idle between requests, and not once a byte has come: a connection
    that sent nothing, or half its headers, held one of ``--max-connections`` for good, and enough of them had every
    request answered 503, health checks included. (h11 rather than httptools, whose state this reads.) "auto" where
    this uvicorn lacks what the subclass uses. It also answers beyond ``limit_concurrency`` (``--max-connections``) as
    the API answers a full queue (:func:`_connection_limit`), with or without ``header_timeout``, with the CORS
    headers of ``cors_origins`` (``--cors-origins``).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if not all(hasattr(H11Protocol, a) for a in ("timeout_keep_alive_handler", "connection_made", "data_received")):
        return "auto"

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: Any = None  # an asyncio.TimerHandle while the request's headers are awaited
        refusals: Refusals | None = None  # beyond --max-connections, counted for the log
        admitted: list[int] | None = None  # the server's requests in progress past the limit's check

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # uvicorn's own answer beyond --max-connections was a plain-text 503 without Retry-After or the service's
            # headers, which clients that read the API's JSON errors (and the page) could not take: the same check,
            # answered as the API answers a full queue.
            limit = getattr(self, "limit_concurrency", None)
            if limit is not None and hasattr(self, "connections") and hasattr(self, "tasks"):
                self.limit_concurrency = None
                if HeaderTimeoutH11Protocol.refusals is None:  # one count for the server's connections
                    HeaderTimeoutH11Protocol.refusals = Refusals(limit)
                    HeaderTimeoutH11Protocol.admitted = [0]
                self.app = _connection_limit(self.app, self, limit, HeaderTimeoutH11Protocol.refusals,
                                             HeaderTimeoutH11Protocol.admitted, cors_origins)

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if header_timeout is not None:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_timed_out)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if header_timeout is None:
                return
            if self.conn.their_state is not h11.IDLE:  # the request's headers are in
                self._cancel_header_timer()
            elif self._header_timer is None:  # a later request has begun
                self._header_timer = self.loop.call_later(header_timeout, self._headers_timed_out)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE:
                self.timeout_keep_alive_handler()  # closes the connection, as uvicorn does an idle one

    return HeaderTimeoutH11Protocol


class Refusals:
    """Refusals beyond ``--max-connections``, logged with their count at most once every ``every_s`` seconds: a line
    each had been 2,638 lines in 8 s of a burst. A count not yet said is said ``every_s`` s after the line before it
    (a timer on the event loop), and when the service stops (:meth:`flush`): the rest of a burst had waited for the next
    refusal, and been lost when none came. One per server (the event loop's thread)."""

    def __init__(self, limit: int, every_s: float = 10.0) -> None:
        self.limit, self.every_s = limit, every_s
        self.count, self.said, self._timer = 0, -math.inf, None

    def add(self, loop: asyncio.AbstractEventLoop) -> None:
        self.count += 1
        wait = self.said + self.every_s - time.monotonic()
        if wait <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(wait, self.flush)

    def flush(self) -> None:
        """Log the refusals not yet said, if any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.count:
            return
        now = time.monotonic()
        since = "so far" if self.said == -math.inf else f"in the last {now - self.said:.0f} s"
        log.warning(  # cxr's logger, whose lines carry their time: "in the last 10 s" can be placed
            "Exceeded concurrency limit (--max-connections %d): %d request(s) answered 503 %s", self.limit,
            self.count, since)
        self.count, self.said = 0, now


def _connection_limit(app: Any, protocol: Any, limit: int, refusals: Refusals, admitted: list[int],
                      cors_origins: Sequence[str] = ()) -> Callable:
    """``app`` behind ``limit_concurrency`` (``--max-connections``): at most ``limit`` requests in progress at once,
    uploads still arriving included, the rest refused as the API refuses: a JSON ``ErrorOut``, 503 with Retry-After,
    the service's headers. ``admitted`` counts the server's requests in progress (one list for all its
    connections).

    Counted by the requests let in, not the connections open (uvicorn's check): every request of a burst saw the
    burst's connections, the ones being refused included, and a burst of 12 at a limit of 10 had 11 refused."""
    refusal = SecurityHeaders(CORSMiddleware(_too_many_connections, **_cors_settings(cors_origins)) if cors_origins
                              else _too_many_connections)

    async def limited(scope: dict, receive: Callable, send: Callable) -> None:
        # The health check is answered at the limit: a burst of slow uploads had had a working service's every
        # check answered 503, and a load balancer would have pulled it.
        health = scope.get("method") in ("GET", "HEAD") and scope.get("path", "").endswith(f"{API}/health")
        if scope["type"] != "http" or health:
            await app(scope, receive, send)
            return
        if admitted[0] >= limit:
            if scope.get("method") != "OPTIONS":  # a CORS preflight is answered 200 by the refusal's CORS layer
                refusals.add(protocol.loop)
            await refusal(scope, receive, send)
            return
        admitted[0] += 1  # one event loop: no lock
        try:
            await app(scope, receive, send)
        finally:
            admitted[0] -= 1

    return limited


async def _too_many_connections(scope: dict, receive: Callable, send: Callable) -> None:
    body = json.dumps({"detail": "busy: too many connections (--max-connections); retry after the number of seconds "
                                 "in Retry-After"}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"2"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def serve(model: str | os.PathLike = "default", host: str = "127.0.0.1", port: int = 8000, *, backend: str = "torch",
          max_upload_mb: float = 20.0, max_concurrency: int = 2, max_queue: int = 32, device: str = "auto",
          threads: int | None = None, max_pixels: int | None = None, log_level: str = "info",
          max_connections: int = 128, amp: str = "auto", upload_timeout: float | None = 30.0,
          allowed_hosts: Sequence[str] | None = None, root_path: str = "", access_log: bool = False,
          cors_origins: Sequence[str] | None = None) -> None:
    """Run the service with uvicorn until interrupted (``cxr serve``). The port is taken first, then the model loads.

    ``max_connections`` caps the requests in progress at once, uploads still arriving included (503 beyond it,
    :func:`_connection_limit`): the queue bounds the requests being predicted, this bounds the memory held by slow
    uploads (at most about ``max_connections * max_upload_mb``). ``upload_timeout`` frees the connection of an upload
    that stalls, or of a connection that does not send a request's headers in that time (:func:`http_protocol`),
    which would otherwise hold it for good.

    Arguments as :func:`create_app`, except ``threads``: None (default) gives each of the ``max_concurrency``
    predictions an equal share of the cores, at most ``OMP_NUM_THREADS`` (:func:`default_threads`). Letting each
    take every core oversubscribes them, which on a busy machine made PyTorch's OpenMP ~90x slower (see
    BENCHMARKS.md). ``allowed_hosts``: see
    :func:`resolve_allowed_hosts`. ``root_path``: the path a reverse proxy serves the service under (``/cxr``), so
    that the API docs and redirects name it (the page and its calls are relative and need nothing). ``access_log``:
    uvicorn's line for every request (client, method, path, status); without it only predictions are logged, one line
    each.
    """
    import uvicorn

    allowed_hosts = resolve_allowed_hosts(host, allowed_hosts)
    cors_origins = resolve_cors_origins(cors_origins)
    if root_path and not root_path.startswith("/"):
        raise UsageError(f"--root-path {root_path}: a path from the root of the proxy's address, such as /cxr")
    _check_limits(max_upload_mb, max_concurrency, max_queue, upload_timeout, max_pixels)
    if threads is None:
        threads = default_threads(max_concurrency)

    # The port is taken (bound and listening) before the model loads: one in use is said at once, in one line, and
    # no second service started meanwhile can take it. Connections that arrive while the model loads wait in the
    # kernel's backlog (readiness checks should ask GET /api/v1/health, not merely connect) and are served once it is
    # up, within --max-connections.
    socks = _listen(host, port)
    try:
        app = create_app(model, backend=backend, max_upload_mb=max_upload_mb, max_concurrency=max_concurrency,
                         max_queue=max_queue, device=device, threads=threads, max_pixels=max_pixels, amp=amp,
                         upload_timeout=upload_timeout, allowed_hosts=allowed_hosts, cors_origins=cors_origins)
        engine = app.state.engine
        _first_prediction(engine)
        port = socks[0].getsockname()[1]  # the one the system chose, for --port 0
        log.info("serving model %s (%s backend, %s, %d x %d threads) on http://%s:%d/  (API docs at /docs). %s",
                 engine.model_id, engine.backend, engine.inference_dtype, max_concurrency, threads,
                 host if ":" not in host else f"[{host}]", port, DISCLAIMER)
        if allowed_hosts is not None:
            log.info("answering requests for %s only (--allowed-hosts)", ", ".join(allowed_hosts))
        if cors_origins:
            log.info("the API may be called from pages of %s (--cors-origins)",
                     "any origin" if "*" in cors_origins else ", ".join(cors_origins))
        protocol = http_protocol(upload_timeout, cors_origins)
        config = uvicorn.Config(_cut_off_quietly(app), host=host, port=port, log_level=log_level, server_header=False,
                                access_log=access_log, limit_concurrency=max_connections,
                                http=protocol, root_path=root_path.rstrip("/"),
                                # a stop waits this long for requests in progress, then ends: an upload trickling
                                # in had kept a stopped service up until its own timeout, or for good
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                                # the app has no startup or shutdown of its own: without the lifespan protocol, a
                                # second Ctrl-C leaves no traceback of its cancelled lifespan task
                                lifespan="off")
        # uvicorn names its address only for sockets it binds itself; said here as it says it (its log level, so
        # also under cxr -q).
        for sock in socks:
            address, bound_port = sock.getsockname()[:2]
            logging.getLogger("uvicorn.error").info(
                "Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                f"[{address}]" if sock.family == socket.AF_INET6 else address, bound_port)
        server = _server_class()(config)
        # uvicorn shuts down on Ctrl-C, then raises it again: a clean stop (exit 0), as uvicorn.run makes it.
        try:
            with contextlib.suppress(KeyboardInterrupt):
                server.run(sockets=socks)
        finally:
            if getattr(protocol, "refusals", None) is not None:
                protocol.refusals.flush()  # the count of a last burst
    finally:
        for sock in socks:
            sock.close()
    if not server.started:
        # uvicorn exits by itself when its startup fails; this is a Ctrl-C in the instant before it took the signal.
        raise KeyboardInterrupt


def default_threads(max_concurrency: int) -> int:
    """Threads for each of ``max_concurrency`` predictions at once: an equal share of the usable cores, and at most
    ``OMP_NUM_THREADS`` where it is set (README advises it on a shared machine, and the service had overridden it:
    "1 x 2 threads" under OMP_NUM_THREADS=1)."""
    threads = max(1, usable_cores() // max_concurrency)
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        threads = min(threads, int(omp))
    return threads


# How long a stopped service waits for the requests in progress (SIGTERM, Ctrl-C): within Kubernetes' 30 s grace
SHUTDOWN_GRACE_S = 10.0


def _cut_off_quietly(app: Any) -> Callable:
    """``app``, whose requests cancelled by uvicorn (those still in progress when a stop's grace period ends, or at
    a second Ctrl-C) end with one line in the log: each had left uvicorn's "Exception in ASGI application" and a
    traceback of forty frames."""

    async def quiet(scope: dict, receive: Callable, send: Callable) -> None:
        started = []

        async def sending(message: dict) -> None:
            started.append(message.get("type"))
            await send(message)

        try:
            await app(scope, receive, sending)
        except asyncio.CancelledError:
            if scope.get("type") != "http":
                raise
            logging.getLogger("uvicorn.error").warning("a request still in progress was cut off by the stop")
            if not started:  # answered, where the connection still takes it (uvicorn logs an app that does not)
                body = json.dumps({"detail": "the service stopped before this request was done; retry"}).encode()
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.start", "status": 503,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
                    await send({"type": "http.response.body", "body": body})

    return quiet


def _first_prediction(engine: Engine) -> None:
    """One prediction, with its heatmap, of a made-up image before the service is announced: on a read-only root file
    system (a hardened container) the heatmap's first use of matplotlib failed, and every default prediction was
    answered 500 while the health check said "ok", so a load balancer kept the broken replica in rotation. Now the
    start fails, in one line. Also makes the first real request no slower than the rest."""
    side = engine.image_size
    image = (np.add.outer(np.arange(side), np.arange(side)) % 256).astype(np.uint8)
    try:
        engine.predict_uint8(image[None])
        if engine.heatmap_unavailable is None:
            engine.heatmap_png(image, 1)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        log.debug("the first prediction failed", exc_info=True)
        hint = " (set MPLCONFIGDIR to a writable folder)" if "MPLCONFIGDIR" in str(e) else ""
        raise CxrError(f"the service cannot predict here: a first prediction failed ({type(e).__name__}: "
                       f"{(str(e).strip().splitlines() or [''])[0][:300]}){hint}") from e


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, which after a stop by SIGTERM does not kill its own process with that signal again (its
        capture_signals re-raises every signal it caught): a service stopped by a supervisor (docker stop, Kubernetes)
        had exited with status 143, read as a failure. Ctrl-C is still raised again, as KeyboardInterrupt."""

        @contextlib.contextmanager
        def capture_signals(self):
            # only the default action's kill is spared: a handler of the caller's own (serve() from Python) still runs
            default = signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)
            # SIGHUP (the terminal or ssh session closed, a supervisor's reload) stops as SIGTERM does: it had killed
            # the process at once, requests in flight dropped without an answer and nothing logged.
            hangup = getattr(signal, "SIGHUP", None)
            hup_default = (hangup is not None and threading.current_thread() is threading.main_thread()
                           and signal.getsignal(hangup) in (signal.SIG_DFL, None))
            with super().capture_signals():
                if hup_default:  # a stop, recorded as no signal: a caller's own SIGTERM handler is not run for it
                    signal.signal(hangup, lambda _sig, _frame: setattr(self, "should_exit", True))
                try:
                    yield
                finally:
                    if hup_default:
                        signal.signal(hangup, signal.SIG_DFL)
                caught = getattr(self, "_captured_signals", None)
                if default and isinstance(caught, list):
                    caught[:] = [s for s in caught if s != signal.SIGTERM]

    return Server


def _listen(host: str, port: int) -> list[socket.socket]:
    """Sockets listening on ``host:port``: one for each address the host resolves to, as asyncio's ``create_server``
    (which ``uvicorn.run`` uses) binds them (``localhost`` is often 127.0.0.1 and ::1; IPv6 ones IPv6-only;
    ``SO_REUSEADDR`` on POSIX, so a port left in TIME_WAIT by a service just stopped counts as free, and exclusive
    use on Windows, where ``SO_REUSEADDR`` would let a second service share the port). With port 0 the system picks
    one, and the other addresses take the same. A port another program listens on, or an address this machine
    lacks, is refused in one line."""
    import errno

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # duplicates, as getaddrinfo can give, once
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this machine lacks (IPv6 switched off): skipped, as asyncio skips it
                continue
            socks.append(sock)
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            elif hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:
                address = (address[0], socks[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
                sock.listen(2048)  # uvicorn's default backlog
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise UsageError(f"cannot listen on {host}:{port}: another program listens there; pick another "
                                     "--port") from None
                raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise UsageError(f"cannot listen on {host}:{port}: no address of it can be opened on this machine")
    return socks

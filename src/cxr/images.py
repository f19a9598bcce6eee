"""Decode one X-ray file (JPEG, PNG or DICOM) into a 2-D uint8 intensity image, and square-resize it.

The format is found from the file's content, not its extension. Every failure raises :class:`ImageError`,
whose message names the file and says what is wrong, so a run over thousands of files can skip a bad one.

Intensity policy:

* 8-bit JPEG and PNG (modes L, RGB, RGBA, P, LA, ...) become PIL's "L" luma (ITU-R 601, alpha dropped) with
  the values kept as stored: they are not stretched, so they match the 8-bit images the models are trained on.
* An EXIF Orientation tag is applied (the image is turned upright, as viewers show it).
* Higher bit depths (16-bit PNG, 32-bit integer or float data) are stretched linearly from the image's own
  range to 0..255: its 0.01th to 99.99th percentile, so that a few dead or hot pixels do not decide it.
* An image whose decoded pixels all have one value (blank, or constant before the stretch) is refused: it shows
  nothing to classify.
* DICOM: modality LUT (rescale slope/intercept), then the VOI LUT Sequence where there is one, else the first
  window when present (never both), MONOCHROME1 (and MONOCHROME2 under an INVERSE Presentation LUT Shape) inverted
  so bone is bright, then the same stretch to 0..255 (8-bit DICOM too); pixels marked as padding (Pixel Padding
  Value, and Range Limit) are left out of the stretch and become black. Colour DICOM shows its luma, PALETTE COLOR
  its palette's luma, each stretched as well.
  Multi-frame files give their first frame.

The square resize is PIL bicubic with the aspect ratio not kept, exactly how the shared 224x224 copies of
the Kermany data set were made from the originals.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import numbers
import os
import re
import stat
import struct
import threading
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxr.config import DEFAULT_MAX_PIXELS
from cxr.errors import CxrError

# `cxr explain` names its pictures so; found in a folder, they are its output, not X-rays.
EXPLAIN_SUFFIX = "_gradcam.png"

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".dcm", ".dicom"})

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
# Modes that hold more than 8 bits per sample; everything else converts to "L" as PIL does.
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# A deflated DICOM data set may inflate to at most this many bytes per allowed pixel (800 MB at the default limit):
# pydicom inflates the whole data set in memory, and deflate reaches ~1000:1, so a 1 MB file could need 1 GB.
_DEFLATE_BYTES_PER_PIXEL = 8
_DEFLATED_TS = "1.2.840.10008.1.2.1.99"

_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


class ImageError(CxrError, ValueError):
    """A file that cannot be used as an X-ray. ``str(e)`` names the file and the problem.

    Example: ``"scan.jpeg: truncated JPEG (image file is truncated)"``. The parts are also available as
    ``e.name`` and ``e.reason``.
    """

    def __init__(self, name: str, reason: str = "") -> None:
        # A library's message may name the object it read from (pydicom's "cannot identify image file <_io.BytesIO
        # object at 0x7f44...>"): a memory address, which told a service's client nothing and was the process's.
        reason = _OBJECT_REPR.sub("the data", reason)
        # Both parts go to args so the error survives pickling from a worker process.
        super().__init__(name, reason)
        self.name = name
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}" if self.reason else self.name


def read_grayscale(
    source: str | os.PathLike | bytes, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode one X-ray file into a 2-D uint8 intensity image at full resolution.

    Args:
        source: a path, or the file's raw bytes.
        name: what error messages call the file (default: the path, or ``"<bytes>"``). Its extension
            lets a ``.dcm``/``.dicom`` file without the standard preamble still be tried as DICOM.
        max_pixels: refuse images with more pixels (width x height, read from the header before decoding).

    Returns:
        (H, W) uint8 array, intensities as described in the module docstring.

    Raises:
        ImageError: the file is missing, empty, truncated, not an image, too large or otherwise unusable.
    """
    data, label = _read_source(source, name)
    return _decode(data, label, max_pixels, draft_size=None)


def resize_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D uint8 image to (size, size) with PIL bicubic, aspect ratio not kept.

    This is how the shared 224x224 copies were made, so it is what inference inputs must go through.

    Args:
        gray: (H, W) uint8 image.
        size: output side in pixels.

    Returns:
        (size, size) uint8 array.
    """
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"resize_square needs a 2-D uint8 image, got shape {gray.shape} dtype {gray.dtype}")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    im = Image.fromarray(np.ascontiguousarray(gray))
    return np.array(im.resize((size, size), Image.Resampling.BICUBIC))


def load_image(
    source: str | os.PathLike | bytes,
    size: int,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: bool = False,
) -> np.ndarray:
    """Decode and square-resize one X-ray file: the preprocessing the image cache stores.

    Args:
        source: a path, or the file's raw bytes.
        size: output side in pixels.
        name: what error messages call the file (see :func:`read_grayscale`).
        max_pixels: refuse images with more pixels, checked before decoding.
        draft: for JPEG, let the decoder scale down by 1/2, 1/4 or 1/8 (never below ``size``) before the
            bicubic resize. Several times faster on large originals; pixels differ slightly from ``False``.

    Returns:
        (size, size) uint8 array.

    Raises:
        ImageError: as :func:`read_grayscale`.
        ValueError: ``size`` is not a whole number >= 1 (checked before the file is read).
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a whole number >= 1, got {size!r}")
    data, label = _read_source(source, name)
    gray = _decode(data, label, max_pixels, draft_size=size if draft else None)
    return resize_square(gray, size)


def read_file(path: str | os.PathLike, *, name: str | None = None) -> bytes:
    """A file's bytes, with the checks and errors :func:`load_image` applies to a path (read once, decode later).

    Raises:
        ImageError: the file is missing, a directory or other non-regular file, unreadable or empty.
    """
    return _read_source(path, name)[0]


# ---------------------------------------------------------------------------------------------- internals


def _read_source(source: str | os.PathLike | bytes, name: str | None) -> tuple[bytes, str]:
    """The file's bytes and the label error messages use for it."""
    if isinstance(source, bytes | bytearray | memoryview):
        data, label = bytes(source), name or "<bytes>"
        if not data:
            raise ImageError(label, "empty file")
        return data, label
    path = os.fspath(source)
    label = name or os.fsdecode(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(label, "no such file (it is a directory)")
        # A FIFO or device would block or never end; only regular files are read.
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(label, "not a regular file")
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise ImageError(label, "no such file") from e
    except PermissionError as e:
        raise ImageError(label, "permission denied") from e
    except ImageError:  # a ValueError too: not to be wrapped as an invalid path
        raise
    except ValueError as e:  # e.g. a NUL byte in the path
        raise ImageError(label, f"invalid path ({e})") from e
    except OSError as e:
        raise ImageError(label, f"cannot read file ({e.strerror or e})") from e
    if not data:
        raise ImageError(label, "empty file")
    return data, label


# DICOM's value representations: in a data set without preamble, explicit VR, bytes 4-5 of its first element.
_DICOM_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR "
                       b"US UT UV".split())


_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # a 4-byte length after 2 reserved bytes


def _dicom_without_marker(data: bytes) -> bool:
    """A DICOM data set written without the preamble and 'DICM' (older and raw exports), little endian: its first
    element one of group 0002 (file meta) or 0008 (identification) with an explicit VR or a short implicit length, and
    the element after it a later one of an even (public) group up to the pixel data's, with a valid VR where the first
    had one (a raw dump of small integers had matched the first alone)."""
    if len(data) < 12 or data[0:2] not in (b"\x02\x00", b"\x08\x00") or data[3] != 0:
        return False
    tag = (int.from_bytes(data[0:2], "little"), int.from_bytes(data[2:4], "little"))
    explicit = data[4:6] in _DICOM_VRS
    if explicit:
        if data[4:6] in _LONG_VRS:
            start, length = 12, int.from_bytes(data[8:12], "little")
        else:
            start, length = 8, int.from_bytes(data[6:8], "little")
    else:
        start, length = 8, int.from_bytes(data[4:8], "little")
    end = start + length
    if length > 1024 or len(data) < end + (6 if explicit else 4):
        return False
    after = (int.from_bytes(data[end:end + 2], "little"), int.from_bytes(data[end + 2:end + 4], "little"))
    if not (after > tag and after[0] % 2 == 0 and after[0] <= 0x7FE0):
        return False
    return not explicit or data[end + 4:end + 6] in _DICOM_VRS


def sniff(data: bytes) -> str | None:
    """``jpeg``, ``png`` or ``dicom`` from a file's first bytes, as the decoder decides, or None for anything else.
    DICOM first: its 128-byte preamble is free-form and may itself start like a JPEG. A DICOM data set without the
    preamble and marker is known by its first element (a UID-named file of an old PACS had been "not an image")."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if _dicom_without_marker(data):
        return "dicom"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data.startswith(_PNG_MAGIC):
        return "png"
    return None


_PYDICOM_QUIET = threading.local()  # how deep this thread is in pydicom calls whose log records are dropped
# pydicom's loggers that speak while a file is read or decoded: its own, and the pixel decoders' (a traceback at
# ERROR for a damaged JPEG 2000, on the service's log and predict's stderr, beside cxr's one-line error).
_PYDICOM_LOGGERS = ("pydicom", "pydicom.pixels.decoders.base", "pydicom.pixels.utils")


def _not_while_quiet(record: logging.LogRecord) -> bool:
    return not getattr(_PYDICOM_QUIET, "depth", 0)


@contextlib.contextmanager
def _quiet_pydicom():
    """Drop what pydicom logs, in this thread only, while it reads a file for cxr: cxr's ImageError says why a file
    cannot be used, in one line. A filter that reads a thread-local count, not ``Logger.disabled``: the service
    decodes in several threads, and their saves and restores of one flag had left pydicom silenced for good."""
    for name in _PYDICOM_LOGGERS:
        logger = logging.getLogger(name)
        if _not_while_quiet not in logger.filters:
            logger.addFilter(_not_while_quiet)
    global _SHOWWARNING_USERS
    with _SHOWWARNING_LOCK:
        # In place while any thread is in here, and put back when the last one leaves: it had stayed for the rest of
        # the process after one DICOM. Set again where a `catch_warnings` block (a caller's, in another thread), or a
        # caller, put another in its place meanwhile: that one is wrapped in turn (a wrapper of this one included;
        # _quiet_showwarning does not recurse into itself).
        if warnings.showwarning is not _quiet_showwarning:
            _quiet_showwarning.shown = warnings.showwarning  # what showed warnings before: called for all others
            warnings.showwarning = _quiet_showwarning
        _SHOWWARNING_USERS += 1
    _PYDICOM_QUIET.depth = getattr(_PYDICOM_QUIET, "depth", 0) + 1
    try:
        yield
    finally:
        _PYDICOM_QUIET.depth -= 1
        with _SHOWWARNING_LOCK:
            _SHOWWARNING_USERS -= 1
            if not _SHOWWARNING_USERS and warnings.showwarning is _quiet_showwarning:
                warnings.showwarning = _quiet_showwarning.shown


_SHOWWARNING_LOCK = threading.Lock()
_SHOWWARNING_USERS = 0  # _quiet_pydicom blocks open, in all threads: the last to end puts warnings.showwarning back
_SHOWING = threading.local()  # set while _quiet_showwarning passes a warning on, in this thread


def _quiet_showwarning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning``, less pydicom's warnings in a thread that decodes for cxr (:func:`_quiet_pydicom`):
    ``warnings.catch_warnings`` is not for threads, and the service's log had had pydicom's raw UserWarnings
    ("Unknown encoding 'ISO_IR 999'"), with their source lines, under ``-q`` too."""
    if getattr(_PYDICOM_QUIET, "depth", 0) > 0 and f"{os.sep}pydicom{os.sep}" in str(filename):
        return
    if getattr(_SHOWING, "on", False):
        # A caller's wrapper of this function, wrapped by it in turn: each had called the other to the recursion
        # limit. Python's own shows it.
        warnings._showwarning_orig(message, category, filename, lineno, file, line)
        return
    _SHOWING.on = True
    try:
        _quiet_showwarning.shown(message, category, filename, lineno, file, line)
    finally:
        _SHOWING.on = False


def dicom_patient_id(path: str | os.PathLike) -> str | None:
    """The PatientID in a DICOM file's header (pixel data not read), or None: not a DICOM file, no PatientID, an
    empty one, or a header that cannot be read (its decode, later, says why). A ``.dcm``/``.dicom`` file without the
    preamble and 'DICM' marker is read too, as its decode reads it."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
            marked = head[128:132] == b"DICM"
            if sniff(head) != "dicom" and os.path.splitext(str(path))[1].lower() not in _DICOM_EXTENSIONS:
                return None
            import pydicom

            f.seek(0)
            # A damaged header is said once, by its decode (or the file name serves): not here too, where pydicom
            # would warn and log on its own, read as they are before the run has begun.
            # pydicom's warnings dropped in this thread by _quiet_pydicom: a catch_warnings here, process-wide, had let
            # two threads reading headers leave "ignore" in place for every warning, for good
            with _quiet_pydicom():
                ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["PatientID"], force=not marked)
        value = str(ds.get("PatientID", "") or "").strip()
    except MemoryError:
        raise  # the machine's fault, not the file's: the callers' out-of-memory handling must see it
    except Exception:  # pydicom raises many types for a damaged header
        return None
    return value or None


# ViewPosition (0018,5101) values of no frontal projection: the model learnt from frontal (PA/AP) chest X-rays
_LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})
_OBLIQUE_VIEWS = frozenset({"LAO", "RAO", "LPO", "RPO", "LLO", "RLO", "OBLIQUE"})
# BodyPartExamined values (DICOM's defined terms, and plain words) of regions that are no chest: only these are said, so
# that a chest written in another language (TORAX, PECHO, TORACE) or a site's own term is never called "not the chest"
_OTHER_PARTS = frozenset({
    "ABDOMEN", "PELVIS", "SKULL", "HEAD", "BRAIN", "FACE", "JAW", "TMJ", "SINUS", "NECK", "CSPINE", "LSPINE", "SSPINE",
    "SPINE", "SACRUM", "COCCYX", "HAND", "FINGER", "WRIST", "FOREARM", "ELBOW", "ARM", "HUMERUS", "SHOULDER",
    "CLAVICLE", "HIP", "FEMUR", "LEG", "KNEE", "PATELLA", "TIBIA", "FIBULA", "ANKLE", "FOOT", "TOE", "HEEL",
    "EXTREMITY", "UPRLIMB", "LOWRLIMB", "BREAST", "KIDNEY", "BLADDER", "ABDOMENPELVIS", "TSPINE", "TLSPINE",
    "CTSPINE", "LSSPINE", "WHOLESPINE", "ORBIT", "MANDIBLE", "ZYGOMA", "NOSE", "THUMB", "SCAPULA", "CALCANEUS",
    "ACJOINT", "SIJOINT", "SCJOINT"})


def dicom_view_note(source: str | os.PathLike | bytes) -> str | None:
    """What a DICOM file's header says against it being a frontal chest radiograph, or None (frontal, not said, or no
    DICOM): a lateral or oblique ``ViewPosition``, or a ``BodyPartExamined`` other than the chest. A PACS export holds
    a study's lateral beside its PA view, and the lateral had been scored as if it were one (the model knows
    frontal views only). Only the header is read; ``source`` is a file or its bytes."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            head = bytes(source[:132])
            named_dicom = False
        else:
            if not stat.S_ISREG(os.stat(source).st_mode):  # a FIFO would block the open
                return None
            with open(source, "rb") as f:
                head = f.read(132)
            named_dicom = os.path.splitext(str(source))[1].lower() in _DICOM_EXTENSIONS
        if sniff(head) != "dicom" and not named_dicom:
            return None
        import pydicom

        marked = head[128:132] == b"DICM"
        with _quiet_pydicom():  # not catch_warnings: see dicom_patient_id
            ds = pydicom.dcmread(io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview))
                                 else source, stop_before_pixels=True,
                                 specific_tags=["ViewPosition", "BodyPartExamined"], force=not marked)
        view = str(ds.get("ViewPosition", "") or "").strip().upper()
        part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    except MemoryError:
        raise
    except Exception:  # a damaged header: its decode says so
        return None
    words = set(re.split(r"[^A-Z]+", view))
    if view in _LATERAL_VIEWS or words & {"LAT", "LATERAL", "SWIMMERS"}:  # XTABLE LATERAL, a cross-table lateral
        return f"a lateral view (ViewPosition {view})"
    if view in _OBLIQUE_VIEWS or words & {"OBLIQUE", "OBL"}:
        return f"an oblique view (ViewPosition {view})"
    if re.sub(r"[^A-Z]", "", part) in _OTHER_PARTS:  # "C-SPINE", "C SPINE" as CSPINE
        return f"body part {part} (BodyPartExamined), not the chest"
    return None


VIEW_ADVICE = "the model learnt from frontal (PA or AP) chest X-rays"


def warn_of_views(paths: Sequence[str | os.PathLike], what: str) -> list[tuple[str, str]]:
    """Log one warning for the files of ``paths`` whose DICOM headers say they are no frontal chest radiograph
    (:func:`dicom_view_note`), naming the count and the first; returns them. Files named as JPEG or PNG are not read."""
    found = []
    for p in paths:
        if os.path.splitext(str(p))[1].lower() in (".jpg", ".jpeg", ".png"):
            continue
        note = dicom_view_note(p)
        if note:
            found.append((str(p), note))
    if found:
        logging.getLogger(__name__).warning(
            "%s: %d of %d image(s) are, by their DICOM headers, no frontal chest X-ray (first: %s, %s): %s, so their "
            "results mean little", what,
            len(found), len(paths), found[0][0], found[0][1], VIEW_ADVICE)
    return found


def image_stem(name: str) -> str:
    """``name`` without its image extension (``scan.DCM`` -> ``scan``); a name without one is kept whole, so that a
    DICOM named by its UID (``1.2.840.113619.2.55.3.1``) keeps its last part, which is no extension."""
    root, ext = os.path.splitext(name)
    return root if ext.lower() in IMAGE_EXTENSIONS else name


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a file found in a folder is taken as an image: by its extension (:data:`IMAGE_EXTENSIONS`), or, for
    any other name, by its first bytes (JPEG, PNG, DICOM's 'DICM' marker or a DICOM data set's first element). PACS
    exports often name DICOM files without an extension, or by their UID ('1.2.840.113619....'), whose last part
    looks like one."""
    extension = os.path.splitext(path)[1].lower()
    if extension in IMAGE_EXTENSIONS and extension not in _DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError:
        return extension in IMAGE_EXTENSIONS  # its reading, later, says why
    kind = sniff(head)
    if kind == "dicom" or extension in _DICOM_EXTENSIONS:
        # A PACS or CD export holds a DICOMDIR and objects with no image (presentation states, reports, key object
        # selections, PDFs): they had been "unreadable images", and each its own patient in the carve.
        return not dicom_sop_class(head).startswith(NON_IMAGE_SOP_CLASSES)
    return kind is not None


# DICOM storage classes (PS3.4 B.5, PS3.6 A) of objects that are no image: the Media Storage Directory (DICOMDIR),
# presentation states, waveforms, raw data and registrations, structured reports and key object selections,
# encapsulated documents, RT structure sets, plans and treatment records.
NON_IMAGE_SOP_CLASSES = (
    "1.2.840.10008.1.3.10",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.9.",
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.104.",
    "1.2.840.10008.5.1.4.1.1.481.3",
    "1.2.840.10008.5.1.4.1.1.481.4",
    "1.2.840.10008.5.1.4.1.1.481.5",
    "1.2.840.10008.5.1.4.1.1.481.6",
    "1.2.840.10008.5.1.4.1.1.481.7",
    "1.2.840.10008.5.1.4.1.1.481.8",
    "1.2.840.10008.5.1.4.1.1.481.9",
)


def _non_image_kind(sop_class: str) -> str:
    """What a DICOM object of one of :data:`NON_IMAGE_SOP_CLASSES` is, in a few words."""
    for prefix, kind in (("1.2.840.10008.1.3.10", "directory (DICOMDIR)"),
                         ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
                         ("1.2.840.10008.5.1.4.1.1.9.", "waveform"),
                         ("1.2.840.10008.5.1.4.1.1.66", "raw data or registration object"),
                         ("1.2.840.10008.5.1.4.1.1.88.", "structured report or key object selection"),
                         ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document (PDF or CDA)"),
                         ("1.2.840.10008.5.1.4.1.1.481.", "radiotherapy object")):
        if sop_class.startswith(prefix):
            return kind
    return "object without an image"


def dicom_sop_class(head: bytes) -> str:
    """The Media Storage SOP Class UID of a DICOM file's meta information (group 0002, explicit VR little endian
    after the preamble and 'DICM'), from the file's first bytes; "" where it is not there to read."""
    if len(head) < 132 or head[128:132] != b"DICM":
        return ""
    at = 132
    while at + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, at)
        if group != 0x0002:
            return ""
        vr = head[at + 4:at + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if at + 12 > len(head):
                return ""
            length, at = struct.unpack_from("<I", head, at + 8)[0], at + 12
        else:
            length, at = struct.unpack_from("<H", head, at + 6)[0], at + 8
        if element == 0x0002:
            return head[at:at + length].rstrip(b"\0 ").decode("ascii", "replace")
        at += length
    return ""


def _element(ds: object, keyword: str) -> object:
    """A DICOM element's value, or None where it is absent or cannot be decoded (a damaged VR or value)."""
    if ds is None:
        return None
    try:
        return ds.get(keyword)
    except MemoryError:
        raise
    except Exception:
        return None


def _decode(data: bytes, label: str, max_pixels: int, draft_size: int | None) -> np.ndarray:
    kind = sniff(data)
    if kind == "dicom":
        gray = _decode_dicom(data, label, max_pixels)
    elif kind is not None:
        gray = _decode_pil(data, kind.upper(), label, max_pixels, draft_size)
    elif os.path.splitext(label)[1].lower() in _DICOM_EXTENSIONS:
        gray = _decode_dicom(data, label, max_pixels)
    elif data[:6] == b"\x93NUMPY" or data[:2] == b"PK" and os.path.splitext(label)[1].lower() == ".npz":
        # a MedMNIST-style array file, given to predict or explain: where its images can be scored, said
        raise ImageError(label, "a NumPy file, not an image: `cxr evaluate --data FILE.npz` scores the images of an "
                                ".npz (train_images/_labels, val_..., test_...)")
    else:
        raise ImageError(label, "not an image (content is not JPEG, PNG or DICOM)")
    check_not_blank(gray, label)
    return gray


def check_not_blank(gray: np.ndarray, label: str) -> None:
    """Refuse an image whose pixels all have one value: it shows nothing, yet the model called such images
    PNEUMONIA with P = 0.99999 (a 1x1 PNG, a black JPEG, a constant 16-bit PNG or DICOM)."""
    if gray.min() == gray.max():
        raise ImageError(label, "blank image (every pixel has the same value), nothing to classify")


_PIL_LIMIT_LOCK = threading.Lock()


def _open_within(data: bytes, fmt: str, max_pixels: int) -> Image.Image:
    """``Image.open``, with PIL's own bomb limit raised to ``max_pixels`` for this call only, where PIL would refuse
    first (from twice its limit, 179 million pixels), and its warning from 89.5 million pixels on silenced (the limit
    that counts is ``max_pixels``, which the caller checks). The limit had been raised for the whole process, and
    never put back: the caller's own ``Image.open`` lost its protection.

    All under one lock, which only a header's read holds: ``catch_warnings`` saves and puts back the process's
    warning filters, and two of the service's threads interleaving it had left the "ignore" in place for good. It is
    entered only where PIL will warn, by the header's size (or where that is not found): around every decode it had
    lost another thread's new filters, and shown a caller's warnings that show once again after each image.
    """
    pixels = _header_pixels(data, fmt)
    with _PIL_LIMIT_LOCK, contextlib.ExitStack() as quiet:
        # Read under the lock, which every raise holds until it is put back: never another call's raised value, which
        # would then be "put back" for good.
        limit = Image.MAX_IMAGE_PIXELS
        raised = limit is not None and max_pixels > 2 * limit
        warned_from = max_pixels if raised else limit  # PIL's limit in the open below
        if warned_from is not None and (pixels is None or pixels > warned_from):
            quiet.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if raised:
            Image.MAX_IMAGE_PIXELS = max_pixels
            try:
                return Image.open(io.BytesIO(data), formats=[fmt])
            finally:
                Image.MAX_IMAGE_PIXELS = limit
        return Image.open(io.BytesIO(data), formats=[fmt])


def _header_pixels(data: bytes, fmt: str) -> int | None:
    """Width x height as PIL's bomb check counts them (each at least 1), from a PNG's IHDR or a JPEG's frame header
    (the largest, where a damaged file has several), or None where none is found."""
    if fmt == "PNG":
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        return max(1, int.from_bytes(data[16:20], "big")) * max(1, int.from_bytes(data[20:24], "big"))
    if fmt == "JPEG":  # height, then width, after the frame header's precision
        sizes = [max(1, int.from_bytes(data[p + 5:p + 7], "big")) * max(1, int.from_bytes(data[p + 7:p + 9], "big"))
                 for p in _jpeg_frames(data) if p + 9 <= len(data)]
        return max(sizes, default=None)
    return None


def _too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    return f"{width}x{height} image is over the {max_pixels:,}-pixel limit (possible decompression bomb)"


def _decode_pil(data: bytes, fmt: str, label: str, max_pixels: int, draft_size: int | None) -> np.ndarray:
    try:
        im = _open_within(data, fmt, max_pixels)
        with im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(label, _too_many_pixels(width, height, max_pixels))
            if draft_size is not None and fmt == "JPEG":
                im.draft("L", (draft_size, draft_size))
            if fmt == "PNG" and data[24] == 16 and data[25] in _PNG_COLOUR_TYPES_WITH_CHANNELS:
                raise ImageError(label, "16-bit colour or grey + alpha PNG: only its high 8 bits could be read, which "
                                 "leaves a 12-bit X-ray nearly black; save it as 16-bit greyscale (or 8-bit)")
            # Image.open only read the header; load() decodes, so truncation surfaces here and not later.
            im.load()
            if fmt == "JPEG" and im.mode in ("L", "RGB") and not (im.info.get("progressive")
                                                                  or im.info.get("progression")) \
                    and _last_block_row_grey(im, height, 128):
                raise ImageError(label, _CUT_SHORT)
            # Upright as a viewer shows it: a JPEG stored sideways with an EXIF Orientation tag (a phone photo of a
            # film, a viewer's export) went to the model sideways, and 8 of 8 such pneumonia originals read NORMAL.
            im = ImageOps.exif_transpose(im)
            if im.mode in _HIGH_DEPTH_MODES:
                return _stretch(np.asarray(im))
            if im.mode == "PA":
                im = im.convert("RGBA")
            if im.mode != "L":
                im = im.convert("L")
            return np.array(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL refuses in Image.open from twice its own limit, before the size is checked above; its message would
        # name that limit, not max_pixels.
        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(m.group(1)):,}-pixel image" if m else "image"
        raise ImageError(label, f"{size} is over the {max_pixels:,}-pixel limit (possible decompression bomb)") from e
    except UnidentifiedImageError as e:
        bits = _jpeg_precision(data) if fmt == "JPEG" else None
        if bits in (12, 16):  # the precisions JPEG has beside 8: an intact file Pillow has no decoder for
            raise ImageError(label, f"{bits}-bit JPEG, which Pillow cannot decode: save it as 16-bit PNG or DICOM") \
                from e
        raise ImageError(label, f"truncated or corrupt {fmt} (header unreadable)") from e
    except MemoryError:
        raise
    except Exception as e:
        # PIL reports damage as OSError, SyntaxError, ValueError, EOFError or struct.error depending on where.
        detail = str(e) or type(e).__name__
        kind = "truncated" if isinstance(e, EOFError) or "truncated" in detail.lower() else "corrupt"
        raise ImageError(label, f"{kind} {fmt} ({detail})") from e


# What libjpeg leaves where a baseline JPEG's data ran out: all-zero blocks, which decode to exactly mid-grey. A file
# cut short but ending with its end marker (or whose header claims a larger picture) was decoded without an error, its
# lower part one flat grey, and a NORMAL X-ray called PNEUMONIA at P 0.97. A whole file whose last row of blocks is
# exactly mid-grey reads alike (none of 3,116 Kermany JPEGs ends so): the message says what to do then. A progressive
# JPEG cut short is blurred, not grey, and is not caught.
_CUT_SHORT = ("truncated JPEG (its last row of 8x8 blocks is exactly mid-grey, what a file cut short decodes to: "
              "cut short and given an end marker, or its header claims a larger picture; if the picture really ends "
              "in exact mid-grey, save it as PNG)")


def _last_block_row_grey(pixels: np.ndarray | Image.Image, height: int, grey: int) -> bool:
    """Whether the last row of 8x8 blocks of decoded JPEG ``pixels`` (at a draft's scale, ``height`` the full one;
    a short last row where the height is no multiple of 8) is all exactly ``grey``, while the picture is not (a blank
    one is said to be blank). A PIL image is read from its last rows alone: a whole copy of every decoded JPEG had
    cost a third of its decoding time."""
    rows = pixels.size[1] if isinstance(pixels, Image.Image) else pixels.shape[0]
    block = max(1, round(8 * rows / height))
    start = block * ((rows - 1) // block)
    if isinstance(pixels, Image.Image):
        tail = np.asarray(pixels.crop((0, start, pixels.size[0], rows)))
    else:
        tail = pixels[start:]
    if not (tail == grey).all():
        return False
    return not bool((np.asarray(pixels) == grey).all())


def _jpeg_precision(data: bytes) -> int | None:
    """Bits per sample in a JPEG's start-of-frame segment, or None where none is found before the scan."""
    return next((data[pos + 4] for pos in _jpeg_frames(data)), None)


def _jpeg_frames(data: bytes) -> Iterator[int]:
    """Where each start-of-frame segment of a JPEG's header begins (its marker), up to the scan."""
    pos = 2
    while pos + 4 < len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            yield pos
        elif marker == 0xDA:  # start of scan: no frame header after it
            return
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")


# IHDR colour types 2 (RGB), 4 (grey + alpha) and 6 (RGBA): at 16 bits PIL keeps only each sample's high byte, so a
# 12-bit X-ray (0..4095) came out as 0..15, nearly black, and was predicted PNEUMONIA with P = 0.99999. Such files are
# refused: PIL has no 16-bit colour mode, and torchvision's decode_png, which keeps the 16 bits, crashed the process
# (SIGSEGV) on one of tests/test_fuzz_images.py's constructed PNGs.
_PNG_COLOUR_TYPES_WITH_CHANNELS = frozenset({2, 4, 6})


# The share of pixels at each end of the range that may lie beyond it (saturated to 0 or 255): with the plain min..max,
# one dead or hot pixel (65535 in a 12-bit image) had set the range, and the X-ray came out nearly black (mean grey 8
# for 129; the bundled model then said PNEUMONIA at 0.99999 for a NORMAL image).
STRETCH_TAIL = 1e-4


def _stretch(arr: np.ndarray, padding: np.ndarray | None = None, in_place: bool = False) -> np.ndarray:
    """Map the image's range linearly onto 0..255: its 0.01th to 99.99th percentile (:data:`STRETCH_TAIL`), or its
    min..max where those are equal (a constant image gives zeros). ``padding``: pixels that are not part of the image
    (DICOM Pixel Padding Value), left out of the range and set to 0, black. ``in_place``: ``arr``, float32 and the
    caller's own, may be changed and used as the working copy."""
    a = np.asarray(arr)
    padded = padding is not None and padding.any()
    if padded and padding.all():
        return np.zeros(a.shape, dtype=np.uint8)
    # The padding's own values are no part of the range (a dead pixel's had been, through the fill they were given).
    lo, hi = stretch_range(a, row=a.shape[-1] if a.ndim > 1 else 1, keep=~padding if padded else None)
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    # One float32 working copy, changed in place: 4 bytes per pixel (float64 temporaries took 16-24, 2 GB for a
    # 100-megapixel image). float32 holds 16-bit values exactly, and 0..255 needs far less precision than it has.
    out = a if in_place and a.dtype == np.float32 and a.flags.writeable else a.astype(np.float32)
    out -= np.float32(lo)
    out *= np.float32(255.0 / (hi - lo))
    np.rint(out, out=out)
    out = np.clip(out, 0, 255, out=out).astype(np.uint8)
    if padded:
        out[padding] = 0
    return out


_STRETCH_SAMPLE = 1_000_000  # pixels the percentiles are taken from, at most


def stretch_range(values: np.ndarray, row: int = 1, keep: np.ndarray | None = None) -> tuple[float, float]:
    """The range :func:`_stretch` maps onto 0..255: the 0.01th and 99.99th percentile of ``values`` (those where
    ``keep`` is true, if given), or their min and max where those percentiles are equal (hi <= lo: a constant image).
    Taken from every n-th value of a large image (np.partition, linear time, on a copy of at most a million values),
    ``n`` coprime to the ``row`` length, so that every column is sampled alike (with ``n`` a multiple of it, a bad
    detector column decided or not by its parity)."""
    flat = values.reshape(-1)
    kept = flat if keep is None else flat[keep.reshape(-1)]
    lo, hi = float(kept.min()), float(kept.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("pixel values include NaN or infinity")
    step = max(1, kept.size // _STRETCH_SAMPLE)
    while math.gcd(step, row) != 1:
        step += 1
    sample = flat[::step] if keep is None else flat[::step][keep.reshape(-1)[::step]]
    if not sample.size:
        return lo, hi
    k = int(sample.size * STRETCH_TAIL)
    if hi > lo and k:
        part = np.partition(sample, (k, sample.size - 1 - k))
        robust_lo, robust_hi = float(part[k]), float(part[sample.size - 1 - k])
        if robust_hi > robust_lo:
            return robust_lo, robust_hi
    return lo, hi


def _dicom_luts():
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _first(value) -> float:
    """A DICOM number, or the first of several (a window per view: the first is the one pydicom's ``index=0`` takes)."""
    return float(value[0] if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" else value)


def _linear_luts_float32(arr: np.ndarray, ds) -> np.ndarray | None:
    """The rescale and the linear window of DICOM PS3.3 C.11.2.1.2.1 in one float32 array changed in place, where
    those are the only LUTs: about 6 bytes a pixel at the peak, where pydicom's float64 functions took 25 (500 MB for
    a 20-megapixel image, times the cache's workers). The window maps to 0..1: the stretch that follows sets the
    range. None where another LUT applies (a LUT sequence, a sigmoid or exact window): pydicom's functions then."""
    if "ModalityLUTSequence" in ds or "VOILUTSequence" in ds:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    try:
        # An empty value is no rescale; a slope of 0 is one (every pixel the intercept: blank, refused as such, where
        # `or 1` had classified the stored values as if the slope were 1).
        slope = ds.get("RescaleSlope")
        slope = 1.0 if slope is None or slope == "" else _first(slope)
        intercept = _first(ds.get("RescaleIntercept", 0) or 0)
        window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
        center = _first(ds.WindowCenter) if window else 0.0
        width = _first(ds.WindowWidth) if window else 1.0
    except (TypeError, ValueError, IndexError):
        return None
    if function != "LINEAR" or not all(map(np.isfinite, (slope, intercept, center, width))) or (window and width < 1):
        return None
    x = arr.astype(np.float32)
    if slope != 1:
        x *= np.float32(slope)
    if intercept != 0:
        x += np.float32(intercept)
    if window:  # x <= c - 0.5 - (w - 1) / 2: 0; x > c - 0.5 + (w - 1) / 2: 1; linear between (continuous at both)
        x -= np.float32(center - 0.5)
        if width > 1:
            x /= np.float32(width - 1)
            x += np.float32(0.5)
            np.clip(x, 0, 1, out=x)
        else:
            np.greater(x, 0, out=x, casting="unsafe")
    return x


def _apply_color_lut(arr: np.ndarray, ds) -> np.ndarray:
    try:
        from pydicom.pixels import apply_color_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_color_lut
    return apply_color_lut(arr, ds)


# Where an enhanced (multi-frame) DICOM keeps the rescale and window of its frames: in functional group macros, which
# pydicom's LUT functions do not read. They are copied to the top level of the first frame's data set.
_FRAME_MACROS = {"PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
                 "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction")}


def _first_frame_attributes(ds):
    """``ds`` (a data set read for this decode alone) with the first frame's rescale and window from its functional
    groups (per-frame, else shared) set at its top level where that has none: an enhanced DX's window had been ignored
    (88 grey levels off the viewer's rendering)."""
    found = {}
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        items = ds.get(groups)
        if not items:
            continue
        for macro, keywords in _FRAME_MACROS.items():
            inner = items[0].get(macro)
            if inner:
                for keyword in keywords:
                    if keyword in inner[0] and keyword not in ds and keyword not in found:
                        found[keyword] = inner[0][keyword].value
    for keyword, value in found.items():
        setattr(ds, keyword, value)
    return ds


def _dicom_padding(arr: np.ndarray, ds) -> np.ndarray | None:
    """Where the stored values are Pixel Padding Value (or within it and Pixel Padding Range Limit): the area outside
    the exposed image (a collimator's border, say), which is not part of it. None without padding."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return arr == value
    lo, hi = sorted((int(value), int(limit)))
    return (arr >= lo) & (arr <= hi)


def _check_inflated_size(data: bytes, label: str, max_pixels: int) -> None:
    """Refuse a deflated DICOM whose data set inflates past the bound, inflating it piecewise to find out."""
    import zlib

    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        if str(_read_file_meta_info(fp).get("TransferSyntaxUID", "")) != _DEFLATED_TS:
            return
    except MemoryError:
        raise
    except Exception:
        return  # dcmread reports a damaged header better
    limit = _DEFLATE_BYTES_PER_PIXEL * max_pixels
    inflater, total, view, step = zlib.decompressobj(-zlib.MAX_WBITS), 0, memoryview(data)[fp.tell():], 1 << 16
    try:
        for start in range(0, len(view) + 1, step):  # input in 64 kB pieces, output 1 MB at a time, none kept
            pending = view[start:start + step]
            while True:
                chunk = inflater.decompress(pending, 1 << 20)
                total += len(chunk)
                if total > limit:
                    raise ImageError(label, f"deflated DICOM inflates to over {limit:,} bytes, the bound for the "
                                            f"{max_pixels:,}-pixel limit (possible decompression bomb)")
                pending = inflater.unconsumed_tail
                if not pending and len(chunk) < 1 << 20:
                    break
            if inflater.eof:
                return
    except zlib.error as e:
        raise ImageError(label, f"corrupt deflated DICOM ({e})") from e


def _dicom_without_preamble(data: bytes, label: str, error: Exception):
    """A DICOM data set read without its preamble and 'DICM' marker, when it holds an image; ImageError otherwise."""
    import pydicom

    refusal = ImageError(label, "not a DICOM file (no 'DICM' marker at byte 128, and no DICOM image without one)")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if not (any(k in ds for k in _PIXEL_DATA_KEYWORDS) and int(ds.get("Rows") or 0)):
            raise refusal from error
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as e:
        raise refusal from e
    return ds


def _fill_transfer_syntax(ds) -> None:
    """A data set without a Transfer Syntax UID (no file meta, or one without it): the encoding pydicom read it in
    decides, as pydicom itself advises; without it pydicom refuses to decode the pixels."""
    from pydicom import uid
    from pydicom.dataset import FileMetaDataset

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", None) or (getattr(ds, "is_implicit_VR", None),
                                                                   getattr(ds, "is_little_endian", None))
    if implicit is None or little is None:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit else
                              uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)


# DICOM modalities (PS3.3 C.7.3.1.1.1) whose images are no radiographs: refused, not classified. Not listed (so taken):
# CR, DX, RG, OT and other or no modality, which hospital exports of radiographs carry.
NOT_RADIOGRAPHS = {
    "CT": "computed tomography", "MR": "magnetic resonance", "US": "ultrasound", "NM": "nuclear medicine",
    "PT": "PET", "MG": "mammography", "XA": "X-ray angiography", "RF": "fluoroscopy", "RTDOSE": "radiotherapy dose",
    "RTIMAGE": "radiotherapy image", "OP": "ophthalmic photography", "OPT": "ophthalmic tomography",
    "IVUS": "intravascular ultrasound", "ES": "endoscopy", "SM": "slide microscopy", "PX": "panoramic dental X-ray",
    "IO": "intra-oral X-ray", "XC": "external camera photography", "GM": "general microscopy",
    "BMD": "bone densitometry", "SEG": "segmentation",
}


def _clip_words(text: str, n: int) -> str:
    """``text`` in at most about ``n`` characters, cut after a whole word with "…" (pydicom's reasons, cut at a fixed
    length, had ended "requires gdcm>=3.0.10; p")."""
    if len(text) <= n:
        return text
    cut = text[:n].rstrip()
    space = cut.rfind(" ")
    return (cut[:space] if space > n // 2 else cut).rstrip(" ;,:") + " …"


def _decoder_hint(ts: str) -> str:
    """What to install for a compressed transfer syntax pydicom could not decode (pydicom's pixel data plugins)."""
    if ts.startswith("1.2.840.10008.1.2.4.10") or ts in ("1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95"):
        # MPEG-2, MPEG-4 and HEVC video, and JPIP's references to pixels elsewhere: no pydicom plugin decodes them
        return "no pydicom plugin decodes it; export the image uncompressed, or as JPEG or JPEG 2000"
    if ts in ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"):  # HTJ2K
        return "pip install pylibjpeg pylibjpeg-openjpeg"
    if ts in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"):  # JPEG-LS
        return "pip install pyjpegls (or pylibjpeg pylibjpeg-libjpeg, or python-gdcm)"
    if ts.startswith("1.2.840.10008.1.2.4.9"):  # JPEG 2000
        return "pip install pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"
    return "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"  # JPEG baseline, extended, lossless


# JPEG Baseline and Extended, whose blocks libjpeg leaves at mid-grey where the data ran out (see _CUT_SHORT)
_DCT_JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})


def _decode_dicom(data: bytes, label: str, max_pixels: int) -> np.ndarray:
    with _quiet_pydicom():  # its reasons are in the ImageError
        return _decode_dicom_data(data, label, max_pixels)


def _decode_dicom_data(data: bytes, label: str, max_pixels: int) -> np.ndarray:
    # Imported here: pydicom costs import time that JPEG/PNG-only users (the CLI, the server) need not pay.
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_inflated_size(data, label, max_pixels)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError as e:
        # No preamble and 'DICM' marker (older or raw exports): such a file reaches here only by its .dcm/.dicom
        # name, and is read as DICOM when it holds an image.
        ds = _dicom_without_preamble(data, label, e)
    except MemoryError:
        raise
    except Exception as e:
        raise ImageError(label, f"corrupt DICOM ({str(e) or type(e).__name__})") from e

    try:
        _fill_transfer_syntax(ds)
        # dcmread parses elements lazily, so a malformed value only raises when it is read here.
        has_pixels = any(k in ds for k in _PIXEL_DATA_KEYWORDS)
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
        monochrome1 = photometric == "MONOCHROME1"
        inverse = str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
        meta = getattr(ds, "file_meta", None)
        ts = meta.get("TransferSyntaxUID") if meta is not None else None
        # is_compressed raises for a UID that is not a known transfer syntax (a damaged or private one).
        compressed = ts is not None and ts.is_transfer_syntax and ts.is_compressed
    except MemoryError:
        raise
    except Exception as e:
        raise ImageError(label, f"corrupt DICOM header ({str(e) or type(e).__name__})") from e
    if not has_pixels:
        # read leniently: a damaged element here (a VR of "U\0", found by the fuzz tests) had raised pydicom's
        # NotImplementedError out of the loader
        classes = [str(c) for c in (_element(meta, "MediaStorageSOPClassUID"), _element(ds, "SOPClassUID")) if c]
        sop = next((c for c in classes if c.startswith(NON_IMAGE_SOP_CLASSES)), "")
        if sop:  # a PACS router posts every object of a study: no "corrupt" image
            raise ImageError(label, f"not an image: a DICOM {_non_image_kind(sop)} (SOP class {sop}), which holds "
                                    "no picture to classify")
        raise ImageError(label, "DICOM has no pixel data")
    modality = str(_element(ds, "Modality") or "").strip().upper()
    if modality in NOT_RADIOGRAPHS:
        # A study's export mixes objects: a CT slice had been called NORMAL, an MR image and an RT dose grid PNEUMONIA
        raise ImageError(label, f"DICOM of modality {modality} ({NOT_RADIOGRAPHS[modality]}), not a radiograph: cxr "
                                "classifies chest radiographs (CR, DX)")
    if rows * cols == 0:
        raise ImageError(label, "DICOM has no image size (Rows or Columns missing or zero)")
    if rows * cols > max_pixels:
        raise ImageError(label, _too_many_pixels(cols, rows, max_pixels))

    try:
        if frames > 1 and hasattr(ds, "pixel_array_options"):
            ds.pixel_array_options(index=0)  # pydicom >= 3 decodes just the first frame
        arr = ds.pixel_array
    except MemoryError:
        raise
    except Exception as e:
        # pydicom puts each plugin's reason on a line of its own, after a heading ending in a colon: all of them.
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()).replace(":; ", ": ")
        detail = _clip_words(detail, 400) or type(e).__name__
        # "missing" plugins, or a plugin that "does not support" this data; not pydicom's heading, which it gives for
        # a damaged file as well ("... raised by all available plugins:").
        if compressed and any(w in str(e).lower() for w in ("missing", "not support")):
            # 12-bit JPEG (Extended, common for lossy CR/DX) is beyond Pillow, which pydicom otherwise uses.
            raise ImageError(label, f"DICOM pixel data is compressed as {ts.name} ({ts}), which pydicom cannot "
                                    f"decode here: {_decoder_hint(str(ts))} ({_clip_words(detail, 200)})") from e
        how = f" compressed as {ts.name}" if compressed else ""
        raise ImageError(label, f"cannot decode DICOM pixel data{how} ({detail})") from e

    if arr.ndim == (3 if samples == 1 else 4):  # all frames decoded (pydicom < 3)
        arr = arr[0]
    if frames > 1 and arr.min() == arr.max():  # "blank image" of a file whose viewer shows an X-ray on frame 2
        raise ImageError(label, f"frame 1 of {frames} is blank (every pixel has the same value): cxr classifies the "
                                "first frame of a multi-frame DICOM; export the frame to classify as a file of its own")
    bits = int(ds.get("BitsStored") or 8)
    if str(ts) in _DCT_JPEG_SYNTAXES and 1 < bits <= 16 and _last_block_row_grey(arr, arr.shape[0], 1 << (bits - 1)):
        raise ImageError(label, "DICOM pixel data: " + _CUT_SHORT.replace("save it as PNG", "export it uncompressed"))
    if samples == 1 and photometric == "PALETTE COLOR":
        # Stored values are indices into the colour palette: its colours are the image, not the indices.
        try:
            arr = _apply_color_lut(arr, ds)[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        except MemoryError:
            raise
        except Exception as e:
            reason = str(e) or type(e).__name__
            raise ImageError(label, f"PALETTE COLOR DICOM whose palette cannot be applied ({reason})") from e
        return _stretch(arr)
    try:
        padding = None
        if samples == 1:
            padding = _dicom_padding(arr, ds)
            frame = _first_frame_attributes(ds)
            out = _linear_luts_float32(arr, frame)
            if out is None:
                apply_modality_lut, apply_voi_lut = _dicom_luts()
                out = apply_voi_lut(apply_modality_lut(arr, frame), frame, index=0)
            del arr
            # MONOCHROME1 is shown inverted; so is MONOCHROME2 under an INVERSE Presentation LUT Shape (for
            # MONOCHROME1, DX files carry INVERSE to say the same inversion again: it is not applied twice).
            if monochrome1 or (photometric == "MONOCHROME2" and inverse):
                out = np.subtract(out.max(), out, out=out if out.dtype.kind == "f" else None)
            return _stretch(out, padding, in_place=out.dtype == np.float32)
        else:
            # Colour DICOM is rare for X-rays; pydicom hands it over as RGB, reduced here to ITU-R 601 luma.
            arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return _stretch(arr, padding)
    except MemoryError:
        raise
    except Exception as e:
        raise ImageError(label, f"cannot apply DICOM rescale/window ({str(e) or type(e).__name__})") from e


# ------------------------------------------------------------------------------------------- heatmap overlay

HEATMAP_CMAP = "viridis"  # perceptually uniform and readable with the common colour-vision deficiencies


def overlay(image: np.ndarray, heatmap: np.ndarray | None, *, alpha: float = 0.55, size: int | None = None,
            cmap: str = HEATMAP_CMAP) -> np.ndarray:
    """An RGB picture of a grey X-ray with the heatmap laid over it.

    Each pixel's opacity grows with the heat, so cold regions show the plain X-ray and only what the model
    weighed is coloured.

    Args:
        image: (H, W) uint8 grey image.
        heatmap: (h, w) values in [0, 1] (resized to the image with bilinear interpolation); None: no overlay.
        alpha: opacity where the heat is 1.
        size: resize the result to (size, size) (bicubic for the image, bilinear for the heat).
        cmap: a matplotlib colormap name.

    Returns:
        (H, W, 3) uint8 RGB array (or (size, size, 3)).
    """
    from matplotlib import colormaps

    grey = resize_square(image, size) if size and image.shape != (size, size) else np.asarray(image)
    base = np.repeat(grey[..., None].astype(np.float32) / 255.0, 3, axis=2)
    if heatmap is None:
        return (base * 255).round().astype(np.uint8)
    heat = np.asarray(heatmap, np.float32)
    if heat.shape != grey.shape:
        heat = np.asarray(Image.fromarray(heat, mode="F").resize(grey.shape[::-1], Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    colour = colormaps[cmap](heat)[..., :3].astype(np.float32)
    a = (alpha * heat)[..., None]
    return (((1 - a) * base + a * colour).clip(0, 1) * 255).round().astype(np.uint8)


LEGEND_GREY = 128  # the grey the colour bars show the heat laid over


def heat_legend(n: int = 256, grey: int = LEGEND_GREY) -> np.ndarray:
    """(n, 3) uint8 RGB: heat from 0 to 1 as :func:`overlay` lays it over an X-ray of one ``grey``, for the colour
    bars. The overlay's opacity grows with the heat, so low heat is hardly coloured: a bar of the bare colour map
    (viridis' purples and blues at full strength) had shown colours that no overlay has."""
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)[None, :]
    return overlay(np.full((1, n), grey, np.uint8), ramp)[0]


def heat_legend_cmap():
    """:func:`heat_legend` as a matplotlib colour map, for colour bars beside overlays."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(heat_legend() / 255.0, name="cxr-heat-over-grey")

"""Fuzzing the image loaders (``cxr.images.load_image`` / ``read_grayscale``) with hypothesis.

Five generators: byte-level mutations of valid JPEG, PNG and DICOM files (flips, inserts, deletes, truncation,
repeats, boundary integers; PNG chunk CRCs optionally repaired so that damage reaches the decoder), random bytes behind
each format's magic, PNGs built chunk by chunk with random headers and payloads, DICOMs built with random header values
and pixel data in every transfer syntax, and decompression bombs. Every case must end in a 2-D uint8 image or an
:class:`ImageError` that names the file: never another exception, a crash, a hang (hypothesis deadline) or a memory
peak beyond the bound that ``max_pixels`` sets (tracemalloc, on the bombs).

The CI runs a few hundred cases per generator; ``CXR_FUZZ_SCALE=N`` multiplies them (``scripts/fuzz_images.py`` runs
the long campaign and writes the counts to RELIABILITY.md's table).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tracemalloc
import warnings
import zlib
from collections import Counter
from datetime import timedelta

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cxr.images import ImageError, load_image, read_grayscale  # noqa: E402

SCALE = float(os.environ.get("CXR_FUZZ_SCALE", "1"))
MAX_PIXELS = 1 << 22  # 4 Mpx: large enough for every generated header, small enough to keep each case fast
SIZE = 16
OUTCOMES: Counter[str] = Counter()


def fuzz_settings(n: int):
    # A case that takes 20 s is a hang here (the slowest legitimate case decodes 4 Mpx, well under a second).
    return settings(max_examples=max(1, int(n * SCALE)), deadline=timedelta(seconds=20), database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much], derandomize=SCALE == 1)


def check(data: bytes, name: str, kind: str) -> str:
    """Decode ``data``; a clean image or an ImageError naming the file are the only acceptable answers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom and PIL warn about odd values they still accept
        try:
            if sum(OUTCOMES.values()) % 2:  # every other case through each entry point
                out = load_image(data, SIZE, name=name, max_pixels=MAX_PIXELS, draft=True)
                assert out.shape == (SIZE, SIZE)
            else:
                out = read_grayscale(data, name=name, max_pixels=MAX_PIXELS)
                assert out.ndim == 2 and 0 < out.size <= MAX_PIXELS
            assert out.dtype == np.uint8
            outcome = "decoded"
        except ImageError as e:
            assert str(e).startswith(f"{name}: ") and len(str(e)) < 2000, str(e)
            outcome = "refused"
    OUTCOMES[f"{kind}:{outcome}"] += 1
    return outcome


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    """With CXR_FUZZ_REPORT=PATH, write the counts of decoded and refused cases per generator (for the campaign)."""
    yield
    if os.environ.get("CXR_FUZZ_REPORT"):
        with open(os.environ["CXR_FUZZ_REPORT"], "w") as f:
            json.dump(dict(sorted(OUTCOMES.items())), f, indent=2)


# --------------------------------------------------------------------------------------------- seed files


def _gray(h: int, w: int, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hi = 255 if dtype == np.uint8 else 4095
    ramp = np.linspace(0, hi, w)[None, :] * np.linspace(0.2, 1, h)[:, None]
    return (ramp + rng.normal(0, hi / 20, (h, w))).clip(0, hi).astype(dtype)


def _pil(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _dicom(pixels: np.ndarray | None, ts: str = "1.2.840.10008.1.2.1", **attrs) -> bytes:
    import pydicom
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[2]
        ds.PhotometricInterpretation = "MONOCHROME2" if pixels.ndim == 2 else "RGB"
        if pixels.ndim == 3:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = 12 if pixels.dtype == np.uint16 else 8
        ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
        ds.PixelData = pixels.tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    if ts == uid.RLELossless and pixels is not None:
        ds.compress(uid.RLELossless, pixels, encoding_plugin="pydicom")
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    g8, g16 = _gray(40, 48), _gray(40, 48, dtype=np.uint16)
    rgb = np.stack([g8, g8[::-1], g8[:, ::-1]], axis=-1)
    seeds = {
        "gray.jpeg": _pil(Image.fromarray(g8), "JPEG", quality=80),
        "progressive.jpeg": _pil(Image.fromarray(rgb), "JPEG", progressive=True, quality=60),
        "gray.png": _pil(Image.fromarray(g8), "PNG"),
        "16bit.png": _pil(Image.fromarray(g16), "PNG"),
        "rgba.png": _pil(Image.fromarray(np.dstack([rgb, g8])), "PNG"),
        "palette.png": _pil(Image.fromarray(g8).convert("P"), "PNG"),
        "interlaced.png": _pil(Image.fromarray(rgb), "PNG", interlace=1) if _interlace_ok() else
        _pil(Image.fromarray(rgb), "PNG"),
        "mono1.dcm": _dicom(g16, PhotometricInterpretation="MONOCHROME1", RescaleSlope="2", RescaleIntercept="-5",
                            WindowCenter="900", WindowWidth="400"),
        "8bit.dcm": _dicom(g8),
        "rgb.dcm": _dicom(rgb),
        "rle.dcm": _dicom(g16, ts="1.2.840.10008.1.2.5"),
        "deflated.dcm": _dicom(g16, ts="1.2.840.10008.1.2.1.99"),
        "multiframe.dcm": _dicom(np.stack([g16, g16[::-1]]).reshape(80, 48), NumberOfFrames="2", Rows=40),
    }
    return seeds


def _interlace_ok() -> bool:
    try:
        _pil(Image.new("L", (4, 4)), "PNG", interlace=1)
        return True
    except Exception:
        return False


SEEDS = _seeds()


def test_every_seed_decodes():
    """The mutations start from files that are fine, so that what breaks is the mutation, not the seed."""
    for name, data in SEEDS.items():
        assert check(data, name, "seed") == "decoded", name


# ------------------------------------------------------------------------------------------- mutations


_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 30), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 30), st.integers(1, 512)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 30)),
    st.tuples(st.just("repeat"), st.integers(0, 1 << 30), st.integers(1, 512), st.integers(1, 16)),
    st.tuples(st.just("int"), st.integers(0, 1 << 30), st.sampled_from(_INTERESTING),
              st.sampled_from(["<H", ">H", "<I", ">I"])),
)


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    b = bytearray(data)
    for m in mutations:
        if not b:
            break
        op, pos = m[0], m[1] % len(b)
        if op == "flip":
            b[pos] = m[2]
        elif op == "insert":
            b[pos:pos] = m[2]
        elif op == "delete":
            del b[pos:pos + m[2]]
        elif op == "truncate":
            del b[max(1, pos):]
        elif op == "repeat":
            b[pos:pos] = bytes(b[pos:pos + m[2]]) * m[3]
        else:
            fmt = m[3]
            value = m[2] & (0xFFFF if fmt.endswith("H") else 0xFFFFFFFF)
            packed = struct.pack(fmt, value)
            b[pos:pos + len(packed)] = packed
    return bytes(b)


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every PNG chunk's CRC that the chunk layout still allows, so damage gets past the CRC check."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    b, pos = bytearray(data), 8
    while pos + 12 <= len(b):
        (length,) = struct.unpack(">I", b[pos:pos + 4])
        end = pos + 8 + length
        if end + 4 > len(b):
            break
        b[end:end + 4] = struct.pack(">I", zlib.crc32(bytes(b[pos + 4:end])))
        pos = end + 4
    return bytes(b)


@fuzz_settings(300)
@given(name=st.sampled_from(sorted(SEEDS)), mutations=st.lists(MUTATION, min_size=1, max_size=8),
       fix_crc=st.booleans())
def test_mutated_files_decode_or_raise_image_error(name, mutations, fix_crc):
    data = mutate(SEEDS[name], mutations)
    if fix_crc:
        data = fix_png_crcs(data)
    check(data, name, "mutated")


@fuzz_settings(150)
@given(magic=st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"\0" * 128 + b"DICM"]),
       body=st.binary(max_size=4096), name=st.sampled_from(["random.jpeg", "random.png", "random.dcm", "random"]))
def test_random_bytes_decode_or_raise_image_error(magic, body, name):
    check(magic + body, name, "random")


# ----------------------------------------------------------------------------------------- structured PNG


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


_PNG_MODES = [(1, 0), (2, 0), (4, 0), (8, 0), (16, 0), (8, 2), (16, 2), (1, 3), (4, 3), (8, 3), (8, 4), (16, 4),
              (8, 6), (16, 6), (3, 0), (8, 1), (8, 7), (0, 0), (32, 0)]  # the last five are invalid


_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


@st.composite
def png_files(draw) -> bytes:
    """Half well-formed (a valid mode, a small size, a full zlib stream of filtered rows, ancillary chunks that may be
    wrong), half with any header value; chunk CRCs always right, so the decoder sees it all."""
    sane = draw(st.booleans())
    if sane:
        width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
        depth, ctype = draw(st.sampled_from(_PNG_MODES[:14]))
        compression, filtering, interlace = 0, 0, draw(st.sampled_from([0, 1]))
    else:
        width = draw(st.one_of(st.integers(0, 96), st.integers(0, (1 << 31) - 1)))
        height = draw(st.one_of(st.integers(0, 96), st.integers(0, (1 << 31) - 1)))
        depth, ctype = draw(st.sampled_from(_PNG_MODES))
        compression, filtering, interlace = draw(st.integers(0, 1)), draw(st.integers(0, 1)), draw(st.integers(0, 2))
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, ctype, compression,
                                                              filtering, interlace))
    extras = {
        b"PLTE": st.binary(max_size=800), b"tRNS": st.binary(max_size=300), b"gAMA": st.binary(max_size=8),
        b"iCCP": st.builds(lambda raw: b"icc\0\0" + zlib.compress(raw), st.binary(max_size=2048)),
        b"zTXt": st.builds(lambda n: b"k\0\0" + zlib.compress(b"\0" * n), st.integers(0, 1 << 21)),
        b"tEXt": st.binary(max_size=200), b"sBIT": st.binary(max_size=8), b"pHYs": st.binary(max_size=12),
    }
    if sane and ctype == 3:
        out += _chunk(b"PLTE", draw(st.binary(min_size=3 << depth, max_size=3 << depth)))
    for kind in draw(st.lists(st.sampled_from(sorted(extras)), max_size=3 if sane else 5)):
        out += _chunk(kind, draw(extras[kind]))
    rowbytes = (width * depth * _CHANNELS.get(ctype, 1) + 7) // 8
    if (rowbytes + 1) * height <= 1 << 14 and draw(st.integers(0, 3)):  # the right number of filtered rows
        rows = draw(st.lists(st.binary(min_size=rowbytes, max_size=rowbytes), min_size=1, max_size=4))
        filters = draw(st.lists(st.integers(0, 4 if sane else 7), min_size=1, max_size=4))
        raw = b"".join(bytes([filters[i % len(filters)]]) + rows[i % len(rows)] for i in range(height))
        if interlace:
            raw = raw * 2  # Adam7 passes hold more rows than the image; enough data for all of them
        idat = zlib.compress(raw)
        if not sane:
            idat = idat[:draw(st.integers(0, len(idat)))]
    else:
        idat = draw(st.binary(max_size=1024))
    step = draw(st.sampled_from([len(idat) or 1, 1, 7, 256]))
    for i in range(0, max(len(idat), 1), step):
        out += _chunk(b"IDAT", idat[i:i + step])
    if sane or draw(st.booleans()):
        out += _chunk(b"IEND", b"")
    return out


@fuzz_settings(200)
@given(data=png_files())
def test_constructed_pngs_decode_or_raise_image_error(data):
    check(data, "built.png", "png")


# --------------------------------------------------------------------------------------- structured DICOM


_TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
                      "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90",
                      "1.2.840.10008.1.2.4.80", "1.2.3.4.5"]
_NUMBERS = st.sampled_from(["1", "0", "-1", "2.5", "-1024", "1e308", "-1e308", "nan", "inf", "1e-300", "x", "",
                            "1\\2", "65535"])


@st.composite
def dicom_files(draw) -> bytes:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate

    ts = draw(st.sampled_from(_TRANSFER_SYNTAXES[:5] * 3 + _TRANSFER_SYNTAXES[5:]))  # mostly ones cxr can decode
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "1.2.3"
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    sane = draw(st.booleans())  # a consistent header, or any values at all
    if sane:
        rows, cols = draw(st.integers(1, 32)), draw(st.integers(1, 32))
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = draw(st.sampled_from([8, 16, 32]))
        ds.BitsStored = draw(st.integers(1, ds.BitsAllocated))
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = draw(st.sampled_from([0, 1]))
        ds.SamplesPerPixel = draw(st.sampled_from([1, 1, 3]))
        ds.PhotometricInterpretation = draw(st.sampled_from(["MONOCHROME2", "MONOCHROME1"])) \
            if ds.SamplesPerPixel == 1 else "RGB"
        if ds.SamplesPerPixel == 3:
            ds.PlanarConfiguration = draw(st.sampled_from([0, 1]))
    else:
        rows = draw(st.one_of(st.integers(0, 48), st.integers(0, 65535)))
        cols = draw(st.one_of(st.integers(0, 48), st.integers(0, 65535)))
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = draw(st.sampled_from([8, 16, 32, 1, 12, 64, 0, 7]))
        ds.BitsStored = draw(st.one_of(st.just(ds.BitsAllocated), st.integers(0, 64)))
        ds.HighBit = draw(st.one_of(st.just(max(ds.BitsStored - 1, 0)), st.integers(0, 64)))
        ds.PixelRepresentation = draw(st.sampled_from([0, 1, 2]))
        ds.SamplesPerPixel = draw(st.sampled_from([1, 1, 3, 4, 0, 2]))
        ds.PhotometricInterpretation = draw(st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB", "YBR_FULL",
                                                             "PALETTE COLOR", "", "XYZ"]))
    for keyword in draw(st.lists(st.sampled_from(["RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth",
                                                  "NumberOfFrames", "PlanarConfiguration"]), max_size=6, unique=True)):
        value = draw(_NUMBERS)
        if keyword in ("NumberOfFrames",):
            value = draw(st.sampled_from(["1", "2", "0", "100000", "-3", "x"]))
        elif keyword == "PlanarConfiguration":
            value = draw(st.sampled_from([0, 1, 2]))
        # pydicom will not hold "x" as a number (the byte mutations send such values)
        with warnings.catch_warnings(), contextlib.suppress(ValueError):
            warnings.simplefilter("ignore")
            setattr(ds, keyword, value)
    if draw(st.booleans()):
        ds.VOILUTFunction = draw(st.sampled_from(["LINEAR", "SIGMOID", "LINEAR_EXACT", "BOGUS"]))
    expected = rows * cols * max(ds.SamplesPerPixel, 1) * max(ds.BitsAllocated, 8) // 8
    if (sane or draw(st.booleans())) and expected <= 1 << 16:
        pixels = draw(st.binary(min_size=expected, max_size=expected))
    else:
        pixels = draw(st.binary(max_size=4096))
    if ts in ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"):
        if ts.endswith(".5") and draw(st.booleans()):  # RLE segments: replicate and literal runs, some too short
            n = max(ds.SamplesPerPixel, 1) * max(ds.BitsAllocated, 8) // 8 if sane else draw(st.integers(0, 16))
            segments = []
            for _ in range(min(n, 15)):
                need, seg = rows * cols, b""
                while need > 0 and len(seg) < 4096:
                    if need >= 2 and draw(st.booleans()):
                        k = min(need, draw(st.integers(2, 128)))
                        seg += bytes([257 - k, draw(st.integers(0, 255))])
                    else:
                        k = min(need, draw(st.integers(1, 128)))
                        seg += bytes([k - 1]) + draw(st.binary(min_size=k, max_size=k))
                    need -= k
                segments.append(seg if sane else seg[:draw(st.integers(0, len(seg)))])
            offsets, at = [], 64
            for seg in segments:
                offsets.append(at)
                at += len(seg)
            pixels = struct.pack("<16I", len(segments), *(offsets + [0] * (15 - len(offsets)))) + b"".join(segments)
        ds.PixelData = encapsulate([pixels + b"\0" * (len(pixels) % 2) or b"\0\0"])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels
        ds["PixelData"].VR = "OB" if ds.BitsAllocated <= 8 else "OW"
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    except Exception:
        hypothesis.assume(False)  # pydicom will not write it: not a file anyone could send
    return buf.getvalue()


@fuzz_settings(250)
@given(data=dicom_files())
def test_constructed_dicoms_decode_or_raise_image_error(data):
    check(data, "built.dcm", "dicom")


# ------------------------------------------------------------------------------------------------- bombs


def _deflated_bomb(inflated_mb: int) -> bytes:
    """A valid deflated DICOM whose data set inflates to ``inflated_mb`` MB (a private OB element of zeros)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    small = SEEDS["deflated.dcm"]
    fp = io.BytesIO(small)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    body = zlib.decompress(small[fp.tell():], -zlib.MAX_WBITS)
    n = inflated_mb << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    z = comp.compress(b"\x09\x00\x10\x10OB\0\0" + struct.pack("<I", n))
    for _ in range(inflated_mb):
        z += comp.compress(bytes(1 << 20))
    return small[:fp.tell()] + z + comp.compress(body) + comp.flush()


@pytest.mark.parametrize("case", ["deflated-dicom", "png-ztxt", "png-idat", "jpeg-header", "dicom-header"])
def test_decompression_bombs_are_refused_within_bounded_memory(case):
    """Small files that expand enormously: refused (or decoded within the pixel limit) with a bounded memory peak."""
    max_pixels = 1 << 20
    if case == "deflated-dicom":  # 64 MB of zeros in a 65 kB file; before the bound, pydicom inflated all of it
        data = _deflated_bomb(64)
    elif case == "png-ztxt":  # a text chunk of 64 MB of zeros
        data = SEEDS["gray.png"][:-12] + _chunk(b"zTXt", b"k\0\0" + zlib.compress(bytes(64 << 20), 9)) + \
            SEEDS["gray.png"][-12:]
    elif case == "png-idat":  # 50 000 x 50 000 pixels of zeros in a small file
        data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)) + \
            _chunk(b"IDAT", zlib.compress(bytes(32 << 20), 9)) + _chunk(b"IEND", b"")
    elif case == "jpeg-header":  # a JPEG whose frame header claims 65 000 x 65 000
        jpeg = bytearray(SEEDS["gray.jpeg"])
        sof = jpeg.index(b"\xff\xc0")
        jpeg[sof + 5:sof + 9] = struct.pack(">HH", 65_000, 65_000)
        data = bytes(jpeg)
    else:  # a DICOM that claims 60 000 x 60 000 pixels
        data = _dicom(_gray(40, 48, dtype=np.uint16), Rows=60_000, Columns=60_000)
    assert len(data) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as e:
            read_grayscale(data, name="bomb", max_pixels=max_pixels)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith("bomb: ")
    # 8 bytes per allowed pixel is what the deflate bound lets through; anything in the hundreds of MB is a bomb.
    assert peak < 8 * max_pixels + (16 << 20), f"{peak / 1e6:.0f} MB peak"


def test_a_legitimate_deflated_dicom_still_decodes():
    out = read_grayscale(SEEDS["deflated.dcm"], name="ok.dcm")
    ref = read_grayscale(_dicom(_gray(40, 48, dtype=np.uint16)), name="ref.dcm")
    assert np.array_equal(out, ref)

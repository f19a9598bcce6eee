"""Figure 1c: decoding a large DICOM, memory and time: cxr's float32 rescale and window against pydicom's LUT functions.

A full-resolution Kermany original, resized to ``--size`` (default 4000x5000, a large DR detector) and scaled to
12 bits, is written as a DICOM with a rescale (slope 2, intercept -1024) and a linear window (centre 1000, width
2000), the common case of a DX export. Each round decodes it, in turn, with :func:`cxr.images.read_grayscale` as it
is (``float32``: rescale and window in one float32 array changed in place) and with pydicom's
``apply_modality_lut`` / ``apply_voi_lut`` (``pydicom LUTs``: the code before, float64), and records the peak of
Python's traced allocations during the decode (tracemalloc: numpy's buffers, not the interpreter) and the wall time.
Both give the same pixels (checked each round).

    python benchmarks/dicom_decode.py --rounds 5
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import tracemalloc

import numpy as np
from common import ORIGINALS, cell, header, loadavg, ratio_cell
from PIL import Image


def dicom_file(pixels: np.ndarray) -> bytes:
    import pydicom
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 2, -1024, 1000, 2000
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def measure(data: bytes) -> tuple[np.ndarray, float, float]:
    """(pixels, peak MB, seconds) of one decode."""
    from cxr.images import read_grayscale

    tracemalloc.start()
    t = time.perf_counter()
    try:
        out = read_grayscale(data, name="large.dcm")
        seconds = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()
    return out, peak, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", default="4000x5000", help="WIDTHxHEIGHT of the DICOM")
    args = p.parse_args(argv)
    import cxr.images

    width, height = map(int, args.size.split("x"))
    load_before = loadavg()  # the header, printed after the rounds, reads the load after them (it had run first)
    source = sorted(ORIGINALS.rglob("*.jpeg"))[0]
    with Image.open(source) as im:
        grey = np.asarray(im.convert("L").resize((width, height), Image.Resampling.BICUBIC), np.float32)
    data = dicom_file(np.rint(grey * (4095 / 255)))
    print(f"{source.name} as a {width}x{height} 12-bit DICOM, {len(data) / 1e6:.0f} MB", file=sys.stderr)

    ours = cxr.images._linear_luts_float32
    peaks: dict[str, list[float]] = {"float32": [], "pydicom LUTs": []}
    times: dict[str, list[float]] = {"float32": [], "pydicom LUTs": []}
    for r in range(args.rounds):
        results = {}
        for name in peaks:
            cxr.images._linear_luts_float32 = ours if name == "float32" else (lambda arr, ds: None)
            try:
                results[name], peak, seconds = measure(data)
            finally:
                cxr.images._linear_luts_float32 = ours
            peaks[name].append(peak)
            times[name].append(seconds)
        same = np.array_equal(results["float32"], results["pydicom LUTs"])
        print(f"round {r + 1}/{args.rounds} (load {loadavg()}): " + ", ".join(
            f"{n} {peaks[n][-1]:.0f} MB {times[n][-1]:.2f} s" for n in peaks) + f"; same pixels: {same}",
              file=sys.stderr, flush=True)
        if not same:
            raise SystemExit("the two decodes differ")
    pixels = width * height
    header(argv, "dicom_decode.py", args.rounds, load_before)
    print("| decode | peak MB, median [min, max] | bytes a pixel | seconds | vs pydicom LUTs (memory, time) |")
    print("|---|---:|---:|---:|---:|")
    for name in peaks:
        print(f"| {name} | {cell(peaks[name], '.0f')} | {np.median(peaks[name]) * 1e6 / pixels:.1f} | "
              f"{cell(times[name], '.2f')} | {ratio_cell(peaks[name], peaks['pydicom LUTs'])}, "
              f"{ratio_cell(times[name], times['pydicom LUTs'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The web service through FastAPI's test client: every answer (200, 400, 413, 415, 422, 500, 503), the page, the
model card, headers, and that inference is bounded and off the event loop. A tiny 64 px checkpoint, real X-rays."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")
httpx = pytest.importorskip("httpx2")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import cxr  # noqa: E402
from cxr.config import load_config  # noqa: E402
from cxr.demo import SAMPLE_DIR  # noqa: E402
from cxr.errors import UsageError  # noqa: E402
from cxr.images import load_image  # noqa: E402
from cxr.model import Checkpoint, build_model, save_checkpoint  # noqa: E402
from cxr.predict import DISCLAIMER, predict_files  # noqa: E402
from cxr.serve import create_app, load_engine, sniff  # noqa: E402

SIZE = 64
PNEUMONIA = sorted((SAMPLE_DIR / "test" / "PNEUMONIA").glob("*.jpeg"))
NORMAL = sorted((SAMPLE_DIR / "test" / "NORMAL").glob("*.jpeg"))
PREDICT = "/api/v1/predict"


def tiny_checkpoint(path: Path, threshold: float = 0.5) -> Path:
    torch.manual_seed(0)
    cfg = load_config(overrides={"image_size": SIZE, "data": "/secret/server/path/kermany-224"})
    save_checkpoint(Checkpoint("densenet121", build_model("densenet121", "none").state_dict(), cfg,
                               threshold=threshold), path)
    return path


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def engine(ckpt_path):
    return load_engine(ckpt_path, "torch", "cpu")


@pytest.fixture(scope="module")
def client(engine):
    app = create_app(engine, max_upload_mb=0.2)
    with TestClient(app) as c:
        yield c


def upload(client, data: bytes, name: str = "x.jpeg", params: str = ""):
    return client.post(PREDICT + params, files={"file": (name, data, "application/octet-stream")})


def png_bytes(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "PNG")
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb's first bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def dicom(pixels: np.ndarray | None, preamble: bool = True) -> bytes:
    """A Secondary Capture DICOM of uint16 ``pixels``, or without pixel data when None."""
    import pydicom
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = (100, 80) if pixels is None else pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    if pixels is not None:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=preamble)
    return buf.getvalue()


def assert_no_internals(response) -> None:
    text = response.text
    for leak in ("Traceback", "File \"", ".py", "Error(", "/secret"):
        assert leak not in text, f"{leak!r} leaked to the client: {text}"


# ----------------------------------------------------------------------------------------------- 200


def test_predict_real_xray_matches_cxr_predict(client, ckpt_path):
    f = PNEUMONIA[0]
    r = upload(client, f.read_bytes(), f.name)
    assert r.status_code == 200, r.text
    body = r.json()
    # The same preprocessing and numerics as `cxr predict` on the same file.
    expected = predict_files(ckpt_path, [f], device="cpu")[0]
    assert body["probability"] == pytest.approx(expected.prob_pneumonia, abs=1e-6)
    assert body["label"] == expected.label == ("PNEUMONIA" if body["probability"] >= 0.5 else "NORMAL")
    assert body["probabilities"]["PNEUMONIA"] == pytest.approx(body["probability"])
    assert body["probabilities"]["NORMAL"] == pytest.approx(1 - body["probability"])
    assert body["threshold"] == 0.5
    assert body["model"] == {"id": hashlib.sha256(ckpt_path.read_bytes()).hexdigest()[:12],
                             "version": cxr.__version__, "backend": "torch"}
    assert body["filename"] == f.name and body["format"] == "jpeg"
    assert body["note"] == DISCLAIMER
    assert set(body["timing_ms"]) >= {"decode", "inference", "heatmap", "queue", "upload", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"] > 0
    # The heatmap: a PNG of the model's input size, coloured (RGB), explaining the predicted class.
    assert body["heatmap"]["method"] == "Grad-CAM" and body["heatmap"]["target"] == body["label"]
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["png_base64"])))
    assert overlay.format == "PNG" and overlay.size == (SIZE, SIZE) and overlay.mode == "RGB"
    assert body["heatmap_note"] is None and body["image_png_base64"] is None


def test_heatmap_off_and_input_image_on(client):
    r = upload(client, NORMAL[0].read_bytes(), NORMAL[0].name, "?heatmap=false&include_image=true")
    assert r.status_code == 200
    body = r.json()
    assert body["heatmap"] is None and "not requested" in body["heatmap_note"]
    picture = Image.open(io.BytesIO(base64.b64decode(body["image_png_base64"])))
    assert picture.size == (SIZE, SIZE) and picture.mode == "L"


def test_png_and_dicom_uploads(client, engine):
    gray = np.asarray(Image.open(NORMAL[1]).convert("L"))
    png = upload(client, png_bytes(gray), "scan.png", "?heatmap=false")
    jpg = upload(client, NORMAL[1].read_bytes(), "scan.jpeg", "?heatmap=false")
    assert png.status_code == jpg.status_code == 200
    assert png.json()["format"] == "png"
    # Lossless PNG of the decoded JPEG's grey levels: the same model input, so the same probability.
    assert png.json()["probability"] == pytest.approx(jpg.json()["probability"], abs=1e-6)
    r = upload(client, dicom(np.tile(np.linspace(0, 4000, 80), (100, 1))), "scan.dcm", "?heatmap=false")
    assert r.status_code == 200, r.text
    assert r.json()["format"] == "dicom" and 0 <= r.json()["probability"] <= 1


def test_client_path_in_file_name_is_reduced_to_its_last_part(client):
    name = b"C:\\Users\\me\\..\\../etc/pass\x01wd\x7f.jpeg"
    body = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + name + b"\"\r\n\r\n"
            + NORMAL[0].read_bytes() + b"\r\n--B--\r\n")
    r = client.post(PREDICT + "?heatmap=false", content=body,
                    headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 200, r.text
    assert r.json()["filename"] == "passwd.jpeg"


# ----------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("data", "name"), [
    (b"just some text, not an image", "notes.txt"),
    (b"%PDF-1.7\n" + b"0" * 500, "report.jpeg"),  # the extension lies; the content decides
    (b"GIF89a" + b"\0" * 100, "x.png"),
    (b"plain text claiming to be DICOM", "scan.dcm"),  # tried as DICOM by its name, and no data set in it
])
def test_not_an_image_is_415(client, data, name):
    r = upload(client, data, name)
    assert r.status_code == 415, r.text
    assert r.json()["detail"].startswith(f"{name}: not an image")
    assert_no_internals(r)


def test_a_dcm_upload_without_preamble_is_read_as_the_command_line_reads_it(client):
    # It was refused with 415, while `cxr predict` read the same file: the two disagreed on one file.
    pixels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7) % 4096
    with_preamble = upload(client, dicom(pixels), "a.dcm")
    without = upload(client, dicom(pixels, preamble=False), "a_nopre.dcm")
    assert with_preamble.status_code == without.status_code == 200, without.text
    assert without.json()["probability"] == with_preamble.json()["probability"]
    assert with_preamble.json()["format"] == without.json()["format"] == "dicom"
    # Whatever its name: its first element says DICOM (a UID-named file of an old PACS had been "not an image").
    named_otherwise = upload(client, dicom(pixels, preamble=False), "1.2.840.113619.2.55.jpeg")
    assert named_otherwise.status_code == 200, named_otherwise.text
    assert named_otherwise.json()["probability"] == with_preamble.json()["probability"]
    # One that starts at group 0028 (no first element to know it by) is read by its .dcm: a name of over 120
    # characters (a PACS export's UIDs) had been cut, the extension with it, and refused 415 as "not an image".
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 64, 64, 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.PixelData = 15, 0, pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False, implicit_vr=True, little_endian=True)  # no preamble, no file meta
    long_name = ".".join(["1.2.840.113619.2.55.3.604688119.971.1234567890"] * 3) + ".dcm"
    for name in ("x.dcm", "x.DICOM", long_name):  # .dicom as the command line takes it
        r = upload(client, buf.getvalue(), name)
        assert r.status_code == 200 and r.json()["probability"] == with_preamble.json()["probability"], r.text
        assert r.json()["format"] == "dicom"  # sniff found no marker: said as what it was read as, not null
    assert len(r.json()["filename"]) == 120 and r.json()["filename"].endswith("1234567890.dcm")
    # A DICOM data set that does not decode is 422 as with its preamble, not "not DICOM" (415).
    blank = upload(client, dicom(np.full((8, 8), 5, np.uint16), preamble=False), "blank.dcm")
    assert blank.status_code == 422 and "blank image" in blank.json()["detail"]


def test_wrong_request_content_type_is_415(client):
    r = client.post(PREDICT, content=NORMAL[0].read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 415
    assert "multipart/form-data" in r.json()["detail"]
    # multipart without its boundary (a client that set the header by hand) cannot be parsed: 415 too, not a 500
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpeg"\r\n\r\nx\r\n--b--\r\n'
    for ctype in ("multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; charset=utf-8"):
        r = client.post(PREDICT, content=body, headers={"content-type": ctype})
        assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"], (ctype, r.text)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own warning on the bomb's header
@pytest.mark.parametrize(("case", "reason"), [
    ("truncated-jpeg", "truncated"),
    ("truncated-png", "PNG"),
    ("bomb-png", "pixel limit (possible decompression bomb)"),
    ("dicom-no-pixels", "no pixel data"),
    ("empty", "empty"),
    ("blank-png", "blank image (every pixel has the same value)"),  # was PNEUMONIA, P 0.99999
])
def test_unreadable_image_is_422_with_a_clear_message(client, case, reason):
    jpeg = NORMAL[0].read_bytes()
    data = {
        "truncated-jpeg": jpeg[: len(jpeg) // 3],
        "truncated-png": png_bytes(np.zeros((50, 50), np.uint8))[:60],
        "bomb-png": png_header_claiming(12_000, 12_000),
        "dicom-no-pixels": dicom(None),
        "empty": b"",
        "blank-png": png_bytes(np.full((300, 200), 12, np.uint8)),
    }[case]
    r = upload(client, data, f"{case}.img")
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert f"{case}.img" in detail and reason in detail
    assert_no_internals(r)


def test_a_dicom_object_that_holds_no_image_is_415(client):
    # A PACS router posts every object of a study: its structured reports had been 422, "unreadable images".
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom(None)))
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds)
    r = upload(client, buf.getvalue(), "report.dcm")
    assert r.status_code == 415, r.text
    assert r.json()["detail"].startswith("report.dcm: not an image: a DICOM structured report")
    assert_no_internals(r)


def test_missing_file_field_is_422(client):
    r = client.post(PREDICT, files={"image": ("x.jpeg", NORMAL[0].read_bytes())})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    r = client.post(PREDICT, files=[("file", ("a.jpeg", b"\xff\xd8\xff")), ("file", ("b.jpeg", b"\xff\xd8\xff"))])
    assert r.status_code == 422 and "exactly one" in r.json()["detail"]


def test_malformed_multipart_is_400(client):
    r = client.post(PREDICT, content=b"--xyz\r\nthis is not how parts look\r\n\r\n\r\n--xyz--junk",
                    headers={"content-type": "multipart/form-data; boundary=abc"})
    assert r.status_code in (400, 422)  # a parse error, or a well-formed body with no 'file' part
    assert_no_internals(r)


def test_multipart_bodies_built_to_cost_memory_are_400(client, monkeypatch):
    import cxr.serve

    headers = {"content-type": "multipart/form-data; boundary=b"}
    image = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpeg"\r\n\r\n' \
        + NORMAL[0].read_bytes() + b"\r\n"
    # Many empty parts: 1.4 million in 20 MB had cost the server 800 MB and 19 s of its event loop.
    monkeypatch.setattr(cxr.serve, "_MAX_PARTS", 3)
    r = client.post(PREDICT, content=b"--b\r\na: b\r\n\r\n\r\n" * 4 + b"--b--\r\n", headers=headers)
    assert r.status_code == 400 and "more than 3 form fields" in r.json()["detail"], r.text
    # Up to the limit, other fields are allowed (and not kept); the image is found among them.
    other = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n' + b"x" * 1000 + b"\r\n"
    r = client.post(PREDICT, content=other + image + other + b"--b--\r\n", headers=headers)
    assert r.status_code == 200, r.text
    # One part's headers without end: five lines of 4 kB, each within python-multipart's own limit of a line.
    lines = b"".join(b"x-long-%d: " % i + b"a" * 4000 + b"\r\n" for i in range(5))
    r = client.post(PREDICT, content=b"--b\r\n" + lines + b"\r\n\r\n--b--\r\n", headers=headers)
    assert r.status_code == 400 and r.json()["detail"].startswith("form field headers over 16.0 kB"), r.text
    # A file name of 4,500 characters, or nine headers, within that: python-multipart's own limits (a line of 4,224
    # bytes, 8 headers) had answered "malformed body" first.
    long_name = b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + b"n" * 4500 + b'.jpeg"\r\n'
    extra = b"".join(b"x-extra-%d: 1\r\n" % i for i in range(9))
    r = client.post(PREDICT, content=long_name + extra + b"\r\n" + NORMAL[0].read_bytes() + b"\r\n--b--\r\n",
                    headers=headers)
    assert r.status_code == 200, r.text
    # Up to 16,000 bytes of a part's header names and values are taken, one more is not (the limit had been untested
    # at its edge).
    disp = b'form-data; name="file"; filename="x.jpeg"'
    for headers_size, status in ((16_000, 200), (16_001, 400)):
        pad = headers_size - len(b"Content-Disposition" + disp + b"x-pad")
        r = client.post(PREDICT, content=b"--b\r\nContent-Disposition: " + disp + b"\r\nx-pad: " + b"a" * pad
                        + b"\r\n\r\n" + NORMAL[0].read_bytes() + b"\r\n--b--\r\n", headers=headers)
        assert r.status_code == status, (headers_size, r.text)
    for length in (17_000, 70_000):
        r = client.post(PREDICT, content=b'--b\r\nContent-Disposition: form-data; name="file"; filename="'
                        + b"n" * length + b'"\r\n\r\nx\r\n--b--\r\n', headers=headers)
        assert r.status_code == 400 and "(a file name that long?)" in r.json()["detail"], r.text
    # A boundary python-multipart refuses to parse with (over 256 bytes) was a 500 and two logged tracebacks.
    r = client.post(PREDICT, content=b"--" + b"x" * 5000 + b"--\r\n",
                    headers={"content-type": "multipart/form-data; boundary=" + "x" * 5000})
    assert r.status_code == 400 and "malformed" in r.json()["detail"], r.text
    assert_no_internals(r)


def test_a_service_on_the_loopback_answers_to_its_own_names_only(engine, caplog):
    # A web page could point a name of its own at 127.0.0.1 (DNS rebinding) and use the service through a browser.
    from cxr.serve import API, LOOPBACK_HOSTS, host_name, resolve_allowed_hosts

    assert set(resolve_allowed_hosts("127.0.0.1", None)) == set(LOOPBACK_HOSTS) == set(resolve_allowed_hosts("::1",
                                                                                                          None))
    assert resolve_allowed_hosts("0.0.0.0", None) is None and resolve_allowed_hosts("127.0.0.1", ["*"]) is None
    for loopback, own in (("127.0.0.2", "127.0.0.2"), ("127.1", "127.1"), ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
                          ("[::1]", "::1"), ("LOCALHOST", "localhost")):  # unprotected before, or refused themselves
        assert resolve_allowed_hosts(loopback, None) == tuple(sorted({*LOOPBACK_HOSTS, own})), loopback
    assert [host_name(h) for h in ("[::1]:8000", "Example.org:80", "::1", "localhost", "cxr.example.org.:443", ".",
                                   ".:8000", "..")] == \
        ["::1", "example.org", "::1", "localhost", "cxr.example.org", ".", ".", ".."]  # FQDN: refused before; "." is
    # no host (stripped to nothing, it had read as no Host header, and passed)
    # Names given are written as host names, and the loopback names stay (a local health check got 400 before).
    assert resolve_allowed_hosts("127.0.0.1", ["https://CXR.example.org:443/", "pacs.local:8000"]) == \
        ("127.0.0.1", "::1", "cxr.example.org", "localhost", "pacs.local")
    app = create_app(engine, allowed_hosts=LOOPBACK_HOSTS)
    for base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
        with TestClient(app, base_url=base) as c:
            assert c.get(f"{API}/health").status_code == 200, base
    with caplog.at_level("WARNING", logger="cxr.serve"), TestClient(app, base_url="http://attacker.example:8000") as c:
        r = c.get(f"{API}/model")
        assert r.status_code == 400 and r.json()["detail"] == (
            "this service answers to 127.0.0.1, ::1, localhost, not to 'attacker.example': if a proxy forwards that "
            "name, start it with --allowed-hosts attacker.example")
        assert r.headers["x-frame-options"] == "DENY"  # the security headers on this answer too
        assert c.get("/").status_code == 400
    # Logged once for the name, not once per request (a page polling the service would fill the log)
    assert [rec.getMessage() for rec in caplog.records if "refused a request" in rec.getMessage()] == [
        "refused a request for host 'attacker.example' (400): if a proxy forwards that name, start it with "
        "--allowed-hosts attacker.example"]
    # No Host at all (an HTTP/1.0 health check of a load balancer): let through; browsers always send one.
    import anyio

    from cxr.serve import AllowedHosts

    reached = []

    async def inner(scope, receive, send):
        reached.append(scope["path"])

    async def request(headers):
        await AllowedHosts(inner, LOOPBACK_HOSTS)({"type": "http", "path": "/x", "headers": headers}, None,
                                                 lambda message: anyio.sleep(0))

    anyio.run(request, [])
    anyio.run(request, [(b"host", b"")])
    anyio.run(request, [(b"host", b"evil.example")])
    assert reached == ["/x", "/x"]


def test_behind_a_proxy_under_a_path_the_page_and_docs_name_it(engine):
    # Under https://host/cxr/ the page's /static/app.js and /api/v1 calls went to the host's root (404: the page
    # waited for ever), the docs asked for /static-docs and /openapi.json there, and the strict page CSP hit /docs.
    from cxr.serve import _CSP, _DOCS_CSP, API, STATIC_DIR

    page = (STATIC_DIR / "index.html").read_text() + (STATIC_DIR / "app.js").read_text()
    assert 'src="/' not in page and 'href="/' not in page and '"/api' not in page  # relative: under any path
    with TestClient(create_app(engine), root_path="/cxr") as c:
        docs = c.get("/cxr/docs")
        assert docs.status_code == 200 and "/cxr/static-docs/" in docs.text and "/cxr/openapi.json" in docs.text
        assert docs.headers["content-security-policy"] == _DOCS_CSP
        api = c.get(f"/cxr{API}/health")
        assert api.status_code == 200 and api.headers["cache-control"] == "no-store"
        assert c.get("/cxr/").headers["content-security-policy"] == _CSP


def test_the_pages_script_is_served_as_javascript_whatever_the_registry_says(engine, request):
    # On Windows mimetypes reads the registry; a .js entry of text/plain (with nosniff) and no browser runs the page.
    import mimetypes

    request.addfinalizer(mimetypes.init)  # the process's table as it was, for the tests after this one
    mimetypes.add_type("text/plain", ".js")
    mimetypes.add_type("text/plain", ".css")
    with TestClient(create_app(engine)) as c:
        assert c.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/static/style.css").headers["content-type"].startswith("text/css")


def test_upload_cut_off_before_its_closing_boundary_is_400(client):
    # A client that stops sending (a dropped connection behind a proxy that still ends the request) must not have the
    # first part of its image classified as if it were the whole file.
    data = NORMAL[0].read_bytes()
    head = b'--abc\r\nContent-Disposition: form-data; name="file"; filename="x.jpeg"\r\n\r\n'
    whole = head + data + b"\r\n--abc--\r\n"
    headers = {"content-type": "multipart/form-data; boundary=abc"}
    assert client.post(PREDICT, content=whole, headers=headers).status_code == 200
    for cut in (head + data, head + data[: len(data) // 2]):
        r = client.post(PREDICT, content=cut, headers=headers)
        assert r.status_code == 400 and "no closing boundary" in r.json()["detail"], r.text
        assert_no_internals(r)


def test_upload_over_the_limit_is_413(client):
    big = b"\xff\xd8\xff" + b"\0" * 300_000  # the limit is 0.2 MB
    r = upload(client, big)
    assert r.status_code == 413
    assert "0.2 MB" in r.json()["detail"]


def test_streamed_upload_is_cut_off_at_the_limit(engine):
    """Without a Content-Length the body is counted as it arrives, and reading stops once it is over the limit."""
    app = create_app(engine, max_upload_mb=0.2)
    boundary = b"b0undary"
    head = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpeg\"\r\n\r\n"
            + b"\xff\xd8\xff")
    chunks = [head] + [b"\0" * 16384] * 1000  # 16 MB on offer
    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": PREDICT, "raw_path": PREDICT.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"multipart/form-data; boundary=" + boundary), (b"host", b"test")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert pulled <= (200_000 + 64 * 1024) // 16384 + 2  # stopped just past the limit, not at 16 MB


def test_service_keeps_serving_after_bad_requests(client):
    bad = [b"", b"text", NORMAL[0].read_bytes()[:500], b"\xff\xd8\xff" + b"\0" * 300_000, dicom(None)]
    codes = [upload(client, data).status_code for data in bad]
    assert codes == [422, 415, 422, 413, 422]
    r = upload(client, PNEUMONIA[1].read_bytes(), PNEUMONIA[1].name)
    assert r.status_code == 200 and r.json()["label"] in ("NORMAL", "PNEUMONIA")
    assert client.get("/api/v1/health").json()["status"] == "ok"


class FlatEngine:
    """P 0.4 against a threshold of 0.3: PNEUMONIA, explained by a flat map (nothing raised its score)."""

    backend, model_id, class_names, threshold = "torch", "flat", ["NORMAL", "PNEUMONIA"], 0.3
    image_size, max_pixels, card, heatmap_unavailable, inference_dtype, draft = SIZE, 10**8, {}, None, "float32", False

    def predict_uint8(self, images):
        return np.full(len(images), 0.4)

    def heatmap_png(self, image, target):
        return png_bytes(image), True


def test_a_flat_heatmap_is_said_to_be_flat():
    with TestClient(create_app(FlatEngine())) as c:
        body = upload(c, NORMAL[0].read_bytes()).json()
    assert body["label"] == "PNEUMONIA" and body["heatmap"]["flat"] is True
    assert body["heatmap_note"].startswith("flat: no region raised the score of PNEUMONIA")


class LeaningEngine(FlatEngine):
    """P 0.4 against a threshold of 0.3 again, with a map that is not flat."""

    def heatmap_png(self, image, target):
        return png_bytes(image), False


def test_a_heatmap_of_a_label_the_output_leans_away_from_says_so():
    # PNEUMONIA by the threshold while P < 0.5: the bright map had read as the reason for the label (the README had
    # said such maps are flat; they are not always).
    with TestClient(create_app(LeaningEngine())) as c:
        body = upload(c, NORMAL[0].read_bytes()).json()
    assert body["label"] == "PNEUMONIA" and body["heatmap"]["flat"] is False
    assert "raised PNEUMONIA" in body["heatmap_note"] and "leans NORMAL" in body["heatmap_note"]


class TieEngine(LeaningEngine):
    """P exactly at the threshold of 0.3."""

    def predict_uint8(self, images):
        return np.full(len(images), 0.3)


def test_a_probability_exactly_at_the_threshold_is_pneumonia():
    # As the model card and cxr predict say (probability >= threshold): a tie had been untested here.
    with TestClient(create_app(TieEngine())) as c:
        body = upload(c, NORMAL[0].read_bytes()).json()
    assert body["probability"] == body["threshold"] == 0.3
    assert body["label"] == body["heatmap"]["target"] == "PNEUMONIA"


class RecordingEngine(FlatEngine):
    """P 0.2 against a threshold of 0.5: NORMAL. Records the class each heatmap was asked for."""

    threshold = 0.5

    def __init__(self) -> None:
        self.targets: list[int] = []

    def predict_uint8(self, images):
        return np.full(len(images), 0.2)

    def heatmap_png(self, image, target):
        self.targets.append(target)
        return png_bytes(image), False


def test_the_heatmap_explains_the_predicted_class():
    # A NORMAL answer is explained by NORMAL's Grad-CAM, not PNEUMONIA's: the overlay's "target" field named the
    # predicted class whichever class the engine was asked to explain.
    engine = RecordingEngine()
    with TestClient(create_app(engine)) as c:
        body = upload(c, NORMAL[0].read_bytes()).json()
    assert body["label"] == "NORMAL" and body["heatmap"]["target"] == "NORMAL"
    assert engine.targets == [0]


class BrokenEngine:
    """An engine whose model fails inside, with internals in the message that must not reach a client."""

    backend, model_id, class_names, threshold = "torch", "broken", ["NORMAL", "PNEUMONIA"], 0.5
    image_size, max_pixels, card, heatmap_unavailable, inference_dtype, draft = SIZE, 10**8, {}, None, "float32", False

    def __init__(self) -> None:
        self.calls = 0

    def predict_uint8(self, images):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("CUDA exploded at /secret/server/path/model.py line 42")
        return np.full(len(images), 0.9)

    def heatmap_png(self, image, target):
        return b"", False


def test_internal_error_is_500_without_internals_and_the_service_recovers(caplog):
    app = create_app(BrokenEngine())
    with TestClient(app, raise_server_exceptions=False) as c:
        r = upload(c, NORMAL[0].read_bytes(), params="?heatmap=false")
        assert r.status_code == 500
        assert r.json() == {"detail": "internal error: the image could not be processed"}
        assert_no_internals(r)
        assert "CUDA exploded" in caplog.text  # the operator still sees it
        # and on the error's first line, not only at the foot of its traceback (a log shipper takes lines)
        assert "prediction failed: RuntimeError: CUDA exploded at /secret/server/path/model.py line 42" in caplog.text
        again = upload(c, NORMAL[0].read_bytes(), params="?heatmap=false")
        assert again.status_code == 200 and again.json()["label"] == "PNEUMONIA"


# ----------------------------------------------------------------------------------------------- concurrency


class SlowEngine(BrokenEngine):
    """Sleeps in predict (a blocking call, like a real model) and records how many run at once."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self.running, self.peak = seconds, 0, 0
        self.lock = threading.Lock()

    def predict_uint8(self, images):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        return np.full(len(images), 0.2)


async def _post_many(app, n: int, health_probe: bool = False):
    data = NORMAL[0].read_bytes()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        async def one():
            return await c.post(PREDICT + "?heatmap=false", files={"file": ("x.jpeg", data)})

        async def probe():
            await asyncio.sleep(0.3)  # while the predictions block their threads
            t = time.perf_counter()
            r = await c.get("/api/v1/health")
            return r, time.perf_counter() - t

        tasks = [one() for _ in range(n)] + ([probe()] if health_probe else [])
        return await asyncio.gather(*tasks)


def test_inference_is_bounded_and_off_the_event_loop():
    engine = SlowEngine(1.0)
    app = create_app(engine, max_concurrency=2, max_queue=10)
    *responses, (health, _) = asyncio.run(_post_many(app, 5, health_probe=True))
    assert [r.status_code for r in responses] == [200] * 5
    assert engine.peak == 2
    # The event loop answered while two predictions were blocking their threads (for a second each): the health
    # check saw them running. (Had the loop been blocked, it would have been answered only after they finished.)
    assert health.status_code == 200
    assert health.json()["busy"] == 2 and health.json()["waiting"] == 3


def test_queue_full_is_503_with_retry_after():
    engine = SlowEngine(0.5)
    app = create_app(engine, max_concurrency=1, max_queue=1)
    responses = asyncio.run(_post_many(app, 4))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 503, 503]
    busy = next(r for r in responses if r.status_code == 503)
    # Retry-After estimates when the admitted work is done: two requests (one running, one waiting) on one worker,
    # at the first estimate of a second each. It was a fixed 1, whatever the backlog.
    assert busy.headers["retry-after"] == "2" and "busy" in busy.json()["detail"]
    # After a quick prediction the estimate moves toward its time (about 0.8 s a request): two requests' 1.6 s are
    # rounded up to 2, not down to 1 (a client told to come back too soon meets another 503).
    engine = SlowEngine(0.0)
    app = create_app(engine, max_concurrency=1, max_queue=1)

    async def quick_then_burst():
        first = await _post_many(app, 1)
        engine.seconds = 0.5
        return first + await _post_many(app, 4)

    responses = asyncio.run(quick_then_burst())
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 503, 503]
    assert {r.headers["retry-after"] for r in responses if r.status_code == 503} == {"2"}


# ----------------------------------------------------------------------------------------------- other endpoints


def test_health(client, ckpt_path):
    body = client.get("/api/v1/health").json()
    assert body["status"] == "ok" and body["backend"] == "torch" and body["version"] == cxr.__version__
    assert body["model_id"] == hashlib.sha256(ckpt_path.read_bytes()).hexdigest()[:12]


def test_model_card(client):
    card = client.get("/api/v1/model").json()
    assert card["threshold"] == 0.5 and card["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert "Not for diagnosis" in card["intended_use"] and card["limitations"]
    assert card["preprocessing"]["image_size"] == SIZE
    assert card["training_data"]["name"] == "kermany-224"  # not the server's full path
    assert "/secret" not in json.dumps(card)
    assert card["metrics"] is None  # a bare checkpoint file: no evaluation beside it


def test_model_card_reads_a_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    tiny_checkpoint(run / "best.pt", threshold=0.37)
    (run / "summary.json").write_text(json.dumps({"counts": {"train": {"NORMAL": 10, "PNEUMONIA": 30}}}))
    metrics = {"test": {"n": 40, "accuracy": 0.9, "auroc": 0.95, "threshold": 0.37, "confusion_matrix": [[1]]}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    card = TestClient(create_app(run, device="cpu")).get("/api/v1/model").json()
    assert card["threshold"] == 0.37
    assert card["metrics"] == {"test": {"n": 40, "accuracy": 0.9, "auroc": 0.95, "threshold": 0.37}}
    assert card["training_data"]["counts"] == {"train": {"NORMAL": 10, "PNEUMONIA": 30}}
    # Metrics computed at another threshold do not describe this checkpoint: left out, not misreported.
    metrics["test"]["threshold"] = 0.5
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert TestClient(create_app(run, device="cpu")).get("/api/v1/model").json()["metrics"] is None


def test_openapi_describes_the_api(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/v1/predict", "/api/v1/health", "/api/v1/model"} <= set(spec["paths"])
    post = spec["paths"]["/api/v1/predict"]["post"]
    schema = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["properties"]["file"]["format"] == "binary"
    assert {"200", "413", "415", "422", "503"} <= set(post["responses"])
    assert client.get("/docs").status_code == 200


def test_page_is_offline_and_carries_the_disclaimer(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "not a medical device" in page.text and "not a diagnosis" in page.text
    for asset in ("static/app.js", "static/style.css"):  # relative: the page works under a proxy's path too
        assert f'"{asset}"' in page.text
        r = client.get("/" + asset)
        assert r.status_code == 200
        # Nothing fetched from elsewhere: no absolute URLs in the page or its assets.
        assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text
    assert "http://" not in page.text and "https://" not in page.text


def test_security_headers(client):
    for r in (client.get("/"), client.get("/api/v1/health"), upload(client, b"text")):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self';" in csp and "http" not in csp
        assert "server" not in r.headers
    assert client.get("/api/v1/health").headers["cache-control"] == "no-store"
    # The page and its script are revalidated on every load, so an upgraded cxr never runs through a stale page.
    for path in ("/", "/static/app.js", "/static/style.css"):
        assert client.get(path).headers["cache-control"] == "no-cache", path


def test_head_requests_for_uptime_checks(client):
    for path in ("/", "/api/v1/health", "/api/v1/model"):  # the model card's had been 405
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", path


def test_sniff():
    assert sniff(NORMAL[0].read_bytes()) == "jpeg"
    assert sniff(png_bytes(np.zeros((4, 4), np.uint8))) == "png"
    assert sniff(dicom(np.zeros((4, 4)))) == "dicom"
    assert sniff(b"GIF89a") is None and sniff(b"") is None
    # A DICOM preamble is free-form: one that starts like a JPEG is still a DICOM, as cxr.images decodes it.
    assert sniff(b"\xff\xd8\xff" + dicom(np.zeros((4, 4)))[3:]) == "dicom"


def test_bad_settings_are_refused(ckpt_path):
    from cxr.errors import UsageError

    with pytest.raises(UsageError, match="backend"):
        load_engine(ckpt_path, "tensorflow")
    with pytest.raises(UsageError, match="--backend onnx"):
        load_engine(ckpt_path.with_suffix(".onnx"), "torch")
    with pytest.raises(UsageError, match="runs on the CPU"):  # ONNX Runtime's CPU provider only: not silently
        load_engine(ckpt_path.with_suffix(".onnx"), "onnx", device="cuda")
    with pytest.raises(UsageError):
        create_app(BrokenEngine(), max_concurrency=0)
    # From Python: NaN had passed (then int(nan) in the limits), max_pixels 0 meant the default, -1 refused everything.
    with pytest.raises(UsageError, match="max_upload_mb"):
        create_app(BrokenEngine(), max_upload_mb=float("nan"))
    for pixels in (0, -1, 10.5, True):
        with pytest.raises(UsageError, match="max_pixels"):
            create_app(BrokenEngine(), max_pixels=pixels)


def test_amp_gives_the_probabilities_of_predict_amp_and_the_card_names_the_arithmetic(ckpt_path):
    # --amp as in `cxr predict`: each setting gives predict's numbers for it, and on (bf16, emulated where the CPU lacks
    # it) differs from off (fp32), so the setting is not ignored.
    images = [PNEUMONIA[0], NORMAL[0]]
    probs = {}
    for amp, dtype in (("on", "bfloat16"), ("off", "float32")):
        with TestClient(create_app(ckpt_path, device="cpu", amp=amp)) as c:
            assert c.get("/api/v1/model").json()["inference_dtype"] == dtype
            probs[amp] = np.array([upload(c, f.read_bytes(), f.name, "?heatmap=false").json()["probability"]
                                   for f in images])
        expected = [p.prob_pneumonia for p in predict_files(ckpt_path, images, device="cpu", amp=amp)]
        assert probs[amp] == pytest.approx(expected, abs=1e-6)
    assert np.abs(probs["on"] - probs["off"]).max() > 1e-5
    from cxr.errors import UsageError

    with pytest.raises(UsageError, match="drop --amp on"):  # ONNX Runtime computes in fp32
        load_engine(ckpt_path.with_suffix(".onnx"), "onnx", amp="on")
    with pytest.raises(UsageError, match="--amp 'fast'"):
        load_engine(ckpt_path, "torch", "cpu", amp="fast")


def test_the_port_is_held_from_the_start_so_a_second_service_cannot_take_it(monkeypatch):
    """`cxr serve` listens before its model loads and keeps that socket for uvicorn: a second one started meanwhile
    is refused at once, in one line, rather than both loading a model and the second failing later in uvicorn."""
    import socket

    import cxr.serve
    from cxr.errors import UsageError
    from cxr.serve import _listen

    first = _listen("127.0.0.1", 0)
    port = first[0].getsockname()[1]
    try:
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port}: another program listens there"):
            _listen("127.0.0.1", port)
    finally:
        for sock in first:
            sock.close()
    for sock in _listen("127.0.0.1", port):  # free again once the first lets go
        sock.close()
    with pytest.raises(UsageError, match="not an address of this machine"):
        _listen("no-such-host.invalid", 8000)

    # serve() itself: while the model loads, the port is taken; if loading fails, it is let go.
    seen = []

    def loading(*args, **kwargs):
        with pytest.raises(UsageError, match="another program listens there"):
            _listen("127.0.0.1", port)
        seen.append("refused")
        raise RuntimeError("the model did not load")

    monkeypatch.setattr(cxr.serve, "create_app", loading)
    with pytest.raises(RuntimeError, match="did not load"):
        cxr.serve.serve(BrokenEngine(), host="127.0.0.1", port=port)
    assert seen == ["refused"]
    for sock in _listen("127.0.0.1", port):
        sock.close()

    # Every address the host names, on one port (0.0.0.0 and :: for "", where the machine has IPv6).
    wildcard = _listen("", 0)
    try:
        assert len({sock.getsockname()[1] for sock in wildcard}) == 1
        assert {sock.family for sock in wildcard} <= {socket.AF_INET, socket.AF_INET6}
    finally:
        for sock in wildcard:
            sock.close()

    # A machine without IPv6: its addresses are skipped, the others still served (asyncio's create_server did so).
    real = socket.socket

    def no_ipv6(family=-1, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", no_ipv6)
    ipv4 = _listen("", 0)
    try:
        assert [sock.family for sock in ipv4] == [socket.AF_INET]
    finally:
        for sock in ipv4:
            sock.close()
    with pytest.raises(UsageError, match="no address of it can be opened"):
        _listen("::1", 0)


def test_create_app_reads_allowed_hosts_and_its_numbers_as_the_flags_do(engine):
    # One name as a string had been taken letter by letter, and "*" refused every request; a string or a fraction for
    # a number met TypeErrors of its own.
    from cxr.errors import UsageError
    from cxr.serve import API

    for given, host, status in (("pacs.local", "pacs.local", 200), ("pacs.local", "localhost", 200),
                                (["*"], "anything.example", 200), (["https://CXR.example.org/"], "cxr.example.org",
                                                                   200), ("pacs.local", "other.example", 400)):
        with TestClient(create_app(engine, allowed_hosts=given), base_url=f"http://{host}") as c:
            assert c.get(f"{API}/health").status_code == status, (given, host)
    for bad in ({"max_upload_mb": "5"}, {"max_concurrency": 1.5}, {"max_queue": "3"}, {"upload_timeout": "9"}):
        with pytest.raises(UsageError):
            create_app(engine, **bad)
    with pytest.raises(UsageError, match="whole number"):
        load_engine(Path("unused.pt"), "torch", "cpu", threads=1.5)
    from cxr.serve import serve  # which divides the cores by max_concurrency first: ZeroDivisionError, TypeError
    for bad in (0, "2"):
        with pytest.raises(UsageError, match="max_concurrency"):
            serve(Path("unused.pt"), port=0, max_concurrency=bad)


def test_the_engine_and_the_inference_commands_refuse_images_of_another_size_than_the_models(engine, ckpt_path):
    # load_for_inference had not checked the size (a 32 px image for a 64 px model gave a probability without an
    # error); the engine, which had a check of its own, now predicts through it.
    from cxr.evaluate import load_for_inference

    small = np.zeros((1, SIZE // 2, SIZE // 2), np.uint8)
    for predict in (engine.predict_uint8, load_for_inference(ckpt_path, device="cpu").probs):
        with pytest.raises(UsageError, match=rf"shape \(N, {SIZE}, {SIZE}\).*\(1, 32, 32\)"):
            predict(small)
        assert predict(np.zeros((2, SIZE, SIZE), np.uint8)).shape == (2,)


def test_an_upload_one_byte_over_max_upload_mb_is_413_and_one_at_it_is_read(client):
    # The body's own checks allow the multipart overhead (64 kB) on top of the limit; the file's size is checked
    # after, and nothing had tested that check: a file up to 64 kB over --max-upload-mb would have been taken.
    over = upload(client, b"\xff\xd8\xff" + b"\0" * (200_001 - 3))  # the client fixture's limit: 0.2 MB
    assert over.status_code == 413 and "over the 0.2 MB limit" in over.json()["detail"], over.text
    at = upload(client, b"\xff\xd8\xff" + b"\0" * (200_000 - 3))
    assert at.status_code == 422, at.text  # read, and refused as the broken JPEG it is


def test_a_body_exactly_at_the_limit_with_its_multipart_overhead_is_read(client):
    # The body may be the file's limit plus 64 kB of multipart overhead: both its checks (the Content-Length given, the
    # bytes counted as they arrive) had been untested at that edge, where ">=" would refuse a body the limit allows.
    image = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpeg"\r\n\r\n' \
        + NORMAL[0].read_bytes() + b"\r\n"
    headers = {"content-type": "multipart/form-data; boundary=b"}
    limit = 200_000 + 64 * 1024  # the client fixture's 0.2 MB, and the overhead
    for size, status in ((limit, 200), (limit + 1, 413)):
        note = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
        body = note + b"x" * (size - len(note + b"\r\n" + image + b"--b--\r\n")) + b"\r\n" + image + b"--b--\r\n"
        assert len(body) == size
        r = client.post(PREDICT, content=body, headers=headers)
        assert r.status_code == status, (size, r.text)


def test_in_fp32_one_pass_gives_the_probability_and_heatmap_of_two_and_explains_the_thresholds_class(ckpt_path,
                                                                                                       monkeypatch):
    # The prediction and the heatmap had each run the model (44 % of a request's time): in fp32 the heatmap's pass
    # gives the probability too, to the bit, and the class it explains is the one the threshold gives.
    engine = load_engine(ckpt_path, "torch", "cpu", amp="off")
    image = load_image(PNEUMONIA[0], SIZE, draft=engine.draft)
    p = float(engine.predict_uint8(image[None])[0])
    calls = []
    for threshold in (0.5, min(p + 1e-3, 1.0), max(p - 1e-3, 0.0)):
        engine.threshold = threshold
        label = int(p >= threshold)
        two_pass_png, _ = engine.heatmap_png(image, label)
        monkeypatch.setattr(engine, "predict_uint8", lambda images: calls.append(1) or 1 / 0)
        with TestClient(create_app(engine)) as c:
            body = upload(c, PNEUMONIA[0].read_bytes(), PNEUMONIA[0].name).json()
        monkeypatch.undo()
        assert calls == [] and body["probability"] == p, body
        assert body["label"] == body["heatmap"]["target"] == engine.class_names[label]
        assert base64.b64decode(body["heatmap"]["png_base64"]) == two_pass_png
    # bf16 predictions (or channels_last kernels) keep a pass of their own: Grad-CAM's fp32 would change the digits
    engine.bf16 = True
    assert engine.predict_with_heatmap(image) is None


def test_the_default_threads_share_the_cores_and_keep_to_omp_num_threads(monkeypatch):
    # README advises OMP_NUM_THREADS=1 on a shared machine; the service had overridden it ("1 x 2 threads").
    import cxr.serve

    monkeypatch.setattr(cxr.serve, "usable_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [cxr.serve.default_threads(c) for c in (1, 2, 3, 16)] == [8, 4, 2, 1]
    for value, threads in (("1", 1), ("3", 3), ("16", 4), ("", 4), ("0", 4), ("two", 4)):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert cxr.serve.default_threads(2) == threads, value


def test_uploads_read_at_once_cannot_all_slip_past_a_full_queue():
    # The queue is checked before an upload is read and again after: three uploads that all passed the first check
    # (the service idle), then arrived together, had all been admitted to a queue of none behind one worker.
    engine = SlowEngine(0.5)
    app = create_app(engine, max_concurrency=1, max_queue=0)
    boundary = "cxrboundary7d1f"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpeg\"\r\n\r\n").encode() \
        + NORMAL[0].read_bytes() + f"\r\n--{boundary}--\r\n".encode()

    async def three_at_once():
        waiting, gate = [], asyncio.Event()

        async def one():
            sent, answer = [], {}

            async def receive():
                if sent:  # the body is in: later calls (is the client still there?) wait as a live client's would
                    await asyncio.Event().wait()
                sent.append(True)
                waiting.append(True)  # past the first check: it reads the body
                if len(waiting) == 3:
                    gate.set()
                await gate.wait()
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message):
                if message["type"] == "http.response.start":
                    answer["status"], answer["headers"] = message["status"], dict(message["headers"])

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": PREDICT, "raw_path": PREDICT.encode(), "query_string": b"heatmap=false",
                     "root_path": "", "client": ("127.0.0.1", 1), "server": ("test", 80),
                     "headers": [(b"host", b"test"), (b"content-length", str(len(body)).encode()),
                                 (b"content-type", f"multipart/form-data; boundary={boundary}".encode())]}
            await app(scope, receive, send)
            return answer

        return await asyncio.wait_for(asyncio.gather(one(), one(), one()), 30)

    answers = asyncio.run(three_at_once())
    assert sorted(a["status"] for a in answers) == [200, 503, 503]
    assert all(b"retry-after" in a["headers"] for a in answers if a["status"] == 503)


class OutOfMemoryEngine(BrokenEngine):
    def predict_uint8(self, images):
        raise MemoryError


def test_a_prediction_out_of_memory_is_503_to_retry_not_500(caplog):
    # Memory runs short under load and comes back: 503 with Retry-After tells a client to try again, where 500 said
    # the image could not be processed.
    with TestClient(create_app(OutOfMemoryEngine()), raise_server_exceptions=False) as c:
        r = upload(c, NORMAL[0].read_bytes(), params="?heatmap=false")
    assert r.status_code == 503 and r.json() == {"detail": "out of memory: retry later"}
    assert int(r.headers["retry-after"]) >= 1
    assert "prediction failed" in caplog.text


class CardOutOfMemoryEngine(BrokenEngine):
    @property
    def card(self):
        raise MemoryError


def test_out_of_memory_outside_a_prediction_is_503_to_retry_too(caplog):
    # The last-resort handler answers MemoryError as predict does (503, Retry-After), not as an internal error (500):
    # that mapping had been untested.
    with TestClient(create_app(CardOutOfMemoryEngine()), raise_server_exceptions=False) as c:
        r = c.get("/api/v1/model")
        assert r.status_code == 503 and r.json() == {"detail": "out of memory: retry later"}
        assert int(r.headers["retry-after"]) >= 1
        assert c.get("/api/v1/health").status_code == 200
    assert "internal error on GET /api/v1/model" in caplog.text


def test_an_upload_limit_over_what_the_service_can_hold_is_refused():
    # 5000 MB of one upload held in memory, per worker: refused when the app is made, not when memory runs out.
    from cxr.config import MAX_UPLOAD_MB

    with pytest.raises(UsageError, match=rf"max_upload_mb must be > 0 and <= {MAX_UPLOAD_MB}"):
        create_app(BrokenEngine(), max_upload_mb=5000)
    assert create_app(BrokenEngine(), max_upload_mb=MAX_UPLOAD_MB).title


def test_serve_gives_each_prediction_the_default_threads_unless_told(monkeypatch):
    # `cxr serve` without --threads had given each of its predictions every core (and overridden OMP_NUM_THREADS).
    import cxr.serve

    seen = []

    class Stop(Exception):
        pass

    def recording(model, **kw):
        seen.append(kw["threads"])
        raise Stop

    monkeypatch.setattr(cxr.serve, "usable_cores", lambda: 8)
    monkeypatch.setattr(cxr.serve, "_listen", lambda host, port: [])
    monkeypatch.setattr(cxr.serve, "create_app", recording)
    for omp, threads, concurrency in ((None, None, 2), ("1", None, 2), (None, None, 3), (None, 5, 2)):
        if omp is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", omp)
        with pytest.raises(Stop):
            cxr.serve.serve(BrokenEngine(), port=0, max_concurrency=concurrency, threads=threads)
    assert seen == [4, 1, 2, 5]


def test_a_service_that_cannot_predict_does_not_start(ckpt_path, monkeypatch):
    # On a read-only root file system the heatmap's first use of matplotlib failed: every default prediction was
    # answered 500 while the health check said "ok". A first prediction, heatmap included, is made before the start.
    import cxr.serve
    from cxr.errors import CxrError

    def unwritable(self, image, target):
        raise OSError("Matplotlib requires access to a writable cache directory, but there is none; set the "
                      "MPLCONFIGDIR environment variable to a writable directory")

    monkeypatch.setattr(cxr.serve.TorchEngine, "heatmap_png", unwritable)
    served = []
    monkeypatch.setattr(cxr.serve, "_server_class", lambda: served.append(1))
    with pytest.raises(CxrError, match=r"cannot predict here: a first prediction failed \(OSError: Matplotlib .* "
                                       r"\(set MPLCONFIGDIR to a writable folder\)"):
        cxr.serve.serve(ckpt_path, port=0, device="cpu")
    assert not served
    # Out of memory in that first prediction is itself, not "cannot predict here" (which sends one to the machine's
    # setup): cxr's own out-of-memory message and exit
    from cxr.serve import _first_prediction

    with pytest.raises(MemoryError):
        _first_prediction(OutOfMemoryEngine())


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="no SIGHUP on this platform")
def test_the_servers_signals_stop_it_and_leave_the_handlers_as_they_were():
    # SIGHUP stops the server as SIGTERM does, and afterwards is back to its default action (a handler left behind
    # would set a stopped server's flag, and a later SIGHUP would be ignored); a SIGTERM handler of the caller's own
    # (serve() from Python) still runs after a stop by SIGTERM (only the default action's kill is spared).
    import signal

    import uvicorn

    from cxr.serve import _server_class

    got = []
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL), signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    try:
        server = _server_class()(uvicorn.Config(lambda scope, receive, send: None))
        with server.capture_signals():
            signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)
        assert server.should_exit and got == [] and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
        server = _server_class()(uvicorn.Config(lambda scope, receive, send: None))
        with server.capture_signals():
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert server.should_exit and got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGHUP, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_pages_of_the_origins_given_may_call_the_api_and_no_others(engine):
    # No CORS at all had been possible: a viewer on another origin could not read a prediction from the browser.
    from cxr.errors import UsageError
    from cxr.serve import API, resolve_cors_origins

    assert resolve_cors_origins(["https://Viewer.Example:443/", "http://localhost:3000", "*"]) == (
        "https://viewer.example", "http://localhost:3000", "*")
    assert resolve_cors_origins("http://a.example:80") == ("http://a.example",) and resolve_cors_origins(None) == ()
    for bad in ("viewer.example", "https://viewer.example/app", "ftp://viewer.example"):
        with pytest.raises(UsageError, match="an origin is a scheme and a host"):
            resolve_cors_origins([bad])
    for bad in ("https://*.hospital.example", "http://x.example:99999", "http://x.example:0"):  # had never matched
        with pytest.raises(UsageError, match="never matches the Origin a browser sends"):
            resolve_cors_origins([bad])
    viewer, other = {"Origin": "https://viewer.example"}, {"Origin": "https://other.example"}
    preflight = {"Access-Control-Request-Method": "POST"}
    with TestClient(create_app(engine, cors_origins=["https://viewer.example:443"])) as c:
        r = c.options(f"{API}/predict", headers={**viewer, **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://viewer.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        r = c.options(f"{API}/predict", headers={**other, **preflight})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = c.post(f"{API}/predict", files={"file": ("x.jpeg", NORMAL[0].read_bytes())}, headers=viewer)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://viewer.example"
        assert r.headers["x-content-type-options"] == "nosniff"  # the security headers still on it
        # An error is readable by the page too, with what the client needs to wait
        r = c.post(f"{API}/predict", files={"file": ("x.txt", b"text")}, headers=viewer)
        assert r.status_code == 415 and r.headers["access-control-allow-origin"] == "https://viewer.example"
        assert "retry-after" in r.headers["access-control-expose-headers"].lower()
        assert "access-control-allow-origin" not in c.get(f"{API}/health", headers=other).headers
    with TestClient(create_app(engine)) as c:  # by default, none
        r = c.get(f"{API}/health", headers=viewer)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with TestClient(create_app(engine, cors_origins="*")) as c:
        assert c.get(f"{API}/health", headers=other).headers["access-control-allow-origin"] == "*"
    # A host refused by --allowed-hosts says why to a page allowed to call it
    with TestClient(create_app(engine, allowed_hosts="pacs.local", cors_origins=["https://viewer.example"]),
                    base_url="http://other.example") as c:
        r = c.get(f"{API}/health", headers=viewer)
        assert r.status_code == 400 and r.headers["access-control-allow-origin"] == "https://viewer.example"


def test_cors_origins_flag_reaches_the_service_and_a_bare_name_is_refused_before_the_port_is_taken(monkeypatch):
    import cxr.serve
    from cxr.cli import main
    from cxr.errors import UsageError

    with pytest.raises(UsageError, match="viewer.example"):
        cxr.serve.serve(Path("unused.pt"), port=0, cors_origins=["viewer.example"])
    monkeypatch.setattr(cxr.serve, "_listen", lambda *a: pytest.fail("the port was taken"))
    with pytest.raises(UsageError):
        cxr.serve.serve(Path("unused.pt"), port=0, cors_origins="pacs")
    seen = {}
    monkeypatch.setattr(cxr.serve, "serve", lambda *a, **k: seen.update(k))
    assert main(["serve", "--cors-origins", "https://a.example, http://localhost:3000,"]) in (0, None)
    assert seen["cors_origins"] == ["https://a.example", "http://localhost:3000"]


def test_an_upload_whose_dicom_header_says_lateral_is_answered_with_a_caution(client):
    # A PACS router posts a study's lateral beside its PA view: it was scored as if it were one, without a word.
    from .test_images import dicom_bytes

    pixels = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    r = upload(client, dicom_bytes(pixels, ViewPosition="LL"), "lat.dcm")
    assert r.status_code == 200 and r.json()["label"] in ("NORMAL", "PNEUMONIA")
    assert r.json()["input_note"] == ("by its DICOM header, a lateral view (ViewPosition LL): the model learnt from "
                                      "frontal (PA or AP) chest X-rays, so this prediction means little")
    assert upload(client, dicom_bytes(pixels, ViewPosition="PA"), "pa.dcm").json()["input_note"] is None
    assert upload(client, NORMAL[0].read_bytes(), "x.jpeg").json()["input_note"] is None
    assert "input_note" in client.get("/openapi.json").json()["components"]["schemas"]["PredictionOut"]["properties"]

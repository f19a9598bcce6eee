"""End to end: the service on loopback, Debian's Chromium driven by Playwright, real X-rays from the bundled sample.

A person picks (and drops) files on the page and reads the prediction, probability, heatmap toggle and the note off
it. The page must load nothing from outside the server. Skipped where Playwright or Chromium is absent.
"""

from __future__ import annotations

import base64
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian: apt-get install chromium)")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxr.config import load_config  # noqa: E402
from cxr.demo import SAMPLE_DIR  # noqa: E402
from cxr.model import Checkpoint, build_model, save_checkpoint  # noqa: E402
from cxr.predict import predict_files, prob_text  # noqa: E402
from cxr.serve import create_app  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XRAYS = [sorted((SAMPLE_DIR / "test" / c).glob("*.jpeg"))[0] for c in ("PNEUMONIA", "NORMAL")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    cfg = load_config(overrides={"image_size": 64})
    save_checkpoint(Checkpoint("densenet121", build_model("densenet121", "none").state_dict(), cfg,
                               threshold=0.5), path)
    # A model card beside the file (as the bundled model has) gives the validation figures the page shows.
    (path.parent / "model_card.json").write_text('{"metrics": {"val": {"n": 40, "accuracy": 0.9, "auroc": 0.95}}}')
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    """The service on a free loopback port, in a thread; yields its base URL."""
    yield from _serving(create_app(checkpoint, device="cpu", max_upload_mb=5))


class SlowEngine:
    """A stand-in model that takes 0.4 s per image, so that a page can fill a one-worker service."""

    backend, model_id, class_names, threshold = "torch", "slow", ["NORMAL", "PNEUMONIA"], 0.5
    image_size, max_pixels, card, heatmap_unavailable = 64, 10**8, {}, "not in this test"
    inference_dtype, draft = "float32", False

    def predict_uint8(self, images):
        time.sleep(0.4)
        return [0.2] * len(images)


@pytest.fixture(scope="module")
def slow_server():
    """One worker and no queue: the page's second upload in flight is turned away with 503."""
    yield from _serving(create_app(SlowEngine(), max_concurrency=1, max_queue=0))


def _serving(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the service did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser_page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context()
        outside: list[str] = []

        def only_this_server(route):
            if route.request.url.startswith(server) or route.request.url.startswith("data:"):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", only_this_server)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(server + "/")
        yield page, outside, errors
        browser.close()


def shown_as(text: str, prob: float) -> bool:
    """Whether the page shows ``prob`` as `cxr predict` does (prob_text), allowing the last bits of another batch."""
    return text in {prob_text(prob - 1e-6), prob_text(prob + 1e-6)}


def test_pick_xrays_and_read_the_predictions(browser_page, checkpoint, tmp_path):
    page, outside, errors = browser_page
    expect = sync_api.expect
    expect(page.get_by_test_id("disclaimer")).to_contain_text("not a medical device")
    expect(page.get_by_test_id("model-info")).to_contain_text("threshold 0.500")
    expect(page.get_by_test_id("model-info")).to_contain_text("validation (n 40): accuracy 0.900, AUROC 0.950")
    # The intended use and the limitations on the page, not in a tooltip keyboard and touch users never saw.
    use = page.get_by_test_id("model-use")
    expect(use).to_be_visible()
    use.locator("summary").click()
    expect(use).to_contain_text("Not for diagnosis")
    expect(use).to_contain_text("paediatric (1 to 5 years)")
    assert page.get_by_test_id("model-info").get_attribute("title") is None

    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("this is not an X-ray")
    page.get_by_test_id("file-input").set_input_files([*XRAYS, not_an_image])
    cards = page.get_by_test_id("result")
    expect(cards).to_have_count(3)
    expected = {Path(p.path).name: p for p in predict_files(checkpoint, XRAYS, device="cpu")}

    for f in XRAYS:
        card = cards.filter(has=page.get_by_test_id("filename").get_by_text(f.name, exact=True))
        expect(card.get_by_test_id("status")).to_have_text("Done", timeout=30_000)
        label = card.get_by_test_id("label").inner_text()
        # What the page shows is what `cxr predict` says about the same file, in the same words.
        assert label == expected[f.name].label
        assert shown_as(card.get_by_test_id("probability").inner_text(), expected[f.name].prob_pneumonia)
        expect(card).to_contain_text("not a diagnosis")

        picture, toggle = card.get_by_test_id("picture"), card.get_by_test_id("heatmap-toggle")
        expect(toggle).to_be_checked()
        with_heat = picture.get_attribute("src")
        assert with_heat.startswith("data:image/png;base64,")
        assert picture.evaluate("img => img.complete && img.naturalWidth") == 64
        # Each card's picture and toggle named by its file (a screen reader heard the same words on every card), and
        # the heatmap's colour scale shown with the heatmap only.
        assert picture.get_attribute("alt").startswith(f"{f.name}: the X-ray with the Grad-CAM heatmap")
        assert toggle.get_attribute("aria-label") == f"heatmap overlay on {f.name}"
        expect(card.locator(".scale")).to_be_visible()
        toggle.uncheck()
        plain = picture.get_attribute("src")
        assert plain.startswith("data:image/png;base64,") and plain != with_heat
        expect(card.locator(".scale")).to_be_hidden()
        assert picture.get_attribute("alt") == f"{f.name}: the X-ray as the model saw it"
        toggle.check()
        assert picture.get_attribute("src") == with_heat
        expect(card.get_by_test_id("input-note")).to_be_hidden()  # a JPEG: its header says nothing of its view

    bad = cards.filter(has=page.get_by_test_id("filename").get_by_text("notes.txt", exact=True))
    expect(bad.get_by_test_id("error")).to_contain_text("415")
    expect(bad.get_by_test_id("error")).to_contain_text("not an image")
    assert outside == []
    assert errors == [] or all("415" in e for e in errors)  # the browser logs the refused upload; nothing else


def test_a_lateral_views_caution_is_shown_with_its_prediction(browser_page, tmp_path):
    # A study's lateral beside its PA view had been shown as any other prediction.
    from .test_images import dicom_bytes

    page, outside, errors = browser_page
    seen = len(outside), len(errors)  # the page is the module's: earlier tests' requests are in them
    lateral = tmp_path / "lat.dcm"
    lateral.write_bytes(dicom_bytes((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8), ViewPosition="LL"))
    page.get_by_test_id("file-input").set_input_files([lateral])
    card = page.get_by_test_id("result").filter(has=page.get_by_test_id("filename").get_by_text("lat.dcm", exact=True))
    sync_api.expect(card.get_by_test_id("status")).to_have_text("Done", timeout=30_000)
    sync_api.expect(card.get_by_test_id("input-note")).to_have_text(
        "Caution: by its DICOM header, a lateral view (ViewPosition LL): the model learnt from frontal (PA or AP) "
        "chest X-rays, so this prediction means little.")
    assert outside[seen[0]:] == [] and errors[seen[1]:] == []


def test_the_page_shows_a_probability_and_threshold_as_cxr_predict_does(browser_page):
    # Beside each other, as many decimals as it takes for the two to compare as they do (cxr.predict.prob_text).
    from cxr.predict import threshold_decimals

    page, _, _ = browser_page
    cases = [(0.5745, 0.57463), (0.57455, 0.57463), (0.57463, 0.57463), (0.5749, 0.57463), (0.123, 0.5),
             (0.99999, 0.5), (0.00001, 0.5), (0.57405, 0.5741), (0.5742, 0.5741), (0.89999, 0.9),
             (0.3, 0.99996), (0.3, 0.0002), (0.03099999949336052, 0.031),  # never "1.000"/"0.000"; float32 below
             (0.5625, 0.1), (0.0625, 0.9), (0.3125, 0.4375), (0.6875, 0.5),  # exact ties at 3 decimals: to even
             (0.9995, 0.5), (0.0005, 0.5)]  # the double 0.9995, a little above the decimal, had read "1.000" in both
    js = page.evaluate("cases => cases.map(([p, t]) => { const d = thresholdDecimals(t, p); "
                       "return [probText(p, t, d), fixed(t, d)]; })", cases)
    py = [[prob_text(p, t, d), f"{t:.{d}f}"] for p, t in cases for d in [threshold_decimals(t, [p])]]
    assert js == py
    assert py[1] == ["0.5746", "0.57463"] and py[12][1] == "0.031000000"
    assert py[13][0] == "0.562" and py[16][0] == "0.688"  # 0.5625 to even (down), 0.6875 to even (up)
    assert [py[17][0], py[18][0]] == [">0.999", "0.001"]
    assert page.evaluate("ts => ts.map(thresholdText)", [0.57463, 0.99996, 1.0]) == ["0.575", "0.99996", "1.000"]
    # Metrics: never 1.000 below 1 (the bundled model's AUROC 0.9996 read so), alike in the page and in Python.
    from cxr.predict import score_text

    values = [0.9996, 0.987, 1.0, 0.0, 0.00004, 0.99999949, 0.9999999999999999, 1e-17, 0.9999999, 3e-7]
    assert page.evaluate("xs => xs.map(score)", values) == [score_text(x) for x in values] == [
        "0.9996", "0.987", "1.000", "0.000", "0.00004", "0.999999", "1.000", "0.000", ">0.999999", "<0.000001"]


def test_drop_an_xray_on_the_page(browser_page, checkpoint):
    page, outside, _ = browser_page
    page.get_by_role("button", name="Clear results").click()
    expect = sync_api.expect
    expect(page.get_by_test_id("result")).to_have_count(0)
    data = base64.b64encode(XRAYS[1].read_bytes()).decode()
    page.evaluate("""([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, { type: "image/jpeg" }));
        const zone = document.querySelector("[data-testid=drop-zone]");
        zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: dt, bubbles: true, cancelable: true }));
        zone.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
    }""", [XRAYS[1].name, data])
    card = page.get_by_test_id("result")
    expect(card).to_have_count(1)
    expect(card.get_by_test_id("status")).to_have_text("Done", timeout=30_000)
    expect(card.get_by_test_id("filename")).to_have_text(XRAYS[1].name)
    (expected,) = predict_files(checkpoint, [XRAYS[1]], device="cpu")
    expect(card.get_by_test_id("label")).to_have_text(expected.label)
    assert shown_as(card.get_by_test_id("probability").inner_text(), expected.prob_pneumonia)
    assert outside == []


@pytest.fixture(scope="module")
def slow_queue_server():
    """One worker and a queue: the page's files are answered one by one, 0.4 s apart."""
    yield from _serving(create_app(SlowEngine(), max_concurrency=1, max_queue=8))


def _page_of(browser_page, base):
    """A page of another service, in its own browser context (the same Chromium)."""
    context = browser_page[0].context.browser.new_context()
    page = context.new_page()
    page.goto(base + "/")
    yield page
    context.close()


@pytest.fixture
def slow_page(browser_page, slow_server):
    yield from _page_of(browser_page, slow_server)


@pytest.fixture
def slow_queue_page(browser_page, slow_queue_server):
    yield from _page_of(browser_page, slow_queue_server)


def test_busy_answers_are_waited_out_not_shown_as_bad_files(slow_page):
    # The page sends two files at once; this service takes one and answers 503 to the other. Before, that card read
    # "The server could not use this file (503)"; now it waits as Retry-After says and sends the file again.
    page = slow_page
    expect = sync_api.expect
    page.get_by_test_id("file-input").set_input_files([*XRAYS, XRAYS[0]])
    cards = page.get_by_test_id("result")
    expect(cards).to_have_count(3)
    for k in range(3):
        expect(cards.nth(k).get_by_test_id("status")).to_have_text("Done", timeout=30_000)


def test_clear_stops_the_files_still_queued(slow_queue_page):
    page = slow_queue_page
    expect = sync_api.expect
    page.get_by_test_id("file-input").set_input_files(XRAYS * 4)
    expect(page.get_by_test_id("status").first).to_have_text("Done", timeout=30_000)
    page.get_by_role("button", name="Clear results").click()
    page.wait_for_timeout(3000)  # before, the 6 files still queued went on arriving after the clear
    expect(page.get_by_test_id("result")).to_have_count(0)


def test_drop_a_folder_of_xrays(slow_queue_page, tmp_path):
    # A real drag of a folder (Chromium's DevTools protocol, as the operating system would deliver it). Before, the
    # folder itself was sent: one card, "Could not reach the server (Failed to fetch)", and nothing analysed.
    import shutil

    folder = tmp_path / "xrays"
    (folder / "inner").mkdir(parents=True)
    shutil.copy(XRAYS[0], folder / XRAYS[0].name)
    shutil.copy(XRAYS[1], folder / "inner" / XRAYS[1].name)
    page = slow_queue_page
    box = page.get_by_test_id("drop-zone").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    cdp = page.context.new_cdp_session(page)
    data = {"items": [], "files": [str(folder)], "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver", "drop"):
        cdp.send("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})
    cards = page.get_by_test_id("result")
    expect = sync_api.expect
    expect(cards).to_have_count(2)
    assert sorted(cards.get_by_test_id("filename").all_inner_texts()) == sorted(f.name for f in XRAYS)
    for k in range(2):
        expect(cards.nth(k).get_by_test_id("status")).to_have_text("Done", timeout=30_000)


def test_a_proxys_refusal_is_not_blamed_on_the_file(browser_page):
    # nginx's own 413 (an HTML page, for a body over its client_max_body_size) read "The server could not use this
    # file (413): HTTP 413", and its 502 likewise.
    page, _, _ = browser_page
    expect = sync_api.expect
    for status, text in ((413, "refused as too large (413) by a proxy in front of the service"),
                         (502, "The service did not answer (HTTP 502 from a proxy in front of it)"),
                         # a 200 whose answer is no prediction (cut off): "Cannot read properties of null" before
                         (200, "The answer from the server was cut off or unreadable: try again"),
                         # busy after every retry (1 s each): the server's state, "could not use this file" before
                         (503, "The server is busy: try this file again later")):
        page.get_by_role("button", name="Clear results").click()
        def refuse(route, code=status):  # what nginx sends: its own HTML page, no JSON detail
            route.fulfill(status=code, content_type="text/html", body=f"<html><body>{code} nginx</body></html>")

        page.route("**/api/v1/predict*", lambda route: refuse(route))
        try:
            page.set_input_files("input[type=file]", str(XRAYS[0]))
            expect(page.get_by_test_id("result").locator(".error")).to_contain_text(text, timeout=30_000)
        finally:
            page.unroute("**/api/v1/predict*")
    # A file over the service's own limit (5 MB here), refused by a proxy whose limit is higher: the file is too large,
    # not the proxy's setting (which had been blamed, behind README's nginx with 21 MB).
    page.get_by_role("button", name="Clear results").click()
    page.route("**/api/v1/predict*", lambda route: route.fulfill(status=413, content_type="text/html",
                                                                body="<html><body>413 nginx</body></html>"))
    try:
        page.set_input_files("input[type=file]", {"name": "big.jpeg", "mimeType": "image/jpeg",
                                                   "buffer": b"\xff\xd8" + b"\0" * 6_000_000})
        expect(page.get_by_test_id("result").locator(".error")).to_contain_text(
            "The file (6.0 MB) is too large: the service takes files of at most 5 MB", timeout=30_000)
    finally:
        page.unroute("**/api/v1/predict*")
    page.get_by_role("button", name="Clear results").click()


class FlatEngine(SlowEngine):
    """P 0.4 against a threshold of 0.3, explained by a flat map: nothing raised the score of PNEUMONIA."""

    threshold, heatmap_unavailable = 0.3, None

    def predict_uint8(self, images):
        return [0.4] * len(images)

    def heatmap_png(self, image, target):
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG")
        return buf.getvalue(), True


class LeaningEngine(FlatEngine):
    """P 0.4 against a threshold of 0.3 again: PNEUMONIA, with a map that is not flat."""

    def heatmap_png(self, image, target):
        return FlatEngine.heatmap_png(self, image, target)[0], False


@pytest.fixture(params=[
    # A flat map: the caption said "where the evidence for the label lies" under a plain X-ray, beside a note saying
    # it is flat.
    (FlatEngine, "Grad-CAM: flat, no region raised the score (see the note) (square, aspect ratio not kept)",
     "flat: no region raised the score of PNEUMONIA", True),
    # A map of a label the output leans away from: the same caption, beside a note saying the output leans the other
    # way (the report's grid and the video say "map of PNEUMONIA; leans NORMAL").
    (LeaningEngine, "Grad-CAM: map of PNEUMONIA; the output leans NORMAL (square, aspect ratio not kept)",
     "leans NORMAL", False)], ids=["flat", "leaning"])
def captioned(browser_page, request):
    engine, caption, note, scale_hidden = request.param
    for base in _serving(create_app(engine())):
        for page in _page_of(browser_page, base):
            yield page, caption, note, scale_hidden


def test_a_heatmap_is_captioned_as_what_it_shows(captioned):
    page, caption, note, scale_hidden = captioned
    page.set_input_files("input[type=file]", str(XRAYS[0]))
    card = page.get_by_test_id("result")
    expect = sync_api.expect
    expect(card.get_by_test_id("status")).to_have_text("Done", timeout=30_000)
    expect(card.locator(".caption")).to_have_text(caption)
    if scale_hidden:
        expect(card.locator(".scale")).to_be_hidden()  # no colours to read off a scale
    expect(card.locator(".heatnote")).to_contain_text(note)


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_render_without_internet(browser_page, server, path):
    """Swagger UI and ReDoc come from the service itself: with every other host blocked they still list the API."""
    page, outside, errors = browser_page
    errors.clear()
    page.goto(server + path)
    expect = sync_api.expect
    if path == "/docs":  # Swagger UI: one block per operation, from /openapi.json
        expect(page.locator(".opblock-summary-path", has_text="/api/v1/predict")).to_be_visible(timeout=30_000)
        expect(page.locator(".opblock-summary-path", has_text="/api/v1/health")).to_be_visible()
    else:  # ReDoc: the operations in its side menu
        expect(page.get_by_text("not a medical device").first).to_be_visible(timeout=30_000)
        expect(page.get_by_role("menuitem", name="Predict NORMAL or PNEUMONIA for one uploaded X-ray")).to_be_visible()
    assert outside == [], outside
    # ReDoc's side menu links to redocly.com with a logo from its CDN; the CSP blocks that one image (no request
    # leaves), and the browser logs the block. Anything else is a fault.
    assert [e for e in errors if "cdn.redoc.ly/redoc/logo-mini.svg" not in e] == [], errors
    page.goto(server + "/")


def test_the_report_fits_a_phone_and_prints_whole(browser_page, tmp_path):
    # On a 390 px phone the metrics table ran off the page (the whole page scrolled sideways); a printout left out
    # what closed <details> hold (the unreadable files) and ended pages with a heading whose figure was on the next.
    from cxr.report import make_report

    from .test_report import make_run

    page_file = make_report(make_run(tmp_path / "run"), device="cpu", video=False)
    # The module's browser (one Playwright per thread), in a context of its own (the page's routes allow its server)
    context = browser_page[0].context.browser.new_context(viewport={"width": 390, "height": 800})
    page = context.new_page()
    page.goto(page_file.as_uri())
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    # Pictures shrunk to the phone's width had 2 px tick labels: 640 px wide, scrolled sideways inside their figure
    assert page.evaluate("[...document.querySelectorAll('figure img')].every(i => i.clientWidth >= 640 "
                         "&& getComputedStyle(i.parentElement).overflowX == 'auto')")
    assert page.evaluate("[...document.querySelectorAll('table')].every(t => t.parentElement.className == 'table')")
    assert page.evaluate("document.querySelectorAll('details').length") >= 1
    page.evaluate("dispatchEvent(new Event('beforeprint'))")
    assert page.evaluate("[...document.querySelectorAll('details')].every(d => d.open)")
    page.emulate_media(media="print")
    assert page.evaluate("getComputedStyle(document.querySelector('h2')).breakAfter") == "avoid"
    assert page.evaluate("getComputedStyle(document.querySelector('figure')).breakInside") == "avoid"
    context.close()

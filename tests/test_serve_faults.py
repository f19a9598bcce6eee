"""The service under hostile clients: schemathesis fuzzing from its OpenAPI schema (no server error), and on a real
loopback socket (uvicorn) huge, slow and many concurrent uploads, after which it still answers. An audit hook watches
every file the process opens while it serves: nothing a client sends is written anywhere, and no path a client names
is ever opened.

``scripts/fuzz_service.py`` runs the long campaign (results in RELIABILITY.md); here the CI runs a bounded number.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

schemathesis = pytest.importorskip("schemathesis")
uvicorn = pytest.importorskip("uvicorn")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from cxr.config import load_config  # noqa: E402
from cxr.demo import SAMPLE_DIR  # noqa: E402
from cxr.model import Checkpoint, build_model, save_checkpoint  # noqa: E402
from cxr.serve import create_app, load_engine  # noqa: E402

SCALE = float(os.environ.get("CXR_FUZZ_SCALE", "1"))
PREDICT = "/api/v1/predict"
XRAY = sorted((SAMPLE_DIR / "test" / "PNEUMONIA").glob("*.jpeg"))[0].read_bytes()


def _png(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config(overrides={"image_size": 32})
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(Checkpoint("densenet121", build_model("densenet121", "none").state_dict(), cfg), path)
    return load_engine(path, "torch", "cpu")


# ---------------------------------------------------------------------------------------------- schemathesis


# Uploads are real X-rays and PNGs, their damaged copies, or any bytes: so the fuzzing reaches decoding, the model
# and Grad-CAM, not only the content-type check.
def _damaged(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(data[: max(1, len(data) * cut // 100)])
    for pos, value in flips:
        b[pos % len(b)] = value
    return bytes(b)


_IMAGES = [XRAY, _png(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64).astype(np.uint8)),
           _png((np.arange(40 * 40, dtype=np.uint16) * 17).reshape(40, 40))]
schemathesis.openapi.format("binary", st.one_of(
    st.sampled_from(_IMAGES),
    st.builds(_damaged, st.sampled_from(_IMAGES), st.integers(1, 100),
              st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6)),
    st.binary(max_size=2048)))


def test_api_fuzzed_from_its_openapi_schema_has_no_server_error(engine):
    """Every operation, with valid and with invalid parameters and bodies generated from the schema: no 5xx, status
    codes and content types that the schema documents, responses that match it, and no traceback in any body."""
    from schemathesis import GenerationMode

    app = create_app(engine, max_upload_mb=0.2, max_concurrency=2, max_queue=4)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen: dict[tuple[str, int], int] = {}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @settings(max_examples=max(1, int(100 * SCALE)), deadline=None, database=None, derandomize=SCALE == 1,
                  suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy(mode))
        def call(case):
            # Every other check stays on. The schema can only say "binary": that bytes must be an X-ray it cannot
            # express, so a 415 for schema-valid bytes is the documented answer, not a failure.
            response = case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])
            assert response.status_code < 500
            assert "Traceback" not in response.text and 'File "' not in response.text
            key = (f"{case.method} {case.path}", response.status_code)
            seen[key] = seen.get(key, 0) + 1

        call()
    if os.environ.get("CXR_FUZZ_REPORT"):  # for scripts/fuzz_service.py: answers per operation and status
        with open(os.environ["CXR_FUZZ_REPORT"], "w") as f:
            json.dump({f"{op} {status}": n for (op, status), n in sorted(seen.items())}, f, indent=2)
    statuses = {status for (op, status) in seen if op == f"POST {PREDICT}"}
    assert {200, 415} <= statuses, seen  # the fuzzing got as far as the model, and past the content check
    assert {op for op, _ in seen} == {f"POST {PREDICT}", "GET /api/v1/health", "GET /api/v1/model"}


# -------------------------------------------------------------------------------------------- loopback server


class Server:
    """uvicorn on 127.0.0.1 (a port the kernel picks), in a thread."""

    def __init__(self, app, **config) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, **{"timeout_keep_alive": 2, **config})
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def http(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh connection; (status, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def multipart(data: bytes, filename: str = "x.jpeg", field: str = "file") -> tuple[bytes, dict[str, str]]:
    boundary = "cxrboundary7d1f"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def predict(port: int, data: bytes = XRAY, filename: str = "x.jpeg", query: str = "?heatmap=false") -> int:
    body, headers = multipart(data, filename)
    return http(port, "POST", PREDICT + query, body, headers)[0]


@pytest.fixture(scope="module")
def server(engine):
    s = Server(create_app(engine, max_upload_mb=1.0, max_concurrency=2, max_queue=6))
    assert http(s.port, "GET", "/api/v1/health")[0] == 200
    assert predict(s.port, query="") == 200  # warm: lazy imports and Grad-CAM's first run happen here
    yield s
    s.stop()


def status_of(sock: socket.socket) -> bytes:
    """The status code of the HTTP answer waiting on ``sock`` (b"none" if it closes or fails without one)."""
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in data:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    return data.split(b" ", 2)[1] if data.startswith(b"HTTP/1.1") else b"none"


def endless_upload(port: int, max_mb: int, timeout: float = 10) -> tuple[int, bytes]:
    """POST a chunked multipart upload whose file never ends (up to ``max_mb``), reading any answer as it goes.

    Returns the bytes of file data sent before the server answered (or closed), and the answer's first bytes.
    """
    body, headers = multipart(b"")
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall((f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: {headers['Content-Type']}\r\n"
               "Transfer-Encoding: chunked\r\n\r\n").encode())
    preamble = body[: body.index(b"\r\n\r\n") + 4]  # the part's headers; then file bytes without end
    s.sendall(b"%x\r\n" % len(preamble) + preamble + b"\r\n")
    chunk = b"%x\r\n" % (1 << 16) + b"\xff" * (1 << 16) + b"\r\n"
    sent, answer = 0, b""
    with contextlib.suppress(OSError):  # the server may close the connection while we are still sending
        while sent < max_mb << 20:
            s.sendall(chunk)
            sent += 1 << 16
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                answer += s.recv(4096)
            s.setblocking(True)
            if answer:
                break
    s.settimeout(10)
    with contextlib.suppress(OSError):
        answer += s.recv(4096)
    s.close()
    return sent, answer


def test_huge_uploads_are_cut_off_and_the_service_keeps_serving(server):
    """A declared 10 GB body is refused before it is read; an undeclared 200 MB chunked stream is cut off near the
    1 MB limit (the server stops reading); then the service answers as before."""
    body, headers = multipart(b"")
    status, text = http(server.port, "POST", PREDICT, b"", {**headers, "Content-Length": str(10 << 30)}, timeout=10)
    assert status == 413 and b"limit" in text

    sent, answer = endless_upload(server.port, max_mb=200)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 16 << 20, f"the server read {sent / 1e6:.0f} MB before refusing"
    assert predict(server.port) == 200


def test_slow_uploads_do_not_block_other_clients(server):
    """20 clients that trickle their uploads a few bytes at a time hold connections open; meanwhile the service
    answers health checks and predictions at once, and the slow uploads are answered correctly when they finish."""
    body, headers = multipart(XRAY)
    head = (f"POST {PREDICT}?heatmap=false HTTP/1.1\r\nHost: x\r\nContent-Type: {headers['Content-Type']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    slow, sent = [], 100
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        s.sendall(head + body[:sent])
        slow.append(s)
    try:
        for _ in range(3):  # a few more bytes from each, with pauses
            time.sleep(0.2)
            for s in slow:
                s.sendall(body[sent:sent + 7])
            sent += 7
        t0 = time.monotonic()
        assert http(server.port, "GET", "/api/v1/health", timeout=10)[0] == 200
        assert predict(server.port) == 200
        assert time.monotonic() - t0 < 10
        for s in slow:  # finish the slow uploads: they are ordinary requests, answered 200 or 503 (queue full)
            s.sendall(body[sent:])
        answers = [status_of(s) for s in slow]
    finally:
        for s in slow:
            s.close()
    assert set(answers) <= {b"200", b"503"} and b"200" in answers, answers
    assert predict(server.port) == 200


def _until_closed(sock: socket.socket) -> bytes:
    """What the server sends on ``sock`` until it closes the connection."""
    data = b""
    with contextlib.suppress(OSError):
        while more := sock.recv(4096):
            data += more
    sock.close()
    return data


def test_stalled_connections_are_closed_so_they_cannot_hold_every_slot(engine):
    """A connection that stopped sending held its slot for good: 128 of them (--max-connections) made the service
    answer 503 to everything, health checks included. Now, after --upload-timeout: an upload gets 408 and is closed,
    and a connection that has not sent a request's headers (nothing, or half of them) is closed."""
    from cxr.serve import http_protocol

    timeout = 0.5
    server = Server(create_app(engine, max_upload_mb=1.0, upload_timeout=timeout), http=http_protocol(timeout))
    try:
        body, headers = multipart(XRAY)
        head = (f"POST {PREDICT}?heatmap=false HTTP/1.1\r\nHost: x\r\nContent-Type: {headers['Content-Type']}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        t0 = time.monotonic()
        stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
        stalled[0].sendall(head + body[:100])  # then nothing
        stalled[1].sendall(head[:30])  # half a request line
        # stalled[2] sends nothing at all
        answers = [_until_closed(s) for s in stalled]
        assert answers[0].startswith(b"HTTP/1.1 408") and b"the upload sent nothing for 0.5 s" in answers[0]
        assert answers[1:] == [b"", b""]  # closed without a word: there was no request to answer
        assert time.monotonic() - t0 < 8
        # A slow upload that keeps sending, a piece every 0.3 s (under the 0.5 s), is not cut off: 1.5 s in all.
        steady = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        steady.sendall(head)
        pieces = [body[i:i + len(body) // 4 + 1] for i in range(0, len(body), len(body) // 4 + 1)]
        for piece in pieces:
            time.sleep(0.3)
            steady.sendall(piece)
        assert status_of(steady) == b"200"
        steady.close()
    finally:
        server.stop()


def test_beyond_max_connections_the_answer_is_the_apis_json_503(engine):
    """uvicorn's own refusal beyond --max-connections was text/plain "Service Unavailable" without Retry-After or the
    service's headers: clients reading the API's JSON errors, and the page, could not take it."""
    from cxr.serve import http_protocol

    body, headers = multipart(XRAY)
    upload = (f"POST {PREDICT}?heatmap=false HTTP/1.1\r\nHost: x\r\nContent-Type: {headers['Content-Type']}\r\n"
              f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:100]  # then the rest, later
    server = Server(create_app(engine), http=http_protocol(5.0), limit_concurrency=2)
    held = []
    try:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
        for s in held:
            s.sendall(upload)  # an upload still arriving: each is a request in progress
        time.sleep(0.2)
        status, body = http(server.port, "GET", "/api/v1/model", timeout=10)
        assert status == 503 and "too many connections" in json.loads(body)["detail"]
        # The health check is answered at the limit: a burst of slow uploads had had a working service's every check
        # answered 503 (a load balancer would pull it)
        assert http(server.port, "GET", "/api/v1/health", timeout=10)[0] == 200
        assert http(server.port, "HEAD", "/api/v1/health", timeout=10)[0] == 200
        from http.client import HTTPConnection

        conn = HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/api/v1/model")
        answer = conn.getresponse()
        assert answer.getheader("Retry-After") == "2" and answer.getheader("Content-Type") == "application/json"
        assert answer.getheader("X-Content-Type-Options") == "nosniff"
        assert answer.getheader("Cache-Control") == "no-store"
        conn.close()
    finally:
        for s in held:
            s.close()
        server.stop()
    # Up to the limit: answered as ever (uvicorn's own check had served limit - 1, and nothing at 1). Asked of the
    # model card, not the health check, which is answered at the limit too and so could not tell.
    # Connections open without a request in progress (idle, or a burst's other requests being refused) are not
    # counted: every request of a burst of 12 at a limit of 10 had seen 12 connections, and 11 were refused.
    server = Server(create_app(engine), http=http_protocol(5.0), limit_concurrency=2)
    held = []
    try:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
        held[0].sendall(upload)
        held[1].sendall(b"GET /api/v1/hea")  # half a request line, and two that sent nothing yet
        time.sleep(0.2)
        assert http(server.port, "GET", "/api/v1/model")[0] == 200
        assert http(server.port, "GET", "/api/v1/health")[0] == 200
    finally:
        for s in held:
            s.close()
        server.stop()
    server = Server(create_app(engine), http=http_protocol(5.0), limit_concurrency=1)
    try:
        assert http(server.port, "GET", "/api/v1/model")[0] == 200
        assert http(server.port, "GET", "/api/v1/health")[0] == 200
    finally:
        server.stop()


def test_a_request_that_fails_or_is_cut_off_gives_its_place_under_max_connections_back():
    # The count of requests in progress is taken back however a request ends: one that raised (Starlette raises an
    # app's error again after its 500) or was cancelled (a stop, a client gone) would otherwise hold its place for
    # good, and --max-connections of them would have every later request refused.
    import asyncio

    from cxr.serve import Refusals, _connection_limit

    async def failing(scope, receive, send):
        raise RuntimeError("boom")

    async def cancelled(scope, receive, send):
        raise asyncio.CancelledError

    admitted = [0]
    for app, error in ((failing, RuntimeError), (cancelled, asyncio.CancelledError)):
        limited = _connection_limit(app, types.SimpleNamespace(loop=None), 1, Refusals(1), admitted)
        with pytest.raises(error):
            asyncio.run(limited({"type": "http", "method": "POST", "path": PREDICT}, None, None))
        assert admitted == [0]


def test_many_concurrent_uploads_get_200_or_503_never_an_error(server):
    """48 uploads at once against 2 workers and a queue of 6: each answer is 200 or 503 with Retry-After, nothing
    else; the service then answers the next request normally."""

    def one(i: int) -> int:
        return predict(server.port, XRAY if i % 3 else _IMAGES[1], filename=f"c{i}.jpeg")

    with ThreadPoolExecutor(max_workers=48) as pool:
        statuses = list(pool.map(one, range(48)))
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 8, statuses
    health = http(server.port, "GET", "/api/v1/health")
    assert health[0] == 200 and b'"waiting":0' in health[1].replace(b" ", b"")
    assert predict(server.port) == 200


# ------------------------------------------------------------------------------ what the process opens


@contextlib.contextmanager
def file_audit():
    """Every ``open`` audit event (path, mode, flags) raised in this process while the block runs."""
    events: list[tuple] = []
    active = [True]

    def hook(event, args):
        if active[0] and event == "open":
            events.append(args)

    sys.addaudithook(hook)  # cannot be removed; it goes quiet when the block ends
    try:
        yield events
    finally:
        active[0] = False


def _writes(events: list[tuple]) -> list[str]:
    out = []
    for path, mode, flags in events:
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
        if writing:
            out.append(os.fsdecode(path) if isinstance(path, str | bytes) else str(path))
    return out


def test_uploads_are_never_written_and_no_client_path_is_opened(server, tmp_path, monkeypatch):
    """Uploads named after real files (absolute, relative, traversal, URL, NUL), with paths in the query and headers:
    while they are served, the process opens for writing nothing outside the temporary folder and leaves nothing
    there, and never opens any path a client named."""
    bait = tmp_path / "bait.jpeg"  # a real X-ray at a path the client names: opening it would even "work"
    bait.write_bytes(XRAY)
    names = [str(bait), "../" * 12 + str(bait).lstrip("/"), "/etc/passwd", "..\\..\\windows\\win.ini",
             f"file://{bait}", f"{bait}\0.jpeg", "~/.ssh/id_rsa", "/proc/self/environ", "C:/x.jpeg"]
    # A temporary folder of the test's own: the system's is shared with every other process on the machine, whose
    # files had failed the check below
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    statuses = []
    with file_audit() as events:
        for name in names:
            body, headers = multipart(XRAY, filename=name)
            headers.update({"X-File-Path": str(bait), "Referer": f"file://{bait}"})
            statuses.append(http(server.port, "POST", f"{PREDICT}?path={bait}&file={bait}", body, headers)[0])
        statuses.append(http(server.port, "GET", f"/static/..%2f..%2f..%2f{str(bait).lstrip('/')}")[0])
        statuses.append(http(server.port, "GET", f"/static/{'../' * 12}etc/passwd")[0])
        statuses.append(predict(server.port, data=b"not an image", filename=str(bait)))
        big = XRAY + os.urandom(600_000)  # near the limit: still held in memory, never spooled to disk
        statuses.append(predict(server.port, data=big, filename=str(bait)))
    assert statuses[:len(names)] == [200] * len(names)
    assert statuses[len(names):len(names) + 2] == [404, 404] and statuses[-2] == 415
    opened = [os.fsdecode(p) if isinstance(p, str | bytes) else str(p) for p, _, _ in events]
    assert not [p for p in opened if "bait" in p or "passwd" in p or "id_rsa" in p or "win.ini" in p], opened
    tmp = os.path.realpath(tempfile.gettempdir())
    writes = _writes(events)
    assert [w for w in writes if not os.path.realpath(w).startswith(tmp + os.sep)] == [], writes
    assert set(os.listdir(tempfile.gettempdir())) - tmp_before == set()


def test_audit_hook_sees_file_opens(tmp_path):
    """The check above can fail: the same hook does see a file the process opens and writes."""
    target = tmp_path / "seen.bin"
    with file_audit() as events:
        target.write_bytes(b"x")
        Path(target).read_bytes()
    assert str(target) in [os.fsdecode(p) for p, _, _ in events if isinstance(p, str | bytes)]
    assert str(target) in _writes(events)


def test_a_request_whose_client_has_left_is_not_computed(engine, monkeypatch):
    # Clients that gave up (a 0.5 s timeout, 24 of them) were queued, computed and logged as served: the next real
    # request waited 2.3 s behind them. A request is dropped when its turn comes and its client is gone.
    import asyncio

    calls = []
    real = engine.predict_uint8
    monkeypatch.setattr(engine, "predict_uint8", lambda images: calls.append(len(images)) or real(images))
    app = create_app(engine)
    body, headers = multipart(XRAY)

    def scope() -> dict:
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                "path": PREDICT, "raw_path": PREDICT.encode(), "query_string": b"heatmap=false", "root_path": "",
                "headers": [(b"host", b"127.0.0.1"), (b"content-type", headers["Content-Type"].encode()),
                            (b"content-length", str(len(body)).encode())],
                "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}

    async def ask(leaves: bool) -> list[dict]:
        messages, sent = [{"type": "http.request", "body": body, "more_body": False}], []

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            if leaves:
                return {"type": "http.disconnect"}
            await asyncio.sleep(3600)  # still there

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope(), receive, send)
        return sent

    assert asyncio.run(ask(leaves=True))[0]["status"] != 200 and calls == []
    assert asyncio.run(ask(leaves=False))[0]["status"] == 200 and calls == [1]


def test_refusals_beyond_max_connections_are_counted_in_the_log_not_one_line_each(monkeypatch, caplog):
    # A burst of refusals had logged a line each: 2,638 in 8 s. Then only the first was said, and the rest of a burst
    # waited for the next refusal, lost when none came.
    import cxr.serve

    clock, timers = [100.0], []

    class Loop:
        def call_later(self, delay, callback):
            timers.append((clock[0] + delay, callback))
            return types.SimpleNamespace(cancel=timers.clear)

    monkeypatch.setattr(cxr.serve.time, "monotonic", lambda: clock[0])
    refusals = cxr.serve.Refusals(4)
    with caplog.at_level("WARNING", logger="cxr.serve"):
        for _ in range(500):
            refusals.add(Loop())
        assert len(timers) == 1 and timers[0][0] == 110.0  # the rest of the burst: said 10 s after the first line
        clock[0] = 110.0
        timers[0][1]()
        clock[0] = 113.0
        refusals.add(Loop())  # within 10 s of the last line: counted, and said when the service stops
        refusals.flush()
        refusals.flush()  # nothing left: nothing said
        clock[0] = 200.0
        refusals.add(Loop())  # long after: said at once
    lines = [r.getMessage() for r in caplog.records if r.name == "cxr.serve"]
    assert lines == ["Exceeded concurrency limit (--max-connections 4): 1 request(s) answered 503 so far",
                     "Exceeded concurrency limit (--max-connections 4): 499 request(s) answered 503 in the last 10 s",
                     "Exceeded concurrency limit (--max-connections 4): 1 request(s) answered 503 in the last 3 s",
                     "Exceeded concurrency limit (--max-connections 4): 1 request(s) answered 503 in the last 87 s"]
    assert timers == []


def test_the_refusals_not_yet_said_are_said_when_the_service_stops(engine, monkeypatch, caplog):
    # The count of a last burst beyond --max-connections waits for its timer; a service stopped before it fires says
    # it on the way out (it had been lost).
    import cxr.serve

    class StoppedServer:
        started = True

        def __init__(self, config):
            self.config = config

        def run(self, sockets):
            refusals = self.config.http.refusals = cxr.serve.Refusals(4)
            refusals.count, refusals.said = 3, time.monotonic()  # said a moment ago: the rest waits for the timer

    monkeypatch.setattr(cxr.serve, "_server_class", lambda: StoppedServer)
    with caplog.at_level("WARNING", logger="cxr.serve"):
        cxr.serve.serve(engine, port=0, max_connections=4)
    assert "Exceeded concurrency limit (--max-connections 4): 3 request(s) answered 503 in the last 0 s" in caplog.text


def test_a_request_cut_off_by_the_stop_is_answered_503_where_nothing_was_sent_yet(caplog):
    # A request still in progress when a stop's grace period ends is cancelled by uvicorn: answered 503 (retry) when
    # nothing of its answer has gone out, left alone when some has (a second start would break the HTTP stream), and
    # logged in one line. Not HTTP (the lifespan): the cancellation goes on.
    import asyncio

    from cxr.serve import _cut_off_quietly

    async def cut_off(scope, receive, send):
        raise asyncio.CancelledError

    async def cut_off_while_answering(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise asyncio.CancelledError

    def sent_by(app, kind: str = "http") -> list[dict]:
        sent = []

        async def send(message):
            sent.append(message)

        asyncio.run(_cut_off_quietly(app)({"type": kind}, None, send))
        return sent

    first, body = sent_by(cut_off)
    assert first["status"] == 503 and (b"content-type", b"application/json") in first["headers"]
    assert json.loads(body["body"]) == {"detail": "the service stopped before this request was done; retry"}
    assert [m["status"] for m in sent_by(cut_off_while_answering)] == [200]
    assert caplog.text.count("a request still in progress was cut off by the stop") == 2
    with pytest.raises(asyncio.CancelledError):
        sent_by(cut_off, "lifespan")


def test_beyond_max_connections_a_page_allowed_by_cors_origins_can_read_the_503(engine):
    # The refusal is answered outside the app, and had no CORS headers: a page of an allowed origin saw a network
    # error, not the 503 and its Retry-After.
    from http.client import HTTPConnection

    from cxr.serve import http_protocol

    body, headers = multipart(XRAY)
    upload = (f"POST {PREDICT}?heatmap=false HTTP/1.1\r\nHost: x\r\nContent-Type: {headers['Content-Type']}\r\n"
              f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:100]
    origins = ["https://viewer.example"]
    server = Server(create_app(engine, cors_origins=origins), http=http_protocol(5.0, origins), limit_concurrency=1)
    held = None
    try:
        held = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        held.sendall(upload)
        time.sleep(0.2)
        conn = HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/api/v1/model", headers={"Origin": "https://viewer.example"})
        answer = conn.getresponse()
        assert answer.status == 503 and answer.getheader("Retry-After") == "2"
        assert answer.getheader("Access-Control-Allow-Origin") == "https://viewer.example"
        assert "retry-after" in answer.getheader("Access-Control-Expose-Headers").lower()
        assert answer.getheader("X-Content-Type-Options") == "nosniff"
        conn.close()
    finally:
        if held is not None:
            held.close()
        server.stop()

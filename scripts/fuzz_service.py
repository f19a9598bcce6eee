"""Long campaign against the web service: schemathesis at N times the CI's cases, then loopback stress.

    python scripts/fuzz_service.py --scale 20 [--concurrent 400] [--slow 200] [--stream-mb 1024] [--json out.json]

1. ``tests/test_serve_faults.py`` with ``CXR_FUZZ_SCALE=N``: schemathesis generates valid and invalid requests for
   every operation of the OpenAPI schema (100 x N of each kind), every response checked (no 5xx, documented status
   codes and content types, schema-conformant bodies); plus the loopback and file-audit tests.
2. A uvicorn server on 127.0.0.1 (a tiny random-weight DenseNet-121, 32 px; limits 1 MB, 2 workers, queue 6), hit with
   an endless chunked upload (how much it reads before answering 413), many slow uploads held open while normal
   requests are timed, and many concurrent uploads (the status codes they get); then it must still answer a health
   check and a prediction. The process's resident memory is read before and after.

Results: RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def schemathesis_campaign(scale: float, seed: int) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
               f"--hypothesis-seed={seed}", "tests/test_serve_faults.py"]
    report = Path(tempfile.mkdtemp()) / "answers.json"
    env = {**os.environ, "CXR_FUZZ_SCALE": str(scale), "CXR_FUZZ_REPORT": str(report),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    answers = json.loads(report.read_text()) if report.exists() else {}
    return {"command": " ".join([f"CXR_FUZZ_SCALE={scale:g}", "python", *command[1:]]), "exit_status": proc.returncode,
            "requests": sum(answers.values()), "answers": answers, "wall_seconds": round(time.monotonic() - t0, 1),
            "summary": proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""}


def stress(concurrent: int, slow_clients: int, stream_mb: int) -> dict:
    import torch

    from cxr.config import load_config
    from cxr.model import Checkpoint, build_model, save_checkpoint
    from cxr.serve import create_app, load_engine
    from tests.test_serve_faults import PREDICT, XRAY, Server, endless_upload, http, multipart, predict, status_of

    torch.manual_seed(0)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "cxr-fuzz-service-tiny.pt"
    save_checkpoint(Checkpoint("densenet121", build_model("densenet121", "none").state_dict(),
                               load_config(overrides={"image_size": 32})), path)
    server = Server(create_app(load_engine(path, "torch", "cpu"), max_upload_mb=1.0, max_concurrency=2, max_queue=6))
    out: dict = {}
    try:
        assert predict(server.port) == 200
        out["rss_mb_start"] = round(rss_mb(), 1)

        # An endless chunked upload: how much does the server take before it answers?
        sent, answer = endless_upload(server.port, max_mb=stream_mb, timeout=30)
        out["endless_upload"] = {"offered_mb": stream_mb, "sent_before_answer_mb": round(sent / 2**20, 2),
                                 "answer": answer.split(b"\r\n", 1)[0].decode(errors="replace")}

        # Slow clients hold connections; normal requests are timed meanwhile.
        body, headers = multipart(XRAY)
        head = (f"POST {PREDICT}?heatmap=false HTTP/1.1\r\nHost: x\r\nContent-Type: {headers['Content-Type']}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        slow, at = [], 100
        for _ in range(slow_clients):
            c = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            c.sendall(head + body[:at])
            slow.append(c)
        latencies = []
        for _ in range(10):  # ten rounds: a byte from every slow client, then one timed normal prediction
            for c in slow:
                c.sendall(body[at:at + 1])
            at += 1
            t = time.monotonic()
            status = predict(server.port)
            latencies.append((status, round(time.monotonic() - t, 3)))
        for c in slow:
            c.sendall(body[at:])
        slow_status: collections.Counter[str] = collections.Counter()
        for c in slow:
            code = status_of(c)
            slow_status[code.decode() if code != b"none" else "no answer"] += 1
            c.close()
        out["slow_uploads"] = {"clients": slow_clients, "normal_predictions_meanwhile": latencies,
                               "slow_clients_answers": dict(slow_status)}

        # Stalled uploads: each sends all but the last byte of a body just under the limit, then waits. The server
        # holds each body in memory until it completes (uvicorn has no body timeout), so memory grows with them.
        near = XRAY + b"\0" * (1_000_000 - len(XRAY) - 4096)
        body, headers = multipart(near)
        head = (f"POST {PREDICT}?heatmap=false HTTP/1.1\r\nHost: x\r\nContent-Type: {headers['Content-Type']}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        before = rss_mb()
        stalled = []
        for _ in range(slow_clients):
            c = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            c.sendall(head + body[:-1])
            stalled.append(c)
        time.sleep(2)
        t = time.monotonic()
        status = predict(server.port)
        out["stalled_uploads"] = {"clients": slow_clients, "bytes_each": len(body) - 1,
                                  "rss_mb_before": round(before, 1), "rss_mb_while_held": round(rss_mb(), 1),
                                  "normal_prediction_meanwhile": [status, round(time.monotonic() - t, 3)]}
        for c in stalled:
            c.close()
        time.sleep(1)
        out["stalled_uploads"]["rss_mb_after_close"] = round(rss_mb(), 1)

        # Many uploads at once.
        def one(i: int) -> int:
            try:
                return predict(server.port, filename=f"c{i}.jpeg")
            except OSError as e:
                return -e.errno if e.errno else -1

        t = time.monotonic()
        with ThreadPoolExecutor(max_workers=min(concurrent, 128)) as pool:
            statuses = collections.Counter(pool.map(one, range(concurrent)))
        out["concurrent_uploads"] = {"requests": concurrent, "statuses": {str(k): v for k, v in statuses.items()},
                                     "seconds": round(time.monotonic() - t, 1)}
        out["after"] = {"health": http(server.port, "GET", "/api/v1/health")[0], "predict": predict(server.port),
                        "rss_mb_end": round(rss_mb(), 1)}
    finally:
        server.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concurrent", type=int, default=400)
    ap.add_argument("--slow", type=int, default=200)
    ap.add_argument("--stream-mb", type=int, default=1024)
    ap.add_argument("--skip-loopback", action="store_true", help="only the schemathesis part")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = {"schemathesis": schemathesis_campaign(args.scale, args.seed),
              "loopback": None if args.skip_loopback else stress(args.concurrent, args.slow, args.stream_mb)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    loopback = result["loopback"] or {"after": {"health": 200, "predict": 200}}
    ok = result["schemathesis"]["exit_status"] == 0 and loopback["after"]["health"] == 200 and \
        loopback["after"]["predict"] == 200
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

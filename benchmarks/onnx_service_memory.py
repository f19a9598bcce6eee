"""Peak memory of the ONNX Runtime service, with and without torch loaded (README, "Serving, ONNX").

Each round starts two fresh processes that build the service on the bundled model exported once to an ``.onnx`` file
(``cxr export``, before the rounds) and answer one ``POST /api/v1/predict`` of a full-resolution original through
FastAPI's TestClient, then report their peak resident set size (``ru_maxrss``):

- ``onnx, torch blocked``: ``sys.modules["torch"] = None``, as cxr runs it since the service's ONNX engine stopped
  importing ``cxr.export``;
- ``onnx, torch imported``: ``import torch`` first, which is what that import cost before.

    python benchmarks/onnx_service_memory.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ORIGINALS, REPO, cell, header, loadavg, ratio_cell

IMAGE = ORIGINALS / "val" / "PNEUMONIA" / "person1946_bacteria_4874.jpeg"

CHILD = """
import json, resource, sys
if sys.argv[1] == "blocked":
    sys.modules["torch"] = None
else:
    import torch  # noqa: F401
from fastapi.testclient import TestClient
from cxr.serve import create_app
client = TestClient(create_app(sys.argv[2], backend="onnx"))
r = client.post("/api/v1/predict", files={"file": ("x.jpeg", open(sys.argv[3], "rb").read())})
assert r.status_code == 200, r.text
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "prob": r.json()["probability"]}))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    load_before = loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        onnx = Path(tmp) / "default.onnx"
        subprocess.run([sys.executable, "-m", "cxr", "export", "--format", "onnx", "--output", str(onnx)], check=True,
                       capture_output=True, cwd=REPO)
        rss: dict[str, list[float]] = {"blocked": [], "imported": []}
        for _ in range(args.rounds):
            for mode in rss:
                out = subprocess.run([sys.executable, "-c", CHILD, mode, str(onnx), str(IMAGE)], check=True,
                                     capture_output=True, text=True).stdout
                rss[mode].append(json.loads(out.splitlines()[-1])["rss_mb"])
    header(argv, "onnx_service_memory.py", args.rounds, load_before)
    print("| service process | peak RSS after one prediction, MB, median [min, max] |")
    print("|---|---:|")
    print(f"| onnx, torch blocked (cxr now) | {cell(rss['blocked'], '.0f')} |")
    print(f"| onnx, torch imported (before) | {cell(rss['imported'], '.0f')} |")
    print(f"\nratio blocked / imported: {ratio_cell(rss['blocked'], rss['imported'])}")


if __name__ == "__main__":
    main()

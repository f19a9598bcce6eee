"""The video's progress strip: drawing one frame late in a long video, by column (as shipped, session 23) against one
rectangle per image so far (cxr before), whose cost grew with the video's length (quadratic over a whole video).

Each round draws ``--frames`` frames of each variant in turn, at 640x360, the frame of image ``n`` of ``n`` for each
``--images`` n. The baseline is the shipped ``render_frame`` with an empty strip, then the rectangles drawn by Pillow
as before; the two frames are checked identical first.

    python benchmarks/video_strip.py --rounds 5 --frames 20 --images 100 1000 10000
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from common import header, interleaved, loadavg, print_table, timed
from PIL import Image, ImageDraw

from cxr.video import RIGHT_COLOUR, WRONG_COLOUR, VideoItem, render_frame

W, H = 640, 360


def rectangles(item: VideoItem, history: list[bool]) -> np.ndarray:
    """cxr before session 23: the frame, then one rectangle per image so far."""
    n = len(history)
    im = Image.fromarray(render_frame(item, index=n - 1, total=n, right=1, wrong=0, threshold=0.5, history=[],
                                      size=(W, H)))
    margin, strip_h = max(8, round(H * 0.035)), max(6, round(H * 0.03))
    sy, cell, draw = H - margin // 2 - strip_h, (W - 2 * margin) / n, ImageDraw.Draw(im)
    for i, good in enumerate(history):
        left = margin + round(i * cell)
        draw.rectangle([left, sy + 1, max(left, margin + round((i + 1) * cell) - 1), sy + strip_h - 1],
                       fill=RIGHT_COLOUR if good else WRONG_COLOUR)
    return np.asarray(im)


def by_column(item: VideoItem, history: list[bool]) -> np.ndarray:
    n = len(history)
    return render_frame(item, index=n - 1, total=n, right=1, wrong=0, threshold=0.5, history=history, size=(W, H))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--images", type=int, nargs="+", default=[100, 1000, 10000])
    args = ap.parse_args(argv)
    load_before = loadavg()
    item = VideoItem("a.png", 1, 0.9, np.zeros((224, 224), np.uint8))
    rng = np.random.default_rng(0)
    variants = {}
    for n in args.images:
        history = (rng.random(n) < 0.9).tolist()
        assert np.array_equal(rectangles(item, history), by_column(item, history)), n
        for name, draw in (("by column (shipped)", by_column), ("a rectangle per image (before)", rectangles)):
            variants[f"{name}, image {n} of {n}"] = (
                lambda draw=draw, history=history: timed(lambda: [draw(item, history) for _ in range(args.frames)]
                                                         and args.frames))
    results = interleaved(variants, args.rounds, label="frames/s")
    header(argv, "video_strip.py", args.rounds, load_before)
    for n in args.images:
        rows = {k: v for k, v in results.items() if k.endswith(f"image {n} of {n}")}
        print_table(rows, {"before": f"a rectangle per image (before), image {n} of {n}"}, unit="frames/s")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])

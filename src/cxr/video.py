"""A fly-through video: each evaluated image in turn with its heatmap, prediction, probability, truth and a tally.

The video is MP4 with H.264 in yuv420p (what browsers and common players decode), written by the ffmpeg that the
``imageio-ffmpeg`` package ships, so nothing has to be installed on the system. Frames are drawn with PIL; every
image is shown for ``seconds_per_image`` by repeating its frame, which H.264 stores almost for free.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxr.config import CLASS_NAMES
from cxr.errors import UsageError, VideoError
from cxr.fileio import atomic_path, display_name, image_name
from cxr.images import heat_legend, overlay
from cxr.predict import leans_away, percent_text, prob_text, threshold_decimals
from cxr.progress import progress_bar

# Okabe-Ito colours, the light variants that read well on the dark frame; right/wrong also differ in symbol and word.
RIGHT_COLOUR = (86, 180, 233)  # sky blue
WRONG_COLOUR = (230, 159, 0)  # orange
THRESHOLD_COLOUR = (204, 121, 167)  # reddish purple
BACKGROUND = (24, 24, 24)
TEXT = (240, 240, 240)
DIM = (170, 170, 170)
MIN_FRAME = (320, 180)
MAX_FRAME = (3840, 2160)  # 4K UHD


@dataclass
class VideoItem:
    """One image of the video: its model input, heatmap and what the model said about it."""

    path: str
    label: int  # 1 = PNEUMONIA
    prob: float  # P(PNEUMONIA)
    image: np.ndarray  # (S, S) uint8
    heatmap: np.ndarray | None = None  # (S, S) in [0, 1]


def even_frame_size(width: int, height: int) -> tuple[int, int]:
    """The frame size rounded down to even numbers (yuv420p halves the chroma planes), checked against a minimum."""
    width, height = int(width), int(height)
    # Checked as given, then rounded: 3841x100 had been "3840x100 is too small", a size never asked for.
    given = f"video frame size {width}x{height}"
    if width > MAX_FRAME[0] or height > MAX_FRAME[1]:  # 100000x100000 took 22 GB and the kernel killed the process
        raise UsageError(f"{given} is too large (at most {MAX_FRAME[0]}x{MAX_FRAME[1]})")
    width, height = width - width % 2, height - height % 2
    if width < MIN_FRAME[0] or height < MIN_FRAME[1]:
        raise UsageError(f"{given} is too small (at least {MIN_FRAME[0]}x{MIN_FRAME[1]})")
    if width < height:
        raise UsageError(f"{given}: use a landscape frame (width >= height)")
    return width, height


@lru_cache(maxsize=1)
def _font_characters() -> frozenset[int]:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"))).get_charmap())


def drawable(text: str) -> str:
    """``text`` with each character that DejaVu Sans, the font of cxr's pictures, has no glyph for written as its
    escape (``\\u80f8``): empty boxes had stood for them, so that names in Chinese script were unreadable and looked
    alike, and matplotlib warned of each missing glyph."""
    chars = _font_characters()
    return "".join(c if ord(c) in chars or c == "\n" else c.encode("unicode_escape").decode("ascii") for c in text)


@lru_cache(maxsize=32)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    # DejaVu ships with matplotlib, so the same font (with the check and cross glyphs) is there on every machine.
    from matplotlib import font_manager

    path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal"))
    return ImageFont.truetype(path, size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """``text`` shortened in its middle, with an ellipsis, until it fits ``width`` pixels: a file name keeps its start
    and its end (kept its end alone, names that differ at their start had looked alike)."""
    if draw.textlength(text, font=font) <= width:
        return text
    head, tail = text[:len(text) // 2], text[len(text) // 2:]
    while (head or tail) and draw.textlength(head + "…" + tail, font=font) > width:
        if len(head) >= len(tail):
            head = head[:-1]
        else:
            tail = tail[1:]
    return head + "…" + tail


def render_frame(item: VideoItem, *, index: int, total: int, right: int, wrong: int, threshold: float,
                 history: Sequence[bool], size: tuple[int, int] = (640, 360), title: str = "",
                 decimals: int | None = None) -> np.ndarray:
    """Draw one frame.

    Args:
        item: the image and its prediction.
        index: 0-based position of this image in the video.
        total: number of images in the video.
        right, wrong: tally including this image.
        threshold: decision threshold on P(PNEUMONIA).
        history: right (True) or wrong (False) for every image so far, this one included (the strip at the bottom).
        size: (width, height), even.
        title: shown above the counter, e.g. the split's name.
        decimals: of the threshold, the same in every frame of a video (the writer passes what all its images need,
            :func:`cxr.predict.threshold_decimals`); by default, what this image needs.

    Returns:
        (height, width, 3) uint8 RGB array.
    """
    w, h = size
    im = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(im)
    margin = max(8, round(h * 0.035))
    strip_h = max(6, round(h * 0.03))
    side = min(h - 2 * margin - strip_h - margin // 2, int(w * 0.56))
    predicted = int(item.prob >= threshold)
    ok = predicted == item.label
    colour = RIGHT_COLOUR if ok else WRONG_COLOUR

    # The X-ray with its heatmap, framed in the verdict's colour.
    picture = Image.fromarray(overlay(item.image, item.heatmap, size=side))
    border = max(4, side // 60)
    draw.rectangle([margin - border, margin - border, margin + side + border - 1, margin + side + border - 1],
                   fill=colour)
    im.paste(picture, (margin, margin))

    # The text panel.
    x0 = margin * 2 + side + border
    panel_w = w - x0 - margin
    unit = max(9, min(round(h / 20), round(panel_w / 13)))
    small, normal, big = _font(max(8, round(unit * 0.75))), _font(unit), _font(round(unit * 1.5), bold=True)
    bold = _font(unit, bold=True)
    y = margin
    # The counter whole, the title shortened in its middle to the room left: a split folder's long name had pushed
    # "image 1 of 6" off every frame.
    counter = f"image {index + 1} of {total}"
    # A newline in a split folder's name had lost the video ("can't measure length of multiline text"): escaped.
    room = panel_w - round(draw.textlength("  ·  " + counter, font=small))
    head = f"{_fit(draw, drawable(display_name(title)), small, room)}  ·  {counter}" if title else counter
    draw.text((x0, y), head, font=small, fill=DIM)
    y += round(unit * 1.05)
    draw.text((x0, y), _fit(draw, drawable(image_name(item.path)), small, panel_w), font=small, fill=DIM)
    y += round(unit * 1.05)
    # The disclaimer, never shortened (on a narrow panel it takes two lines), near the top: at the bottom, a player's
    # controls covered it whenever the video was paused (the report's page, its printout, VLC).
    note = "research software, not a medical device"
    lines = [note] if draw.textlength(note, font=small) <= panel_w else ["research software,", "not a medical device"]
    if h >= 300:  # what the picture is: a chest 1.2-1.6x wider than tall, squashed, had been shown without a word
        lines += [t for t in ("the model's input: squashed to square", "input squashed to square")
                  if draw.textlength(t, font=small) <= panel_w][:1]
    line_step = max(round(unit * 0.8), round(small.size * 1.2))  # 0.8 units overlapped at the smallest font
    for line in lines:
        draw.text((x0, y), line, font=small, fill=DIM)
        y += line_step
    y += round(unit * 0.55)
    label_w = max(draw.textlength("predicted ", font=normal), draw.textlength("truth ", font=normal))
    for name, value in (("truth", CLASS_NAMES[item.label]), ("predicted", CLASS_NAMES[predicted])):
        draw.text((x0, y), name, font=normal, fill=DIM)
        draw.text((x0 + label_w, y), value, font=bold, fill=TEXT)
        y += round(unit * 1.3)
    if decimals is None:
        decimals = threshold_decimals(threshold, [item.prob])
    draw.text((x0, y), f"P(pneumonia) {prob_text(item.prob, threshold, decimals)}", font=normal, fill=TEXT)
    y += round(unit * 1.3)

    # Probability bar with the threshold marked.
    bar_w, bar_h = panel_w, max(5, unit // 2)
    draw.rectangle([x0, y, x0 + bar_w, y + bar_h], outline=DIM, width=1)
    draw.rectangle([x0, y, x0 + round(bar_w * float(np.clip(item.prob, 0, 1))), y + bar_h], fill=TEXT)
    tx = x0 + round(bar_w * threshold)
    draw.line([tx, y - 3, tx, y + bar_h + 3], fill=THRESHOLD_COLOUR, width=2)
    y += bar_h + 4
    draw.text((x0, y), f"threshold {threshold:.{decimals}f}", font=small, fill=THRESHOLD_COLOUR)
    y += round(unit * 1.4)

    verdict = "✓ RIGHT" if ok else "✗ WRONG"
    draw.text((x0, y), verdict, font=big, fill=colour)
    y += round(unit * 2.0)
    seen = right + wrong
    draw.text((x0, y), f"so far: {right} right, {wrong} wrong", font=normal, fill=TEXT)
    y += round(unit * 1.2)
    draw.text((x0, y), f"accuracy {percent_text(right / seen)}" if seen else "", font=small, fill=DIM)
    y += line_step

    # Heatmap legend, bottom of the panel (only when there is a heatmap).
    if item.heatmap is not None:
        legend_y = margin + side - round(unit * 3.4) + line_step * len(lines)  # down to where the disclaimer was
        # Below the accuracy line whatever the frame (from 180 to 234 px high the legend was drawn over it), and above
        # the progress strip (at 320x190 its "low" and "high" had run into it): on the smallest frames without them.
        ramp_h, label_h, sy = max(4, unit // 2), round(small.size * 1.2), h - margin // 2 - strip_h
        lowest = y + round(unit * 0.95)
        labels = lowest <= sy - 2 - ramp_h - 1 - label_h
        legend_y = min(max(legend_y, lowest), sy - 2 - ramp_h - (1 + label_h if labels else 0))
        ramp = heat_legend(max(2, panel_w // 2))  # as the overlay lays it over mid grey, not the bare colour map
        strip = Image.fromarray(np.repeat(ramp[None], ramp_h, axis=0))
        # All zeros: nothing raised the explained class's score (Grad-CAM's map is flat after its ReLU), which happens
        # when P lies between 0.5 and the threshold. Said, so that a plain image is not misread.
        legend = ("heatmap: flat, no region raised it" if not item.heatmap.any() else
                  # P between 0.5 and the threshold: the map is of the label, which the output leans away from
                  f"heatmap of {CLASS_NAMES[predicted]}; output leans {CLASS_NAMES[1 - predicted]}"
                  # the class it is of: a NORMAL image's bright region, "where the model looked", read as a finding
                  if leans_away(item.prob, predicted) else f"heatmap: evidence for {CLASS_NAMES[predicted]}")
        if draw.textlength(legend, font=small) > panel_w and item.heatmap.any():
            # at 640 px the long form ran off the frame ("... output leans PNEUM"): the short one
            legend = (f"map of {CLASS_NAMES[predicted]}; leans {CLASS_NAMES[1 - predicted]}"
                      if leans_away(item.prob, predicted) else f"evidence for {CLASS_NAMES[predicted]}")
        draw.text((x0, legend_y - round(unit * 0.95)), _fit(draw, legend, small, panel_w), font=small, fill=DIM)
        im.paste(strip, (x0, legend_y))
        if labels:
            draw.text((x0, legend_y + strip.height + 1), "low", font=small, fill=DIM)
            draw.text((x0 + strip.width - draw.textlength("high", font=small), legend_y + strip.height + 1), "high",
                      font=small, fill=DIM)

    # Progress strip: one cell per image so far, coloured right or wrong.
    sy = h - margin // 2 - strip_h
    draw.rectangle([margin, sy, w - margin, sy + strip_h], outline=DIM, width=1)
    frame = np.array(im)
    if len(history):
        # Cell i spans columns edges[i] .. max(edges[i], edges[i + 1] - 1); below 1 px a cell (a video of 615 images
        # or more) shares its column, which shows wrong where any of its cells is (the later cell had shown: 2 of 29
        # errors were to be seen in a video of 5,216 images). Coloured by column, not by a rectangle per cell: one
        # per image so far, in every frame, had made a video's drawing quadratic in its length.
        cell = (w - 2 * margin) / max(total, 1)
        n = len(history)
        edges = margin + np.round(np.arange(n + 1) * cell).astype(np.int64)
        first, last = edges[:n], np.maximum(edges[:n], edges[1:] - 1)
        columns = np.arange(margin, last[-1] + 1)
        wrong = ~np.asarray(history, dtype=bool)
        # each wrong cell's columns, counted with a running sum: a column is wrong where the count is above 0
        count = np.zeros(len(columns) + 1, np.int64)
        np.add.at(count, first[wrong] - margin, 1)
        np.add.at(count, last[wrong] + 1 - margin, -1)
        bad = np.cumsum(count[:-1]) > 0
        frame[sy + 1:sy + strip_h, columns] = np.where(bad[:, None], WRONG_COLOUR, RIGHT_COLOUR).astype(np.uint8)
    return frame


def write_flythrough(items: Sequence[VideoItem], path: str | os.PathLike, *, threshold: float,
                     frame_size: tuple[int, int] = (640, 360), seconds_per_image: float = 1.0, fps: float = 5.0,
                     title: str = "", crf: int = 23, poster: str | os.PathLike | None = None) -> Path:
    """Write the fly-through MP4 (H.264, yuv420p), one image after another, with a progress bar.

    Args:
        items: the images in the order shown.
        path: the ``.mp4`` to write (atomically: a failed run leaves no half-written file).
        threshold: decision threshold on P(PNEUMONIA).
        frame_size: (width, height); rounded down to even numbers.
        seconds_per_image: how long each image stays on screen.
        fps: frame rate; each image gets ``max(1, round(seconds_per_image * fps))`` identical frames.
        title: text above the counter in each frame.
        crf: x264 constant rate factor (lower is better and bigger; 23 is x264's default).
        poster: also save the first frame as a PNG here (what a page shows before the video plays).

    Returns:
        ``path``.
    """
    import imageio_ffmpeg

    if not items:
        raise UsageError("no images for the video")
    if seconds_per_image <= 0 or fps <= 0:
        raise UsageError("seconds per image and fps must be > 0")
    size = even_frame_size(*frame_size)
    repeat = max(1, round(seconds_per_image * fps))
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            writer = imageio_ffmpeg.write_frames(
                str(tmp), size, fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p", quality=None,
                macro_block_size=2, ffmpeg_log_level="error",
                # -f mp4: the temporary file's name does not end in .mp4; faststart: playable before fully loaded.
                output_params=["-crf", str(crf), "-preset", "medium", "-tune", "stillimage", "-movflags",
                               "+faststart", "-f", "mp4"])
            writer.send(None)  # starts ffmpeg
        except (OSError, RuntimeError) as e:  # no ffmpeg at all (imageio-ffmpeg ships one; a path set wrong, say)
            raise VideoError(f"cannot run ffmpeg for {path.name} ({_first_line(e)}); without it, leave the video out "
                             "(--no-video)") from None
        right = wrong = 0
        history: list[bool] = []
        decimals = threshold_decimals(threshold, [item.prob for item in items])  # one threshold text in every frame
        try:
            with progress_bar("writing video", total=len(items), unit="img") as bar:
                for i, item in enumerate(items):
                    ok = int(item.prob >= threshold) == item.label
                    right, wrong = right + ok, wrong + (not ok)
                    history.append(ok)
                    frame = render_frame(item, index=i, total=len(items), right=right, wrong=wrong,
                                         threshold=threshold, history=history, size=size, title=title,
                                         decimals=decimals)
                    if i == 0 and poster is not None:
                        with atomic_path(poster) as png:
                            Image.fromarray(frame).save(png, format="PNG")
                    data = np.ascontiguousarray(frame).tobytes()
                    try:
                        for _ in range(repeat):
                            writer.send(data)
                    except OSError as e:  # ffmpeg stopped: no H.264 encoder in this build, or no room for the file
                        raise VideoError(f"ffmpeg stopped while encoding {path.name} ({_first_line(e)}): is there an "
                                         "H.264 (libx264) encoder, and room for the file? Or leave the video out "
                                         "(--no-video)") from None
                    bar.advance(info=f"{right} right, {wrong} wrong")
        finally:
            with contextlib.suppress(Exception):  # closing a dead ffmpeg raises again; the cause is above
                writer.close()
        # imageio-ffmpeg does not look at how ffmpeg ended: one that could not write the file's end ("Error writing
        # trailer: No space left on device") had left an MP4 no player opens, put in place as a success.
        if not whole_mp4(tmp):
            raise VideoError(f"ffmpeg did not finish {path.name} (its index is missing: was there room for the "
                             "file?); nothing was written. Or leave the video out (--no-video)")
    return path


def _first_line(e: BaseException) -> str:
    """An error's first line: imageio-ffmpeg's go on with ffmpeg's whole command line and its log (a warning of one
    line had been hundreds of characters of "FFMPEG COMMAND: ...")."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def whole_mp4(path: str | os.PathLike) -> bool:
    """Whether the file is a whole MP4: top-level boxes that end exactly at its end, among them the index (``moov``)
    and the media (``mdat``); a file cut short, or one whose index ffmpeg could not write, is not."""
    seen, offset = set(), 0
    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            while offset < end:
                f.seek(offset)
                head = f.read(16)
                if len(head) < 8:
                    return False
                size, kind = int.from_bytes(head[:4], "big"), head[4:8]
                if size == 1:  # a 64-bit size follows the type
                    if len(head) < 16:
                        return False
                    size = int.from_bytes(head[8:16], "big")
                elif size == 0:  # the box runs to the end of the file
                    size = end - offset
                if size < 8:
                    return False
                seen.add(kind)
                offset += size
    except OSError:
        return False
    return offset == end and {b"moov", b"mdat"} <= seen


def probe_video(path: str | os.PathLike) -> dict:
    """Decode an MP4 back: ``codec``, ``pix_fmt``, ``size`` (width, height), ``fps`` and the decoded ``frames``."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    frames = sum(1 for _ in reader)
    return {"codec": meta.get("codec", ""), "pix_fmt": meta.get("pix_fmt", ""), "size": tuple(meta["size"]),
            "fps": meta.get("fps"), "frames": frames}

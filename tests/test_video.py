"""The fly-through video, decoded back: codec, pixel format, frame count, frame size, and what a frame shows."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cxr.demo import SAMPLE_DIR
from cxr.errors import UsageError
from cxr.images import load_image
from cxr.video import (
    RIGHT_COLOUR,
    WRONG_COLOUR,
    VideoItem,
    even_frame_size,
    prob_text,
    probe_video,
    render_frame,
    write_flythrough,
)

FILES = sorted((SAMPLE_DIR / "test" / "NORMAL").glob("*.jpeg"))[:2] + \
    sorted((SAMPLE_DIR / "test" / "PNEUMONIA").glob("*.jpeg"))[:1]


def _items() -> list[VideoItem]:
    heat = np.zeros((64, 64), np.float32)
    heat[20:40, 10:30] = 1.0
    # NORMAL right (0.1), NORMAL wrong (0.9), PNEUMONIA right (0.8) at threshold 0.5
    return [VideoItem(str(f), label, prob, load_image(f, 64), heat)
            for f, label, prob in zip(FILES, (0, 0, 1), (0.1, 0.9, 0.8), strict=True)]


def _decoded_frames(path) -> list[np.ndarray]:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    return [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]


def test_video_decodes_as_h264_with_the_expected_frames(tmp_path):
    out = write_flythrough(_items(), tmp_path / "fly.mp4", threshold=0.5, frame_size=(331, 187),
                           seconds_per_image=0.5, fps=4, poster=tmp_path / "poster.png")
    info = probe_video(out)
    assert info["codec"] == "h264"
    assert info["pix_fmt"].startswith("yuv420p")  # what browsers decode
    assert info["size"] == (330, 186)  # rounded down to even
    assert info["frames"] == 3 * 2
    assert info["fps"] == pytest.approx(4)
    assert (tmp_path / "poster.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fly.mp4", "poster.png"]  # no temporary files left

    # Each image's frame is framed in its verdict's colour: right, wrong, right.
    frames = _decoded_frames(out)
    margin = max(8, round(186 * 0.035))
    for k, expected in ((0, RIGHT_COLOUR), (2, WRONG_COLOUR), (4, RIGHT_COLOUR)):
        pixel = frames[k][186 // 3, margin - 3].astype(int)  # inside the 4-pixel border
        assert np.abs(pixel - np.array(expected)).max() < 40, (k, pixel, expected)
    # The two frames of one image are the same picture; consecutive images differ.
    assert np.abs(frames[0].astype(int) - frames[1]).mean() < 2
    assert np.abs(frames[1].astype(int) - frames[2]).mean() > 5


def test_frame_has_the_requested_size_and_tally():
    items = _items()
    right = render_frame(items[0], index=0, total=3, right=1, wrong=0, threshold=0.5, history=[True],
                         size=(640, 360), title="test")
    wrong = render_frame(items[1], index=1, total=3, right=1, wrong=1, threshold=0.5, history=[True, False],
                         size=(640, 360), title="test")
    assert right.shape == wrong.shape == (360, 640, 3) and right.dtype == np.uint8
    # The progress strip at the bottom holds one coloured cell per image shown so far.
    strip_y = 360 - max(8, round(360 * 0.035)) // 2 - max(6, round(360 * 0.03)) // 2
    assert np.abs(wrong[strip_y, 320].astype(int) - WRONG_COLOUR).max() < 5
    assert np.abs(wrong[strip_y, 100].astype(int) - RIGHT_COLOUR).max() < 5
    assert np.abs(right[strip_y, 320].astype(int) - WRONG_COLOUR).max() > 50


def _record_texts(monkeypatch) -> list[str]:
    from PIL import ImageDraw

    drawn, real_text = [], ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: drawn.append(text)
                        or real_text(self, xy, text, *a, **k))
    return drawn


def test_a_videos_tally_accuracy_strip_and_poster_follow_its_images(monkeypatch, tmp_path):
    # Nothing had checked the running tally and accuracy: wrong answers uncounted, right and wrong swapped, accuracy
    # of all the video's images rather than those so far, an image exactly at the threshold called NORMAL (in the
    # frame or in the tally), every image right in the strip, or the poster the last frame, all went unseen.
    drawn = _record_texts(monkeypatch)
    items = [VideoItem(str(f), label, prob, load_image(f, 64))
             for f, label, prob in zip(FILES, (1, 0, 0), (0.5, 0.9, 0.1), strict=True)]  # right at 0.5, wrong, right
    out = write_flythrough(items, tmp_path / "fly.mp4", threshold=0.5, frame_size=(320, 180), seconds_per_image=1,
                           fps=1, poster=tmp_path / "poster.png")
    assert [t for t in drawn if t.startswith("so far")] == \
        ["so far: 1 right, 0 wrong", "so far: 1 right, 1 wrong", "so far: 2 right, 1 wrong"], drawn
    assert [t for t in drawn if t.startswith("accuracy")] == ["accuracy 100.0%", "accuracy 50.0%", "accuracy 66.7%"]
    assert [t for t in drawn if t[:1] in "✓✗"] == ["✓ RIGHT", "✗ WRONG", "✓ RIGHT"], drawn
    first = drawn[:drawn.index("image 2 of 3")]
    i = first.index("truth")
    assert first[i:i + 4] == ["truth", "PNEUMONIA", "predicted", "PNEUMONIA"], first
    # The last frame's strip shows the second image's cell wrong, the others right.
    frames = _decoded_frames(out)
    assert len(frames) == 3
    row = frames[-1][180 - 8 // 2 - 6 // 2]  # inside the strip: margin 8, strip 6 px at 180 px high
    cell = (320 - 2 * 8) / 3
    for k, expected in ((0, RIGHT_COLOUR), (1, WRONG_COLOUR), (2, RIGHT_COLOUR)):
        pixel = row[round(8 + (k + 0.5) * cell)].astype(int)
        assert np.abs(pixel - np.array(expected)).max() < 40, (k, pixel, expected)
    # The poster is the first frame, not a later one.
    from PIL import Image

    poster = np.asarray(Image.open(tmp_path / "poster.png")).astype(int)
    assert np.abs(poster - frames[0]).mean() < 2 < np.abs(poster - frames[-1]).mean()


def test_a_frame_says_truth_prediction_and_verdict_and_draws_p_and_the_threshold_where_they_are(monkeypatch):
    # Truth and prediction swapped, the prediction shown as the truth, the verdict's words swapped, the bar filled to
    # 1 - P, or the threshold's mark at 0.5 whatever the threshold: none of these had failed a test.
    from PIL import ImageDraw

    from cxr.video import THRESHOLD_COLOUR

    drawn = _record_texts(monkeypatch)
    lines, rectangles = [], []
    real_line, real_rectangle = ImageDraw.ImageDraw.line, ImageDraw.ImageDraw.rectangle
    monkeypatch.setattr(ImageDraw.ImageDraw, "line", lambda self, xy, *a, **k: lines.append((xy, k.get("fill")))
                        or real_line(self, xy, *a, **k))
    monkeypatch.setattr(ImageDraw.ImageDraw, "rectangle", lambda self, xy, *a, **k: rectangles.append((xy, k))
                        or real_rectangle(self, xy, *a, **k))
    image = np.zeros((64, 64), np.uint8)
    for label, prob, threshold, truth, predicted, verdict in ((0, 0.9, 0.8, "NORMAL", "PNEUMONIA", "✗ WRONG"),
                                                              (1, 0.3, 0.2, "PNEUMONIA", "PNEUMONIA", "✓ RIGHT"),
                                                              (1, 0.7, 0.75, "PNEUMONIA", "NORMAL", "✗ WRONG")):
        for recorded in (drawn, lines, rectangles):
            recorded.clear()
        render_frame(VideoItem("a.png", label, prob, image), index=0, total=1, right=1, wrong=0, threshold=threshold,
                     history=[True])
        i = drawn.index("truth")
        assert drawn[i:i + 4] == ["truth", truth, "predicted", predicted], drawn
        assert verdict in drawn and ({"✓ RIGHT", "✗ WRONG"} - {verdict}).isdisjoint(drawn), drawn
        # The bar: its outline (the first outlined rectangle), then its fill, from x0 to x0 + bar_w * P.
        (x0, y0, x1, _), _ = next(r for r in rectangles if r[1].get("outline") is not None)
        bar_w = x1 - x0
        fill = next(r[0] for r in rectangles if r[0][0] == x0 and r[0][1] == y0 and r[1].get("fill") is not None)
        assert fill[2] - x0 == round(bar_w * prob), (fill, x0, bar_w, prob)
        marks = [xy for xy, colour in lines if colour == THRESHOLD_COLOUR]
        assert len(marks) == 1 and marks[0][0] == marks[0][2] == x0 + round(bar_w * threshold), (marks, x0, bar_w)


def test_a_failed_video_leaves_nothing_behind(tmp_path):
    items = _items()
    items[2].image = np.zeros((5,), np.uint8)  # not an image: drawing the third frame fails
    with pytest.raises(ValueError):
        write_flythrough(items, tmp_path / "fly.mp4", threshold=0.5, frame_size=(320, 180))
    assert list(tmp_path.iterdir()) == []


def test_ffmpeg_stopping_is_said_in_one_line(tmp_path, monkeypatch):
    # Under a file-size limit imageio-ffmpeg's error went on with ffmpeg's whole command line: "...(\n\nFFMPEG
    # COMMAND:\n/.../ffmpeg-linux-x86_64 -y -f rawvideo ...)" in a one-line warning.
    import imageio_ffmpeg

    from cxr.errors import VideoError

    def stops(path, *args, **kwargs):
        yield
        raise OSError("[Errno 27] File too large\n\nFFMPEG COMMAND:\n/x/ffmpeg -y -f rawvideo\n\nFFMPEG STDERR:\n")

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", stops)
    with pytest.raises(VideoError) as info:
        write_flythrough(_items(), tmp_path / "fly.mp4", threshold=0.5, frame_size=(320, 180), fps=2)
    assert "(" + "[Errno 27] File too large): is there an H.264" in str(info.value)
    assert "\n" not in str(info.value) and "FFMPEG" not in str(info.value)


def test_a_video_ffmpeg_could_not_finish_is_an_error_and_no_file(tmp_path, monkeypatch):
    # ffmpeg out of room for the file's end ("Error writing trailer: No space left on device") exits non-zero, which
    # imageio-ffmpeg does not look at: the cut file had been put in place and the report said it was written.
    import imageio_ffmpeg

    from cxr.errors import VideoError
    from cxr.video import whole_mp4

    real = imageio_ffmpeg.write_frames

    def cut_short(path, *args, **kwargs):
        writer = real(path, *args, **kwargs)
        writer.send(None)
        try:
            while True:
                writer.send((yield))
        finally:
            writer.close()
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)

    good = write_flythrough(_items(), tmp_path / "good.mp4", threshold=0.5, frame_size=(320, 180), fps=2)
    assert whole_mp4(good)
    monkeypatch.setattr(imageio_ffmpeg, "write_frames", cut_short)
    with pytest.raises(VideoError, match="ffmpeg did not finish fly.mp4"):
        write_flythrough(_items(), tmp_path / "fly.mp4", threshold=0.5, frame_size=(320, 180), fps=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.mp4"]
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert not whole_mp4(tmp_path / "empty.mp4") and not whole_mp4(tmp_path / "none.mp4")
    # Boxes that end at the file's end are not enough: without the index (moov) no player opens it.
    ftyp = (24).to_bytes(4, "big") + b"ftypisom" + bytes(12)
    mdat = (0).to_bytes(4, "big") + b"mdat" + b"x" * 100  # size 0: the box runs to the end of the file
    (tmp_path / "no-index.mp4").write_bytes(ftyp + mdat)
    (tmp_path / "indexed.mp4").write_bytes(ftyp + (8).to_bytes(4, "big") + b"moov" + mdat)
    assert not whole_mp4(tmp_path / "no-index.mp4") and whole_mp4(tmp_path / "indexed.mp4")


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(UsageError, match="too small"):
        even_frame_size(100, 60)
    with pytest.raises(UsageError, match="landscape"):
        even_frame_size(360, 640)
    for width, height in ((100_000, 100_000), (7680, 1080), (3840, 2162)):  # 100000² had taken 22 GB, then a kill
        with pytest.raises(UsageError, match="too large"):
            even_frame_size(width, height)
    assert even_frame_size(3840, 2160) == (3840, 2160)
    with pytest.raises(UsageError, match=r"^video frame size 3841x100 is too large"):  # as given: "3840x100 too small"
        even_frame_size(3841, 100)
    with pytest.raises(UsageError, match="no images"):
        write_flythrough([], tmp_path / "x.mp4", threshold=0.5)
    assert even_frame_size(641, 361) == (640, 360)
    # Too low though wide enough, and a square frame (landscape includes it): each had passed unchecked.
    with pytest.raises(UsageError, match=r"^video frame size 1000x100 is too small"):
        even_frame_size(1000, 100)
    assert even_frame_size(400, 400) == (400, 400)
    # A rate or duration of 0: refused, not a video of one frame an image or an ffmpeg error.
    item = VideoItem("a.png", 1, 0.9, np.zeros((64, 64), np.uint8))
    for kw in ({"fps": 0.0}, {"seconds_per_image": 0.0}):
        with pytest.raises(UsageError, match="must be > 0"):
            write_flythrough([item], tmp_path / "x.mp4", threshold=0.5, frame_size=(320, 180), **kw)
    assert list(tmp_path.iterdir()) == []


def test_probabilities_never_read_as_certain():
    assert prob_text(0.99999) == ">0.999"
    assert prob_text(0.00001) == "<0.001"
    assert prob_text(0.5) == "0.500"


def test_probabilities_at_the_edge_of_three_decimals_never_read_as_certain():
    # 0.9995 as a double is a little above 0.9995: it had read "1.000" (alone, and beside a threshold), where 0.9996
    # read ">0.999". What is shown is judged, not the number: nothing below 1 reads 1.000, nothing above 0 reads 0.000.
    for t in (None, 0.5, 0.99):
        assert [prob_text(p, t) for p in (0.9995, 0.9996, 0.99949999)] == [">0.999", ">0.999", "0.999"], t
        assert [prob_text(p, t) for p in (0.0005, 0.0004, 0.0004999)] == ["0.001", "<0.001", "<0.001"], t
    assert prob_text(1.0) == ">0.999" and prob_text(0.0) == "<0.001"
    import random

    rng = random.Random(0)
    for p in [rng.uniform(0.999, 1) for _ in range(2000)] + [rng.uniform(0, 0.001) for _ in range(2000)]:
        assert prob_text(p) not in ("1.000", "0.000") and prob_text(p, 0.5) not in ("1.000", "0.000"), p


def test_rates_scores_and_leanings_at_their_edges():
    # A running accuracy of 99,999 in 100,000 needs three decimals, not ">99.99%"; an AUROC 1e-13 below 1 is float
    # rounding of a perfect one (no count of images makes it), not ">0.999999"; P exactly 0.5 leans neither way, so a
    # map of either class is not said to be of a class the output leans away from.
    from cxr.predict import leans_away, percent_text, score_text

    assert [percent_text(x) for x in (0.99999, 0.00001, 0.999999)] == ["99.999%", "0.001%", "99.9999%"]
    assert [score_text(x) for x in (1 - 1e-13, 1e-13, 1 - 1e-11)] == ["1.000", "0.000", ">0.999999"]
    assert [leans_away(0.5, 1), leans_away(0.5, 0), leans_away(0.4999, 1), leans_away(0.5001, 0)] == \
        [False, False, True, True]


def test_a_probability_and_its_threshold_shown_compare_as_they_do():
    # At three decimals, the bundled model's threshold 0.57463 showed as 0.575 and P = 0.5746 as 0.575, labelled
    # NORMAL: "P 0.575 < threshold 0.575". Both now get the decimals it takes, in every picture that shows both.
    from cxr.predict import threshold_decimals

    t = 0.57463
    assert [threshold_decimals(t, [p]) for p in (0.5745, 0.57455, 0.5746, 0.123, 0.5747)] == [4, 5, 5, 3, 3]
    assert (prob_text(0.5745, t, 4), f"{t:.4f}") == ("0.5745", "0.5746")
    from cxr.predict import threshold_text  # alone: never 0 or 1 unless it is (a fine-tuned run's read "1.000")

    assert [threshold_text(x) for x in (t, 0.99996, 0.0000004, 1.0, 0.0)] == ["0.575", "0.99996", "0.0000004",
                                                                              "1.000", "0.000"]
    assert (prob_text(0.57455, t, 5), prob_text(0.5747, t, 5)) == ("0.5746", "0.575")  # no more decimals than needed
    # A float32 probability just under a --threshold of 0.031: equal to 8 decimals (where the loop stopped), not to 9.
    p32 = float(np.float32(0.031))
    assert (prob_text(p32, 0.031, threshold_decimals(0.031, [p32])), threshold_decimals(0.031, [p32])) == \
        ("0.030999999", 9)
    rng = np.random.default_rng(0)
    for threshold in (0.57463, 0.5741, 0.5, 0.0625, 0.9):
        probs = np.clip(threshold + rng.normal(0, 1e-3, 400), 0, 1)
        d = threshold_decimals(threshold, probs)
        for p in probs:
            shown = prob_text(p, threshold, d)
            if shown[0] not in "<>":
                assert (float(shown) >= float(f"{threshold:.{d}f}")) == (p >= threshold), (p, threshold, d, shown)

def test_a_frame_shows_the_probability_and_threshold_with_the_decimals_they_need(monkeypatch):
    from PIL import ImageDraw

    drawn, real_text = [], ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: drawn.append(text)
                        or real_text(self, xy, text, *a, **k))
    item = VideoItem("a.png", 1, 0.57455, np.zeros((64, 64), np.uint8))
    render_frame(item, index=0, total=1, right=0, wrong=1, threshold=0.57463, history=[False])
    assert "P(pneumonia) 0.5746" in drawn and "threshold 0.57463" in drawn, drawn


def test_every_frame_of_a_video_shows_the_threshold_alike(monkeypatch, tmp_path):
    # The decimals were chosen per frame: 0.575 beside P 0.100, 0.57463 beside P 0.57455, in one video.
    from PIL import ImageDraw

    drawn, real_text = [], ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: drawn.append(text)
                        or real_text(self, xy, text, *a, **k))
    items = _items()
    items[1].prob = 0.57455
    write_flythrough(items, tmp_path / "fly.mp4", threshold=0.57463, frame_size=(320, 180), seconds_per_image=0.2,
                     fps=5)
    assert [t for t in drawn if t.startswith("threshold ")] == ["threshold 0.57463"] * 3, drawn
    assert "P(pneumonia) 0.100" in drawn and "P(pneumonia) 0.5746" in drawn


def test_a_video_of_more_images_than_its_strip_has_pixels_is_drawn():
    # 615 images or more at 640x360: a cell of the progress strip was under a pixel wide, and Pillow refused the
    # rectangle (x1 < x0), which ended `cxr report --video-select all` on the 624 images of Kermany's test split.
    item = VideoItem("a.png", 1, 0.9, np.zeros((64, 64), np.uint8))
    history = [i % 3 > 0 for i in range(700)]
    frame = render_frame(item, index=699, total=700, right=466, wrong=234, threshold=0.5, history=history)
    strip_row = frame[-12]  # inside the strip, near the frame's bottom
    colours = {tuple(c) for c in strip_row}
    assert tuple(RIGHT_COLOUR[:3]) in colours and tuple(WRONG_COLOUR[:3]) in colours, colours


def test_the_progress_strip_colours_each_images_cell_as_a_rectangle_per_image_did():
    # Drawn by column now (a rectangle per image so far, in every frame, was quadratic in the video's length): the
    # same pixels as the rectangles drawn, the wrong ones over the right ones, for cells wider and narrower than 1 px.
    # (Drawn in order, later over earlier, a column shared by several images had hidden their errors: 2 of 29 were
    # to be seen in a video of 5,216 images.)
    from PIL import Image, ImageDraw

    item = VideoItem("a.png", 1, 0.9, np.zeros((64, 64), np.uint8))
    rng = np.random.default_rng(0)
    for size in ((640, 360), (320, 190)):
        w, h = size
        margin, strip_h = max(8, round(h * 0.035)), max(6, round(h * 0.03))
        sy = h - margin // 2 - strip_h
        for total, n in ((1, 1), (7, 3), (616, 616), (700, 351), (5000, 4999)):
            history = (rng.random(n) < 0.8).tolist()
            kw = {"index": n - 1, "total": total, "right": 1, "wrong": 0, "threshold": 0.5, "size": size}
            frame = render_frame(item, history=history, **kw)
            im = Image.fromarray(render_frame(item, history=[], **kw))  # the frame with an empty strip
            draw, cell = ImageDraw.Draw(im), (w - 2 * margin) / total
            for i, good in sorted(enumerate(history), key=lambda c: not c[1]):  # the right ones first
                left = margin + round(i * cell)
                draw.rectangle([left, sy + 1, max(left, margin + round((i + 1) * cell) - 1), sy + strip_h - 1],
                               fill=RIGHT_COLOUR if good else WRONG_COLOUR)
            assert (frame != np.asarray(im)).sum() == 0, f"{size}, {n} of {total}"
    # One wrong image among thousands is still to be seen.
    history = [True] * 5216
    history[1234] = False
    frame = render_frame(item, history=history, index=5215, total=5216, right=5215, wrong=1, threshold=0.5)
    assert sum(tuple(c) == tuple(WRONG_COLOUR[:3]) for c in frame[-12]) == 1


def test_a_row_of_an_npz_is_named_by_its_file_and_row(monkeypatch):
    # Pictures of `.npz` images were captioned "3" (Path("/d/x.npz#test/3").name).
    from PIL import ImageDraw

    from cxr.fileio import image_name

    assert image_name("/d/x.npz#test/3") == "x.npz#test/3"
    assert image_name("/d/scan#1.png") == "scan#1.png" and image_name("/d/a#b/3") == "3"  # not an .npz: its name
    drawn, real_text = [], ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: drawn.append(text)
                        or real_text(self, xy, text, *a, **k))
    render_frame(VideoItem("/d/x.npz#test/3", 0, 0.2, np.zeros((64, 64), np.uint8)), index=0, total=1, right=1,
                 wrong=0, threshold=0.5, history=[True])
    assert "x.npz#test/3" in drawn, drawn


def test_a_flat_heatmap_is_said_to_be_flat(monkeypatch):
    # Below a threshold under 0.5, nothing raises the PNEUMONIA score of an image at P = 0.38: Grad-CAM's map is all
    # zeros, and the frame showed a plain X-ray under "heatmap: where the model looked".
    from PIL import ImageDraw

    drawn, real_text = [], ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: drawn.append(text)
                        or real_text(self, xy, text, *a, **k))
    image = np.zeros((64, 64), np.uint8)
    # A map that is not flat, of a label the output leans away from (P 0.38, PNEUMONIA by the threshold 0.31), had
    # read as the label's reason: it says which way the output leans.
    for heat, prob, legend in ((np.zeros((64, 64), np.float32), 0.38, "heatmap: flat, no region raised it"),
                               (np.eye(64, dtype=np.float32), 0.38, "map of PNEUMONIA; leans NORMAL"),
                               # the class it is of ("where the model looked" left a NORMAL image's map unnamed)
                               (np.eye(64, dtype=np.float32), 0.9, "heatmap: evidence for PNEUMONIA")):
        drawn.clear()
        render_frame(VideoItem("a.png", 1, prob, image, heat), index=0, total=1, right=1, wrong=0, threshold=0.31,
                     history=[True])
        # the legend whole, in the frame's words (at 640 px the long form had run off the frame's edge)
        assert any(t.endswith(legend) and "…" not in t for t in drawn), drawn
    from cxr.report import GridTile, plot_grid

    fig = plot_grid({"right": [GridTile(image, np.zeros((64, 64), np.float32), 1, 0.38, "a.png"),
                               GridTile(image, np.eye(64, dtype=np.float32), 1, 0.38, "b.png"),
                               GridTile(image, np.eye(64, dtype=np.float32), 1, 0.9, "c.png")]}, 0.31, "test")
    titles = [ax.get_title() for sub in fig.subfigs for ax in sub.axes if ax.get_title()]
    assert titles[0].endswith("heatmap flat: no region raised it"), titles
    assert titles[1].endswith("map of PNEUMONIA; leans NORMAL") and "leans" not in titles[2], titles
    # Each title's lines no wider than the flat note's, which fits its tile (the long form ran into the next one).
    assert max(len(line) for t in titles for line in t.splitlines()) <= len("heatmap flat: no region raised it")


def test_the_video_writer_does_not_load_torch():
    # cxr.video drew its overlays with cxr.explain's, which loads torch (2 s and some 450 MB) for numpy work.
    import subprocess
    import sys

    code = "import sys, cxr.video, cxr.report; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize("size", [(640, 360), (1280, 720), (480, 360), (320, 240)])
def test_the_disclaimer_is_clear_of_a_players_controls_and_no_text_overlaps(monkeypatch, size):
    # At the panel's foot, the disclaimer lay under the controls a player draws over a paused video (the report's page,
    # its printout): it goes near the top, and the frame's texts still do not run into each other.
    from PIL import ImageDraw

    boxes, real_text = [], ImageDraw.ImageDraw.text

    def record(self, xy, text, *a, **k):
        if text:
            boxes.append((text, self.textbbox(xy, text, font=k.get("font"))))
        return real_text(self, xy, text, *a, **k)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    # A split folder's long name as the title had pushed the counter off the frame: the title gives way.
    for heat, title in ((np.eye(64, dtype=np.float32), "test"), (None, "test"),
                        (None, "hospital_A_external_validation_cohort_2024_full_resolution"),
                        (None, "test\nb")):  # a newline in a split folder's name had lost the whole video
        boxes.clear()
        render_frame(VideoItem("a.png", 1, 0.38, np.zeros((64, 64), np.uint8), heat), index=0, total=1, right=1,
                     wrong=0, threshold=0.31, history=[True], size=size, title=title)
        assert boxes[0][0].startswith(title[:4]) and boxes[0][0].endswith("  ·  image 1 of 1"), boxes[0]
        assert "\n" not in boxes[0][0] and ("\\n" in boxes[0][0]) is ("\n" in title)
        note = [box for text, box in boxes if "research software" in text or "medical device" in text]
        assert note and max(box[3] for box in note) < size[1] / 2, boxes
        assert all(b[0] >= 0 and b[1] >= 0 and b[2] <= size[0] and b[3] <= size[1] for _, b in boxes), boxes
        overlaps = [(s, t) for i, (s, a) in enumerate(boxes) for t, b in boxes[i + 1:]
                    if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]]
        assert not overlaps, overlaps


def test_the_heatmap_legend_stays_below_the_tally_on_small_frames(monkeypatch):
    # From 180 to 234 px high, the legend ("heatmap: ...") was drawn over the "accuracy" line; then, moved below it,
    # its "low" and "high" into the progress strip. And "accuracy 100.0%" was drawn beside one wrong of 2500.
    from PIL import ImageDraw

    boxes, real_text = [], ImageDraw.ImageDraw.text

    def record(self, xy, text, *a, **k):
        if text:
            boxes.append((self.textbbox(xy, text, font=k.get("font")), text))
        return real_text(self, xy, text, *a, **k)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    heat = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    for size in ((320, 180), (320, 190), (320, 194), (408, 230), (702, 234), (640, 360), (1000, 180)):
        for prob, label in ((0.9, 1), (0.52, 1), (0.1, 0)):
            boxes.clear()
            render_frame(VideoItem("/d/x.png", label, prob, np.zeros((64, 64), np.uint8), heat), index=0, total=3,
                         right=1, wrong=0, threshold=0.55, history=[True], size=size)
            strip_top = size[1] - max(8, round(size[1] * 0.035)) // 2 - max(6, round(size[1] * 0.03))
            for i, (a, text_a) in enumerate(boxes):
                assert a[3] <= strip_top, (size, text_a)  # "low" and "high" had run into the progress strip
                for b, text_b in boxes[i + 1:]:
                    assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (size, text_a, text_b)
    boxes.clear()
    render_frame(VideoItem("/d/x.png", 1, 0.9, np.zeros((64, 64), np.uint8), None), index=2499, total=2500,
                 right=2499, wrong=1, threshold=0.5, history=[True] * 2499 + [False])
    assert "accuracy 99.96%" in [text for _, text in boxes]


def test_an_image_is_shown_for_the_rounded_number_of_frames_the_report_says(tmp_path):
    # 0.3 s an image at 5 fps is 1.5 frames: rounded to 2, as the report's caption says (0.4 s an image). Cut down to
    # 1 frame, each image would be shown half as long as the caption says.
    image = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    items = [VideoItem(f"{i}.png", i % 2, 0.2 + 0.3 * i, image) for i in range(3)]
    out = write_flythrough(items, tmp_path / "fly.mp4", threshold=0.5, frame_size=(320, 180), seconds_per_image=0.3,
                           fps=5)
    assert probe_video(out)["frames"] == 3 * round(0.3 * 5) == 6
    # 0.05 s an image at 5 fps rounds to 0 frames: each image still gets one (none at all had made an empty video).
    out = write_flythrough(items, tmp_path / "short.mp4", threshold=0.5, frame_size=(320, 180),
                           seconds_per_image=0.05, fps=5)
    assert probe_video(out)["frames"] == 3

"""The report from a run's artifacts: numbers, example choice, every picture, the video, and report.html in a browser.

The run directory is made from artifacts (the real writers, real X-rays, a tiny untrained DenseNet), not by training.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.config import load_config, save_config
from cxr.demo import SAMPLE_DIR
from cxr.errors import UsageError
from cxr.evaluate import SplitResult, write_evaluation
from cxr.model import Checkpoint, build_model, load_checkpoint, save_checkpoint
from cxr.report import (
    DISCLAIMER,
    PICTURES_LIST,
    SplitPredictions,
    bin_intervals,
    expected_calibration_error,
    load_artifacts,
    make_report,
    margin,
    pick_video_indices,
    plot_calibration,
    plot_confusion,
    plot_roc_pr,
    reliability_bins,
    select_examples,
)
from cxr.video import probe_video

THRESHOLD = 0.6
VIDEO = {"frame_size": (320, 180), "video_max_images": 5, "seconds_per_image": 0.4, "fps": 5.0}


def _split(name: str, folder: str, per_class: int, rng: np.random.Generator) -> SplitResult:
    paths, labels = [], []
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        files = sorted((SAMPLE_DIR / folder / cls).glob("*.jpeg"))[:per_class]
        paths += [str(f) for f in files]
        labels += [label] * len(files)
    labels = np.array(labels)
    # Mostly right, some confidently wrong: every group of the example grid has members.
    probs = np.clip(np.where(labels == 1, 0.8, 0.25) + rng.normal(0, 0.25, len(labels)), 0.001, 0.999)
    return SplitResult(name, paths, labels, probs)


def make_run(root: Path) -> Path:
    """A run directory as train.py leaves it: config, summary, history, best.pt, metrics and predictions."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    cfg = load_config(overrides={"image_size": 64, "epochs": 3, "weights": "none", "output": str(root)})
    save_config(cfg, root / "config.yaml")
    torch.manual_seed(0)
    save_checkpoint(Checkpoint("densenet121", build_model("densenet121").state_dict(), cfg, threshold=THRESHOLD,
                               epoch=2), root / "best.pt")
    (root / "history.csv").write_text(
        "epoch,lr,train_loss,train_acc,val_loss,val_acc,val_auroc,seconds,images_per_s\n"
        "1,0.001,0.70,0.55,0.65,0.60,0.70,5.0,40\n"
        "2,0.0007,0.50,0.75,0.45,0.80,0.85,5.0,40\n"
        "3,0.0001,0.40,0.82,0.50,0.78,0.86,5.0,40\n")
    results = [_split("train", "train", 10, rng), _split("val", "train", 6, rng), _split("test", "test", 8, rng)]
    write_evaluation(root, results, THRESHOLD, n_boot=50)
    counts = {r.name: {"NORMAL": int((r.labels == 0).sum()), "PNEUMONIA": int((r.labels == 1).sum())}
              for r in results}
    broken = {"path": "/data/broken-scan.jpeg", "reason": "/data/broken-scan.jpeg: truncated JPEG"}
    summary = {"counts": counts, "unreadable": {"train": [broken], "val": [], "test": []},
               "stop_reason": "finished 3 epochs", "epochs_run": 3, "best_epoch": 2, "device": "cpu"}
    (root / "summary.json").write_text(json.dumps(summary))
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("report") / "run")
    return make_report(run, device="cpu", **VIDEO)


# ------------------------------------------------------------------------------------------------ numbers


def test_expected_calibration_error_by_hand():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([0.1, 0.9, 0.8, 0.3])  # one image per bin: gaps 0.1, 0.1, 0.2, 0.3
    assert expected_calibration_error(labels, probs) == pytest.approx(0.175)
    # Two images in one bin: mean probability 0.525 against frequency 0.5.
    assert expected_calibration_error(np.array([0, 1]), np.array([0.5, 0.55])) == pytest.approx(0.025)
    # Calibrated by construction: in each bin the share of positives equals the mean probability.
    probs = np.repeat([0.25, 0.75], 4)
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert expected_calibration_error(labels, probs) == pytest.approx(0.0)
    conf, freq, count = reliability_bins(labels, probs)
    np.testing.assert_allclose(conf, [0.25, 0.75])
    np.testing.assert_allclose(freq, [0.25, 0.75])
    assert count.tolist() == [4, 4]
    assert expected_calibration_error(np.array([1]), np.array([1.0])) == 0.0  # 1.0 falls in the last bin


def test_reliability_bins_carry_wilson_intervals_that_widen_as_bins_empty():
    def wilson(k, n, z=1.959963984540054):  # the textbook formula, written out
        p = k / n
        centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)

    freq, count = np.array([0.25, 0.0, 1.0, 0.5]), np.array([4, 2, 1, 500])
    lo, hi = bin_intervals(freq, count)
    for i, (f, n) in enumerate(zip(freq, count, strict=True)):
        assert (lo[i], hi[i]) == pytest.approx(wilson(f * n, n), abs=1e-9)
        assert lo[i] <= f <= hi[i]
    assert hi[1] - lo[1] > 0.6 and hi[3] - lo[3] < 0.1  # 2 images say little, 500 a lot

    # The diagram draws them: one error bar per non-empty bin.
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=200)
    preds = SplitPredictions("val", [f"{i}.png" for i in range(200)], (rng.uniform(size=200) < probs).astype(int),
                             probs)
    fig = plot_calibration([preds])
    (bars,) = [c for c in fig.axes[0].containers if type(c).__name__ == "ErrorbarContainer"]
    _, _, (segments,) = bars.lines
    conf, freq, count = reliability_bins(preds.labels, preds.probs)
    lo, hi = bin_intervals(freq, count)
    ends = np.array([[seg[0][0], seg[0][1], seg[1][1]] for seg in segments.get_segments()])  # x, y low, y high
    assert len(ends) == len(conf) == 10
    np.testing.assert_allclose(ends, np.column_stack([conf, lo, hi]), atol=1e-12)

    # Two splits: the points at their bins' confidences, the bars side by side, each in its split's line style.
    train = SplitPredictions("train", preds.paths, preds.labels, np.clip(probs + 0.01, 0, 1))
    fig = plot_calibration([train, preds])
    bars = [c for c in fig.axes[0].containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == 2
    xs = [np.array([seg[0][0] for seg in b.lines[2][0].get_segments()]) for b in bars]
    np.testing.assert_allclose(xs[0], reliability_bins(train.labels, train.probs)[0] - 0.005, atol=1e-12)
    np.testing.assert_allclose(xs[1], conf + 0.005, atol=1e-12)
    points = {line.get_label().split(":")[0]: line for line in fig.axes[0].get_lines()}
    np.testing.assert_allclose(points["val"].get_xdata(), conf, atol=1e-12)
    styles = [b.lines[2][0].get_linestyle()[0] for b in bars]
    assert styles[0] != styles[1]  # train and val are drawn in different line styles, bars included


def test_roc_pr_legend_keys_look_like_what_is_drawn():
    # The legend showed a hollow circle for operating points drawn as squares, triangles or diamonds, and a grey
    # chance line where the precision-recall panel draws each split's in its colour (purple for a single evaluated
    # folder, whose name is not train, val or test).
    from matplotlib.colors import to_hex
    from matplotlib.lines import Line2D

    def looks(lines) -> tuple[set, set]:
        lines = list(lines)
        return ({(line.get_linestyle(), to_hex(line.get_color())) for line in lines if line.get_linestyle() != "None"},
                {(line.get_marker(), to_hex(line.get_markerfacecolor())) for line in lines
                 if line.get_marker() not in ("None", "", None)})

    rng = np.random.default_rng(0)
    labels = (rng.uniform(size=60) < 0.5).astype(int)
    probs = np.clip(np.where(labels == 1, 0.7, 0.3) + rng.normal(0, 0.2, 60), 0, 1)
    for names in (["chest_xray"], ["val", "test"]):
        fig = plot_roc_pr([SplitPredictions(n, [f"{i}.png" for i in range(60)], labels, probs) for n in names], 0.5)
        for ax in fig.axes:
            in_legend = [line for line in ax.get_legend().findobj(Line2D) if line.get_visible()]
            drawn = [line for line in ax.get_lines() if len(line.get_xdata())]  # not empty legend proxies
            assert looks(in_legend) == looks(drawn), (names, ax.get_title())


def test_a_dollar_in_a_split_name_is_drawn_as_text(tmp_path):
    # A folder named "study$1^$" stopped the report (mathtext's ParseSyntaxException); "$\alpha$" was drawn as α.
    name = "study$1^$"
    from matplotlib.text import Text

    rng = np.random.default_rng(0)
    labels = (rng.uniform(size=40) < 0.5).astype(int)
    preds = [SplitPredictions(name, [f"{i}.png" for i in range(40)], labels, np.clip(labels * 0.6 + 0.2, 0, 1))]
    for fig in (plot_confusion([[10, 2], [3, 25]], name), plot_roc_pr(preds, 0.5), plot_calibration(preds)):
        fig.savefig(tmp_path / "f.png")  # mathtext parses while drawing
        texts = [t.get_text() for t in fig.findobj(Text)]
        assert any(name in t for t in texts), texts


def test_roc_pr_of_one_class_only_says_why_it_is_empty():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_roc_pr([SplitPredictions("normals", ["a.png", "b.png"], np.array([0, 0]), np.array([0.1, 0.7]))],
                          0.5)
    for ax in fig.axes:
        assert [t.get_text() for t in ax.texts] == ["undefined: normals holds one class only"]
    assert fig.axes[1].get_legend() is None  # it was an empty box


def test_margin_is_relative_to_the_threshold():
    np.testing.assert_allclose(margin(np.array([0.0, 0.2, 0.8, 1.0]), 0.8), [1.0, 0.75, 0.0, 1.0])


def test_select_examples_picks_informative_images():
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    probs = np.array([0.04, 0.30, 0.55, 0.99, 0.70, 0.45, 0.95, 0.02])
    groups = select_examples(labels, probs, threshold=0.5, per_group=2)
    assert groups["most confident right"] == [3, 0]  # the most confident right of each class
    assert groups["most confident wrong"] == [7, 6]  # PNEUMONIA at 0.02, NORMAL at 0.95
    assert groups["borderline"] == [5, 2]  # 0.45 and 0.55, nearest the threshold
    chosen = [i for g in groups.values() for i in g]
    assert len(chosen) == len(set(chosen))
    # A negative count was a slice's end: "at most -2" had shown all but two.
    for bad in (-2, 0, 51, 2.5):
        with pytest.raises(UsageError, match="per_group must be a whole number from 1 to 50"):
            select_examples(labels, probs, threshold=0.5, per_group=bad)


def test_select_examples_in_small_sets_keep_borderline_and_confident_apart():
    # Six validation images: the NORMAL one at 0.535, just under the threshold 0.536, was shown as "most confident
    # right" and "borderline" was empty, because the confident rows were filled first from too few images.
    labels = np.array([0, 0, 1, 1, 0, 1])
    probs = np.array([0.535, 0.10, 0.90, 0.97, 0.80, 0.20])
    groups = select_examples(labels, probs, threshold=0.536, per_group=4)
    assert groups["borderline"] == [0]
    assert groups["most confident right"] == [3, 1, 2]
    assert groups["most confident wrong"] == [5, 4]

    # Twenty sure predictions: the leftovers at 0.005 and 0.995 were shown as "borderline".
    probs = np.concatenate([np.linspace(0.001, 0.005, 10), np.linspace(0.995, 0.999, 10)])
    labels = (probs > 0.5).astype(int)
    groups = select_examples(labels, probs, threshold=0.5, per_group=4)
    assert groups["borderline"] == []
    assert groups["most confident right"] == [0, 19, 1, 18]  # two per class, the surest first

    # A large set: every borderline image is nearer the threshold than any confident one, and nearer to it than to
    # 0 or 1.
    rng = np.random.default_rng(0)
    labels = (rng.uniform(size=500) < 0.6).astype(int)
    probs = 1 / (1 + np.exp(-rng.normal(np.where(labels == 1, 4.0, -4.0), 3.0)))
    groups = select_examples(labels, probs, threshold=0.6, per_group=4)
    m = margin(probs, 0.6)
    assert len(groups["borderline"]) == 4 and max(m[groups["borderline"]]) < 0.5
    assert min(m[groups["most confident right"] + groups["most confident wrong"]]) > max(m[groups["borderline"]])

    # Every error near the threshold: they still fill the row of errors (an empty one read as "no errors"), and
    # are not shown twice.
    labels, probs = np.array([0, 0, 0, 1, 1, 1, 1, 1]), np.array([0.05, 0.1, 0.55, 0.45, 0.9, 0.95, 0.97, 0.99])
    groups = select_examples(labels, probs, threshold=0.5, per_group=4)
    assert sorted(groups["most confident wrong"]) == [2, 3] and groups["borderline"] == []


def test_an_image_at_exactly_the_threshold_is_pneumonia_in_the_grid_the_roc_marker_and_the_errors_counted():
    # Youden's threshold is always one of the validation probabilities, so a val image sits on it. The PNEUMONIA image
    # at P 0.6 with threshold 0.6 is right (P >= threshold), as metrics.json counts it, in the example grid's groups,
    # the ROC curve's operating point and the "N wrong of M" of the splits not pictured (pinned: each has its own
    # comparison, and none had been given a tie).
    from cxr.evaluate import compute_metrics
    from cxr.report import _operating_point, _other_splits_note

    labels, probs = np.array([1, 0, 0, 1, 1, 0]), np.array([0.6, 0.2, 0.9, 0.8, 0.3, 0.1])
    groups = select_examples(labels, probs, 0.6, per_group=4)
    assert sorted(groups["most confident wrong"]) == [2, 4] and groups["borderline"] == [0]
    m = compute_metrics(labels, probs, 0.6)
    assert _operating_point(labels, probs, 0.6) == pytest.approx((1 - m["specificity"], m["recall"], m["precision"]))
    assert _operating_point(labels, probs, 0.6) == pytest.approx((1 / 3, 2 / 3, 2 / 3))
    both = {name: SplitPredictions(name, [f"{i}.jpeg" for i in range(6)], labels, probs) for name in ("val", "test")}
    assert "Not pictured here: val (2 wrong of 6);" in _other_splits_note(both, "test", 0.6)


def test_select_examples_with_no_wrong_predictions():
    groups = select_examples(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8]), 0.5, per_group=4)
    assert groups["most confident wrong"] == []
    assert sorted(groups["most confident right"]) == [0, 1, 2, 3]


def test_pick_video_indices(report):
    run_like = load_artifacts(report.parent).predictions["test"]
    sample = pick_video_indices(run_like, THRESHOLD, "sample", max_images=5, seed=1)
    assert len(sample) == len(set(sample)) == 5
    assert sample == pick_video_indices(run_like, THRESHOLD, "sample", max_images=5, seed=1)
    wrong = pick_video_indices(run_like, THRESHOLD, "errors", max_images=100)
    assert wrong and all((run_like.probs[i] >= THRESHOLD) != run_like.labels[i] for i in wrong)
    assert pick_video_indices(run_like, THRESHOLD, "all") == list(range(len(run_like.paths)))
    # "all" with a limit given keeps to it (it had made an 87-minute video of 5,216 images given 20), and without
    # one to the 10,000 any video may hold; the others take 60 unless told.
    assert pick_video_indices(run_like, THRESHOLD, "all", max_images=3) == [0, 1, 2]
    many = SplitPredictions("x", ["a"] * 10_050, np.zeros(10_050, np.int64), np.full(10_050, 0.9))
    assert len(pick_video_indices(many, THRESHOLD, "all")) == 10_000
    assert [len(pick_video_indices(many, THRESHOLD, s)) for s in ("sample", "errors")] == [60, 60]
    # The default, sample, draws at random: a split listed 100 NORMAL then 100 PNEUMONIA (as a folder scan lists it)
    # gives both classes among the 60 (pinned: the first 60 in file order would be NORMAL alone).
    labels = np.repeat([0, 1], 100)
    ordered = SplitPredictions("x", [f"{i}.jpeg" for i in range(200)], labels, np.full(200, 0.4))
    picked = pick_video_indices(ordered, 0.5)
    assert len(picked) == len(set(picked)) == 60 and 10 < labels[picked].sum() < 50
    with pytest.raises(UsageError):
        pick_video_indices(run_like, THRESHOLD, "best")


# ------------------------------------------------------------------------------------------------ report


def test_report_writes_every_picture(report):
    pics = report.parent / "report"
    expected = {"history.png", "confusion_train.png", "confusion_val.png", "confusion_test.png", "roc_pr.png",
                "calibration.png", "grid_test.png", "flythrough_test.png", "flythrough_test.mp4"}
    assert {p.name for p in pics.iterdir()} == expected | {PICTURES_LIST}
    assert set(json.loads((pics / PICTURES_LIST).read_text())) == expected  # what a later report may remove
    for p in pics.glob("*.png"):
        with Image.open(p) as im:
            im.verify()
            assert im.width >= 300 and im.height >= 150, p.name


def test_report_html_is_self_contained(report):
    page = report.read_text()
    pics = report.parent / "report"
    assert DISCLAIMER in page
    # Every picture and the video are embedded byte for byte: the page needs nothing beside it.
    for p in pics.iterdir():
        if p.name != PICTURES_LIST:
            assert base64.b64encode(p.read_bytes()).decode() in page, p.name
    sources = re.findall(r"""(?:src|href|poster)=['"]([^'"]*)['"]""", page)
    assert sources and all(s.startswith(("data:", "#")) for s in sources)
    assert "http://" not in page and "https://" not in page
    # Tables: counts, metrics with intervals, the unreadable file, the config.
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert f"{metrics['test']['accuracy']:.3f}" in page
    assert f"{metrics['test']['ci95']['auroc'][0]:.3f}" in page
    assert "/data/broken-scan.jpeg" in page and "finished 3 epochs" in page
    assert "<li>train: /data/broken-scan.jpeg: truncated JPEG</li>" in page  # its path once (the reason names it too)
    assert "image_size: 64" in page and "resolved config (config.yaml)" in page
    assert "model evaluated" not in page  # a training run's metrics name no model: the run's own best.pt
    # The grid pictures test: the splits it leaves out are named, with their errors (one train error had gone unseen)
    wrong = {}
    for split in ("train", "val"):
        with open(report.parent / f"predictions_{split}.csv", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        wrong[split] = (sum(r["predicted"] != r["label"] for r in rows), len(rows))
    assert (f"Not pictured here: train ({wrong['train'][0]} wrong of {wrong['train'][1]}), val ({wrong['val'][0]} "
            f"wrong of {wrong['val'][1]}); <code>cxr report DIR --split NAME</code>") in page


def test_the_metrics_table_shows_every_interval_and_says_how_the_threshold_was_set(tmp_path, report):
    # Pinned: every metric with an interval in metrics.json shows it in its cell (sensitivity's is stored under
    # "sensitivity", the table's column under "recall": a lookup by the column's name alone leaves it out), a training
    # run's page says its val row is optimistic, and an evaluation with --threshold says the threshold was set by hand.
    from cxr.predict import score_text
    from cxr.report import _metrics_html

    art = load_artifacts(report.parent)
    page = _metrics_html(art, ["train", "val", "test"], True, "0.600")
    rows = dict(re.findall(r"<tr><th scope='row'>(\w+)</th>(.*?)</tr>", page))
    columns = ("n", "accuracy", "sensitivity", "specificity", "precision", "f1", "auroc", "auprc", "ece")
    for split in ("train", "val", "test"):
        cells = dict(zip(columns, re.findall(r"<td class='num'>(.*?)</td>", rows[split]), strict=True))
        ci95 = art.metrics[split]["ci95"]
        assert {"sensitivity", "specificity", "auroc"} <= set(ci95)
        for key, interval in ci95.items():
            if interval is not None:
                lo, hi = interval
                assert f"<span class='ci'>{score_text(lo)}–{score_text(hi)}</span>" in cells[key], (split, key)
    assert "chosen on this run's validation split, so the val row is optimistic" in page
    # An interval of one point, as metrics.json of cxr before session 26 wrote a bootstrap every resample of which
    # was perfect, is shown as none, as the note says (it had read 1.000–1.000 under it).
    art.metrics["test"].update(auroc=1.0, ci95={**art.metrics["test"]["ci95"], "auroc": [1.0, 1.0]})
    page = _metrics_html(art, ["test"], True, "0.600")
    cells = dict(zip(columns, re.findall(r"<td class='num'>(.*?)</td>", page), strict=True))
    assert cells["auroc"] == "1.000" and "<span class='ci'>" in cells["sensitivity"]
    labels = np.array([0] * 5 + [1] * 5)
    write_evaluation(tmp_path, [SplitResult(s, [f"/x/{s}{i}.jpeg" for i in range(10)], labels,
                                            np.linspace(0.05, 0.95, 10)) for s in ("val", "test")], 0.3, n_boot=10,
                     extra={s: {"threshold_source": "given"} for s in ("val", "test")})
    for own_config in (True, False):
        page = _metrics_html(load_artifacts(tmp_path), ["val", "test"], own_config, "0.300")
        assert "At decision threshold P(pneumonia) ≥ 0.300, set by hand (--threshold). " in page
        assert "optimistic" not in page


def test_report_video_decodes(report):
    info = probe_video(report.parent / "report" / "flythrough_test.mp4")
    assert info["codec"] == "h264" and info["pix_fmt"].startswith("yuv420p")
    assert info["size"] == VIDEO["frame_size"]
    assert info["frames"] == VIDEO["video_max_images"] * round(VIDEO["seconds_per_image"] * VIDEO["fps"])


def test_report_for_an_evaluation_folder(tmp_path, report, caplog):
    """`cxr evaluate` output: metrics (naming the model) and predictions only; the model may be gone since."""
    from cxr.export import model_id

    run = report.parent
    real = model_id(load_checkpoint(run / "best.pt"))
    for with_model in (True, False):
        folder = tmp_path / f"eval-{with_model}"
        folder.mkdir()
        for f in run.glob("predictions_*.csv"):
            shutil.copy(f, folder)
        # As `cxr evaluate` writes it; model_id is absent from the files of earlier versions.
        model = run / "best.pt" if with_model else tmp_path / "deleted.pt"
        named = {"model": str(model), **({"model_id": real, "data": "/xrays/test"} if with_model else {})}
        metrics = {s: {**m, **named} for s, m in json.loads((run / "metrics.json").read_text()).items()}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        text = make_report(folder, video=False, device="cpu").read_text()
        assert "Training curves" not in text and "Fly-through" not in text
        assert "Examples" in text and "ROC and precision-recall" in text
        assert "Wilson score for accuracy" in text  # how write_evaluation's intervals were made
        assert ("without heatmaps" in text) is not with_model
        assert f"model evaluated: {model}" + (f" (model_id {real})" if with_model else "") in text
        assert "another model" not in text
        assert ("data evaluated: /xrays/test" in text) is with_model
        # The config comes from the model's checkpoint when it is there, and says it is the training run's: its data
        # and output are not the evaluation's. It was shown as "resolved config (config.yaml)".
        assert ("image_size: 64" in text) is with_model
        assert "resolved config (config.yaml)" not in text
        assert ("Training configuration of the model" in text and f"From the checkpoint {model}" in text) is with_model

    # With heatmaps off the model only sets the image size: no word of heatmaps from it.
    caplog.clear()
    with caplog.at_level("INFO", logger="cxr.report"):
        text = make_report(tmp_path / "eval-True", video=False, heatmaps=False, device="cpu").read_text()
    assert "heatmaps from" not in caplog.text and "heatmaps off" in text and "Grad-CAM" not in text
    assert "Training configuration of the model" in text

    # --model names another model than the one measured (model_id 0123456789ab), or the file the evaluation named
    # has changed since (a run resumed): said, on the page and in the log. The second had been drawn without a word.
    for measured, given in itertools.product(("0123456789ab", real), (run / "best.pt", None)):
        folder = tmp_path / "eval-True"
        metrics = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({s: {**m, "model_id": measured} for s, m in metrics.items()}))
        caplog.clear()
        with caplog.at_level("INFO", logger="cxr.report"):
            text = make_report(folder, model=given, video=False, heatmaps=False, device="cpu").read_text()
        other = measured != real
        assert ("is not the model that" in caplog.text) is other
        assert ("the file the evaluation named, now" in caplog.text) is (other and given is None)
        assert ("the file the evaluation named, changed since" in text) is (other and given is None)
        assert ("given by --model" in text) is (other and given is not None)
        from cxr.report import _model_name

        assert _model_name(Path("default")) == "default" != _model_name("default")  # a folder, and the word
        assert (f"images drawn with another model</strong>: {run / 'best.pt'} (model_id {real})" in text) is other
        assert ("Training configuration of the model" in text) is not other  # not the other model's config


def test_report_output_elsewhere_and_split_choice(tmp_path, report):
    page = make_report(report.parent, output=tmp_path / "out", video=False, heatmaps=False, grid_split="val")
    assert page == tmp_path / "out" / "report.html"
    assert (tmp_path / "out" / "report" / "grid_val.png").is_file()
    assert not (tmp_path / "out" / "report" / "grid_test.png").exists()
    with pytest.raises(UsageError, match="no predictions"):
        make_report(report.parent, output=tmp_path / "x", video=False, grid_split="holdout")


def test_report_refuses_a_folder_without_artifacts(tmp_path):
    with pytest.raises(UsageError, match="neither a run directory"):
        make_report(tmp_path)
    with pytest.raises(UsageError, match="no such run directory"):
        make_report(tmp_path / "missing")
    # A damaged config.yaml or metrics.json is one line naming the file, not a YAML or JSON traceback.
    (tmp_path / "config.yaml").write_text("data: [unclosed\n")
    with pytest.raises(UsageError, match=r"config.yaml: not valid YAML at line 2"):
        make_report(tmp_path)
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(UsageError, match=r"config.yaml: not a config"):
        make_report(tmp_path)
    (tmp_path / "config.yaml").unlink()
    (tmp_path / "metrics.json").write_text("{")
    with pytest.raises(UsageError, match=r"metrics.json: not valid JSON"):
        make_report(tmp_path)


# ------------------------------------------------------------------------------------------------ browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_report_opens_in_a_real_browser(report, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url[:80]}"))
            page.goto(report.as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
            video = page.evaluate("""async () => {
                const v = document.querySelector('video');
                if (!v) return null;
                if (v.readyState < 1) await new Promise(r => {
                    v.addEventListener('loadedmetadata', r); v.addEventListener('error', r); setTimeout(r, 10000); });
                return {ready: v.readyState, duration: v.duration, width: v.videoWidth, height: v.videoHeight,
                        error: v.error ? v.error.code : null};
            }""")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert len(images) == 7  # history, three confusion matrices, ROC/PR, calibration, grid
    assert all(complete and width > 0 for _, complete, width in images), images
    assert video is not None and video["error"] is None and video["ready"] >= 1, video
    assert (video["width"], video["height"]) == VIDEO["frame_size"]
    assert video["duration"] == pytest.approx(VIDEO["video_max_images"] * VIDEO["seconds_per_image"], abs=0.3)
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_says_when_images_are_gone(tmp_path, report):
    folder = tmp_path / "moved"
    folder.mkdir()
    shutil.copy(report.parent / "metrics.json", folder)
    text = (report.parent / "predictions_test.csv").read_text()
    (folder / "predictions_test.csv").write_text(text.replace(str(SAMPLE_DIR), str(tmp_path / "gone")))
    page = make_report(folder, video=False).read_text()
    assert "Images not found" in page and str(tmp_path / "gone") in page
    assert (folder / "report" / "roc_pr.png").is_file()  # the curves need only the predictions


def test_grid_group_without_images_takes_one_line_not_a_row():
    from cxr.report import GridTile, plot_grid

    tile = GridTile(image=np.full((32, 32), 128, np.uint8), heatmap=None, label=1, prob=0.9, path="a.jpeg")
    full = plot_grid({"right": [tile] * 4, "wrong": [tile] * 4}, 0.5, "val")
    empty = plot_grid({"right": [tile] * 4, "wrong": []}, 0.5, "val")
    texts = [t.get_text() for sub in empty.subfigs for t in sub.texts]
    assert "no images in this group" in texts
    # The empty group adds a fifth of a row, not a whole one.
    assert empty.get_figheight() < 0.7 * full.get_figheight()
    empty.canvas.draw()  # lays out without error


def test_grid_carries_the_disclaimer_and_draws_names_as_text(tmp_path):
    # The grid is also a file of its own (report/grid_<split>.png): predictions shown there say what they are not.
    # A "$" in a file name is drawn as it is, not parsed as TeX (which failed on "cost$_$.jpeg").
    from cxr.report import DISCLAIMER, GridTile, plot_grid

    tile = GridTile(image=np.full((32, 32), 128, np.uint8), heatmap=None, label=1, prob=0.9, path="cost$_$.jpeg")
    fig = plot_grid({"right": [tile] * 2}, 0.5, "val")
    assert DISCLAIMER in [t.get_text() for sub in fig.subfigs for t in sub.texts]
    fig.savefig(tmp_path / "grid.png")


@pytest.mark.parametrize("fault", ["no ffmpeg", "ffmpeg stops"])
def test_report_without_a_working_ffmpeg_is_written_without_the_video(tmp_path, report, monkeypatch, caplog, fault):
    # Before, the whole report was lost with "cannot write .../flythrough.mp4: No such file or directory".
    import imageio_ffmpeg

    def broken(*args, **kwargs):
        if fault == "no ffmpeg":
            raise FileNotFoundError(2, "No such file or directory", "/nonexistent/ffmpeg")
        yield  # started; the first frame then meets a dead pipe, as with an ffmpeg that lacks libx264
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", broken)
    folder = tmp_path / "eval"
    shutil.copytree(report.parent, folder, ignore=shutil.ignore_patterns("report*"))
    page = make_report(folder, device="cpu", **VIDEO).read_text()
    # Said on the page too, not only in the log: it had read as a report made with --no-video.
    assert "No video: it could not be written" in page and "Metrics" in page and "<video" not in page
    assert "report: no video" in caplog.text and "--no-video" in caplog.text
    assert not list((folder / "report").glob("flythrough*")) and not list((folder / "report").glob(".*.tmp"))


def test_the_threshold_is_shown_with_the_decimals_the_images_need(tmp_path):
    # At three decimals, threshold 0.57463 read 0.575, and the image at P = 0.57455 (NORMAL) read 0.575 in the grid.
    labels = np.array([0, 0, 1, 1, 0, 1])
    probs = np.array([0.1, 0.57455, 0.9, 0.7, 0.2, 0.8])
    paths = [str(f) for f in sorted((SAMPLE_DIR / "test" / "NORMAL").glob("*.jpeg"))[:6]]
    metrics = write_evaluation(tmp_path / "ev", [SplitResult("test", paths, labels, probs)], 0.57463, n_boot=20)
    page = make_report(tmp_path / "ev", video=False, heatmaps=False)
    text = page.read_text()
    assert "P(pneumonia) ≥ 0.57463" in text and "threshold 0.575" not in text
    # So do the metrics, for the console's table and training's last line, which had said "threshold 0.575"
    assert metrics["test"]["threshold_shown"] == "0.57463"
    from cxr.cli import _print_metrics

    with contextlib.redirect_stdout(io.StringIO()) as out:
        _print_metrics(metrics)
    assert "metrics at threshold 0.57463" in out.getvalue()
    from cxr.report import GridTile, plot_grid

    tile = GridTile(image=np.full((32, 32), 128, np.uint8), heatmap=None, label=0, prob=0.57455, path="a.jpeg")
    fig = plot_grid({"borderline": [tile]}, 0.57463, "test", decimals=5)
    titles = [ax.get_title() for sub in fig.subfigs for ax in sub.axes]
    assert any(t.startswith("✓ right   P(pneumonia) 0.5746\n") for t in titles), titles


def test_confusion_matrix_of_an_absent_class_gives_it_no_rate():
    # A NORMAL-only split drew its PNEUMONIA row as "0.0 % (0)", which the caption calls the sensitivity.
    from cxr.report import plot_confusion

    fig = plot_confusion([[5, 1], [0, 0]], "normal-only")
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts[4:] == ["83.3%\n(5)", "16.7%\n(1)", "–\n(no images)", "–\n(no images)"], texts


def test_a_long_split_name_keeps_the_pictures_titles_and_legends_apart_and_inside():
    # A folder named like this ran the confusion matrix's two titles into each other, cut at the picture's edges, and
    # spread the ROC/PR legends over the curves and past the axes: shortened in the middle now.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from cxr.report import SplitPredictions, plot_calibration, plot_confusion, plot_roc_pr

    name = "hospital_A_external_validation_cohort_2024_full_resolution"
    fig = plot_confusion([[3, 1], [1, 5]], name)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    assert len(boxes) == 2 and not boxes[0].overlaps(boxes[1]), boxes
    assert all(b.x0 >= 0 and b.x1 <= fig.bbox.width for b in boxes), (boxes, fig.bbox)
    assert all(ax.get_title().startswith("hospital_A_ex") and "…" in ax.get_title() for ax in fig.axes
               if ax.get_title())
    labels, probs = np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    for fig in (plot_roc_pr([SplitPredictions(name, ["a"] * 5, labels, probs)], 0.5),
                plot_calibration([SplitPredictions(name, ["a"] * 5, labels, probs)])):
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is not None:
                assert all(len(t.get_text()) < 60 for t in legend.get_texts()), [t.get_text() for t in legend.texts]
                inside, box = ax.get_window_extent(renderer), legend.get_window_extent(renderer)
                assert inside.x0 <= box.x0 and box.x1 <= inside.x1, (box, inside)


def test_long_split_names_that_shorten_alike_are_told_apart_in_the_legends():
    # Two external cohorts differing in the middle of their names read alike in one legend once shortened; and a
    # small ECE read 0.000 in the legend beside 0.0003 in the table.
    from cxr.report import SplitPredictions, plot_calibration, plot_roc_pr

    names = ["cohort_2024_hospital_A_external_test_set", "cohort_2024_hospital_B_external_test_set", "val",
             "醫院_甲_外部測試集_二零二四年_第一批_影像資料", "醫院_乙_外部測試集_二零二四年_第一批_影像資料"]
    labels, probs = np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    preds = [SplitPredictions(n, ["a"] * 5, labels, probs) for n in names]
    for fig in (plot_roc_pr(preds, 0.5), plot_calibration(preds)):
        for ax in fig.axes:
            if ax.get_legend() is not None:
                texts = [t.get_text().split(":")[0] for t in ax.get_legend().get_texts()]
                split_keys = [t for t in texts if not t.startswith(("chance", "perfectly", "operating"))]
                assert len(split_keys) == len(set(split_keys)) == 5, texts
                assert "val" in split_keys
    calm = SplitPredictions("test", ["a"] * 250, np.array([0] * 200 + [1] * 50),
                            np.array([0.0003] * 200 + [0.9999] * 50))
    legend = plot_calibration([calm]).axes[0].get_legend()
    assert any("ECE 0.0003 " in t.get_text() for t in legend.get_texts()), [t.get_text() for t in legend.get_texts()]


def test_video_caption_gives_the_time_each_image_is_shown_and_an_empty_selection_says_so(tmp_path, report):
    run = report.parent
    # 0.3 s at 5 frames per second is 2 frames: 0.4 s (the caption said 0.3).
    page = make_report(run, output=tmp_path / "a", heatmaps=False, frame_size=(320, 180), video_max_images=2,
                       seconds_per_image=0.3, fps=5.0).read_text()
    assert "0.4 s each" in page and "0.3 s each" not in page
    # No wrong prediction to show: the page says so (the video section vanished without a word).
    labels = np.array([0, 0, 1, 1])
    paths = [str(f) for f in sorted((SAMPLE_DIR / "test" / "NORMAL").glob("*.jpeg"))[:4]]
    write_evaluation(tmp_path / "ev", [SplitResult("test", paths, labels, np.array([0.1, 0.2, 0.8, 0.9]))], 0.5,
                     n_boot=20)
    page = make_report(tmp_path / "ev", heatmaps=False, video_select="errors", **VIDEO).read_text()
    assert "No video: errors selects no image of test (no prediction there is wrong)." in page
    # A sample (at most 5) of a split of 4 shows it whole: said so, where "(sample)" read as a part of it (pinned).
    page = make_report(tmp_path / "ev", heatmaps=False, **VIDEO).read_text()
    assert "4 images from test (all of them), 0.4 s each" in page


def test_bad_video_timing_is_refused_before_any_work(tmp_path):
    # fps 0 was logged as "no video" and the report went on; a bad frame size was refused. Both are refused now.
    from cxr.errors import UsageError
    from cxr.report import make_report

    for kwargs in ({"fps": 0}, {"seconds_per_image": -1.0}, {"fps": float("inf")}, {"fps": float("nan")},
                   {"fps": 1e9}, {"seconds_per_image": 1e308}):  # fps 1e9 had run for good
        with pytest.raises(UsageError, match="must be > 0"):
            make_report(tmp_path, video=True, **kwargs)


def test_a_report_removes_an_earlier_reports_pictures_it_did_not_make_again(tmp_path, report):
    # `cxr report RUN --no-video` left the earlier fly-through (and its poster) beside the new page.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(report.parent, run)
    assert sorted(p.name for p in (run / "report").glob("flythrough_*")) == ["flythrough_test.mp4",
                                                                            "flythrough_test.png"]
    # And the pictures of a split no longer there (an evaluation folder used again for other data), as the earlier
    # report listed them; a file of such a name that the report did not write (the user's own) stays.
    import json

    from cxr.report import PICTURES_LIST, remove_report

    listed = json.loads((run / "report" / PICTURES_LIST).read_text())
    (run / "report" / "confusion_old.png").write_bytes((run / "report" / "confusion_test.png").read_bytes())
    (run / "report" / PICTURES_LIST).write_text(json.dumps(listed + ["confusion_old.png"]))
    (run / "report" / "grid_search.png").write_bytes(b"the user's own")
    (run / "report" / "notes.txt").write_text("not cxr's")
    make_report(run, video=False, heatmaps=False, device="cpu")
    assert not list((run / "report").glob("flythrough_*")) and not (run / "report" / "confusion_old.png").exists()
    assert (run / "report" / "grid_test.png").is_file() and (run / "report" / "notes.txt").is_file()
    assert (run / "report" / "grid_search.png").read_bytes() == b"the user's own"
    # No report this time (--no-report, or one that failed): the earlier one goes, not what else is there.
    assert remove_report(run) and not (run / "report.html").exists()
    assert sorted(p.name for p in (run / "report").iterdir()) == ["grid_search.png", "notes.txt"]
    for f in (run / "report").iterdir():
        f.unlink()
    assert not remove_report(run) and not (run / "report").exists()
    # A report.html that cxr did not write is not removed.
    (run / "report.html").write_text("<html>the user's notes</html>")
    assert not remove_report(run) and (run / "report.html").is_file()


def test_a_report_into_another_runs_folder_is_refused(tmp_path):
    # `cxr report EVAL --output RUN` replaced the run's report.html and removed its pictures.
    from cxr.errors import UsageError
    from cxr.evaluate import SplitResult, write_evaluation

    rng = np.random.default_rng(0)
    labels = (rng.uniform(size=40) < 0.5).astype(int)
    write_evaluation(tmp_path / "ev", [SplitResult("test", [f"{i}.png" for i in range(40)], labels,
                                                   np.clip(labels * 0.6 + 0.2, 0, 1))], 0.5, n_boot=0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.csv").write_text("epoch\n")
    (run / "report.html").write_text("the run's own report")
    with pytest.raises(UsageError, match="the folder of other results, whose report would be replaced"):
        make_report(tmp_path / "ev", output=run, video=False, heatmaps=False)
    assert (run / "report.html").read_text() == "the run's own report"


def test_a_report_that_failed_midway_or_an_older_cxrs_report_is_still_cleaned_up(tmp_path, report, monkeypatch):
    # A report that failed after some pictures left them unlisted, and no later report removed them; a report of a
    # cxr that kept no list was never cleaned up. Its pictures are those its page embeds.
    import json
    import shutil

    import cxr.report
    from cxr.report import PICTURES_LIST, remove_report

    run = tmp_path / "run"
    shutil.copytree(report.parent, run)
    (run / "report" / PICTURES_LIST).unlink()  # as an older cxr left it
    (run / "report" / "notes.png").write_bytes(b"the user's, not in the page")
    assert remove_report(run) and not (run / "report.html").exists()
    assert [p.name for p in (run / "report").iterdir()] == ["notes.png"]

    def fail(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(cxr.report, "plot_roc_pr", fail)  # after history.png and the confusion matrices
    with pytest.raises(MemoryError):
        make_report(run, video=False, heatmaps=False, device="cpu")
    listed = json.loads((run / "report" / PICTURES_LIST).read_text())
    assert "history.png" in listed and "confusion_test.png" in listed and "notes.png" not in listed
    assert remove_report(run) is True
    assert [p.name for p in (run / "report").iterdir()] == ["notes.png"]


def test_the_reliability_diagram_bins_as_the_error_does_and_draws_no_line_over_an_empty_bin():
    # np.histogram's float edges put 0.3, 0.6 and 0.7 a bin below the ECE's floor(p * 10); and the line went straight
    # across an empty bin, as if there were images there.
    probs = np.array([0.05, 0.15, 0.3, 0.3, 0.35, 0.6])  # bins 0, 1, 3, 3, 3, 6: bin 2 and bins 4-5 empty
    labels = np.array([0, 0, 1, 0, 1, 1])
    fig = plot_calibration([SplitPredictions("val", [f"{i}.png" for i in range(6)], labels, probs)])
    (step,) = fig.axes[1].patches
    xy = step.get_xy()  # the step outline: (left edge, height) of each bin, then (right edge, height)
    shares = {round(float(x), 2): float(y) for x, y in xy[1:-1:2]}
    assert shares[0.3] == pytest.approx(3 / 6) and shares[0.2] == 0.0 and shares[0.6] == pytest.approx(1 / 6)
    (line,) = [ln for ln in fig.axes[0].lines if ln.get_label().startswith("val")]
    y = np.asarray(line.get_ydata(), dtype=float)
    assert np.isnan(y).sum() == 2 and not np.isnan(y[:2]).any()  # 0-1 joined; 1 | 3 | 6 not


def test_a_resumed_runs_report_marks_the_resume_and_names_its_wall_time(tmp_path, report):
    # After --resume, "wall time (s)" was the last session's alone and the learning rate jumped with no mark.
    import json
    import shutil

    from cxr.report import plot_history

    history = [{"epoch": e, "lr": lr, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.4, "val_acc": 0.8,
                "val_auroc": 0.9} for e, lr in ((1, 1e-3), (2, 1e-5), (3, 5e-4), (4, 1e-5))]
    fig = plot_history(history, 4, None, [2])
    marks = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == "resumed (--resume)"]
    assert len(marks) == 3 and all(ln.get_xdata()[0] == 2.5 for ln in marks)
    folder = tmp_path / "run"
    shutil.copytree(report.parent, folder, ignore=shutil.ignore_patterns("report*"))
    summary = json.loads((folder / "summary.json").read_text())
    summary.update(sessions=[{"after_epoch": 0}, {"after_epoch": 1}], wall_seconds_this_session=12.3)
    (folder / "summary.json").write_text(json.dumps(summary))
    page = make_report(folder, device="cpu", video=False, heatmaps=False).read_text()
    assert "wall time of the last of 2 sessions (s)" in page and "resumed after epoch 1" in page
    assert "Dashed grey lines: where the run was resumed" in page
    assert "val: carved from the train and val splits together, patient-disjoint (15% of the patients" in page


def test_a_run_stopped_in_its_first_session_is_said_to_be_unfinished(report, tmp_path):
    # No summary.json (the first session never ended): the report said only "No data counts recorded".
    folder = tmp_path / "run"
    shutil.copytree(report.parent, folder, ignore=shutil.ignore_patterns("report*"))
    for name in ("summary.json", "metrics.json"):
        (folder / name).unlink()
    page = make_report(folder, device="cpu", video=False, heatmaps=False).read_text()
    assert "run in progress or interrupted</strong>: no summary.json yet" in page
    assert "run in progress or interrupted" not in report.read_text()  # a finished run is not


def test_the_report_reads_the_rows_of_an_npz_in_a_folder_with_a_hash_in_its_name(tmp_path):
    # The report split "ds#1/x.npz#test/0" at its first "#" and showed none of the file's images ("no such file");
    # the scan, the pictures' names and the report now part a row's path at its last.
    from cxr.data import scan
    from cxr.fileio import image_name
    from cxr.report import _PixelSource

    folder = tmp_path / "ds#1"
    folder.mkdir()
    images = np.stack([np.full((28, 28), v, np.uint8) for v in (10, 200)])
    images[:, :14] = 0  # not blank
    np.savez(folder / "x.npz", test_images=images, test_labels=np.array([0, 1]))
    paths = [s.path for s in scan(folder / "x.npz")["test"].samples]
    assert [image_name(p) for p in paths] == ["x.npz#test/0", "x.npz#test/1"]
    pixels = _PixelSource(28)
    assert [int(pixels.load(p)[-1, -1]) for p in paths] == [10, 200] and not pixels.failed


def test_the_interval_note_says_which_splits_resampled_images_for_want_of_patients():
    # A fallback's method ("...; images resampled as if independent: too few patients ...") names patients too, and
    # the report had called it a bootstrap of the patients.
    from cxr.evaluate import CI_METHOD, CI_METHOD_FEW_PATIENTS, CI_METHOD_PATIENTS
    from cxr.report import _interval_note

    ci = {"ci95": {"auroc": [0.8, 0.9]}}
    # cxr before session 26 took the images as independent in the rates too; since, the rates count patients
    old = CI_METHOD + "; images resampled as if independent: too few patients (fewer than 5 in a class)"
    for fallback, rates in ((old, False), (CI_METHOD_FEW_PATIENTS, True)):
        note = _interval_note({"test": {**ci, "ci95_method": fallback}})
        assert "bootstrap of the images" in note and "resamples patients" not in note
        assert ("the rates' Wilson intervals count the effective number of images" in note) is rates
        assert "test: patients have several images, but the bootstrap resampled the images" in note
        assert "the F1, AUROC and AUPRC intervals are too narrow" in note
    note = _interval_note({"val": {**ci, "ci95_method": CI_METHOD_PATIENTS}})
    assert "bootstrap of the patients" in note and "the bootstrap resamples patients" in note
    assert "effective number of images" in note and "too narrow" not in note
    note = _interval_note({"val": {**ci, "ci95_method": CI_METHOD_PATIENTS}, "test": {**ci, "ci95_method": old}})
    assert "in the splits whose patients have several images" in note and "test: patients have several" in note
    assert "bootstrap of the images for F1" in _interval_note({"test": {**ci, "ci95_method": CI_METHOD}})


def test_a_rate_inside_0_and_1_never_reads_0_or_100_percent_in_the_confusion_matrix():
    from cxr.predict import percent_text

    assert percent_text(2499 / 2500) == "99.96%" and percent_text(1 / 2500) == "0.04%"  # had read 100.0% and 0.0%
    assert percent_text(1.0) == "100.0%" and percent_text(0.0) == "0.0%" and percent_text(0.5) == "50.0%"
    assert percent_text(1 - 1e-9) == ">99.99%" and percent_text(1e-9) == "<0.01%"


def test_a_split_named_in_chinese_script_is_written_as_escapes_in_the_pictures(recwarn, monkeypatch):
    # Its name had been empty boxes in the confusion matrix, the grid's headings and the video's header, with a
    # matplotlib warning for each glyph.
    from cxr.report import GridTile, plot_confusion, plot_grid
    from cxr.video import VideoItem, render_frame

    image = np.zeros((64, 64), np.uint8)
    for fig in (plot_confusion([[3, 1], [0, 4]], "测试"),
                plot_grid({"right": [GridTile(image, np.eye(64, dtype=np.float32), 1, 0.9, "a.png")]}, 0.5, "测试")):
        fig.canvas.draw()
        texts = [t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text"))]
        assert any("\\u6d4b\\u8bd5" in t for t in texts) and not any("测" in t for t in texts), texts
    assert not [w for w in recwarn if "missing from font" in str(w.message)]
    from PIL import ImageDraw

    drawn, real_text = [], ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: drawn.append(text)
                        or real_text(self, xy, text, *a, **k))
    render_frame(VideoItem("a.png", 1, 0.9, image, None), index=0, total=1, right=1, wrong=0, threshold=0.5,
                 history=[True], title="测试")
    assert "\\u6d4b\\u8bd5  ·  image 1 of 1" in drawn, drawn


def test_an_image_gone_is_counted_once_though_the_grid_and_the_video_both_ask(tmp_path, caplog):
    import logging

    from cxr.report import _PixelSource

    pixels = _PixelSource(32)
    with caplog.at_level(logging.WARNING, logger="cxr"):
        for _ in range(2):
            assert pixels.load(str(tmp_path / "gone.png")) is None
    assert list(pixels.failed) == [str(tmp_path / "gone.png")] and caplog.text.count("skipping an image") == 1


def test_grid_tiles_that_share_a_file_name_are_captioned_with_their_folder_too():
    # One folder per patient, img1.dcm in each: the captions repeated, and a wrong image could not be traced.
    from cxr.report import GridTile, plot_grid

    image = np.zeros((64, 64), np.uint8)
    fig = plot_grid({"wrong": [GridTile(image, None, 1, 0.1, "/d/PNEUMONIA/pt07/img1.dcm"),
                               GridTile(image, None, 1, 0.2, "/d/PNEUMONIA/pt12/img1.dcm"),
                               GridTile(image, None, 0, 0.9, "/d/NORMAL/pt03/scan.png")]}, 0.5, "test")
    labels = [ax.get_xlabel() for sub in fig.subfigs for ax in sub.axes if ax.get_xlabel()]
    assert labels == ["pt07/img1.dcm", "pt12/img1.dcm", "scan.png"], labels


def test_the_video_of_the_grids_split_explains_no_image_of_the_grid_again(tmp_path, monkeypatch):
    # Each of the grid and the video had decoded and Grad-CAM'd its images: an image in both, twice (16 images with
    # the default sample: 20 decodes and maps).
    import cxr.report as report_mod

    run = make_run(tmp_path / "run")
    loads, explained = [], []
    real_load, real_maps = report_mod._PixelSource.load, report_mod._Explainer.heatmaps
    monkeypatch.setattr(report_mod._PixelSource, "load", lambda self, path: loads.append(path)
                        or real_load(self, path))
    monkeypatch.setattr(report_mod._Explainer, "heatmaps", lambda self, images, classes: explained.append(len(images))
                        or real_maps(self, images, classes))
    make_report(run, device="cpu", video_select="all", **{**VIDEO, "video_max_images": 100})
    n_test = len((run / "predictions_test.csv").read_text().splitlines()) - 1
    assert len(loads) == len(set(loads)) == n_test and sum(explained) == n_test  # once each: grid, then the rest


def test_names_and_values_from_the_files_of_a_run_are_text_in_the_page(tmp_path):
    # A split folder named <img src=x onerror=alert(1)> ran as script through the interval note, and summary.json's
    # weight-averaging values did too (both raised a dialog in Chromium).
    from cxr.evaluate import CI_METHOD
    from cxr.report import _interval_note

    evil = "<img src=x onerror=alert(1)>"
    fallback = CI_METHOD + "; images resampled as if independent: too few patients (fewer than 5 in a class)"
    note = _interval_note({evil: {"ci95": {"auroc": [0.8, 0.9]}, "ci95_method": fallback}})
    assert evil not in note and "&lt;img src=x onerror=alert(1)&gt;: patients have several images" in note
    run = make_run(tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    summary["swa"] = {"first_epoch": "<script>alert('swa')</script>", "last_epoch": 3, "lr": 0.001, "val_loss": 0.4,
                      "best_epoch_val_loss": 0.45, "kept": True}
    (run / "summary.json").write_text(json.dumps(summary))
    page = make_report(run, video=False, heatmaps=False, device="cpu").read_text()  # not a TypeError in the curves
    assert "<script>alert" not in page and "weight averaging: epochs" not in page  # left out, said in the log
    # A right-to-left override in a folder's name (the run's, a split's) had reversed the title and the tables' rows
    # on the page: shown as its escape, as the terminal and the pictures show it.
    from cxr.report import _table

    shutil.move(run, tmp_path / "run\u202eevil")
    page = make_report(tmp_path / "run\u202eevil", video=False, heatmaps=False, device="cpu").read_text()
    assert "\u202e" not in page and "<title>cxr report: run\\u202eevil</title>" in page
    # And an evaluation of such a folder, with its grid and video: the captions, the data and model evaluated.
    from cxr.demo import SAMPLE_DIR
    from cxr.evaluate import evaluate_model

    shutil.copytree(SAMPLE_DIR / "test", tmp_path / "ab\u202ecd")
    evaluate_model(tmp_path / "run\u202eevil" / "best.pt", tmp_path / "ab\u202ecd", tmp_path / "ev", device="cpu")
    page = make_report(tmp_path / "ev", heatmaps=False, device="cpu", **VIDEO).read_text()
    assert "\u202e" not in page and "Images from ab\\u202ecd:" in page and "flythrough_ab\\u202ecd.mp4" in page
    assert _table(["split"], [["a\u202eb\n"]]).count("<th scope='row'>a\\u202eb\\n</th>") == 1


def test_the_weight_averaging_line_names_the_model_kept():
    # Pinned: summary.json's swa.kept says whether best.pt is the average or the best single epoch; the Data section
    # says which (no test had read the line).
    from cxr.report import RunArtifacts, _data_html, _Explainer

    for kept, model in ((True, "the average"), (False, "that epoch")):
        swa = {"first_epoch": 2, "last_epoch": 3, "lr": 3e-4, "val_loss": 0.30 if kept else 0.50,
               "best_epoch_val_loss": 0.45, "kept": kept}
        art = RunArtifacts(Path("run"), summary={"swa": swa, "counts": {}})
        page = _data_html(art, _Explainer(None, 64, 0.5, 0.25), False)
        assert (f"weight averaging: epochs 2-3 at learning rate 0.0003; validation loss of the average "
                f"{swa['val_loss']:.4f} against 0.4500 for the best single epoch, so the model is {model}</li>") in page


def test_a_bins_wilson_interval_counts_its_positives_by_rounding_not_truncating():
    # 29 PNEUMONIA of 100 is a frequency of 29/100, and 29/100 * 100 is 28.999999999999996: cut to 28 positives,
    # the interval would be 28/100's (0.2014, 0.3749) where scipy's for 29/100 is (0.2101, 0.3854).
    from scipy.stats import binomtest

    lo, hi = bin_intervals(np.array([29 / 100]), np.array([100]))
    ci = binomtest(29, 100).proportion_ci(method="wilson")
    assert (lo[0], hi[0]) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_the_grid_keeps_to_six_columns_however_many_images_a_group_has(tmp_path, report, monkeypatch):
    # --per-group 50 had drawn one strip of 50 tiles, shown at 23 px a tile on the page: a group of more than six
    # takes several rows.
    import cxr.report

    seen, real = [], cxr.report.plot_grid
    monkeypatch.setattr(cxr.report, "plot_grid", lambda tiles, *a, columns, **k: seen.append(
        (columns, max(len(t) for t in tiles.values()))) or real(tiles, *a, columns=columns, **k))
    make_report(report.parent, output=tmp_path / "out", video=False, heatmaps=False, grid_per_group=8, device="cpu")
    ((columns, largest),) = seen
    assert largest > 6 and columns == 6


def test_what_the_pictures_show_reaches_a_screen_reader_and_the_keyboard(report):
    # The confusion counts and which examples were wrong had been pixels only ("confusion matrix for test"); the
    # video was read as "video"; and on a phone the figures and tables scrolled in regions the keyboard could not
    # reach (axe: scrollable-region-focusable), the captions scrolling out of view with the pictures.
    page = report.read_text()
    metrics = json.loads((report.parent / "metrics.json").read_text())
    (tn, fp), (fn, tp) = metrics["test"]["confusion_matrix"]
    assert (f"alt='confusion matrix for test: true NORMAL, {tn} predicted NORMAL and {fp} predicted PNEUMONIA; true "
            f"PNEUMONIA, {fn} predicted NORMAL and {tp} predicted PNEUMONIA'") in page
    table = page[page.index("These examples as a table"):]
    table = table[:table.index("</details>")]
    shown = len(re.findall(r"<tr><th scope='row'>", table))
    assert shown >= 3 and table.count(">right</td>") + table.count(">wrong</td>") == shown
    assert re.search(r"<video [^>]*aria-label='fly-through video of \d+ images from test", page)
    assert page.count("<figure><div class='scroll' tabindex='0' role='region'") == page.count("<img ")
    assert "<div class='table'>" not in page and "<div class='table' tabindex='0' role='region'" in page
    assert "@media screen and (max-width:700px){.scroll{overflow-x:auto}" in page


def test_the_grids_wrong_captions_are_dark_enough_to_read():
    # "✗ wrong" was drawn in the frame's vermillion, 3.9:1 on white: below WCAG's 4.5:1 for text.
    from matplotlib.colors import to_rgb

    from cxr.report import WRONG_TEXT, GridTile, plot_grid

    def luminance(colour):
        c = np.array(to_rgb(colour))
        c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    tiles = {"most confident wrong": [GridTile(np.zeros((32, 32), np.uint8), None, 0, 0.9, "a.png")],
             "most confident right": [GridTile(np.zeros((32, 32), np.uint8), None, 1, 0.9, "b.png")]}
    fig = plot_grid(tiles, 0.5, "test")
    titles = [ax.title for sub in fig.subfigs for ax in sub.axes if ax.get_title()]
    assert len(titles) == 2 and any(t.get_color() == WRONG_TEXT for t in titles)
    for t in titles:
        assert 1.05 / (luminance(t.get_color()) + 0.05) >= 4.5, t.get_text()

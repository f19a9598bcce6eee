from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from cxr.evaluate import SplitResult, choose_threshold, compute_metrics, confidence_intervals, write_evaluation
from cxr.predict import DISCLAIMER
from cxr.report import expected_calibration_error

from .conftest import read_csv


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1)
    return labels, probs


def test_the_areas_lie_within_their_intervals_and_never_above_one():
    # sklearn's own sums gave an AUPRC of 1.0000000000000002 (above 1), and on small splits points 1-2 ulp outside
    # the intervals their resamples gave (29 of 300 random splits).
    y = np.r_[np.zeros(5, int), np.ones(9, int)]
    p = np.r_[np.linspace(0.01, 0.2, 5), np.linspace(0.6, 0.99, 9)]
    assert skm.average_precision_score(y, p) > 1  # the case, as scikit-learn sums it
    rng, outside = np.random.default_rng(1), 0
    cases = [(y, p)] + [(np.r_[0, 1, rng.integers(0, 2, 20)], np.round(rng.random(22), 2)) for _ in range(60)]
    for labels, probs in cases:
        m, ci = compute_metrics(labels, probs, 0.5), confidence_intervals(labels, probs, 0.5, n_boot=50)
        assert m["auprc"] <= 1 and m["auroc"] <= 1
        assert m["auprc"] == pytest.approx(skm.average_precision_score(labels, probs), abs=1e-12)
        # none where every resample is alike (the first case, ranked without an error)
        assert (ci["auroc"] is None) == (m["auroc"] == 1)
        outside += sum(ci[k] is not None and not ci[k][0] <= m[k] <= ci[k][1] for k in ("auroc", "auprc"))
    assert outside == 0


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.65])
def test_metrics_match_scikit_learn(scores, threshold):
    labels, probs = scores
    m = compute_metrics(labels, probs, threshold)
    pred = (probs >= threshold).astype(int)
    assert m["n"] == 300
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(labels, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(labels, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(labels, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(labels, pred))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(labels, probs))
    assert m["auprc"] == pytest.approx(skm.average_precision_score(labels, probs))
    assert m["confusion_matrix"] == skm.confusion_matrix(labels, pred).tolist()
    assert m["threshold"] == threshold
    assert m["brier"] == pytest.approx(skm.brier_score_loss(labels, probs))
    assert m["log_loss"] == pytest.approx(skm.log_loss(labels, probs))
    assert m["ece"] == pytest.approx(expected_calibration_error(labels, probs))
    assert 0.05 < m["ece"] < 0.5  # these made-up probabilities are far from calibrated


def test_calibration_metrics_of_certain_and_one_class_predictions():
    m = compute_metrics(np.array([0, 1, 1]), np.array([0.0, 1.0, 1.0]), 0.5)
    assert m["brier"] == 0 and m["ece"] == 0 and m["log_loss"] == pytest.approx(0, abs=1e-12)
    wrong = compute_metrics(np.array([0, 1]), np.array([1.0, 0.0]), 0.5)  # certain and wrong: large, but finite
    assert wrong["brier"] == 1 and wrong["ece"] == 1 and wrong["log_loss"] == pytest.approx(-np.log(5.96e-8), rel=1e-3)
    # A float32 softmax resolves P near 1 to 6e-8 only: a NORMAL image at a logit gap of 17 (P rounds to 1.0) cost
    # 34.5 and a PNEUMONIA image at the same gap 17.0. Clipped alike on both sides, each costs the same.
    from cxr.evaluate import probabilities

    p = probabilities(torch.tensor([[-8.5, 8.5], [8.5, -8.5]]))
    one_way, other_way = (compute_metrics(np.array([y]), p[i:i + 1], 0.5)["log_loss"] for i, y in ((0, 0), (1, 1)))
    assert one_way == pytest.approx(other_way, rel=1e-6) and 16 < one_way < 17
    one = compute_metrics(np.ones(4, int), np.array([0.5, 0.5, 1.0, 1.0]), 0.5)
    assert one["brier"] == pytest.approx(0.125) and one["log_loss"] == pytest.approx(np.log(2) / 2)


def test_metrics_with_one_class_present():
    m = compute_metrics(np.ones(5, int), np.array([0.1, 0.6, 0.7, 0.8, 0.9]), 0.5)
    assert m["auroc"] is None and m["specificity"] is None
    assert m["recall"] == pytest.approx(0.8)
    assert m["confusion_matrix"] == [[0, 0], [1, 4]]


def test_youden_ties_go_to_the_most_specific_threshold():
    # J = 2/3 at both 0.5 and 0.3; in floats 1 - 1/3 rounds above 2/3, and the lower threshold was taken.
    labels = np.array([0, 0, 1, 0, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert choose_threshold(labels, probs, "youden") == pytest.approx(0.45)
    assert choose_threshold(np.array([0, 1, 0, 1, 0, 1]), np.linspace(0.1, 0.6, 6), "youden") == pytest.approx(0.55)


def test_calibration_error_refuses_what_is_no_probability(tmp_path):
    # NaN fell in no bin and still counted in the total; -0.2 was dropped. From an edited predictions file, said there.
    from cxr.errors import UsageError
    from cxr.report import read_predictions, reliability_bins

    for bad in (np.nan, 1.5):  # the diagram's bins dropped the NaN and put 1.5 in the last bin
        for calibration in (expected_calibration_error, reliability_bins):
            with pytest.raises(ValueError, match=r"\[0, 1\]"):
                calibration(np.array([1, 0, 1]), np.array([bad, 0.2, 0.9]))
    f = tmp_path / "predictions_test.csv"
    for bad in ("nan", "-0.2", "high", "1.5"):  # 1.5: the upper bound, unpinned before
        f.write_text(f"path,label,prob_pneumonia,predicted\na.png,NORMAL,{bad},NORMAL\n")
        with pytest.raises(UsageError, match=f"prob_pneumonia '{bad}' for a.png is not a probability"):
            read_predictions(f, "test")


def test_youden_threshold_maximises_j(scores):
    labels, probs = scores
    t = choose_threshold(labels, probs, "youden")
    fpr, tpr, thr = skm.roc_curve(labels, probs)
    best_j = np.max(tpr - fpr)
    m = compute_metrics(labels, probs, t)
    assert m["recall"] + m["specificity"] - 1 == pytest.approx(best_j)


def test_sensitivity_threshold_reaches_target_and_is_most_specific(scores):
    labels, probs = scores
    t = choose_threshold(labels, probs, "sensitivity", target_sensitivity=0.95)
    m = compute_metrics(labels, probs, t)
    assert m["recall"] >= 0.95
    lowest_positive = np.min(probs[probs >= t])  # a threshold just above it, the next stricter one, misses the target
    assert compute_metrics(labels, probs, np.nextafter(lowest_positive, 1))["recall"] < 0.95


@pytest.mark.parametrize("policy", ["youden", "sensitivity"])
def test_threshold_lies_halfway_between_neighbouring_validation_scores(scores, policy):
    labels, probs = scores
    t = choose_threshold(labels, probs, policy, target_sensitivity=0.95)
    above, below = np.min(probs[probs >= t]), np.max(probs[probs < t])
    assert below < t < above and t == pytest.approx((above + below) / 2, abs=1e-15)
    # the same validation labels as the threshold on the score itself, scikit-learn's operating point
    assert compute_metrics(labels, probs, t)["confusion_matrix"] == compute_metrics(labels, probs, above)[
        "confusion_matrix"]
    # all validation images positive: no lower score, the lowest score itself
    assert choose_threshold(np.array([0, 1, 1]), np.array([0.9, 0.1, 0.2]), policy, 1.0) == 0.1


def test_write_evaluation_files(tmp_path, scores):
    labels, probs = scores
    paths = [f"img{i}.png" for i in range(len(labels))]
    metrics = write_evaluation(tmp_path, [SplitResult("test", paths, labels, probs)], 0.5)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == metrics and set(on_disk) == {"test"}
    for key in ("n", "accuracy", "precision", "recall", "specificity", "f1", "auroc", "auprc", "threshold",
                "confusion_matrix"):
        assert key in on_disk["test"]
    rows = read_csv(tmp_path / "predictions_test.csv")
    assert len(rows) == 300 and rows[0].keys() == {"path", "label", "prob_pneumonia", "predicted", "note"}
    assert {r["note"] for r in rows} == {DISCLAIMER}
    assert rows[0]["predicted"] == ("PNEUMONIA" if probs[0] >= 0.5 else "NORMAL")
    # Exact to the last bit: the report and anyone re-thresholding the file get the labels of metrics.json. With six
    # decimals, the validation image that the Youden threshold sits on flipped about half the time.
    assert [float(r["prob_pneumonia"]) for r in rows] == probs.tolist()
    # An earlier report goes with the earlier metrics: an evaluation stopped before its own report had left one of
    # another model beside these results. A page cxr did not write stays.
    from cxr.report import GENERATOR

    (tmp_path / "report.html").write_text(f"<meta name='generator' content='{GENERATOR}'>")
    write_evaluation(tmp_path, [SplitResult("test", paths, labels, probs)], 0.5, n_boot=0)
    assert not (tmp_path / "report.html").exists()
    (tmp_path / "report.html").write_text("<title>my own notes</title>")
    write_evaluation(tmp_path, [SplitResult("test", paths, labels, probs)], 0.5, n_boot=0)
    assert (tmp_path / "report.html").exists()


def test_the_image_at_the_threshold_keeps_its_label_in_the_file(tmp_path):
    labels, probs = np.array([0, 0, 0, 1, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4123454, 0.8, 0.9])
    t = probs[3]  # a threshold on an image's score, as `--threshold` may give, or an old model's stored one
    metrics = write_evaluation(tmp_path, [SplitResult("val", [f"x{i}" for i in range(6)], labels, probs)], t)
    rows = read_csv(tmp_path / "predictions_val.csv")
    assert metrics["val"]["sensitivity"] == 1.0
    assert all((float(r["prob_pneumonia"]) >= t) == (r["predicted"] == "PNEUMONIA") for r in rows)


def test_metrics_json_refuses_nan(tmp_path, scores):
    labels, probs = scores
    from cxr.errors import UsageError

    with pytest.raises(UsageError, match="threshold"):
        write_evaluation(tmp_path, [SplitResult("test", ["a"] * len(labels), labels, probs)], float("nan"))
    assert not (tmp_path / "metrics.json").exists()


def test_threshold_flag_is_a_probability(capsys):
    from cxr.cli import main as cxr_main

    for bad in ("nan", "inf", "2", "-0.1", "half"):
        with pytest.raises(SystemExit) as e:
            cxr_main(["evaluate", "--data", "d", "--output", "o", "--threshold", bad])
        assert e.value.code == 2 and "argument --threshold" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cxr_main(["evaluate", "--data", "d", "--output", "o", "--threshold", "57"])
    assert "57 is not a probability from 0 to 1 (0.57?)" in capsys.readouterr().err  # 57 meant as 57 %
    for flag in ("--batch-size", "--threads"):
        with pytest.raises(SystemExit) as e:
            cxr_main(["predict", "x.jpeg", flag, "-1"])
        assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_bootstrap_ci_brackets_the_estimate_and_narrows_with_n():
    from cxr.evaluate import bootstrap_ci

    rng = np.random.default_rng(1)

    def data(n):
        labels = rng.integers(0, 2, n)
        return labels, np.clip(labels * 0.35 + rng.random(n) * 0.65, 0, 1)

    small, large = data(100), data(2000)
    ci_small = bootstrap_ci(*small, 0.5, n_boot=300)
    ci_large = bootstrap_ci(*large, 0.5, n_boot=300)
    point = compute_metrics(*large, 0.5)
    for k in ("accuracy", "sensitivity", "specificity", "auroc"):
        lo, hi = ci_large[k]
        assert lo <= point[k] <= hi
        assert (hi - lo) < (ci_small[k][1] - ci_small[k][0])
    assert bootstrap_ci(np.ones(5, int), np.ones(5), 0.5)["auroc"] is None


def test_each_resample_gets_the_metrics_compute_metrics_gives_it():
    # The bootstrap's metrics come from per-image draw counts, not from scikit-learn: on scores with many ties, on
    # resamples that lack a class, and through bootstrap_ci's percentiles, they are compute_metrics' own.
    from cxr.evaluate import CI_METRICS, _Resampler, bootstrap_ci

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    probs = np.round(np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1), 2)  # ~100 distinct scores: ties
    resampler = _Resampler(labels, probs, 0.5)
    draws = [rng.integers(0, 300, 300) for _ in range(200)]
    draws += [np.flatnonzero(labels == 1)[rng.integers(0, labels.sum(), 300)], np.arange(300)]  # one class; all
    for idx in draws:
        got, want = resampler.metrics(idx), compute_metrics(labels[idx], probs[idx], 0.5)
        for k in CI_METRICS:
            assert got[k] == (None if want[k] is None else pytest.approx(want[k], rel=1e-12, abs=1e-12)), k

    def sklearn_bootstrap(n_boot):  # the loop bootstrap_ci ran before session 15, through compute_metrics
        generator, values = np.random.default_rng(0), {k: [] for k in CI_METRICS}
        while len(values["auroc"]) < n_boot:
            idx = generator.integers(0, 300, 300)
            if labels[idx].min() != labels[idx].max():
                m = compute_metrics(labels[idx], probs[idx], 0.5)
                for k in CI_METRICS:
                    values[k].append(m[k])
        return values

    from cxr.evaluate import _bootstrap_values

    got, want = _bootstrap_values(resampler, labels, np.arange(300), 300, 0), sklearn_bootstrap(300)
    for k in CI_METRICS:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    assert all(lo <= compute_metrics(labels, probs, 0.5)[k] <= hi for k, (lo, hi) in bootstrap_ci(
        labels, probs, 0.5, n_boot=300).items())


def test_bca_intervals_are_scipys():
    # BCa, as scipy.stats.bootstrap computes it (its default method), from the same resamples and jackknife.
    from scipy.stats import bootstrap

    from cxr.evaluate import _bca

    # skewed (the bias and acceleration matter); and 0/1 data, whose resamples' means often equal the estimate
    # (counted half below it, as scipy does: nothing had tested that count)
    for x in (np.random.default_rng(5).exponential(size=60), np.r_[np.zeros(3), np.ones(17)]):
        res = bootstrap((x,), np.mean, n_resamples=2000, method="BCa", random_state=np.random.default_rng(1))
        assert (res.bootstrap_distribution == x.mean()).sum() > 100 or x.max() > 1
        jack = np.array([np.delete(x, i).mean() for i in range(len(x))])
        ours = _bca(res.bootstrap_distribution, float(x.mean()), jack, 0.95)
        assert ours == pytest.approx([res.confidence_interval.low, res.confidence_interval.high], rel=1e-9)


def test_rates_get_wilson_intervals_that_never_collapse_at_0_or_1(scores):
    from scipy.stats import binomtest

    from cxr.evaluate import confidence_intervals

    labels, probs = np.array([0] * 10 + [1] * 10), np.r_[np.full(10, 0.1), np.full(9, 0.9), 0.2]
    ci = confidence_intervals(labels, probs, 0.5, n_boot=200)
    # 10 of 10 NORMAL right: Wilson's [0.72, 1], not the bootstrap's [1, 1]
    assert ci["specificity"][0] == pytest.approx(0.7225, abs=1e-4) and ci["specificity"][1] == 1.0
    assert ci["precision"][0] < 1.0 and ci["sensitivity"][0] < 0.9 < ci["sensitivity"][1]
    # Each rate's own count: precision is 9 of the 9 called PNEUMONIA (a denominator of the 10 actual PNEUMONIA, which
    # is sensitivity's, had passed), sensitivity 9 of 10, specificity 10 of 10, accuracy 19 of 20.
    for k, (hits, n) in {"precision": (9, 9), "sensitivity": (9, 10), "specificity": (10, 10),
                         "accuracy": (19, 20)}.items():
        wilson = binomtest(hits, n).proportion_ci(method="wilson")
        assert ci[k] == [pytest.approx(wilson.low), pytest.approx(wilson.high)], k
    # AUROC is no proportion and keeps the bootstrap's interval
    from cxr.evaluate import bootstrap_ci

    assert ci["auroc"] == bootstrap_ci(labels, probs, 0.5, n_boot=200)["auroc"]
    # every interval brackets its estimate on a larger, imperfect set too
    labels, probs = scores
    ci, point = confidence_intervals(labels, probs, 0.5, n_boot=200), compute_metrics(labels, probs, 0.5)
    assert all(ci[k][0] <= point[k] <= ci[k][1] for k in ("accuracy", "sensitivity", "specificity", "precision", "f1"))
    # one class only: the rates it does not define have none
    assert confidence_intervals(np.zeros(5, int), np.full(5, 0.1), 0.5, n_boot=50)["sensitivity"] is None


def _bootstrap_redrawing_one_class_resamples(labels, probs, threshold, n_boot, seed=0):
    """bootstrap_ci written plainly: compute_metrics on each resample that holds both classes, others redrawn."""
    from cxr.evaluate import CI_METRICS

    generator, values = np.random.default_rng(seed), {k: [] for k in CI_METRICS}
    while len(values["accuracy"]) < n_boot:
        idx = generator.integers(0, len(labels), len(labels))
        if labels[idx].min() == labels[idx].max():
            continue
        m = compute_metrics(labels[idx], probs[idx], threshold)
        for k in CI_METRICS:
            values[k].append(np.nan if m[k] is None else m[k])
    return values


@pytest.mark.parametrize("n", [10, 20])
def test_bootstrap_ci_of_an_imbalanced_set_redraws_resamples_that_lack_a_class(n):
    # One PNEUMONIA image in n: about a third (n = 10) of resamples hold none. They must be redrawn, not counted: kept,
    # they gave AUROC fewer resamples than asked and pulled accuracy, specificity and F1 towards the NORMAL-only case.
    from cxr.evaluate import _bootstrap_values, _Resampler

    labels = np.r_[np.zeros(n - 1, int), 1]
    probs = np.r_[np.linspace(0.05, 0.7, n - 1), 0.6]
    got = _bootstrap_values(_Resampler(labels, probs, 0.5), labels, np.arange(n), 400, 0)
    want = _bootstrap_redrawing_one_class_resamples(labels, probs, 0.5, 400)
    for k, values in want.items():
        assert got[k] == pytest.approx(values, rel=1e-12, abs=1e-12, nan_ok=True), k


def test_threshold_of_a_one_class_validation_set_is_one_half():
    # No ROC curve without both classes: the fallback is 0.5 (the argmax of the two probabilities), whatever the scores.
    for policy in ("youden", "sensitivity"):
        assert choose_threshold(np.ones(6, int), np.linspace(0.6, 0.9, 6), policy) == 0.5
        assert choose_threshold(np.zeros(6, int), np.linspace(0.1, 0.4, 6), policy) == 0.5


def test_bootstrap_ci_of_a_one_class_set_covers_what_it_defines():
    # A folder of NORMAL images only (how often does the model cry wolf?): accuracy and specificity have intervals.
    from cxr.evaluate import bootstrap_ci

    probs = np.r_[np.full(90, 0.1), np.full(10, 0.9)]
    ci = bootstrap_ci(np.zeros(100, int), probs, 0.5, n_boot=300)
    assert ci["specificity"] == ci["accuracy"] and ci["specificity"][0] < 0.9 < ci["specificity"][1]
    assert ci["auroc"] is None and ci["sensitivity"] is None
    assert ci["f1"] is None  # it had been [0, 0]: 0 in every resample with a false alarm, as if certain
    # PNEUMONIA only: F1 is defined there (2 TP / (2 TP + FN)), and keeps its interval.
    sick = bootstrap_ci(np.ones(100, int), probs[::-1], 0.5, n_boot=300)
    assert sick["f1"] is not None and sick["f1"][0] < sick["f1"][1]


def test_bootstrap_ci_of_a_metric_undefined_in_every_resample_is_none():
    import json
    import warnings

    from cxr.evaluate import bootstrap_ci

    labels, probs = np.array([0, 1] * 20), np.full(40, 0.1)  # nothing called PNEUMONIA: precision undefined
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's All-NaN warning before the fix
        ci = bootstrap_ci(labels, probs, 0.5, n_boot=50)
    assert ci["precision"] is None and ci["sensitivity"] is None  # 0 in every resample: the bootstrap says nothing
    assert "NaN" not in json.dumps(ci)


def test_a_split_with_no_readable_image_is_named_not_a_traceback(tmp_path, caplog):
    import shutil

    from cxr.demo import SAMPLE_DIR
    from cxr.errors import DataError
    from cxr.evaluate import evaluate_model

    root = tmp_path / "d"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / "test" / cls).mkdir(parents=True)
        (root / "test" / cls / "x.jpeg").write_bytes(b"not an image")
        shutil.copytree(SAMPLE_DIR / "test" / cls, root / "train" / cls)
    with pytest.raises(DataError, match=r"none of the 2 images of split 'test' could be read"):
        evaluate_model("default", root / "test", tmp_path / "o1", device="cpu")
    # Beside a readable split, the unreadable one is reported and left out; the other's metrics are written.
    metrics = evaluate_model("default", root, tmp_path / "o2", device="cpu")
    assert set(metrics) == {"train"} and metrics["train"]["n"] == 16
    assert "no metrics for split 'test'" in caplog.text


def test_a_folder_name_too_long_for_the_result_files_is_refused_before_the_work(tmp_path, monkeypatch):
    # predictions_<240 bytes>.csv could not be written: evaluate stopped after predicting everything.
    import shutil

    import cxr.data
    from cxr.demo import SAMPLE_DIR
    from cxr.errors import UsageError
    from cxr.evaluate import evaluate_model

    folder = tmp_path / ("S" * 240)
    shutil.copytree(SAMPLE_DIR / "test", folder)
    monkeypatch.setattr(cxr.data, "prepare", lambda *a, **k: pytest.fail("the work started"))
    with pytest.raises(UsageError, match=r"too long for the file names of its results .* give --data a link"):
        evaluate_model("default", folder, tmp_path / "out", device="cpu")


def test_an_earlier_evaluations_predictions_go_and_the_report_ignores_any_left(tmp_path, scores, caplog):
    import logging

    from cxr.report import load_artifacts

    labels, probs = scores
    paths = [f"img{i}.png" for i in range(len(labels))]
    write_evaluation(tmp_path, [SplitResult("test", paths, labels, probs)], 0.5)
    (tmp_path / "predictions_normal.csv").write_text("path\n")  # `cxr predict --output` of the user's: not ours
    with caplog.at_level(logging.INFO, logger="cxr"):
        write_evaluation(tmp_path, [SplitResult("val", paths, labels, 1 - probs)], 0.5)  # the same folder again
    assert sorted(f.name for f in tmp_path.glob("predictions_*.csv")) == ["predictions_normal.csv",
                                                                          "predictions_val.csv"]
    (tmp_path / "predictions_normal.csv").unlink()
    assert "removed" in caplog.text and "predictions_test.csv" in caplog.text
    # One left by other means (an older cxr) is not shown with these metrics.
    write_evaluation(tmp_path / "x", [SplitResult("test", paths, labels, probs)], 0.5)
    (tmp_path / "x" / "predictions_test.csv").rename(tmp_path / "predictions_test.csv")
    art = load_artifacts(tmp_path)
    assert set(art.metrics) == set(art.predictions) == {"val"}
    assert "ignoring" in caplog.text


def test_npz_of_16_bit_images_evaluates_like_8_bit(tmp_path):
    # The same X-rays as uint8, as 16-bit and as floats in 0..1: the same probabilities (before, 16-bit values were
    # cast to uint8, wrapping around, and every image came out PNEUMONIA at chance-level AUROC, without a word).
    from cxr.demo import SAMPLE_DIR
    from cxr.evaluate import evaluate_model
    from cxr.images import load_image

    files = sorted((SAMPLE_DIR / "test").glob("*/*.jpeg"))
    images = np.stack([load_image(f, 64) for f in files])
    images[:, 0, 0], images[:, 0, 1] = 0, 255  # full range, so the 16-bit stretch is exact
    labels = np.array([f.parent.name == "PNEUMONIA" for f in files], np.int64)
    probs = {}
    for kind, arr in (("u8", images), ("u16", images.astype(np.uint16) * 257), ("f32", images / np.float32(255))):
        np.savez(tmp_path / f"{kind}.npz", test_images=arr, test_labels=labels)
        evaluate_model("default", tmp_path / f"{kind}.npz", tmp_path / kind, device="cpu")
        probs[kind] = [float(r["prob_pneumonia"]) for r in read_csv(tmp_path / kind / "predictions_test.csv")]
    assert probs["u16"] == probs["u8"] == probs["f32"]


def test_training_in_bf16_chooses_its_threshold_on_the_fp32_probabilities_evaluate_gives(tmp_path, tiny_dataset):
    # bf16 steps (emulated on a CPU without bf16), then the final evaluation: in fp32, as `cxr evaluate` by default.
    # Before, it ran in the training's bf16, so the threshold was chosen on other probabilities than it is applied to.
    from cxr.config import load_config
    from cxr.evaluate import evaluate_model
    from cxr.train import train

    from .conftest import TINY_TRAIN

    run = train(load_config(overrides={**TINY_TRAIN, "epochs": 1, "amp": "on", "data": str(tiny_dataset),
                                       "output": str(tmp_path / "run")}))
    trained = json.loads((run / "metrics.json").read_text())
    evaluate_model(run, tiny_dataset, tmp_path / "eval", device="cpu")
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert trained["test"]["inference_dtype"] == evaluated["test"]["inference_dtype"] == "float32"
    for name, folder in (("train", "train"), ("val", "train"), ("test", "test")):  # val is carved from train/
        a = {r["path"]: float(r["prob_pneumonia"]) for r in read_csv(run / f"predictions_{name}.csv")}
        b = {r["path"]: float(r["prob_pneumonia"]) for r in read_csv(tmp_path / "eval" / f"predictions_{folder}.csv")}
        assert a and a.keys() <= b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a), name


def test_images_the_model_was_trained_on_are_counted_and_named(tmp_path, tiny_dataset, caplog):
    # Evaluating the bundled model on a copy of the Kaggle dataset gave near-perfect metrics on its train folder
    # without a word that the model was trained on those very images.
    import shutil

    from cxr.config import load_config
    from cxr.data import read_split_csv
    from cxr.demo import SAMPLE_DIR
    from cxr.evaluate import evaluate_model
    from cxr.train import train

    from .conftest import TINY_TRAIN

    kermany = sorted((SAMPLE_DIR / "test" / "NORMAL").glob("*.jpeg"))[:2]  # published names of Kermany train images
    (tmp_path / "mine" / "test" / "NORMAL").mkdir(parents=True)
    for i, f in enumerate(kermany):
        shutil.copy(f, tmp_path / "mine" / "test" / "NORMAL" / (f.name if i == 0 else "scan-0001.jpeg"))
    metrics = evaluate_model("default", tmp_path / "mine", tmp_path / "o1", device="cpu")
    assert metrics["test"]["n_seen_in_training"] == 1
    assert "test split: 1 of its 2 images are named as images of the official Kermany train and val" in caplog.text
    from cxr.report import make_report

    page = make_report(tmp_path / "o1", video=False, heatmaps=False).read_text()
    assert "images the model was trained or validated on</strong>: test 1 of 2;" in page

    # A model in a run directory: its split.csv's digests, in splits other than its own train and val.
    run = train(load_config(overrides={**TINY_TRAIN, "epochs": 1, "data": str(tiny_dataset),
                                       "output": str(tmp_path / "run")}))
    evaluated = evaluate_model(run, tiny_dataset, tmp_path / "o2", device="cpu")
    assert evaluated["test"]["n_seen_in_training"] == 0 and "n_seen_in_training" not in evaluated["train"]
    # The train folder holds the run's train and its carved val: said, in the metrics and the report (its rows had
    # read as results on new images), and not of test.
    recorded = {name: len(v) for name, v in read_split_csv(run / "split.csv").items()}
    assert (evaluated["train"]["n_run_train"], evaluated["train"]["n_run_val"]) == (recorded["train"], recorded["val"])
    assert "n_run_train" not in evaluated["test"] and "n_run_val" not in evaluated["test"]
    page = make_report(tmp_path / "o2", video=False, heatmaps=False).read_text()
    assert f"the run's own validation images</strong>: train {recorded['val']} of {evaluated['train']['n']};" in page
    assert "the run's own validation images: see Data), so their rows are optimistic" in page
    again = evaluate_model(run, run / "split.csv", tmp_path / "o2b", device="cpu")  # README's way to get them back
    assert again["val"]["n_run_val"] == again["val"]["n"] and "n_run_train" not in again["val"]
    leaked = next((tiny_dataset / "train" / "PNEUMONIA").glob("*"))
    shutil.copy(leaked, tiny_dataset / "test" / "PNEUMONIA" / "renamed.jpeg")
    caplog.clear()
    assert evaluate_model(run, tiny_dataset, tmp_path / "o3", device="cpu")["test"]["n_seen_in_training"] == 1
    assert "in the train or val split of the run that trained the model" in caplog.text

    # A model fine-tuned from the bundled one (--weights default) was developed on its images too.
    import dataclasses

    from cxr.model import load_checkpoint, save_checkpoint

    tuned = load_checkpoint(run / "best.pt")
    (tmp_path / "tuned").mkdir()
    save_checkpoint(dataclasses.replace(tuned, config=dataclasses.replace(tuned.config, weights="default")),
                    tmp_path / "tuned" / "best.pt")
    caplog.clear()
    assert evaluate_model(tmp_path / "tuned" / "best.pt", tmp_path / "mine", tmp_path / "o4",
                          device="cpu")["test"]["n_seen_in_training"] == 1
    assert "which the bundled model was trained on (this model was fine-tuned from it)" in caplog.text
    # ... and one fine-tuned from its file given by path, or a copy of it under another name (0 and no word before)
    from cxr.model import BUNDLED_MODEL

    shutil.copy(BUNDLED_MODEL, tmp_path / "copy.pt")
    for i, weights in enumerate((str(BUNDLED_MODEL), str(tmp_path / "copy.pt"))):
        save_checkpoint(dataclasses.replace(tuned, config=dataclasses.replace(tuned.config, weights=weights)),
                        tmp_path / "tuned" / "best.pt")
        assert evaluate_model(tmp_path / "tuned" / "best.pt", tmp_path / "mine", tmp_path / f"o5{i}",
                              device="cpu")["test"]["n_seen_in_training"] == 1, weights


def test_copies_by_name_and_shared_patients_of_a_runs_images_are_counted_wherever_evaluated(tmp_path):
    # Kermany's full-resolution originals of a run's 224 px training images, evaluated as another dataset's val
    # split, were reported as 0 seen in training: digests only, and no split named train or val was looked at.
    from cxr.config import load_config
    from cxr.data import Sample, write_split_csv
    from cxr.evaluate import count_development, development_images
    from cxr.model import Checkpoint

    run = tmp_path / "run"
    run.mkdir()
    write_split_csv(run / "split.csv", {
        "train": [Sample("/d/train/PNEUMONIA/person1034_bacteria_2966.jpeg", 1, "person1034", "aaa"),
                  Sample("/d/train/NORMAL/a/IM-0001-0001.dcm", 0, "dicom:x1", "bbb"),
                  Sample("/d/train/NORMAL/b/IM-0001-0001.dcm", 0, "dicom:x2", "ccc")],
        "val": [Sample("/d/train/NORMAL/IMG_7.png", 0, "IMG_7", "ddd")],
        "test": [Sample("/d/test/NORMAL/t.png", 0, "t", "eee")]})
    ckpt = Checkpoint("resnet18", {}, load_config(overrides={"image_size": 32, "arch": "resnet18"}),
                      path=str(run / "best.pt"))
    dev = development_images(ckpt, "0123456789ab")
    other = [Sample("/o/val/PNEUMONIA/person1034_bacteria_2966.jpeg", 1, "person1034", "zzz1"),  # a resized copy
             Sample("/o/val/PNEUMONIA/person1034_bacteria_2967.jpeg", 1, "person1034", "zzz2"),  # the same patient
             Sample("/o/val/NORMAL/c/IM-0001-0001.dcm", 0, "dicom:x3", "zzz3"),  # a name the run holds twice
             Sample("/o/val/NORMAL/IMG_7.png", 0, "IMG_7", "ddd")]  # a byte-identical copy
    assert count_development(dev, "val", other) == {"n_seen_in_training": 1, "n_named_as_training": 1,
                                                     "n_sharing_patients": 2}
    # The run's own train and val images, evaluated where they are: expected, not counted.
    own = [Sample("/d/train/PNEUMONIA/person1034_bacteria_2966.jpeg", 1, "person1034", "aaa"),
           Sample("/d/train/NORMAL/IMG_7.png", 0, "IMG_7", "ddd")]
    assert count_development(dev, "train", own) == {}
    # The same data given as ../ or through a link is the run's own too (it had flagged the whole train split).
    dotted = [dataclasses.replace(s, path=s.path.replace("/d/train/", "/d/x/../train/")) for s in own]
    assert count_development(dev, "train", dotted) == {}
    # ... but counted as the run's own, for the report to say what those rows are
    assert dev.own("train", own) == dev.own("train", dotted) == {"n_run_train": 1, "n_run_val": 1}
    assert dev.own("test", own) == {} and dev.own("val", other) == {}  # a copy elsewhere: counted as seen, above
    assert count_development(dev, "test", own) == {"n_seen_in_training": 2, "n_named_as_training": 0,
                                                    "n_sharing_patients": 1}
    # A patient of the run's DICOM headers named in a CSV's patient cell now (or the other way): one patient, as
    # "listed:x1" and "dicom:x1" had not been
    listed = [Sample("/o/export/1.dcm", 0, "listed:x1", "zzz4"), Sample("/o/export/2.dcm", 0, "listed:x9", "zzz5")]
    assert count_development(dev, "test", listed)["n_sharing_patients"] == 1


def test_rows_of_an_npz_have_no_names_to_match(tmp_path):
    # A row's index is no file name: the withheld PneumoniaMNIST test rows 524..623 had been said to "have the file
    # names of images in the train or val split" of a run trained on train_images (rows 524..4707 held once).
    from cxr.config import load_config
    from cxr.data import Sample, write_split_csv
    from cxr.evaluate import count_development, development_images
    from cxr.model import Checkpoint

    run = tmp_path / "run"
    run.mkdir()
    write_split_csv(run / "split.csv", {
        "train": [Sample(f"/d/m.npz#train/{i}", i % 2, f"train/{i}", f"t{i}") for i in range(6)],
        "val": [Sample(f"/d/m.npz#val/{i}", i % 2, f"val/{i}", f"v{i}") for i in range(2)]})
    ckpt = Checkpoint("resnet18", {}, load_config(overrides={"image_size": 32, "arch": "resnet18"}),
                      path=str(run / "best.pt"))
    dev = development_images(ckpt, "0123456789ab")
    test = [Sample(f"/e/withheld.npz#test/{i}", i % 2, f"test/{i}", f"s{i}") for i in range(6)]
    assert count_development(dev, "test", test) == {"n_seen_in_training": 0}  # by name: cannot be told
    # a row with the pixels of a training row is still found, by its digest
    test[5] = Sample("/e/withheld.npz#test/5", 1, "test/5", "t3")
    assert count_development(dev, "test", test)["n_seen_in_training"] == 1


def test_images_the_model_saw_are_found_in_any_format_and_through_fine_tuning(tmp_path):
    # The bundled model's training images were matched by their exact file name: the same X-ray saved as DICOM or
    # PNG went uncounted (4 of 16 Kermany val images found). And a model fine-tuned from a run (--weights RUN) was
    # never checked against that run's images: a carved val of the base run's images scored 1.000 without a word.
    from cxr.config import load_config, save_config
    from cxr.data import Sample, write_split_csv
    from cxr.evaluate import development_images
    from cxr.model import Checkpoint, build_model, load_checkpoint

    bundled = load_checkpoint("default")
    from cxr.export import model_id

    count, what = development_images(bundled, model_id(bundled))
    kermany = ["NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427-0001.dcm", "normal2-im-1427-0001.PNG",
               "NORMAL2-IM-1427-0001", "someone-else.dcm"]
    assert count("test", [Sample(f"/d/{n}", 0, n) for n in kermany]) == 4
    assert "official Kermany train and val" in what("test")

    base = tmp_path / "base"
    base.mkdir()
    save_config(load_config(overrides={"weights": "default"}), base / "config.yaml")
    write_split_csv(base / "split.csv", {"train": [Sample("/d/a.png", 0, "a", "aaa")],
                                         "val": [Sample("/d/b.png", 1, "b", "bbb")],
                                         "test": [Sample("/d/c.png", 1, "c", "ccc")]})
    cfg = load_config(overrides={"weights": str(base), "image_size": 32, "arch": "resnet18"})
    tuned = Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg)
    count, what = development_images(tuned, "0123456789ab")
    samples = [Sample("/e/x.png", 0, "x", "aaa"), Sample("/e/y.png", 1, "y", "bbb"), Sample("/e/z.png", 1, "z", "ccc")]
    assert count("val", samples) == 2  # the base run's train and val images, in any split; not its test image
    assert count("test", [Sample("/e/IM-0001-0001.dcm", 0, "p")]) == 0
    assert f"a run it was fine-tuned from ({base / 'split.csv'})" in what("val")
    assert "fine-tuned from it" in what("val")  # and through it, the bundled model's names
    assert count("test", [Sample("/e/IM-0115-0001.jpeg.dcm", 0, "p")]) == 1  # a converter's double extension
    assert count("test", [Sample("/e/NORMAL2-IM-1427-0001.png", 0, "p")]) == 1


def test_intervals_resample_patients_so_copies_of_an_image_add_no_certainty():
    # Images of one patient go together: each image of a set written three times over under its own patient gives
    # the intervals of the set itself, where resampling the 3n images as independent made them ~1.7 times narrower.
    from cxr.evaluate import confidence_intervals

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 120)
    probs = np.clip(labels * 0.3 + rng.random(120) * 0.7, 0, 1)
    alone = confidence_intervals(labels, probs, 0.5, n_boot=300)
    tripled = np.repeat(labels, 3), np.repeat(probs, 3)
    by_patient = confidence_intervals(*tripled, 0.5, n_boot=300, patients=np.repeat(np.arange(120), 3).astype(str))
    by_image = confidence_intervals(*tripled, 0.5, n_boot=300)
    for k in ("f1", "auroc", "auprc"):  # the same resamples, weighted three times: the same intervals
        assert by_patient[k] == pytest.approx(alone[k], rel=1e-12), k
    for k in ("accuracy", "sensitivity", "specificity", "precision"):  # Wilson over n_eff = n - 1 of the patients
        assert by_patient[k] == pytest.approx(alone[k], abs=2e-3), k
        assert by_image[k][1] - by_image[k][0] < 0.65 * (alone[k][1] - alone[k][0]), k
    # One image per patient is the image bootstrap itself.
    assert confidence_intervals(labels, probs, 0.5, n_boot=300, patients=[f"p{i}" for i in range(120)]) == alone


def test_too_few_patients_or_one_id_on_every_image_resample_the_images_and_say_so(caplog):
    # An anonymised export's constant PatientID made one "patient": AUROC [0.8056, 0.8056], as if certain. Two
    # patients, one a class, likewise: every resample held the same images.
    from cxr.evaluate import CI_METHOD, confidence_intervals, interval_patients

    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 18)
    probs = np.clip(labels * 0.4 + rng.random(36) * 0.6, 0, 1)
    assert interval_patients("x", labels, ["ANONYMOUS"] * 36) == (None, CI_METHOD)
    assert "all 36 images have one patient id (ANONYMOUS)" in caplog.text
    two = [f"p{y}" for y in labels]
    patients, method = interval_patients("x", labels, two)
    assert patients is None and "too few patients" in method and "1 with NORMAL, 1 with PNEUMONIA" in caplog.text
    enough = [f"p{y}-{i % 6}" for i, y in enumerate(labels)]  # 6 patients a class, 3 images each
    assert interval_patients("x", labels, enough)[0] == enough
    ci = confidence_intervals(labels, probs, 0.5, n_boot=200)
    assert ci["auroc"][1] - ci["auroc"][0] > 0.01


def test_an_interval_every_resample_gives_alike_is_none_not_one_point():
    # A small split ranked without an error: AUROC's and F1's "95 %" intervals read [1, 1], which held the true AUROC
    # in 16-43 % of simulated splits of 45-100 images. With one image, F1's had been [1, 1] beside Wilson's [0.21, 1].
    from cxr.evaluate import bootstrap_ci, confidence_intervals

    labels = np.repeat([0, 1], 6)
    probs = np.r_[np.linspace(0.05, 0.3, 6), np.linspace(0.7, 0.95, 6)]
    ci = confidence_intervals(labels, probs, 0.5, n_boot=200)
    assert ci["auroc"] is None and ci["f1"] is None and ci["auprc"] is None
    assert ci["accuracy"][0] < 0.8 and ci["accuracy"][1] == 1.0  # the rates keep Wilson's
    assert bootstrap_ci(np.array([1]), np.array([0.9]), 0.5, n_boot=50)["f1"] is None
    probs[0] = 0.8  # one NORMAL image ranked above two pneumonias and called PNEUMONIA: intervals again
    ci = confidence_intervals(labels, probs, 0.5, n_boot=200)
    assert ci["auroc"][0] < ci["auroc"][1] and ci["f1"][0] < ci["f1"][1]


def test_copies_of_an_image_of_no_known_patient_are_one_in_the_intervals(tmp_path):
    # 64 images of 32 X-rays, each under two names: intervals of 64 independent images, without a word.
    from cxr.data import Sample
    from cxr.evaluate import SplitResult, confidence_intervals, patients_of, write_evaluation

    samples = [Sample(f"/d/test/{'PNEUMONIA' if i % 2 else 'NORMAL'}/scan{i // 2}{'_copy' * c}.jpeg", i % 2,
                      f"scan{i // 2}{'_copy' * c}", f"digest{i}") for i in range(32) for c in (0, 1)]
    patients = patients_of(samples)
    assert len(set(patients)) == 32 and patients[0] == patients[1] == f"image:{samples[0].path}"
    # one copy under a Kermany patient's name: both are that patient's (they had stayed two)
    named = [dataclasses.replace(samples[0], path="/d/test/NORMAL/person7_virus_1.jpeg", patient="person7"),
             samples[1]]
    assert patients_of(named) == ["person7", "person7"]
    from cxr.evaluate import count_copies

    assert count_copies(samples) == 32 and count_copies(samples[::2]) == 0
    labels = np.array([s.label for s in samples])
    probs = np.where(labels == 1, 0.9, 0.1)
    probs[[2, 3, 4, 5]] = [0.1, 0.1, 0.9, 0.9]  # two X-rays wrong (a pneumonia, a NORMAL), each under both names
    result = SplitResult("test", [s.path for s in samples], labels, probs, patients)
    got = write_evaluation(tmp_path, [result], 0.5, n_boot=200)["test"]["ci95"]
    once = confidence_intervals(labels[::2], probs[::2], 0.5, n_boot=200)
    twice = confidence_intervals(labels, probs, 0.5, n_boot=200)
    # about as wide as the 32 X-rays once, not as narrow as 64 independent images
    for k in ("accuracy", "sensitivity", "specificity"):
        width = got[k][1] - got[k][0]
        assert width >= 0.95 * (once[k][1] - once[k][0]) > twice[k][1] - twice[k][0], k


def test_too_few_patients_to_resample_still_count_in_the_rates_intervals(tmp_path):
    # Too few NORMAL patients to resample (4 until session 26, one now): the bootstrap resamples images, but the
    # rates' Wilson intervals had taken the images of the 20 PNEUMONIA patients (3 alike images each) as independent
    # too (sensitivity's held the truth 76 % of the time, 94 % counted by patients).
    from cxr.evaluate import CI_METHOD_FEW_PATIENTS, SplitResult, confidence_intervals, write_evaluation

    labels = np.r_[np.zeros(12, int), np.ones(60, int)]
    patients = ["n0"] * 12 + [f"p{i // 3}" for i in range(60)]
    probs = np.r_[np.full(12, 0.2), np.where(np.arange(60) // 3 % 5 == 0, 0.3, 0.8)]  # 4 of 20 patients missed
    result = SplitResult("test", [f"/d/{i}.png" for i in range(72)], labels, probs, patients)
    metrics = write_evaluation(tmp_path, [result], 0.5, n_boot=200)["test"]
    assert metrics["ci95_method"] == CI_METHOD_FEW_PATIENTS
    by_patient = confidence_intervals(labels, probs, 0.5, n_boot=200, patients=patients)["sensitivity"]
    alone = confidence_intervals(labels, probs, 0.5, n_boot=200)["sensitivity"]
    assert metrics["ci95"]["sensitivity"] == by_patient and by_patient[1] - by_patient[0] > alone[1] - alone[0]


def test_a_rate_of_one_over_patients_counts_the_patients():
    # 10 patients x 10 NORMAL images, all right: specificity [0.963, 1] was the interval of 100 independent images.
    from scipy.stats import binomtest

    from cxr.evaluate import confidence_intervals

    labels, probs = np.r_[np.zeros(100, int), np.ones(20, int)], np.r_[np.full(100, 0.1), np.linspace(0.2, 0.9, 20)]
    patients = [f"n{i // 10}" for i in range(100)] + [f"p{i}" for i in range(20)]
    ci = confidence_intervals(labels, probs, 0.5, n_boot=100, patients=patients)
    ten = binomtest(10, 10).proportion_ci(method="wilson")
    assert ci["specificity"] == [pytest.approx(ten.low), 1.0]


def test_n_patients_only_where_every_images_patient_is_known(tmp_path):
    from cxr.evaluate import SplitResult, write_evaluation

    labels, probs = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])
    known = SplitResult("a", list("wxyz"), labels, probs, ["p1", "p1", "p2", "p3"])
    unknown = SplitResult("b", list("wxyz"), labels, probs, ["image:w", "image:x", "p2", "p3"])
    m = write_evaluation(tmp_path, [known, unknown], 0.5, n_boot=20)
    assert m["a"]["n_patients"] == 3 and "n_patients" not in m["b"]


def test_compare_predictions_resamples_patients_where_names_give_them(tmp_path, capsys):
    """scripts/compare_predictions.py's paired bootstrap: 40 patients of 5 alike images each are 40 draws, not 200
    (resampled as images, its AUROC difference's interval had been about half as wide)."""
    import importlib.util
    import re
    from pathlib import Path

    rng = np.random.default_rng(5)
    offsets = {(c, i): rng.normal(2 * c - 1, 1.5) for c in (0, 1) for i in range(20)}
    noise = rng.normal(0, 0.2, (2, 20, 5))

    def write(path, shift, kermany):
        rows = ["path,label,prob_pneumonia,predicted,note"]
        for (c, i), z in offsets.items():
            for j in range(5):
                if kermany:
                    name = f"person{i}_bacteria_{j}.jpeg" if c else f"IM-{i:04d}-{j:04d}.jpeg"
                else:
                    name = f"img{c}{i}x{j}.jpeg"
                s = z + noise[c, i, j] + shift * (2 * c - 1)
                rows.append(f"/d/{CLASS[c]}/{name},{CLASS[c]},{float(1 / (1 + np.exp(-s)))!r},,")
        path.write_text("\n".join(rows) + "\n")

    CLASS = ("NORMAL", "PNEUMONIA")
    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_predictions.py"
    spec = importlib.util.spec_from_file_location("compare_predictions", script)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)

    def auroc_width(kermany: bool, *extra: str) -> tuple[float, str]:
        a, b = tmp_path / f"a{kermany}.csv", tmp_path / f"b{kermany}.csv"
        write(a, 0.0, kermany)
        write(b, 0.4, kermany)
        capsys.readouterr()
        assert compare.main([str(a), str(b), "--boot", "400", *extra]) == 0
        out = capsys.readouterr().out
        lo, hi = map(float, re.search(r"\| auroc \|.*\[([-+.\d]+), ([-+.\d]+)\]", out).groups())
        return hi - lo, out.splitlines()[0]

    as_images, said = auroc_width(False)
    assert "resamples the images" in said
    as_patients, said = auroc_width(True)
    assert "resamples 40 patients" in said
    assert as_patients > 1.5 * as_images
    by_pattern, said = auroc_width(False, "--patient-pattern", r"img(\d+)x")
    assert "resamples 40 patients" in said and by_pattern == pytest.approx(as_patients, rel=0.3)
    one_class = tmp_path / "one.csv"  # its bootstrap had drawn forever for a resample holding both classes
    one_class.write_text("path,label,prob_pneumonia,predicted,note\n" + "".join(
        f"/d/{i}.jpeg,NORMAL,0.{i + 1},,\n" for i in range(6)))
    assert compare.main([str(one_class), str(one_class)]) == 2
    assert "NORMAL images only" in capsys.readouterr().err


def test_the_metrics_functions_refuse_what_they_cannot_score():
    # A label 2 had been dropped from every count but n; NaN and a length mismatch met scikit-learn's own errors; a
    # threshold of 5, a policy misspelt and a level of 95 (for 0.95) each went their own way.
    from cxr.errors import UsageError
    from cxr.evaluate import confidence_intervals

    for labels, probs, threshold, what in (([1, 1, 2, 2], [0.1, 0.2, 0.8, 0.7], 0.5, "labels"),
                                           (["NORMAL", "PNEUMONIA"], [0.1, 0.9], 0.5, "labels"),
                                           ([0, 1], [0.1, float("nan")], 0.5, "probabilities"),
                                           ([0, 1], [0.1, 1.5], 0.5, "probabilities"),
                                           ([0, 1, 1], [0.1, 0.9], 0.5, "one length"),
                                           ([0, 1], [0.1, 0.9], 5, "threshold")):
        with pytest.raises(UsageError, match=what):
            compute_metrics(labels, probs, threshold)
    assert compute_metrics(np.array([0.0, 1.0]), [0.1, 0.9], 0.5)["accuracy"] == 1.0  # whole floats are labels
    assert compute_metrics([False, True], [0.1, 0.9], 0.5)["accuracy"] == 1.0
    with pytest.raises(UsageError, match="policy"):
        choose_threshold([0, 1], [0.1, 0.9], "youdn")
    with pytest.raises(UsageError, match="sensitivity"):
        choose_threshold([0, 1], [0.1, 0.9], "sensitivity", 1.5)
    with pytest.raises(UsageError, match="level"):
        confidence_intervals([0, 1] * 10, [0.1, 0.9] * 10, 0.5, level=95)
    with pytest.raises(UsageError, match="n_boot"):
        confidence_intervals([0, 1] * 10, [0.1, 0.9] * 10, 0.5, n_boot=1)
    with pytest.raises(UsageError, match="patients: one for each image, got 1 for 20"):  # a bare ValueError
        confidence_intervals([0, 1] * 10, [0.1, 0.9] * 10, 0.5, patients=["a"])
    # The intervals call an image at the threshold PNEUMONIA, as the point figures beside them do.
    ci = confidence_intervals([0, 1] * 10, [0.5] * 20, 0.5, n_boot=50)
    assert compute_metrics([0, 1] * 10, [0.5] * 20, 0.5)["sensitivity"] == 1.0 and ci["sensitivity"][1] == 1.0
    assert ci["specificity"] == [0.0, pytest.approx(0.2775, abs=1e-4)]
    empty = compute_metrics([], [], 0.5)  # scikit-learn's "Found empty input array"
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["confusion_matrix"] == [[0, 0], [0, 0]]


def test_an_evaluation_that_fails_midway_leaves_no_metrics_of_another_model(tmp_path, monkeypatch):
    # Written split by split, a failure in the second split's intervals left the first split's new predictions beside
    # the earlier evaluation's metrics.json, and a report was made of the mix.
    from cxr import evaluate

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    first = [SplitResult(name, [f"{name}{i}.png" for i in range(40)], labels, rng.random(40))
             for name in ("train", "test")]
    write_evaluation(tmp_path, first, 0.5, n_boot=20)
    second = [dataclasses.replace(r, probs=rng.random(40)) for r in first]
    calls, real = [0], evaluate.confidence_intervals

    def fail_on_the_second(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "confidence_intervals", fail_on_the_second)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        write_evaluation(tmp_path, second, 0.5, n_boot=20)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written before the numbers
    monkeypatch.setattr(evaluate, "confidence_intervals", real)
    # The disk fills up at the second file: the earlier evaluation stays whole (its metrics.json had been removed
    # first, while the error said the file was unchanged), no temporary file is left.
    files, real_write = [], evaluate._write_predictions_to

    def full_at_the_second(path, *a):
        files.append(path)
        if len(files) == 2:
            raise OSError(28, "No space left on device")
        return real_write(path, *a)

    monkeypatch.setattr(evaluate, "_write_predictions_to", full_at_the_second)
    with pytest.raises(OSError, match="No space left"):
        write_evaluation(tmp_path, second, 0.5, n_boot=20)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # Failing as a file is put in place (after the earlier metrics.json went): files of two models are not passed
    # off as one evaluation.
    monkeypatch.setattr(evaluate, "_write_predictions_to", real_write)
    monkeypatch.setattr("cxr.fileio._replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_evaluation(tmp_path, second, 0.5, n_boot=20)
    assert not (tmp_path / "metrics.json").exists()


def test_evaluate_reads_patients_by_the_models_own_pattern_or_the_one_given(tmp_path):
    # A run trained with --patient-pattern (one folder per patient) was evaluated with each image its own patient:
    # intervals resampling images, and test images of training patients not counted.
    from PIL import Image

    from cxr.config import load_config
    from cxr.demo import SAMPLE_DIR
    from cxr.errors import UsageError
    from cxr.evaluate import evaluate_model
    from cxr.model import Checkpoint, build_model, save_checkpoint

    sources = sorted((SAMPLE_DIR / "test").glob("*/*.jpeg"))
    for i, f in enumerate(sources):  # 5 patients a class, of 1 or 2 images, named img<i> (no Kermany name)
        folder = tmp_path / "data" / f.parent.name / f"{f.parent.name[0]}{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("L").resize((48, 48)).save(folder / f"img{i}.png")
    torch.manual_seed(0)
    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18", "patient_pattern": "^([^/]+)/"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg), tmp_path / "m.pt")

    def evaluated(**kw) -> dict:
        out = tmp_path / f"out{len(kw)}{kw.get('patient_pattern', '')!r}"
        return evaluate_model(tmp_path / "m.pt", tmp_path / "data", out, device="cpu", **kw)["data"]

    by_model = evaluated()
    assert by_model["n_patients"] == 10 and "bootstrap of the patients" in by_model["ci95_method"]
    assert evaluated(patient_pattern="^([^/]+)/")["n_patients"] == 10
    none = evaluated(patient_pattern="")
    assert none.get("n_patients") is None and "bootstrap of the images" in none["ci95_method"]
    with pytest.raises(UsageError, match="--patient-pattern"):
        evaluated(patient_pattern="(")
    np.savez(tmp_path / "d.npz", test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.array([0, 1]))
    with pytest.raises(UsageError, match="--patient-pattern reads image paths below class folders; d.npz has none"):
        evaluate_model(tmp_path / "m.pt", tmp_path / "d.npz", tmp_path / "o", device="cpu", patient_pattern="")


def test_a_rate_over_patients_alike_to_the_last_image_is_wilsons_interval_of_the_images():
    # Three patients of one right and one wrong image each: no spread between patients (a design effect of 0), so
    # the images count as independent; dividing by that 0 had been a ZeroDivisionError in the middle of evaluate.
    from scipy.stats import binomtest

    from cxr.evaluate import _wilson

    expected = binomtest(3, 6).proportion_ci(confidence_level=0.95, method="wilson")
    got = _wilson(np.array([1, 0, 1, 0, 1, 0]), np.array([0, 0, 1, 1, 2, 2]), 0.95)
    assert got == [expected.low, expected.high] and got == [pytest.approx(0.18761, abs=1e-5),
                                                             pytest.approx(0.81239, abs=1e-5)]


def test_f1_of_a_set_without_pneumonia_is_undefined_not_zero():
    # No PNEUMONIA image: no positive to find, so F1 is undefined (None, as sensitivity), where a false alarm had
    # made it 0, read as a model that finds nothing.
    m = compute_metrics(np.array([0, 0, 0]), np.array([0.9, 0.1, 0.2]), 0.5)
    assert m["f1"] is None and m["sensitivity"] is None and m["specificity"] == pytest.approx(2 / 3)
    assert compute_metrics(np.array([0, 1, 1]), np.array([0.9, 0.1, 0.8]), 0.5)["f1"] == pytest.approx(0.5)


def test_intervals_resample_patients_from_two_a_class_on():
    # One patient in a class is too few to resample: every resample held it, and the intervals read as measured.
    # From two on the patients are resampled (five until session 26: with 2-4 NORMAL patients F1's interval held the
    # truth in 0.70-0.75 of simulated splits by the images' bootstrap, 0.91-0.93 by the patients').
    from cxr.evaluate import CI_METHOD_PATIENTS, interval_patients

    for per_class, resampled in ((1, False), (2, True), (4, True)):
        labels = np.repeat([0, 1], 3 * per_class)
        patients = [f"{y}-{i // 3}" for i, y in enumerate(labels)]
        chosen, method = interval_patients("test", labels, patients)
        if resampled:
            assert (chosen, method) == (patients, CI_METHOD_PATIENTS)
        else:
            assert chosen is None and "too few patients (fewer than 2 in a class)" in method


def test_evaluate_says_whether_its_threshold_was_the_models_or_given(tmp_path):
    # A --threshold given had been recorded as the model's: a report read it as the one chosen on validation.
    from cxr.config import load_config
    from cxr.demo import SAMPLE_DIR
    from cxr.evaluate import evaluate_model
    from cxr.model import Checkpoint, build_model, save_checkpoint

    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, threshold=0.5),
                    tmp_path / "m.pt")
    for threshold, source in ((0.3, "given"), (None, "model")):
        out = tmp_path / f"out-{source}"
        metrics = evaluate_model(tmp_path / "m.pt", SAMPLE_DIR / "test", out, device="cpu", threshold=threshold)
        assert metrics["test"]["threshold_source"] == source
        on_disk = json.loads((out / "metrics.json").read_text())["test"]
        assert (on_disk["threshold_source"], on_disk["threshold"]) == (source, threshold or 0.5)


@pytest.mark.parametrize("left", ["best.pt", "last.pt", "history.csv"])
def test_evaluate_refuses_a_folder_holding_any_file_of_a_training_run(tmp_path, left):
    # A run's folder with its metrics.json already gone (or not yet written) still holds a run: any one of its
    # files says so.
    from cxr.errors import UsageError
    from cxr.evaluate import evaluate_model

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / left).write_bytes(b"")
    with pytest.raises(UsageError, match=r"--output .*run: a training run's folder, whose metrics.json"):
        evaluate_model("unused.pt", tmp_path / "data", tmp_path / "run", device="cpu")
    assert [p.name for p in (tmp_path / "run").iterdir()] == [left]


def test_a_folder_name_is_judged_by_its_longest_result_name(tmp_path, monkeypatch):
    # predictions_<name>.csv (one byte longer than flythrough_<name>.mp4) of a 216-byte name is 232 bytes, over the
    # 230 an output's name may take: refused before the work; at 214 bytes it is evaluated.
    import shutil

    import cxr.data
    from cxr.demo import SAMPLE_DIR
    from cxr.errors import UsageError
    from cxr.evaluate import evaluate_model

    class Started(Exception):
        pass

    monkeypatch.setattr(cxr.data, "prepare", lambda *a, **k: (_ for _ in ()).throw(Started()))
    for length, refused in ((216, True), (214, False)):
        folder = tmp_path / ("S" * length)
        shutil.copytree(SAMPLE_DIR / "test", folder)
        with pytest.raises(UsageError if refused else Started) as e:
            evaluate_model("default", folder, tmp_path / f"out{length}", device="cpu")
        if refused:
            assert "(predictions_SSSSSSSS...: 232 bytes, at most 230)" in str(e.value)


def test_a_forward_pass_on_the_cpu_holds_at_most_eight_images_of_224_px():
    # A user's batch of 32-64 went through DenseNet-121 at once: 1.4-1.9x slower per image on the CPU than passes of 8
    # (BENCHMARKS.md, figure 14). Capped by pixels: small images keep large passes, where those are faster.
    import torch

    from cxr.evaluate import forward_batch, predict_logits

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [forward_batch(64, cpu, s) for s in (224, 128, 320, 64, 2000)] == [8, 24, 3, 64, 1]
    assert forward_batch(4, cpu, 224) == 4 and forward_batch(64, cuda, 224) == 64
    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    predict_logits(model, np.zeros((20, 224, 224), np.uint8), mean=0.5, std=0.25, device=cpu, batch_size=64)
    assert seen == [8, 8, 4]


def test_rows_of_an_npz_are_not_counted_unseen_by_a_check_of_file_names(tmp_path):
    # The bundled model's training images are known by file name; rows of an .npz have none, and PneumoniaMNIST's
    # val rows (Kermany training images) had been recorded as 0 seen in training: now not told, as it cannot be.
    import json

    from cxr.evaluate import evaluate_model

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "t.npz", test_images=rng.integers(0, 256, (4, 32, 32), dtype=np.uint8),
             test_labels=np.array([0, 1, 0, 1]))
    evaluate_model("default", tmp_path / "t.npz", tmp_path / "ev", device="cpu")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "n_seen_in_training" not in metrics["test"] and metrics["test"]["n"] == 4


def test_rows_of_a_csv_listing_without_a_split_are_named_after_the_csv(tmp_path):
    # They had been reported as split "train", which a report reads as the images the model learnt from.
    from cxr.demo import SAMPLE_DIR
    from cxr.evaluate import evaluate_model

    files = sorted((SAMPLE_DIR / "test").glob("*/*"))[:4] + sorted((SAMPLE_DIR / "test").glob("*/*"))[-4:]
    (tmp_path / "ward7.csv").write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files))
    metrics = evaluate_model("default", tmp_path / "ward7.csv", tmp_path / "out", device="cpu")
    assert set(metrics) == {"ward7"} and metrics["ward7"]["n"] == 8
    assert (tmp_path / "out" / "predictions_ward7.csv").is_file()
    # With the column, its rows keep their split; an empty cell is named after the CSV too
    (tmp_path / "mixed.csv").write_text("path,label,split\n" + "".join(
        f"{f},{f.parent.name},{'test' if i % 2 else ''}\n" for i, f in enumerate(files)))
    metrics = evaluate_model("default", tmp_path / "mixed.csv", tmp_path / "out2", device="cpu")
    assert {k: v["n"] for k, v in metrics.items() if k in ("mixed", "test")} == {"mixed": 4, "test": 4}

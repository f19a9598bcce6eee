from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from cxr.evaluate import SplitResult, choose_threshold, compute_metrics, write_evaluation

from .conftest import read_csv


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1)
    return labels, probs


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


def test_metrics_with_one_class_present():
    m = compute_metrics(np.ones(5, int), np.array([0.1, 0.6, 0.7, 0.8, 0.9]), 0.5)
    assert m["auroc"] is None and m["specificity"] is None
    assert m["recall"] == pytest.approx(0.8)
    assert m["confusion_matrix"] == [[0, 0], [1, 4]]


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
    higher = np.min(probs[probs > t])  # the next stricter threshold misses the target
    assert compute_metrics(labels, probs, higher)["recall"] < 0.95


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
    assert len(rows) == 300 and rows[0].keys() == {"path", "label", "prob_pneumonia", "predicted"}
    assert rows[0]["predicted"] == ("PNEUMONIA" if probs[0] >= 0.5 else "NORMAL")
    assert float(rows[0]["prob_pneumonia"]) == pytest.approx(probs[0], abs=1e-6)


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


def test_bootstrap_ci_of_a_metric_undefined_in_every_resample_is_none():
    import json
    import warnings

    from cxr.evaluate import bootstrap_ci

    labels, probs = np.array([0, 1] * 20), np.full(40, 0.1)  # nothing called PNEUMONIA: precision undefined
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's All-NaN warning before the fix
        ci = bootstrap_ci(labels, probs, 0.5, n_boot=50)
    assert ci["precision"] is None and ci["sensitivity"] == [0.0, 0.0]
    assert "NaN" not in json.dumps(ci)

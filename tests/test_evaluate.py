"""Metrics checked against numbers worked out by hand."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from headstart.evaluation import format_metrics
from headstart.metrics import compute_metrics, probabilities_from_logits

NAMES3 = ["cat", "dog", "fox"]


def one_hot_ish(predictions: list[int], n_classes: int, top: float = 0.6) -> np.ndarray:
    """Probabilities whose argmax is ``predictions``; the rest of the mass is spread evenly."""
    rest = (1.0 - top) / (n_classes - 1)
    probs = np.full((len(predictions), n_classes), rest)
    probs[np.arange(len(predictions)), predictions] = top
    return probs


@pytest.fixture
def three_class() -> dict:
    # true:      0  0  1  1  2  2
    # predicted: 0  1  1  1  2  0
    # confusion (rows true, cols predicted): [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = one_hot_ish([0, 1, 1, 1, 2, 0], 3)  # 0.6 on the prediction, 0.2 elsewhere
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return compute_metrics(labels, probs, NAMES3)


def test_three_class_confusion_matrix(three_class):
    assert three_class["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert three_class["class_names"] == NAMES3
    assert three_class["n_test"] == 6


def test_three_class_per_class_scores(three_class):
    pc = three_class["per_class"]
    # ROC-AUC: P(a positive outscores a negative), ties half; each class 2 positives, 4 negatives
    # cat: tp 1, predicted 2, support 2 -> P 1/2, R 1/2, F1 1/2; AUC (3.5 + 1.5) / 8
    expected = {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "roc_auc": 0.625}
    assert pc["cat"] == pytest.approx(expected)
    # dog: tp 2, predicted 3, support 2 -> P 2/3, R 1, F1 2*(2/3)/(5/3) = 4/5; AUC 7 / 8
    expected = {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2, "roc_auc": 0.875}
    assert pc["dog"] == pytest.approx(expected)
    # fox: tp 1, predicted 1, support 2 -> P 1, R 1/2, F1 2*(1/2)/(3/2) = 2/3; AUC (4 + 2) / 8
    expected = {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2, "roc_auc": 0.75}
    assert pc["fox"] == pytest.approx(expected)
    assert three_class["roc_auc"] == pytest.approx(0.75)
    assert "top_3_accuracy" not in three_class  # only where there are more than 3 classes


def test_three_class_summary_scores(three_class):
    assert three_class["accuracy"] == pytest.approx(4 / 6)
    assert three_class["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert three_class["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_loss_is_mean_cross_entropy_of_true_class(three_class):
    # 4 correct rows give the true class 0.6, 2 wrong rows give it 0.2.
    expected = -(4 * math.log(0.6) + 2 * math.log(0.2)) / 6
    assert three_class["loss"] == pytest.approx(expected)
    assert three_class["loss"] == pytest.approx(0.87702971, abs=1e-8)


def test_loss_clips_zero_probability_to_epsilon():
    labels = np.array([0, 1])
    probs = np.array([[0.0, 1.0], [0.0, 1.0]])  # row 0 gives the true class exactly 0
    metrics = compute_metrics(labels, probs, ["a", "b"])
    assert metrics["loss"] == pytest.approx((-math.log(1e-7) - math.log(1.0)) / 2)
    assert math.isfinite(metrics["loss"])


def test_metrics_are_json_serialisable(three_class):
    assert json.loads(json.dumps(three_class)) == three_class


def test_never_predicted_class_scores_zero_not_nan():
    labels = np.array([0, 1, 2])
    probs = one_hot_ish([0, 1, 1], 3)  # fox is never predicted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = compute_metrics(labels, probs, NAMES3)
    assert metrics["per_class"]["fox"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 1,
        "roc_auc": 0.5,  # its probability is 0.2 on every image: all ties
    }
    assert metrics["per_class"]["dog"]["precision"] == pytest.approx(0.5)
    assert metrics["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert metrics["balanced_accuracy"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)


def test_class_absent_from_test_set_is_left_out_of_averages():
    # "fox" has no test images and is never predicted: all zeros, excluded from the means.
    labels = np.array([0, 0, 1, 1])
    probs = one_hot_ish([0, 1, 1, 1], 3)
    metrics = compute_metrics(labels, probs, NAMES3)
    assert metrics["per_class"]["fox"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
        "roc_auc": None,  # undefined without a positive
    }
    assert metrics["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    # cat: P 1, R 1/2 -> F1 2/3; dog: P 2/3, R 1 -> F1 4/5
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_wrongly_predicted_absent_class_counts_in_macro_f1():
    # "fox" has no test images but is predicted once: F1 0 pulls the macro-F1 down.
    labels = np.array([0, 1])
    probs = one_hot_ish([0, 2], 3)
    metrics = compute_metrics(labels, probs, NAMES3)
    assert metrics["macro_f1"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert metrics["balanced_accuracy"] == pytest.approx((1.0 + 0.0) / 2)


def test_perfect_predictions_score_one():
    labels = np.array([2, 0, 1, 1, 0])
    metrics = compute_metrics(labels, one_hot_ish(labels.tolist(), 3, top=0.9), NAMES3)
    assert metrics["accuracy"] == 1.0
    assert metrics["balanced_accuracy"] == 1.0
    assert metrics["macro_f1"] == 1.0
    for row in metrics["per_class"].values():
        assert (row["precision"], row["recall"], row["f1"]) == (1.0, 1.0, 1.0)
    assert metrics["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 1]]
    assert metrics["loss"] == pytest.approx(-math.log(0.9))


def test_confusion_matrix_rows_are_true_columns_are_predicted():
    # Three images of class "a" all predicted "b": the count sits at row a, column b.
    labels = np.array([0, 0, 0])
    probs = np.array([[0.1, 0.9]] * 3)
    metrics = compute_metrics(labels, probs, ["a", "b"])
    assert metrics["confusion_matrix"] == [[0, 3], [0, 0]]
    assert metrics["per_class"]["a"]["recall"] == 0.0
    assert metrics["per_class"]["b"]["precision"] == 0.0


def test_binary_logits_become_two_column_probabilities():
    logits = np.array([[0.0], [2.0], [-3.0]])
    probs = probabilities_from_logits(logits)
    s2 = 1 / (1 + math.exp(-2.0))  # 0.8807970779778823
    s3 = 1 / (1 + math.exp(3.0))  # sigmoid(-3) = 0.04742587317756678
    assert probs.shape == (3, 2)
    np.testing.assert_allclose(probs, [[0.5, 0.5], [1 - s2, s2], [1 - s3, s3]], rtol=1e-12)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)


def test_binary_logits_extreme_values_do_not_overflow():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = probabilities_from_logits(np.array([[1000.0], [-1000.0]]))
    np.testing.assert_array_equal(probs, [[0.0, 1.0], [1.0, 0.0]])


def test_binary_logits_through_compute_metrics():
    # logits -> p(class 1): 0.88, 0.05, 0.62, 0.27 -> predictions 1, 0, 1, 0
    logits = np.array([[2.0], [-3.0], [0.5], [-1.0]])
    labels = np.array([1, 0, 0, 0])
    metrics = compute_metrics(labels, probabilities_from_logits(logits), ["neg", "pos"])
    assert metrics["confusion_matrix"] == [[2, 1], [0, 1]]
    assert metrics["accuracy"] == pytest.approx(0.75)
    # true-class probabilities: sigmoid(2), sigmoid(3), sigmoid(-0.5), sigmoid(1)
    expected_loss = np.mean(np.log1p(np.exp(-np.array([2.0, 3.0, -0.5, 1.0]))))
    assert metrics["loss"] == pytest.approx(expected_loss)
    assert metrics["per_class"]["pos"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1, "roc_auc": 1.0}
    )
    assert metrics["roc_auc"] == 1.0  # the one positive has the highest p(pos)


def test_softmax_matches_hand_formula():
    probs = probabilities_from_logits(np.array([[0.0, 1.0, 2.0]]))
    e = np.exp([0.0, 1.0, 2.0])
    np.testing.assert_allclose(probs, [e / e.sum()], rtol=1e-12)
    np.testing.assert_allclose(probs, [[0.09003057, 0.24472847, 0.66524096]], atol=1e-8)


def test_softmax_is_stable_for_large_logits():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = probabilities_from_logits(np.array([[1000.0, 1001.0, 1002.0], [-1e4, 0.0, 1e4]]))
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs[0], probabilities_from_logits(np.array([[0.0, 1.0, 2.0]]))[0])
    np.testing.assert_array_equal(probs[1], [0.0, 0.0, 1.0])


def test_logits_must_be_two_dimensional():
    with pytest.raises(ValueError, match="shape"):
        probabilities_from_logits(np.array([0.1, 0.2]))


@pytest.mark.parametrize(
    ("labels", "probs", "match"),
    [
        (np.array([0, 1]), np.full((2, 2), 0.5), r"shape \(N, 3\)"),
        (np.array([0, 1, 2]), np.full((2, 3), 1 / 3), r"labels must have shape"),
        (np.array([0, 3]), np.full((2, 3), 1 / 3), r"labels must be in \[0, 2\]"),
        (np.array([], dtype=int), np.zeros((0, 3)), "empty"),
    ],
)
def test_bad_inputs_raise(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(labels, probs, NAMES3)


def test_duplicate_class_names_raise():
    with pytest.raises(ValueError, match="unique"):
        compute_metrics(np.array([0]), np.array([[1.0, 0.0]]), ["a", "a"])


def test_format_metrics_headline_and_aligned_table():
    metrics = {
        "accuracy": 0.931,
        "loss": 0.20123,
        "n_test": 100,
        "balanced_accuracy": 0.93,
        "macro_f1": 0.93024,
        "per_class": {
            "t-shirt_top": {"precision": 1.0, "recall": 0.9, "f1": 0.947368, "support": 50},
            "bag": {"precision": 0.875, "recall": 0.962, "f1": 0.91644, "support": 50},
        },
        "confusion_matrix": [[45, 5], [2, 48]],
        "class_names": ["t-shirt_top", "bag"],
    }
    lines = format_metrics(metrics).splitlines()
    assert lines[0] == "accuracy 0.9310 (n=100)  loss 0.2012  macro-F1 0.9302"
    assert lines[1].split() == ["class", "precision", "recall", "F1", "support"]
    assert lines[2].split() == ["t-shirt_top", "1.0000", "0.9000", "0.9474", "50"]
    assert lines[3].split() == ["bag", "0.8750", "0.9620", "0.9164", "50"]
    assert len(lines) == 4
    table = lines[1:]
    assert len({len(line) for line in table}) == 1  # right-aligned columns end together
    for header_word in ("precision", "recall", "F1", "support"):
        end = table[0].index(header_word) + len(header_word)
        assert all(
            line[end - 1] != " " and (end == len(line) or line[end] == " ") for line in table
        )


def test_format_metrics_accepts_compute_metrics_output(three_class):
    text = format_metrics(three_class)
    assert text.splitlines()[0] == (
        "accuracy 0.6667 (n=6)  loss 0.8770  macro-F1 0.6556  ROC-AUC 0.7500"
    )
    assert len(text.splitlines()) == 1 + 1 + 3


# ----------------------------------------------------------------------------- honesty metrics


def _answers(n: int, accuracy: float, n_classes: int = 3, seed: int = 0):
    """Labels and predictions with exactly round(n * accuracy) right answers."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    predictions = labels.copy()
    wrong = rng.permutation(n)[: n - round(n * accuracy)]
    predictions[wrong] = (labels[wrong] + 1) % n_classes
    return labels, predictions


def test_imbalanced_hand_example_balanced_accuracy_and_macro_f1():
    # 9 "a" and 1 "b", everything predicted "a": accuracy 0.9 hides a useless classifier.
    labels = np.array([0] * 9 + [1])
    metrics = compute_metrics(labels, one_hot_ish([0] * 10, 2), ["a", "b"])
    assert metrics["accuracy"] == pytest.approx(0.9)
    assert metrics["balanced_accuracy"] == pytest.approx((1.0 + 0.0) / 2)
    # a: P 9/10, R 1 -> F1 18/19; b: never predicted -> 0
    assert metrics["macro_f1"] == pytest.approx((18 / 19 + 0.0) / 2)


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_images():
    widths = []
    for n in (50, 2000):
        labels, predictions = _answers(n, 0.8)
        probs = one_hot_ish(predictions.tolist(), 3)
        metrics = compute_metrics(labels, probs, NAMES3)
        for key in ("accuracy", "macro_f1"):
            low, high = metrics[f"{key}_ci95"]
            assert low <= metrics[key] <= high
        widths.append(np.diff(metrics["accuracy_ci95"])[0])
        # the normal approximation: 2 * 1.96 * sqrt(p (1 - p) / n)
        assert widths[-1] == pytest.approx(2 * 1.96 * math.sqrt(0.8 * 0.2 / n), rel=0.25)
    assert widths[1] < widths[0] / 4
    assert "1000 resamples, seed 0" in metrics["ci_method"]


def test_bootstrap_is_seeded_and_vectorised_rows_match_compute_metrics():
    from headstart.metrics import bootstrap_intervals, macro_f1_rows

    labels, predictions = _answers(300, 0.7, n_classes=4, seed=1)
    assert bootstrap_intervals(labels, predictions, 4) == bootstrap_intervals(
        labels, predictions, 4
    )
    assert bootstrap_intervals(labels, predictions, 4, seed=1) != bootstrap_intervals(
        labels, predictions, 4, seed=2
    )
    rng = np.random.default_rng(0)
    rows_labels = rng.integers(0, 4, (20, 30))
    rows_predictions = rng.integers(0, 4, (20, 30))
    expected = [
        compute_metrics(y, one_hot_ish(p.tolist(), 4), ["a", "b", "c", "d"])["macro_f1"]
        for y, p in zip(rows_labels, rows_predictions, strict=True)
    ]
    np.testing.assert_allclose(macro_f1_rows(rows_labels, rows_predictions, 4), expected)


def test_ece_is_zero_when_calibrated_and_large_when_over_confident():
    from headstart.metrics import calibration

    rng = np.random.default_rng(0)
    n = 20000
    confidence = rng.uniform(0.5, 1.0, n)
    right = rng.random(n) < confidence  # "p sure" is right with probability p
    labels = np.where(right, 1, 0)  # class 1 is always the predicted one
    probs = np.stack([1 - confidence, confidence], axis=1)
    calibrated = calibration(labels, probs)
    assert calibrated["ece"] < 0.02 and calibrated["bins"] == 15
    assert sum(calibrated["count"]) == n and calibrated["count"][:7] == [0] * 7  # conf > 0.5
    over = np.stack([np.full(n, 0.01), np.full(n, 0.99)], axis=1)  # 99% sure, right 75%
    labels = (rng.random(n) < 0.75).astype(int)
    assert calibration(labels, over)["ece"] == pytest.approx(0.99 - labels.mean(), abs=1e-9)


def test_ece_hand_example():
    from headstart.metrics import calibration

    # 15 bins: 0.9 (twice, one right) falls in bin 13 = (13/15, 14/15], 0.6 (right) in bin 8
    # = (8/15, 9/15]
    probs = np.array([[0.1, 0.9], [0.1, 0.9], [0.4, 0.6]])
    labels = np.array([1, 0, 1])
    result = calibration(labels, probs)
    # bin of 0.9: accuracy 1/2, confidence 0.9 -> |0.5 - 0.9| * 2/3; bin of 0.6: |1 - 0.6| * 1/3
    assert result["ece"] == pytest.approx(0.4 * 2 / 3 + 0.4 / 3)
    assert result["count"][13] == 2 and result["count"][8] == 1
    metrics = compute_metrics(labels, probs, ["a", "b"])
    assert metrics["ece"] == pytest.approx(result["ece"])
    assert metrics["reliability"] == result


def test_paired_difference_tells_noise_from_a_real_gap():
    from headstart.metrics import paired_difference

    rng = np.random.default_rng(0)
    a = rng.random(200) < 0.8
    same = paired_difference(a, a)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["within_noise"]
    b = a.copy()
    b[np.flatnonzero(a)[:12]] = False  # B loses 12 of 200 and wins none: 6 points
    real = paired_difference(a, b)
    assert real["difference"] == pytest.approx(0.06) and real["n"] == 200
    assert real["ci95"][0] > 0 and not real["within_noise"]
    c = rng.random(200) < 0.78  # independent answers, 2 points lower on average
    assert paired_difference(a, c)["within_noise"]
    with pytest.raises(ValueError, match="equal"):
        paired_difference(a, a[:10])


def test_format_uncertainty_line(three_class):
    from headstart.evaluation import format_uncertainty

    line = format_uncertainty(three_class)
    assert line.startswith("95% bootstrap intervals: accuracy ")
    assert "ECE" in line and "(15 bins)" in line
    assert format_uncertainty({"accuracy": 0.5}) == ""


@pytest.mark.parametrize("n_classes", [2, 3, 7])
def test_every_metric_agrees_with_scikit_learn(n_classes):
    """On random predictions (every class present, a few probability ties), each number in
    metrics.json that scikit-learn also computes equals its value to 1e-9."""
    from sklearn import metrics as sk  # noqa: PLC0415  (a test-only cross-check)

    rng = np.random.default_rng(n_classes)
    labels = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, 200)])
    logits = rng.normal(size=(labels.size, n_classes)) + 1.5 * np.eye(n_classes)[labels]
    probabilities = probabilities_from_logits(np.round(logits, 1))  # rounding makes ties
    names = [f"c{i}" for i in range(n_classes)]
    metrics = compute_metrics(labels, probabilities, names, resamples=10)
    predictions = probabilities.argmax(axis=1)
    everything = list(range(n_classes))
    assert metrics["accuracy"] == pytest.approx(sk.accuracy_score(labels, predictions), abs=1e-9)
    assert metrics["balanced_accuracy"] == pytest.approx(
        sk.balanced_accuracy_score(labels, predictions), abs=1e-9
    )
    assert metrics["macro_f1"] == pytest.approx(
        sk.f1_score(labels, predictions, average="macro"), abs=1e-9
    )
    assert metrics["loss"] == pytest.approx(sk.log_loss(labels, probabilities), abs=1e-9)
    assert metrics["confusion_matrix"] == sk.confusion_matrix(labels, predictions).tolist()
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        labels, predictions, labels=everything, zero_division=0
    )
    for i, name in enumerate(names):
        row = metrics["per_class"][name]
        assert [row["precision"], row["recall"], row["f1"]] == pytest.approx(
            [precision[i], recall[i], f1[i]], abs=1e-9
        )
        assert row["support"] == support[i]
        assert row["roc_auc"] == pytest.approx(
            sk.roc_auc_score(labels == i, probabilities[:, i]), abs=1e-9
        )
    if n_classes == 2:
        expected_auc = sk.roc_auc_score(labels, probabilities[:, 1])
    else:
        expected_auc = sk.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    assert metrics["roc_auc"] == pytest.approx(expected_auc, abs=1e-9)
    for k in (3, 5):
        if k < n_classes:
            expected = sk.top_k_accuracy_score(labels, probabilities, k=k, labels=everything)
            assert metrics[f"top_{k}_accuracy"] == pytest.approx(expected, abs=1e-9)
        else:
            assert f"top_{k}_accuracy" not in metrics


def test_roc_auc_is_undefined_for_a_class_absent_from_the_test_set():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1]])
    metrics = compute_metrics(labels, probabilities, ["a", "b", "c"], resamples=10)
    assert metrics["per_class"]["c"]["roc_auc"] is None
    aucs = [metrics["per_class"][name]["roc_auc"] for name in ("a", "b")]
    assert metrics["roc_auc"] == pytest.approx(np.mean(aucs))
    json.dumps(metrics)  # None is valid JSON (null)

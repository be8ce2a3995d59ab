"""Classification metrics, bootstrap intervals and calibration, in pure numpy.

Pure numpy on purpose: trivially testable against hand-computed numbers, importable without
Keras, and 0.0 instead of NaN (with no warnings) where a metric is undefined, so
``metrics.json`` is always valid JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Same floor as keras.backend.epsilon(): the loss matches what Keras reported during training.
EPSILON = 1e-7
CI_RESAMPLES = 1000  # bootstrap resamples: the interval ends move by < 0.005 between seeds
CI_LEVEL = 0.95
ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017 ("On calibration...")
TOP_K = (3, 5)  # top-k accuracies reported where there are more than k classes
_BOOTSTRAP_CELLS = 2**22  # resampled labels held in memory at once


def probabilities_from_logits(logits: np.ndarray) -> np.ndarray:
    """Turn model logits into (N, C) probabilities, without overflow for large logits.

    (N, 1) binary logits become (N, 2) ``[1 - p, p]`` with ``p = sigmoid(logit)``, so the binary
    and multi-class cases share one metrics path. (N, C) logits go through a softmax.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape (N, 1) or (N, C), got {logits.shape}")
    if logits.shape[1] == 1:
        # sigmoid(x) = exp(-log(1 + exp(-x))); computing each column this way keeps both exact.
        return np.exp(-np.logaddexp(0.0, np.hstack([logits, -logits])))
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise division that gives 0.0 where the denominator is 0 (undefined metric)."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _check_inputs(
    labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> None:
    """Fail loudly on shape or label mistakes rather than return plausible wrong numbers."""
    n_classes = len(class_names)
    if len(set(class_names)) != n_classes:
        raise ValueError(f"class_names must be unique, got {list(class_names)}")
    if probabilities.ndim != 2 or probabilities.shape[1] != n_classes:
        raise ValueError(
            f"probabilities must have shape (N, {n_classes}), got {probabilities.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != probabilities.shape[0]:
        raise ValueError(f"labels must have shape ({probabilities.shape[0]},), got {labels.shape}")
    if labels.size == 0:
        raise ValueError("cannot compute metrics on an empty test set")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"labels must be in [0, {n_classes - 1}], got {labels.min()}..{labels.max()}"
        )


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with rows = true class and columns = predicted class."""
    flat = np.bincount(labels * n_classes + predictions, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def top_k_accuracy(labels: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the ``k`` most probable (among tied classes,
    the higher index first, as scikit-learn's ``top_k_accuracy_score``)."""
    order = np.argsort(probabilities, axis=1, kind="stable")[:, ::-1][:, :k]
    return float(np.mean((order == labels[:, None]).any(axis=1)))


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the boolean ``positive``: the probability
    that a random positive outscores a random negative, ties counting half (the Mann-Whitney
    statistic, from average ranks). None when one side is empty (undefined)."""
    n_positive = int(positive.sum())
    n_negative = positive.size - n_positive
    if not n_positive or not n_negative:
        return None
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based, ties share their mean rank
    ranks = average_rank[inverse.reshape(-1)]
    return float(
        (ranks[positive].sum() - n_positive * (n_positive + 1) / 2) / n_positive / n_negative
    )


def _ranking_metrics(labels: np.ndarray, probabilities: np.ndarray) -> tuple[dict, list]:
    """Top-k accuracies (k in `TOP_K` below the number of classes), the one-vs-rest ROC-AUC
    of each class (None where the test set lacks it or has nothing else), and their mean over
    the classes where it is defined: for two classes, the AUC of the second class's
    probability (both classes' AUCs are equal then)."""
    n_classes = probabilities.shape[1]
    per_class = [roc_auc(labels == c, probabilities[:, c]) for c in range(n_classes)]
    defined = [auc for auc in per_class if auc is not None]
    summary = {f"top_{k}_accuracy": top_k_accuracy(labels, probabilities, k) for k in TOP_K}
    summary = {key: value for key, value in summary.items() if int(key.split("_")[1]) < n_classes}
    if n_classes == 2:
        summary["roc_auc"] = per_class[1]
    else:
        summary["roc_auc"] = float(np.mean(defined)) if defined else None
    return summary, per_class


def compute_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    *,
    resamples: int = CI_RESAMPLES,
    seed: int = 0,
) -> dict:
    """Accuracy, loss, balanced accuracy, macro-F1, top-3/top-5 accuracy (where there are more
    classes), one-vs-rest ROC-AUC, per-class scores and the confusion matrix, with 95%
    bootstrap intervals for accuracy and macro-F1 (`bootstrap_intervals`, seeded) and
    the expected calibration error over 15 bins (`calibration`).

    ``labels`` are int class indices (N,); ``probabilities`` is (N, C) in ``class_names`` order
    (binary models: pass ``probabilities_from_logits`` output). Undefined precision, recall or F1
    (nothing predicted / no support) is 0.0. Balanced accuracy averages recall over classes
    present in ``labels``; macro-F1 averages F1 over classes that occur in ``labels`` or in the
    predictions (as scikit-learn does by default), so a class absent from the test set and never
    predicted does not count, while predicting it wrongly is penalised. Returns plain Python
    types, ready for ``json.dump``.
    """
    labels = np.asarray(labels).astype(np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    _check_inputs(labels, probabilities, class_names)
    n_classes = len(class_names)

    predictions = probabilities.argmax(axis=1)
    matrix = confusion_matrix(labels, predictions, n_classes)
    true_positives = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = _safe_divide(true_positives, predicted)
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)

    p_true = np.clip(probabilities[np.arange(labels.size), labels], EPSILON, 1.0)
    present = support > 0
    seen = present | (predicted > 0)
    intervals = bootstrap_intervals(labels, predictions, n_classes, resamples=resamples, seed=seed)
    reliability = calibration(labels, probabilities)
    ranking, class_auc = _ranking_metrics(labels, probabilities)
    return {
        "accuracy": float(np.mean(predictions == labels)),
        "loss": float(np.mean(-np.log(p_true))),
        "n_test": int(labels.size),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1[seen].mean()),
        "accuracy_ci95": intervals["accuracy"],
        "macro_f1_ci95": intervals["macro_f1"],
        "ci_method": (
            f"{CI_LEVEL:.0%} percentile bootstrap over test images, {resamples} resamples, "
            f"seed {seed}"
        ),
        **ranking,
        "ece": reliability["ece"],
        "reliability": reliability,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
                "roc_auc": class_auc[i],
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": matrix.tolist(),
        "class_names": list(class_names),
    }


def macro_f1_rows(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 of each row of (R, N) label/prediction arrays, defined as in `compute_metrics`
    (classes absent from a row's labels and predictions are left out)."""
    rows = np.arange(labels.shape[0])[:, None] * n_classes
    size = labels.shape[0] * n_classes
    correct = (labels == predictions).ravel()
    true_positives = np.bincount((rows + labels).ravel(), weights=correct, minlength=size)
    support = np.bincount((rows + labels).ravel(), minlength=size)
    predicted = np.bincount((rows + predictions).ravel(), minlength=size)
    true_positives, support, predicted = (
        a.reshape(-1, n_classes) for a in (true_positives, support, predicted)
    )
    precision = _safe_divide(true_positives, predicted)
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    seen = (support > 0) | (predicted > 0)
    return (f1 * seen).sum(axis=1) / seen.sum(axis=1)


def bootstrap_intervals(
    labels: np.ndarray,
    predictions: np.ndarray,
    n_classes: int,
    *,
    resamples: int = CI_RESAMPLES,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals (95%) for accuracy and macro-F1: ``{"accuracy": [lo, hi],
    "macro_f1": [lo, hi]}``.

    The test images are resampled with replacement ``resamples`` times (seeded, so metrics.json
    is reproducible); the interval says how much the scores would move on another test set of
    the same size from the same source. Vectorised in chunks: 1000 resamples of 10,000 images
    take well under a second.
    """
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    n = labels.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CELLS // max(n, n_classes))
    accuracy, macro_f1 = [], []
    correct = labels == predictions
    for start in range(0, resamples, chunk):
        index = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        accuracy.append(correct[index].mean(axis=1))
        macro_f1.append(macro_f1_rows(labels[index], predictions[index], n_classes))
    tails = [50 * (1 - CI_LEVEL), 100 - 50 * (1 - CI_LEVEL)]
    return {
        "accuracy": [float(v) for v in np.percentile(np.concatenate(accuracy), tails)],
        "macro_f1": [float(v) for v in np.percentile(np.concatenate(macro_f1), tails)],
    }


def paired_difference(
    correct_a: np.ndarray, correct_b: np.ndarray, *, resamples: int = CI_RESAMPLES, seed: int = 0
) -> dict:
    """Accuracy of A minus accuracy of B on the same images, with a 95% paired bootstrap
    interval; ``within_noise`` when the interval contains 0.

    Pairing (resampling images, not each model's results separately) cancels what both get
    right or wrong, so it detects smaller real differences than overlapping intervals do.
    """
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal, non-empty 1-D arrays, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CELLS // a.size)
    diffs = []
    for start in range(0, resamples, chunk):
        index = rng.integers(0, a.size, size=(min(chunk, resamples - start), a.size))
        diffs.append((a[index] - b[index]).mean(axis=1))
    tails = [50 * (1 - CI_LEVEL), 100 - 50 * (1 - CI_LEVEL)]
    low, high = (float(v) for v in np.percentile(np.concatenate(diffs), tails))
    return {
        "difference": float(a.mean() - b.mean()),
        "ci95": [low, high],
        "n": int(a.size),
        "within_noise": bool(low <= 0.0 <= high),
    }


def calibration(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error and the reliability diagram's data, over ``bins`` equal-width
    bins of top-class confidence ((0, 1/15], (1/15, 2/15], ...).

    ECE = sum over bins of (images in bin / all images) * |accuracy - mean confidence|: 0 when
    "90% sure" is right 90% of the time, large for an over-confident model. Empty bins report
    count 0 and 0.0 for their means.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    mean_confidence = _safe_divide(np.bincount(which, confidence, bins), count)
    accuracy = _safe_divide(np.bincount(which, correct, bins), count)
    ece = float(np.sum(count / labels.size * np.abs(accuracy - mean_confidence)))
    return {
        "ece": ece,
        "bins": bins,
        "count": count.tolist(),
        "confidence": mean_confidence.tolist(),
        "accuracy": accuracy.tolist(),
    }


# ----------------------------------------------------------------------------- multi-label


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Independent per-label probabilities of (N, C) multi-label logits, without overflow."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(logits, dtype=np.float64)))


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Average precision of ``scores`` for the boolean ``positive``: the mean of the precision
    at each positive, ranked by score, tied scores taken together (the step-wise area under the
    precision-recall curve, as scikit-learn's ``average_precision_score``). None when there is
    no positive (undefined)."""
    positive = np.asarray(positive, dtype=bool)
    n_positive = int(positive.sum())
    if not n_positive:
        return None
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranked, hits = np.asarray(scores, dtype=np.float64)[order], positive[order]
    ends = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]  # last index of each tie
    true_positives = np.cumsum(hits)[ends]
    precision = true_positives / (ends + 1)
    recall_gain = np.diff(np.r_[0, true_positives]) / n_positive
    return float(np.sum(recall_gain * precision))


def best_threshold(positive: np.ndarray, scores: np.ndarray) -> tuple[float, float | None]:
    """The decision threshold on ``scores`` with the best F1 for the boolean ``positive``, and
    that F1. Every cut between two distinct scores is tried; the threshold is halfway between
    them (half the lowest score when every image is called positive); the highest of equally
    good ones wins. With no positive at all: 0.5, and None for the F1."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_positive = int(positive.sum())
    if not n_positive:
        return 0.5, None
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], positive[order]
    ends = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]
    true_positives = np.cumsum(hits)[ends]
    called = ends + 1
    f1 = 2 * true_positives / (called + n_positive)
    best = int(np.argmax(f1))
    below = ranked[ends[best] + 1] if ends[best] + 1 < ranked.size else 0.0
    return float((ranked[ends[best]] + below) / 2), float(f1[best])


def choose_thresholds(targets: np.ndarray, probabilities: np.ndarray) -> list[dict]:
    """`best_threshold` for each label (column): ``{"threshold", "f1"}`` per label, the F1 that
    threshold gives on these (validation) images."""
    targets = np.asarray(targets).astype(bool)
    chosen = []
    for c in range(targets.shape[1]):
        threshold, f1 = best_threshold(targets[:, c], probabilities[:, c])
        chosen.append({"threshold": threshold, "f1": f1})
    return chosen


def multi_label_metrics(
    targets: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    thresholds: Sequence[float],
) -> dict:
    """Scores of a multi-label model: ``targets`` (N, C) 0/1, ``probabilities`` (N, C)
    independent per-label probabilities, a label predicted where its probability reaches its
    threshold.

    Per label: precision, recall, F1, support, average precision (`average_precision`) and
    threshold. Micro-F1 counts every (image, label) decision; macro-F1 averages the labels'
    F1 over labels present in the targets or the predictions; mAP averages average precision
    over labels with at least one positive (as scikit-learn's ``average_precision_score``
    with ``average="macro"`` when every label has one). ``map_baseline`` is the mAP of a
    model that gives every image the same scores: each label's average precision is then its
    share of positives. Subset accuracy: images whose whole label set is right. Loss: the mean
    binary cross-entropy over images and labels, as Keras reports it."""
    targets = np.asarray(targets).astype(bool)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n_classes = len(class_names)
    if targets.ndim != 2 or targets.shape != probabilities.shape or targets.shape[1] != n_classes:
        raise ValueError(
            f"targets and probabilities must both be (N, {n_classes}), got {targets.shape} and "
            f"{probabilities.shape}"
        )
    if not targets.shape[0]:
        raise ValueError("cannot compute metrics on an empty test set")
    predicted = probabilities >= np.asarray(thresholds, dtype=np.float64)[None, :]
    true_positives = (predicted & targets).sum(axis=0)
    support, called = targets.sum(axis=0), predicted.sum(axis=0)
    precision = _safe_divide(true_positives, called)
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    seen = (support > 0) | (called > 0)
    ap = [average_precision(targets[:, c], probabilities[:, c]) for c in range(n_classes)]
    defined = [value for value in ap if value is not None]
    micro_tp = float(true_positives.sum())
    micro_f1 = 2 * micro_tp / (called.sum() + support.sum()) if called.sum() + support.sum() else 0
    clipped = np.clip(probabilities, EPSILON, 1 - EPSILON)
    loss = -np.where(targets, np.log(clipped), np.log(1 - clipped)).mean()
    share = targets.mean(axis=0)
    return {
        "multi_label": True,
        "map": float(np.mean(defined)) if defined else 0.0,
        "micro_f1": float(micro_f1),
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "micro_precision": float(_safe_divide(np.array(micro_tp), np.array(called.sum()))),
        "micro_recall": float(_safe_divide(np.array(micro_tp), np.array(support.sum()))),
        "subset_accuracy": float(np.mean((predicted == targets).all(axis=1))),
        "map_baseline": float(np.mean(share[support > 0])) if (support > 0).any() else 0.0,
        "loss": float(loss),
        "n_test": int(targets.shape[0]),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
                "average_precision": ap[i],
                "threshold": float(thresholds[i]),
            }
            for i, name in enumerate(class_names)
        },
        "class_names": list(class_names),
    }

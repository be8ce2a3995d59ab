"""Test-set metrics for a trained classifier.

The metric code is pure numpy on purpose: it is trivially testable against hand-computed
numbers, and it reports 0.0 instead of NaN (with no warnings) where a metric is undefined, so
``metrics.json`` is always valid JSON.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from headstart import runs
from headstart.config import Config
from headstart.data import ImageFolder, Split, load_image_folder, make_dataset
from headstart.errors import UsageError

EVALUATION_FILE = "evaluation.json"

# Same floor as keras.backend.epsilon(): the loss matches what Keras reported during training.
EPSILON = 1e-7


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


def compute_metrics(
    labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> dict:
    """Accuracy, loss, balanced accuracy, macro-F1, per-class scores and the confusion matrix.

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
    return {
        "accuracy": float(np.mean(predictions == labels)),
        "loss": float(np.mean(-np.log(p_true))),
        "n_test": int(labels.size),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1[seen].mean()),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": matrix.tolist(),
        "class_names": list(class_names),
    }


def format_metrics(metrics: dict) -> str:
    """A headline line plus an aligned per-class table, for the terminal and run logs."""
    lines = [
        f"accuracy {metrics['accuracy']:.4f} (n={metrics['n_test']})  "
        f"loss {metrics['loss']:.4f}  macro-F1 {metrics['macro_f1']:.4f}"
    ]
    names = metrics["class_names"]
    width = max(len("class"), *(len(name) for name in names))
    lines.append(f"{'class':<{width}}  {'precision':>9}  {'recall':>9}  {'F1':>9}  {'support':>7}")
    for name in names:
        row = metrics["per_class"][name]
        lines.append(
            f"{name:<{width}}  {row['precision']:>9.4f}  {row['recall']:>9.4f}  "
            f"{row['f1']:>9.4f}  {row['support']:>7d}"
        )
    return "\n".join(lines)


PREDICTIONS_FILE = "predictions.csv"


def predict_split(model, split: Split, batch_size: int = 32) -> np.ndarray:
    """Class probabilities (N, C) of ``model`` for every image of ``split``, in order."""
    size = tuple(model.input_shape[1:3])
    logits = model.predict(make_dataset(split, size, batch_size=batch_size), verbose=0)
    return probabilities_from_logits(logits)


def metrics_for_split(
    model, split: Split, class_names: Sequence[str], batch_size: int = 32, probabilities=None
) -> dict:
    """Score ``model`` on one split (or its precomputed ``probabilities``); an empty split
    gives ``n_test: 0``."""
    if len(split) == 0:
        return {"n_test": 0, "note": "no test images"}
    if probabilities is None:
        probabilities = predict_split(model, split, batch_size)
    return compute_metrics(np.asarray(split.labels), probabilities, class_names)


def write_predictions(
    path: str | Path, split: Split, class_names: Sequence[str], probabilities: np.ndarray
) -> None:
    """Per-image test predictions (path, true, predicted, confidence, one column per class),
    so figures and error analysis never need to run the model again."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "true", "predicted", "confidence", *class_names])
    for file, label, row in zip(split.paths, split.labels, probabilities, strict=True):
        best = int(np.argmax(row))
        writer.writerow(
            [
                file,
                class_names[label],
                class_names[best],
                f"{row[best]:.6f}",
                *(f"{p:.6f}" for p in row),
            ]
        )
    runs.write_text_atomic(path, buffer.getvalue(), errors="backslashreplace")


def evaluate(run: str | Path, data: str | Path, *, batch_size: int = 32) -> dict:
    """Score a saved run on DATA and write ``RUN/evaluation.json``.

    DATA that is the run's own training folder is scored on the run's test split (same seed and
    fractions, so no training image is counted); any other folder is scored on its ``test``
    subfolder if it has one, else on all of its images.
    """
    run_dir = runs.open_run_dir(run)
    config = Config.load(run_dir / runs.CONFIG_FILE)
    class_names = runs.read_labels(run_dir)
    if Path(data).resolve() == Path(config.data).resolve():
        folder = load_image_folder(
            str(data), val_split=config.val_split, test_split=config.test_split, seed=config.seed
        )
        split = folder.test
    else:
        folder = load_image_folder(str(data), val_split=0.0, test_split=0.0, min_classes=1)
        split = folder.test if len(folder.test) else _all_images(folder)
    split = _relabel(split, folder.class_names, class_names, data)
    model = runs.load_model(run_dir, len(class_names))
    metrics = metrics_for_split(model, split, class_names, batch_size)
    metrics["data"] = str(Path(data).resolve())
    metrics["skipped"] = len(folder.skipped)
    runs.write_json(run_dir / EVALUATION_FILE, metrics)
    return metrics


def _all_images(folder: ImageFolder) -> Split:
    parts = (folder.train, folder.val, folder.test)
    return Split(sum((p.paths for p in parts), ()), sum((p.labels for p in parts), ()))


def _relabel(split: Split, data_classes, run_classes, data) -> Split:
    """Map DATA's class indices onto the run's; a class the model never saw is a usage error."""
    unknown = sorted(set(data_classes) - set(run_classes))
    if unknown:
        raise UsageError(f"{data}: classes {unknown} are not among the run's labels {run_classes}")
    index = {name: run_classes.index(name) for name in data_classes}
    return Split(split.paths, tuple(index[data_classes[label]] for label in split.labels))

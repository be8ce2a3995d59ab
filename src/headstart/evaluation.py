"""Scoring a trained classifier on labelled images: predictions, test metrics, the
``evaluate`` verb (the numbers themselves are `headstart.metrics`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from headstart import files, runs
from headstart.config import Config
from headstart.data import ImageFolder, Split, make_dataset
from headstart.errors import UsageError
from headstart.metrics import (
    TOP_K,
    compute_metrics,
    macro_f1_rows,
    paired_difference,
    probabilities_from_logits,
)
from headstart.splits import load_image_folder
from headstart.tta import check_views, describe, keras_probabilities, tta_probabilities

EVALUATION_FILE = "evaluation.json"


def format_uncertainty(metrics: dict) -> str:
    """One line: the 95% intervals, balanced accuracy and ECE ('' for metrics without them)."""
    if "accuracy_ci95" not in metrics:
        return ""
    acc, f1 = metrics["accuracy_ci95"], metrics["macro_f1_ci95"]
    return (
        f"95% bootstrap intervals: accuracy {acc[0]:.4f}-{acc[1]:.4f}, macro-F1 "
        f"{f1[0]:.4f}-{f1[1]:.4f}  balanced accuracy {metrics['balanced_accuracy']:.4f}  "
        f"ECE {metrics['ece']:.4f} ({metrics['reliability']['bins']} bins)"
    )


def format_metrics(metrics: dict) -> str:
    """A headline line plus an aligned per-class table, for the terminal and run logs."""
    ranking = "".join(
        f"  top-{k} {metrics[f'top_{k}_accuracy']:.4f}"
        for k in TOP_K
        if f"top_{k}_accuracy" in metrics
    )
    if metrics.get("roc_auc") is not None:
        ranking += f"  ROC-AUC {metrics['roc_auc']:.4f}"
    lines = [
        f"accuracy {metrics['accuracy']:.4f} (n={metrics['n_test']})  "
        f"loss {metrics['loss']:.4f}  macro-F1 {metrics['macro_f1']:.4f}{ranking}"
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


def predict_split(model, split: Split, batch_size: int = 32, tta: int = 1) -> np.ndarray:
    """Class probabilities (N, C) of ``model`` for every image of ``split``, in order; with
    ``tta`` > 1, averaged over that many test-time views (`headstart.tta`)."""
    size = tuple(model.input_shape[1:3])
    dataset = make_dataset(split, size, batch_size=batch_size)
    if tta == 1:
        return probabilities_from_logits(model.predict(dataset, verbose=0))
    probabilities_of = keras_probabilities(model)
    return np.concatenate(
        [tta_probabilities(probabilities_of, np.asarray(images), tta) for images, _ in dataset]
    )


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
    files.write_text_atomic(path, buffer.getvalue(), errors="backslashreplace")


def evaluate(
    run: str | Path,
    data: str | Path,
    *,
    root: str | Path | None = None,
    batch_size: int = 32,
    tta: int = 1,
) -> dict:
    """Score a saved run on DATA and write ``RUN/evaluation.json``.

    DATA that is the run's own training data (folder or CSV labels file) is scored on the run's
    test split (same seed and fractions, so no training image is counted); any other folder is
    scored on its ``test`` subfolder if it has one, else on all of its images, and any other
    CSV file on its test rows if it has a split column, else on all of its rows. ``root``: the
    folder a CSV file's relative paths start from (default: the file's folder). With ``tta`` > 1
    the metrics are those of test-time augmentation, and ``"tta"`` holds the accuracy without
    it and the paired bootstrap interval of the change.
    """
    if tta != 1:
        check_views(tta)
    run_dir = runs.open_run_dir(run)
    config = Config.load(run_dir / runs.CONFIG_FILE)
    class_names = runs.read_labels(run_dir)
    root = None if root is None else str(root)
    if Path(data).resolve() == Path(config.data).resolve():
        folder = load_image_folder(
            str(data),
            root=config.root if root is None else root,
            val_split=config.val_split,
            test_split=config.test_split,
            seed=config.seed,
        )
        split = folder.test
    else:
        folder = load_image_folder(
            str(data), root=root, val_split=0.0, test_split=0.0, min_classes=1
        )
        split = folder.test if len(folder.test) else _all_images(folder)
    split = _relabel(split, folder.class_names, class_names, data)
    model = runs.load_model(run_dir, len(class_names))
    if tta == 1 or not len(split):
        metrics = metrics_for_split(model, split, class_names, batch_size)
    else:
        plain = predict_split(model, split, batch_size)
        augmented = predict_split(model, split, batch_size, tta=tta)
        metrics = metrics_for_split(model, split, class_names, probabilities=augmented)
        metrics["tta"] = tta_effect(np.asarray(split.labels), plain, augmented, tta)
    metrics["data"] = str(Path(data).resolve())
    metrics["skipped"] = len(folder.skipped)
    files.write_json(run_dir / EVALUATION_FILE, metrics)
    return metrics


def tta_effect(labels: np.ndarray, plain: np.ndarray, augmented: np.ndarray, views: int) -> dict:
    """What test-time augmentation changed: accuracy and macro-F1 without and with it, and the
    paired bootstrap interval of the accuracy change (is it more than noise?)."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = plain.argmax(axis=1)
    correct_plain = predicted == labels
    correct_tta = augmented.argmax(axis=1) == labels
    change = paired_difference(correct_tta, correct_plain)
    return {
        "views": views,
        "transforms": describe(views),
        "accuracy_without": float(correct_plain.mean()),
        "macro_f1_without": float(macro_f1_rows(labels[None], predicted[None], plain.shape[1])[0]),
        "accuracy_change": change["difference"],
        "accuracy_change_ci95": change["ci95"],
        "within_noise": change["within_noise"],
    }


def format_tta(metrics: dict) -> str:
    """One line on the effect of test-time augmentation ('' when it was not used)."""
    tta = metrics.get("tta")
    if not tta:
        return ""
    low, high = tta["accuracy_change_ci95"]
    verdict = "within noise" if tta["within_noise"] else "more than noise"
    return (
        f"test-time augmentation ({tta['views']} views): accuracy {tta['accuracy_without']:.4f}"
        f" -> {metrics['accuracy']:.4f} ({tta['accuracy_change']:+.4f}, 95% paired bootstrap "
        f"{low:+.4f} to {high:+.4f}: {verdict})"
    )


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

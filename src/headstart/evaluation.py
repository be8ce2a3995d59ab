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
    choose_thresholds,
    compute_metrics,
    macro_f1_rows,
    multi_label_metrics,
    paired_difference,
    probabilities_from_logits,
    sigmoid,
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
    if metrics.get("multi_label"):
        return _format_multi_label(metrics)
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


def _format_multi_label(metrics: dict) -> str:
    lines = [
        f"mAP {metrics['map']:.4f} (constant baseline {metrics['map_baseline']:.4f}, "
        f"n={metrics['n_test']})  micro-F1 {metrics['micro_f1']:.4f}  macro-F1 "
        f"{metrics['macro_f1']:.4f}  subset accuracy {metrics['subset_accuracy']:.4f}  "
        f"loss {metrics['loss']:.4f}"
    ]
    names = metrics["class_names"]
    width = max(len("label"), *(len(name) for name in names))
    lines.append(
        f"{'label':<{width}}  {'threshold':>9}  {'precision':>9}  {'recall':>9}  {'F1':>9}  "
        f"{'AP':>9}  {'support':>7}"
    )
    for name in names:
        row = metrics["per_class"][name]
        ap = "-" if row["average_precision"] is None else f"{row['average_precision']:.4f}"
        lines.append(
            f"{name:<{width}}  {row['threshold']:>9.4f}  {row['precision']:>9.4f}  "
            f"{row['recall']:>9.4f}  {row['f1']:>9.4f}  {ap:>9}  {row['support']:>7d}"
        )
    return "\n".join(lines)


PREDICTIONS_FILE = "predictions.csv"


def probabilities_of(logits: np.ndarray, multi_label: bool = False) -> np.ndarray:
    """Logits to probabilities: class probabilities (`probabilities_from_logits`), or for a
    multi-label model each label's own sigmoid."""
    return sigmoid(logits) if multi_label else probabilities_from_logits(logits)


def thresholds_record(class_names: Sequence[str], targets=None, probabilities=None) -> dict:
    """thresholds.json: each label's decision threshold, chosen to give its best F1 on the
    validation images (``targets`` and ``probabilities``); 0.5 each without them (before the
    run has a model to choose with)."""
    if targets is None or not len(targets):
        return {
            "multi_label": True,
            "thresholds": dict.fromkeys(class_names, 0.5),
            "chosen_on": "none yet: 0.5 each",
        }
    chosen = choose_thresholds(targets, probabilities)
    return {
        "multi_label": True,
        "thresholds": {name: c["threshold"] for name, c in zip(class_names, chosen, strict=True)},
        "chosen_on": f"validation ({len(targets)} images): each label's best F1",
        "val_f1": {name: c["f1"] for name, c in zip(class_names, chosen, strict=True)},
    }


def predict_split(model, split: Split, batch_size: int = 32, tta: int = 1) -> np.ndarray:
    """Class probabilities (N, C) of ``model`` for every image of ``split``, in order (for a
    multi-label split, each label's probability); with ``tta`` > 1, averaged over that many
    test-time views (`headstart.tta`)."""
    size = tuple(model.input_shape[1:3])
    dataset = make_dataset(split, size, batch_size=batch_size)
    if tta == 1:
        return probabilities_of(model.predict(dataset, verbose=0), split.multi_label)
    probabilities = keras_probabilities(model)
    return np.concatenate(
        [tta_probabilities(probabilities, np.asarray(images), tta) for images, _ in dataset]
    )


def metrics_for_split(
    model,
    split: Split,
    class_names: Sequence[str],
    batch_size: int = 32,
    probabilities=None,
    thresholds: Sequence[float] | None = None,
) -> dict:
    """Score ``model`` on one split (or its precomputed ``probabilities``); an empty split
    gives ``n_test: 0``. A multi-label split is scored by `multi_label_metrics` at the run's
    ``thresholds``."""
    if len(split) == 0:
        return {"n_test": 0, "note": "no test images"}
    if probabilities is None:
        probabilities = predict_split(model, split, batch_size)
    if split.multi_label:
        return multi_label_metrics(split.targets(), probabilities, class_names, thresholds)
    return compute_metrics(np.asarray(split.labels), probabilities, class_names)


def write_predictions(
    path: str | Path,
    split: Split,
    class_names: Sequence[str],
    probabilities: np.ndarray,
    thresholds: Sequence[float] | None = None,
) -> None:
    """Per-image test predictions (path, true, predicted, confidence, one column per class),
    so figures and error analysis never need to run the model again. Multi-label: the true and
    predicted label sets joined by ';' (at ``thresholds``), and each label's probability."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if split.multi_label:
        writer.writerow(["path", "true", "predicted", *class_names])
        for file, label, row in zip(split.paths, split.labels, probabilities, strict=True):
            called = [n for n, p, t in zip(class_names, row, thresholds, strict=True) if p >= t]
            true = ";".join(class_names[i] for i in label)
            writer.writerow([file, true, ";".join(called), *(f"{p:.6f}" for p in row)])
        files.write_text_atomic(path, buffer.getvalue(), errors="backslashreplace")
        return
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
    thresholds = runs.read_thresholds(run_dir, class_names)
    multi = thresholds is not None  # then DATA is read as multi-label too, else never
    if multi and tta != 1:
        raise UsageError(f"--tta {tta}: test-time augmentation is for single-label runs only")
    root = None if root is None else str(root)
    if Path(data).resolve() == Path(config.data).resolve():
        folder = load_image_folder(
            str(data),
            root=config.root if root is None else root,
            val_split=config.val_split,
            test_split=config.test_split,
            seed=config.seed,
            multi_label=multi,
        )
        split = folder.test
    else:
        folder = load_image_folder(
            str(data),
            root=root,
            val_split=0.0,
            test_split=0.0,
            min_classes=1,
            multi_label=multi,
        )
        split = folder.test if len(folder.test) else _all_images(folder)
    split = _relabel(split, folder.class_names, class_names, data)
    model = runs.load_model(run_dir, len(class_names))
    if tta == 1 or not len(split):
        metrics = metrics_for_split(model, split, class_names, batch_size, thresholds=thresholds)
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
    return Split(
        sum((p.paths for p in parts), ()),
        sum((p.labels for p in parts), ()),
        folder.train.n_labels,
    )


def _relabel(split: Split, data_classes, run_classes, data) -> Split:
    """Map DATA's class indices onto the run's; a class the model never saw is a usage error."""
    unknown = sorted(set(data_classes) - set(run_classes))
    if unknown:
        raise UsageError(f"{data}: classes {unknown} are not among the run's labels {run_classes}")
    index = {name: run_classes.index(name) for name in data_classes}
    if split.multi_label:
        labels = tuple(
            tuple(sorted(index[data_classes[i]] for i in label)) for label in split.labels
        )
        return Split(split.paths, labels, len(run_classes))
    return Split(split.paths, tuple(index[data_classes[label]] for label in split.labels))

"""``headstart report RUN``: the run's figures as PNG files and one self-contained report.html.

Everything is recomputed from the run directory: the model, labels and config are loaded, and
the run's own split is read from its split.json (`headstart.splits.run_split`: the files it
trained, validated and tested on, whether from the seed or from ``--split-from``), so training
passes nothing but the directory. The HTML embeds every
figure as base64 and has no scripts or external links: it opens offline, and can be mailed.
"""

from __future__ import annotations

import base64
import csv
import datetime
import functools
import html
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headstart import figures, files, runs
from headstart.augment import augment_images, build_augmenter
from headstart.check import CHECK_FILE, summary_line
from headstart.config import Config
from headstart.data import make_dataset, read_image
from headstart.errors import UsageError
from headstart.evaluation import PREDICTIONS_FILE
from headstart.explain import gradcam
from headstart.metrics import TOP_K, confusion_matrix, probabilities_from_logits
from headstart.model import infer
from headstart.splits import run_images, run_split

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
TENSORBOARD_DIR = "tensorboard"
FIGURES = {  # file -> title, in report order
    "curves.png": "Training curves",
    "confusion.png": "Confusion matrix",
    "per_class.png": "Per-class scores",
    "reliability.png": "Reliability diagram",
    "errors.png": "Most confidently wrong test images",
    "gradcam.png": "Grad-CAM on test images",
    "samples.png": "Training images",
    "augmentations.png": "Augmentation",
    "model.png": "Model graph",
}
_TEST_FIGURES = ("confusion.png", "per_class.png", "reliability.png", "errors.png", "gradcam.png")
_ERRORS_SHOWN = 12
_GRADCAM_EACH = 4  # correct and wrong test images explained in the report
_STAGE_NAMES = {"head": "stage 1 (head)", "fine_tune": "stage 2 (fine-tuning)"}


# ----------------------------------------------------------------------------- run files


def read_history(run_dir: Path) -> list[dict]:
    """history.csv rows (both stages, in order); empty if the file is missing."""
    path = Path(run_dir) / runs.HISTORY_FILE
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def stage_parameters(summary_text: str) -> list[dict]:
    """Per stage of summary.txt: ``{"stage", "total", "trainable", "non_trainable"}``."""
    stages, current = [], "model"
    for line in summary_text.splitlines():
        header = re.match(r"#\s*(stage .*)", line)
        if header:
            current = header.group(1).strip()
        counts = re.match(r"total=(\d+) trainable=(\d+) non_trainable=(\d+)", line.strip())
        if counts:
            total, trainable, frozen = (int(value) for value in counts.groups())
            stages.append(
                {"stage": current, "total": total, "trainable": trainable, "non_trainable": frozen}
            )
    return stages


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


# ----------------------------------------------------------------------------- figures


@dataclass
class _Notes:
    """What the report says about figures it could not draw, and facts found on the way."""

    missing: dict[str, str] = field(default_factory=dict)  # figure file -> reason
    data: dict | None = None  # split counts, when the data folder could be read
    graph_hint: str | None = None
    split_mismatch: str | None = None
    gradcam_layer: str | None = None


def write_figures(run_dir: Path, folder=None, model=None) -> _Notes:
    """Draw every figure the run's files allow; a figure that fails is noted, never fatal.
    ``model``: the run's model.keras as loaded already (train has it), else loaded here."""
    notes = _Notes()
    config = Config.load(run_dir / runs.CONFIG_FILE)
    class_names = runs.read_labels(run_dir)
    metrics = _read_json(run_dir / runs.METRICS_FILE, {})
    history = read_history(run_dir)
    load_model = functools.cache(lambda: model if model is not None else _load_model(run_dir))

    def attempt(name: str, draw, also: tuple[str, ...] = ()):
        """``draw()``'s value; on failure None, and ``name`` (and ``also``) noted as missing."""
        try:
            return draw()
        except UsageError as error:  # a figure this kind of model has none of: said, not warned
            for missing in (name, *also):
                notes.missing[missing] = f"not drawn: {error}"
            return None
        except Exception as error:  # one broken figure must not cost the others
            if files.is_disk_full(error):  # but a full disk stops the run, to be resumed
                raise
            debug = log.isEnabledFor(logging.DEBUG)
            log.warning("could not draw %s: %s", name, error, exc_info=debug)
            for missing in (name, *also):
                notes.missing[missing] = f"could not be drawn: {error}"
            return None

    if history:
        # model.keras's epoch; a refit run's: the one chosen on validation before the refit
        chosen = metrics.get("saved_from") or metrics.get("validation_choosing_phase", {})
        saved = _saved_epoch(history, chosen)
        attempt(
            "curves.png", lambda: figures.curves(history, run_dir / "curves.png", saved_epoch=saved)
        )
    else:
        notes.missing["curves.png"] = "history.csv is missing or empty"
    multi = bool(metrics.get("multi_label"))
    if multi:  # per-label scores, no single predicted class per image
        for name in ("confusion.png", "reliability.png", "errors.png", "gradcam.png"):
            notes.missing[name] = "not drawn for a multi-label run: see the per-label table"
    if metrics.get("n_test") and multi:
        attempt("per_class.png", lambda: figures.per_class(metrics, run_dir / "per_class.png"))
    elif metrics.get("n_test"):
        matrix, names = metrics["confusion_matrix"], metrics["class_names"]
        attempt(
            "confusion.png", lambda: figures.confusion(matrix, names, run_dir / "confusion.png")
        )
        attempt("per_class.png", lambda: figures.per_class(metrics, run_dir / "per_class.png"))
        if metrics.get("reliability"):
            attempt(
                "reliability.png",
                lambda: figures.reliability(metrics["reliability"], run_dir / "reliability.png"),
            )
        else:
            notes.missing["reliability.png"] = "metrics.json has no calibration data (older run)"
    else:
        for name in _TEST_FIGURES:
            notes.missing[name] = "the run has no test images"

    folder = _load_folder(run_dir, config, notes, folder)
    if folder is not None:
        attempt("samples.png", lambda: _samples(folder, config, run_dir))
        attempt("augmentations.png", lambda: _augmentations(folder, config, run_dir))
        if metrics.get("n_test") and not multi:
            test = attempt(
                "errors.png",
                lambda: (
                    _saved_test_predictions(run_dir, config, class_names, folder, metrics, notes)
                    or _predict_test(load_model(), folder, class_names, metrics, notes)
                ),
                also=("gradcam.png",),
            )
            if test is not None:
                attempt("errors.png", lambda: _errors(test, class_names, run_dir))
                attempt(
                    "gradcam.png", lambda: _gradcam(load_model(), test, class_names, run_dir, notes)
                )
    notes.graph_hint = _graph(load_model, run_dir, notes)
    return notes


def _saved_epoch(history: list[dict], saved_from: dict) -> int | None:
    """The 1-based epoch over both stages that model.keras comes from (``saved_from``: a
    stage and its 1-based epoch)."""
    stage, epoch = saved_from.get("stage"), saved_from.get("epoch")
    if not stage or not epoch:
        return None
    stages = [row.get("stage", "head") for row in history]
    if stage not in stages:
        return None
    position = stages.index(stage) + int(epoch)
    return position if position <= len(history) else None


def _load_folder(run_dir: Path, config: Config, notes: _Notes, folder=None):
    """The run's own data split: ``folder`` when the caller (train) already has it, else the
    files its split.json lists (`headstart.splits.run_split`), as trained: by the seed or by
    ``--split-from``."""
    reason = None
    if folder is None and not Path(run_images(config)).is_dir():
        reason = f"the data folder {run_images(config)} is not there any more"
    elif folder is None:
        data_log = logging.getLogger("headstart.data")
        level = data_log.level
        data_log.setLevel(max(level, logging.ERROR))  # its summary and skip lines: train gave them
        try:
            folder = run_split(run_dir, run_images(config))
        except Exception as error:
            reason = f"the data folder {config.data} could not be read: {error}"
        finally:
            data_log.setLevel(level)
    if reason:
        for name in ("samples.png", "augmentations.png", "errors.png", "gradcam.png"):
            notes.missing[name] = reason
        return None
    n = len(folder.class_names)
    notes.data = {
        "class_names": list(folder.class_names),
        "train": folder.train.counts(n),
        "val": folder.val.counts(n),
        "test": folder.test.counts(n),
        "layout": folder.layout,
    }
    return folder


def _size(config: Config) -> tuple[int, int]:
    return (int(config.image_size), int(config.image_size))


def _samples(folder, config: Config, run_dir: Path) -> None:
    """Training images taken round-robin over the classes: 9 (3x3) or 20 for many classes."""

    n_classes = len(folder.class_names)
    count, columns = (9, 3) if n_classes <= 4 else (20, 5)
    by_class: dict[int, list[str]] = {}
    for path, label in zip(folder.train.paths, folder.train.labels, strict=True):
        by_class.setdefault(label, []).append(path)
    chosen: list[tuple[str, int]] = []
    for rank in range(count):
        for label in sorted(by_class):
            if len(chosen) < count and rank < len(by_class[label]):
                chosen.append((by_class[label][rank], label))
    images = [read_image(path, _size(config)) for path, _ in chosen]
    names = folder.class_names
    labels = [
        ";".join(names[i] for i in label) or "(no label)"
        if isinstance(label, tuple)
        else names[label]
        for _, label in chosen
    ]
    figures.samples(images, labels, run_dir / "samples.png", columns=columns)


def _augmentations(folder, config: Config, run_dir: Path) -> None:
    """The first training image and 9 versions through the run's own augmentation layers."""
    image = read_image(folder.train.paths[0], _size(config))
    augmenter = build_augmenter(config.augment, config.seed)
    augmented = []
    if augmenter is not None:
        batch = np.repeat(image[None].astype("float32"), 9, axis=0)
        augmented = list(augment_images(augmenter, batch))
    figures.augmentations(image, augmented, config.augment, run_dir / "augmentations.png")


def _load_model(run_dir: Path):
    return runs.load_model(run_dir, len(runs.read_labels(run_dir)))


@dataclass
class _TestPredictions:
    paths: tuple[str, ...]
    size: tuple[int, int]
    labels: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray  # probability of the predicted class


def _saved_test_predictions(run_dir: Path, config: Config, class_names, folder, metrics, notes):
    """The test predictions train wrote (predictions.csv), when they match the data folder:
    no second pass of the model over the test set."""
    path = run_dir / PREDICTIONS_FILE
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if [row["path"] for row in rows] != list(folder.test.paths):
        return None  # the data folder changed since training: recompute and say so
    index = {name: i for i, name in enumerate(class_names)}
    test = _TestPredictions(
        tuple(row["path"] for row in rows),
        (config.image_size, config.image_size),
        np.array([index[row["true"]] for row in rows]),
        np.array([index[row["predicted"]] for row in rows]),
        np.array([float(row["confidence"]) for row in rows]),
    )
    _check_against_metrics(test, class_names, metrics, notes)
    return test


def _predict_test(model, folder, class_names, metrics: dict, notes: _Notes) -> _TestPredictions:
    """The saved model on the re-created test split, checked against metrics.json."""
    if list(folder.class_names) != list(class_names):
        raise ValueError("the data folder's classes differ from the run's labels")
    size = tuple(model.input_shape[1:3])
    split = folder.test
    logits = [infer(model, np.asarray(x)) for x, _ in make_dataset(split, size)]
    probabilities = probabilities_from_logits(np.concatenate(logits))
    test = _TestPredictions(
        split.paths,
        size,
        np.asarray(split.labels),
        probabilities.argmax(axis=1),
        probabilities.max(axis=1),
    )
    _check_against_metrics(test, class_names, metrics, notes)
    return test


def _check_against_metrics(test: _TestPredictions, class_names, metrics: dict, notes) -> None:

    matrix = confusion_matrix(test.labels, test.predicted, len(class_names)).tolist()
    if matrix != metrics.get("confusion_matrix"):
        notes.split_mismatch = (
            "The test split re-created from the data folder does not give the confusion matrix "
            "of metrics.json: the data folder has changed since training."
        )


def _errors(test: _TestPredictions, class_names, run_dir: Path) -> None:

    shown = ranked_errors(test.labels, test.predicted, test.confidence)[:_ERRORS_SHOWN]
    figures.errors(
        [read_image(test.paths[i], test.size) for i in shown],
        [class_names[test.labels[i]] for i in shown],
        [class_names[test.predicted[i]] for i in shown],
        [float(test.confidence[i]) for i in shown],
        run_dir / "errors.png",
        n_test=len(test.paths),
    )


def _gradcam(model, test: _TestPredictions, class_names, run_dir: Path, notes: _Notes) -> None:
    """Grad-CAM of the most confident right answers (one per class first) and wrong ones."""

    labels, predicted, confidence = test.labels, test.predicted, test.confidence
    right = _one_per_class(np.flatnonzero(predicted == labels), labels, confidence)
    wrong = ranked_errors(labels, predicted, confidence)
    chosen = list(right[:_GRADCAM_EACH]) + list(wrong[:_GRADCAM_EACH])
    images = np.stack([read_image(test.paths[i], test.size) for i in chosen])
    result = gradcam(model, images)
    notes.gradcam_layer = result.layer
    short = figures.short
    titles = [
        f"{'right' if predicted[i] == labels[i] else 'wrong'}: {short(class_names[labels[i]])}"
        f"\npredicted {short(class_names[predicted[i]])} ({confidence[i]:.2f})"
        for i in chosen
    ]
    figures.gradcam_grid(images, result.heatmaps, titles, run_dir / "gradcam.png")


def ranked_errors(labels, predicted, confidence) -> np.ndarray:
    """Indices of the wrong predictions, most confident first (ties keep test-set order)."""
    labels, predicted, confidence = (np.asarray(a) for a in (labels, predicted, confidence))
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-confidence[wrong], kind="stable")]


def _one_per_class(indices: np.ndarray, labels: np.ndarray, confidence: np.ndarray) -> list[int]:
    """Most confident first, at most one image per class before any class repeats."""
    ordered = sorted(indices, key=lambda i: -confidence[i])
    first, rest, seen = [], [], set()
    for i in ordered:
        (rest if labels[i] in seen else first).append(int(i))
        seen.add(labels[i])
    return first + rest


def _graph(load_model, run_dir: Path, notes: _Notes) -> str | None:
    if not figures.graph_tools_available():
        notes.missing["model.png"] = figures.GRAPH_HINT
        return figures.GRAPH_HINT
    try:
        return figures.model_graph(load_model(), run_dir / "model.png")
    except Exception as error:
        if files.is_disk_full(error):
            raise
        notes.missing["model.png"] = f"could not be drawn: {error}"
        return None


# ----------------------------------------------------------------------------- HTML


def redraw(run_dir: str | Path, *, folder=None, model=None) -> Path | None:
    """`report`, for a verb that has just changed a run (train, calibrate, ensemble): a failure
    to draw is logged as a warning and never loses the run itself; a full disk is raised
    (`headstart.errors.DiskFullError`), so that a run stops where it can be resumed."""
    try:
        return report(run_dir, folder=folder, model=model)
    except Exception as error:
        if files.is_disk_full(error):
            raise
        debug = log.isEnabledFor(logging.DEBUG)
        log.warning("report not written (the run itself is complete): %s", error, exc_info=debug)
        return None


def report(run: str | Path, *, folder=None, model=None) -> Path:
    """Draw the run's figures and write ``RUN/report.html``; returns the report's path.

    ``folder`` is the run's ImageFolder when the caller has it (train does): the data folder is
    then not scanned and checked a second time; ``model`` likewise its model.keras, loaded."""
    run_dir = runs.open_run_dir(run)
    notes = write_figures(run_dir, folder, model)
    page = _html(run_dir, notes)
    path = run_dir / REPORT_FILE
    files.write_text_atomic(path, page)
    return path


_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       color: #1d2330; background: #f6f7f9; }
header { background: #1a4f9c; color: white; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 0; opacity: .9; }
nav { padding: 8px 32px; background: #e4eaf4; font-size: 14px; }
nav a { margin-right: 14px; color: #1a4f9c; }
main { padding: 8px 32px 32px; max-width: 1200px; }
section { background: white; margin: 16px 0; padding: 8px 20px 16px; border-radius: 6px;
          box-shadow: 0 1px 3px rgba(0,0,0,.12); }
h2 { font-size: 20px; border-bottom: 1px solid #dde3ec; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border: 1px solid #d5dbe5; padding: 3px 10px; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eef2f8; }
figure { margin: 12px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e2e6ec; }
figcaption { font-size: 13px; color: #555; }
pre { font-size: 11px; line-height: 1.2; overflow-x: auto; background: #f8f9fb; padding: 8px; }
.note { color: #8a5a00; background: #fff6e0; padding: 6px 10px; border-radius: 4px; }
.big { font-size: 30px; font-weight: 600; color: #1a4f9c; }
"""


def _html(run_dir: Path, notes: _Notes) -> str:
    config = _read_json(run_dir / runs.CONFIG_FILE, {})
    metrics = _read_json(run_dir / runs.METRICS_FILE, {})
    name = run_dir.resolve().name
    sections = [
        ("result", "Result", _result_section(metrics, notes)),
        ("curves", "Training", _figure(run_dir, "curves.png", notes, _curves_caption(metrics))),
        ("choices", "Choices", _choices_section(config)),
        ("test", "Test set", _test_section(run_dir, metrics, notes)),
        ("gradcam", "Grad-CAM", _gradcam_section(run_dir, notes)),
        ("data", "Data", _data_section(run_dir, config, notes)),
        ("model", "Model", _model_section(run_dir, notes)),
        ("config", "Configuration", _config_section(run_dir, config)),
    ]
    accuracy = metrics.get("accuracy")
    mean_ap = metrics.get("map")
    subtitle = " · ".join(
        part
        for part in (
            f"{config.get('backbone', '?')} at {config.get('image_size', '?')} px",
            f"mode {config.get('mode', '?')}",
            f"test accuracy {accuracy:.4f}" if isinstance(accuracy, float | int) else "",
            f"multi-label, test mAP {mean_ap:.4f}" if isinstance(mean_ap, float | int) else "",
            f"report written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        )
        if part
    )
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections)
    body = "".join(
        f'<section id="{key}"><h2>{title}</h2>{content}</section>'
        for key, title, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>headstart report: {_e(name)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>headstart report: {_e(name)}</h1><p>{_e(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(header, rows, numeric=()) -> str:
    def cell(tag, index, value):
        cls = ' class="n"' if index in numeric else ""
        return f"<{tag}{cls}>{_e(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(run_dir: Path, file: str, notes: _Notes, caption: str = "") -> str:
    path = run_dir / file
    if file in notes.missing or not path.is_file():
        reason = notes.missing.get(file, "not drawn")
        return f'<p class="note">{_e(FIGURES.get(file, file))}: {_e(reason)}</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption_html = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return (
        f'<figure><img alt="{_e(FIGURES.get(file, file))}" src="data:image/png;base64,{data}">'
        f"{caption_html}</figure>"
    )


def _figure_section(run_dir: Path, notes: _Notes, files: list[str]) -> str:
    return "".join(_figure(run_dir, file, notes, f"{file}") for file in files)


def _curves_caption(metrics: dict) -> str:
    if not metrics.get("refit"):
        return "curves.png"
    return (
        "curves.png: the choosing phase (trained on the training images; the star marks the "
        "epoch chosen on validation), then the refit on training + validation images for the "
        "chosen epochs: training curves only, as validation is part of its training data"
    )


def _calibration_text(record: dict) -> str:
    return (
        f"T = {record['temperature']:.3f}, validation ECE {record['val_ece_before']:.4f} → "
        f"{record['val_ece_after']:.4f}"
    )


def _result_section(metrics: dict, notes: _Notes) -> str:
    if not metrics.get("n_test"):
        return '<p class="note">No test images: the run has no test metrics.</p>'
    if metrics.get("multi_label"):
        return _multi_label_result(metrics)
    saved = metrics.get("saved_from", {})
    rows = [
        ("test accuracy", f"{metrics['accuracy']:.4f}{_interval(metrics, 'accuracy_ci95')}"),
        ("balanced accuracy", f"{metrics['balanced_accuracy']:.4f}"),
        ("macro-F1", f"{metrics['macro_f1']:.4f}{_interval(metrics, 'macro_f1_ci95')}"),
        ("test loss", f"{metrics['loss']:.4f}"),
        ("test images", metrics["n_test"]),
    ]
    rows += [
        (f"top-{k} accuracy", f"{metrics[f'top_{k}_accuracy']:.4f}")
        for k in TOP_K
        if f"top_{k}_accuracy" in metrics
    ]
    if metrics.get("roc_auc") is not None:
        rows.append(("ROC-AUC (one-vs-rest, mean over classes)", f"{metrics['roc_auc']:.4f}"))
    if "ece" in metrics:
        bins = metrics.get("reliability", {}).get("bins", "?")
        rows.append(("expected calibration error", f"{metrics['ece']:.4f} ({bins} bins)"))
    if metrics.get("calibration"):  # --calibrate / headstart calibrate
        rows.append(("temperature scaling", _calibration_text(metrics["calibration"])))
    if metrics.get("class_weight"):
        rows.append(("class weights", metrics["class_weight"]))
    if "train_seconds" in metrics:
        rows.append(("training time", f"{metrics['train_seconds']:.1f} s"))
    if saved.get("stage"):
        stage = _STAGE_NAMES.get(saved["stage"], saved["stage"])
        rows.append(
            ("model.keras", f"{stage}, epoch {saved['epoch']}, val loss {saved['val_loss']:.4f}")
        )
    chosen = metrics.get("validation_choosing_phase", {})
    if chosen.get("stage"):  # refit: the validation figures are those of the choosing phase
        epochs = metrics["refit_epochs"]
        rows.append(
            (
                "model.keras",
                f"refit on {metrics['refit_images']} training + validation images, stage 1 "
                f"{epochs['head']} epochs, stage 2 {epochs['fine_tune']} epochs",
            )
        )
        stage = _STAGE_NAMES.get(chosen["stage"], chosen["stage"])
        rows.append(
            (
                "validation (choosing phase)",
                f"accuracy {chosen['val_accuracy']:.4f}, loss {chosen['val_loss']:.4f} "
                f"({stage}, epoch {chosen['epoch']}, trained on the training images only)",
            )
        )
    text = (
        f'<p><span class="big">{metrics["accuracy"]:.1%}</span> of {metrics["n_test"]} '
        "held-out test images classified correctly.</p>"
    )
    mismatch = f'<p class="note">{_e(notes.split_mismatch)}</p>' if notes.split_mismatch else ""
    method = f"<p>Intervals: {_e(metrics['ci_method'])}.</p>" if "ci_method" in metrics else ""
    return text + mismatch + _table(("", "value"), rows, numeric=(1,)) + method


def _multi_label_result(metrics: dict) -> str:
    rows = [
        ("test mAP (mean average precision over labels)", f"{metrics['map']:.4f}"),
        ("constant baseline mAP (same scores for every image)", f"{metrics['map_baseline']:.4f}"),
        ("micro-F1 (every image-label decision)", f"{metrics['micro_f1']:.4f}"),
        ("macro-F1 (mean over labels)", f"{metrics['macro_f1']:.4f}"),
        ("subset accuracy (whole label set right)", f"{metrics['subset_accuracy']:.4f}"),
        ("test loss (binary cross-entropy)", f"{metrics['loss']:.4f}"),
        ("test images", metrics["n_test"]),
    ]
    if "train_seconds" in metrics:
        rows.append(("training time", f"{metrics['train_seconds']:.1f} s"))
    saved = metrics.get("saved_from", {})
    if saved.get("stage"):
        stage = _STAGE_NAMES.get(saved["stage"], saved["stage"])
        rows.append(
            ("model.keras", f"{stage}, epoch {saved['epoch']}, val loss {saved['val_loss']:.4f}")
        )
    text = (
        f'<p><span class="big">{metrics["map"]:.3f}</span> mean average precision over '
        f"{len(metrics['class_names'])} labels on {metrics['n_test']} held-out test images "
        "(multi-label: each label is its own yes/no, decided at its threshold).</p>"
    )
    return text + _table(("", "value"), rows, numeric=(1,))


def _interval(metrics: dict, key: str) -> str:
    """' (95% CI 0.81-0.88)' when metrics.json has the interval, else ''."""
    low_high = metrics.get(key)
    return f" (95% CI {low_high[0]:.4f}-{low_high[1]:.4f})" if low_high else ""


def _test_section(run_dir: Path, metrics: dict, notes: _Notes) -> str:
    if metrics.get("multi_label"):
        return _multi_label_test(run_dir, metrics, notes)
    parts = [_figure(run_dir, "confusion.png", notes, "confusion.png: rows are true classes")]
    if metrics.get("n_test"):
        rows = [
            (
                name,
                f"{m['precision']:.4f}",
                f"{m['recall']:.4f}",
                f"{m['f1']:.4f}",
                m["support"],
            )
            for name, m in metrics["per_class"].items()
        ]
        parts.append(_table(("class", "precision", "recall", "F1", "support"), rows, (1, 2, 3, 4)))
    parts.append(_figure(run_dir, "per_class.png", notes, "per_class.png"))
    parts.append(
        _figure(
            run_dir,
            "reliability.png",
            notes,
            "reliability.png: how often the model is right at each confidence; bars below the "
            "diagonal are over-confident",
        )
    )
    parts.append(_figure(run_dir, "errors.png", notes, "errors.png"))
    return "".join(parts)


def _multi_label_test(run_dir: Path, metrics: dict, notes: _Notes) -> str:
    """The per-label table (a multi-label run has no confusion matrix)."""
    if not metrics.get("n_test"):
        return '<p class="note">No test images.</p>'
    rows = [
        (
            name,
            f"{m['threshold']:.4f}",
            f"{m['precision']:.4f}",
            f"{m['recall']:.4f}",
            f"{m['f1']:.4f}",
            "-" if m["average_precision"] is None else f"{m['average_precision']:.4f}",
            m["support"],
        )
        for name, m in metrics["per_class"].items()
    ]
    header = ("label", "threshold", "precision", "recall", "F1", "AP", "support")
    intro = (
        "<p>Per label: the decision threshold chosen on validation (its best F1 there), then "
        "precision, recall and F1 at that threshold, average precision, and the test images "
        "carrying the label.</p>"
    )
    table = _table(header, rows, (1, 2, 3, 4, 5, 6))
    return intro + table + _figure(run_dir, "per_class.png", notes, "per_class.png")


def _gradcam_section(run_dir: Path, notes: _Notes) -> str:
    layer = f" on {notes.gradcam_layer}" if notes.gradcam_layer else ""
    intro = (
        f"<p>Grad-CAM{_e(layer)}: the most confident right answers (up to one per class) and "
        "the most confident wrong ones. <code>headstart explain RUN IMAGE…</code> draws "
        "the same for any image.</p>"
    )
    return intro + _figure(run_dir, "gradcam.png", notes, "gradcam.png")


def _data_section(run_dir: Path, config: dict, notes: _Notes) -> str:
    parts = [f"<p>Data folder: <code>{_e(config.get('data', '?'))}</code></p>"]
    check = _read_json(run_dir / CHECK_FILE, None)
    if isinstance(check, dict):
        parts.append(f"<p>{_e(summary_line(check))}</p>")
        parts.extend(f'<p class="note">{_e(warning)}</p>' for warning in check.get("warnings", []))
    if notes.data:
        data = notes.data
        rows = []
        for i, name in enumerate(data["class_names"]):
            counts = [data[split][i] for split in ("train", "val", "test")]
            rows.append((name, *counts, sum(counts)))
        totals = [sum(data[split]) for split in ("train", "val", "test")]
        rows.append(("all classes", *totals, sum(totals)))
        parts.append(_table(("class", "train", "val", "test", "total"), rows, (1, 2, 3, 4)))
    skipped = [line for line in _read_text(run_dir / runs.SKIPPED_FILE).splitlines() if line]
    if skipped:
        shown = "\n".join(skipped[:50]) + (
            f"\n… {len(skipped) - 50} more" if len(skipped) > 50 else ""
        )
        parts.append(
            f"<p>{len(skipped)} unreadable files were skipped (skipped.txt):</p>"
            f"<pre>{_e(shown)}</pre>"
        )
    else:
        parts.append("<p>No unreadable files were skipped.</p>")
    parts.append(_figure(run_dir, "samples.png", notes, "samples.png"))
    parts.append(_figure(run_dir, "augmentations.png", notes, "augmentations.png"))
    return "".join(parts)


def _model_section(run_dir: Path, notes: _Notes) -> str:
    summary = _read_text(run_dir / runs.SUMMARY_FILE)
    stages = stage_parameters(summary)
    rows = [
        (s["stage"], f"{s['total']:,}", f"{s['trainable']:,}", f"{s['non_trainable']:,}")
        for s in stages
    ]
    parts = [_table(("stage", "total", "trainable", "non-trainable"), rows, (1, 2, 3))]
    if notes.graph_hint:
        parts.append(f'<p class="note">{_e(notes.graph_hint)}</p>')
    else:
        parts.append(_figure(run_dir, "model.png", notes, "model.png (keras.utils.plot_model)"))
    if summary:
        parts.append(
            "<details><summary>model.summary(show_trainable=True) per stage</summary>"
            f"<pre>{_e(summary)}</pre></details>"
        )
    return "".join(parts)


_CHOICES = (("feature_norm", "head input"), ("augment", "augmentation"), ("fine_tune_lr", "rate"))


def _choices_section(config: dict) -> str:
    """Each choice's candidates: their score (mean ± standard error over the folds, or on
    the validation split), and which was best and which chosen (`headstart.training.choose`)."""
    noise, rows = config.get("choice_noise") or {}, []
    for key, what in _CHOICES:
        record = noise.get(key, {})
        for name, score in (config.get(f"{key}_scores") or {}).items():
            if score.get("val_accuracy") is None:
                text = "not better than stage 1"
            else:
                text = f"accuracy {score['val_accuracy']:.4f}, loss {score['val_loss']:.4f}"
                if "se" in score:
                    text += f" ({len(score['fold_scores'])} folds, ± {score['se']:.4f})"
                elif "paired_se" in score:
                    text += f" (paired ± {score['paired_se']:.4f} against the best)"
            marks = [m for m, on in (("best", name == record.get("best")),) if on]
            if name == str(config.get(key)):
                marks.append("chosen")
            if score.get("within_one_se") and name != record.get("best"):
                marks.append("within one standard error of the best")
            rows.append((what, name, text, ", ".join(marks)))
    if not rows:
        return "<p>No choice was made on the labelled images (every setting was given).</p>"
    verdicts = [
        f"{what}: {record['method']}, "
        + ("within noise (kept the simpler)" if record["within_noise"] else "beyond noise")
        for key, what in _CHOICES
        if (record := noise.get(key))
    ]
    note = f"<p>{_e('; '.join(verdicts))}.</p>" if verdicts else ""
    return _table(("choice", "candidate", "score", ""), rows) + note


def _config_section(run_dir: Path, config: dict) -> str:
    rows = [(key, json.dumps(value)) for key, value in sorted(config.items())]
    parts = [_table(("setting", "value"), rows)]
    if (run_dir / TENSORBOARD_DIR).is_dir():
        parts.append(
            f"<p>TensorBoard logs: <code>tensorboard --logdir {_e(run_dir / TENSORBOARD_DIR)}"
            "</code> (<code>pip install tensorboard</code>).</p>"
        )
    return "".join(parts)

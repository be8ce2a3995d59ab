"""Temperature scaling (Guo et al. 2017): honest confidences at no cost in accuracy.

A fine-tuned network is often over-confident: "99% sure" is right 90% of the time. Dividing
the logits by one number T > 1, fitted on the validation split to minimise the negative
log-likelihood, fixes most of that; it never changes which class is predicted. T is saved
inside ``model.keras`` as a standard ``keras.layers.Rescaling(1/T)`` after the logits, so
the file still loads with plain ``keras.saving.load_model`` and ``predict``, ``evaluate``,
``serve`` and ``export`` need no change.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import keras
import numpy as np

from headstart import files, runs
from headstart.config import Config
from headstart.data import Split, make_dataset
from headstart.errors import UsageError
from headstart.evaluation import (
    PREDICTIONS_FILE,
    metrics_for_split,
    predict_split,
    write_predictions,
)
from headstart.metrics import EPSILON, calibration, probabilities_from_logits
from headstart.model import TEMPERATURE_NAME
from headstart.splits import run_images, run_split

log = logging.getLogger(__name__)

T_RANGE = (0.05, 20.0)  # searched on a log scale; the NLL has one minimum in 1/T (convex)
_GOLDEN = (math.sqrt(5) - 1) / 2
_STEPS = 60  # golden-section steps: the bracket shrinks to 1e-12 of its log width


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``logits / temperature``."""
    probabilities = probabilities_from_logits(np.asarray(logits, np.float64) / temperature)
    p_true = probabilities[np.arange(len(labels)), np.asarray(labels, np.int64)]
    return float(np.mean(-np.log(np.clip(p_true, EPSILON, 1.0))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in `T_RANGE` that minimises the NLL: a golden-section search over log T (the NLL
    is convex in 1/T, so it has a single minimum there)."""
    low, high = (math.log(t) for t in T_RANGE)
    a, b = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    loss_a, loss_b = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(_STEPS):
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - _GOLDEN * (high - low)
            loss_a = nll(logits, labels, math.exp(a))
        else:
            low, a, loss_a = a, b, loss_b
            b = low + _GOLDEN * (high - low)
            loss_b = nll(logits, labels, math.exp(b))
    return math.exp((low + high) / 2)


def choose_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """`fit_temperature`, except on a validation split with no error: there the NLL only falls
    as T -> 0, which would make the model surer of itself with nothing to justify it, so T
    stays 1."""
    predicted = probabilities_from_logits(logits).argmax(axis=1)
    return fit_temperature(logits, labels) if np.any(predicted != labels) else 1.0


def logits_model(model: keras.Model) -> keras.Model:
    """``model`` without its temperature (itself when it has none): the raw logits."""
    names = [layer.name for layer in model.layers]
    if TEMPERATURE_NAME not in names:
        return model
    logits = model.get_layer(TEMPERATURE_NAME).input
    return keras.Model(model.input, logits, name=model.name)


def with_temperature(model: keras.Model, temperature: float) -> keras.Model:
    """The same model (shared layers and weights) with its logits divided by ``temperature``;
    a temperature already there is replaced, not stacked."""
    plain = logits_model(model)
    scaled = keras.layers.Rescaling(1.0 / temperature, name=TEMPERATURE_NAME)(plain.output)
    return keras.Model(plain.input, scaled, name=plain.name)


def predict_logits(model: keras.Model, split: Split, batch_size: int = 32) -> np.ndarray:
    size = tuple(model.input_shape[1:3])
    return np.asarray(model.predict(make_dataset(split, size, batch_size=batch_size), verbose=0))


def calibrate_model(
    model: keras.Model, val: Split, batch_size: int = 32
) -> tuple[keras.Model, dict]:
    """Fit T on the validation split's logits; returns the calibrated model and what to record
    in metrics.json (T, validation NLL and ECE before and after)."""
    if len(val) == 0:
        raise UsageError("--calibrate needs validation images: give a positive --val-split")
    plain = logits_model(model)
    logits = predict_logits(plain, val, batch_size)
    labels = np.asarray(val.labels, dtype=np.int64)
    temperature = choose_temperature(logits, labels)
    errors = int(np.sum(probabilities_from_logits(logits).argmax(axis=1) != labels))

    def ece(t: float) -> float:
        return calibration(labels, probabilities_from_logits(logits / t))["ece"]

    record = {
        "method": "temperature scaling, T fitted on validation to minimise NLL",
        "temperature": round(temperature, 6),
        "n_val": int(labels.size),
        "val_errors": errors,
        "val_nll_before": nll(logits, labels),
        "val_nll_after": nll(logits, labels, temperature),
        "val_ece_before": ece(1.0),
        "val_ece_after": ece(temperature),
    }
    if not errors:
        record["note"] = "no validation errors: T kept at 1 (nothing to calibrate against)"
    log.info(
        "calibrated: T = %.3f, validation ECE %.4f -> %.4f, NLL %.4f -> %.4f",
        temperature,
        record["val_ece_before"],
        record["val_ece_after"],
        record["val_nll_before"],
        record["val_nll_after"],
    )
    return with_temperature(plain, temperature), record


def calibrate(run: str | Path, *, batch_size: int = 32) -> dict:
    """``headstart calibrate RUN``: temperature-scale a finished run on its own validation
    split (from split.json) and rescore its test split; model.keras, metrics.json,
    predictions.csv and config.json (``calibrate: true``) are rewritten (the caller redraws the
    report: `headstart.report.redraw`).
    Accuracy is unchanged; the confidences, loss and ECE are those of the calibrated model."""
    run_dir = runs.open_run_dir(run)
    runs.refuse_multi_label(run_dir, "calibrate (temperature scaling of class probabilities)")
    if runs.was_refit(run_dir):
        raise UsageError(
            f"{run_dir}: model.keras was refit on the training and validation images, so T "
            f"cannot be fitted on validation any more: train with --calibrate (T from the model "
            f"chosen on validation) or --no-refit"
        )
    config = Config.load(run_dir / runs.CONFIG_FILE)
    class_names = runs.read_labels(run_dir)
    folder = run_split(run_dir, run_images(config))
    model = runs.load_model(run_dir, len(class_names))
    model, record = calibrate_model(model, folder.val, batch_size)
    files.save_model_atomic(model, run_dir / runs.MODEL_FILE)
    metrics_file = run_dir / runs.METRICS_FILE
    metrics = runs.read_json(metrics_file) if metrics_file.is_file() else {}
    if len(folder.test):
        probabilities = predict_split(model, folder.test, batch_size)
        metrics.update(
            metrics_for_split(model, folder.test, class_names, probabilities=probabilities)
        )
        write_predictions(run_dir / PREDICTIONS_FILE, folder.test, class_names, probabilities)
    metrics["calibration"] = record
    files.write_json(metrics_file, metrics)
    config.calibrate = True
    config.save(run_dir / runs.CONFIG_FILE)
    return metrics


def format_calibration(metrics: dict) -> str:
    """One line: T and what it did on validation (and the test ECE now); '' without it."""
    record = metrics.get("calibration")
    if not record:
        return ""
    line = (
        f"temperature scaling: T = {record['temperature']:.3f} (fitted on {record['n_val']} "
        f"validation images), validation ECE {record['val_ece_before']:.4f} -> "
        f"{record['val_ece_after']:.4f}, NLL {record['val_nll_before']:.4f} -> "
        f"{record['val_nll_after']:.4f}"
    )
    if "ece" in metrics:
        line += f"; test ECE now {metrics['ece']:.4f}, accuracy unchanged"
    return line + (f" ({record['note']})" if "note" in record else "")

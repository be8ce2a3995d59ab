"""`headstart ensemble`: several runs' class probabilities averaged into one saved model.

The advanced-tools chapter's ``0.25 * (a + b + c + d)`` and its weighted form, made a run:
the members are sub-models of one functional model ("models used as layers") that takes raw
images at the largest member's size and resizes them inside for each member. The model outputs
the logits of the weighted mean probability, so the ensemble run folder is like any other:
`evaluate`, `predict`, `report`, `compare`, `serve` and `export` work on it unchanged.

``weights="fit"`` chooses non-negative weights summing to 1 that minimise the log-loss on the
members' shared **validation** split; the test split is only used afterwards, to score the
result.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from headstart import files, runs
from headstart._version import __version__
from headstart.config import Config
from headstart.errors import UsageError
from headstart.evaluation import (
    PREDICTIONS_FILE,
    metrics_for_split,
    predict_split,
    write_predictions,
)
from headstart.layers import ProbabilityAverage
from headstart.metrics import EPSILON
from headstart.splits import run_images, run_split

log = logging.getLogger(__name__)

ENSEMBLE_BACKBONE = "ensemble"  # config.json's backbone for an ensemble run


@dataclass
class EnsembleResult:
    run_dir: Path
    metrics: dict
    weights: list[float]


def ensemble(
    members: Sequence[str | Path],
    out: str | None = None,
    *,
    weights: str | Sequence[float] | None = None,
    batch_size: int = 32,
    test_from_members: bool = False,
) -> EnsembleResult:
    """Combine finished runs into one ensemble run in ``out``, scored on their test split.

    ``weights``: None for the plain mean; a list (one non-negative number per member, rescaled
    to sum to 1); or "fit" to choose them on the validation split (`fit_weights`). The members
    must share labels.json and split.json (train them with ``--split-from`` the first).
    ``test_from_members``: score the test split from the members' own test probabilities
    (their predictions.csv, `member_test_probabilities`) where every member has them: the
    ensemble's are their weighted mean, as its model computes them, so the test images need
    not run through every member again.
    """
    if len(members) < 2:
        raise UsageError("ensemble needs at least two runs")
    run_dirs = [runs.open_run_dir(run) for run in members]
    for run_dir in run_dirs:
        runs.refuse_multi_label(run_dir, "ensemble")
    class_names = _shared(run_dirs, runs.LABELS_FILE, "trained on the same classes")
    manifest = _shared(
        run_dirs, runs.SPLIT_FILE, f"split alike: train them with --split-from {run_dirs[0]}"
    )
    config = Config.load(run_dirs[0] / runs.CONFIG_FILE)
    given = _parse_weights(weights, len(run_dirs))
    refit = [str(run) for run in run_dirs if runs.was_refit(run)]
    if given == "fit" and refit:
        raise UsageError(
            f"--weights fit: {', '.join(refit)} refit on the training and validation images, "
            f"so weights cannot be fitted on validation: train the members with --no-refit, "
            f"or give weights"
        )
    folder = _load_split(run_dirs[0], config)
    models = [runs.load_model(run, len(class_names)) for run in run_dirs]
    fitted = {}
    if given == "fit":
        validation = [predict_split(model, folder.val, batch_size) for model in models]
        given = fit_weights(validation, np.asarray(folder.val.labels))
        fitted = {
            "val_loss": _log_loss(validation, given, folder.val.labels),
            "member_val_loss": [_log_loss([p], [1.0], folder.val.labels) for p in validation],
        }
    model = build_ensemble(models, given)
    run_dir = runs.new_run_dir(out)
    files.save_model_atomic(model, run_dir / runs.MODEL_FILE)
    size = int(model.input_shape[1])
    record = {
        "members": [str(run.resolve()) for run in run_dirs],
        "weights": list(given),
        "weights_from": "fit" if weights == "fit" else ("given" if weights else "mean"),
        **fitted,
    }
    _write_config(run_dir, config, size, record)
    files.write_json(run_dir / runs.LABELS_FILE, class_names)
    files.write_json(run_dir / runs.SPLIT_FILE, manifest)
    given_test = None
    if test_from_members and len(folder.test):
        own = [member_test_probabilities(r, folder.test.paths, class_names) for r in run_dirs]
        if all(p is not None for p in own):
            given_test = sum(w * p for w, p in zip(given, own, strict=True))
    metrics = _score(run_dir, model, folder, class_names, batch_size, given_test)
    metrics["ensemble"] = {**record, "member_accuracy": _member_accuracies(run_dirs)}
    files.write_json(run_dir / runs.METRICS_FILE, metrics)
    return EnsembleResult(run_dir, metrics, list(given))


def build_ensemble(models: Sequence[keras.Model], weights: Sequence[float]) -> keras.Model:
    """One functional model over ``models`` (each a sub-model, renamed ``member_<i>``): images
    at the largest member's size in, resized for each smaller member, weighted mean out."""
    height = max(int(m.input_shape[1]) for m in models)
    width = max(int(m.input_shape[2]) for m in models)
    inputs = keras.Input((height, width, 3), name="image")
    logits = []
    for i, member in enumerate(models):
        member = keras.Model(member.input, member.output, name=f"member_{i}")
        h, w = (int(d) for d in member.input_shape[1:3])
        x = inputs
        if (h, w) != (height, width):
            x = layers.Resizing(h, w, name=f"resize_{i}")(inputs)
        logits.append(member(x, training=False))  # never trained: dropout stays out
    outputs = ProbabilityAverage(weights, name="average")(logits)
    return keras.Model(inputs, outputs, name="headstart_ensemble")


def fit_weights(probabilities: Sequence[np.ndarray], labels: np.ndarray) -> list[float]:
    """Non-negative weights summing to 1 that minimise the log-loss of the weighted mean of
    ``probabilities`` (one (N, C) array per member) on ``labels``.

    The loss is convex in the weights, so SLSQP from the plain mean finds the optimum; on a
    nearly flat loss (members that barely differ) it may stop early, so the answer is never
    worse than the best single member."""
    from scipy.optimize import minimize

    labels = np.asarray(labels, dtype=np.int64)
    p_true = np.stack([np.asarray(p)[np.arange(labels.size), labels] for p in probabilities], 1)
    n = p_true.shape[1]

    def loss(w):
        return -np.mean(np.log(np.maximum(p_true @ w, EPSILON)))

    def grad(w):
        return -np.mean(p_true / np.maximum(p_true @ w, EPSILON)[:, None], axis=0)

    result = minimize(
        loss,
        np.full(n, 1.0 / n),
        jac=grad,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n,
        constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1.0}],
        options={"ftol": 1e-12, "maxiter": 500},
    )
    w = np.clip(result.x, 0.0, None)
    candidates = [w / w.sum(), *np.eye(n)]  # the optimum found, and each member alone
    best = min(candidates, key=loss)
    return [float(v) for v in best]


def _log_loss(probabilities, weights, labels) -> float:
    labels = np.asarray(labels, dtype=np.int64)
    mean = sum(w * np.asarray(p) for w, p in zip(weights, probabilities, strict=True))
    return float(-np.mean(np.log(np.maximum(mean[np.arange(labels.size), labels], EPSILON))))


def _parse_weights(weights, n: int) -> str | list[float]:
    """``"fit"``, or ``n`` non-negative weights rescaled to sum to 1 (None: all equal)."""
    if weights is None:
        return [1.0 / n] * n
    if weights == "fit":
        return "fit"
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UsageError(
                f"--weights {weights}: give numbers separated by commas, or fit"
            ) from None
    values = [float(w) for w in weights]
    if len(values) != n:
        raise UsageError(f"--weights has {len(values)} numbers for {n} runs: give one per run")
    if any(not np.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
        raise UsageError("--weights must be non-negative numbers, not all 0")
    return [w / sum(values) for w in values]


def _shared(run_dirs: list[Path], name: str, what: str):
    """The content of ``name`` that every member must have the same."""
    first = runs.read_json(run_dirs[0] / name)
    for run in run_dirs[1:]:
        if runs.read_json(run / name) != first:
            raise UsageError(
                f"{run}: its {name} differs from {run_dirs[0]}'s: ensemble members must be {what}"
            )
    return first


def _load_split(run: Path, config: Config):
    """The members' exact split, from the first member's split.json: the same file paths as in
    their predictions.csv (so `compare` pairs them), unless the folder has moved since."""
    folder = run_split(run, run_images(config))
    if len(folder.val) == 0:
        raise UsageError(f"{run}: its split has no validation images")
    return folder


def _write_config(run_dir: Path, config: Config, size: int, record: dict) -> None:
    """The first member's data settings (evaluate re-creates the same split from them), plus
    what makes this an ensemble."""
    config = dataclasses.replace(
        config, out=str(run_dir), backbone=ENSEMBLE_BACKBONE, image_size=size, augment="none"
    )
    values = {**dataclasses.asdict(config), "ensemble": record}
    values["headstart_version"] = __version__
    files.write_json(run_dir / runs.CONFIG_FILE, values)


def _score(run_dir: Path, model, folder, class_names, batch_size: int, probabilities=None):
    if not len(folder.test):
        return metrics_for_split(model, folder.test, class_names)
    if probabilities is None:
        probabilities = predict_split(model, folder.test, batch_size)
    write_predictions(run_dir / PREDICTIONS_FILE, folder.test, class_names, probabilities)
    return metrics_for_split(model, folder.test, class_names, probabilities=probabilities)


def member_test_probabilities(
    run: Path, test_paths: Sequence[str], class_names
) -> np.ndarray | None:
    """A finished run's test probabilities (its predictions.csv, to 6 decimals) in the order
    of ``test_paths``; None if it has none for one of them."""
    path = Path(run) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    if not all(str(p) in rows for p in test_paths):
        return None
    return np.array(
        [[float(rows[str(p)][name]) for name in class_names] for p in test_paths], np.float64
    )


def _member_accuracies(run_dirs: list[Path]) -> list[float | None]:
    """Each member's own test accuracy (its metrics.json), beside the ensemble's."""
    values = []
    for run in run_dirs:
        path = run / runs.METRICS_FILE
        metrics = runs.read_json(path) if path.is_file() else {}
        values.append(metrics.get("accuracy") if isinstance(metrics, dict) else None)
    return values

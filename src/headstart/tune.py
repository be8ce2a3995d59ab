"""`headstart tune`: a KerasTuner search over the head's hyperparameters, on cached features.

The frozen backbone runs once over the training and validation images (through the feature
cache when it is on); every trial then trains only a head on those features, so a trial costs
seconds. Searched: learning rate, dropout, hidden width and head type (gap, or flatten when the
flattened backbone output is small enough to hold). Trials are scored on validation accuracy;
the test split is never read. The tune folder gets ``trials.csv`` (one row per trial),
``tune.json`` (the best values and the `headstart train` command that reproduces them) and,
unless skipped, the best configuration trained fully as a normal run in ``best/``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import keras_tuner
import numpy as np

from headstart import files, runs
from headstart.backbones import check_image_size, get_backbone, resolve_weights
from headstart.config import Config
from headstart.errors import UsageError
from headstart.freeze import freeze
from headstart.model import build_from_config, build_head, compile_for
from headstart.splits import folder_for
from headstart.training import train
from headstart.training.cache import FeatureCache
from headstart.training.views import FeatureViews

log = logging.getLogger(__name__)

ALGORITHMS = ("bayesian", "random", "hyperband")
TRIALS_FILE = "trials.csv"
TUNE_FILE = "tune.json"
MAX_FLATTEN = 32768  # flatten is searched only up to this many features per image
LEARNING_RATES = (1e-4, 1e-2)  # log-uniform range
HIDDEN_WIDTHS = (0, 64, 128, 256, 512)
DROPOUT = (0.0, 0.5)
_TUNED = ("lr", "dropout", "hidden", "head")


@dataclass
class TuneResult:
    out: Path
    rows: list[dict]  # one per trial, as in trials.csv
    best: dict  # the best trial's values of _TUNED
    command: str  # the `headstart train` command line that reproduces the best
    run: object | None  # the best configuration's TrainResult, unless skipped


def tune(
    config: Config,
    *,
    trials: int = 10,
    max_time: float | None = None,
    algorithm: str = "bayesian",
    train_best: bool = True,
) -> TuneResult:
    """Search head hyperparameters for ``config.data`` (``config.out`` is the tune folder), then
    train the best configuration as a normal run in ``OUT/best`` (unless ``train_best`` is
    False). ``max_time`` (minutes) stops starting new trials once it is spent. The other
    settings of ``config`` (backbone, image size, epochs, batch size, split, ...) are kept.
    """
    if algorithm not in ALGORITHMS:
        raise UsageError(f"--algorithm must be one of {', '.join(ALGORITHMS)}")
    if trials < 1:
        raise UsageError("--trials must be at least 1")
    if max_time is not None and max_time <= 0:
        raise UsageError("--max-time must be a positive number of minutes")
    config.validate()
    backbone = get_backbone(config.backbone)
    if backbone.parts:
        raise UsageError(f"--backbone {config.backbone}: tune searches one backbone, not a fusion")
    if not backbone.pretrained:
        raise UsageError(
            f"--backbone {config.backbone} trains from scratch: tune searches heads on cached "
            f"features of a pretrained backbone (see `headstart backbones`)"
        )
    image_size = config.image_size or backbone.default_size
    check_image_size(backbone, image_size)
    folder = folder_for(config)
    if folder.multi_label:
        raise UsageError(f"{config.data} is multi-label: tune searches single-label heads only")
    out = runs.new_run_dir(config.out or f"runs/tune-{time.strftime('%Y%m%d-%H%M%S')}")
    config = dataclasses.replace(
        config,
        data=str(Path(config.data).resolve()),
        root=None if config.root is None else str(Path(config.root).resolve()),
        image_size=image_size,
        weights=resolve_weights(backbone, config.weights),
    )
    features = _features(config, backbone, folder)
    labels = {s: np.asarray(getattr(folder, s).labels, dtype="int32") for s in ("train", "val")}
    n_classes = len(folder.class_names)
    keras.utils.set_random_seed(config.seed)
    tuner = _tuner(algorithm, config, features, labels, n_classes, out, trials)
    started = time.monotonic()
    tuner.deadline = started + 60 * max_time if max_time else None
    tuner.search(verbose=0)
    search_seconds = round(time.monotonic() - started, 1)
    rows = _rows(tuner)
    _write_rows(out / TRIALS_FILE, rows)
    values = tuner.get_best_hyperparameters(1)[0].values
    best = {k: float(values[k]) if k in ("lr", "dropout") else values[k] for k in _TUNED}
    best_config = dataclasses.replace(config, **best, out=str(out / "best"))
    command = train_command(best_config, given=_given(config))
    record = {
        "algorithm": algorithm,
        "trials": len(rows),
        "search_seconds": search_seconds,  # the trials only, not the one backbone pass
        "best": best,
        "command": command,
    }
    files.write_json(out / TUNE_FILE, record)
    result = None
    if train_best:
        result = train(best_config)
    return TuneResult(out, rows, best, command, result)


def _features(config: Config, backbone, folder) -> dict[str, dict[str, np.ndarray]]:
    """{head: {split: features}} from one pass of the frozen backbone per split: the flattened
    backbone output, and its spatial mean (what GlobalAveragePooling2D gives)."""
    flat_config = dataclasses.replace(config, head="flatten")
    model, base = build_from_config(flat_config, backbone, len(folder.class_names))
    freeze(base)
    cache = FeatureCache(config.cache_dir) if config.cache else None
    views = FeatureViews(flat_config, backbone, folder, model, cache=cache)
    shape = tuple(int(d) for d in base.output_shape[1:])
    features: dict[str, dict[str, np.ndarray]] = {"gap": {}, "flatten": {}}
    for split in ("train", "val"):
        rows = views.rows("pooled", split)
        flat = np.asarray(rows[np.arange(len(rows))])
        features["gap"][split] = flat.reshape(len(flat), -1, shape[-1]).mean(axis=1)
        features["flatten"][split] = flat
    if int(np.prod(shape)) > MAX_FLATTEN:
        log.info("head type flatten not searched: %s features per image", int(np.prod(shape)))
        del features["flatten"]
    return features


class _HeadModel(keras_tuner.HyperModel):
    """A head (the built-in one, `model.build_head`) on the chosen head type's features."""

    def __init__(self, features, labels, n_classes: int, config: Config):
        super().__init__()
        self.features, self.labels = features, labels
        self.n_classes, self.config = n_classes, config

    def build(self, hp):
        head = hp.Choice("head", sorted(self.features))
        hidden = hp.Choice("hidden", list(HIDDEN_WIDTHS))
        dropout = hp.Float("dropout", *DROPOUT, step=0.1)
        lr = hp.Float("lr", *LEARNING_RATES, sampling="log")
        model = build_head(self.features[head]["train"].shape[1], self.n_classes, hidden, dropout)
        compile_for(model, self.n_classes, lr)
        return model

    def fit(self, hp, model, *args, **kwargs):
        """Stage 1's procedure on clean cached features: early stopping, best epoch kept."""
        features = self.features[hp.get("head")]
        kwargs.setdefault("epochs", self.config.epochs)
        kwargs["verbose"] = 0
        stop = keras.callbacks.EarlyStopping(
            monitor="val_accuracy", mode="max", patience=self.config.patience
        )
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), stop]
        return model.fit(
            features["train"],
            self.labels["train"],
            validation_data=(features["val"], self.labels["val"]),
            batch_size=self.config.batch_size,
            **kwargs,
        )


def _tuner(algorithm, config, features, labels, n_classes, out: Path, trials: int):
    base = {
        "bayesian": keras_tuner.BayesianOptimization,
        "random": keras_tuner.RandomSearch,
        "hyperband": keras_tuner.Hyperband,
    }[algorithm]

    class Tuner(base):
        """Times each trial, and starts no new one once ``deadline`` has passed."""

        deadline: float | None = None
        seconds: dict[str, float]

        def pre_create_trial(self):
            if self.deadline is not None and time.monotonic() > self.deadline:
                self.oracle.max_trials = max(1, len(self.oracle.trials))  # always a best

        def run_trial(self, trial, *args, **kwargs):
            started = time.monotonic()
            try:
                return super().run_trial(trial, *args, **kwargs)
            finally:
                self.seconds[trial.trial_id] = round(time.monotonic() - started, 2)

    options = {"max_epochs": config.epochs} if algorithm == "hyperband" else {}
    if algorithm != "hyperband":
        options["max_trials"] = trials
    tuner = Tuner(
        hypermodel=_HeadModel(features, labels, n_classes, config),
        objective=keras_tuner.Objective("val_accuracy", "max"),
        seed=config.seed,
        directory=str(out),
        project_name="kerastuner",
        overwrite=True,
        **options,
    )
    tuner.seconds = {}
    tuner.oracle.max_trials = trials
    return tuner


def _rows(tuner) -> list[dict]:
    """One row per trial: its values, its best validation accuracy and loss, its seconds."""
    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items(), key=lambda item: int(item[0])):
        values = trial.hyperparameters.values
        metrics = trial.metrics
        loss = metrics.get_best_value("val_loss") if metrics.exists("val_loss") else None
        rows.append(
            {
                "trial": trial_id,
                "status": str(getattr(trial.status, "value", trial.status)),
                **{name: values.get(name) for name in _TUNED},
                "dropout": round(values.get("dropout", 0.0), 6),  # 0.30000000000000004 -> 0.3
                "epochs": values.get("tuner/epochs", ""),
                "val_accuracy": trial.score,
                "val_loss": loss,
                "seconds": tuner.seconds.get(trial_id),
            }
        )
    return rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    columns = ["trial", "status", *_TUNED, "epochs", "val_accuracy", "val_loss", "seconds"]
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.write_text_atomic(path, buffer.getvalue())


def _given(config: Config) -> set[str]:
    """The settings of ``config`` that differ from the defaults (kept in the command)."""
    defaults = Config(data="")
    return {
        f.name
        for f in dataclasses.fields(Config)
        if getattr(config, f.name) != getattr(defaults, f.name)
    }


_NOT_OPTIONS = {"data", "quiet", "headstart_version", "augment_scores", "fine_tune_lr_scores"}
_FLAGS = {  # booleans: the flag that sets the non-default value
    "fine_tune": "--no-fine-tune",
    "cache": "--no-cache",
    "cache_trunk": "--no-trunk-cache",
    "check": "--no-check",
    "tensorboard": "--tensorboard",
}


def train_command(config: Config, given: set[str] = frozenset()) -> str:
    """``headstart train DATA ...``: the tuned values, the run folder, backbone and image size,
    and every other setting the user gave (``given``); the rest are train's defaults."""
    parts = ["headstart", "train", config.data]
    for field in dataclasses.fields(Config):
        name, value = field.name, getattr(config, field.name)
        if name in _NOT_OPTIONS or value is None:
            continue
        if name not in (*_TUNED, *given, "out", "backbone", "image_size"):
            continue
        if name in _FLAGS:
            if value != getattr(Config(data=""), name):
                parts.append(_FLAGS[name])
            continue
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts += ["--" + name.replace("_", "-"), text]
    return shlex.join(parts)

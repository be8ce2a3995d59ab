"""The callbacks of a training run: what each epoch leaves in the run directory.

``BestModelCheckpoint`` keeps the best full model across both stages, ``StageCSVLogger`` the
history of both stages in one CSV, ``EpochTimer`` the cost of each epoch. Their state is plain
numbers and rows, so that `headstart.training.state` can save it after every epoch and put it back.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from headstart import files


class RunCallback(keras.callbacks.Callback):
    """Base for user callbacks (``train(callbacks=...)``) that need more than ``self.model``.

    Each stage fits a different Keras model: in extract mode stage 1 fits the head alone on
    cached features, and stage 2 the backbone's top on cached trunk activations. Before every
    stage headstart sets ``classifier`` (the whole model, raw images in, logits out, sharing
    the weights being trained), ``run_dir`` and ``stage`` ("head" or "fine_tune"; the refit's
    "refit_head" and "refit_fine_tune", which have no validation logs).
    """

    classifier: keras.Model | None = None
    run_dir: Path | None = None
    stage: str | None = None

    def set_run(self, classifier: keras.Model, run_dir: Path, stage: str) -> None:
        self.classifier, self.run_dir, self.stage = classifier, Path(run_dir), stage


class EpochTimer(keras.callbacks.Callback):
    """Adds ``epoch_seconds`` to the logs (and so to history.csv): the cost of each epoch."""

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = round(time.perf_counter() - self._started, 3)


class EpochLogs(keras.callbacks.Callback):
    """Keeps a copy of every epoch's logs as the callbacks before it left them: what a stage's
    history would get from the same epochs (a trial's record, `headstart.training.session`)."""

    def __init__(self):
        super().__init__()
        self.epochs: list[dict] = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(dict(logs or {}))


class BestModelCheckpoint(keras.callbacks.Callback):
    """Save the *full* model whenever validation loss improves, across both stages.

    Unlike ``ModelCheckpoint`` it saves a fixed model, because in workflow 2 ``fit`` runs on
    the head alone while the file must hold the whole classifier. It also keeps the best values
    of the variables trained in the current stage (``tracked``), so the best weights of a stage
    can be put back without reading the file (`restore_best`), and saved for a resume.

    Fine-tuning has to earn its place: with ``accuracy_floor`` set (stage 1's validation
    accuracy, by `start_fine_tuning`) an epoch replaces the saved model only if its validation
    accuracy beats the floor, and then the lowest validation loss among such epochs wins.
    """

    def __init__(self, full_model: keras.Model, path: Path | None, monitor: str = "val_loss"):
        super().__init__()
        self.full_model, self.path, self.monitor = full_model, path, monitor
        self.best = np.inf  # lowest validation loss of the stage (among epochs that count)
        self.accuracy_floor: float | None = None
        self.stage = "head"
        self.saved = {"stage": "", "epoch": -1, "val_loss": None, "val_accuracy": None}
        self.tracked: list[int] = []  # indices into full_model.variables trained in this stage
        self.best_values: dict[int, np.ndarray] = {}
        self.keep_optimizer = False  # also keep the optimizer's variables of the best epoch
        self.best_optimizer: list[np.ndarray] = []
        # each stage's epoch (0-based) saved last: how long the refit trains that stage
        self.stage_epochs: dict[str, int] = {}

    @property
    def best_accuracy(self) -> float | None:
        """Validation accuracy of the saved model."""
        return self.saved["val_accuracy"]

    def start_fine_tuning(self) -> None:
        """From now on only epochs more accurate on validation than the saved model count."""
        floor = self.best_accuracy
        self.accuracy_floor = floor if floor is not None else -1.0
        self.best = np.inf

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value, accuracy = logs.get(self.monitor), logs.get("val_accuracy")
        if value is None or value >= self.best:
            return
        floor = self.accuracy_floor
        if floor is not None and (accuracy is None or accuracy <= floor):
            return
        self.best = float(value)
        self.saved = {
            "stage": self.stage,
            "epoch": epoch,
            "val_loss": self.best,
            "val_accuracy": None if accuracy is None else float(accuracy),
        }
        self.stage_epochs[self.stage] = epoch
        variables = self.full_model.variables
        self.best_values = {i: np.array(variables[i].numpy()) for i in self.tracked}
        if self.keep_optimizer:
            self.best_optimizer = [np.array(v.numpy()) for v in self.model.optimizer.variables]
        if self.path is not None:  # None: only keep score and values (choosing a recipe)
            files.save_model_atomic(self.full_model, self.path)

    def restore_best(self) -> None:
        """Put the stage's best values back (what ``restore_best_weights`` would do)."""
        variables = self.full_model.variables
        for index, value in self.best_values.items():
            variables[index].assign(value)

    def state(self) -> dict:
        return {
            "best": self.best,
            "floor": self.accuracy_floor,
            "saved": self.saved,
            "stage_epochs": self.stage_epochs,
        }

    def set_state(self, state: dict) -> None:
        self.best, self.accuracy_floor = float(state["best"]), state["floor"]
        self.saved = dict(state["saved"])
        self.stage_epochs = dict(state.get("stage_epochs", {}))  # older states: none


class StageCSVLogger(keras.callbacks.Callback):
    """history.csv over both stages in one file, with a ``stage`` column and running epochs.

    The columns are those of ``keras.callbacks.CSVLogger`` (``epoch``, then the log keys
    sorted), but the whole file is rewritten atomically at every epoch end instead of appended
    to: a run killed at any moment leaves a complete CSV, never half a row. ``rows`` holds what
    is written (a few hundred rows at most); ``on_row(row)``, if given, is told each new row
    once it is written (the run's `headstart.tracking.Tracker`).
    """

    def __init__(
        self,
        filename: str,
        rows: list[dict] | None = None,
        on_row: Callable[[dict], None] | None = None,
    ):
        super().__init__()
        self.filename = filename
        self.stage = "head"
        self.rows: list[dict] = list(rows or [])
        self.on_row = on_row

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": len(self.rows), "stage": self.stage}
        for key, value in (logs or {}).items():
            row[key] = value if isinstance(value, str) else _csv_number(value)
        self.rows.append(row)
        self.write()
        if self.on_row is not None:
            self.on_row(dict(row))

    def write(self) -> None:
        columns = ["epoch", *sorted({key for row in self.rows for key in row} - {"epoch"})]
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        files.write_text_atomic(self.filename, text.getvalue())


def _csv_number(value):
    """Plain Python numbers (str(np.float32) would drop digits); arrays as CSVLogger does."""
    array = np.asarray(value)
    if array.ndim == 0:
        return array.item()
    return f"[{', '.join(str(v) for v in array.ravel().tolist())}]"

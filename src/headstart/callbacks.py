"""The callbacks of a training run: what each epoch leaves in the run directory.

``BestModelCheckpoint`` keeps the best full model across both stages, ``StageCSVLogger`` the
history of both stages in one CSV, ``EpochTimer`` the cost of each epoch. Their state is plain
numbers and rows, so that `headstart.resume` can save it after every epoch and put it back.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import keras
import numpy as np

from headstart import runs


class EpochTimer(keras.callbacks.Callback):
    """Adds ``epoch_seconds`` to the logs (and so to history.csv): the cost of each epoch."""

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = round(time.perf_counter() - self._started, 3)


class BestModelCheckpoint(keras.callbacks.Callback):
    """Save the *full* model whenever validation loss improves, across both stages.

    Unlike ``ModelCheckpoint`` it saves a fixed model, because in workflow 2 ``fit`` runs on
    the head alone while the file must hold the whole classifier. It also keeps the best values
    of the variables trained in the current stage (``tracked``), so the best weights of a stage
    can be put back without reading the file (`restore_best`), and saved for a resume.
    """

    def __init__(self, full_model: keras.Model, path: Path, monitor: str = "val_loss"):
        super().__init__()
        self.full_model, self.path, self.monitor = full_model, path, monitor
        self.best = np.inf
        self.stage = "head"
        self.best_stage, self.best_epoch = "", -1  # where the saved model comes from
        self.tracked: list[int] = []  # indices into full_model.variables trained in this stage
        self.best_values: dict[int, np.ndarray] = {}

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and value < self.best:
            self.best = float(value)
            self.best_stage, self.best_epoch = self.stage, epoch
            variables = self.full_model.variables
            self.best_values = {i: np.array(variables[i].numpy()) for i in self.tracked}
            runs.save_model_atomic(self.full_model, self.path)

    def restore_best(self) -> None:
        """Put the stage's best values back (what ``restore_best_weights`` would do)."""
        variables = self.full_model.variables
        for index, value in self.best_values.items():
            variables[index].assign(value)

    def state(self) -> dict:
        return {"best": self.best, "stage": self.best_stage, "epoch": self.best_epoch}

    def set_state(self, state: dict) -> None:
        self.best = float(state["best"])
        self.best_stage, self.best_epoch = state["stage"], int(state["epoch"])


class StageCSVLogger(keras.callbacks.Callback):
    """history.csv over both stages in one file, with a ``stage`` column and running epochs.

    The columns are those of ``keras.callbacks.CSVLogger`` (``epoch``, then the log keys
    sorted), but the whole file is rewritten atomically at every epoch end instead of appended
    to: a run killed at any moment leaves a complete CSV, never half a row. ``rows`` holds what
    is written (a few hundred rows at most).
    """

    def __init__(self, filename: str, rows: list[dict] | None = None):
        super().__init__()
        self.filename = filename
        self.stage = "head"
        self.rows: list[dict] = list(rows or [])

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": len(self.rows), "stage": self.stage}
        for key, value in (logs or {}).items():
            row[key] = value if isinstance(value, str) else _csv_number(value)
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        columns = ["epoch", *sorted({key for row in self.rows for key in row} - {"epoch"})]
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        runs.write_text_atomic(self.filename, text.getvalue())


def _csv_number(value):
    """Plain Python numbers (str(np.float32) would drop digits); arrays as CSVLogger does."""
    array = np.asarray(value)
    if array.ndim == 0:
        return array.item()
    return f"[{', '.join(str(v) for v in array.ravel().tolist())}]"

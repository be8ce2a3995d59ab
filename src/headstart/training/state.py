"""Continue an interrupted run where it stopped (``headstart train --resume RUN``).

After every epoch, and at each stage boundary, the run folder gets ``resume.npz`` (written
atomically, like every run file): the stage and next epoch (the refit's stages too, with its
plan: `headstart.training.refit`); the values of every variable
trained so far and every random-seed state of the model; the optimizer's variables (moments,
step count, and the learning rate as ReduceLROnPlateau left it); and the callbacks' counters,
best values and history rows. Everything else is rebuilt from config.json and is
deterministic: the split, the initial head, the cached features and each epoch's order and
views (`ViewSampler` draws from the seed and the epoch number). So in extract mode a resumed
run follows the same path as an uninterrupted one. In ``--mode frozen`` tf.data's shuffle and
augmentation draws restart, so a resumed run continues from the same weights and optimizer
state but sees other random batches.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from headstart import files
from headstart.errors import UsageError

RESUME_FILE = "resume.npz"
STAGES = ("head", "fine_tune", "refit_head", "refit_fine_tune", "done")


@dataclass
class TrainingState:
    """Where a run is: ``stage`` (the one to run next, or "done") from ``next_epoch`` on."""

    stage: str
    next_epoch: int = 0
    variables: dict[int, np.ndarray] = field(default_factory=dict)  # index in model.variables
    optimizer: list[np.ndarray] = field(default_factory=list)  # the stage's optimizer.variables
    best_values: dict[int, np.ndarray] = field(default_factory=dict)  # the stage's best so far
    callbacks: dict = field(default_factory=dict)  # counters and history rows (JSON)
    train_seconds: float = 0.0  # training time already spent before this state was saved
    plan: dict = field(default_factory=dict)  # the refit's plan (JSON), from its start on

    def apply(self, model: keras.Model) -> None:
        """Put the saved variable values into ``model`` (built exactly as the run built it)."""
        _assign(model.variables, self.variables, "model variable")

    def apply_optimizer(self, optimizer: keras.optimizers.Optimizer) -> None:
        _assign(optimizer.variables, dict(enumerate(self.optimizer)), "optimizer variable")


def trained_indices(model: keras.Model, trainer: keras.Model, *, seeds: bool = True) -> list[int]:
    """Indices into ``model.variables`` of what training changes: the trainer's trainable
    variables and (``seeds``) every random-seed state, such as dropout's."""
    position = {id(v): i for i, v in enumerate(model.variables)}
    trained = {position[id(v)] for v in trainer.trainable_variables if id(v) in position}
    if seeds:
        weights = {id(v) for v in model.weights}
        trained |= {i for i, v in enumerate(model.variables) if id(v) not in weights}
    return sorted(trained)


def write_state(run_dir: Path, state: TrainingState) -> None:
    arrays = {f"variable_{i}": value for i, value in state.variables.items()}
    arrays |= {f"optimizer_{i}": value for i, value in enumerate(state.optimizer)}
    arrays |= {f"best_{i}": value for i, value in state.best_values.items()}
    meta = {
        "stage": state.stage,
        "next_epoch": state.next_epoch,
        "callbacks": state.callbacks,
        "train_seconds": state.train_seconds,
        "n_optimizer": len(state.optimizer),
        "plan": state.plan,
    }
    arrays["meta"] = np.array(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    files.write_bytes_atomic(Path(run_dir) / RESUME_FILE, buffer.getvalue())


def read_state(run_dir: Path) -> TrainingState | None:
    """The saved state, or None when the run has none (finished, or stopped before an epoch)."""
    path = Path(run_dir) / RESUME_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            arrays = {name: archive[name] for name in archive.files if name != "meta"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise UsageError(
            f"{path} is damaged ({error}): the run cannot be resumed; train again"
        ) from error
    if meta.get("stage") not in STAGES:
        raise UsageError(f"{path} names no known stage: the run cannot be resumed; train again")

    def numbered(prefix: str) -> dict[int, np.ndarray]:
        return {int(k[len(prefix) :]): v for k, v in arrays.items() if k.startswith(prefix)}

    optimizer = numbered("optimizer_")
    return TrainingState(
        stage=meta["stage"],
        next_epoch=int(meta["next_epoch"]),
        variables=numbered("variable_"),
        optimizer=[optimizer[i] for i in range(meta["n_optimizer"])],
        best_values=numbered("best_"),
        callbacks=meta["callbacks"],
        train_seconds=float(meta["train_seconds"]),
        plan=meta.get("plan", {}),
    )


def remove_state(run_dir: Path) -> None:
    """A finished run needs no resume state (it can be tens of MB)."""
    (Path(run_dir) / RESUME_FILE).unlink(missing_ok=True)


class ResumeCheckpoint(keras.callbacks.Callback):
    """Saves a `TrainingState` at every epoch end and, on a resumed run, restores the optimizer
    and the other callbacks' counters when training begins.

    It must come last in the callback list: it saves what the others have just updated, and
    restores after their ``on_train_begin`` has reset them.
    """

    def __init__(
        self,
        run_dir,
        model,
        indices,
        stage,
        stage_epochs,
        callbacks,
        elapsed,
        resume_from=None,
        plan=None,
    ):
        super().__init__()
        self.run_dir, self.full_model, self.stage = Path(run_dir), model, stage
        self.indices = indices  # `trained_indices` of the model for the stage's trainer
        self.stage_epochs, self.elapsed = stage_epochs, elapsed
        # (checkpoint, history, early stopping, plateau); the refit has neither of the last two
        self.checkpoint, self.history, self.early_stopping, self.plateau = callbacks
        self.resume_from = resume_from
        self.plan = plan or {}

    def on_train_begin(self, logs=None):
        state = self.resume_from
        if state is None:
            return
        optimizer = self.model.optimizer
        if not optimizer.built:  # Keras builds it at the first step, too late to restore into
            optimizer.build(self.model.trainable_variables)
        state.apply_optimizer(optimizer)
        counters = state.callbacks
        for callback, name in ((self.early_stopping, "early_stopping"), (self.plateau, "plateau")):
            if callback is None:
                continue
            for key, value in counters[name].items():
                setattr(callback, key, value)

    def on_epoch_end(self, epoch, logs=None):
        variables = self.full_model.variables
        finished = self.model.stop_training or epoch + 1 >= self.stage_epochs
        state = TrainingState(
            stage=self.stage,
            next_epoch=self.stage_epochs if finished else epoch + 1,
            variables={i: np.array(variables[i].numpy()) for i in self.indices},
            optimizer=[np.array(v.numpy()) for v in self.model.optimizer.variables],
            best_values=self.checkpoint.best_values,
            callbacks=callback_state(*self._callbacks()),
            train_seconds=self.elapsed(),
            plan=self.plan,
        )
        write_state(self.run_dir, state)

    def _callbacks(self):
        return self.checkpoint, self.history, self.early_stopping, self.plateau


def callback_state(checkpoint, history, early_stopping=None, plateau=None) -> dict:
    """The counters that decide what the callbacks do next, as JSON-able values."""
    state = {"checkpoint": checkpoint.state(), "history": history.rows}
    if early_stopping is not None:
        state["early_stopping"] = {
            "wait": early_stopping.wait,
            "best": _number(early_stopping.best),
            "best_epoch": early_stopping.best_epoch,
        }
    if plateau is not None:
        state["plateau"] = {
            "wait": plateau.wait,
            "best": _number(plateau.best),
            "cooldown_counter": plateau.cooldown_counter,
        }
    return state


def _number(value):
    return None if value is None else float(value)


def _assign(variables, values: dict[int, np.ndarray], what: str) -> None:
    for index, value in values.items():
        if index >= len(variables) or tuple(variables[index].shape) != value.shape:
            raise UsageError(
                f"the saved training state does not fit this model ({what} {index}): was "
                f"config.json or the backbone changed? Train again"
            )
        variables[index].assign(value)

"""The two stages of a run, and what they share: the model, its feature views, the callbacks
and the best-so-far checkpoint.

Stage 1 trains a new head with the backbone frozen: on cached features (workflow 2,
``--mode extract``: the backbone runs once) or behind augmentation with the frozen backbone in
the loop (workflow 1, ``--mode frozen``). Stage 2 unfreezes the top of the backbone and
fine-tunes it at a low rate, on the cached trunk when there is one. `headstart.training.recipe`
drives them; `headstart.training.choose` makes the choices on validation, and
`headstart.training.refit` trains both stages again on training and validation images.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from pathlib import Path

import keras
import numpy as np

from headstart import runs
from headstart.augment import AUTO, build_augmenter
from headstart.backbones import Backbone, unfreeze_units
from headstart.data import make_dataset
from headstart.distributed.cluster import even_batches, sampler_batches
from headstart.extract import InferenceModeTop, ViewSampler, split_at_cut, with_head
from headstart.freeze import freeze, unfreeze_top
from headstart.imbalance import class_weights
from headstart.model import (
    SeededBase,
    base_parts,
    build_on_base,
    classifier_of,
    compile_for,
    summary_text,
    trainer_for,
)
from headstart.tracking import Tracker
from headstart.training.cache import FeatureCache
from headstart.training.callbacks import (
    BestModelCheckpoint,
    EpochLogs,
    EpochTimer,
    RunCallback,
    StageCSVLogger,
)
from headstart.training.choose import (
    choose_augmentation,
    choose_feature_norm,
    choose_fine_tune_lr,
    epochs_of,
)
from headstart.training.phases import PhaseClock
from headstart.training.state import (
    ResumeCheckpoint,
    TrainingState,
    callback_state,
    trained_indices,
    write_state,
)
from headstart.training.views import TRAIN_VAL, FeatureViews, split_of

log = logging.getLogger(__name__)

STAGE_NAMES = {
    "head": "stage 1",
    "fine_tune": "stage 2",
    "refit_head": "refit stage 1",
    "refit_fine_tune": "refit stage 2",
}
# Batches per call of the compiled step on cached views (`Session.steps_per_call`): Python's
# per-batch overhead gone, and a Ctrl-C still answered within that many batches
STEPS_PER_CALL = 64


@dataclasses.dataclass
class TrialRecord:
    """What a candidate's trial (`Session.trial`) leaves for the stage that would repeat it:
    the logs of its epochs up to its best one, as the stage's history gets them, and the
    values at that epoch of every variable training changed (by index into the variables of
    the model trained, built like the session's) and of the optimizer's variables (as the
    checkpoint saved them in model.keras). ``floor``: the trial's accuracy floor."""

    epochs: list[dict]
    best_values: dict[int, np.ndarray]
    optimizer: list[np.ndarray]
    floor: float | None


class Session:
    """State shared by the two stages: datasets, callbacks and the best-so-far checkpoint.

    ``state`` is where a resumed run stopped (`headstart.training.state`); None for a new run.
    ``clock`` times the run's phases (`headstart.training.phases`): the choices and the
    extractions each count under their own name. ``tracker`` (`headstart.tracking`) is told
    every epoch of the stages and every candidate's score of the choices.
    """

    def __init__(
        self,
        config,
        backbone: Backbone,
        folder,
        model,
        seeded: SeededBase,
        run_dir: Path,
        state,
        *,
        clock: PhaseClock | None = None,
        tracker: Tracker | None = None,
    ):
        self.config, self.backbone, self.folder = config, backbone, folder
        self.run_dir, self.state = run_dir, state
        self.seeded = seeded  # what another head input's model is built around (`rebuild`)
        self._adopt(model, seeded.base)
        self.head_builder = None  # train(head_builder=...): `rebuild` builds it again
        # the refit's plan (`headstart.training.refit`), saved with every state from its start
        self.plan: dict = dict(state.plan) if state is not None else {}
        self.n_classes = len(folder.class_names)
        # --class-weight: applied in every fit of training (both stages and every candidate)
        self.class_weight = class_weights(config.class_weight, folder.train.counts(self.n_classes))
        self.size = (config.image_size, config.image_size)
        self.checkpoint = BestModelCheckpoint(model, run_dir / runs.MODEL_FILE)
        self.tracker = tracker or Tracker()
        self.history = StageCSVLogger(str(run_dir / runs.HISTORY_FILE), on_row=self.tracker.epoch)
        if state is not None:
            self.checkpoint.set_state(state.callbacks["checkpoint"])
            self.history.rows = list(state.callbacks["history"])
        self.summaries: list[str] = []
        self.verbose = 0 if config.quiet else "auto"
        self.clock = clock or PhaseClock()
        cache = FeatureCache(config.cache_dir) if config.cache else None
        self.feature_views = FeatureViews(
            config, backbone, folder, model, cache=cache, clock=self.clock
        )
        self.unfreeze: list[int] = []  # top layers to fine-tune, per base
        self._started = time.monotonic()
        self._stage_variables: list[int] = []  # what the stage in progress trains
        self.user_callbacks: list[keras.callbacks.Callback] = []  # train(callbacks=...)
        # the records of the current choice's trials (`trial`), by (stage, candidate)
        self.trials: dict[tuple[str, str], TrialRecord] = {}
        self._compiled = weakref.WeakKeyDictionary()  # trainer -> how `compile` compiled it
        self.fold_models: dict = {}  # the cross-validated choices' compiled models (crossval)

    def elapsed(self) -> float:
        """Seconds of training so far, including those before an interruption."""
        before = self.state.train_seconds if self.state is not None else 0.0
        return before + time.monotonic() - self._started

    def plan_fine_tuning(self, unfreeze: list[int]) -> None:
        """Cut the backbone where fine-tuning starts, so its frozen trunk runs only once.

        A fusion is not cut (two trunks would need one cut each): it fine-tunes the full
        model on images, both bases in inference mode.
        """
        self.unfreeze = unfreeze
        if self.backbone.parts:
            log.info("fusion: fine-tuning runs the full model on images (no cached trunk)")
        elif unfreeze_units(self.backbone, self.base) != self.base.layers:  # a ViT's blocks
            log.info("%s: fine-tuning runs the full model on images", self.backbone.name)
        elif self.config.mode == "extract" and self.config.cache_trunk:
            self.feature_views.trunk = split_at_cut(self.model, self.base, unfreeze[0])
            self._trainers.pop("fine_tune", None)  # it trains on this trunk's activations

    def rebuild(self, model: keras.Model | None = None) -> None:
        """The model of the (changed) config, as a resumed run would build it from the seed,
        around the session's base (`headstart.model.build_on_base`; ``model``: one built so
        already): the same backbone, so the cached rows stay valid."""
        if model is None:
            model = build_on_base(
                self.config, self.backbone, self.n_classes, self.seeded, self.head_builder
            )
        self._adopt(model, self.base)
        self.checkpoint.full_model = self.model
        self.feature_views.use_model(self.model)
        if self.feature_views.trunk is not None:  # the same cut, on the new head
            self.feature_views.trunk = with_head(self.feature_views.trunk, self.model)

    def restart(self) -> None:
        """The model's variables (weights, statistics, random-seed states) put back as built,
        the values `rebuild` or a resumed run builds from the seed, but in the same model: its
        training views and their compiled steps are kept (a new model's are traced again, a
        second or more per step on a CPU, and building it loads the backbone's weights)."""
        for variable, value in zip(self.model.variables, self._as_built, strict=True):
            variable.assign(value)

    def _adopt(self, model, base) -> None:
        """``model`` (as built) becomes the session's; with the refit to come, a copy of its
        variables is kept for `restart` (memory: the model's weights once more)."""
        self.model, self.base = model, base
        self._trainers = {}  # each stage's training view of the model
        self._as_built = [np.array(v.numpy()) for v in model.variables] if self.config.refit else []

    def views(self, kind: str, split: str, policy: str | None = None, n_views: int | None = None):
        """`FeatureViews.views`, by default with the run's policy and number of views."""
        policy = self.config.augment if policy is None else policy
        n_views = self.config.views if n_views is None else n_views
        return self.feature_views.views(kind, split, policy, n_views)

    def choice_views(self, policy: str, n_views: int) -> list:
        """The training then validation images' pooled views, clean and (``n_views``)
        augmented by ``policy``: what the cross-validated choices train and score on
        (`headstart.training.choose`); the refit reads the same rows."""
        return self.feature_views.views("pooled", TRAIN_VAL, policy, n_views)

    def choice_targets(self) -> np.ndarray:
        """The targets of `choice_views`' rows, in their order."""
        return split_of(self.folder, TRAIN_VAL).targets()

    def sampler(self, views, split: str) -> ViewSampler:
        return self.feature_views.sampler(views, split)

    def fit(
        self, trainer, stage: str, train_data, val_data, epochs: int, replay=None, rates=None
    ) -> None:
        """``trainer.fit`` for one stage, from where a resumed run stopped; the training state
        is saved after every epoch.

        ``replay``: the key in `trials` of the trial this stage repeats (same start, data and
        procedure, ``epochs`` up to its best epoch: the same weights epoch by epoch). When
        nothing needs to see the epochs run (`_replayable`), the trial's best weights are put
        in the model and its epochs fed to the stage's callbacks instead of training again.

        ``val_data`` None (the refit's stages): nothing to checkpoint, stop early or reduce the
        rate on; the stage runs all its ``epochs``, epoch e at the learning rate ``rates[e]``.
        """
        try:
            self._fit(trainer, stage, train_data, val_data, epochs, replay, rates)
        finally:
            self.trials.clear()  # the next choice's trials start from this stage's result

    def _fit(self, trainer, stage: str, train_data, val_data, epochs: int, replay, rates) -> None:
        validated = val_data is not None
        self.history.stage = stage
        self._stage_variables = trained_indices(self.model, trainer)
        if validated:
            self.checkpoint.stage = stage
            self.checkpoint.tracked = trained_indices(self.model, trainer, seeds=False)
        state = self.state if self.state is not None and self.state.stage == stage else None
        start = state.next_epoch if state is not None else 0
        if state is not None:
            state.apply(self.model)
            if validated:
                self.checkpoint.best_values = state.best_values
        if start >= epochs:
            return  # the run was stopped after its last epoch of this stage
        if validated:
            *schedule, early_stopping, plateau = self._training_callbacks(train_data)
            watchers = [self.checkpoint, early_stopping, plateau]
        else:
            schedule = [*_epoch_draws(train_data), _rate_schedule(rates or [])]
            early_stopping = plateau = None
            watchers = []
        resume = ResumeCheckpoint(
            self.run_dir,
            self.model,
            self._stage_variables,
            stage,
            epochs,
            (self.checkpoint, self.history, early_stopping, plateau),
            self.elapsed,
            resume_from=state if start > 0 else None,
            plan=self.plan,
        )
        record = self._replayable(replay, start, epochs) if validated else None
        if record is not None:
            callbacks = [*schedule, self.checkpoint, early_stopping, plateau, self.history]
            self._replay(trainer, record, callbacks, resume)
            log.info(
                "%s: the chosen candidate's trial replayed (%d epochs, no retraining)",
                STAGE_NAMES.get(stage, stage),
                epochs,
            )
            return
        callbacks = [*schedule, EpochTimer(), *watchers, self.history]
        for callback in self.user_callbacks:
            if isinstance(callback, RunCallback):
                callback.set_run(self.model, self.run_dir, stage)
        callbacks.extend(self.user_callbacks)
        if self.config.tensorboard:
            log_dir = self.run_dir / "tensorboard" / stage
            callbacks.append(keras.callbacks.TensorBoard(log_dir=str(log_dir)))
        callbacks.append(resume)
        # several batches per call: a line per epoch (a progress bar would count past an
        # epoch's batches, 64/4); an epoch on cached views takes seconds at most
        many = getattr(trainer, "steps_per_execution", 1) > 1
        trainer.fit(
            self._feed(train_data, training=True),
            validation_data=self._feed(val_data, training=False) if validated else None,
            epochs=epochs,
            initial_epoch=start,
            callbacks=callbacks,
            verbose=2 if many and self.verbose else self.verbose,
            shuffle=False,
            class_weight=self.class_weight,
        )

    def _replayable(self, replay, start: int, epochs: int) -> TrialRecord | None:
        """The record to replay the stage from, or None: the stage trains live when there is
        no record, or something must see its epochs run (user callbacks, TensorBoard), or it
        resumes mid-stage, or runs distributed, or would not end where the trial saved."""
        record = self.trials.get(replay) if replay is not None else None
        if record is None or start > 0 or len(record.epochs) != epochs:
            return None
        if self.user_callbacks or self.config.tensorboard or self.config.distributed:
            return None
        checkpoint = self.checkpoint
        if checkpoint.best != np.inf or checkpoint.accuracy_floor != record.floor:
            return None  # the stage's checkpoint would not decide as the trial's did
        variables = self.model.variables
        for index, value in record.best_values.items():
            if index >= len(variables) or tuple(variables[index].shape) != value.shape:
                return None
        return record

    def _replay(self, trainer, record: TrialRecord, callbacks, resume) -> None:
        """The stage's callbacks fed the trial's epochs, the model holding its best weights.

        The model holds only the last epoch's weights (and the optimizer its state then), so
        the checkpoint saves model.keras and ``resume`` the training state at the last epoch
        only (where the trial saved): a run killed before resumes from the previous stage's
        state and repeats this stage."""
        variables = self.model.variables
        for index, value in record.best_values.items():
            variables[index].assign(value)
        trainer.stop_training = False
        callback_list = keras.callbacks.CallbackList(callbacks, model=trainer)
        resume.set_model(trainer)
        path, last = self.checkpoint.path, len(record.epochs) - 1
        callback_list.on_train_begin()
        try:
            for epoch, logs in enumerate(record.epochs):
                self.checkpoint.path = path if epoch == last else None
                callback_list.on_epoch_begin(epoch)
                if epoch == last:  # the optimizer as it was when the trial saved
                    _put_optimizer(trainer, record.optimizer)
                logs = dict(logs)
                callback_list.on_epoch_end(epoch, logs)
                if epoch == last:
                    resume.on_epoch_end(epoch, logs)
        finally:
            self.checkpoint.path = path
        callback_list.on_train_end()

    def steps_per_call(self, train_data, *, trial: bool = False) -> int:
        """Batches per call of the compiled step (the same weights as one per call): on
        TensorFlow, `STEPS_PER_CALL` on cached views, so that the trials, the stage that
        follows them and the refit (more batches) share one compiled step; one where something
        may watch each batch (a stage's user callbacks), when distributed or on other backends.
        """
        many = isinstance(train_data, ViewSampler) and not self.config.distributed
        many = many and keras.backend.backend() == "tensorflow"
        return STEPS_PER_CALL if many and (trial or not self.user_callbacks) else 1

    def compile(self, trainer: keras.Model, learning_rate: float, steps: int = 1) -> None:
        """`compile_for` this run: its classes (or labels), and weighted accuracy when
        distributed; ``steps`` batches per call of the compiled step (`steps_per_call`).

        A trainer this session compiled so before, training the same variables, keeps its
        compiled step (tracing it again costs up to 2 s): only its optimizer starts afresh,
        all zeros and the new rate, as a new compile's Adam would."""
        key = (steps, tuple(id(v) for v in trainer.trainable_variables))
        if self._compiled.get(trainer) == key:
            optimizer = trainer.optimizer
            for variable in optimizer.variables:
                variable.assign(np.zeros(variable.shape, variable.dtype))
            optimizer.learning_rate = learning_rate
            return
        compile_for(
            trainer,
            self.n_classes,
            learning_rate,
            weighted=self.config.distributed,
            multi_label=self.folder.multi_label,
            steps_per_execution=steps,
        )
        self._compiled[trainer] = key

    def evaluate(self, trainer, data) -> dict:
        """``trainer``'s loss and accuracy on ``data`` in inference mode, scored as validation
        is (every image once, also when distributed)."""
        return trainer.evaluate(self._feed(data, training=False), verbose=0, return_dict=True)

    def _feed(self, data, *, training: bool):
        """What ``fit`` gets for ``data``: cached views go in as tf.data when distributed
        (Keras's multi-process data adapter takes nothing else), on TensorFlow as the
        sampler's chunked tf.data (`ViewSampler.as_dataset`: the same batches, a third of
        the cost of an epoch on cached features), as the sampler otherwise."""
        if not isinstance(data, ViewSampler):
            return data
        if self.config.distributed:
            return sampler_batches(data, training=training)
        return data.as_dataset() if keras.backend.backend() == "tensorflow" else data

    def _training_callbacks(self, train_data) -> list[keras.callbacks.Callback]:
        """What decides the course of training (and nothing that writes files): each epoch's
        draw of cached views, early stopping and the learning-rate schedule."""
        callbacks = _epoch_draws(train_data)
        early_stopping = keras.callbacks.EarlyStopping(patience=self.config.patience)
        plateau = keras.callbacks.ReduceLROnPlateau(
            factor=0.2, patience=max(1, self.config.patience - 1)
        )
        return [*callbacks, early_stopping, plateau]

    def end_stage(self, next_stage: str) -> None:
        """Save the state between stages; stage 2 starts from stage 1's best weights, the
        refit's stage 2 from its stage 1's last ones (without validation there is no best),
        and the refit itself from a model built anew (nothing to keep but its `plan`)."""
        kept = {}
        if next_stage == "fine_tune":
            self.checkpoint.restore_best()
            self.checkpoint.start_fine_tuning()
        if next_stage in ("fine_tune", "refit_fine_tune"):
            variables = self.model.variables
            kept = {i: np.array(variables[i].numpy()) for i in self._stage_variables}
        state = TrainingState(
            next_stage, variables=kept, train_seconds=self.elapsed(), plan=self.plan
        )
        state.callbacks = callback_state(self.checkpoint, self.history)
        write_state(self.run_dir, state)

    def images(self, split: str, *, training: bool):
        """A split as a tf.data pipeline; training order is shuffled (by tf.data, so ``fit``
        gets ``shuffle=False``) and augmented."""
        data = split_of(self.folder, split)
        dataset = make_dataset(
            data,
            self.size,
            batch_size=self.config.batch_size,
            shuffle=training,
            seed=self.config.seed,
        )
        augmenter = build_augmenter(self.config.augment, self.config.seed) if training else None
        if augmenter is not None:
            import tensorflow as tf  # input pipelines are tf.data on every Keras backend

            dataset = dataset.map(
                lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
            )
        if self.config.distributed:
            return even_batches(dataset, len(data), self.config.batch_size, training=training)
        return dataset

    def freeze_for_head(self, *, record: bool = True) -> None:
        """Stage 1's model: the backbone frozen (``record``: its summary is kept for
        summary.txt)."""
        if self.backbone.pretrained:
            for _, base in base_parts(self.backbone, self.base):
                freeze(base)
        if record:
            self.summaries.append("# stage 1: head training\n" + summary_text(self.model))

    def head_trainer(self) -> keras.Model:
        """What stage 1 fits: the head alone on cached features, else the whole model (the
        same training view each time, so its compiled step is kept)."""
        if self.config.mode == "extract":
            return classifier_of(self.model)
        if "head" not in self._trainers:
            self._trainers["head"] = trainer_for(self.model, self.backbone)
        return self._trainers["head"]

    def head_data(self, split: str):
        """Stage 1's data for ``split``: cached pooled views (extract mode), else images;
        training splits (`headstart.training.views.TRAINING_SPLITS`) shuffled and augmented."""
        if self.config.mode == "extract":
            return self.sampler(self.views("pooled", split), split)
        return self.images(split, training=split != "val")

    def train_head(self) -> None:
        if self.config.feature_norm == AUTO:  # only in extract mode (see `train`)
            with self.clock.phase("head input"):
                choose_feature_norm(self)
        self.freeze_for_head()
        if self.config.mode == "extract":
            self._train_head_on_features()
            return
        trainer = self.head_trainer()
        train_data, val_data = self.head_data("train"), self.head_data("val")
        self.compile(trainer, self.config.lr, self.steps_per_call(train_data))
        self.fit(trainer, "head", train_data, val_data, self.config.epochs)

    def _train_head_on_features(self) -> None:
        """Workflow 2, plus augmentation: the head trains on cached backbone outputs of the
        clean images and of ``--views`` augmented versions, one view drawn per image per epoch.

        With a cached trunk (fine-tuning planned), pooled features are derived from the trunk
        activations by the still-frozen top block: the backbone runs once for both stages.
        """
        if self.config.augment == AUTO:
            with self.clock.phase("augmentation"):
                choose_augmentation(self)
        classifier = self.head_trainer()
        train_data = self.head_data("train")
        self.compile(classifier, self.config.lr, self.steps_per_call(train_data))
        self.fit(
            classifier,
            "head",
            train_data,
            self.head_data("val"),
            epochs_of(self.config.augment_scores, self.config.augment, self.config.epochs),
            replay=("head", self.config.augment),
        )

    def unfreeze_for_fine_tuning(self, unfreeze: list[int], *, record: bool = True) -> keras.Model:
        """Stage 2's model: the top of the base unfrozen (of each base of a fusion,
        ``unfreeze`` layers each; ``record``: its summary kept for summary.txt). Returns
        what stage 2 fits: the top block and head on the cached trunk, else the whole model."""
        for (part, base), count in zip(base_parts(self.backbone, self.base), unfreeze, strict=True):
            unfreeze_top(base, count, self.config.bn, part)
        if record:
            self.summaries.append("# stage 2: fine-tuning\n" + summary_text(self.model))
        if "fine_tune" not in self._trainers:  # the same each time: its compiled step is kept
            trunk = self.feature_views.trunk
            self._trainers["fine_tune"] = (
                InferenceModeTop(trunk, self.model)
                if trunk is not None
                else trainer_for(self.model, self.backbone)
            )
        return self._trainers["fine_tune"]

    def fine_tune_data(self, split: str):
        """Stage 2's data for ``split``: cached trunk views, else images (as `head_data`)."""
        if self.feature_views.trunk is not None:
            return self.sampler(self.views("trunk", split), split)
        return self.images(split, training=split != "val")

    def fine_tune(self, unfreeze: list[int]) -> None:
        """Stage 2: unfreeze the top of the base, recompile at a low rate, train a few epochs.

        With a cached trunk only the top block and head run, on cached activations of the
        clean and augmented views; otherwise the full model runs on augmented images.
        """
        trainer = self.unfreeze_for_fine_tuning(unfreeze)
        train_data, val_data = self.fine_tune_data("train"), self.fine_tune_data("val")
        if self.config.fine_tune_lr == AUTO:
            with self.clock.phase("fine-tuning rate"):
                choose_fine_tune_lr(self, trainer, train_data, val_data)
        if self.config.fine_tune_lr is None:
            log.info("fine-tuning skipped: no learning rate beat stage 1 on validation")
            return
        self.compile(trainer, self.config.fine_tune_lr, self.steps_per_call(train_data))
        scores, rate = self.config.fine_tune_lr_scores, self.config.fine_tune_lr
        epochs = epochs_of(scores, str(rate), self.config.fine_tune_epochs)
        self.fit(
            trainer, "fine_tune", train_data, val_data, epochs, replay=("fine_tune", str(rate))
        )

    def trial(
        self,
        trainer,
        train_data,
        val_data,
        epochs,
        learning_rate,
        floor=None,
        *,
        model: keras.Model | None = None,
        key: tuple[str, str] | None = None,
    ) -> dict:
        """Train one candidate by the stage's own procedure, writing nothing, and score it on
        validation (accuracy None: no epoch beat ``floor``).

        ``model``: the model ``trainer`` trains (by default the session's). With ``key``, the
        trial's epochs and best weights are kept in `trials` (a `TrialRecord`), for the stage
        to replay if the candidate is chosen."""
        model = self.model if model is None else model
        self.compile(trainer, learning_rate, self.steps_per_call(train_data, trial=True))
        best = BestModelCheckpoint(model, path=None)
        best.accuracy_floor = floor
        if key is not None:
            best.tracked = _changed_indices(model, trainer)
            best.keep_optimizer = True
        *schedule, early_stopping, plateau = self._training_callbacks(train_data)
        logs = EpochLogs()  # in the stage's order, so the logs are those its history gets
        trainer.fit(
            self._feed(train_data, training=True),
            validation_data=self._feed(val_data, training=False),
            epochs=epochs,
            callbacks=[*schedule, EpochTimer(), best, early_stopping, plateau, logs],
            verbose=0,
            shuffle=False,
            class_weight=self.class_weight,
        )
        epochs = best.saved["epoch"] + 1 if best.best_accuracy is not None else None
        if key is not None and epochs is not None:
            self.trials[key] = TrialRecord(
                logs.epochs[:epochs], best.best_values, best.best_optimizer, floor
            )
        return {
            "val_accuracy": best.best_accuracy,
            "val_loss": best.saved["val_loss"],
            "epochs": epochs,
        }

    def record_choice(self, **choices) -> None:
        """A choice made during the run goes to config.json (a resumed run keeps it)."""
        self.config = dataclasses.replace(self.config, **choices)
        self.config.save(self.run_dir / runs.CONFIG_FILE)


def _epoch_draws(train_data) -> list[keras.callbacks.Callback]:
    """Cached views: each epoch's order and views drawn from its number alone (so a resumed
    run draws as an uninterrupted one)."""
    if not isinstance(train_data, ViewSampler):
        return []
    return [
        keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, _: train_data.set_epoch(epoch))
    ]


def _rate_schedule(rates: list[float]) -> keras.callbacks.Callback:
    """Epoch e at ``rates[e]`` (the optimizer's rate as compiled after the last one)."""

    def rate(epoch: int, current: float) -> float:
        return float(rates[epoch]) if epoch < len(rates) else float(current)

    return keras.callbacks.LearningRateScheduler(rate)


def _changed_indices(model: keras.Model, trainer: keras.Model) -> list[int]:
    """Indices into ``model.variables`` of every variable that training ``trainer`` can
    change: `trained_indices` (with every random-seed state) and the trainer's own variables
    (a BatchNormalization's statistics in a user's head, say)."""
    position = {id(v): i for i, v in enumerate(model.variables)}
    own = {position[id(v)] for v in trainer.variables if id(v) in position}
    return sorted(own.union(trained_indices(model, trainer)))


def _put_optimizer(trainer: keras.Model, values: list[np.ndarray]) -> None:
    """The optimizer of ``trainer`` built, with ``values`` (of the same trainer's optimizer)."""
    optimizer = trainer.optimizer
    if not optimizer.built:
        optimizer.build(trainer.trainable_variables)
    for variable, value in zip(optimizer.variables, values, strict=True):
        variable.assign(value)

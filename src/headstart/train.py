"""The recipe: stage 1 trains a new head on the frozen backbone, stage 2 fine-tunes its top.

Stage 1 runs as workflow 2 (``extract``: the backbone runs once, the head trains on cached
features) or workflow 1 (``frozen``: the frozen backbone runs every epoch behind augmentation).
Both end in the same full model, saved as one ``.keras`` file in the run directory.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from headstart import runs
from headstart.augment import build_augmenter, parse_augment
from headstart.backbones import Backbone, build_backbone, check_image_size, get_backbone
from headstart.backbones import resolve_weights as resolve_backbone_weights
from headstart.config import Config
from headstart.data import load_image_folder, make_dataset, write_skipped
from headstart.errors import UsageError
from headstart.evaluate import metrics_for_split
from headstart.freeze import freeze, resolve_unfreeze, unfreeze_top
from headstart.model import (
    build_model,
    classifier_of,
    feature_extractor,
    summary_text,
    trainer_for,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    config: Config


def train(config: Config) -> TrainResult:
    """Train, evaluate and save a classifier; everything lands in the run directory."""
    config.validate()
    backbone = get_backbone(config.backbone)
    image_size = config.image_size or backbone.default_size
    check_image_size(backbone, image_size)
    weights = resolve_backbone_weights(backbone, config.weights)
    parse_augment(config.augment)  # fail on a bad spec before any slow work
    folder = load_image_folder(
        config.data, val_split=config.val_split, test_split=config.test_split, seed=config.seed
    )
    if len(folder.val) == 0:
        raise UsageError("no validation images: give DATA/val or a positive --val-split")

    run_dir = runs.new_run_dir(config.out)
    keras.utils.set_random_seed(config.seed)
    base = build_backbone(backbone, image_size, weights)
    model = build_model(
        backbone,
        base,
        len(folder.class_names),
        head=config.head,
        hidden=config.hidden,
        dropout=config.dropout,
    )
    unfreeze = resolve_unfreeze(config.unfreeze, backbone, base) if backbone.pretrained else 0
    config = dataclasses.replace(
        config,
        data=str(Path(config.data).resolve()),
        out=str(run_dir),
        image_size=image_size,
        weights=weights,
        unfreeze=str(unfreeze),
        mode=config.mode if backbone.pretrained else "frozen",
    )
    config.save(run_dir / runs.CONFIG_FILE)
    runs.write_json(run_dir / runs.LABELS_FILE, list(folder.class_names))
    write_skipped(folder.skipped, str(run_dir / runs.SKIPPED_FILE))

    session = _Session(config, backbone, folder, model, base, run_dir)
    started = time.monotonic()
    session.train_head()
    if backbone.pretrained and config.fine_tune and config.fine_tune_epochs and unfreeze:
        session.fine_tune(unfreeze)
    model = keras.saving.load_model(run_dir / runs.MODEL_FILE)  # the best on validation
    metrics = metrics_for_split(model, folder.test, folder.class_names, config.batch_size)
    metrics["train_seconds"] = round(time.monotonic() - started, 1)
    metrics["skipped"] = len(folder.skipped)
    checkpoint = session.checkpoint
    metrics["saved_from"] = {
        "stage": checkpoint.best_stage,
        "epoch": checkpoint.best_epoch + 1,
        "val_loss": checkpoint.best,
    }
    runs.write_json(run_dir / runs.METRICS_FILE, metrics)
    if session.fine_tuned and checkpoint.best_stage == "head":
        log.info("fine-tuning did not lower validation loss: model.keras is the stage-1 model")
    runs.write_text_atomic(run_dir / runs.SUMMARY_FILE, "\n".join(session.summaries))
    return TrainResult(run_dir, metrics, config)


def compile_for(model: keras.Model, n_classes: int, learning_rate: float) -> None:
    """Logit outputs: binary cross-entropy for 2 classes, sparse categorical otherwise."""
    if n_classes == 2:
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        accuracy = keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=[accuracy])


class _Session:
    """State shared by the two stages: datasets, callbacks and the best-so-far checkpoint."""

    def __init__(self, config, backbone: Backbone, folder, model, base, run_dir: Path):
        self.config, self.backbone, self.folder = config, backbone, folder
        self.model, self.base, self.run_dir = model, base, run_dir
        self.n_classes = len(folder.class_names)
        self.size = (config.image_size, config.image_size)
        self.checkpoint = BestModelCheckpoint(model, run_dir / runs.MODEL_FILE)
        self.history = StageCSVLogger(str(run_dir / runs.HISTORY_FILE))
        self.summaries: list[str] = []
        self.verbose = 0 if config.quiet else "auto"
        self.fine_tuned = False

    def callbacks(self, stage: str) -> list[keras.callbacks.Callback]:
        self.history.stage = self.checkpoint.stage = stage
        patience = self.config.patience
        return [
            self.checkpoint,
            keras.callbacks.EarlyStopping(patience=patience, restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau(factor=0.2, patience=max(1, patience - 1)),
            self.history,
        ]

    def images(self, split: str, *, training: bool):
        """A split as a tf.data pipeline; training order is shuffled (by tf.data, so ``fit``
        gets ``shuffle=False``) and augmented."""
        data = getattr(self.folder, split)
        dataset = make_dataset(
            data,
            self.size,
            batch_size=self.config.batch_size,
            shuffle=training,
            seed=self.config.seed,
        )
        augmenter = build_augmenter(self.config.augment, self.config.seed) if training else None
        if augmenter is None:
            return dataset
        import tensorflow as tf  # input pipelines are tf.data on every Keras backend

        return dataset.map(
            lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
        )

    def train_head(self) -> None:
        config = self.config
        if self.backbone.pretrained:
            freeze(self.base)
        self.summaries.append("# stage 1: head training\n" + summary_text(self.model))
        if config.mode == "extract":
            self._train_head_on_features()
            return
        trainer = trainer_for(self.model, self.backbone)
        compile_for(trainer, self.n_classes, config.lr)
        trainer.fit(
            self.images("train", training=True),
            epochs=config.epochs,
            validation_data=self.images("val", training=False),
            callbacks=self.callbacks("head"),
            verbose=self.verbose,
            shuffle=False,
        )

    def _train_head_on_features(self) -> None:
        """Workflow 2: one pass of the frozen backbone, then the head trains on its outputs."""
        extractor = feature_extractor(self.model)
        train_x, train_y = self._features(extractor, "train")
        val_x, val_y = self._features(extractor, "val")
        classifier = classifier_of(self.model)
        compile_for(classifier, self.n_classes, self.config.lr)
        classifier.fit(
            train_x,
            train_y,
            batch_size=self.config.batch_size,
            epochs=self.config.epochs,
            validation_data=(val_x, val_y),
            callbacks=self.callbacks("head"),
            verbose=self.verbose,
        )

    def _features(self, extractor: keras.Model, split: str) -> tuple[np.ndarray, np.ndarray]:
        dataset = self.images(split, training=False)
        features = extractor.predict(dataset, verbose=self.verbose)
        return features, np.asarray(getattr(self.folder, split).labels, dtype="int32")

    def fine_tune(self, unfreeze: int) -> None:
        """Stage 2: unfreeze the top of the base, recompile at a low rate, train a few epochs."""
        self.fine_tuned = True
        unfreeze_top(self.base, unfreeze, self.config.bn)
        self.summaries.append("# stage 2: fine-tuning\n" + summary_text(self.model))
        trainer = trainer_for(self.model, self.backbone)
        compile_for(trainer, self.n_classes, self.config.fine_tune_lr)
        trainer.fit(
            self.images("train", training=True),
            epochs=self.config.fine_tune_epochs,
            validation_data=self.images("val", training=False),
            callbacks=self.callbacks("fine_tune"),
            verbose=self.verbose,
            shuffle=False,
        )


class BestModelCheckpoint(keras.callbacks.Callback):
    """Save the *full* model whenever validation loss improves, across both stages.

    Unlike ``ModelCheckpoint`` it saves a fixed model, because in workflow 2 ``fit`` runs on
    the head alone while the file must hold the whole classifier.
    """

    def __init__(self, full_model: keras.Model, path: Path, monitor: str = "val_loss"):
        super().__init__()
        self.full_model, self.path, self.monitor = full_model, path, monitor
        self.best = np.inf
        self.stage = "head"
        self.best_stage, self.best_epoch = "", -1  # where the saved model comes from

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and value < self.best:
            self.best = float(value)
            self.best_stage, self.best_epoch = self.stage, epoch
            runs.save_model_atomic(self.full_model, self.path)


class StageCSVLogger(keras.callbacks.CSVLogger):
    """``CSVLogger`` over both stages in one file, with a ``stage`` column and running epochs."""

    def __init__(self, filename: str):
        super().__init__(filename)
        self.stage = "head"
        self.epochs_done = 0

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(self.epochs_done, {"stage": self.stage, **(logs or {})})
        self.epochs_done += 1

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        self.append = True  # the next stage continues the same file

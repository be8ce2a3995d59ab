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
from headstart.cache import EntrySpec, FeatureCache
from headstart.config import Config
from headstart.data import load_image_folder, make_dataset, write_skipped
from headstart.errors import UsageError
from headstart.evaluate import (
    PREDICTIONS_FILE,
    metrics_for_split,
    predict_split,
    write_predictions,
)
from headstart.extract import (
    InferenceModeTop,
    ViewSampler,
    extract_batches,
    run_in_batches,
    split_at_cut,
)
from headstart.freeze import freeze, resolve_unfreeze, unfreeze_top
from headstart.model import (
    FEATURES_NAME,
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
    augments = parse_augment(config.augment)  # fail on a bad spec before any slow work
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
        views=config.views if augments and backbone.pretrained and config.mode == "extract" else 0,
    )
    config.save(run_dir / runs.CONFIG_FILE)
    runs.write_json(run_dir / runs.LABELS_FILE, list(folder.class_names))
    write_skipped(folder.skipped, str(run_dir / runs.SKIPPED_FILE))

    session = _Session(config, backbone, folder, model, base, run_dir)
    started = time.monotonic()
    will_fine_tune = backbone.pretrained and config.fine_tune and config.fine_tune_epochs
    if will_fine_tune and unfreeze:
        session.plan_fine_tuning(unfreeze)
    session.train_head()
    if will_fine_tune and unfreeze:
        session.fine_tune(unfreeze)
    train_seconds = time.monotonic() - started
    model = keras.saving.load_model(run_dir / runs.MODEL_FILE)  # the best on validation
    if len(folder.test):
        probabilities = predict_split(model, folder.test, config.batch_size)
        metrics = metrics_for_split(
            model, folder.test, folder.class_names, probabilities=probabilities
        )
        write_predictions(
            run_dir / PREDICTIONS_FILE, folder.test, folder.class_names, probabilities
        )
    else:
        metrics = metrics_for_split(model, folder.test, folder.class_names)  # {"n_test": 0, ...}
    metrics["train_seconds"] = round(train_seconds, 1)  # both stages, test evaluation excluded
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
    try:  # figures + report.html; a failure to draw must never lose the trained run
        from headstart.report import report

        report(run_dir, folder=folder)
    except Exception as error:
        debug = log.isEnabledFor(logging.DEBUG)
        log.warning("report not written (the run itself is complete): %s", error, exc_info=debug)
    return TrainResult(run_dir, metrics, config)


def _weights_id(config: Config, cache: FeatureCache | None) -> str:
    """What the cache key needs to know about the weights: random ones depend on the seed,
    a weights file on its content."""
    if config.weights == "none":
        return f"none:{config.seed}"
    if config.weights == "imagenet" or cache is None:
        return config.weights
    return "file:" + cache.content_hashes([config.weights])[0]


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
        self.cache = FeatureCache(config.cache_dir) if config.cache else None
        self.weights_id = _weights_id(config, self.cache)
        self.trunk = None  # set by plan_fine_tuning when the backbone can be cut
        self._trunk_rows: dict[str, list] = {}

    def plan_fine_tuning(self, unfreeze: int) -> None:
        """Cut the backbone where fine-tuning starts, so its frozen trunk runs only once."""
        if self.config.mode == "extract" and self.config.cache_trunk:
            self.trunk = split_at_cut(self.model, self.base, unfreeze)

    def callbacks(self, stage: str) -> list[keras.callbacks.Callback]:
        self.history.stage = self.checkpoint.stage = stage
        patience = self.config.patience
        callbacks = [
            EpochTimer(),
            self.checkpoint,
            keras.callbacks.EarlyStopping(patience=patience, restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau(factor=0.2, patience=max(1, patience - 1)),
            self.history,
        ]
        if self.config.tensorboard:
            log_dir = self.run_dir / "tensorboard" / stage
            callbacks.append(keras.callbacks.TensorBoard(log_dir=str(log_dir)))
        return callbacks

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
        """Workflow 2, plus augmentation: the head trains on cached backbone outputs of the
        clean images and of ``--views`` augmented versions, one view drawn per image per epoch.

        With a cached trunk (fine-tuning planned), pooled features are derived from the trunk
        activations by the still-frozen top block: the backbone runs once for both stages.
        """
        if self.trunk is not None:
            pooled = keras.Model(
                self.trunk.top.input,
                self.model.get_layer(FEATURES_NAME)(self.trunk.top_block(self.trunk.top.input)),
            )
            train_views = [run_in_batches(pooled, rows) for rows in self._trunk_views("train")]
            val_view = run_in_batches(pooled, self._trunk_views("val")[0])
        else:
            extractor = feature_extractor(self.model)
            output = f"pooled:{self.config.head}"
            train_views = self._cached_views(extractor, output, "train")
            val_view = self._cached_views(extractor, output, "val")[0]
        classifier = classifier_of(self.model)
        compile_for(classifier, self.n_classes, self.config.lr)
        classifier.fit(
            self._sampler(train_views, "train"),
            validation_data=self._sampler([val_view], "val"),
            epochs=self.config.epochs,
            callbacks=self.callbacks("head"),
            verbose=self.verbose,
        )

    def _sampler(self, views, split: str) -> ViewSampler:
        labels = np.asarray(getattr(self.folder, split).labels, dtype="int32")
        training = split == "train"
        return ViewSampler(
            views, labels, self.config.batch_size, shuffle=training, seed=self.config.seed
        )

    def _trunk_views(self, split: str) -> list:
        if split not in self._trunk_rows:
            output = f"trunk:{self.trunk.cut_layer}"
            self._trunk_rows[split] = self._cached_views(self.trunk.trunk, output, split)
        return self._trunk_rows[split]

    def _cached_views(self, extractor: keras.Model, output: str, split: str) -> list:
        """Outputs of ``extractor`` for a split: view 0 is the clean images; the training
        split adds ``--views`` augmented views. From the feature cache when enabled."""
        paths = list(getattr(self.folder, split).paths)
        n_views = 1 + (self.config.views if split == "train" else 0)
        views = []
        for view in range(n_views):
            augmenter = build_augmenter(self.config.augment, self.config.seed + 1000 * view)
            augmenter = augmenter if view else None
            view_id = "clean" if view == 0 else f"{self.config.augment}#{self.config.seed}#{view}"

            def compute(missing, augmenter=augmenter):
                return extract_batches(
                    extractor,
                    missing,
                    self.config.image_size,
                    batch_size=self.config.batch_size,
                    augmenter=augmenter,
                    verbose=not self.config.quiet,
                )

            if self.cache is None:
                views.append(np.concatenate(list(compute(paths))))
                continue
            spec = EntrySpec(
                self.backbone.name,
                self.weights_id,
                self.config.image_size,
                self.backbone.preprocessing,
                output,
                view_id,
            )
            views.append(self.cache.rows(spec, paths, compute))
        return views

    def fine_tune(self, unfreeze: int) -> None:
        """Stage 2: unfreeze the top of the base, recompile at a low rate, train a few epochs.

        With a cached trunk only the top block and head run, on cached activations of the
        clean and augmented views; otherwise the full model runs on augmented images.
        """
        self.fine_tuned = True
        unfreeze_top(self.base, unfreeze, self.config.bn)
        self.summaries.append("# stage 2: fine-tuning\n" + summary_text(self.model))
        if self.trunk is not None:
            trainer = InferenceModeTop(self.trunk, self.model)
            train_data = self._sampler(self._trunk_views("train"), "train")
            val_data = self._sampler(self._trunk_views("val"), "val")
        else:
            trainer = trainer_for(self.model, self.backbone)
            train_data = self.images("train", training=True)
            val_data = self.images("val", training=False)
        compile_for(trainer, self.n_classes, self.config.fine_tune_lr)
        trainer.fit(
            train_data,
            epochs=self.config.fine_tune_epochs,
            validation_data=val_data,
            callbacks=self.callbacks("fine_tune"),
            verbose=self.verbose,
            shuffle=False,
        )


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


class StageCSVLogger(keras.callbacks.Callback):
    """history.csv over both stages in one file, with a ``stage`` column and running epochs.

    The columns are those of ``keras.callbacks.CSVLogger`` (``epoch``, then the log keys
    sorted), but the whole file is rewritten atomically at every epoch end instead of appended
    to: a run killed at any moment leaves a complete CSV, never half a row. ``rows`` holds what
    is written (a few hundred rows at most).
    """

    def __init__(self, filename: str):
        super().__init__()
        self.filename = filename
        self.stage = "head"
        self.epochs_done = 0
        self.rows: list[dict] = []

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": self.epochs_done, "stage": self.stage}
        for key, value in (logs or {}).items():
            row[key] = value if isinstance(value, str) else _csv_number(value)
        self.rows.append(row)
        self.epochs_done += 1
        self.write()

    def write(self) -> None:
        import csv
        import io

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

"""The recipe: stage 1 trains a new head on the frozen backbone, stage 2 fine-tunes its top.

Stage 1 runs as workflow 2 (``extract``: the backbone runs once, the head trains on cached
features) or workflow 1 (``frozen``: the frozen backbone runs every epoch behind augmentation).
Both end in the same full model, saved as one ``.keras`` file in the run directory.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from headstart import files, runs
from headstart.augment import AUTO, AUTO_CANDIDATES, SEEDS_POLICY, build_augmenter, parse_augment
from headstart.backbones import (
    FUSION_SEPARATOR,
    Backbone,
    build_backbone,
    check_image_size,
    get_backbone,
)
from headstart.backbones import resolve_weights as resolve_backbone_weights
from headstart.config import FEATURE_NORMS, FINE_TUNE_LR_CANDIDATES, GUIDE_FINE_TUNE_LR, Config
from headstart.data import make_dataset, write_skipped
from headstart.distributed.cluster import (
    Cluster,
    barrier,
    check_batch_size,
    current,
    even_batches,
    finish,
    initialize,
    sampler_batches,
    weights_digest,
)
from headstart.errors import UsageError
from headstart.evaluation import (
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
from headstart.imbalance import class_weights, resolve_class_weight
from headstart.model import (
    FEATURES_NAME,
    build_model,
    classifier_of,
    feature_extractor,
    pooled_name,
    summary_text,
    trainer_for,
)
from headstart.report import redraw
from headstart.splits import folder_for, split_manifest
from headstart.training.cache import EntrySpec, FeatureCache
from headstart.training.callbacks import (
    BestModelCheckpoint,
    EpochTimer,
    RunCallback,
    StageCSVLogger,
)
from headstart.training.state import (
    ResumeCheckpoint,
    TrainingState,
    callback_state,
    read_state,
    remove_state,
    trained_indices,
    write_state,
)

log = logging.getLogger(__name__)

HeadBuilder = Callable[[keras.KerasTensor, int], keras.KerasTensor]  # (features, n_classes)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    config: Config


def train(
    config: Config,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    head_builder: HeadBuilder | None = None,
) -> TrainResult:
    """Train, evaluate and save a classifier; everything lands in the run directory.

    ``callbacks``: extra Keras callbacks, given to every stage's ``fit`` (not to the candidate
    trials that choose the augmentation and the fine-tuning rate); subclass
    `headstart.training.callbacks.RunCallback` to also see the whole classifier and the run folder.
    ``head_builder(features, n_classes) -> logits``: a custom head in place of the built-in
    one, on the pooled features (so it trains on the feature cache); config.json records its
    name in ``custom_head``. Neither is a Config field: callables are not JSON.
    """
    config.validate()
    if head_builder is not None:
        config = dataclasses.replace(config, custom_head=_name_of(head_builder))
    cluster = _join(config)
    backbone = get_backbone(config.backbone)
    image_size = config.image_size or backbone.default_size
    check_image_size(backbone, image_size)
    weights = resolve_backbone_weights(backbone, config.weights)
    mode = config.mode if backbone.pretrained else "frozen"
    augment = config.augment
    if augment == AUTO and mode == "frozen":  # choosing needs cached features
        log.info("--augment auto chooses on cached features (--mode extract): using the seeds'")
        augment = SEEDS_POLICY
    # choosing the head's input needs cached features, and a custom head has its own input
    choose_norm = mode == "extract" and head_builder is None
    feature_norm = "none" if config.feature_norm == AUTO and not choose_norm else None
    augments = augment == AUTO or parse_augment(augment)  # a bad spec fails before slow work
    folder = folder_for(config)
    run_dir = runs.new_run_dir(config.out) if cluster.writes else Path(tempfile.mkdtemp())
    config = dataclasses.replace(
        config,
        data=str(Path(config.data).resolve()),
        out=str(run_dir),
        image_size=image_size,
        weights=weights,
        mode=mode,
        augment=augment,
        augment_scores={},
        feature_norm=feature_norm or config.feature_norm,
        feature_norm_scores={},
        views=config.views if augments and mode == "extract" else 0,
        class_weight=resolve_class_weight(
            config.class_weight, folder.train.counts(len(folder.class_names))
        ),
    )
    config = _placed(config, cluster)
    model, base = _build(config, backbone, len(folder.class_names), head_builder)
    unfreeze = _resolve_unfreeze(config.unfreeze, backbone, base) if backbone.pretrained else "0"
    config = dataclasses.replace(config, unfreeze=unfreeze)
    config.save(run_dir / runs.CONFIG_FILE)
    files.write_json(run_dir / runs.LABELS_FILE, list(folder.class_names))
    files.write_json(run_dir / runs.SPLIT_FILE, split_manifest(folder))
    write_skipped(folder.skipped, str(run_dir / runs.SKIPPED_FILE))
    if config.check:
        from headstart.check import CHECK_FILE, check_folder, summary_line

        report = check_folder(folder)  # counts, imbalance, duplicates and leakage across splits
        log.info(summary_line(report))
        files.write_json(run_dir / CHECK_FILE, report)
    return _run(config, backbone, folder, model, base, run_dir, None, callbacks)


def resume(
    run: str | Path,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    head_builder: HeadBuilder | None = None,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> TrainResult:
    """Continue an interrupted run from its last saved epoch (see `headstart.training.state`); a run
    with a custom head needs its ``head_builder`` again.

    A ``--distributed`` run continues distributed: every process calls this, with the new
    launch's cluster (``coordinator``, ``num_processes``, ``process_id``; all None: JAX
    detects it). The number of processes may differ from the first launch's, as long as it
    divides the global batch; each process reads the state process 0 saved in the run folder
    (which must be shared, or copied to the same path on every machine)."""
    run_dir = Path(run)
    if not (run_dir / runs.CONFIG_FILE).is_file():
        raise UsageError(f"--resume {run_dir}: not a headstart run folder (no config.json)")
    runs.check_version(run_dir)
    config = Config.load(run_dir / runs.CONFIG_FILE)
    cluster = Cluster()
    if config.distributed:
        config = dataclasses.replace(
            config, coordinator=coordinator, num_processes=num_processes, process_id=process_id
        )
        cluster = _join(config)
        config = _placed(config, cluster)
    elif coordinator or num_processes is not None or process_id is not None:
        raise UsageError(
            f"--resume {run_dir}: the run was not --distributed; resume it without the "
            f"cluster options (or `headstart launch`)"
        )
    state = read_state(run_dir)
    if state is None:
        if (run_dir / runs.METRICS_FILE).is_file():
            raise UsageError(f"--resume {run_dir}: the run is complete, there is nothing to resume")
        raise UsageError(
            f"--resume {run_dir}: the run stopped while it was being set up, so there is "
            f"nothing to resume; train again"
        )
    config.validate()
    backbone = get_backbone(config.backbone)
    folder = folder_for(config)
    recorded = runs.read_json(run_dir / runs.SPLIT_FILE)
    if split_manifest(folder) != recorded:
        raise UsageError(
            f"--resume {run_dir}: the images in {config.data} are not those the run started "
            f"with (its split.json differs): train again with a new --out"
        )
    if config.custom_head and head_builder is None:
        raise UsageError(
            f"--resume {run_dir}: the run has a custom head ({config.custom_head}): resume it "
            f"from Python, headstart.training.resume(run, head_builder={config.custom_head})"
        )
    model, base = _build(config, backbone, len(folder.class_names), head_builder)
    log.info("resuming %s at stage %s, epoch %d", run_dir, state.stage, state.next_epoch + 1)
    if not cluster.writes:  # the state is read: train on in a scratch copy of the run folder
        run_dir = _scratch_copy(run_dir)
        config = dataclasses.replace(config, out=str(run_dir))
    if config.distributed:  # process 0 writes the run folder only once every copy is made
        barrier("headstart resume")
    return _run(config, backbone, folder, model, base, run_dir, state, callbacks)


def _scratch_copy(run_dir: Path) -> Path:
    """A copy of the run folder for a process other than 0, which writes only there (deleted
    when it ends)."""
    scratch = Path(tempfile.mkdtemp())
    shutil.copytree(run_dir, scratch, dirs_exist_ok=True)
    return scratch


def _join(config: Config) -> Cluster:
    """``--distributed``: join the cluster before any model is built. Processes but 0 train in
    a scratch folder, deleted at the end, and show no progress bars."""
    if not config.distributed:
        return Cluster()
    cluster = initialize(config.coordinator, config.num_processes, config.process_id)
    check_batch_size(config.batch_size, cluster)
    return cluster


def _placed(config: Config, cluster: Cluster) -> Config:
    """A ``--distributed`` process's config: where it stands in the cluster (as joined, also
    when JAX detected it by itself), and quiet unless it writes the run."""
    if not config.distributed:
        return config
    return dataclasses.replace(
        config,
        num_processes=cluster.num_processes,
        process_id=cluster.process_id,
        quiet=config.quiet or not cluster.writes,
    )


def _build(config: Config, backbone: Backbone, n_classes: int, head_builder=None):
    """The full model, initialised from the seed: the same on every call with one config."""
    keras.utils.set_random_seed(config.seed)
    base = _build_base(config, backbone)
    model = build_model(
        backbone,
        base,
        n_classes,
        head=config.head,
        hidden=config.hidden,
        dropout=config.dropout,
        feature_norm="none" if config.feature_norm == AUTO else config.feature_norm,
        head_builder=head_builder,
    )
    return model, base


def _build_base(config: Config, backbone: Backbone):
    """The base, or a fusion's two as a tuple: each built from the seed as if it were alone,
    so that random weights (and so their cached features) are a single-backbone run's."""
    if not backbone.parts:
        return build_backbone(backbone, config.image_size, config.weights)
    bases = []
    for part, weights in zip(backbone.parts, _per_part(config.weights, backbone), strict=True):
        keras.utils.set_random_seed(config.seed)
        bases.append(build_backbone(part, config.image_size, weights))
    return tuple(bases)


def _per_part(value: str, backbone: Backbone) -> list[str]:
    """A fusion's "V1+V2" setting (``--weights``, ``--unfreeze``) as one value per backbone;
    a single value applies to both."""
    values = str(value).split(FUSION_SEPARATOR)
    return values if len(values) == len(backbone.parts) else [str(value)] * len(backbone.parts)


def _parts(backbone: Backbone, base) -> list[tuple[Backbone, keras.Model]]:
    """(backbone, base) pairs: one for a single backbone, two for a fusion."""
    if not backbone.parts:
        return [(backbone, base)]
    return list(zip(backbone.parts, base, strict=True))


def _resolve_unfreeze(spec: str, backbone: Backbone, base) -> str:
    """``--unfreeze`` as layer counts, "N" or a fusion's "N1+N2": each base's top block by its
    own default, or the same given spec for both."""
    specs = _per_part(spec, backbone) if backbone.parts else [spec]
    counts = [
        resolve_unfreeze(each, part, part_base)
        for each, (part, part_base) in zip(specs, _parts(backbone, base), strict=True)
    ]
    return FUSION_SEPARATOR.join(str(count) for count in counts)


def _name_of(head_builder: HeadBuilder) -> str:
    module = getattr(head_builder, "__module__", None) or "?"
    return f"{module}.{getattr(head_builder, '__qualname__', repr(head_builder))}"


def _run(config, backbone, folder, model, base, run_dir: Path, state, callbacks=()) -> TrainResult:
    """Both stages from ``state`` (None: from the start), then the test metrics and report."""
    session = _Session(config, backbone, folder, model, base, run_dir, state)
    session.user_callbacks = list(callbacks)
    if state is None:  # resumable from here on: a kill during extraction restarts stage 1
        write_state(
            run_dir,
            TrainingState("head", callbacks=callback_state(session.checkpoint, session.history)),
        )
    unfreeze = [int(count) for count in str(config.unfreeze).split(FUSION_SEPARATOR)]
    fine_tune = bool(backbone.pretrained and config.fine_tune and config.fine_tune_epochs)
    fine_tune = fine_tune and any(unfreeze)
    if fine_tune:
        session.plan_fine_tuning(unfreeze)
    stage = state.stage if state else "head"
    if stage == "head":
        session.train_head()
        session.end_stage("fine_tune" if fine_tune else "done")
    elif stage == "fine_tune":
        session.freeze_for_head()
        state.apply(session.model)  # the head as stage 1 left it
    if fine_tune and stage != "done":
        session.fine_tune(unfreeze)
        session.end_stage("done")
    train_seconds = session.elapsed()
    if config.distributed:  # evaluation and the report are process 0's, on one device
        cluster = current(True)
        log.info("process %d: final weights %s", cluster.process_id, weights_digest(model))
        finish()
        if not cluster.writes:
            shutil.rmtree(run_dir, ignore_errors=True)
            return TrainResult(run_dir, {}, session.config)
    model = keras.saving.load_model(run_dir / runs.MODEL_FILE)  # the best on validation
    calibration = None
    if config.calibrate:  # T fitted on validation, saved inside model.keras (headstart.calibrate)
        from headstart.calibrate import calibrate_model

        model, calibration = calibrate_model(model, folder.val, config.batch_size)
        files.save_model_atomic(model, run_dir / runs.MODEL_FILE)
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
    metrics["saved_from"] = {**checkpoint.saved, "epoch": checkpoint.saved["epoch"] + 1}
    if fine_tune:
        metrics["fine_tune_kept"] = checkpoint.saved["stage"] == "fine_tune"
    metrics["feature_norm"] = session.config.feature_norm
    if session.config.feature_norm_scores:
        metrics["feature_norm_scores"] = session.config.feature_norm_scores
    if calibration:
        metrics["calibration"] = calibration
    metrics["class_weight"] = config.class_weight
    if session.class_weight:
        metrics["class_weights"] = {
            folder.class_names[i]: round(w, 6) for i, w in session.class_weight.items()
        }
    metrics["augment"] = session.config.augment
    if session.config.augment_scores:  # --augment auto: what each candidate scored
        metrics["augment_scores"] = session.config.augment_scores
    if fine_tune:
        metrics["fine_tune_lr"] = session.config.fine_tune_lr
        if session.config.fine_tune_lr_scores:
            metrics["fine_tune_lr_scores"] = session.config.fine_tune_lr_scores
    files.write_json(run_dir / runs.METRICS_FILE, metrics)
    if fine_tune and not metrics["fine_tune_kept"]:
        log.info(
            "fine-tuning did not beat stage 1's validation accuracy (%.4f): model.keras is the "
            "stage-1 model",
            checkpoint.accuracy_floor,
        )
    if session.summaries:  # a resumed run keeps the summaries written when it started
        files.write_text_atomic(run_dir / runs.SUMMARY_FILE, "\n".join(session.summaries))
    redraw(run_dir, folder=folder)  # figures + report.html
    remove_state(run_dir)
    return TrainResult(run_dir, metrics, session.config)


def _weights_id(config: Config, cache: FeatureCache | None, weights: str | None = None) -> str:
    """What the cache key needs to know about the weights (``config.weights`` unless given:
    one backbone's of a fusion): random ones depend on the seed, a file on its content."""
    weights = config.weights if weights is None else weights
    if weights == "none":
        return f"none:{config.seed}"
    if weights == "imagenet" or cache is None:
        return weights
    return "file:" + cache.content_hashes([weights])[0]


def compile_for(
    model: keras.Model, n_classes: int, learning_rate: float, *, weighted: bool = False
) -> None:
    """Logit outputs: binary cross-entropy for 2 classes, sparse categorical otherwise.

    ``weighted``: accuracy counts sample weights (``--distributed``, where validation's padding
    rows have weight 0, see `distributed.cluster.even_batches`; training accuracy then also
    counts --class-weight's weights)."""
    if n_classes == 2:
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        accuracy = keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    metrics = {"weighted_metrics" if weighted else "metrics": [accuracy]}
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, **metrics)


class _Session:
    """State shared by the two stages: datasets, callbacks and the best-so-far checkpoint.

    ``state`` is where a resumed run stopped (`headstart.training.state`); None for a new run.
    """

    def __init__(self, config, backbone: Backbone, folder, model, base, run_dir: Path, state):
        self.config, self.backbone, self.folder = config, backbone, folder
        self.model, self.base, self.run_dir = model, base, run_dir
        self.state = state
        self.n_classes = len(folder.class_names)
        # --class-weight: applied in every fit of training (both stages and every candidate)
        self.class_weight = class_weights(config.class_weight, folder.train.counts(self.n_classes))
        self.size = (config.image_size, config.image_size)
        self.checkpoint = BestModelCheckpoint(model, run_dir / runs.MODEL_FILE)
        self.history = StageCSVLogger(str(run_dir / runs.HISTORY_FILE))
        if state is not None:
            self.checkpoint.set_state(state.callbacks["checkpoint"])
            self.history.rows = list(state.callbacks["history"])
        self.summaries: list[str] = []
        self.verbose = 0 if config.quiet else "auto"
        self.cache = FeatureCache(config.cache_dir) if config.cache else None
        # a fusion's cache keys are its backbones' own (see `_extract`)
        self.weights_id = None if backbone.parts else _weights_id(config, self.cache)
        self.trunk = None  # set by plan_fine_tuning when the backbone can be cut
        self.unfreeze: list[int] = []  # top layers to fine-tune, per base
        self._memo: dict[tuple, object] = {}  # (kind, split, policy, view) -> rows
        self._frozen_parts: dict[str, keras.Model] = {}
        self._started = time.monotonic()
        self._stage_variables: list[int] = []  # what the stage in progress trains
        self.user_callbacks: list[keras.callbacks.Callback] = []  # train(callbacks=...)

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
        elif self.config.mode == "extract" and self.config.cache_trunk:
            self.trunk = split_at_cut(self.model, self.base, unfreeze[0])

    def _fit(self, trainer, stage: str, train_data, val_data, epochs: int) -> None:
        """``trainer.fit`` for one stage, from where a resumed run stopped; the training state
        is saved after every epoch."""
        self.history.stage = self.checkpoint.stage = stage
        self._stage_variables = trained_indices(self.model, trainer)
        self.checkpoint.tracked = trained_indices(self.model, trainer, seeds=False)
        state = self.state if self.state is not None and self.state.stage == stage else None
        start = state.next_epoch if state is not None else 0
        if state is not None:
            state.apply(self.model)
            self.checkpoint.best_values = state.best_values
        if start >= epochs:
            return  # the run was stopped after its last epoch of this stage
        *schedule, early_stopping, plateau = self._training_callbacks(train_data)
        callbacks = [*schedule, EpochTimer(), self.checkpoint, early_stopping, plateau]
        callbacks.append(self.history)
        for callback in self.user_callbacks:
            if isinstance(callback, RunCallback):
                callback.set_run(self.model, self.run_dir, stage)
        callbacks.extend(self.user_callbacks)
        if self.config.tensorboard:
            log_dir = self.run_dir / "tensorboard" / stage
            callbacks.append(keras.callbacks.TensorBoard(log_dir=str(log_dir)))
        callbacks.append(
            ResumeCheckpoint(
                self.run_dir,
                self.model,
                self._stage_variables,
                stage,
                epochs,
                (self.checkpoint, self.history, early_stopping, plateau),
                self.elapsed,
                resume_from=state if start > 0 else None,
            )
        )
        trainer.fit(
            self._feed(train_data, training=True),
            validation_data=self._feed(val_data, training=False),
            epochs=epochs,
            initial_epoch=start,
            callbacks=callbacks,
            verbose=self.verbose,
            shuffle=False,
            class_weight=self.class_weight,
        )

    def _compile(self, trainer: keras.Model, learning_rate: float) -> None:
        """`compile_for` this run: its classes, and weighted accuracy when distributed."""
        compile_for(trainer, self.n_classes, learning_rate, weighted=self.config.distributed)

    def _feed(self, data, *, training: bool):
        """What ``fit`` gets for ``data``: cached views go in as tf.data when distributed
        (Keras's multi-process data adapter takes nothing else), as the sampler otherwise."""
        if self.config.distributed and isinstance(data, ViewSampler):
            return sampler_batches(data, training=training)
        return data

    def _training_callbacks(self, train_data) -> list[keras.callbacks.Callback]:
        """What decides the course of training (and nothing that writes files): each epoch's
        draw of cached views, early stopping and the learning-rate schedule."""
        callbacks = []
        if isinstance(train_data, ViewSampler):  # each epoch's draw depends on its number only
            callbacks.append(
                keras.callbacks.LambdaCallback(
                    on_epoch_begin=lambda epoch, _: train_data.set_epoch(epoch)
                )
            )
        early_stopping = keras.callbacks.EarlyStopping(patience=self.config.patience)
        plateau = keras.callbacks.ReduceLROnPlateau(
            factor=0.2, patience=max(1, self.config.patience - 1)
        )
        return [*callbacks, early_stopping, plateau]

    def end_stage(self, next_stage: str) -> None:
        """Save the state between stages; stage 2 starts from stage 1's best weights."""
        if next_stage == "done":
            state = TrainingState("done", train_seconds=self.elapsed())
        else:
            self.checkpoint.restore_best()
            self.checkpoint.start_fine_tuning()
            variables = self.model.variables
            state = TrainingState(
                next_stage,
                variables={i: np.array(variables[i].numpy()) for i in self._stage_variables},
                train_seconds=self.elapsed(),
            )
        state.callbacks = callback_state(self.checkpoint, self.history)
        write_state(self.run_dir, state)

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
        if augmenter is not None:
            import tensorflow as tf  # input pipelines are tf.data on every Keras backend

            dataset = dataset.map(
                lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
            )
        if self.config.distributed:
            return even_batches(dataset, len(data), self.config.batch_size, training=training)
        return dataset

    def freeze_for_head(self) -> None:
        """Stage 1's model: the backbone frozen (its summary is recorded for summary.txt)."""
        if self.backbone.pretrained:
            for _, base in _parts(self.backbone, self.base):
                freeze(base)
        self.summaries.append("# stage 1: head training\n" + summary_text(self.model))

    def train_head(self) -> None:
        if self.config.feature_norm == AUTO:  # only in extract mode (see `train`)
            self._choose_feature_norm()
        self.freeze_for_head()
        if self.config.mode == "extract":
            self._train_head_on_features()
            return
        trainer = trainer_for(self.model, self.backbone)
        self._compile(trainer, self.config.lr)
        self._fit(
            trainer,
            "head",
            self.images("train", training=True),
            self.images("val", training=False),
            self.config.epochs,
        )

    def _train_head_on_features(self) -> None:
        """Workflow 2, plus augmentation: the head trains on cached backbone outputs of the
        clean images and of ``--views`` augmented versions, one view drawn per image per epoch.

        With a cached trunk (fine-tuning planned), pooled features are derived from the trunk
        activations by the still-frozen top block: the backbone runs once for both stages.
        """
        if self.config.augment == AUTO:
            self._choose_augmentation()
        classifier = classifier_of(self.model)
        self._compile(classifier, self.config.lr)
        self._fit(
            classifier,
            "head",
            self._sampler(self._views("pooled", "train"), "train"),
            self._sampler(self._views("pooled", "val"), "val"),
            _epochs_of(self.config.augment_scores, self.config.augment, self.config.epochs),
        )

    def _choose_feature_norm(self) -> None:
        """``--feature-norm auto``: the model built with each candidate normalisation of the
        head's input, its head trained by stage 1's own procedure on the clean cached features;
        the best on validation is kept, as a resumed run would build it from the seed.

        The first candidate, "none", is the plain cached-features head (the floor of the run)
        and the session's own model, which `_build` made with that input: it is put back as it
        was built and kept when it wins; another winner is rebuilt from the seed.
        """
        train_data = self._sampler(self._views("pooled", "train", "none", 0), "train")
        val_data = self._sampler(self._views("pooled", "val"), "val")
        config, scores = self.config, {}
        reset = _snapshot(classifier_of(self.model).variables)
        for norm in FEATURE_NORMS:
            model = self.model
            if norm != "none":
                candidate = dataclasses.replace(config, feature_norm=norm)
                model, _ = _build(candidate, self.backbone, self.n_classes)
            classifier = classifier_of(model)
            scores[norm] = self._trial(classifier, train_data, val_data, config.epochs, config.lr)
        reset()
        chosen = _best_of(scores)
        self._record_choice(feature_norm=chosen, feature_norm_scores=scores)
        log.info("head input chosen on validation: %s (%s)", chosen, _scores_text(scores))
        if chosen == "none":
            return
        self.model, self.base = _build(self.config, self.backbone, self.n_classes)
        self.checkpoint.full_model = self.model
        self._frozen_parts.clear()  # cached rows stay valid: the backbone is the same
        if self.trunk is not None:
            self.plan_fine_tuning(self.unfreeze)

    def _choose_augmentation(self) -> None:
        """``--augment auto``: train the head once per candidate policy, by stage 1's own
        procedure on as many cached views, and keep the policy most accurate on validation.

        The candidates grow stronger, so the first one that does worse than the best so far
        ends the search: stronger ones are not extracted (each costs a backbone pass per view).
        "none" is a candidate, so the choice is never worse on validation than plain cached
        features; the run then retrains the winner from the same start, to the same weights.
        """
        classifier = classifier_of(self.model)
        val_data = self._sampler(self._views("pooled", "val"), "val")
        reset = _snapshot(classifier.variables)

        def score(policy: str) -> dict:
            if policy == "none" and self.config.feature_norm_scores:
                # the same head, start and data as the chosen --feature-norm candidate
                return self.config.feature_norm_scores[self.config.feature_norm]
            reset()
            n_views = self.config.views if policy != "none" else 0
            train_data = self._sampler(self._views("pooled", "train", policy, n_views), "train")
            return self._trial(classifier, train_data, val_data, self.config.epochs, self.config.lr)

        scores = _climb(AUTO_CANDIDATES, score)
        reset()
        chosen = _best_of(scores)
        self._memo = {key: rows for key, rows in self._memo.items() if key[2] in ("", chosen)}
        self._record_choice(
            augment=chosen,
            augment_scores=scores,
            views=self.config.views if chosen != "none" else 0,
        )
        untried = AUTO_CANDIDATES[len(scores) :]
        log.info(
            "augmentation chosen on validation: %s (%s)%s",
            chosen,
            _scores_text(scores),
            f"; stronger ones not tried: {', '.join(untried)}" if untried else "",
        )

    def _sampler(self, views, split: str) -> ViewSampler:
        labels = np.asarray(getattr(self.folder, split).labels, dtype="int32")
        training = split == "train"
        return ViewSampler(
            views, labels, self.config.batch_size, shuffle=training, seed=self.config.seed
        )

    def _views(self, kind: str, split: str, policy: str | None = None, n_views: int | None = None):
        """Backbone outputs of a split: view 0 of the clean images, then (training split)
        ``n_views`` augmented by ``policy`` (default: the run's). ``kind`` "trunk" is the
        activations at the fine-tuning cut, "pooled" the pooled features (derived from the
        trunk's when that is cached). Each view is computed once per run, and once ever with
        the feature cache."""
        if split != "train":
            policy, n_views = "", 0
        policy = self.config.augment if policy is None else policy
        n_views = self.config.views if n_views is None else n_views
        return [self._view(kind, split, policy, view) for view in range(1 + n_views)]

    def _view(self, kind: str, split: str, policy: str, view: int):
        key = (kind, split, policy if view else "", view)
        if key not in self._memo:
            if kind == "pooled" and self.trunk is not None:
                rows = self._view("trunk", split, policy, view)
                self._memo[key] = run_in_batches(self._frozen_part("pooled_from_trunk"), rows)
            else:
                self._memo[key] = self._extract(kind, split, policy, view)
        return self._memo[key]

    def _frozen_part(self, kind: str) -> keras.Model:
        """The frozen model that makes a kind of view, built once per run (every view and
        every candidate policy goes through the same one): "trunk" (images to activations at
        the cut), "pooled" (images to pooled features), "pooled_from_trunk", or a fusion
        backbone's `pooled_name` (images to that backbone's pooled features)."""
        if kind not in self._frozen_parts:
            if kind == "trunk":
                part = self.trunk.trunk
            elif kind == "pooled":
                part = feature_extractor(self.model)
            elif self.backbone.parts:  # one backbone of a fusion, by its `pooled_name`
                part = keras.Model(self.model.input, self.model.get_layer(kind).output)
            else:
                top = self.trunk.top
                pooled = self.model.get_layer(FEATURES_NAME)(self.trunk.top_block(top.input))
                part = keras.Model(top.input, pooled)
            self._frozen_parts[kind] = part
        return self._frozen_parts[kind]

    def _extract(self, kind: str, split: str, policy: str, view: int):
        """Run the frozen part over a split's files (through one augmentation of ``policy``
        unless view 0), from and into the feature cache when it is on.

        A fusion's pooled features are each backbone's, cached under that backbone's own key
        (shared with its single-backbone runs) and concatenated.
        """
        if kind == "trunk":
            output = f"trunk:{self.trunk.cut_layer}"
        else:
            output = f"pooled:{self.config.head}"
        if not self.backbone.parts:
            extractor, weights_id = self._frozen_part(kind), self.weights_id
            return self._rows(extractor, self.backbone, weights_id, output, split, policy, view)
        weights = _per_part(self.config.weights, self.backbone)
        rows = [
            self._rows(
                self._frozen_part(pooled_name(part)),
                part,
                _weights_id(self.config, self.cache, part_weights),
                output,
                split,
                policy,
                view,
            )
            for part, part_weights in zip(self.backbone.parts, weights, strict=True)
        ]
        return np.concatenate([np.asarray(r[np.arange(len(r))]) for r in rows], axis=1)

    def _rows(self, extractor, backbone, weights_id, output, split, policy, view):
        """One frozen part's outputs over a split, through the feature cache when it is on."""
        paths = list(getattr(self.folder, split).paths)
        augmenter = build_augmenter(policy, self.config.seed + 1000 * view) if view else None

        def compute(missing, only=None):
            return extract_batches(
                extractor,
                missing,
                self.config.image_size,
                batch_size=self.config.batch_size,
                augmenter=augmenter,
                verbose=not self.config.quiet,
                only=only,
            )

        if self.cache is None:  # --distributed: every process computes every row
            return np.concatenate(list(compute(paths)))
        spec = EntrySpec(
            backbone.name,
            weights_id,
            self.config.image_size,
            backbone.preprocessing,
            output,
            "clean" if view == 0 else f"{policy}#{self.config.seed}#{view}",
        )
        if self.config.distributed:
            self._fill_my_part(spec, paths, compute)
        return self.cache.rows(spec, paths, compute)

    def _fill_my_part(self, spec: EntrySpec, paths: list[str], compute) -> None:
        """``--distributed``: this process extracts its part of the images into the cache,
        then waits for the others; the full read that follows is all cache hits.

        The cache must be one folder for all processes (on several machines, a shared file
        system); otherwise each process computes after the barrier what it does not find."""
        cluster = current(True)
        block = self.config.batch_size  # the batches a single process would extract
        self.cache.fill_part(spec, paths, compute, cluster.process_id, cluster.num_processes, block)
        barrier(f"headstart cache {spec.key()}")

    def fine_tune(self, unfreeze: list[int]) -> None:
        """Stage 2: unfreeze the top of the base (of each base of a fusion, ``unfreeze`` layers
        each), recompile at a low rate, train a few epochs.

        With a cached trunk only the top block and head run, on cached activations of the
        clean and augmented views; otherwise the full model runs on augmented images.
        """
        for (_, base), count in zip(_parts(self.backbone, self.base), unfreeze, strict=True):
            unfreeze_top(base, count, self.config.bn)
        self.summaries.append("# stage 2: fine-tuning\n" + summary_text(self.model))
        if self.trunk is not None:
            trainer = InferenceModeTop(self.trunk, self.model)
            train_data = self._sampler(self._views("trunk", "train"), "train")
            val_data = self._sampler(self._views("trunk", "val"), "val")
        else:
            trainer = trainer_for(self.model, self.backbone)
            train_data = self.images("train", training=True)
            val_data = self.images("val", training=False)
        if self.config.fine_tune_lr == AUTO:
            self._choose_fine_tune_lr(trainer, train_data, val_data)
        if self.config.fine_tune_lr is None:
            log.info("fine-tuning skipped: no learning rate beat stage 1 on validation")
            return
        self._compile(trainer, self.config.fine_tune_lr)
        scores, rate = self.config.fine_tune_lr_scores, self.config.fine_tune_lr
        epochs = _epochs_of(scores, str(rate), self.config.fine_tune_epochs)
        self._fit(trainer, "fine_tune", train_data, val_data, epochs)

    def _choose_fine_tune_lr(self, trainer, train_data, val_data) -> None:
        """``--fine-tune-lr auto``: stage 2 once per candidate rate, from the same start, by
        stage 2's own procedure; the most accurate on validation among those that beat stage 1
        wins (None: none did, and stage 2 is skipped). Only on a cached trunk, where a
        fine-tuning epoch is cheap; otherwise the Keras guide's 1e-5."""
        if self.trunk is None:
            self._record_choice(fine_tune_lr=GUIDE_FINE_TUNE_LR)
            return
        variables = self.model.variables
        reset = _snapshot([variables[i] for i in trained_indices(self.model, trainer)])
        scores = {}
        for rate in FINE_TUNE_LR_CANDIDATES:
            reset()
            scores[str(rate)] = self._trial(
                trainer,
                train_data,
                val_data,
                self.config.fine_tune_epochs,
                rate,
                floor=self.checkpoint.accuracy_floor,
            )
        reset()
        chosen = _best_of(scores)
        self._record_choice(
            fine_tune_lr=None if chosen is None else float(chosen), fine_tune_lr_scores=scores
        )
        log.info(
            "fine-tuning rate chosen on validation: %s (%s)",
            chosen,
            _scores_text(scores),
        )

    def _trial(self, trainer, train_data, val_data, epochs, learning_rate, floor=None) -> dict:
        """Train one candidate by the stage's own procedure, writing nothing, and score it on
        validation (accuracy None: no epoch beat ``floor``)."""
        self._compile(trainer, learning_rate)
        best = BestModelCheckpoint(self.model, path=None)
        best.accuracy_floor = floor
        trainer.fit(
            self._feed(train_data, training=True),
            validation_data=self._feed(val_data, training=False),
            epochs=epochs,
            callbacks=[*self._training_callbacks(train_data), best],
            verbose=0,
            shuffle=False,
            class_weight=self.class_weight,
        )
        epochs = best.saved["epoch"] + 1 if best.best_accuracy is not None else None
        return {
            "val_accuracy": best.best_accuracy,
            "val_loss": best.saved["val_loss"],
            "epochs": epochs,
        }

    def _record_choice(self, **choices) -> None:
        """A choice made during the run goes to config.json (a resumed run keeps it)."""
        self.config = dataclasses.replace(self.config, **choices)
        self.config.save(self.run_dir / runs.CONFIG_FILE)


def _snapshot(variables) -> Callable[[], None]:
    """A function that puts ``variables`` back to their values now (every candidate of a
    choice starts from the same weights and random-seed states)."""
    values = [np.array(v.numpy()) for v in variables]

    def reset() -> None:
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)

    return reset


def _epochs_of(scores: dict[str, dict], chosen: str, epochs: int) -> int:
    """How long a stage runs: a stage that repeats its chosen candidate's trial (same start,
    data and procedure, so the same weights epoch by epoch) stops at that trial's best epoch,
    where it would save; the epochs after it are only early stopping's wait."""
    return (scores.get(chosen) or {}).get("epochs") or epochs


def _climb(candidates, score: Callable[[str], dict]) -> dict[str, dict]:
    """The scores of ``candidates`` in order, up to and including the first one that does
    worse than the best before it (the candidates grow stronger: the rest would do worse)."""
    scores = {}
    for candidate in candidates:
        scores[candidate] = score(candidate)
        if _best_of(scores) != candidate:
            break
    return scores


def _scores_text(scores: dict[str, dict]) -> str:
    """Each candidate's validation accuracy (None: no epoch beat stage 1, see `_trial`)."""

    def text(accuracy: float | None) -> str:
        return "not better than stage 1" if accuracy is None else f"{accuracy:.4f}"

    return ", ".join(f"{name}: {text(score['val_accuracy'])}" for name, score in scores.items())


def _best_of(scores: dict[str, dict]) -> str | None:
    """The candidate with the best validation accuracy, then loss; None if none has a score."""
    scored = [name for name, score in scores.items() if score["val_accuracy"] is not None]
    return max(
        scored,
        key=lambda name: (scores[name]["val_accuracy"], -scores[name]["val_loss"]),
        default=None,
    )

"""The recipe (the Keras guide's): stage 1 trains a new head on the frozen backbone, stage 2
fine-tunes its top; by default both are then trained again on the training and validation
images (`headstart.training.refit`); then the test metrics, the files of the run folder and
its report.

`train` starts a run, `resume` continues one; both hand the stages to
`headstart.training.session.Session`. Stage 1 runs as workflow 2 (``extract``: the backbone
runs once, the head trains on cached features) or workflow 1 (``frozen``: the frozen backbone
runs every epoch behind augmentation). Both end in the same full model, saved as one ``.keras``
file in the run directory.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from headstart import files, runs
from headstart.augment import AUTO, SEEDS_POLICY, parse_augment
from headstart.backbones import (
    FUSION_SEPARATOR,
    check_image_size,
    get_backbone,
)
from headstart.backbones import resolve_weights as resolve_backbone_weights
from headstart.calibrate import calibrate_model
from headstart.check import CHECK_FILE, FactsReader, check_folder, summary_line
from headstart.config import Config
from headstart.data import write_skipped
from headstart.distributed.cluster import (
    Cluster,
    barrier,
    current,
    finish,
    join,
    place,
    weights_digest,
)
from headstart.errors import UsageError
from headstart.evaluation import (
    PREDICTIONS_FILE,
    metrics_for_split,
    predict_split,
    probabilities_of,
    thresholds_record,
    write_predictions,
)
from headstart.extract import run_in_batches, split_at_cut
from headstart.imbalance import resolve_class_weight
from headstart.model import (
    base_of,
    build_seeded,
    classifier_of,
    temperature_of,
    unfreeze_counts,
)
from headstart.report import REPORT_FILE, redraw
from headstart.splits import folder_for, split_manifest
from headstart.tracking import Tracker, resolve_mlflow_uri, trackers_for
from headstart.training.cache import use_compilation_cache
from headstart.training.phases import PhaseClock, breakdown_line, cores_line
from headstart.training.refit import (
    REFIT_STAGES,
    calibrate_refit,
    chosen_model,
    end_refit,
    refit,
    refit_kept,
    refit_record,
    start_refit,
)
from headstart.training.session import Session
from headstart.training.state import (
    TrainingState,
    callback_state,
    read_state,
    remove_state,
    write_state,
)

log = logging.getLogger(__name__)

# config.validation_probabilities: the choosing phase's validation outputs (a budget's members)
VALIDATION_PROBABILITIES_FILE = "validation_probabilities.npz"

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
    tracker: Tracker | None = None,
    started: float | None = None,
) -> TrainResult:
    """Train, evaluate and save a classifier; everything lands in the run directory.

    ``callbacks``: extra Keras callbacks, given to every stage's ``fit`` (not to the candidate
    trials that choose the augmentation and the fine-tuning rate); subclass
    `headstart.training.callbacks.RunCallback` to also see the whole classifier and the run folder.
    ``tracker``: a `headstart.tracking.Tracker`, told the run's config, every epoch of both
    stages, every candidate's score in the choices made on validation, and at the end the
    metrics and the run's files (``config.mlflow`` adds `headstart.tracking.MlflowTracker`).
    ``head_builder(features, n_classes) -> logits``: a custom head in place of the built-in
    one, on the pooled features (so it trains on the feature cache); config.json records its
    name in ``custom_head``. Neither is a Config field: callables are not JSON.
    ``started``: when the work began, as a `time.time()` value (the command line passes its
    process's start): metrics.json's ``phase_seconds`` then has a "start-up" phase up to this
    call (`headstart.training.phases`); None: the run's time counts from this call.
    """
    clock = PhaseClock(started)
    config.validate()
    if config.time_limit or config.quality != "fast":
        raise UsageError(
            "--time-limit/--quality: train(config) trains one model; the time budget is "
            "headstart.train_with_budget(config) (the command line's `headstart train`)"
        )
    if head_builder is not None:
        config = dataclasses.replace(config, custom_head=_name_of(head_builder))
    elif config.custom_head:  # a custom-head run's config.json given back: its head is code
        raise UsageError(
            f"custom_head {config.custom_head}: that run's head is Python code: train it from "
            f"Python, headstart.train(config, head_builder={config.custom_head}), or set "
            f"custom_head to null for the built-in head"
        )
    cluster = join(config)
    _keep_compiled_programs(config)
    with clock.phase("build model"):
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
    # the data check's facts of each image, learnt as the decode check reads it (one read)
    reader = FactsReader() if config.check else None
    with clock.phase("decode check"):  # finding the images and decoding each once
        folder = folder_for(config, reader)
    if folder.multi_label:
        _check_multi_label(config)
    run_dir = runs.new_run_dir(config.out) if cluster.writes else Path(tempfile.mkdtemp())
    config = dataclasses.replace(
        config,
        backbone=backbone.name,  # canonical: a hub: preset folder as an absolute path
        data=str(Path(config.data).resolve()),
        root=None if config.root is None else str(Path(config.root).resolve()),
        out=str(run_dir),
        image_size=image_size,
        weights=weights,
        mode=mode,
        augment=augment,
        augment_scores={},
        feature_norm=feature_norm or config.feature_norm,
        feature_norm_scores={},
        fine_tune_lr_scores={},  # a rate given (not auto) has none; auto records them anew
        choice_noise={},
        views=config.views if augments and mode == "extract" else 0,
        class_weight="none"
        if folder.multi_label
        else resolve_class_weight(
            config.class_weight, folder.train.counts(len(folder.class_names))
        ),
        multi_label=folder.multi_label,
        mlflow=resolve_mlflow_uri(config.mlflow) if config.mlflow else None,
        choice_folds=_choice_folds(config),
    )
    config = place(config, cluster)
    with clock.phase("build model"):
        model, seeded = build_seeded(config, backbone, len(folder.class_names), head_builder)
    unfreeze = "0"
    if backbone.pretrained:
        unfreeze = unfreeze_counts(config.unfreeze, backbone, seeded.base)
    config = dataclasses.replace(config, unfreeze=unfreeze)
    config.save(run_dir / runs.CONFIG_FILE)
    files.write_json(run_dir / runs.LABELS_FILE, list(folder.class_names))
    if folder.multi_label:  # 0.5 each until validation chooses them (a run stopped early)
        files.write_json(run_dir / runs.THRESHOLDS_FILE, thresholds_record(folder.class_names))
    files.write_json(run_dir / runs.SPLIT_FILE, split_manifest(folder))
    write_skipped(folder.skipped, str(run_dir / runs.SKIPPED_FILE))
    if reader is not None:
        with clock.phase("data check"):  # counts, imbalance, duplicates and leakage across splits
            report = check_folder(folder, facts=reader.facts)
        reader = None  # every image's facts: not kept for the rest of the run
        log.info(summary_line(report))
        files.write_json(run_dir / CHECK_FILE, report)
    tracker = trackers_for(config, tracker) if cluster.writes else Tracker()
    return _tracked(
        tracker,
        config,
        run_dir,
        lambda: _stages_and_test(
            config,
            backbone,
            folder,
            model,
            seeded,
            run_dir,
            None,
            callbacks,
            clock,
            tracker,
            head_builder,
        ),
    )


def resume(
    run: str | Path,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    head_builder: HeadBuilder | None = None,
    tracker: Tracker | None = None,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    started: float | None = None,
) -> TrainResult:
    """Continue an interrupted run from its last saved epoch (see `headstart.training.state`); a run
    with a custom head needs its ``head_builder`` again.

    A ``--distributed`` run continues distributed: every process calls this, with the new
    launch's cluster (``coordinator``, ``num_processes``, ``process_id``; all None: JAX
    detects it). The number of processes may differ from the first launch's, as long as it
    divides the global batch; each process reads the state process 0 saved in the run folder
    (which must be shared, or copied to the same path on every machine). ``started``: as
    for `train`; metrics.json's ``phase_seconds`` are this launch's. ``tracker``: as for `train`
    (an MLflow run, named in the run folder's mlflow.json, goes on)."""
    clock = PhaseClock(started)
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
        cluster = join(config)
        config = place(config, cluster)
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
    with clock.phase("decode check"):
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
    _keep_compiled_programs(config)
    with clock.phase("build model"):
        model, seeded = build_seeded(config, backbone, len(folder.class_names), head_builder)
    log.info("resuming %s at stage %s, epoch %d", run_dir, state.stage, state.next_epoch + 1)
    if not cluster.writes:  # the state is read: train on in a scratch copy of the run folder
        run_dir = _scratch_copy(run_dir)
        config = dataclasses.replace(config, out=str(run_dir))
    if config.distributed:  # process 0 writes the run folder only once every copy is made
        barrier("headstart resume")
    tracker = trackers_for(config, tracker) if cluster.writes else Tracker()
    return _tracked(
        tracker,
        config,
        run_dir,
        lambda: _stages_and_test(
            config,
            backbone,
            folder,
            model,
            seeded,
            run_dir,
            state,
            callbacks,
            clock,
            tracker,
            head_builder,
        ),
    )


def _keep_compiled_programs(config: Config) -> None:
    """A run with a feature cache keeps its compiled programs there too (JAX only:
    `use_compilation_cache`), so a resumed run finds them."""
    if config.cache:
        use_compilation_cache(config.cache_dir, keras.backend.backend())


def _choice_folds(config: Config) -> int:
    """``--choice-folds`` as the run uses it: a ``--distributed`` run makes its choices on the
    validation split (the folds' fits are one process's: not yet made to run under a
    distribution), which config.json then says (1)."""
    if config.distributed and config.choice_folds > 1:
        log.info("--distributed: the choices are made on the validation split (--choice-folds 1)")
        return 1
    return config.choice_folds


def _check_multi_label(config: Config) -> None:
    """What a multi-label run cannot do: one line naming the option to drop."""
    refused = [
        (config.calibrate, "--calibrate (temperature scaling is for class probabilities)"),
        (config.distributed, "--distributed"),
        (config.class_weight == "balanced", "--class-weight balanced"),
    ]
    for given, option in refused:
        if given:
            raise UsageError(
                f"{config.data} is multi-label (labels separated by ';'): {option} is for "
                f"single-label data: drop it"
            )


def _scratch_copy(run_dir: Path) -> Path:
    """A copy of the run folder for a process other than 0, which writes only there (deleted
    when it ends)."""
    scratch = Path(tempfile.mkdtemp())
    shutil.copytree(run_dir, scratch, dirs_exist_ok=True)
    return scratch


def _name_of(head_builder: HeadBuilder) -> str:
    module = getattr(head_builder, "__module__", None) or "?"
    return f"{module}.{getattr(head_builder, '__qualname__', repr(head_builder))}"


# the run folder's files a tracker gets at the end (those there: an ensemble has no history)
TRACKED_FILES = (
    REPORT_FILE,
    runs.MODEL_FILE,
    runs.METRICS_FILE,
    runs.CONFIG_FILE,
    runs.LABELS_FILE,
    runs.THRESHOLDS_FILE,  # a multi-label run's
    runs.HISTORY_FILE,
)


def _tracked(tracker, config, run_dir: Path, stages) -> TrainResult:
    """``stages()`` (the run's `_stages_and_test`), told to ``tracker``: its start, then its
    end or its failure."""
    tracker.start(config)
    try:
        result = stages()
    except BaseException as error:
        tracker.fail(error)
        raise
    if result.metrics:  # a distributed run's other processes have none (and a silent tracker)
        paths = [run_dir / name for name in TRACKED_FILES if (run_dir / name).is_file()]
        tracker.end(result.config, result.metrics, paths)
    return result


def _stages_and_test(
    config,
    backbone,
    folder,
    model,
    seeded,
    run_dir: Path,
    state,
    callbacks,
    clock,
    tracker,
    head_builder=None,
) -> TrainResult:
    """Both stages from ``state`` (None: from the start), the refit, then the test metrics and
    report; metrics.json ends with where the time went (``clock``'s phases)."""
    session = Session(
        config, backbone, folder, model, seeded, run_dir, state, clock=clock, tracker=tracker
    )
    session.user_callbacks = list(callbacks)
    session.head_builder = head_builder
    if state is None:  # resumable from here on: a kill during extraction restarts stage 1
        write_state(
            run_dir,
            TrainingState("head", callbacks=callback_state(session.checkpoint, session.history)),
        )
    unfreeze = [int(count) for count in str(config.unfreeze).split(FUSION_SEPARATOR)]
    fine_tune = bool(backbone.pretrained and config.fine_tune and config.fine_tune_epochs)
    fine_tune = fine_tune and any(unfreeze)
    refits = _refits(config, folder)
    _stages(session, state, fine_tune, unfreeze, refits)
    refitted = refits and refit_kept(session.plan)  # model.keras is the refit model
    train_seconds = session.elapsed()
    if config.distributed:  # evaluation and the report are process 0's, on one device
        cluster = current(True)
        log.info("process %d: final weights %s", cluster.process_id, weights_digest(model))
        finish()
        if not cluster.writes:
            shutil.rmtree(run_dir, ignore_errors=True)
            log.info(breakdown_line(*clock.breakdown()))
            return TrainResult(run_dir, {}, session.config)
    with clock.phase("test"):  # the first time the test split is read since the checks
        metrics, saved = _test_metrics(config, folder, run_dir, session, fine_tune, refitted)
    metrics["train_seconds"] = round(train_seconds, 1)  # training and refit, test excluded
    metrics["skipped"] = len(folder.skipped)
    metrics.update(_what_was_chosen(session, fine_tune, refits))
    files.write_json(run_dir / runs.METRICS_FILE, metrics)
    if fine_tune and not metrics["fine_tune_kept"]:
        log.info(
            "fine-tuning did not beat stage 1's validation accuracy (%.4f): model.keras is the "
            "stage-1 model%s",
            session.checkpoint.accuracy_floor,
            " (refit: stage 1 only)" if refitted else "",
        )
    if session.summaries:  # a resumed run keeps the summaries written when it started
        files.write_text_atomic(run_dir / runs.SUMMARY_FILE, "\n".join(session.summaries))
    if config.report:
        with clock.phase("report"):
            redraw(run_dir, folder=folder, model=saved)  # figures + report.html
    remove_state(run_dir)
    end_refit(run_dir)
    metrics["total_seconds"], metrics["phase_seconds"] = clock.breakdown()
    metrics["total_cpu_seconds"], metrics["phase_cpu_seconds"] = clock.cpu_breakdown()
    if session.feature_views.passes:  # each backbone pass: how long, how many images computed
        metrics["extraction_passes"] = session.feature_views.passes
    files.write_json(run_dir / runs.METRICS_FILE, metrics)  # again, with the report's time
    log.info(breakdown_line(metrics["total_seconds"], metrics["phase_seconds"]))
    log.info(cores_line(metrics["phase_seconds"], metrics["phase_cpu_seconds"]))
    return TrainResult(run_dir, metrics, session.config)


def _refits(config: Config, folder) -> bool:
    """Whether the run ends with the refit (`headstart.training.refit`): ``--refit`` (the
    default), and validation images to add."""
    if config.refit and not len(folder.val):
        log.info("no refit: there are no validation images to add to the training images")
    return config.refit and bool(len(folder.val))


def _stages(session: Session, state, fine_tune: bool, unfreeze: list[int], refits: bool) -> None:
    """Stage 1 then (``fine_tune``) stage 2, then (``refits``) the refit, each skipped when
    ``state`` says it is done."""
    if fine_tune:
        session.plan_fine_tuning(unfreeze)
    stage, clock = state.stage if state else "head", session.clock
    if stage == "head":
        with clock.phase("stage 1"):
            session.train_head()
            if fine_tune:
                session.end_stage("fine_tune")
            else:
                _end_choosing(session, fine_tune, refits)
    elif stage == "fine_tune":
        session.freeze_for_head()
        state.apply(session.model)  # the head as stage 1 left it
    if fine_tune and stage in ("head", "fine_tune"):
        with clock.phase("stage 2"):
            session.fine_tune(unfreeze)
            _end_choosing(session, fine_tune, refits)
    if refits and stage != "done":
        with clock.phase("refit"):
            refit(session, stage if stage in REFIT_STAGES else "refit_head", unfreeze)


def _end_choosing(session: Session, fine_tune: bool, refits: bool) -> None:
    """The choosing phase is over: the refit starts (its plan saved with the state), or the
    run is done."""
    if refits:
        start_refit(session, fine_tune)
    else:
        session.end_stage("done")


def _test_metrics(
    config: Config, folder, run_dir: Path, session=None, fine_tune=True, refits=False
) -> tuple[dict, keras.Model]:
    """The saved model (the refit's, or the best on validation; calibrated with --calibrate)
    scored on the test split, its predictions written to predictions.csv (see
    `_test_probabilities`); and that model, as model.keras holds it (the report draws from
    it)."""
    model = keras.saving.load_model(run_dir / runs.MODEL_FILE)
    calibration = None
    if config.calibrate:  # T fitted on validation, saved inside model.keras (headstart.calibrate)
        if refits:  # on the choosing phase's model (`headstart.training.refit`)
            model, calibration = calibrate_refit(model, run_dir, folder.val, config.batch_size)
        else:
            model, calibration = calibrate_model(model, folder.val, config.batch_size)
        files.save_model_atomic(model, run_dir / runs.MODEL_FILE)
    thresholds = None
    held_out = None  # the validation images' probabilities, from the chosen model only
    if folder.multi_label or (config.validation_probabilities and len(folder.val)):
        on = chosen_model(run_dir) if refits else model
        held_out = _test_probabilities(on, folder.val, config, session, fine_tune, "val")
    if folder.multi_label:  # each label's threshold: its best F1 on validation
        record = thresholds_record(folder.class_names, folder.val.targets(), held_out)
        files.write_json(run_dir / runs.THRESHOLDS_FILE, record)
        thresholds = [record["thresholds"][name] for name in folder.class_names]
    if config.validation_probabilities and len(folder.val):  # a budget's member
        write_validation_probabilities(run_dir, held_out, folder.val.labels)
    if len(folder.test):
        probabilities = _test_probabilities(model, folder.test, config, session, fine_tune)
        metrics = metrics_for_split(
            model,
            folder.test,
            folder.class_names,
            probabilities=probabilities,
            thresholds=thresholds,
        )
        write_predictions(
            run_dir / PREDICTIONS_FILE, folder.test, folder.class_names, probabilities, thresholds
        )
    else:
        metrics = metrics_for_split(model, folder.test, folder.class_names)  # {"n_test": 0, ...}
    if calibration:
        metrics["calibration"] = calibration
    return metrics, model


def write_validation_probabilities(run_dir: Path, probabilities, labels) -> None:
    """``config.validation_probabilities``: the choosing phase's model's class probabilities
    for the validation images, in split.json's order, with their labels (the time budget fits
    its ensemble's weights on them: out of sample even when the run was refit)."""
    buffer = io.BytesIO()
    np.savez(buffer, probabilities=np.asarray(probabilities), labels=np.asarray(labels))
    files.write_bytes_atomic(run_dir / VALIDATION_PROBABILITIES_FILE, buffer.getvalue())


def read_validation_probabilities(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) that `write_validation_probabilities` wrote."""
    with np.load(Path(run_dir) / VALIDATION_PROBABILITIES_FILE) as values:
        return values["probabilities"], values["labels"]


def _test_probabilities(model, split, config: Config, session, fine_tune: bool, name="test"):
    """The saved model's probabilities for the test images (``name``: or another split's).

    Its frozen part is the one extraction ran: the trunk (when fine-tuning ran on the cached
    trunk), or the whole backbone (when nothing was fine-tuned); its weights never changed. So
    the test images go through it like every other split, on the run's runtime and through the
    feature cache (a second run on the same images does not run it), and the rest of the saved
    model (top block, head, temperature) runs in Keras on those rows, float16 as validation
    saw them. Otherwise (fine-tuned without a cached trunk, a distributed run, workflow 1) the
    whole model runs on the images in Keras."""
    views = session.feature_views if session is not None else None
    plain = views is None or config.distributed or config.mode != "extract"
    if not plain and views.trunk is not None:
        base = base_of(model, session.backbone)
        names = [layer.name for layer in base.layers]
        cut = split_at_cut(model, base, len(names) - names.index(views.trunk.cut_layer))
        rest, kind = (cut.top, "trunk") if cut is not None else (None, "")
    elif not plain and not fine_tune:
        rest, kind = classifier_of(model), "pooled"
    else:
        rest, kind = None, ""
    if rest is None:
        return predict_split(model, split, config.batch_size)
    logits = run_in_batches(rest, views.rows(kind, name))  # 256 rows a call: 30% faster
    return probabilities_of(logits / temperature_of(model), split.multi_label)


def _what_was_chosen(session: Session, fine_tune: bool, refits: bool = False) -> dict:
    """metrics.json's record of the run's choices: the saved epoch (with the refit: the
    choosing phase's chosen one, and the refit's epochs), head input, class weights,
    augmentation and fine-tuning rate, with every candidate's validation scores."""
    config, checkpoint = session.config, session.checkpoint
    chosen = {**checkpoint.saved, "epoch": checkpoint.saved["epoch"] + 1}
    refitted = refits and refit_kept(session.plan)
    record: dict = {"refit": refitted}
    if refitted:  # the validation figures are the choosing phase's: the refit has none
        record["validation_choosing_phase"] = chosen
        record.update(refit_record(session.plan, session.folder.class_names))
    else:
        record["saved_from"] = chosen
        if refits:  # refit, and found wanting (`headstart.training.refit.refit`)
            record["refit_rejected"] = refit_record(session.plan, session.folder.class_names)
    if fine_tune:
        record["fine_tune_kept"] = checkpoint.saved["stage"] == "fine_tune"
    runtimes = session.feature_views.runtimes()
    if runtimes:  # what ran the frozen parts this time (cached rows say nothing of it)
        record["extraction_runtime"] = runtimes
    record["feature_norm"] = config.feature_norm
    if config.feature_norm_scores:
        record["feature_norm_scores"] = config.feature_norm_scores
    record["class_weight"] = config.class_weight
    if session.class_weight:
        names = session.folder.class_names
        record["class_weights"] = {names[i]: round(w, 6) for i, w in session.class_weight.items()}
    record["augment"] = config.augment
    if config.augment_scores:  # --augment auto: what each candidate scored
        record["augment_scores"] = config.augment_scores
    if fine_tune:
        record["fine_tune_lr"] = config.fine_tune_lr
        if config.fine_tune_lr_scores:
            record["fine_tune_lr_scores"] = config.fine_tune_lr_scores
    if config.choice_noise:  # per choice: how it was scored, the best, within noise or not
        record["choice_noise"] = config.choice_noise
    return record

"""The refit: once every choice is made on validation, the final model trains on the training
and validation images together, with the chosen settings and the chosen number of epochs.

On small data the validation split is a large share of the labelled images (20% by default)
that the chosen model never learnt from. The *choosing phase* is the run as ``--no-refit``
makes it: both stages on the training split, every choice (head input, augmentation,
fine-tuning rate, whether fine-tuning is kept) and every stage's length decided on
validation. Its end is the refit's plan (`plan_refit`): each stage's epochs up to the one the
checkpoint saved last (where validation said to stop), with the learning rate each of them had
(ReduceLROnPlateau's cuts included), and stage 2 only if fine-tuning was kept. The refit
(`refit`) then puts the model's variables back to those of a model built afresh from the seed
(the choosing phase's own start; `Session.restart`, which keeps the compiled training steps) and
trains stage 1 and stage 2 by that plan on `headstart.training.views.TRAIN_VAL`: the cached
rows of both splits joined, plus the validation images' augmented views where the chosen
augmentation uses them (the only new extraction). AutoGluon does the same for small data
(``refit_full``).

Epochs are kept, not steps (as AutoGluon's ``refit_full`` keeps its epoch count): an epoch of
the refit sees every image once, as in the choosing phase, so each epoch takes
(train + val) / train more steps at the same rates. Nothing is validated (validation is in the
training data): model.keras is the refit's last epoch, saved when it ends; the validation
figures of the run are the choosing phase's, in metrics.json's ``validation_choosing_phase``.
The test split is read only after that, by the test pass.

One check stands in for the checkpoint the refit cannot have: the refit model, in inference
mode, must classify the images it trained on better than always answering their most
frequent class. A from-scratch network with BatchNormalization can end its last epoch with
statistics that break inference (seen on 36 tiny images: every answer the same class); the
choosing phase's checkpoint never saves such an epoch, the refit would. If the check fails,
model.keras stays the chosen model and the run says so (metrics.json: ``refit`` false,
``refit_rejected``).

``--calibrate`` needs held-out outputs, which the refit model no longer has: T is fitted on
the validation outputs of the choosing phase's chosen model (kept as `CHOSEN_MODEL_FILE`
until the run ends) and put on the refit model (`calibrate_refit`), which trained by the same
recipe for as many epochs on (train + val) / train as many images; a T fitted on its own
training images would find it well calibrated whatever it is. A multi-label run's per-label
thresholds (best F1 on validation) are fitted on the chosen model's validation outputs the
same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np

from headstart import files, runs
from headstart.calibrate import calibrate_model, with_temperature
from headstart.extract import ViewSampler
from headstart.imbalance import class_weights
from headstart.training.choose import cross_validated_epochs
from headstart.training.session import Session
from headstart.training.views import TRAIN_VAL, split_of

log = logging.getLogger(__name__)

REFIT_STAGES = ("refit_head", "refit_fine_tune")
# --calibrate with the refit: the choosing phase's chosen model, until the test pass is done
CHOSEN_MODEL_FILE = "chosen_model.keras"


def plan_refit(session: Session, fine_tune: bool) -> dict:
    """What the refit trains, from the choosing phase's checkpoint and history: per stage
    ("head", "fine_tune") its ``epochs`` (0: not trained again) and each epoch's ``rates``,
    and how many ``images`` it trains on."""
    checkpoint, rows, config = session.checkpoint, session.history.rows, session.config
    kept = fine_tune and checkpoint.saved["stage"] == "fine_tune"
    plan: dict = {"images": len(split_of(session.folder, TRAIN_VAL))}
    for stage, rate in (("head", config.lr), ("fine_tune", config.fine_tune_lr)):
        stage_rows = [row for row in rows if row["stage"] == stage]
        if stage == "fine_tune" and not kept:
            epochs = 0
        elif stage in checkpoint.stage_epochs:
            epochs = checkpoint.stage_epochs[stage] + 1
        elif checkpoint.saved["stage"] == stage:  # a state saved before stage_epochs existed
            epochs = checkpoint.saved["epoch"] + 1
        else:  # no epoch of the stage was saved: all of them
            epochs = len(stage_rows)
        folds_epochs = cross_validated_epochs(config) if stage == "head" else None
        if folds_epochs:  # the folds' median best epoch (rates past the history's: its last)
            epochs = folds_epochs
        rates = [float(row.get("learning_rate", rate)) for row in stage_rows[:epochs]]
        plan[stage] = {"epochs": epochs, "rates": rates}
        if folds_epochs:
            plan[stage]["epochs_from"] = "cross-validation"
    return plan


def start_refit(session: Session, fine_tune: bool) -> None:
    """End the choosing phase: the plan made and saved with the state (a run killed from here
    on resumes into the refit), the chosen model kept for ``--calibrate``."""
    session.plan = plan_refit(session, fine_tune)
    config = session.config
    # fitted on it at the end (--calibrate, thresholds), or scored (validation_probabilities)
    if config.calibrate or session.folder.multi_label or config.validation_probabilities:
        model_file = session.run_dir / runs.MODEL_FILE
        files.write_bytes_atomic(session.run_dir / CHOSEN_MODEL_FILE, model_file.read_bytes())
    session.checkpoint.best_values = {}  # the choosing phase's: model.keras holds them
    session.end_stage("refit_head")


def refit(session: Session, stage: str, unfreeze: list[int]) -> None:
    """Both stages again on the training and validation images by the session's plan, from
    ``stage`` ("refit_head", or "refit_fine_tune" when resumed after the refit's stage 1);
    model.keras is then the refit model, if it beats `chance` on its own images."""
    state = session.state
    if state is None or state.stage not in REFIT_STAGES:  # the choosing phase trained it
        session.restart()
    train_val = split_of(session.folder, TRAIN_VAL)
    chosen_weights = session.class_weight  # the training split's, which metrics.json records
    weighting = session.config.class_weight
    session.class_weight = class_weights(weighting, train_val.counts(session.n_classes))
    try:
        _refit(session, stage, unfreeze, train_val)
    finally:
        session.class_weight = chosen_weights


def _refit(session: Session, stage: str, unfreeze: list[int], train_val) -> None:
    """`refit`'s stages, its check, and model.keras."""
    plan, config, state = session.plan, session.config, session.state
    head, fine_tune = plan["head"], plan["fine_tune"]
    log.info(
        "refit on %d training + validation images: stage 1 for %d epochs%s (chosen on validation)",
        plan["images"],
        head["epochs"],
        f", stage 2 for {fine_tune['epochs']} at {config.fine_tune_lr:g}"
        if fine_tune["epochs"]
        else "",
    )
    session.freeze_for_head(record=False)
    if stage == "refit_head":
        trainer = session.head_trainer()
        data = session.head_data(TRAIN_VAL)
        session.compile(trainer, config.lr, session.steps_per_call(data))
        session.fit(trainer, "refit_head", data, None, head["epochs"], rates=head["rates"])
        if fine_tune["epochs"]:
            session.end_stage("refit_fine_tune")
    else:
        state.apply(session.model)  # the head as the refit's stage 1 left it
    if fine_tune["epochs"]:
        trainer = session.unfreeze_for_fine_tuning(unfreeze, record=False)
        data = session.fine_tune_data(TRAIN_VAL)
        session.compile(trainer, config.fine_tune_lr, session.steps_per_call(data))
        rates = fine_tune["rates"]
        session.fit(trainer, "refit_fine_tune", data, None, fine_tune["epochs"], rates=rates)
    clean = _clean_images(session, fine_tuned=bool(fine_tune["epochs"]))
    accuracy = float(session.evaluate(trainer, clean)["accuracy"])
    session.plan["kept"] = accuracy > chance(train_val)
    session.plan["accuracy_on_its_images"] = round(accuracy, 6)
    if session.class_weight:  # --class-weight: by the counts of both splits
        session.plan["class_weights"] = {str(i): w for i, w in session.class_weight.items()}
    if session.plan["kept"]:
        files.save_model_atomic(session.model, session.run_dir / runs.MODEL_FILE)  # then "done"
    else:
        log.warning(
            "the refit model answers %.4f of its own training images right, no better than "
            "always answering their most frequent class: model.keras stays the model chosen "
            "on validation",
            accuracy,
        )
    session.end_stage("done")


def _clean_images(session: Session, *, fine_tuned: bool):
    """The training and validation images as the refit's last stage sees them (cached rows,
    or the images), each once, unaugmented, in order."""
    views = session.feature_views
    cached = session.config.mode == "extract" and (views.trunk is not None or not fine_tuned)
    if not cached:
        return session.images(TRAIN_VAL, training=False)
    rows = views.rows("trunk" if fine_tuned else "pooled", TRAIN_VAL)
    targets = split_of(session.folder, TRAIN_VAL).targets()
    return ViewSampler([rows], targets, session.config.batch_size, shuffle=False)


def chance(split) -> float:
    """The accuracy of always answering the most frequent class (multi-label: each label's
    more frequent answer, yes or no, as "accuracy" counts each label's decision)."""
    targets = split.targets()
    if split.multi_label:
        share = targets.mean(axis=0)
        return float(np.mean(np.maximum(share, 1 - share)))
    return float(np.bincount(targets).max() / len(targets))


def chosen_model(run_dir: Path) -> keras.Model:
    """The choosing phase's chosen model, kept for what is fitted on its validation outputs."""
    return keras.saving.load_model(Path(run_dir) / CHOSEN_MODEL_FILE)


def calibrate_refit(model: keras.Model, run_dir: Path, val, batch_size: int):
    """``--calibrate`` with the refit: T fitted on the choosing phase's chosen model's
    validation outputs, put on ``model`` (the refit model). Returns it and the record."""
    _, record = calibrate_model(chosen_model(run_dir), val, batch_size)
    record["method"] = (
        "temperature scaling, T fitted on validation to minimise NLL, on the choosing phase's "
        "model (the refit model trained on the validation images)"
    )
    return with_temperature(model, record["temperature"]), record


def refit_kept(plan: dict) -> bool:
    """Whether model.keras is the refit model (it passed `refit`'s check)."""
    return bool(plan.get("kept"))


def refit_record(plan: dict, class_names) -> dict:
    """metrics.json's account of the refit: epochs per stage, images trained on, how many of
    them the refit model gets right, and its class weights (of both splits' counts)."""
    record = {
        "refit_epochs": {stage: plan[stage]["epochs"] for stage in ("head", "fine_tune")},
        "refit_images": plan["images"],
        "refit_accuracy_on_its_images": plan["accuracy_on_its_images"],
    }
    if plan.get("class_weights"):
        weights = plan["class_weights"]
        record["refit_class_weights"] = {
            name: round(weights[str(i)], 6) for i, name in enumerate(class_names)
        }
    return record


def end_refit(run_dir: Path) -> None:
    """The run is complete: the chosen model kept for ``--calibrate`` is not needed."""
    (Path(run_dir) / CHOSEN_MODEL_FILE).unlink(missing_ok=True)

"""The choices a run makes before its final fit, each by training candidates with the stage's
own procedure from the same start: the head's input (``--feature-norm auto``), the
augmentation (``--augment auto``) and the fine-tuning rate (``--fine-tune-lr auto``).

Choices that respect the noise (``--choice-folds K``, default 5; `headstart.training.noise`):
the head input and the augmentation are heads on cached features, cheap to train, so each
candidate is scored by K-fold cross-validation over the training and validation images
(`headstart.training.crossval`: the K folds' heads in one fit), and the simplest candidate
(they are listed simplest, cheapest first) is kept unless another's mean beats it by more than
the best one's standard error over the folds: the one-standard-error rule. The chosen
candidate's folds also give the refit its stage-1 epochs (their median best epoch). A
fine-tuning rate's trial is a whole stage 2 on the cached trunk, too dear to repeat K times:
the rates are scored on the validation split as before, and the gentler rate is kept unless
the other wins by more than the *paired* standard error of their per-image differences (no
extra training). ``--choice-folds 0`` or ``1``: every choice is the best on validation alone,
as before; so is any choice in a run with a custom head (`crossval.head_form`).

A candidate's *score* is ``{"val_accuracy", "val_loss", "epochs"}`` (`Session.trial`); a
cross-validated one's ``val_accuracy`` and ``val_loss`` are means over the folds, with
``mean`` and ``se`` (of the measure chosen by), ``fold_scores``, ``fold_losses`` and
``fold_epochs``; every scored candidate says whether it is ``within_one_se`` of the best, and
config.json's ``choice_noise`` says per choice how it was scored, which candidate was best,
which was chosen, and whether the choice was ``within_noise``. A multi-label run chooses by
validation loss (binary cross-entropy over every label) alone: its accuracy, the share of right
yes/no decisions at 0.5, mostly counts the labels an image does not carry.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import keras
import numpy as np

from headstart.augment import AUTO, AUTO_CANDIDATES
from headstart.config import FEATURE_NORMS, FINE_TUNE_LR_CANDIDATES, GUIDE_FINE_TUNE_LR
from headstart.extract import ViewSampler
from headstart.imbalance import class_weights
from headstart.model import build_head, build_on_base, classifier_of
from headstart.training.crossval import (
    FoldRecord,
    cross_validate_heads,
    head_form,
    loss_kind,
    scores_per_row,
)
from headstart.training.noise import fold_assignment, mean_and_se, one_se_choice, paired_se
from headstart.training.state import trained_indices

log = logging.getLogger(__name__)


def choose_feature_norm(session) -> None:
    """``--feature-norm auto``: the model built with each candidate normalisation of the
    head's input, its head trained by stage 1's own procedure on the clean cached features;
    the best on validation is kept, as a resumed run would build it from the seed.

    The first candidate, "none", is the plain cached-features head (the floor of the run) and
    the session's own model, which `build_from_config` made with that input: it is put back as
    it was built and kept when it wins; another winner is its candidate model (the head a
    resumed run's build draws from the seed, around the session's base: `build_on_base`) put
    back as it was built.

    With cross-validation (`choice_folds`), each candidate head is scored over the folds
    instead, and a winner other than "none" is built into the model so.
    """
    folds = choice_folds(session)
    if folds is not None:
        _choose_feature_norm_by_folds(session, folds)
        return
    train_data = session.sampler(session.views("pooled", "train", "none", 0), "train")
    val_data = session.sampler(session.views("pooled", "val"), "val")
    config, scores = session.config, {}
    reset = snapshot(classifier_of(session.model).variables)
    built = {}  # norm -> (model, what puts its head back as built)
    for norm in FEATURE_NORMS:
        model = session.model
        if norm != "none":
            candidate = dataclasses.replace(config, feature_norm=norm)
            model = build_on_base(candidate, session.backbone, session.n_classes, session.seeded)
            built[norm] = (model, snapshot(classifier_of(model).variables))
        classifier = classifier_of(model)
        scores[norm] = session.trial(
            classifier,
            train_data,
            val_data,
            config.epochs,
            config.lr,
            model=model,
            key=("head input", norm),
        )
        session.tracker.trial("feature_norm", norm, scores[norm])
    reset()
    by_loss = session.folder.multi_label
    chosen = best_of(scores, by_loss=by_loss)
    session.record_choice(feature_norm=chosen, feature_norm_scores=scores)
    log.info("head input chosen on validation: %s (%s)", chosen, scores_text(scores, by_loss))
    if chosen != "none":
        model, as_built = built[chosen]
        as_built()
        session.rebuild(model)


def choose_augmentation(session) -> None:
    """``--augment auto``: train the head once per candidate policy, by stage 1's own
    procedure on as many cached views, and keep the policy most accurate on validation.

    The candidates grow stronger, so the first one that does worse than the best so far ends
    the search: stronger ones are not extracted (each costs a backbone pass per view). "none"
    is a candidate, so the choice is never worse on validation than plain cached features.
    Stage 1 then repeats the winner's trial (`Session.fit` replays it: same start, data and
    procedure, so the same weights), and stage 2 likewise the winning rate's.
    """
    config = session.config
    classifier = classifier_of(session.model)
    folds = choice_folds(session)
    if folds is not None:
        _choose_augmentation_by_folds(session, classifier, folds)
        return
    val_data = session.sampler(session.views("pooled", "val"), "val")
    reset = snapshot(classifier.variables)

    def score(policy: str) -> dict:
        if policy == "none" and config.feature_norm_scores:
            # the same head, start and data as the chosen --feature-norm candidate
            record = session.trials.get(("head input", config.feature_norm))
            if record is not None:
                session.trials[("head", policy)] = record
            result = config.feature_norm_scores[config.feature_norm]
        else:
            reset()
            n_views = config.views if policy != "none" else 0
            views = session.views("pooled", "train", policy, n_views)
            result = session.trial(
                classifier,
                session.sampler(views, "train"),
                val_data,
                config.epochs,
                config.lr,
                key=("head", policy),
            )
        session.tracker.trial("augment", policy, result)
        return result

    by_loss = session.folder.multi_label
    scores = climb(AUTO_CANDIDATES, score, by_loss=by_loss)
    reset()
    chosen = best_of(scores, by_loss=by_loss)
    session.feature_views.keep_policy(chosen)
    session.record_choice(
        augment=chosen, augment_scores=scores, views=config.views if chosen != "none" else 0
    )
    untried = AUTO_CANDIDATES[len(scores) :]
    log.info(
        "augmentation chosen on validation: %s (%s)%s",
        chosen,
        scores_text(scores, by_loss),
        f"; stronger ones not tried: {', '.join(untried)}" if untried else "",
    )


def choose_fine_tune_lr(session, trainer, train_data, val_data) -> None:
    """``--fine-tune-lr auto``: stage 2 once per candidate rate, from the same start, by stage
    2's own procedure; the most accurate on validation among those that beat stage 1 wins
    (None: none did, and stage 2 is skipped). Only on a cached trunk, where a fine-tuning
    epoch is cheap; otherwise the Keras guide's 1e-5."""
    if session.feature_views.trunk is None:
        session.record_choice(fine_tune_lr=GUIDE_FINE_TUNE_LR)
        return
    variables = session.model.variables
    reset = snapshot([variables[i] for i in trained_indices(session.model, trainer)])
    scores, per_image = {}, {}
    by_loss = session.folder.multi_label
    noise_aware = session.config.choice_folds >= 2 and isinstance(val_data, ViewSampler)
    for rate in FINE_TUNE_LR_CANDIDATES:
        reset()
        key = ("fine_tune", str(rate))
        scores[str(rate)] = session.trial(
            trainer,
            train_data,
            val_data,
            session.config.fine_tune_epochs,
            rate,
            floor=session.checkpoint.accuracy_floor,
            key=key,
        )
        session.tracker.trial("fine_tune_lr", str(rate), scores[str(rate)])
        record = session.trials.get(key)
        if noise_aware and record is not None:  # its best epoch's answer for each image
            per_image[str(rate)] = _per_image(session, trainer, record, val_data, by_loss)
    reset()
    if noise_aware:
        chosen, noise = decide(
            scores,
            by_loss,
            lambda name, best: paired_se(per_image[name], per_image[best]),
            "the validation split, paired standard error",
        )
        for name, score in scores.items():
            if name in per_image and noise["best"] is not None:
                score["paired_se"] = paired_se(per_image[name], per_image[noise["best"]])
        session.record_choice(
            fine_tune_lr=None if chosen is None else float(chosen),
            fine_tune_lr_scores=scores,
            choice_noise={**session.config.choice_noise, "fine_tune_lr": noise},
        )
        log.info("%s", paired_noise_line(scores, chosen, noise, by_loss))
        return
    chosen = best_of(scores, by_loss=by_loss)
    session.record_choice(
        fine_tune_lr=None if chosen is None else float(chosen), fine_tune_lr_scores=scores
    )
    log.info("fine-tuning rate chosen on validation: %s (%s)", chosen, scores_text(scores, by_loss))


def choice_folds(session) -> np.ndarray | None:
    """Each training + validation image's fold for the cross-validated choices
    (`headstart.training.noise.fold_assignment`, seeded by the run's seed), or None: the
    choices are made on the validation split alone (``--choice-folds`` 0 or 1, no
    validation images, or a custom head, which `cross_validate_heads` cannot copy)."""
    config = session.config
    targets = session.choice_targets()
    folds = min(config.choice_folds, len(targets))
    if folds < 2 or not len(session.folder.val):
        return None
    if head_form(classifier_of(session.model)) is None:
        return None
    return fold_assignment(targets, folds, config.seed)


def _cross_validate(session, heads: dict, policy: str, n_views: int, folds) -> dict:
    """``heads`` cross-validated on the training + validation images' pooled views of
    ``policy`` (the validation images' augmented views are extracted too: the refit trains on
    them, from the same cache); each one's score (`cv_score`)."""
    config, multi_label = session.config, session.folder.multi_label
    views, targets = session.choice_views(policy, n_views), session.choice_targets()
    weights = None
    if not multi_label:
        counts = np.bincount(targets, minlength=session.n_classes)
        weights = class_weights(config.class_weight, counts)
    records = cross_validate_heads(
        heads,
        views,
        targets,
        folds,
        epochs=config.epochs,
        learning_rate=config.lr,
        batch_size=config.batch_size,
        patience=config.patience,
        seed=config.seed,
        multi_label=multi_label,
        class_weight=weights,
        cache=session.fold_models,
    )
    return {name: cv_score(record, multi_label) for name, record in records.items()}


def _choose_feature_norm_by_folds(session, folds) -> None:
    """`choose_feature_norm` by cross-validation: both heads in one fit, on clean views."""
    config, model = session.config, session.model
    classifier = classifier_of(model)
    heads = {"none": classifier}  # as built from the seed
    for norm in FEATURE_NORMS[1:]:
        heads[norm] = build_head(
            int(classifier.input.shape[-1]),
            session.n_classes,
            config.hidden,
            config.dropout,
            feature_norm=norm,
            multi_label=session.folder.multi_label,
        )
    scores = _cross_validate(session, heads, "none", 0, folds)
    for norm, score in scores.items():
        session.tracker.trial("feature_norm", norm, score)
    by_loss = session.folder.multi_label
    chosen, noise = decide(scores, by_loss, lambda _, best: scores[best]["se"], folds_text(folds))
    fixed_policy = config.augment != AUTO and not config.views  # the head is trained as here
    session.record_choice(
        feature_norm=chosen,
        feature_norm_scores=scores,
        choice_noise={**config.choice_noise, "feature_norm": noise},
        head_epochs=scores[chosen]["epochs"] if fixed_policy else config.head_epochs,
    )
    log.info("%s", noise_line("head input", scores, chosen, noise, by_loss))
    if chosen != "none":
        session.rebuild()  # the chosen input's head, as a resumed run's build draws it


def _choose_augmentation_by_folds(session, classifier, folds) -> None:
    """`choose_augmentation` by cross-validation: one fit per candidate policy tried."""
    config = session.config
    by_loss = session.folder.multi_label

    def score(policy: str) -> dict:
        cross_validated = config.feature_norm_scores.get(config.feature_norm, {})
        if policy == "none" and "fold_scores" in cross_validated:
            result = dict(cross_validated)  # the same head, folds, start and data
        else:
            n_views = config.views if policy != "none" else 0
            result = _cross_validate(session, {policy: classifier}, policy, n_views, folds)[policy]
        session.tracker.trial("augment", policy, result)
        return result

    def pick(scores: dict) -> str | None:  # the one-standard-error rule's choice so far
        return decide(scores, by_loss, lambda _, best: scores[best]["se"], "")[0]

    scores = climb(AUTO_CANDIDATES, score, by_loss=by_loss, pick=pick)
    chosen, noise = decide(scores, by_loss, lambda _, best: scores[best]["se"], folds_text(folds))
    session.feature_views.keep_policy(chosen)
    session.record_choice(
        augment=chosen,
        augment_scores=scores,
        views=config.views if chosen != "none" else 0,
        choice_noise={**config.choice_noise, "augment": noise},
        head_epochs=scores[chosen]["epochs"],
    )
    # the winner's trial on the validation split, as stage 1 trains it: stage 1 replays it
    reset = snapshot(classifier.variables)
    train_views = session.views("pooled", "train", chosen, session.config.views)
    scores[chosen]["split"] = session.trial(
        classifier,
        session.sampler(train_views, "train"),
        session.sampler(session.views("pooled", "val"), "val"),
        config.epochs,
        config.lr,
        key=("head", chosen),
    )
    reset()
    session.record_choice(augment_scores=scores)
    untried = AUTO_CANDIDATES[len(scores) :]
    log.info(
        "%s%s",
        noise_line("augmentation", scores, chosen, noise, by_loss),
        f"; stronger ones not tried: {', '.join(untried)}" if untried else "",
    )


def _per_image(session, trainer, record, val_data, by_loss: bool) -> np.ndarray:
    """A trial's answer for each validation image at its best epoch: 1/0 right or wrong
    (``by_loss``: its loss). The model is left holding those weights (the caller resets)."""
    variables = session.model.variables
    for index, value in record.best_values.items():
        variables[index].assign(value)
    rows = val_data.views[0]
    logits = np.concatenate(
        [
            keras.ops.convert_to_numpy(
                trainer(rows[np.arange(i, min(i + 256, len(rows)))], training=False)
            )
            for i in range(0, len(rows), 256)
        ]
    )
    kind = loss_kind(int(logits.shape[-1]), session.folder.multi_label)
    loss, right = scores_per_row(logits[:, None, :], val_data.labels, kind)
    return loss[:, 0] if by_loss else right[:, 0]


def cv_score(record: FoldRecord, by_loss: bool = False) -> dict:
    """A candidate's cross-validated score: the means over the folds (as ``val_accuracy``
    and ``val_loss``), the ``mean`` and standard error ``se`` of the measure chosen by
    (accuracy, or ``by_loss`` the loss), each fold's figures, and ``epochs``, the median of
    the folds' best epochs (the refit's stage-1 epochs, if chosen)."""
    accuracy, _ = mean_and_se(record.accuracy)
    loss, _ = mean_and_se(record.loss)
    mean, se = mean_and_se(record.loss if by_loss else record.accuracy)
    return {
        "val_accuracy": accuracy,
        "val_loss": loss,
        "epochs": int(np.median(record.epochs)),
        "mean": mean,
        "se": se,
        "fold_scores": list(record.accuracy),
        "fold_losses": list(record.loss),
        "fold_epochs": list(record.epochs),
    }


def folds_text(folds: np.ndarray) -> str:
    return f"{int(folds.max()) + 1}-fold cross-validation"


def decide(scores: dict[str, dict], by_loss: bool, tolerance, method: str):
    """The one-standard-error rule over ``scores`` (simplest first; accuracy, or ``by_loss``
    the loss; a candidate without accuracy cannot be chosen): (chosen, the choice's record
    for config.json's ``choice_noise``). Marks each score ``within_one_se`` of the best."""
    means = {
        name: None
        if score["val_accuracy"] is None
        else score["val_loss"]
        if by_loss
        else score["val_accuracy"]
        for name, score in scores.items()
    }
    chosen, best = one_se_choice(means, tolerance, lower_is_better=by_loss)
    sign = 1.0 if by_loss else -1.0
    for name, score in scores.items():
        score["within_one_se"] = bool(
            best is not None
            and means[name] is not None
            and sign * (means[name] - means[best]) <= tolerance(name, best) + 1e-12
        )
    others = [name for name in scores if name != chosen]
    noise = {
        "method": method,
        "by": "validation loss" if by_loss else "accuracy",
        "best": best,
        "chosen": chosen,
        "within_noise": any(scores[name]["within_one_se"] for name in others),
    }
    return chosen, noise


def _figure(score: dict, by_loss: bool, se_key: str = "se") -> str:
    if score["val_accuracy"] is None:
        return "not better than stage 1"
    mean = score["val_loss"] if by_loss else score["val_accuracy"]
    text = f"loss {mean:.4f}" if by_loss else f"{mean:.4f}"
    return f"{text} ± {score[se_key]:.4f}" if se_key in score else text


def noise_line(what: str, scores: dict, chosen: str, noise: dict, by_loss: bool) -> str:
    """The log's account of a cross-validated choice, e.g. "augmentation chosen by 5-fold
    cross-validation: none (0.8120 ± 0.0110); flip 0.8180 ± 0.0120 is within one standard
    error: kept the simpler"."""
    parts = [f"{what} chosen by {noise['method']}: {chosen} ({_figure(scores[chosen], by_loss)})"]
    for name, score in scores.items():
        if name == chosen:
            continue
        text = f"{name} {_figure(score, by_loss)}"
        if name == noise["best"]:
            text += " is within one standard error: kept the simpler"
        elif score["within_one_se"]:
            text += " (within one standard error)"
        parts.append(text)
    return "; ".join(parts)


def paired_noise_line(scores: dict, chosen: str | None, noise: dict, by_loss: bool) -> str:
    """The log's account of the fine-tuning rate chosen with paired standard errors."""
    if chosen is None:
        return f"fine-tuning rate chosen on validation: None ({scores_text(scores, by_loss)})"
    parts = [
        f"fine-tuning rate chosen on validation: {chosen} ({_figure(scores[chosen], by_loss)})"
    ]
    for name, score in scores.items():
        if name == chosen:
            continue
        text = f"{name} {_figure(score, by_loss)}"
        if name == noise["best"]:
            text += (
                f" wins by less than the paired standard error of the difference "
                f"({scores[chosen].get('paired_se', 0.0):.4f}): kept the gentler"
            )
        parts.append(text)
    return "; ".join(parts)


def cross_validated_epochs(config) -> int | None:
    """Stage 1's epochs for the refit where cross-validation chose its head (``head_epochs``:
    the median of the chosen candidate's folds' best epochs), else None."""
    return config.head_epochs


def snapshot(variables) -> Callable[[], None]:
    """A function that puts ``variables`` back to their values now (every candidate of a
    choice starts from the same weights and random-seed states)."""
    values = [np.array(v.numpy()) for v in variables]

    def reset() -> None:
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)

    return reset


def epochs_of(scores: dict[str, dict], chosen: str, epochs: int) -> int:
    """How long a stage runs: a stage that repeats its chosen candidate's trial (same start,
    data and procedure, so the same weights epoch by epoch) stops at that trial's best epoch,
    where it would save; the epochs after it are only early stopping's wait. A candidate
    chosen by cross-validation has no trial on the split to repeat: the stage trains, up to
    ``epochs`` (its folds' epochs are the refit's, `cross_validated_epochs`), unless its
    trial on the split was made to be repeated (``split``: its score)."""
    score = scores.get(chosen) or {}
    if "fold_epochs" in score:  # its trial on the split, if it had one (`choose_augmentation`)
        return (score.get("split") or {}).get("epochs") or epochs
    return score.get("epochs") or epochs


def climb(
    candidates, score: Callable[[str], dict], *, by_loss: bool = False, pick=None
) -> dict[str, dict]:
    """The scores of ``candidates`` in order, up to and including the first one that does
    worse than the best before it (the candidates grow stronger: the rest would do worse).

    ``pick(scores) -> name``: the choice among the scores so far (default `best_of`); the
    climb ends at the first candidate it would not choose (with the one-standard-error rule:
    the first that does not beat the simpler ones by more than the noise)."""
    pick = pick or (lambda scores: best_of(scores, by_loss=by_loss))
    scores = {}
    for candidate in candidates:
        scores[candidate] = score(candidate)
        if pick(scores) != candidate:
            break
    return scores


def scores_text(scores: dict[str, dict], by_loss: bool = False) -> str:
    """Each candidate's validation accuracy, or loss (None: no epoch beat stage 1, see
    `Session.trial`)."""

    def text(score: dict) -> str:
        if score["val_accuracy"] is None:
            return "not better than stage 1"
        return f"loss {score['val_loss']:.4f}" if by_loss else f"{score['val_accuracy']:.4f}"

    return ", ".join(f"{name}: {text(score)}" for name, score in scores.items())


def best_of(scores: dict[str, dict], *, by_loss: bool = False) -> str | None:
    """The candidate with the best validation accuracy, then loss (``by_loss``: the lowest
    loss); None if none has a score."""
    scored = [name for name, score in scores.items() if score["val_accuracy"] is not None]
    if by_loss:
        return min(scored, key=lambda name: scores[name]["val_loss"], default=None)
    return max(
        scored,
        key=lambda name: (scores[name]["val_accuracy"], -scores[name]["val_loss"]),
        default=None,
    )

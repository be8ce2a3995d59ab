"""The choices a run makes on validation, each by training candidates with the stage's own
procedure from the same start: the head's input (``--feature-norm auto``), the augmentation
(``--augment auto``) and the fine-tuning rate (``--fine-tune-lr auto``).

A candidate's *score* is ``{"val_accuracy", "val_loss", "epochs"}`` (`Session.trial`); the
choice with the best accuracy, then loss, wins, and config.json records every score. A
multi-label run chooses by validation loss (binary cross-entropy over every label) alone: its
accuracy, the share of right yes/no decisions at 0.5, mostly counts the labels an image does
not carry.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np

from headstart.augment import AUTO_CANDIDATES
from headstart.config import FEATURE_NORMS, FINE_TUNE_LR_CANDIDATES, GUIDE_FINE_TUNE_LR
from headstart.model import build_from_config, classifier_of
from headstart.training.state import trained_indices

log = logging.getLogger(__name__)


def choose_feature_norm(session) -> None:
    """``--feature-norm auto``: the model built with each candidate normalisation of the
    head's input, its head trained by stage 1's own procedure on the clean cached features;
    the best on validation is kept, as a resumed run would build it from the seed.

    The first candidate, "none", is the plain cached-features head (the floor of the run) and
    the session's own model, which `build_from_config` made with that input: it is put back as
    it was built and kept when it wins; another winner is its candidate model (built from the
    seed like a resumed run's) put back as it was built.
    """
    train_data = session.sampler(session.views("pooled", "train", "none", 0), "train")
    val_data = session.sampler(session.views("pooled", "val"), "val")
    config, scores = session.config, {}
    reset = snapshot(classifier_of(session.model).variables)
    built = {}  # norm -> (model, base, what puts its head back as built)
    for norm in FEATURE_NORMS:
        model = session.model
        if norm != "none":
            candidate = dataclasses.replace(config, feature_norm=norm)
            model, base = build_from_config(candidate, session.backbone, session.n_classes)
            built[norm] = (model, base, snapshot(classifier_of(model).variables))
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
        model, base, as_built = built[chosen]
        as_built()
        session.rebuild((model, base))


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
    scores = {}
    for rate in FINE_TUNE_LR_CANDIDATES:
        reset()
        scores[str(rate)] = session.trial(
            trainer,
            train_data,
            val_data,
            session.config.fine_tune_epochs,
            rate,
            floor=session.checkpoint.accuracy_floor,
            key=("fine_tune", str(rate)),
        )
        session.tracker.trial("fine_tune_lr", str(rate), scores[str(rate)])
    reset()
    by_loss = session.folder.multi_label
    chosen = best_of(scores, by_loss=by_loss)
    session.record_choice(
        fine_tune_lr=None if chosen is None else float(chosen), fine_tune_lr_scores=scores
    )
    log.info("fine-tuning rate chosen on validation: %s (%s)", chosen, scores_text(scores, by_loss))


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
    where it would save; the epochs after it are only early stopping's wait."""
    return (scores.get(chosen) or {}).get("epochs") or epochs


def climb(candidates, score: Callable[[str], dict], *, by_loss: bool = False) -> dict[str, dict]:
    """The scores of ``candidates`` in order, up to and including the first one that does
    worse than the best before it (the candidates grow stronger: the rest would do worse)."""
    scores = {}
    for candidate in candidates:
        scores[candidate] = score(candidate)
        if best_of(scores, by_loss=by_loss) != candidate:
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

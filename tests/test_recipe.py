"""The default recipe earns each step on validation: augmentation is chosen, fine-tuning kept
only when it beats stage 1, and the result is never below plain cached features."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import random
import time

import keras
import numpy as np
import pytest

from headstart import Config, train
from headstart.augment import AUTO_CANDIDATES
from headstart.backbones import get_backbone
from headstart.config import FEATURE_NORMS, FINE_TUNE_LR_CANDIDATES
from headstart.model import (
    build_from_config,
    build_on_base,
    build_seeded,
    classifier_of,
    compile_for,
)
from headstart.runtime import FrozenRunner
from headstart.splits import folder_for
from headstart.training import choose as choose_module
from headstart.training.session import Session


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def timed_auto_run(mirrored_classes, tmp_path_factory):
    """The default path (tiny_test): (the run, seconds around the call, the recipe's info lines)."""
    config = Config(
        data=str(mirrored_classes),
        out=str(tmp_path_factory.mktemp("runs") / "auto"),
        backbone="tiny_test",  # tests/conftest.py: pretrained-style, two blocks and a top block
        weights="none",
        image_size=64,
        head="flatten",  # keeps where things are: a pooled feature could not tell left from right
        epochs=8,
        batch_size=8,
        views=2,
        val_split=0.3,
        fine_tune_epochs=2,  # fine_tune_lr "auto": every rate tried, none can beat 100%
        quiet=True,
    )
    logger, handler = logging.getLogger("headstart.training.recipe"), _Lines()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        started = time.monotonic()
        result = train(config)
        seconds = time.monotonic() - started
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return result, seconds, handler.lines


@pytest.fixture(scope="module")
def auto_run(timed_auto_run):
    return timed_auto_run[0]


@pytest.mark.slow  # a full training run
def test_every_phase_of_the_default_path_is_timed_and_they_add_up(timed_auto_run):
    result, seconds, lines = timed_auto_run
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    phases, total = metrics["phase_seconds"], metrics["total_seconds"]
    assert list(phases) == [  # in the order each first ends; from Python: no start-up
        "build model",
        "decode check",
        "data check",
        "extraction clean",  # the trunk of train and validation, pooled from it
        "head input",  # its trials (one model built per candidate)
        "extraction augmented",  # flip's two views
        "augmentation",
        "stage 1",
        "fine-tuning rate",
        "stage 2",  # what is left of it: unfreezing, the stage's state (no epoch: none won)
        "refit",  # the default: stage 1 again on train + validation
        "test",
        "report",
        "other",
    ]
    assert all(value >= 0 for value in phases.values())
    assert sum(phases.values()) == pytest.approx(total, rel=0.01)
    assert total <= seconds and total == pytest.approx(seconds, abs=0.5)  # all but the return
    passes = metrics["extraction_passes"]
    assert [(p["split"], p["view"]) for p in passes] == [
        ("train", "clean"),
        ("val", "clean"),
        ("train", "flip#1"),  # cross-validation trains on the validation images' views too
        ("val", "flip#1"),
        ("train", "flip#2"),
        ("val", "flip#2"),
        ("test", "clean"),  # the test pass's frozen part, through the runtime and the cache
    ]
    assert all(p["computed"] == p["images"] and p["output"].startswith("trunk:") for p in passes)
    assert {p["runtime"] for p in passes} == {metrics["extraction_runtime"]["trunk"]}
    breakdown = [line for line in lines if line.startswith("time ")]
    assert breakdown == [
        f"time {total:.1f} s: " + ", ".join(f"{name} {value:.1f}" for name, value in phases.items())
    ]


@pytest.mark.slow  # a full training run
def test_augmentation_is_chosen_on_validation_and_flips_lose_on_mirrored_classes(auto_run):
    scores = auto_run.config.augment_scores
    assert list(scores) == list(AUTO_CANDIDATES[:2]) == ["none", "flip"]  # stronger: not tried
    assert auto_run.config.augment == "none" and auto_run.config.views == 0

    def rank(policy):  # cross-validated: mean accuracy over the folds, then loss
        return scores[policy]["val_accuracy"], -scores[policy]["val_loss"]

    assert rank("flip") < rank("none")
    assert auto_run.config.choice_noise["augment"]["best"] == "none"  # not by the rule alone
    # mirrored training views with the wrong label: flipping costs validation loss
    assert all(
        scores[p]["val_loss"] > 2 * scores["none"]["val_loss"] for p in scores if p != "none"
    )
    saved = json.loads((auto_run.run_dir / "config.json").read_text())
    assert saved["augment"] == "none" and saved["augment_scores"] == scores
    metrics = json.loads((auto_run.run_dir / "metrics.json").read_text())
    assert metrics["augment"] == "none" and metrics["augment_scores"] == scores


@pytest.mark.slow  # a full training run
def test_the_head_input_is_chosen_on_validation_and_built_into_the_model(auto_run):
    scores = auto_run.config.feature_norm_scores
    assert list(scores) == list(FEATURE_NORMS)
    chosen = auto_run.config.feature_norm
    best = auto_run.config.choice_noise["feature_norm"]["best"]
    # the one-standard-error rule: the first candidate within the best's standard error
    within = [
        n for n, s in scores.items() if s["mean"] >= scores[best]["mean"] - scores[best]["se"]
    ]
    assert chosen == within[0]
    saved = json.loads((auto_run.run_dir / "config.json").read_text())
    assert saved["feature_norm"] == chosen and saved["feature_norm_scores"] == scores
    metrics = json.loads((auto_run.run_dir / "metrics.json").read_text())
    assert metrics["feature_norm"] == chosen and metrics["feature_norm_scores"] == scores
    # the augmentation choice starts from the chosen head: its "none" is those same folds
    assert auto_run.config.augment_scores["none"]["fold_scores"] == scores[chosen]["fold_scores"]
    model = keras.saving.load_model(auto_run.run_dir / "model.keras")
    names = {layer.name for layer in model.get_layer("classifier").layers}
    assert ("l2_normalize" in names) == (chosen == "l2")


# The default path refits (`headstart.training.refit`): its validation figures are the choosing
# phase's, in metrics.json's "validation_choosing_phase" ("saved_from" with --no-refit).


@pytest.mark.slow  # a full training run
def test_plain_cached_features_are_kept_unless_beaten_beyond_noise(auto_run):
    """The first candidates (raw features, no views) are the plain cached-features head: a
    choice leaves them only for a mean better by more than the best's standard error."""
    config = auto_run.config
    for scores, chosen in (
        (config.feature_norm_scores, config.feature_norm),
        (config.augment_scores, config.augment),
    ):
        plain = scores[next(iter(scores))]
        if chosen != next(iter(scores)):
            assert scores[chosen]["mean"] - plain["mean"] > scores[chosen]["se"]


@pytest.mark.slow  # a full training run
def test_fine_tuning_that_cannot_beat_stage_1_is_skipped(auto_run):
    metrics = auto_run.metrics
    assert metrics["validation_choosing_phase"]["val_accuracy"] == 1.0  # nothing left to beat
    assert metrics["fine_tune_kept"] is False and metrics["fine_tune_lr"] is None
    assert list(metrics["fine_tune_lr_scores"]) == [str(r) for r in FINE_TUNE_LR_CANDIDATES]
    assert all(s["val_accuracy"] is None for s in metrics["fine_tune_lr_scores"].values())
    rows = list(csv.DictReader((auto_run.run_dir / "history.csv").open()))
    assert {r["stage"] for r in rows} == {"head", "refit_head"}  # no stage 2 in the refit either
    assert metrics["refit_epochs"]["fine_tune"] == 0


def test_l2_feature_norm_puts_pooled_features_on_a_sphere_of_radius_sqrt_dim():
    from headstart.model import build_head

    head = build_head(16, 3, hidden=0, dropout=0.0, feature_norm="l2")
    normalised = keras.Model(head.input, head.get_layer("l2_scale").output)
    features = np.random.default_rng(0).normal(size=(5, 16)).astype("float32") * [
        [1],
        [10],
        [1e3],
        [0.1],
        [3],
    ]
    norms = np.linalg.norm(normalised.predict(features, verbose=0), axis=1)
    np.testing.assert_allclose(norms, 4.0, rtol=1e-5)  # sqrt(16): the input's scale is gone
    assert head.count_params() == build_head(16, 3, 0, 0.0).count_params()  # no parameters


def test_the_search_stops_at_the_first_candidate_worse_than_the_best_before_it():
    from headstart.training.choose import climb

    accuracy = {"a": 0.5, "b": 0.7, "c": 0.8, "d": 0.75, "e": 0.99}
    tried = []

    def score(name):
        tried.append(name)
        return {"val_accuracy": accuracy[name], "val_loss": 1.0}

    scores = climb(list(accuracy), score)
    assert tried == ["a", "b", "c", "d"] and list(scores) == tried  # "e" is never extracted
    tie = climb(["a", "b", "c"], lambda name: {"val_accuracy": 0.5, "val_loss": 1.0})
    assert list(tie) == ["a", "b"]  # an exact tie is not an improvement


@pytest.mark.slow  # a full training run
def test_stage_1_repeats_the_chosen_trial_and_stops_at_its_best_epoch(auto_run):
    chosen = auto_run.config.augment_scores[auto_run.config.augment]["split"]  # its split trial
    rows = list(csv.DictReader((auto_run.run_dir / "history.csv").open()))
    head = [r for r in rows if r["stage"] == "head"]
    # the same start, data and procedure: the same epochs, ending where the trial saved
    assert 1 <= chosen["epochs"] == len(head) <= auto_run.config.epochs
    saved = auto_run.metrics["validation_choosing_phase"]
    assert saved["stage"] == "head" and saved["epoch"] == chosen["epochs"]
    assert saved["val_loss"] == pytest.approx(chosen["val_loss"], abs=1e-6)
    assert saved["val_accuracy"] == chosen["val_accuracy"]


# a weak stage 1 (one epoch at a tiny rate): fine-tuning beats it; --no-refit: the tests
# read the saved model's validation figures and its stages (tests/test_refit.py: the refit)
WEAK_STAGE_1 = dict(
    backbone="tiny_test",
    weights="none",
    image_size=32,
    epochs=1,
    lr=1e-5,
    fine_tune_epochs=4,
    batch_size=8,
    val_split=0.3,
    refit=False,
    report=False,
    quiet=True,
)


@pytest.mark.slow  # a whole training run
def test_stage_2_repeats_the_winning_rate_and_stops_at_its_best_epoch(mirrored_classes, tmp_path):
    result = train(
        Config(
            data=str(mirrored_classes),
            out=str(tmp_path / "run"),
            **WEAK_STAGE_1,
            augment="none",
            feature_norm="none",
        )
    )
    rate = result.config.fine_tune_lr
    assert rate in FINE_TUNE_LR_CANDIDATES  # chosen, not forced
    chosen = result.config.fine_tune_lr_scores[str(rate)]
    rows = list(csv.DictReader((result.run_dir / "history.csv").open()))
    fine_tune = [r for r in rows if r["stage"] == "fine_tune"]
    assert 1 <= len(fine_tune) == chosen["epochs"] <= 4
    saved = result.metrics["saved_from"]
    assert saved["stage"] == "fine_tune" and saved["epoch"] == chosen["epochs"]
    # the rates' trials are too dear to cross-validate: the one-SE rule with the paired
    # standard error of their per-image differences on the validation split
    noise = result.config.choice_noise["fine_tune_lr"]
    assert noise["method"] == "the validation split, paired standard error"
    assert noise["chosen"] == str(rate) and isinstance(noise["within_noise"], bool)
    scores = result.config.fine_tune_lr_scores
    for score in scores.values():
        if score["val_accuracy"] is not None:
            assert score["paired_se"] >= 0 and isinstance(score["within_one_se"], bool)
    if noise["best"] != noise["chosen"]:  # the gentler rate kept: the other wins within noise
        margin = scores[noise["best"]]["val_accuracy"] - chosen["val_accuracy"]
        assert margin <= chosen["paired_se"] + 1e-9


@pytest.mark.slow  # two training runs
def test_a_stage_that_repeats_its_chosen_trial_replays_it_to_the_same_run_folder(
    mirrored_classes, tmp_path, caplog
):
    """Both stages repeat a chosen trial: replayed (no training), they leave the same history
    and model.keras as a run that trains them again (a user callback makes a run train live)."""

    def run(name: str, callbacks=()):
        config = Config(
            data=str(mirrored_classes), out=str(tmp_path / name), **WEAK_STAGE_1, views=1
        )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="headstart.training.session"):
            result = train(config, callbacks=callbacks)
        return result, [r.getMessage() for r in caplog.records if "replayed" in r.getMessage()]

    replayed, lines = run("replayed")
    assert replayed.config.fine_tune_lr in FINE_TUNE_LR_CANDIDATES  # stage 2 ran
    epochs = [
        replayed.config.augment_scores[replayed.config.augment]["split"]["epochs"],
        replayed.config.fine_tune_lr_scores[str(replayed.config.fine_tune_lr)]["epochs"],
    ]
    assert lines == [
        f"stage {n}: the chosen candidate's trial replayed ({e} epochs, no retraining)"
        for n, e in zip((1, 2), epochs, strict=True)
    ]
    live, lines = run("live", callbacks=[keras.callbacks.Callback()])
    assert lines == []
    assert live.config.augment_scores == replayed.config.augment_scores
    assert live.config.fine_tune_lr_scores == replayed.config.fine_tune_lr_scores

    def history(result) -> list[dict]:
        rows = list(csv.DictReader((result.run_dir / "history.csv").open()))
        return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in rows]

    rows = history(replayed)
    assert [r["stage"] for r in rows] == ["head"] * epochs[0] + ["fine_tune"] * epochs[1]
    assert rows == history(live)
    models = [keras.saving.load_model(r.run_dir / "model.keras") for r in (replayed, live)]
    for a, b in zip(*(m.get_weights() for m in models), strict=True):
        np.testing.assert_array_equal(a, b)
    # the head's optimizer, saved with it (stage 1's, built: moments and step count)
    optimizers = [[v.numpy() for v in classifier_of(m).optimizer.variables] for m in models]
    assert len(optimizers[0]) == len(optimizers[1]) > 2
    for a, b in zip(*optimizers, strict=True):
        np.testing.assert_array_equal(a, b)
    for key in ("saved_from", "accuracy", "loss"):
        assert replayed.metrics[key] == live.metrics[key]
    assert not (replayed.run_dir / "resume.npz").exists()


def test_a_trainer_compiled_before_keeps_its_step_and_trains_as_if_new(tiny_folder, tmp_path):
    """`Session.compile` again on a trainer it compiled so before keeps the compiled step (no
    new trace) and puts the optimizer in a new one's state: a second trial from the same start
    ends where a freshly compiled trainer ends, to the bit."""
    config = Config(data=str(tiny_folder), backbone="tiny_test", weights="none", image_size=32)
    backbone = get_backbone(config.backbone)
    folder = folder_for(config)
    model, seeded = build_seeded(config, backbone, 2)
    session = Session(config, backbone, folder, model, seeded, tmp_path, None)
    rng = np.random.default_rng(1)
    width = classifier_of(model).input.shape[-1]
    features, labels = rng.normal(size=(24, width)), rng.integers(0, 2, 24)

    def trial(trainer, rate):
        session.compile(trainer, rate, steps=3)
        trainer.fit(features, labels, batch_size=8, epochs=2, verbose=0, shuffle=False)
        return [np.array(v) for v in trainer.weights], trainer.train_function

    classifier = classifier_of(model)
    start = [np.array(v) for v in classifier.variables]
    _, step = trial(classifier, 1e-2)
    for variable, value in zip(classifier.variables, start, strict=True):
        variable.assign(value)
    weights, again = trial(classifier, 1e-3)
    assert again is step  # not traced anew
    fresh, _ = build_from_config(config, backbone, 2)
    compile_for(classifier_of(fresh), 2, 1e-3, steps_per_execution=3)
    classifier_of(fresh).fit(features, labels, batch_size=8, epochs=2, verbose=0, shuffle=False)
    for value, expected in zip(weights, classifier_of(fresh).weights, strict=True):
        np.testing.assert_array_equal(value, np.array(expected))


@pytest.mark.slow  # a training run
def test_the_chosen_head_input_is_its_candidate_as_built_and_no_runner_is_made_again(
    tiny_folder, tmp_path, monkeypatch
):
    """When "l2" wins the head input, the session's model is the candidate its trial trained,
    put back as built: every variable as `build_from_config` makes it from the seed (as a
    resumed run builds it); and the trunk's runner (converted and checked once) serves the
    test split after the swap."""
    adopted, runners = [], []
    monkeypatch.setattr(choose_module, "best_of", lambda scores, **_: "l2")
    rebuild = Session.rebuild

    def record(self, built=None):
        rebuild(self, built)
        adopted.append(([np.array(v) for v in self.model.variables], self.config))

    make_runner = FrozenRunner.__init__

    def count(self, *args, **kwargs):
        runners.append(kwargs.get("what"))
        make_runner(self, *args, **kwargs)

    monkeypatch.setattr(Session, "rebuild", record)
    monkeypatch.setattr(FrozenRunner, "__init__", count)
    config = Config(
        data=str(tiny_folder),
        out=str(tmp_path / "run"),
        backbone="tiny_test",
        weights="none",
        image_size=32,
        epochs=2,
        augment="none",
        fine_tune_epochs=1,
        fine_tune_lr=1e-4,
        refit=False,
        choice_folds=1,  # on validation: the candidate's trial model is the one kept
        runtime="keras",  # a runner all the same, without converting
        quiet=True,
    )
    result = train(config)
    assert result.config.feature_norm == "l2" and len(adopted) == 1
    # --choice-folds 1: the choices of before, on validation alone
    assert result.config.choice_noise == {} and "choice_noise" not in result.metrics
    assert all("fold_scores" not in s for s in result.config.feature_norm_scores.values())
    values, chosen = adopted[0]
    built, _ = build_from_config(chosen, get_backbone("tiny_test"), 2)
    assert len(values) == len(built.variables)
    for value, variable in zip(values, built.variables, strict=True):
        np.testing.assert_array_equal(value, np.array(variable))
    assert len(runners) == 1 and result.metrics["n_test"] > 0


def test_a_head_built_on_the_base_is_the_head_a_whole_build_draws():
    """A head input's candidate (and a chosen one) is built around the session's base: its
    weights, its dropout's seed state and the random generators after it are those of the
    whole model built from the seed, as a resumed run builds it."""
    config = Config(
        data=".", backbone="tiny_test", weights="none", image_size=32, hidden=16, dropout=0.3
    )
    backbone, l2 = get_backbone("tiny_test"), dataclasses.replace(config, feature_norm="l2")
    whole, _ = build_from_config(l2, backbone, 3)
    after_whole = (random.random(), float(np.random.random()))
    model, seeded = build_seeded(config, backbone, 3)
    random.random(), np.random.random()  # the run draws on meanwhile
    on_base = build_on_base(l2, backbone, 3, seeded)
    assert (random.random(), float(np.random.random())) == after_whole
    assert "l2_normalize" in [layer.name for layer in classifier_of(on_base).layers]
    shared = {id(v) for v in model.variables} & {id(v) for v in on_base.variables}
    assert shared == {id(v) for v in seeded.base.variables}  # the very base, not a copy
    heads = [classifier_of(m).variables for m in (whole, on_base)]
    assert len(heads[0]) == len(heads[1]) >= 5  # hidden and logits kernels and biases, seed
    for a, b in zip(*heads, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

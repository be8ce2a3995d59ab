"""Choices that respect the noise (`headstart.training.noise`, `headstart.training.crossval`,
`headstart.training.choose`): the cheap choices scored by k-fold cross-validation over training
+ validation, the simplest kept unless another wins by more than one standard error."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from headstart import Config, train
from headstart.model import build_head
from headstart.training.choose import cv_score, decide, noise_line, paired_noise_line
from headstart.training.crossval import FoldMaskedLoss, cross_validate_heads, scores_per_row
from headstart.training.noise import fold_assignment, mean_and_se, one_se_choice, paired_se

# ----------------------------------------------------------------------- the pure helpers


def test_folds_are_stratified_seeded_and_balanced():
    targets = np.array([0] * 12 + [1] * 7 + [2] * 3)
    folds = fold_assignment(targets, 5, seed=3)
    assert folds.shape == targets.shape and set(folds) == set(range(5))
    np.testing.assert_array_equal(folds, fold_assignment(targets, 5, seed=3))  # seeded
    assert not np.array_equal(folds, fold_assignment(targets, 5, seed=4))
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 1  # 22 rows: 5, 5, 4, 4, 4
    for label in range(3):  # every class dealt round the folds: at most one apart
        per_fold = np.bincount(folds[targets == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    multi = fold_assignment(np.eye(4)[np.arange(10) % 4], 3, seed=0)  # multi-label rows
    assert sorted(np.bincount(multi)) == [3, 3, 4]


def test_mean_and_standard_error_over_folds():
    mean, se = mean_and_se([0.8, 0.9, 0.7, 0.8])
    assert mean == pytest.approx(0.8)
    assert se == pytest.approx(np.std([0.8, 0.9, 0.7, 0.8], ddof=1) / 2)
    assert mean_and_se([0.5]) == (0.5, 0.0)
    # paired: two candidates that disagree on 2 images of 100
    a, b = np.ones(100), np.ones(100)
    a[0], b[1] = 0, 0
    assert paired_se(a, b) == pytest.approx(np.std(a - b, ddof=1) / 10)
    assert paired_se(a, a) == 0.0


def test_the_one_standard_error_rule_keeps_the_first_candidate_within_noise():
    means = {"none": 0.80, "flip": 0.82, "strong": 0.79}
    ses = {"none": 0.01, "flip": 0.015, "strong": 0.01}
    by_best_se = lambda _, best: ses[best]  # noqa: E731
    assert one_se_choice(means, by_best_se) == ("flip", "flip")  # none is 0.02 below: beyond
    ses["flip"] = 0.02
    assert one_se_choice(means, by_best_se) == ("none", "flip")  # now within: the simpler
    # ties: the first of equals is the best, and it is chosen
    assert one_se_choice({"a": 0.5, "b": 0.5}, lambda *_: 0.0) == ("a", "a")
    # None: no score (not better than stage 1), never chosen, never the best
    assert one_se_choice({"a": None, "b": 0.6, "c": 0.61}, lambda *_: 0.02) == ("b", "c")
    assert one_se_choice({"a": None, "b": None}, lambda *_: 0.0) == (None, None)
    # by loss: lower is better
    losses = {"a": 0.50, "b": 0.40}
    assert one_se_choice(losses, lambda *_: 0.05, lower_is_better=True) == ("b", "b")
    assert one_se_choice(losses, lambda *_: 0.1, lower_is_better=True) == ("a", "b")


def test_per_row_scores_match_the_cross_entropies():
    logits = np.array([[[2.0, 0.0, -1.0]], [[0.0, 0.0, 0.0]]])  # (rows, copies, classes)
    loss, right = scores_per_row(logits, np.array([0, 2]), "sparse")
    expected = -np.log(np.exp(2.0) / (np.exp(2.0) + 1 + np.exp(-1.0)))
    assert loss[0, 0] == pytest.approx(expected) and loss[1, 0] == pytest.approx(np.log(3))
    assert right[:, 0].tolist() == [1.0, 0.0]
    loss, right = scores_per_row(np.array([[[1.0]], [[-2.0]]]), np.array([1, 1]), "binary")
    assert loss[:, 0] == pytest.approx([np.log1p(np.exp(-1.0)), np.log1p(np.exp(2.0))])
    assert right[:, 0].tolist() == [1.0, 0.0]


@pytest.mark.slow  # a fit of six heads (about 3 s with its first trace)
def test_the_folds_heads_train_apart_in_one_fit_and_a_clear_winner_is_chosen():
    """Each fold's copy learns from the rows outside its fold only. Features whose direction
    is the class but whose length ranges over four orders of magnitude: the L2-normalised head
    gets every fold right, the raw one misses the shortest vectors in every fold (their logits
    are its bias), so "l2" wins by far more than its standard error and is chosen although
    "none" is the simpler."""
    rng = np.random.default_rng(0)
    targets = np.arange(90) % 3
    directions = np.eye(3)[targets] + rng.normal(size=(90, 3)) * 0.1
    features = (directions * 10 ** rng.uniform(-3, 1, size=(90, 1))).astype("float32")
    folds = fold_assignment(targets, 3, seed=0)
    heads = {"none": build_head(3, 3, 0, 0.0), "l2": build_head(3, 3, 0, 0.0, "l2")}
    start = [w.copy() for w in heads["none"].get_weights()]
    cache: dict = {}
    settings = dict(epochs=20, learning_rate=0.05, batch_size=8, patience=3, seed=0)
    records = cross_validate_heads(heads, [features], targets, folds, cache=cache, **settings)
    for name, record in records.items():
        assert len(record.accuracy) == len(record.loss) == len(record.epochs) == 3, name
        assert all(1 <= e <= 20 for e in record.epochs)
    assert min(records["l2"].accuracy) >= 0.9
    assert max(records["none"].accuracy) < 0.9
    for value, before in zip(heads["none"].get_weights(), start, strict=True):
        np.testing.assert_array_equal(value, before)  # the candidates themselves untouched
    # a run's later fit of the same heads (another policy's views) reuses the compiled model,
    # put back in its first state: the same records as the new one's
    again = cross_validate_heads(heads, [features], targets, folds, cache=cache, **settings)
    assert again == records and len(cache) == 1
    scores = {name: cv_score(record) for name, record in records.items()}
    chosen, noise = decide(scores, False, lambda _, best: scores[best]["se"], "3-fold")
    assert chosen == noise["best"] == "l2" and noise["within_noise"] is False
    assert scores["l2"]["mean"] - scores["none"]["mean"] > scores["l2"]["se"]
    line = noise_line("head input", scores, chosen, noise, False)
    assert line.startswith("head input chosen by 3-fold: l2 (") and "within" not in line


def test_each_copy_learns_only_outside_its_fold_and_weighs_rows_by_class():
    """`FoldMaskedLoss`: the mean loss over (row, copy) pairs where the row is outside the
    copy's fold, each weighed by its class's --class-weight."""
    logits = np.array([[[2.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [1.0, -1.0]]], "float32")
    y_true = np.array([[0, 0], [1, 1]], "float32")  # (label, fold) per row
    weights = np.array([1.0, 3.0], "float32")
    loss = FoldMaskedLoss(np.array([0, 1]), "sparse", weights)(y_true, logits)
    per, _ = scores_per_row(logits, np.array([0, 1]), "sparse")
    # row 0 (fold 0) trains copy 1 only; row 1 (fold 1) trains copy 0 only, weighed 3
    expected = (1.0 * per[0, 1] + 3.0 * per[1, 0]) / (1.0 + 3.0)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_a_choice_within_noise_keeps_the_simpler_and_says_so():
    def score(mean, se):
        return {"val_accuracy": mean, "val_loss": 1 - mean, "mean": mean, "se": se}

    scores = {"none": score(0.812, 0.011), "flip": score(0.818, 0.012), "more": score(0.79, 0.01)}
    chosen, noise = decide(scores, False, lambda _, best: scores[best]["se"], "5-fold cv")
    assert chosen == "none" and noise["best"] == "flip" and noise["within_noise"] is True
    assert [scores[n]["within_one_se"] for n in scores] == [True, True, False]
    assert noise_line("augmentation", scores, chosen, noise, False) == (
        "augmentation chosen by 5-fold cv: none (0.8120 ± 0.0110); flip 0.8180 ± 0.0120 is "
        "within one standard error: kept the simpler; more 0.7900 ± 0.0100"
    )


# ------------------------------------------------------------------------- runs of the recipe


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _train(config: Config):
    logger, handler = logging.getLogger("headstart.training.choose"), _Lines()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        result = train(config)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return result, handler.lines


def _config(data, out, **overrides) -> Config:
    settings = dict(
        data=str(data),
        out=str(out),
        backbone="tiny_test",
        weights="none",
        image_size=32,
        epochs=6,
        batch_size=8,
        fine_tune=False,
        runtime="keras",  # nothing to convert
        quiet=True,
    )
    return Config(**{**settings, **overrides})


@pytest.fixture(scope="module")
def folds_run(tiny_folder, tmp_path_factory):
    """The default path's choices (5 folds) on tiny_folder, no fine-tuning: (result, lines)."""
    return _train(_config(tiny_folder, tmp_path_factory.mktemp("runs") / "folds"))


@pytest.mark.slow  # a training run
def test_the_default_chooses_by_five_fold_cross_validation_and_records_it(folds_run):
    result, lines = folds_run
    config, metrics = result.config, result.metrics
    saved = json.loads((result.run_dir / "config.json").read_text())
    for choice, scores in (("feature_norm", "feature_norm_scores"), ("augment", "augment_scores")):
        record = getattr(config, scores)
        assert saved[scores] == metrics[scores] == record
        for score in record.values():
            assert len(score["fold_scores"]) == len(score["fold_epochs"]) == 5
            assert score["mean"] == pytest.approx(np.mean(score["fold_scores"]))
            assert score["se"] == pytest.approx(np.std(score["fold_scores"], ddof=1) / 5**0.5)
            assert isinstance(score["within_one_se"], bool)
        noise = config.choice_noise[choice]
        assert noise["method"] == "5-fold cross-validation" and noise["by"] == "accuracy"
        assert noise["chosen"] == getattr(config, choice) and noise["best"] in record
        assert isinstance(noise["within_noise"], bool)
    assert saved["choice_noise"] == metrics["choice_noise"] == config.choice_noise
    report = (result.run_dir / "report.html").read_text()  # the choices' table
    assert '<section id="choices">' in report and "(5 folds, ± " in report
    assert [line for line in lines if "5-fold cross-validation" in line]  # said in the log
    # the refit's stage 1 runs the chosen candidate's median fold epoch
    chosen = config.augment_scores[config.augment]
    assert (
        metrics["refit_epochs"]["head"]
        == config.head_epochs
        == chosen["epochs"]
        == int(np.median(chosen["fold_epochs"]))
    )
    # the test split is read by the test pass only: every extraction before is train or val
    passes = [p["split"] for p in metrics["extraction_passes"]]
    assert "test" not in passes[:-1] and passes[-1] == "test"


@pytest.mark.slow  # a training run
def test_a_candidate_within_noise_loses_to_the_simpler_and_the_log_says_so(folds_run):
    """tiny_folder's colours are learnt by every candidate: all are within noise of each
    other, and the simplest ("none" for both choices) is kept."""
    result, lines = folds_run
    config = result.config
    for choice in ("feature_norm", "augment"):
        assert getattr(config, choice) == "none"
        assert config.choice_noise[choice]["within_noise"] is True
    line = next(line for line in lines if line.startswith("augmentation chosen by"))
    best = config.choice_noise["augment"]["best"]
    if best != "none":
        assert f"{best} " in line and "is within one standard error: kept the simpler" in line


def test_the_gentler_rate_is_kept_when_the_other_wins_within_the_paired_error():
    scores = {
        "0.0001": {"val_accuracy": 0.80, "val_loss": 0.50},
        "0.001": {"val_accuracy": 0.81, "val_loss": 0.49},
    }
    right = {"0.0001": np.r_[np.ones(80), np.zeros(20)], "0.001": np.r_[np.ones(81), np.zeros(19)]}
    chosen, noise = decide(
        scores, False, lambda name, best: paired_se(right[name], right[best]), "paired"
    )
    assert chosen == "0.0001" and noise["best"] == "0.001" and noise["within_noise"] is True
    scores["0.0001"]["paired_se"] = paired_se(right["0.0001"], right["0.001"])  # 0.01
    assert paired_noise_line(scores, chosen, noise, False) == (
        "fine-tuning rate chosen on validation: 0.0001 (0.8000); 0.001 0.8100 wins by less "
        "than the paired standard error of the difference (0.0100): kept the gentler"
    )

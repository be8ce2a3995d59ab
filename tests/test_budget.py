"""The time budget (`headstart.budget`): the default path trains one model and plans nothing
else; the planner orders candidates by expected gain per second and starts only those that fit;
a running candidate stops at the deadline; an ensemble is kept only when its cross-validated
gain over its best member exceeds noise; the result is one normal run folder."""

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from headstart import Config, budget, evaluate, runs, train
from headstart.budget import (
    Candidate,
    Costs,
    OutOfTime,
    best_member,
    correction,
    deadline,
    default_candidates,
    ensemble_evidence,
    estimate_seconds,
    next_candidate,
    time_limit_seconds,
    train_with_budget,
)
from headstart.cli import _config_of, build_parser
from headstart.errors import UsageError
from headstart.training.recipe import (
    TrainResult,
    read_validation_probabilities,
    write_validation_probabilities,
)

# --------------------------------------------------------------------------- the default path


def test_the_default_path_trains_one_model_and_says_how_to_buy_more(caplog):
    """No flags: `train(config)` once, unchanged, and one line naming --quality/--time-limit."""
    calls = []

    def trainer(config, started=None):
        calls.append((config, started))
        return "result"

    config = Config(data="DATA")
    with caplog.at_level(logging.INFO, logger="headstart.budget"):
        assert train_with_budget(config, started=12.5, trainer=trainer) == "result"
    assert calls == [(config, 12.5)]
    assert "--quality balanced (10 min) or best (30 min)" in caplog.text
    assert "--time-limit MINUTES" in caplog.text
    assert time_limit_seconds(config) == 0.0


def test_quality_presets_and_the_time_limit_that_overrides_them():
    seconds = {q: time_limit_seconds(Config("D", quality=q)) for q in ("fast", "balanced", "best")}
    assert seconds == {"fast": 0.0, "balanced": 600.0, "best": 1800.0}
    assert time_limit_seconds(Config("D", quality="best", time_limit=2)) == 120.0
    assert time_limit_seconds(Config("D", quality="best", time_limit=0)) == 0.0
    with pytest.raises(UsageError, match="--quality must be one of fast, balanced, best"):
        Config("D", quality="fastest").validate()
    with pytest.raises(UsageError, match="--time-limit"):
        Config("D", time_limit=-1).validate()
    with pytest.raises(UsageError, match="train_with_budget"):  # train() never ignores it
        train(Config("D", quality="best"))


def test_cli_time_limit_and_quality_reach_the_config():
    parser = build_parser()
    args = parser.parse_args(["train", "DATA", "--time-limit", "10", "--quality", "best"])
    config = _config_of(args)
    assert (config.time_limit, config.quality) == (10.0, "best")
    plain = _config_of(parser.parse_args(["train", "DATA"]))
    assert (plain.time_limit, plain.quality) == (None, "fast")
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "DATA", "--quality", "fastest"])
    with pytest.raises(SystemExit):  # the budget is train's, not cv's
        parser.parse_args(["cv", "DATA", "--quality", "best"])


# ------------------------------------------------------------------------------ the planner

COSTS = Costs(  # made up: a 96 px Lite0 run of 1,000 + 500 images
    backbone="efficientnet_lite0",
    size=96,
    fixed=20.0,
    build=2.0,
    per_image=0.002,
    extraction_images=12_000,
    fine_tune=10.0,
    rate_trials=15.0,
    test=3.0,
    train_images=1000,
    val_images=500,
    fine_tune_epochs=10,
)


def test_estimates_scale_with_pixels_and_backbone_and_reuse_cached_parts():
    same = Candidate("same", {}, 1.0, ("efficientnet_lite0",), 96)
    base = estimate_seconds(same, COSTS)
    assert base == pytest.approx(20 + 12_000 * 0.002 + 3 + 10)  # rate chosen once, inherited
    assert estimate_seconds(same, COSTS, own_rate=True) == pytest.approx(base + 15)
    double = dataclasses.replace(same, size=192)
    assert estimate_seconds(double, COSTS) - 20 == pytest.approx(4 * (base - 20))
    lite2 = Candidate("lite2", {}, 1.0, ("efficientnet_lite2",), 96)
    assert estimate_seconds(lite2, COSTS) - 20 == pytest.approx(1.64 * (base - 20))
    parts = ("efficientnet_lite0", "efficientnet_lite1")
    fusion = Candidate("fusion", {}, 1.0, parts, 96, fine_tune=False)
    extracted = frozenset((p, 96) for p in parts)
    assert estimate_seconds(fusion, COSTS, extracted) == pytest.approx(20 + 2 + 3 * 2.35)
    deep = Candidate("deep", {}, 1.0, ("efficientnet_lite0",), 160, deep=True)
    scale = (160 / 96) ** 2
    epochs = 4.0 * 0.002 * scale * 10 * (1000 + 1500)  # every epoch on images, and its refit
    assert estimate_seconds(deep, COSTS) == pytest.approx(20 + (24 + 3) * scale + epochs + 15)


def test_the_planner_takes_the_most_gain_per_second_that_fits():
    pool = [
        Candidate("size", {}, 0.6, ("a",), 160),
        Candidate("deep", {}, 1.3, ("a",), 160),
        Candidate("lite1", {}, 0.5, ("b",), 96),
    ]
    estimates = [100.0, 600.0, 50.0]  # 0.006, 0.0022, 0.01 points per second
    assert next_candidate(pool, estimates, 1000.0) == 2
    assert next_candidate(pool[:2], estimates[:2], 1000.0) == 0
    assert next_candidate(pool[1:2], estimates[1:2], 599.0) is None  # never starts what won't fit
    assert next_candidate(pool, estimates, 60.0) == 2
    assert next_candidate(pool, [50.0, 50.0, 50.0], 40.0) is None
    tie = [Candidate("x", {}, 1.0, ("a",), 96), Candidate("y", {}, 1.0, ("a",), 96)]
    assert next_candidate(tie, [10.0, 10.0], 100.0) == 0  # the earlier on a tie
    # estimates that ran short are stretched for the next ones, within [0.5, 3]
    assert correction([]) == 1.0
    assert correction([2.0, 2.0]) == pytest.approx(2.0)
    assert correction([10.0]) == 3.0 and correction([0.1]) == 0.5


def test_default_candidates_are_the_offline_lite_models(monkeypatch):
    resolved = Config("D", backbone="efficientnet_lite0", image_size=96)
    names = [c.name for c in default_candidates(resolved)]
    assert names == [
        "efficientnet_lite0-160",
        "efficientnet_lite0-160-all",
        "efficientnet_lite0-260",
        "efficientnet_lite1-96",
        "efficientnet_lite2-96",
        "efficientnet_lite0+efficientnet_lite1-96",
    ]
    deep = default_candidates(resolved)[1]
    assert deep.deep and deep.changes == {
        "image_size": 160,
        "unfreeze": "all",
        "fine_tune_lr": 1e-4,
    }
    assert default_candidates(Config("D", backbone="tiny_test", image_size=32)) == []
    assert default_candidates(dataclasses.replace(resolved, mode="frozen")) == []
    no_fine_tune = default_candidates(dataclasses.replace(resolved, fine_tune=False))
    assert "efficientnet_lite0-160-all" not in [c.name for c in no_fine_tune]
    monkeypatch.setattr(budget, "get_backbone", lambda name: _NotOffline(name))
    assert default_candidates(resolved) == []  # weights not offline: never tried


class _NotOffline:
    def __init__(self, name):
        self.name = name

    def offline_weights(self):
        return False


def test_deadline_stops_a_running_block():
    started = time.monotonic()
    with pytest.raises(OutOfTime):
        with deadline(0.2):
            time.sleep(5)
    assert time.monotonic() - started < 1.0
    with deadline(5):  # a block that ends in time: the timer is off afterwards
        pass
    time.sleep(0.05)


# ---------------------------------------------------------------------- ensemble evidence


def _confident(labels, answers, n_classes, confidence):
    """Probabilities putting ``confidence`` on each answer, the rest spread evenly."""
    p = np.full((len(labels), n_classes), (1 - confidence) / (n_classes - 1))
    p[np.arange(len(labels)), answers] = confidence
    return p


def test_a_weaker_member_that_looks_better_on_validation_is_no_ensemble():
    """Issue 20's case: on 250 validation images the weaker member has the lower log-loss (so
    the fitted weights favour it), but both make the same mistakes; the ensemble's
    cross-validated gain is within noise: rejected, and the default member is kept alone."""
    rng = np.random.default_rng(3)
    n, k = 250, 10
    labels = rng.integers(0, k, n)
    wrong = rng.random(n) < 0.2  # the same 20% wrong for both
    answers = np.where(wrong, (labels + 1 + rng.integers(0, k - 1, n)) % k, labels)
    stronger = _confident(labels, answers, k, 0.97)  # overconfident: higher log-loss
    weaker = _confident(labels, answers, k, 0.8)
    flip = rng.choice(np.flatnonzero(~wrong), 3, replace=False)  # weaker: 3 more errors
    weaker[flip] = _confident(labels[flip], (labels[flip] + 1) % k, k, 0.55)
    assert budget.fit_weights([stronger, weaker], labels)[1] > 0.5  # it looks better
    evidence = ensemble_evidence([stronger, weaker], labels)
    assert not evidence["keep"]
    assert evidence["mean_gain"] <= evidence["se"]
    assert evidence["folds"] == 5 and len(evidence["fold_gains"]) == 5
    assert best_member([stronger, weaker], labels)["index"] == 0


def test_complementary_members_make_an_ensemble_that_is_kept():
    """Two members wrong on different images, each unsure where it is wrong: their mean is
    right far more often than either, beyond noise."""
    rng = np.random.default_rng(4)
    n, k = 250, 10
    labels = rng.integers(0, k, n)
    which = rng.integers(0, 3, n)  # 0: a is wrong, 1: b is wrong, 2: neither
    members = []
    for member in (0, 1):
        p = _confident(labels, labels, k, 0.7)
        bad = which == member
        p[bad] = _confident(labels[bad], (labels[bad] + 1) % k, k, 0.4)
        members.append(p)
    evidence = ensemble_evidence(members, labels)
    assert evidence["keep"]
    assert evidence["mean_gain"] > 0.2 and evidence["mean_gain"] > evidence["se"]


def test_the_best_member_must_beat_the_default_beyond_noise():
    rng = np.random.default_rng(5)
    n, k = 400, 4
    labels = rng.integers(0, k, n)

    def member(accuracy, seed):
        right = np.random.default_rng(seed).random(n) < accuracy
        return _confident(labels, np.where(right, labels, (labels + 1) % k), k, 0.9)

    default, same, better = member(0.80, 1), member(0.81, 2), member(0.95, 3)
    chosen = best_member([default, same, better], labels)
    assert chosen["index"] == 2
    assert best_member([default, same], labels)["index"] == 0  # +1 point on 400: noise
    assert chosen["gain"][2] > chosen["se"][2] > 0


# --------------------------------------------------------------- a tiny budget, end to end


@pytest.fixture(scope="module")
def tiny_member(image_folder_factory, tmp_path_factory):
    """One real tiny run as the budget's members are trained: refit, with the choosing
    phase's validation probabilities."""
    data = image_folder_factory(classes=("red", "blue", "green"), per_class=12, size=(32, 32))
    out = tmp_path_factory.mktemp("budget") / "member"
    config = Config(
        data=str(data),
        out=str(out),
        backbone="tiny_test",
        weights="none",
        image_size=32,
        epochs=2,
        fine_tune=False,  # the chosen model's outputs from cached features (a refit run)
        batch_size=8,
        augment="none",
        feature_norm="none",
        check=False,
        quiet=True,
        validation_probabilities=True,
    )
    return train(config)


@pytest.mark.slow
def test_members_record_the_choosing_phases_validation_probabilities(tiny_member):
    """Out of sample although the run was refit: the accuracy of the saved probabilities is
    the chosen epoch's validation accuracy, not the refit model's on images it trained on."""
    metrics = tiny_member.metrics
    assert metrics["refit"] is True
    probabilities, labels = read_validation_probabilities(tiny_member.run_dir)
    split = runs.read_json(tiny_member.run_dir / runs.SPLIT_FILE)
    assert len(labels) == len(split["val"]) and probabilities.shape == (len(labels), 3)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    accuracy = np.mean(np.argmax(probabilities, axis=1) == labels)
    assert accuracy == pytest.approx(metrics["validation_choosing_phase"]["val_accuracy"], abs=1e-6)
    assert not (tiny_member.run_dir / "chosen_model.keras").exists()  # removed at the end


# what the default member's metrics.json says its phases took (the estimates' basis)
MEASURED = {
    "phase_seconds": {"decode check": 0.3, "stage 1": 0.5, "extraction clean": 0.4, "test": 0.1},
    "extraction_passes": [{"split": "train", "images": 40, "computed": 40}],
}


def _fake_trainer(tiny_member, sleeps, probabilities):
    """Each member a copy of ``tiny_member`` after ``sleeps[name]`` seconds (a stand-in for
    its training), with ``probabilities[name]`` as its validation probabilities and `MEASURED`
    as its phases."""
    calls = []

    def trainer(config, started=None):
        name = Path(config.out).name
        calls.append(config)
        time.sleep(sleeps.get(name, 0.0))
        shutil.copytree(tiny_member.run_dir, config.out)
        labels = read_validation_probabilities(tiny_member.run_dir)[1]
        write_validation_probabilities(Path(config.out), probabilities[name], labels)
        metrics = {**runs.read_json(Path(config.out) / runs.METRICS_FILE), **MEASURED}
        return TrainResult(Path(config.out), metrics, Config.load(Path(config.out) / "config.json"))

    return trainer, calls


@pytest.mark.slow
def test_the_budget_stops_in_time_and_ends_in_one_normal_run_folder(
    tiny_member, tmp_path, monkeypatch
):
    """A 9-second budget: the default model, a candidate that fits, and one whose estimate
    was far too short, stopped at the deadline; the two complementary members make an
    ensemble (kept on evidence), one run folder that evaluate reads; all within 10%."""
    # tiny models: the end is quick, but building and saving the ensemble took at least 3.6 s on a
    # clean-clone CI run (once in four, 2026-12-01), more than the 2.4 s first reserved here
    monkeypatch.setattr(budget, "FINISH_SECONDS", 4.0)
    monkeypatch.setattr(budget, "FINISH_SECONDS_PER_MEMBER", 0.2)
    labels = read_validation_probabilities(tiny_member.run_dir)[1]
    n = len(labels)
    half = np.arange(n) % 2 == 0  # each member sure on its half, unsure on the other
    sure, unsure = _confident(labels, labels, 3, 0.9), _confident(labels, (labels + 1) % 3, 3, 0.4)
    probabilities = {
        "default": np.where(half[:, None], sure, unsure),
        "good": np.where(half[:, None], unsure, sure),
    }
    probabilities["hang"] = probabilities["default"]
    trainer, calls = _fake_trainer(tiny_member, {"good": 0.5, "hang": 60.0}, probabilities)
    pool = [
        Candidate("good", {"image_size": 32}, 1.0, ("tiny_test",), 32),
        Candidate("hang", {"dropout": 0.3}, 0.5, ("tiny_test",), 32),
        Candidate("huge", {}, 5.0, ("tiny_test",), 3200),  # never fits: not started
    ]
    limit = 9.0
    config = Config(
        data=tiny_member.config.data,
        out=str(tmp_path / "run"),
        backbone="tiny_test",
        weights="none",
        time_limit=limit / 60,
        quiet=True,
    )
    started = time.monotonic()
    result = train_with_budget(config, candidates=lambda c: pool, trainer=trainer)
    spent = time.monotonic() - started
    assert spent <= 1.1 * limit
    record = result.metrics["budget"]
    rows = {row["name"]: row for row in record["candidates"]}
    assert [Path(c.out).name for c in calls] == ["default", "good", "hang"]
    assert rows["good"]["status"] == "trained" and rows["good"]["estimate_seconds"] > 0
    assert rows["hang"]["status"] == "stopped at the deadline"
    assert rows["hang"]["seconds"] < 60 and not (result.run_dir / "members" / "hang").exists()
    assert rows["huge"]["status"] == "not started"
    # the candidates took the default run's split and choices
    good = calls[1]
    assert good.split_from == str(result.run_dir / "members" / "default")
    assert (good.augment, good.check, good.validation_probabilities) == ("none", False, True)
    assert good.time_limit is None and good.quality == "fast"
    # the ensemble of the complementary pair, kept on cross-validated evidence
    assert record["ensemble_evidence"]["keep"] and record["kept"] == ["default", "good"]
    assert record["seconds"] <= 1.1 * limit
    saved = runs.read_json(result.run_dir / runs.CONFIG_FILE)
    assert saved["backbone"] == "ensemble" and saved["out"] == str(result.run_dir)
    assert result.metrics["n_test"] == tiny_member.metrics["n_test"]
    assert result.metrics["accuracy"] == pytest.approx(tiny_member.metrics["accuracy"], abs=1e-3)
    scored = evaluate(result.run_dir, tiny_member.config.data)  # a normal run folder
    assert scored["accuracy"] == pytest.approx(result.metrics["accuracy"], abs=1e-3)

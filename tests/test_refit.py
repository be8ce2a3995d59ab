"""The refit (the default): after every choice is made on validation, the final model trains on
the training and validation images for the chosen epochs; ``--no-refit`` is the choosing phase
alone, as runs were before."""

from __future__ import annotations

import csv
import json
import os
from contextlib import contextmanager

import keras
import numpy as np
import pytest
from PIL import Image

from headstart import Config, UsageError, train
from headstart.calibrate import calibrate
from headstart.cli import _config_of, build_parser
from headstart.ensemble import ensemble
from headstart.model import temperature_of
from headstart.runs import was_refit
from headstart.splits import run_split
from headstart.training.phases import PhaseClock
from headstart.training.refit import CHOSEN_MODEL_FILE
from headstart.training.session import Session
from headstart.training.views import JoinedRows

# A weak stage 1 (one epoch at a tiny rate) that fine-tuning beats, so the refit has both
# stages; flip on one cached view, so the refit extracts the validation images' flipped view.
CONFIG = dict(
    backbone="tiny_test",  # tests/conftest.py
    weights="none",
    image_size=32,
    epochs=1,
    lr=1e-5,
    fine_tune_epochs=4,
    fine_tune_lr=1e-3,
    batch_size=8,
    augment="flip",
    views=1,
    feature_norm="l2",
    val_split=0.3,
    check=False,
    calibrate=True,
    quiet=True,
)


@contextmanager
def _recorded(events: list):
    """Record every image file PIL opens, with the phases open at that moment
    (`headstart.training.phases`), and each phase's end."""
    stack: list[str] = []
    phase, open_image = PhaseClock.phase, Image.open

    @contextmanager
    def recording_phase(clock, name):
        stack.append(name)
        try:
            with phase(clock, name):
                yield
        finally:
            stack.pop()
            events.append(("end", name))

    def recording_open(path, *args, **kwargs):
        events.append(("read", os.path.realpath(path), tuple(stack)))
        return open_image(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PhaseClock, "phase", recording_phase)
        patch.setattr(Image, "open", recording_open)
        yield


@contextmanager
def _traced(traces: list):
    """Record the name of the model each time its train step is traced (Python runs it only
    then: the compiled step runs without it)."""
    train_step = keras.Model.train_step

    def tracing(model, data):
        traces.append(model.name)
        return train_step(model, data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keras.Model, "train_step", tracing)
        yield


@pytest.fixture(scope="module")
def runs(mirrored_classes, tmp_path_factory):
    """The same run refit (the default, every image file it opens recorded), --no-refit, and
    refit with the refit model made to fail its check (`headstart.training.refit.refit`)."""
    root = tmp_path_factory.mktemp("refit")
    common = dict(data=str(mirrored_classes), cache_dir=str(root / "cache"), **CONFIG)
    events: list = []
    traces = {"refit": [], "chosen": []}
    with _recorded(events), _traced(traces["refit"]):
        refit = train(Config(out=str(root / "refit"), **common))
    with _traced(traces["chosen"]):
        chosen = train(Config(out=str(root / "chosen"), refit=False, report=False, **common))
    refit.traces, chosen.traces = traces["refit"], traces["chosen"]
    with pytest.MonkeyPatch.context() as patch:  # right on half its images: chance, 2 classes
        patch.setattr(Session, "evaluate", lambda *_: {"loss": 0.7, "accuracy": 0.5})
        rejected = train(Config(out=str(root / "rejected"), report=False, **common))
    return refit, chosen, events, rejected


def _history(run) -> list[dict]:
    rows = csv.DictReader((run.run_dir / "history.csv").open())
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in rows]


@pytest.mark.slow  # three training runs
def test_the_refit_trains_both_stages_again_on_train_and_validation_for_the_chosen_epochs(runs):
    refit, chosen, *_ = runs
    metrics, folder = refit.metrics, run_split(refit.run_dir, refit.config.data)
    assert metrics["refit"] is True and chosen.metrics["refit"] is False
    assert json.loads((refit.run_dir / "config.json").read_text())["refit"] is True
    assert metrics["fine_tune_kept"] is True  # so the refit has a stage 2
    # the choosing phase is the --no-refit run, epoch for epoch; its validation figures are
    # reported as such, and are the --no-refit run's saved model's
    rows, chosen_rows = _history(refit), _history(chosen)
    assert rows[: len(chosen_rows)] == chosen_rows
    assert metrics["validation_choosing_phase"] == chosen.metrics["saved_from"]
    assert "saved_from" not in metrics
    # then each stage again, up to the epoch chosen on validation, at that epoch's rate
    saved = chosen.metrics["saved_from"]
    head = [row for row in chosen_rows if row["stage"] == "head"]
    epochs = {"head": len(head), "fine_tune": saved["epoch"]}  # stage 1 replays to its best
    assert metrics["refit_epochs"] == epochs
    assert metrics["refit_images"] == len(folder.train) + len(folder.val)
    refit_rows = rows[len(chosen_rows) :]
    assert [row["stage"] for row in refit_rows] == (
        ["refit_head"] * epochs["head"] + ["refit_fine_tune"] * epochs["fine_tune"]
    )
    assert all(row["val_loss"] == "" and row["loss"] for row in refit_rows)  # no validation
    for stage in ("head", "fine_tune"):
        rates = [row["learning_rate"] for row in chosen_rows if row["stage"] == stage]
        again = [row["learning_rate"] for row in refit_rows if row["stage"] == f"refit_{stage}"]
        assert again == rates[: epochs[stage]]
    # the validation images' flipped view was extracted for the refit (and only for it)
    passes = [(p["split"], p["view"]) for p in metrics["extraction_passes"]]
    assert ("val", "flip#1") in passes and ("val", "flip#1") not in [
        (p["split"], p["view"]) for p in chosen.metrics["extraction_passes"]
    ]
    assert list(metrics["phase_seconds"])[-5:] == ["stage 2", "refit", "test", "report", "other"]
    # a new model: other weights than the chosen one, scored on the same test images
    models = [keras.saving.load_model(r.run_dir / "model.keras") for r in (refit, chosen)]
    assert any(
        not np.allclose(a, b) for a, b in zip(*(m.get_weights() for m in models), strict=True)
    )
    assert metrics["n_test"] == chosen.metrics["n_test"] == len(folder.test)
    assert metrics["refit_accuracy_on_its_images"] > 0.5  # its check: better than chance
    # the refit puts the chosen model's variables back as built (`Session.restart`) and
    # trains the same trainers: their compiled steps are kept, each traced once in the run
    # (an optimizer built in the trace would have it traced twice)
    assert sorted(refit.traces) == sorted(chosen.traces) == sorted(set(chosen.traces))


@pytest.mark.slow  # three training runs
def test_a_refit_model_no_better_than_chance_on_its_own_images_is_not_kept(runs):
    """model.keras stays the chosen model: the --no-refit run's, weight for weight."""
    refit, chosen, _, rejected = runs
    metrics = rejected.metrics
    assert metrics["refit"] is False and metrics["saved_from"] == chosen.metrics["saved_from"]
    assert metrics["refit_rejected"]["refit_accuracy_on_its_images"] == 0.5
    assert metrics["refit_rejected"]["refit_epochs"] == refit.metrics["refit_epochs"]
    models = [keras.saving.load_model(r.run_dir / "model.keras") for r in (rejected, chosen)]
    for a, b in zip(*(m.get_weights() for m in models), strict=True):
        np.testing.assert_array_equal(a, b)
    assert metrics["accuracy"] == chosen.metrics["accuracy"]
    assert metrics["calibration"] == chosen.metrics["calibration"]  # T on the chosen model
    assert not was_refit(rejected.run_dir)  # calibrate and ensembles take it


@pytest.mark.slow  # three training runs
def test_the_test_split_is_read_only_after_the_refit(runs):
    """Apart from the decode check at the start (every image decoded once), no test image is
    opened before the refit's model is saved: not by the choices, the stages or the refit."""
    refit, _, events, _ = runs
    test = {os.path.realpath(p) for p in run_split(refit.run_dir, refit.config.data).test.paths}
    refit_end = events.index(("end", "refit"))
    test_reads = [
        (i, event[2]) for i, event in enumerate(events) if event[0] == "read" and event[1] in test
    ]
    early = [phases for i, phases in test_reads if i < refit_end]
    assert early and all(phases == ("decode check",) for phases in early)
    late = [phases for i, phases in test_reads if i > refit_end]
    assert ("test", "extraction clean") in late  # the test pass, through the feature cache
    assert {phases[0] for phases in late} == {"test", "report"}


@pytest.mark.slow  # three training runs
def test_calibrate_fits_t_on_the_chosen_model_and_puts_it_on_the_refit_model(runs):
    refit, chosen, *_ = runs
    record, chosen_record = refit.metrics["calibration"], chosen.metrics["calibration"]
    # the same model (the choosing phase's) and validation images: the same T
    assert record["temperature"] == chosen_record["temperature"]
    assert record["val_nll_after"] == chosen_record["val_nll_after"]
    assert "choosing phase's model" in record["method"]
    model = keras.saving.load_model(refit.run_dir / "model.keras")
    assert temperature_of(model) == pytest.approx(record["temperature"], rel=1e-5)
    assert not (refit.run_dir / CHOSEN_MODEL_FILE).exists()  # kept only until the test pass
    # after the run, validation is training data: fitting T or weights on it is refused
    with pytest.raises(UsageError, match="refit on the training and validation images"):
        calibrate(refit.run_dir)
    with pytest.raises(UsageError, match="--no-refit"):
        ensemble([chosen.run_dir, refit.run_dir], weights="fit")


def test_joined_rows_read_each_split_s_rows_in_order():
    train_rows, val_rows = np.arange(12.0).reshape(6, 2), -np.arange(8.0).reshape(4, 2)
    joined = JoinedRows([train_rows, val_rows])
    assert len(joined) == 10 and joined.shape == (10, 2)
    np.testing.assert_array_equal(joined[np.arange(10)], np.concatenate([train_rows, val_rows]))
    np.testing.assert_array_equal(
        joined[[9, 0, 6, 5]], [val_rows[3], train_rows[0], val_rows[0], train_rows[5]]
    )


def test_the_refit_is_the_default_and_no_refit_turns_it_off():
    parser = build_parser()
    assert Config(data="D").refit is True
    assert _config_of(parser.parse_args(["train", "D"])).refit is True
    assert _config_of(parser.parse_args(["train", "D", "--no-refit"])).refit is False

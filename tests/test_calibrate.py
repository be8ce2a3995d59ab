"""Temperature scaling: fitted on validation, saved inside model.keras, argmax unchanged."""

from __future__ import annotations

import csv
import json
import shutil

import keras
import numpy as np
import pytest

from headstart import Config, train
from headstart.calibrate import (
    choose_temperature,
    fit_temperature,
    logits_model,
    nll,
    with_temperature,
)
from headstart.cli import main
from headstart.metrics import calibration, probabilities_from_logits
from headstart.model import TEMPERATURE_NAME, temperature_of


def _overconfident(n=4000, classes=4, scale=5.0, seed=0):
    """Features, labels drawn from softmax(true logits), and a Keras model whose logits are
    ``scale`` times the true ones: right as often as it can be, far too sure of itself."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 6)).astype("float32")
    kernel = rng.normal(size=(6, classes)).astype("float32")
    true_logits = features @ kernel
    p = probabilities_from_logits(true_logits)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    inputs = keras.Input((6,))
    logits = keras.layers.Dense(classes, name="logits")(inputs)
    model = keras.Model(inputs, logits)
    model.get_layer("logits").set_weights([scale * kernel, np.zeros(classes, "float32")])
    return model, features, labels


def test_temperature_scaling_lowers_ece_on_an_overconfident_model_and_keeps_argmax(tmp_path):
    model, features, labels = _overconfident()
    logits = model.predict(features, verbose=0)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(5.0, rel=0.1)  # it undoes the x5
    assert nll(logits, labels, temperature) < nll(logits, labels)
    calibrated = with_temperature(model, temperature)
    scaled = calibrated.predict(features, verbose=0)
    np.testing.assert_allclose(scaled, logits / temperature, rtol=1e-5, atol=1e-5)
    before = calibration(labels, probabilities_from_logits(logits))["ece"]
    after = calibration(labels, probabilities_from_logits(scaled))["ece"]
    assert before > 0.15 and after < 0.03
    np.testing.assert_array_equal(scaled.argmax(axis=1), logits.argmax(axis=1))
    # saved and loaded by plain Keras, no custom objects: the same calibrated outputs
    calibrated.save(tmp_path / "calibrated.keras")
    loaded = keras.saving.load_model(tmp_path / "calibrated.keras")
    np.testing.assert_allclose(loaded.predict(features, verbose=0), scaled, rtol=1e-6)
    assert temperature_of(loaded) == pytest.approx(temperature, rel=1e-6)


def test_a_new_temperature_replaces_the_old_one():
    model, features, _ = _overconfident(n=50)
    twice = with_temperature(with_temperature(model, 3.0), 2.0)
    names = [layer.name for layer in twice.layers]
    assert names.count(TEMPERATURE_NAME) == 1 and temperature_of(twice) == pytest.approx(2.0)
    np.testing.assert_allclose(
        twice.predict(features, verbose=0),
        logits_model(twice).predict(features, verbose=0) / 2.0,
        rtol=1e-5,
    )
    assert temperature_of(model) == 1.0 and logits_model(model) is model


def test_a_perfect_validation_split_keeps_t_at_one():
    model, features, labels = _overconfident(n=200)
    logits = model.predict(features, verbose=0)
    perfect = logits.argmax(axis=1)
    assert fit_temperature(logits, perfect) < 0.1  # NLL alone would only sharpen
    assert choose_temperature(logits, perfect) == 1.0
    assert choose_temperature(logits, labels) == fit_temperature(logits, labels) > 1


@pytest.fixture()
def mislabelled_run(tiny_run, tmp_path):
    """A copy of tiny_run whose logits are x5 and whose split.json gives 3 of the 8 validation
    images the other class: a sure model that is wrong on validation."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    model = keras.saving.load_model(run / "model.keras")
    dense = model.get_layer("classifier").get_layer("logits")
    dense.set_weights([5 * w for w in dense.get_weights()])
    model.save(run / "model.keras")
    split = json.loads((run / "split.json").read_text())
    names = split["class_names"]
    for entry in split["val"][:3]:
        entry[1] = names[1 - names.index(entry[1])]
    (run / "split.json").write_text(json.dumps(split))
    return run


@pytest.mark.slow  # a full training run
def test_calibrate_a_run_keeps_its_answers_and_records_t(mislabelled_run, capsys):
    run = mislabelled_run
    before = json.loads((run / "metrics.json").read_text())
    answers = _predicted(run)
    assert main(["--quiet", "calibrate", str(run)]) == 0
    assert "temperature scaling: T = " in capsys.readouterr().out
    after = json.loads((run / "metrics.json").read_text())
    record = after["calibration"]
    assert record["temperature"] > 1 and record["val_errors"] >= 3
    assert record["val_nll_after"] < record["val_nll_before"]  # (ECE on 8 images is noise)
    assert after["accuracy"] == before["accuracy"] and _predicted(run) == answers
    assert after["train_seconds"] == before["train_seconds"]  # the rest of metrics.json stays
    assert json.loads((run / "config.json").read_text())["calibrate"] is True
    model = keras.saving.load_model(run / "model.keras")  # plain Keras
    assert temperature_of(model) == pytest.approx(record["temperature"], rel=1e-5)
    page = (run / "report.html").read_text()
    assert f"T = {record['temperature']:.3f}" in page  # the report was redrawn
    # the test metrics are those of the calibrated model
    assert after["loss"] != pytest.approx(before["loss"])


@pytest.mark.slow  # a full training run
def test_train_with_calibrate_matches_the_uncalibrated_run_answer_for_answer(
    tiny_run, tiny_folder, tmp_path
):
    """The tiny_run recipe again, with --calibrate: the same model, the same test answers."""
    config = Config(
        data=str(tiny_folder),
        out=str(tmp_path / "calibrated"),
        backbone="scratch_cnn",
        image_size=32,
        head="flatten",
        epochs=2,
        batch_size=8,
        augment="none",
        refit=False,  # as tiny_run
        quiet=True,
        calibrate=True,
    )
    result = train(config)
    plain = json.loads((tiny_run / "metrics.json").read_text())
    assert result.metrics["accuracy"] == plain["accuracy"]
    assert _predicted(result.run_dir) == _predicted(tiny_run)
    record = result.metrics["calibration"]
    assert record["n_val"] == 8 and "temperature" in record
    assert json.loads((result.run_dir / "config.json").read_text())["calibrate"] is True


def _predicted(run):
    with open(run / "predictions.csv", newline="") as handle:
        return [(row["path"], row["predicted"]) for row in csv.DictReader(handle)]


@pytest.mark.slow  # a full training run
def test_grad_cam_reports_the_calibrated_probabilities(tiny_run):
    from headstart.explain import gradcam

    model = with_temperature(keras.saving.load_model(tiny_run / "model.keras"), 3.0)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    expected = probabilities_from_logits(model.predict(images, verbose=0))
    np.testing.assert_allclose(gradcam(model, images).probabilities, expected, atol=1e-5)

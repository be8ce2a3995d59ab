"""The saved model's contract (README, docs/predict.md): RGB 0-255 in, logits out, labels.json
for the names; the two documented lines give headstart's probabilities in an interpreter that
never imports headstart; an ensemble needs ``import headstart.layers`` to load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from headstart import Config

ROOT = Path(__file__).resolve().parents[1]
# the documented lines, exactly (test_the_documented_lines_are_in_the_docs keeps them so)
TWO_LINES = (
    'logits = keras.saving.load_model("runs/flowers/model.keras").predict(images)\n'
    "probabilities = keras.ops.softmax(logits) if logits.shape[1] > 1 "
    "else keras.ops.sigmoid(logits)\n"
)

# Run in a fresh interpreter: argv[1] is {name: [run folder, images .npy]}, argv[2] the ensemble.
PLAIN_KERAS = """
import json, sys
import keras
import numpy as np

out = {}
for name, (run, images_file) in json.loads(sys.argv[1]).items():
    images = np.load(images_file)
    exec(TWO_LINES.replace("runs/flowers", run))
    labels = json.load(open(run + "/labels.json"))
    out[name] = {"probabilities": np.asarray(probabilities).tolist(), "labels": labels}
out["headstart_loaded"] = [m for m in sys.modules if m.split(".")[0] == "headstart"]
attempts = {}
for step in ("plain", "import headstart", "import headstart.layers"):
    if step != "plain":
        exec(step)
    try:
        model = keras.saving.load_model(sys.argv[2] + "/model.keras")
        attempts[step] = "loaded, output " + str(model.output_shape)
    except Exception as error:
        attempts[step] = str(error)
out["ensemble"] = attempts
print(json.dumps(out))
"""


def test_the_documented_lines_are_in_the_docs():
    for doc in ("README.md", "docs/predict.md"):
        assert TWO_LINES in (ROOT / doc).read_text(encoding="utf-8"), doc


@pytest.fixture(scope="module")
def three_class_run(image_folder_factory, tmp_path_factory):
    """A calibrated three-class tiny_test run, head only (the cheapest complete run)."""
    from headstart import train

    folder = image_folder_factory(classes=("ant", "bee", "cow"), per_class=8, size=(32, 32))
    config = Config(
        data=str(folder),
        out=str(tmp_path_factory.mktemp("contract") / "three"),
        backbone="tiny_test",
        weights="none",
        image_size=32,
        epochs=2,
        batch_size=8,
        fine_tune=False,
        augment="none",
        feature_norm="none",
        check=False,
        runtime="keras",
        calibrate=True,
        quiet=True,
    )
    return train(config).run_dir


@pytest.mark.slow
def test_plain_keras_gives_headstarts_probabilities_and_an_ensemble_needs_its_layer(
    tiny_run, three_class_run, tmp_path
):
    import headstart
    from headstart.data import read_image
    from headstart.ensemble import ensemble

    ensembled = ensemble([three_class_run, three_class_run], str(tmp_path / "ensemble"))
    cases, expected = {}, {}
    for name, run in (("two", tiny_run), ("three", three_class_run)):
        config = Config.load(run / "config.json")
        paths = sorted(str(p) for p in Path(config.data).rglob("*.png"))[:6]
        size = (config.image_size, config.image_size)
        images = np.stack([read_image(path, size) for path in paths]).astype("float32")
        np.save(tmp_path / f"{name}.npy", images)
        cases[name] = [str(run), str(tmp_path / f"{name}.npy")]
        labels = json.loads((run / "labels.json").read_text())
        predictions = headstart.predict(str(run), paths, top_k=len(labels))
        expected[name] = np.array([[dict(p.top)[label] for label in labels] for p in predictions])
    code = f"TWO_LINES = {TWO_LINES!r}\n{PLAIN_KERAS}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # no test site: it imports headstart
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cases), str(ensembled.run_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["headstart_loaded"] == []  # the two lines ran without headstart

    two = np.array(out["two"]["probabilities"])
    assert two.shape == (6, 1)  # two classes: one sigmoid logit, the second class's probability
    np.testing.assert_allclose(two[:, 0], expected["two"][:, 1], atol=1e-5)
    three = np.array(out["three"]["probabilities"])
    assert three.shape == (6, 3)
    np.testing.assert_allclose(three, expected["three"], atol=1e-5)
    assert out["three"]["labels"] == ["ant", "bee", "cow"]
    model_config = json.loads((three_class_run / "config.json").read_text())
    assert model_config["calibrate"] is True  # the calibrated model loaded in plain Keras

    attempts = out["ensemble"]
    assert "Could not locate class 'ProbabilityAverage'" in attempts["plain"]
    assert "Could not locate class 'ProbabilityAverage'" in attempts["import headstart"]
    assert attempts["import headstart.layers"] == "loaded, output (None, 3)"

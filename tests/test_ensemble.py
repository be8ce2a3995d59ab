"""`headstart ensemble`: weights fitted on validation only, the weighted mean exactly, one
saved model over members of different sizes that evaluate and predict use like any run."""

import csv
import json
import logging

import keras
import numpy as np
import pytest

from headstart import Config, runs, train
from headstart.cli import main
from headstart.ensemble import build_ensemble, ensemble, fit_weights
from headstart.errors import UsageError
from headstart.metrics import probabilities_from_logits
from headstart.splits import load_split_manifest

pytestmark = pytest.mark.slow  # end-to-end training runs of several seconds each


@pytest.fixture(scope="module")
def three_class_folder(image_folder_factory):
    return image_folder_factory(classes=("red", "blue", "green"), per_class=10, size=(36, 36))


@pytest.fixture(scope="module")
def members(three_class_folder, tmp_path_factory):
    """Two scratch runs on one split, at 32 and 40 px."""
    root = tmp_path_factory.mktemp("members")
    common = dict(
        data=str(three_class_folder),
        backbone="scratch_cnn",
        epochs=2,
        batch_size=8,
        augment="none",
        check=False,
        refit=False,  # weights fitted on validation need members that never trained on it
        quiet=True,
    )
    first = train(Config(out=str(root / "a32"), image_size=32, **common)).run_dir
    second = Config(out=str(root / "b40"), image_size=40, split_from=str(first), **common)
    return [first, train(second).run_dir]


def test_fit_weights_follow_validation_only():
    """A member that is right on validation gets the weight; weights are a point of the simplex."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    good = np.full((200, 3), 0.1)
    good[np.arange(200), labels] = 0.8
    noise = rng.dirichlet(np.ones(3), 200)
    weights = fit_weights([noise, good, noise[::-1]], labels)
    assert min(weights) >= 0
    assert sum(weights) == pytest.approx(1.0, abs=1e-9)
    assert weights[1] > 0.9
    # two members that are each right on half the images: the mix beats either alone
    half = np.where((np.arange(200) % 2 == 0)[:, None], good, 1 / 3)
    other = np.where((np.arange(200) % 2 == 1)[:, None], good, 1 / 3)
    assert fit_weights([half, other], labels) == pytest.approx([0.5, 0.5], abs=1e-3)


def test_fitting_never_reads_the_test_split(members, tmp_path, monkeypatch):
    """Every member prediction made while fitting is on validation images; the only pass over
    the test split is the finished ensemble's, after the weights are fixed."""
    import headstart.ensemble as module

    calls = []
    real = module.predict_split

    def recording(model, split, batch_size=32):
        calls.append((model.name, tuple(split.paths)))
        return real(model, split, batch_size)

    monkeypatch.setattr(module, "predict_split", recording)
    result = ensemble(members, str(tmp_path / "ens"), weights="fit")
    folder = load_split_manifest(members[0] / runs.SPLIT_FILE)
    assert [paths for _, paths in calls] == [folder.val.paths] * 2 + [folder.test.paths]
    assert [name for name, _ in calls][-1] == "headstart_ensemble"
    weights = result.weights
    assert min(weights) >= 0 and sum(weights) == pytest.approx(1.0, abs=1e-6)
    config = json.loads((result.run_dir / runs.CONFIG_FILE).read_text())
    assert config["ensemble"]["weights"] == weights
    assert config["ensemble"]["weights_from"] == "fit"
    assert config["ensemble"]["val_loss"] <= min(config["ensemble"]["member_val_loss"]) + 1e-4


def test_saved_ensemble_is_the_weighted_mean_at_mixed_sizes(members, tmp_path):
    """The reloaded model.keras gives the weighted mean of the members' probabilities (each
    member on the input resized to its own size), to 1e-5."""
    weights = [0.7, 0.3]
    result = ensemble(members, str(tmp_path / "ens"), weights="7,3")
    assert result.weights == pytest.approx(weights)
    loaded = runs.load_model(result.run_dir, 3)
    assert loaded.input_shape == (None, 40, 40, 3)
    images = np.random.default_rng(1).uniform(0, 255, (5, 40, 40, 3)).astype("float32")
    expected = 0
    for weight, run in zip(weights, members, strict=True):
        member = runs.load_model(run, 3)
        size = member.input_shape[1]
        x = images if size == 40 else keras.layers.Resizing(size, size)(images)
        expected = expected + weight * probabilities_from_logits(np.asarray(member(x)))
    got = probabilities_from_logits(np.asarray(loaded.predict(images, verbose=0)))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_binary_members_average_their_sigmoids(tiny_run):
    """Two classes: one logit per member in, the logit of the mean probability out."""
    member = runs.load_model(tiny_run, 2)
    model = build_ensemble([member, member], [0.25, 0.75])
    images = np.random.default_rng(2).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    assert model.output_shape == (None, 1)
    np.testing.assert_allclose(
        probabilities_from_logits(np.asarray(model(images))),
        probabilities_from_logits(np.asarray(member(images))),
        atol=1e-5,
    )
    # traced as export traces it, the members' dropout is not in the graph (ONNX has no op for it)
    import tensorflow as tf

    spec = tf.TensorSpec((None, 32, 32, 3), tf.float32)
    graph = tf.function(lambda x: model(x)).get_concrete_function(spec).graph
    assert not [op.type for op in graph.get_operations() if "Random" in op.type]


def test_cli_ensemble_then_evaluate_and_predict(
    members, three_class_folder, tmp_path, capsys, caplog
):
    out = tmp_path / "ens"
    assert main(["ensemble", *map(str, members), "--out", str(out), "--quiet"]) == 0
    assert "weights: 0.500, 0.500" in capsys.readouterr().out
    # an ensemble has no single feature map: its report says so, and nothing is warned
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    page = (out / "report.html").read_text()
    assert "an ensemble (several models averaged) has no single feature map" in page
    metrics = json.loads((out / runs.METRICS_FILE).read_text())

    def tested(run):  # the same test files as the members', so `compare` pairs them
        return [row["path"] for row in csv.DictReader((run / "predictions.csv").open())]

    assert tested(out) == tested(members[0]) and len(tested(out)) == metrics["n_test"]
    for name in ("config.json", "labels.json", "split.json", "model.keras", "report.html"):
        assert (out / name).is_file(), name
    assert main(["evaluate", str(out), str(three_class_folder), "--quiet"]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["accuracy"] == pytest.approx(metrics["accuracy"])
    capsys.readouterr()
    image = next(three_class_folder.glob("red/*.png"))
    assert main(["predict", str(out), str(image), "--format", "json", "--quiet"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["top"][0]["label"] in ("red", "blue", "green")


def test_members_must_share_labels_and_split(members, tiny_run, tmp_path):
    with pytest.raises(UsageError, match="labels.json differs"):
        ensemble([members[0], tiny_run], str(tmp_path / "a"))
    with pytest.raises(UsageError, match="2 numbers for 3 runs"):
        ensemble([*members, members[0]], str(tmp_path / "b"), weights="1,2")
    with pytest.raises(UsageError, match="at least two"):
        ensemble(members[:1], str(tmp_path / "c"))
    assert not (tmp_path / "a").exists()

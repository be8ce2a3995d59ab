"""--class-weight: balanced weights as scikit-learn defines them, applied in every fit."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from headstart import Config, train
from headstart.errors import UsageError
from headstart.extract import ViewSampler
from headstart.imbalance import (
    IMBALANCE_THRESHOLD,
    balanced_weights,
    class_weights,
    resolve_class_weight,
)
from headstart.metrics import probabilities_from_logits
from headstart.model import build_head, compile_for


def test_balanced_weights_are_n_over_classes_times_count_and_average_one():
    counts = [30, 10, 5]
    weights = balanced_weights(counts)
    assert weights == pytest.approx({0: 45 / 90, 1: 45 / 30, 2: 45 / 15})
    per_sample = np.repeat([weights[i] for i in range(3)], counts)
    assert per_sample.mean() == pytest.approx(1.0)  # the loss keeps its scale
    assert balanced_weights([4, 0])[1] == 1.0  # an absent class: never used, no division by 0


def test_auto_is_balanced_above_the_threshold_and_none_at_or_below_it():
    assert IMBALANCE_THRESHOLD == 1.5
    assert resolve_class_weight("auto", [15, 10]) == "none"  # ratio 1.5: not above
    assert resolve_class_weight("auto", [16, 10]) == "balanced"
    assert resolve_class_weight("auto", [10, 10, 10]) == "none"
    assert resolve_class_weight("auto", [10, 0]) == "balanced"  # a class missing from train
    assert resolve_class_weight("balanced", [10, 10]) == "balanced"
    assert resolve_class_weight("none", [100, 1]) == "none"
    assert class_weights("none", [100, 1]) is None
    assert class_weights("auto", [20, 10]) == pytest.approx({0: 0.75, 1: 1.5})
    with pytest.raises(UsageError, match="--class-weight"):
        resolve_class_weight("inverse", [1, 2])


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("data_type", ["view_sampler", "tf_data"])
def test_the_loss_keras_reports_is_the_weighted_mean_stated(n_classes, data_type):
    """One batch, one epoch: fit reports the loss of the weights it started from, which must
    be sum(w_label * cross-entropy) / N with the balanced weights."""
    rng = np.random.default_rng(0)
    labels = np.array([0] * 6 + [1] * 2 + ([2] * 3 if n_classes == 3 else []), dtype="int32")
    features = rng.normal(size=(len(labels), 5)).astype("float32")
    keras.utils.set_random_seed(0)
    head = build_head(5, n_classes, hidden=0, dropout=0.0)
    kernel = head.get_layer("logits").kernel  # zero-initialised: every loss would be log(n)
    kernel.assign(rng.normal(size=kernel.shape).astype("float32"))
    compile_for(head, n_classes, 1e-3)
    probabilities = probabilities_from_logits(head.predict(features, verbose=0))
    cross_entropy = -np.log(probabilities[np.arange(len(labels)), labels])
    weights = balanced_weights(np.bincount(labels))
    expected = np.mean([weights[y] * ce for y, ce in zip(labels, cross_entropy, strict=True)])
    if data_type == "view_sampler":
        data = ViewSampler([features], labels, batch_size=len(labels), shuffle=False)
    else:
        import tensorflow as tf

        data = tf.data.Dataset.from_tensor_slices((features, labels)).batch(len(labels))
    history = head.fit(data, epochs=1, verbose=0, shuffle=False, class_weight=weights)
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(cross_entropy.mean(), rel=1e-3)  # the weights matter


@pytest.fixture(scope="module")
def imbalanced_folder(image_folder_factory, tmp_path_factory):
    """cat: 24 images, dog: 8 (ratio 3 in every split)."""
    root = image_folder_factory(
        tmp_path_factory.mktemp("imbalanced") / "data", classes=("cat", "dog"), per_class=24
    )
    for path in sorted((root / "dog").iterdir())[8:]:
        path.unlink()
    return root


@pytest.mark.slow  # a full training run
def test_auto_weights_every_fit_of_the_recipe_and_records_the_choice(
    imbalanced_folder, tmp_path, monkeypatch
):
    """Extract mode with --augment auto and --fine-tune-lr auto: the candidate trials, stage 1
    and stage 2 all get the balanced weights of the training split; the refit (the default),
    which trains on training + validation images, those of both splits."""
    seen = []
    fit = keras.Model.fit

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("class_weight"))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    result = train(
        Config(
            data=str(imbalanced_folder),
            out=str(tmp_path / "run"),
            backbone="tiny_test",
            weights="none",
            image_size=32,
            epochs=1,
            fine_tune_epochs=1,
            views=1,
            batch_size=8,
            choice_folds=1,  # every choice a Keras fit on the split (the folds weigh in the loss)
            quiet=True,
            report=False,
        )
    )
    counts = [int(c) for c in np.bincount(_train_labels(result.run_dir), minlength=2)]
    assert counts[0] / counts[1] > IMBALANCE_THRESHOLD
    expected = balanced_weights(counts)
    assert expected[1] == pytest.approx(sum(counts) / (2 * counts[1]))
    # each head-input candidate, each augmentation candidate tried (but "none", the chosen head
    # input's own trial) and each fine-tuning rate; stages 1 and 2 replay their chosen trial
    fits = len(result.config.feature_norm_scores) + len(result.config.augment_scores) - 1
    fits += len(result.config.fine_tune_lr_scores)
    # the refit's record (under refit_rejected if it did no better than chance: weak here)
    record = result.metrics if result.metrics["refit"] else result.metrics["refit_rejected"]
    refit = [n for n in record["refit_epochs"].values() if n]  # its stages, trained live
    assert len(seen) == fits + len(refit) and fits >= 5
    assert all(w == pytest.approx(expected) for w in seen[:fits])
    both = np.bincount(_train_labels(result.run_dir, "train", "val"), minlength=2)
    assert all(w == pytest.approx(balanced_weights(both)) for w in seen[fits:])
    config = json.loads((result.run_dir / "config.json").read_text())
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert config["class_weight"] == metrics["class_weight"] == "balanced"
    assert metrics["class_weights"] == {
        "cat": pytest.approx(expected[0]),
        "dog": pytest.approx(expected[1]),
    }
    refit_weights = balanced_weights(both)  # the refit model's: both splits' counts
    assert record["refit_class_weights"] == {
        "cat": pytest.approx(refit_weights[0]),
        "dog": pytest.approx(refit_weights[1]),
    }
    for key in ("macro_f1", "balanced_accuracy", "per_class"):
        assert key in metrics


@pytest.mark.slow  # a full training run
def test_a_balanced_folder_trains_unweighted(tiny_run, tmp_path):
    config = json.loads((tiny_run / "config.json").read_text())
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert config["class_weight"] == metrics["class_weight"] == "none"
    assert "class_weights" not in metrics


@pytest.mark.slow  # a full training run
def test_frozen_mode_weights_its_tf_data_pipeline_too(imbalanced_folder, tmp_path, monkeypatch):
    """--mode frozen (here: a from-scratch backbone) trains on a tf.data pipeline of images."""
    seen = []
    fit = keras.Model.fit

    def spy(self, data, *args, **kwargs):
        seen.append((type(data).__name__, kwargs.get("class_weight")))
        return fit(self, data, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    result = train(
        Config(
            data=str(imbalanced_folder),
            out=str(tmp_path / "run"),
            backbone="scratch_cnn",
            image_size=32,
            head="flatten",
            epochs=1,
            batch_size=8,
            augment="none",
            check=False,
            quiet=True,
            report=False,
        )
    )
    assert result.config.mode == "frozen" and result.metrics["class_weight"] == "balanced"
    assert len(seen) == 2 and all("Dataset" in kind for kind, _ in seen)  # stage 1, the refit
    counts = np.bincount(_train_labels(result.run_dir), minlength=2)
    assert seen[0][1] == pytest.approx(balanced_weights(counts))
    both = np.bincount(_train_labels(result.run_dir, "train", "val"), minlength=2)
    assert seen[1][1] == pytest.approx(balanced_weights(both))


def _train_labels(run_dir, *splits):
    split = json.loads((run_dir / "split.json").read_text())
    names = split["class_names"]
    return np.array([names.index(name) for s in splits or ("train",) for _, name in split[s]])


def test_cli_options_reach_the_config():
    from headstart.cli import _config_of, build_parser

    args = build_parser().parse_args(["train", "DATA", "--class-weight", "balanced", "--calibrate"])
    assert args.class_weight == "balanced" and args.calibrate is True
    defaults = _config_of(build_parser().parse_args(["train", "DATA"]))
    assert defaults.class_weight == Config(data="").class_weight == "auto"
    assert defaults.calibrate is False


def test_an_unknown_class_weight_is_refused_before_any_work():
    with pytest.raises(UsageError, match="--class-weight must be auto, balanced or none"):
        Config(data="DATA", class_weight="inverse").validate()

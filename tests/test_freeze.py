"""Freezing policy, checked the way seed 000 does: frozen weights must not move during fit."""

import keras
import numpy as np
import pytest

from headstart.backbones import build_backbone, get_backbone
from headstart.freeze import freeze, resolve_unfreeze, unfreeze_top
from headstart.model import build_model, classifier_of, compile_for, parameter_counts, trainer_for


def _tiny_model(name="tiny_test", size=32, classes=3):  # tests/conftest.py registers tiny_test
    keras.utils.set_random_seed(0)
    spec = get_backbone(name)
    base = build_backbone(spec, size, "none")
    return spec, base, build_model(spec, base, classes)


def _data(size=32, classes=3, n=24):
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (n, size, size, 3)).astype("float32"), rng.integers(0, classes, n)


def _snapshot(layer):
    return [np.array(w.numpy()) for w in layer.weights]


def _same(before, layer):
    return all(np.array_equal(a, w.numpy()) for a, w in zip(before, layer.weights, strict=True))


@pytest.mark.core
def test_frozen_base_is_bit_identical_after_fit_and_head_moves():
    spec, base, model = _tiny_model()
    freeze(base)
    before_base, before_head = _snapshot(base), _snapshot(classifier_of(model))
    trainer = trainer_for(model, spec)
    compile_for(trainer, 3, 1e-2)
    trainer.fit(*_data(), epochs=2, batch_size=8, verbose=0)
    assert _same(before_base, base)
    assert not _same(before_head, classifier_of(model))


@pytest.mark.core
@pytest.mark.parametrize("bn", ["frozen", "inference"])
def test_fine_tuning_moves_only_the_top_and_never_batch_norm_statistics(bn):
    spec, base, model = _tiny_model()
    count = resolve_unfreeze("default", spec, base)
    unfreeze_top(base, count, bn)
    first = len(base.layers) - count
    before = {layer.name: _snapshot(layer) for layer in base.layers}
    trainer = trainer_for(model, spec)
    compile_for(trainer, 3, 1e-2)
    trainer.fit(*_data(), epochs=1, batch_size=8, verbose=0)
    for index, layer in enumerate(base.layers):
        if not layer.weights:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = before[layer.name]
            # training=False on the base: moving statistics never change, whatever the policy
            assert np.array_equal(mean, layer.moving_mean.numpy()), layer.name
            assert np.array_equal(variance, layer.moving_variance.numpy()), layer.name
            gamma_moved = not np.array_equal(gamma, layer.gamma.numpy())
            assert gamma_moved == (bn == "inference" and index >= first), layer.name
        else:
            assert _same(before[layer.name], layer) == (index < first), layer.name


def test_unfreeze_counts_entries_of_layers_like_the_seeds():
    spec = get_backbone("vgg16")
    base = build_backbone(spec, 32, "none")
    unfreeze_top(base, resolve_unfreeze("4", spec, base))
    trainable = [layer.name for layer in base.layers if layer.trainable_weights]
    assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3"]
    assert resolve_unfreeze("default", spec, base) == 4
    assert resolve_unfreeze("all", spec, base) == len(base.layers)
    assert resolve_unfreeze("none", spec, base) == 0


def test_trainable_change_needs_recompile_and_counts_follow():
    spec, base, model = _tiny_model("vgg16", classes=2)
    freeze(base)
    frozen = parameter_counts(model)
    assert frozen["trainable"] == 513 and frozen["non_trainable"] == 14714688
    unfreeze_top(base, 4)
    assert parameter_counts(model)["trainable"] == 513 + 3 * (3 * 3 * 512 * 512 + 512)


def test_plain_keras_fit_would_update_batch_norm_statistics():
    """Why ``trainer_for`` exists: Keras 3 ``fit`` on the functional model ignores the nested
    ``training=False`` (keras-team/keras#20285). If Keras fixes this, this test tells us."""
    spec, base, model = _tiny_model()
    unfreeze_top(base, resolve_unfreeze("default", spec, base), "inference")
    norm = next(
        layer
        for layer in reversed(base.layers)
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    before = np.array(norm.moving_mean.numpy())
    compile_for(model, 3, 1e-2)
    model.fit(*_data(), epochs=1, batch_size=8, verbose=0)
    assert not np.array_equal(before, norm.moving_mean.numpy())

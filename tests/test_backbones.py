"""The registry: every entry builds, knows its top block, and feeds its base correctly."""

import keras
import numpy as np
import pytest

from headstart import backbones
from headstart.backbones import REGISTRY, build_backbone, get_backbone, preprocessing_layers
from headstart.errors import UsageError
from headstart.freeze import resolve_unfreeze

SEED_BACKBONES = ("vgg16", "vgg19", "xception", "inception_v3", "resnet50", "mobilenet")
REQUIRED = SEED_BACKBONES + (
    "resnet50_v2",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_v2_b0",
    "convnext_tiny",
    "densenet121",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "scratch_cnn",
    "separable_cnn",
)


def test_registry_has_every_required_backbone():
    assert set(REQUIRED) <= set(REGISTRY)
    assert backbones.DEFAULT_BACKBONE == "efficientnet_lite0"


def _built_in(name: str):
    """A registry name as a parameter; a full-size pretrained network (seconds to build) runs
    in the full suite only, the test suite's tiny ones and the scratch baselines also in the
    fast loop."""
    slow = REGISTRY[name].pretrained and not name.startswith("tiny_test")
    return pytest.param(name, marks=pytest.mark.slow) if slow else name


@pytest.mark.parametrize("name", [_built_in(name) for name in sorted(REGISTRY)])
def test_default_top_block_is_a_real_layer_of_the_base(name):
    """The default fine-tuning cut names a layer that exists: a typo would silently unfreeze
    a fallback fraction instead of the top block."""
    spec = get_backbone(name)
    size = max(spec.min_size, 75)
    base = build_backbone(spec, size, "none")
    names = [layer.name for layer in base.layers]
    count = resolve_unfreeze("default", spec, base)
    if spec.pretrained:
        assert (spec.unfreeze_from in names) or (spec.unfreeze_after in names), name
        assert 0 < count < len(names) // 2, (name, count, len(names))
    first_unfrozen = names[len(names) - count]
    if spec.unfreeze_from:
        assert first_unfrozen == spec.unfreeze_from


def test_unknown_backbone_and_too_small_image_are_usage_errors():
    with pytest.raises(UsageError, match="unknown --backbone 'resnet5'"):
        get_backbone("resnet5")
    with pytest.raises(UsageError, match="too small for xception"):
        build_backbone(get_backbone("xception"), 64, "none")


def test_weights_resolution():
    vgg, scratch = get_backbone("vgg16"), get_backbone("scratch_cnn")
    assert backbones.resolve_weights(vgg, "default") == "imagenet"
    assert backbones.resolve_weights(scratch, "default") == "none"
    assert backbones.resolve_weights(vgg, "None") == "none"
    with pytest.raises(UsageError, match="from-scratch baseline"):
        backbones.resolve_weights(scratch, "imagenet")
    with pytest.raises(UsageError, match="no such file"):
        backbones.resolve_weights(vgg, "/nonexistent/weights.h5")


def test_offline_imagenet_download_failure_is_one_clear_line(monkeypatch):
    def refuse(*args, **kwargs):
        raise Exception(
            "URL fetch failure on https://storage.googleapis.com/x.h5: None -- "
            "[Errno -3] Temporary failure in name resolution"
        )

    monkeypatch.setattr("keras.src.applications.mobilenet_v2.file_utils.get_file", refuse)
    with pytest.raises(UsageError) as error:
        build_backbone(get_backbone("mobilenet_v2"), 96, "imagenet")
    message = str(error.value)
    assert "\n" not in message
    assert "--weights PATH" in message and "efficientnet_lite0" in message


@pytest.mark.slow  # full-size Keras applications
@pytest.mark.parametrize(
    "name, reference",
    [
        ("vgg16", keras.applications.vgg16),
        ("resnet50", keras.applications.resnet50),
        ("densenet121", keras.applications.densenet),
        ("mobilenet_v2", keras.applications.mobilenet_v2),
    ],
)
def test_in_model_preprocessing_equals_keras_preprocess_input(tmp_path, name, reference):
    """Raw RGB through headstart's layers (caffe's BGR flip folded into the first conv) gives
    the same features as Keras' own ``preprocess_input`` in front of the same weights."""
    spec = get_backbone(name)
    keras.utils.set_random_seed(1)
    original = spec.build((48, 48, 3), None)
    path = tmp_path / "weights.weights.h5"
    original.save_weights(path)
    ours = build_backbone(spec, 48, str(path))
    images = np.random.default_rng(0).uniform(0, 255, (2, 48, 48, 3)).astype("float32")
    x = images
    for layer in preprocessing_layers(spec):
        x = layer(x)
    expected = original(reference.preprocess_input(images.copy()))
    np.testing.assert_allclose(ours(x), expected, rtol=1e-4, atol=1e-4)


def test_scratch_baselines_match_the_seeds():
    scratch = build_backbone(get_backbone("scratch_cnn"), 224, "none")
    assert [type(layer).__name__ for layer in scratch.layers[1:4]] == [
        "BatchNormalization",
        "Conv2D",
        "MaxPooling2D",
    ]
    separable = build_backbone(get_backbone("separable_cnn"), 64, "none")
    assert sum(isinstance(layer, keras.layers.SeparableConv2D) for layer in separable.layers) == 6
    assert separable.count_params() == 34491

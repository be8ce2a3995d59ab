"""keras-hub backbones (``--backbone hub:PRESET``): tiny presets with random weights written by
keras-hub's own ``save_to_preset`` into tmp folders; nothing is downloaded."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402

from headstart import Config, predict, train  # noqa: E402
from headstart.backbones import (  # noqa: E402
    build_backbone,
    default_unfreeze,
    get_backbone,
    preprocessing_layers,
    unfreeze_units,
)
from headstart.errors import UsageError  # noqa: E402
from headstart.explain import gradcam  # noqa: E402
from headstart.freeze import unfreeze_top  # noqa: E402
from headstart.model import backbone_layer_name, build_model  # noqa: E402
from headstart.training.cache import FeatureCache  # noqa: E402
from headstart.training.views import weights_id  # noqa: E402

# ImageNet mean/std as keras-hub's ResNet converters hold them: x * scale + offset
SCALE = [1 / (255 * s) for s in (0.229, 0.224, 0.225)]
OFFSET = [-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)]
LAST_BLOCK = "stack1_block0"  # the tiny ResNet's last residual block: the default top block


def _save_preset(folder: Path, backbone, converter) -> Path:
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return folder


def _tiny_resnet(seed: int = 0):
    keras.utils.set_random_seed(seed)
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
    )


@pytest.fixture(scope="module")
def resnet_preset(tmp_path_factory) -> Path:
    """A 2-block ResNet (89k parameters) and its converter (32 px, ImageNet mean/std)."""
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(32, 32), scale=SCALE, offset=OFFSET
    )
    return _save_preset(tmp_path_factory.mktemp("hub") / "resnet_tiny", _tiny_resnet(), converter)


@pytest.fixture(scope="module")
def vit_preset(tmp_path_factory) -> Path:
    """A 3-block ViT (10k parameters, 8 px patches) and its converter (32 px, to [-1, 1])."""
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    converter = keras_hub.layers.ViTImageConverter(
        image_size=(32, 32), scale=1 / 127.5, offset=-1.0
    )
    return _save_preset(tmp_path_factory.mktemp("hub") / "vit_tiny", backbone, converter)


def _images(n: int = 3, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _run(data: Path, backbone: str, out: Path, **overrides):
    settings = {
        "epochs": 2,
        "fine_tune_epochs": 2,
        "fine_tune_lr": 1e-3,
        "batch_size": 8,
        "augment": "none",
        "check": False,
        "feature_norm": "none",
        "refit": False,  # the backbone's two stages (tests/test_refit.py: the refit)
        "quiet": True,
        **overrides,
    }
    return train(Config(data=str(data), out=str(out), backbone=backbone, **settings))


def test_hub_preset_is_its_converter_then_its_backbone(resnet_preset):
    """The entry feeds the backbone what keras-hub's ImageConverter would, and the base gives
    the preset backbone's own output."""
    spec = get_backbone(f"hub:{resnet_preset}")
    assert spec.name == f"hub:{resnet_preset.resolve()}" and spec.default_size == 32
    images = _images()
    expected = keras.ops.convert_to_numpy(
        keras_hub.layers.ImageConverter.from_preset(str(resnet_preset))(images)
    )
    ours = images
    for layer in preprocessing_layers(spec):
        ours = keras.ops.convert_to_numpy(layer(ours))
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    base = build_backbone(spec, 32, "imagenet")
    reference = keras_hub.models.Backbone.from_preset(str(resnet_preset))
    np.testing.assert_allclose(base(expected), reference(expected), atol=1e-5)


def test_hub_cnn_stage_2_unfreezes_its_last_block(resnet_preset):
    """Default depth: the top tenth of the layers, down to the block boundary (the last residual
    block, 10 of 24 layers); BatchNormalization stays frozen (--bn frozen)."""
    spec = get_backbone(f"hub:{resnet_preset}")
    base = build_backbone(spec, 32, "imagenet")
    count = default_unfreeze(spec, base)
    assert count == 10 and len(base.layers) == 24
    top = base.layers[-count:]
    assert all(layer.name.startswith(LAST_BLOCK) for layer in top)
    assert not base.layers[-count - 1].name.startswith(LAST_BLOCK)
    unfreeze_top(base, count, "frozen", spec)
    trainable = {layer.name for layer in base.layers if layer.trainable_weights}
    assert trainable == {
        layer.name
        for layer in top
        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
    }


def test_hub_cache_key_follows_the_preset_weights(resnet_preset, tmp_path):
    """The feature cache keys a hub backbone by its preset and the content of its weights: the
    preset saved again with other weights gets another key."""
    preset = shutil.copytree(resnet_preset, tmp_path / "preset")
    cache = FeatureCache(tmp_path / "cache")
    config = Config(data="", backbone=f"hub:{preset}", weights="imagenet")
    before = weights_id(config, get_backbone(config.backbone), cache)
    assert before == weights_id(config, get_backbone(config.backbone), cache)
    assert before.startswith("imagenet:")
    _tiny_resnet(seed=1).save_to_preset(str(preset))
    assert weights_id(config, get_backbone(config.backbone), cache) != before


def test_hub_download_failure_is_one_line_naming_the_fix(monkeypatch):
    """A preset name that is neither cached nor downloadable (no network): one line saying how
    to get it. The download is forced to fail, nothing goes to the network."""
    import requests
    from keras_hub.src.utils import preset_utils

    def offline(handle, path=None, **kwargs):
        raise requests.exceptions.ConnectionError(f"Failed to resolve 'www.kaggle.com' ({handle})")

    monkeypatch.setattr(preset_utils.kagglehub, "model_download", offline)
    with pytest.raises(UsageError) as error:
        get_backbone("hub:efficientnet_b0_ra_imagenet")
    message = str(error.value)
    assert "\n" not in message
    assert "download it once with network, or pass hub:/path/to/local/preset" in message
    with pytest.raises(UsageError, match="not a keras-hub preset name, handle or folder"):
        get_backbone("hub:no/such/preset")


@pytest.fixture(scope="module")
def resnet_runs(resnet_preset, tiny_folder, tmp_path_factory):
    """Two runs of one config on a copy of the preset (the second reads the feature cache);
    the copy is gone afterwards. (A changed preset's new cache key: the test above.)"""
    root = tmp_path_factory.mktemp("hub_runs")
    preset = shutil.copytree(resnet_preset, root / "preset")
    cache = str(root / "cache")
    runs = [_run(tiny_folder, f"hub:{preset}", root / f"run{i}", cache_dir=cache) for i in (1, 2)]
    shutil.rmtree(preset)
    return runs


@pytest.mark.slow
def test_hub_cnn_trains_end_to_end_and_caches_its_trunk(resnet_runs, resnet_preset):
    """Both stages on the default path (the frozen trunk on OpenVINO where it is installed),
    the trunk cut where the top block starts, the second run's extraction all from the
    cache, and stage 2 trained nothing below the top block."""
    first, second = resnet_runs
    assert first.config.unfreeze == "10"
    stages = [row["stage"] for row in csv.DictReader((first.run_dir / "history.csv").open())]
    assert stages == ["head", "head", "fine_tune", "fine_tune"]
    assert first.metrics["accuracy"] >= 0.9
    passes = first.metrics["extraction_passes"]
    assert {p["output"] for p in passes} == {"trunk:stack1_block0_1_pad"}  # cut at the top block
    assert all(p["computed"] == p["images"] for p in passes)
    if importlib.util.find_spec("openvino") is not None:
        assert {p["runtime"] for p in passes} == {"openvino:f32"}
    assert [p["computed"] for p in second.metrics["extraction_passes"]] == [0] * len(passes)
    reference = keras_hub.models.Backbone.from_preset(str(resnet_preset))
    # stage 2 trained the top block only: every layer below it is the preset's
    model = keras.saving.load_model(first.run_dir / "model.keras")
    base = model.get_layer(backbone_layer_name(model))
    for layer in [layer for layer in base.layers[:-10] if layer.weights]:
        for ours, theirs in zip(
            layer.get_weights(), reference.get_layer(layer.name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_hub_cnn_model_predicts_without_the_preset_or_keras_hub(resnet_runs, tiny_folder):
    """model.keras holds the backbone's layers (all standard Keras for a ResNet): it predicts
    with the preset folder gone, and names no keras-hub class."""
    run = resnet_runs[0].run_dir
    with zipfile.ZipFile(run / "model.keras") as archive:
        assert "keras_hub" not in archive.read("config.json").decode()
    images = sorted(str(p) for p in Path(tiny_folder, "cat").iterdir())[:4]
    rows = predict(run, images)
    assert [row.top[0][0] for row in rows] == ["cat"] * 4


def test_hub_vit_counts_transformer_blocks_and_has_no_gradcam(vit_preset):
    """A ViT's units are its blocks: the default fine-tunes the top quarter (1 of 3) and the
    final norm; its tokens are pooled by their mean, and Grad-CAM says why it has no heatmap."""
    spec = get_backbone(f"hub:{vit_preset}")
    base = build_backbone(spec, 32, "imagenet")
    units = unfreeze_units(spec, base)
    assert [u.name for u in units[-4:]] == [
        "transformer_block_1",
        "transformer_block_2",
        "transformer_block_3",
        "ln",
    ]
    count = default_unfreeze(spec, base)
    assert count == 2
    unfreeze_top(base, count, "frozen", spec)
    trainable = {w.path.split("/")[1] for w in base.trainable_weights}
    assert trainable == {"transformer_block_3", "ln"}
    model = build_model(spec, base, 2)
    assert isinstance(model.get_layer("features"), keras.layers.GlobalAveragePooling1D)
    with pytest.raises(UsageError, match=r"--image-size 48: .*: use --image-size 32$"):
        build_backbone(spec, 48, "imagenet")
    with pytest.raises(UsageError, match="Grad-CAM needs a spatial feature map.*tokens"):
        gradcam(model, _images(1))


@pytest.mark.slow
def test_hub_vit_trains_and_its_model_loads(vit_preset, tiny_folder, tmp_path):
    """Both stages (stage 2 on the full model: the blocks sit inside one encoder layer, no
    trunk is cut); model.keras holds keras-hub's ViTBackbone, which Keras loads by importing
    keras-hub itself. On Keras: OpenVINO runs a ViT too, but converting it takes seconds."""
    result = _run(
        tiny_folder,
        f"hub:{vit_preset}",
        tmp_path / "run",
        epochs=1,
        fine_tune_epochs=1,
        runtime="keras",
    )
    assert result.config.unfreeze == "2"
    assert {p["output"] for p in result.metrics["extraction_passes"]} == {"pooled:gap"}
    stages = [row["stage"] for row in csv.DictReader((result.run_dir / "history.csv").open())]
    assert stages == ["head", "fine_tune"]
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["backbone"] == f"hub:{vit_preset.resolve()}"
    model = keras.saving.load_model(result.run_dir / "model.keras")
    probabilities = keras.ops.convert_to_numpy(model(_images(2)))
    assert probabilities.shape == (2, 1) and np.isfinite(probabilities).all()


def test_hub_without_keras_hub_names_the_extra(monkeypatch, resnet_preset):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # import keras_hub raises ImportError
    with pytest.raises(UsageError, match=r'need keras-hub: pip install "headstart\[hub\]"'):
        get_backbone(f"hub:{resnet_preset}")

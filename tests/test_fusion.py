"""Two-backbone fusion (``--backbone A+B``): one image through both, pooled features
concatenated into ``features``, one head; each backbone cached and fine-tuned by its own rules."""

import json

import keras
import numpy as np
import pytest

from headstart import Config, evaluate, predict, train
from headstart.backbones import default_unfreeze, get_backbone
from headstart.cli import main
from headstart.data import find_images, read_image
from headstart.errors import UsageError
from headstart.model import CLASSIFIER_NAME, FEATURES_NAME, build_from_config, feature_extractor
from headstart.splits import load_image_folder
from headstart.training.cache import EntrySpec, FeatureCache, list_entries
from headstart.training.callbacks import RunCallback

pytestmark = pytest.mark.slow  # end-to-end training runs of several seconds each

# tests/conftest.py registers both: tiny pretrained-style backbones with their own widths and
# input preprocessing ("tf", "torch"); tiny_test_b's Keras model is named unlike its entry
FUSION = "tiny_test+tiny_test_b"
SIZE = 32


class _Recorder(RunCallback):
    """Keeps, at the start of each stage, which layers of each base are trainable, and the
    in-memory classifier at the end of training."""

    def __init__(self):
        super().__init__()
        self.trainable: dict[str, list[list[bool]]] = {}

    def on_train_begin(self, logs=None):
        self.trainable[self.stage] = [
            [layer.trainable for layer in base.layers] for base in _bases(self.classifier)
        ]


def _bases(model):
    return [
        layer
        for layer in model.layers
        if isinstance(layer, keras.Model) and layer.name != CLASSIFIER_NAME
    ]


def _batch_norms(model):
    return [
        layer
        for base in _bases(model)
        for layer in base.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


@pytest.fixture(scope="module")
def fusion(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    recorder = _Recorder()
    config = Config(
        data=str(tiny_folder),
        out=str(root / "run"),
        backbone=FUSION,
        weights="none",
        image_size=SIZE,
        epochs=2,
        fine_tune_epochs=1,
        fine_tune_lr=1e-4,
        batch_size=8,
        augment="none",
        cache_dir=str(root / "cache"),
        check=False,
        quiet=True,
    )
    result = train(config, callbacks=[recorder])
    return result, recorder, root / "cache"


def test_features_concatenate_both_pooled_backbones(fusion):
    result, recorder, _ = fusion
    model = keras.saving.load_model(result.run_dir / "model.keras")
    assert [base.name for base in _bases(model)] == ["tiny_test", "tiny_test_b_32"]
    widths = [int(base.output_shape[-1]) for base in _bases(model)]
    assert widths == [32, 24]
    assert model.get_layer(FEATURES_NAME).output.shape[-1] == sum(widths) == 56
    assert model.input_shape == (None, SIZE, SIZE, 3)
    assert result.config.weights == "none+none"


def test_save_load_round_trip_and_evaluate_predict_work(fusion, tiny_folder, tmp_path):
    result, recorder, _ = fusion
    in_memory = recorder.classifier
    in_memory.save(tmp_path / "copy.keras")
    loaded = keras.saving.load_model(tmp_path / "copy.keras")
    paths = find_images([str(tiny_folder)])[:8]
    images = np.stack([read_image(path, (SIZE, SIZE)) for path in paths]).astype("float32")
    expected = keras.ops.convert_to_numpy(in_memory(images, training=False))
    got = keras.ops.convert_to_numpy(loaded(images, training=False))
    np.testing.assert_allclose(got, expected, atol=1e-5)  # float32 round-off only
    assert len(predict(result.run_dir, [str(p) for p in paths])) == 8
    scores = evaluate(result.run_dir, tiny_folder)
    assert 0 <= scores["accuracy"] <= 1
    assert (result.run_dir / "report.html").is_file()  # Grad-CAM skipped, the report written


def test_cache_holds_each_backbone_under_its_own_key(fusion, tiny_folder):
    result, _, cache_dir = fusion
    entries = list_entries(cache_dir)
    names = sorted(entry["backbone"] for entry in entries)
    assert names == ["tiny_test", "tiny_test_b"]  # never under the fused name
    # A single-backbone run of tiny_test reads the fusion's entry: the rows are its own features.
    single = Config(data="", backbone="tiny_test", weights="none", image_size=SIZE)
    model, _ = build_from_config(single, get_backbone("tiny_test"), 2)
    paths = list(load_image_folder(str(tiny_folder), seed=0).train.paths[:6])  # the run's split
    runtime = {entry["runtime"] for entry in entries}.pop()  # the run's: OpenVINO if installed
    spec = EntrySpec("tiny_test", "none:0", SIZE, "tf", "pooled:gap", "clean", runtime)

    def must_not_run(missing):
        raise AssertionError(f"{len(missing)} images were not cached")

    cached = np.asarray(FeatureCache(cache_dir).rows(spec, paths, must_not_run)[np.arange(6)])
    images = np.stack([read_image(path, (SIZE, SIZE)) for path in paths]).astype("float32")
    fresh = keras.ops.convert_to_numpy(feature_extractor(model)(images, training=False))
    np.testing.assert_allclose(cached, fresh, rtol=1e-3, atol=1e-4)  # stored as float16
    assert cached.shape == (6, 32)  # one backbone's width, not the fused 56


def test_each_base_fine_tunes_its_own_top_and_batch_norm_statistics_stay(fusion):
    result, recorder, _ = fusion
    specs = get_backbone(FUSION).parts
    config = json.loads((result.run_dir / "config.json").read_text())
    model = keras.saving.load_model(result.run_dir / "model.keras")
    bases = _bases(model)
    counts = [default_unfreeze(spec, base) for spec, base in zip(specs, bases, strict=True)]
    assert config["unfreeze"] == f"{counts[0]}+{counts[1]}"
    # each backbone's own top block, from its top_conv
    starts = [base.layers[-count].name for base, count in zip(bases, counts, strict=True)]
    assert starts == [spec.unfreeze_from for spec in specs]
    assert not any(any(flags) for flags in recorder.trainable["head"])
    stage_2 = recorder.trainable["fine_tune"]
    for base, count, flags in zip(bases, counts, stage_2, strict=True):
        first = len(base.layers) - count
        batch_norm = [isinstance(layer, keras.layers.BatchNormalization) for layer in base.layers]
        assert flags == [i >= first and not bn for i, bn in enumerate(batch_norm)]
    # weights none: moving statistics start at mean 0, variance 1 and must stay there
    for model_ in (model, recorder.classifier):
        for layer in _batch_norms(model_):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.moving_mean), 0)
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.moving_variance), 1)


def test_bad_fusions_are_one_line_usage_errors(tiny_folder, capsys):
    with pytest.raises(UsageError, match="unknown --backbone 'nonexistent'"):
        get_backbone("efficientnet_lite0+nonexistent")
    for name in ("mobilenet_v2+mobilenet_v2", "scratch_cnn+mobilenet_v2", "a+b+c"):
        with pytest.raises(UsageError):
            get_backbone(name)
    assert main(["--quiet", "train", str(tiny_folder), "--backbone", "vgg16+nonexistent"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "unknown --backbone 'nonexistent'" in errors[0]


def test_one_backbone_tools_refuse_a_fusion_in_one_line(fusion, tiny_folder):
    from headstart.explain import gradcam
    from headstart.summaries import summary

    result, _, _ = fusion
    model = keras.saving.load_model(result.run_dir / "model.keras")
    with pytest.raises(UsageError, match="fusion model has no single feature map"):
        gradcam(model, np.zeros((1, SIZE, SIZE, 3), "float32"))
    with pytest.raises(UsageError, match="summary shows one backbone"):
        summary(FUSION)


def test_from_scratch_pair_trains_end_to_end(tiny_folder, tmp_path):
    config = Config(
        data=str(tiny_folder),
        out=str(tmp_path / "run"),
        backbone="scratch_cnn+separable_cnn",
        image_size=SIZE,
        epochs=2,
        batch_size=8,
        augment="none",
        check=False,
        quiet=True,
    )
    result = train(config)
    assert (result.config.mode, result.config.unfreeze, result.config.weights) == (
        "frozen",
        "0",
        "none+none",
    )
    model = keras.saving.load_model(result.run_dir / "model.keras")
    assert model.get_layer(FEATURES_NAME).output.shape[-1] == 128 + 128


def test_augment_auto_caches_each_backbones_views_and_reuses_clean_ones(fusion, tiny_folder):
    result, _, cache_dir = fusion
    before = {entry["key"] for entry in list_entries(cache_dir)}
    config = Config(
        data=str(tiny_folder),
        out=str(result.run_dir.parent / "auto"),
        backbone=FUSION,
        weights="none",
        image_size=SIZE,
        epochs=1,
        fine_tune=False,
        batch_size=8,
        augment="auto",
        views=1,
        cache_dir=str(cache_dir),
        check=False,
        quiet=True,
    )
    auto = train(config)
    assert len(auto.metrics["augment_scores"]) >= 2  # "none", then at least "flip"
    new = [entry for entry in list_entries(cache_dir) if entry["key"] not in before]
    # the clean entries of the first run are reused; each candidate's view is cached per backbone
    assert all(entry["view"] != "clean" for entry in new)
    by_view = {}
    for entry in new:
        by_view.setdefault(entry["view"], set()).add(entry["backbone"])
    assert "flip#0#1" in by_view
    assert all(names == {"tiny_test", "tiny_test_b"} for names in by_view.values())

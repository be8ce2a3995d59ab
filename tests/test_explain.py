"""Grad-CAM: exact against automatic differentiation, and it finds the object in a photo."""

import numpy as np
import pytest
from PIL import Image

from headstart import Config, train
from headstart.backbones import build_backbone, get_backbone
from headstart.cli import main
from headstart.explain import explain, gradcam
from headstart.model import CLASSIFIER_NAME, FEATURES_NAME, build_model

pytestmark = pytest.mark.slow  # end-to-end training runs of several seconds each


def _reference_gradcam(model, images, classes):
    """Textbook Grad-CAM with tf.GradientTape (TensorFlow only: the test's yardstick)."""
    import keras
    import tensorflow as tf

    pool, head = model.get_layer(FEATURES_NAME), model.get_layer(CLASSIFIER_NAME)
    maps = tf.convert_to_tensor(keras.Model(model.input, pool.input)(images))
    with tf.GradientTape() as tape:
        tape.watch(maps)
        logits = head(pool(maps), training=False)
        if logits.shape[1] == 1:
            sign = tf.constant(np.where(np.asarray(classes) == 1, 1.0, -1.0), tf.float32)
            score = logits[:, 0] * sign
        else:
            score = tf.gather(logits, classes, batch_dims=1)
    weights = tf.reduce_mean(tape.gradient(score, maps), axis=(1, 2))
    cams = np.maximum(np.einsum("nhwk,nk->nhw", maps.numpy(), weights.numpy()), 0)
    peak = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)


@pytest.mark.parametrize(
    ("head", "hidden", "n_classes", "feature_norm"),
    [("gap", 16, 3, "none"), ("flatten", 0, 2, "none"), ("gap", 0, 2, "none"), ("gap", 8, 3, "l2")],
)
def test_gradcam_is_exact(head, hidden, n_classes, feature_norm):
    import keras

    keras.utils.set_random_seed(1)
    spec = get_backbone("scratch_cnn")
    base = build_backbone(spec, 40, "none")
    model = build_model(
        spec, base, n_classes, head=head, hidden=hidden, dropout=0.3, feature_norm=feature_norm
    )
    rng = np.random.default_rng(0)
    logits = model.get_layer("classifier").get_layer("logits")  # zero-initialised: as if trained
    logits.kernel.assign(rng.normal(0, 0.1, logits.kernel.shape).astype("float32"))
    images = rng.uniform(0, 60, (5, 40, 40, 3)).astype("float32")
    for image, (y, x) in zip(images, rng.integers(0, 28, (5, 2)), strict=True):
        image[y : y + 12, x : x + 12] += 180  # a bright patch somewhere: maps vary in space
    peaks = []
    for target in range(n_classes):  # every class of every image, so some maps are non-empty
        classes = [target] * len(images)
        result = gradcam(model, images, classes)
        np.testing.assert_allclose(
            result.heatmaps, _reference_gradcam(model, images, classes), atol=2e-4
        )
        peaks.extend(result.heatmaps.max(axis=(1, 2)))
    assert result.heatmaps.shape == (5, 3, 3) and result.layer == "scratch_cnn output (3x3x128)"
    assert set(np.round(peaks, 6)) <= {0.0, 1.0} and sum(np.round(peaks, 6) == 1) >= 5
    logits = model.predict(images, verbose=0)
    assert (
        result.probabilities.argmax(1) == (logits[:, 0] > 0 if n_classes == 2 else logits.argmax(1))
    ).all()
    default = gradcam(model, images)  # no classes given: the predicted class is explained
    np.testing.assert_array_equal(default.classes, result.probabilities.argmax(1))


@pytest.fixture(scope="module")
def run(tiny_folder, tmp_path_factory):
    config = Config(
        data=str(tiny_folder),
        out=str(tmp_path_factory.mktemp("explain") / "run"),
        backbone="scratch_cnn",
        image_size=32,
        epochs=2,
        batch_size=8,
        augment="none",
        quiet=True,
    )
    return train(config).run_dir


def test_cli_explain_writes_one_overlay_per_image(run, tiny_folder, tmp_path, capsys):
    images = [str(p) for p in sorted((tiny_folder / "cat").iterdir())[:2]]
    images.append(str(tmp_path / "broken.jpg"))
    (tmp_path / "broken.jpg").write_text("not an image")
    out = tmp_path / "out"
    assert main(["explain", str(run), *images, "--out", str(out)]) == 0
    written = capsys.readouterr().out.split()
    assert [p.split("/")[-1] for p in written] == [
        "cat_all_000_gradcam.png",
        "cat_all_001_gradcam.png",
    ]
    for path in written:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape[1] >= 500 and pixels.std() > 20
    assert main(["explain", str(run), images[0], "--class", "dog"]) == 0
    assert (run / "explain" / "cat_all_000_gradcam.png").is_file()
    assert main(["explain", str(run), images[0], "--class", "wolf"]) == 2
    assert "wolf" in capsys.readouterr().err


def test_explain_names_never_collide(run, tiny_folder, tmp_path):
    same = tmp_path / "a" / "cat.png", tmp_path / "b" / "cat.png"
    for path in same:
        path.parent.mkdir()
        Image.open(sorted((tiny_folder / "cat").iterdir())[0]).save(path)
    written = explain(run, [str(p) for p in same], out=tmp_path / "out")
    assert sorted(p.name for p in written) == ["cat_gradcam.png", "cat_gradcam_2.png"]


@pytest.mark.integration
def test_gradcam_finds_the_cat_and_the_espresso():
    """ImageNet's own classifier on a Lite0 headstart model: a cat photo top-left and an espresso
    bottom-right of one image; each class's heatmap must sit on its own object."""
    import keras

    skdata = pytest.importorskip("skimage.data")
    from headstart.backbones.efficientnet_lite import EfficientNetLite

    spec = get_backbone("efficientnet_lite0")
    model = build_model(spec, build_backbone(spec, 224, "imagenet"), 1000, head="gap")
    full = EfficientNetLite(include_top=True, weights="imagenet", classifier_activation=None)
    logits = model.get_layer(CLASSIFIER_NAME).get_layer("logits")
    logits.set_weights(full.get_layer("predictions").get_weights())
    canvas = np.full((224, 224, 3), 200, np.uint8)
    for photo, rows, cols in (
        (skdata.chelsea(), slice(0, 112), slice(0, 112)),
        (skdata.coffee(), slice(112, 224), slice(112, 224)),
    ):
        canvas[rows, cols] = np.asarray(Image.fromarray(photo).resize((112, 112), Image.BILINEAR))
    cat, espresso = 285, 967
    result = gradcam(model, np.stack([canvas, canvas]), [cat, espresso])
    assert result.layer == "efficientnet_lite0 output (7x7x1280)"

    def share(heatmap, rows, cols):
        up = Image.fromarray(heatmap.astype(np.float32)).resize((224, 224), Image.BILINEAR)
        up = np.asarray(up)
        return up[rows, cols].sum() / up.sum()

    # measured 0.85 and 0.74; a quarter of the image would hold 0.25 of a uniform map
    assert share(result.heatmaps[0], slice(0, 112), slice(0, 112)) > 0.7
    assert share(result.heatmaps[1], slice(112, 224), slice(112, 224)) > 0.6
    keras.backend.clear_session()

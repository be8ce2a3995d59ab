"""Grad-CAM (Selvaraju et al. 2017): where in the image the model looked for its answer.

The heatmap is computed on the backbone's output, the activation of its last convolutional
block (the layer Keras' own Grad-CAM example uses, found here as the input of the pooling
layer, so it works for every backbone with a spatial feature map; a vision transformer's
tokens, e.g. a ``hub:`` ViT's, have none, and `gradcam` says so in one line). Grad-CAM needs
the gradient of the class score with respect to that feature map. Between the two there is
only the pooling layer and headstart's head (Dense/Dropout layers), whose gradient is exact in
closed form, so it is computed with NumPy from the head's weights: no ``tf.GradientTape``, the
same code on every Keras backend.
(A test checks it against ``tf.GradientTape``.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from headstart import figures, runs
from headstart.data import UnreadableImage, find_images, read_image
from headstart.errors import UsageError
from headstart.metrics import probabilities_from_logits
from headstart.model import (
    CLASSIFIER_NAME,
    FEATURES_NAME,
    backbone_layer_name,
    infer,
    temperature_of,
)

log = logging.getLogger(__name__)

EXPLAIN_DIR = "explain"
_BATCH = 32


@dataclass(frozen=True)
class Explanation:
    heatmaps: np.ndarray  # (N, h, w) in [0, 1], at the feature map's resolution
    probabilities: np.ndarray  # (N, C)
    classes: np.ndarray  # (N,) the class each heatmap explains
    layer: str  # the feature map used, e.g. "efficientnet_lite0 output (4x4x1280)"


def gradcam(model: keras.Model, images: np.ndarray, classes=None) -> Explanation:
    """Grad-CAM heatmaps for a batch of raw RGB images (N, H, W, 3), 0..255.

    ``classes`` (N,) picks the class to explain per image; None explains the predicted class.
    """
    if FEATURES_NAME not in [layer.name for layer in model.layers]:
        raise UsageError(
            "Grad-CAM: an ensemble (several models averaged) has no single feature map: "
            "explain one of its members' runs"
        )
    pool = model.get_layer(FEATURES_NAME)
    if isinstance(pool, keras.layers.Concatenate):
        raise UsageError("Grad-CAM: a two-backbone fusion model has no single feature map")
    if len(pool.input.shape) != 4:  # a transformer's (batch, tokens, d), e.g. a hub: ViT
        raise UsageError(
            f"Grad-CAM needs a spatial feature map: {backbone_layer_name(model)} outputs "
            f"tokens {tuple(pool.input.shape[1:])} (a vision transformer), so there is no heatmap"
        )
    if not isinstance(pool, keras.layers.GlobalAveragePooling2D | keras.layers.Flatten):
        raise UsageError(f"Grad-CAM: unsupported pooling layer {type(pool).__name__}")
    head = model.get_layer(CLASSIFIER_NAME)
    conv = keras.Model(model.input, pool.input, name="last_conv")
    images = np.asarray(images, "float32")
    maps = np.concatenate(
        [infer(conv, images[i : i + _BATCH]) for i in range(0, len(images), _BATCH)]
    ).astype(np.float64)
    n, height, width, channels = maps.shape
    gap = isinstance(pool, keras.layers.GlobalAveragePooling2D)
    features = maps.mean(axis=(1, 2)) if gap else maps.reshape(n, -1)  # the pooling layer
    logits, backward = _dense_stack(head, features)

    probabilities = probabilities_from_logits(logits / temperature_of(model))
    if classes is None:
        classes = probabilities.argmax(axis=1)
    classes = np.asarray(classes, dtype=np.int64)
    if logits.shape[1] == 1:  # one logit z: class 1 scores z, class 0 scores -z
        upstream = np.where(classes == 1, 1.0, -1.0)[:, None]
    else:
        upstream = np.eye(logits.shape[1])[classes]
    grad_features = backward(upstream)  # d score / d pooled features, (N, D)
    if gap:  # every position gets 1/(h*w) of the pooled feature's gradient
        grad_maps = np.broadcast_to(grad_features[:, None, None, :] / (height * width), maps.shape)
    else:
        grad_maps = grad_features.reshape(maps.shape)
    weights = grad_maps.mean(axis=(1, 2))  # alpha_k: one weight per channel
    cams = np.maximum(np.einsum("nhwk,nk->nhw", maps, weights), 0.0)
    peak = cams.max(axis=(1, 2), keepdims=True)
    cams = np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)
    layer = f"{backbone_layer_name(model)} output ({height}x{width}x{channels})"
    return Explanation(cams, probabilities, classes, layer)


def _dense_stack(head: keras.Model, x: np.ndarray):
    """Forward ``x`` through a head of headstart's layers (inference: L2 normalisation,
    Rescaling, Dense, Dropout), and a backward function giving the gradient of
    ``upstream . logits`` with respect to ``x``: the exact, closed-form gradient of headstart's
    head on any backend."""
    backward_steps = []
    for layer in head.layers:
        if isinstance(layer, keras.layers.InputLayer | keras.layers.Dropout):
            continue  # Dropout is the identity at inference
        if isinstance(layer, keras.layers.UnitNormalization):
            norm = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            x = x / norm  # d(x/|x|) = (I - u u^T) / |x|
            backward_steps.append(
                lambda g, u=x, norm=norm: (g - u * np.sum(u * g, axis=1, keepdims=True)) / norm
            )
            continue
        if isinstance(layer, keras.layers.Rescaling):
            scale = float(np.asarray(layer.scale))
            x = x * scale + float(np.asarray(layer.offset))
            backward_steps.append(lambda g, scale=scale: g * scale)
            continue
        if not isinstance(layer, keras.layers.Dense):
            raise UsageError(f"Grad-CAM: unsupported head layer {type(layer).__name__}")
        kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
        bias = keras.ops.convert_to_numpy(layer.bias).astype(np.float64) if layer.use_bias else 0
        z = x @ kernel + bias
        # by name: keras.activations.serialize takes seconds on JAX
        activation = getattr(layer.activation, "__name__", repr(layer.activation))
        if activation == "relu":
            mask = (z > 0).astype(np.float64)
            x = z * mask
        elif activation == "linear":
            mask = np.ones_like(z)
            x = z
        else:
            raise UsageError(f"Grad-CAM: unsupported head activation {activation!r}")
        backward_steps.append(lambda g, kernel=kernel, mask=mask: (g * mask) @ kernel.T)

    def backward(upstream: np.ndarray) -> np.ndarray:
        grad = upstream
        for step in reversed(backward_steps):
            grad = step(grad)
        return grad

    return x, backward


def explain(
    run: str | Path,
    paths: list[str],
    *,
    out: str | Path | None = None,
    target: str | None = None,
    batch_size: int = 32,
) -> list[Path]:
    """Write one Grad-CAM PNG per image (image beside its overlay) to ``out``
    (default ``RUN/explain/``); ``target`` explains that class instead of the predicted one."""
    run_dir = runs.open_run_dir(run)
    runs.refuse_multi_label(run_dir, "explain")
    model = runs.load_model(run_dir, len(runs.read_labels(run_dir)))
    class_names = runs.read_labels(run_dir)
    if target is not None and target not in class_names:
        raise UsageError(f"--class {target!r} is not one of the run's labels {class_names}")
    out_dir = Path(out) if out else run_dir / EXPLAIN_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    size = tuple(model.input_shape[1:3])
    images, names = [], []
    for path in find_images(paths):
        try:
            images.append(read_image(path, size))
            names.append(path)
        except UnreadableImage as error:
            log.warning("skipped %s: %s", path, error)
    if not images:
        raise UsageError("no readable images to explain")
    written: list[Path] = []
    used_names: set[str] = set()
    for start in range(0, len(images), batch_size):
        batch = np.stack(images[start : start + batch_size])
        classes = None if target is None else [class_names.index(target)] * len(batch)
        result = gradcam(model, batch, classes)
        for i, path in enumerate(names[start : start + batch_size]):
            chosen, predicted = int(result.classes[i]), int(result.probabilities[i].argmax())
            title = (
                f"{Path(path).name}: predicted {class_names[predicted]} "
                f"({result.probabilities[i, predicted]:.2f})\n"
                f"Grad-CAM for {class_names[chosen]} on {result.layer}"
            )
            name = _unique(f"{Path(path).stem}_gradcam.png", used_names)
            written.append(
                figures.gradcam_pair(batch[i], result.heatmaps[i], title, out_dir / name)
            )
    return written


def _unique(name: str, used: set[str]) -> str:
    stem, suffix = name.rsplit(".", 1)
    candidate, index = name, 1
    while candidate in used:
        index += 1
        candidate = f"{stem}_{index}.{suffix}"
    used.add(candidate)
    return candidate

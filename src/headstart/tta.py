"""Test-time augmentation: average a model's class probabilities over a few fixed views.

The views are deterministic (the same image always gives the same answer): the image itself,
its horizontal mirror, then 90% crops (centre and corners, some mirrored) resized back to the
model's input size. ``views=1`` is plain prediction, computed by the very same calls.

A horizontal flip is only label-safe when a mirrored image belongs to the same class: not for
text, digits, arrows, or classes that differ by left and right.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from headstart.errors import UsageError
from headstart.metrics import probabilities_from_logits

CROP = 0.9  # side of a cropped view, as a fraction of the image
# (mirror?, crop position or None for the whole image), in the order views are added
VIEWS: tuple[tuple[bool, str | None], ...] = (
    (False, None),
    (True, None),
    (False, "centre"),
    (False, "top-left"),
    (False, "bottom-right"),
    (True, "centre"),
    (False, "top-right"),
    (False, "bottom-left"),
    (True, "top-left"),
    (True, "bottom-right"),
)
MAX_VIEWS = len(VIEWS)


def check_views(views: int) -> int:
    """``views`` if it is a valid ``--tta`` value, else a UsageError naming the range."""
    if isinstance(views, bool) or not isinstance(views, int) or not 1 <= views <= MAX_VIEWS:
        raise UsageError(
            f"--tta must be an integer from 1 (no test-time augmentation) to {MAX_VIEWS}, "
            f"got {views!r}"
        )
    return views


def describe(views: int) -> list[str]:
    """Human names of the first ``views`` views, for evaluation.json."""
    names = []
    for mirror, crop in VIEWS[:views]:
        parts = (["flip"] if mirror else []) + ([f"crop {crop}"] if crop else [])
        names.append(" + ".join(parts) or "original")
    return names


def augmented_views(images: np.ndarray, views: int) -> list[np.ndarray]:
    """The first ``views`` views of a (B, H, W, C) batch, each the batch's shape and dtype."""
    images = np.asarray(images)
    height, width = images.shape[1:3]
    out = []
    for mirror, crop in VIEWS[: check_views(views)]:
        view = images[:, :, ::-1] if mirror else images
        if crop is not None:
            view = _crop_resized(view, crop, height, width)
        out.append(np.ascontiguousarray(view, dtype=images.dtype))
    return out


def _crop_resized(images: np.ndarray, where: str, height: int, width: int) -> np.ndarray:
    ch, cw = max(1, round(height * CROP)), max(1, round(width * CROP))
    top = {"centre": (height - ch) // 2}.get(where, 0 if "top" in where else height - ch)
    left = {"centre": (width - cw) // 2}.get(where, 0 if "left" in where else width - cw)
    crop = images[:, top : top + ch, left : left + cw].astype("float32")
    resized = keras.ops.image.resize(crop, (height, width), interpolation="bilinear")
    return keras.ops.convert_to_numpy(resized)


def tta_probabilities(
    probabilities_of: Callable[[np.ndarray], np.ndarray], images: np.ndarray, views: int = 1
) -> np.ndarray:
    """(B, classes) probabilities averaged over the first ``views`` views of a batch of raw
    images (B, H, W, 3) at the model's input size.

    ``probabilities_of`` maps a float32 batch to probabilities: a `Predictor`, or
    `keras_probabilities(model)`. With ``views=1`` it is called once, on the batch itself.
    """
    images = np.asarray(images, dtype="float32")
    if check_views(views) == 1:
        return probabilities_of(images)
    total = sum(np.asarray(probabilities_of(view)) for view in augmented_views(images, views))
    return total / views


def keras_probabilities(model) -> Callable[[np.ndarray], np.ndarray]:
    """A Keras classifier (logits out) as a function from a batch to probabilities."""
    return lambda images: probabilities_from_logits(np.asarray(model.predict_on_batch(images)))

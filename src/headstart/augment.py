"""``--augment`` specs ("flip,rotate=0.1,zoom=0.2") parsed into Keras augmentation layers."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from headstart.errors import UsageError

_FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")

AUTO = "auto"  # --augment auto: the policy is chosen on validation among AUTO_CANDIDATES
SEEDS_POLICY = "flip,rotate=0.1,zoom=0.2"  # the seeds' RandomFlip, RandomRotation, RandomZoom
# Simplest first, growing stronger: the search stops at the first candidate that does worse
# than the best before it, and on an exact tie of validation accuracy and loss the earlier one
# wins. Every augmented candidate flips, so where left and right differ only "none" is safe.
AUTO_CANDIDATES = (
    "none",
    "flip",
    "flip,translate=0.1",
    SEEDS_POLICY,
    "flip,rotate=0.15,zoom=0.3,translate=0.15,contrast=0.3",
)


def parse_augment(spec: str) -> dict[str, float | str]:
    """Validate a spec into {name: value}; "none" or "" gives {} (no augmentation)."""
    spec = spec.strip().lower()
    if spec in ("", "none"):
        return {}
    parsed: dict[str, float | str] = {}
    for token in spec.split(","):
        name, _, value = token.strip().partition("=")
        if name == "flip":
            mode = value or "horizontal"
            if mode not in _FLIP_MODES:
                raise UsageError(f"--augment flip={mode}: choose one of {', '.join(_FLIP_MODES)}")
            parsed[name] = mode
        elif name in ("rotate", "zoom", "translate", "contrast", "brightness"):
            parsed[name] = _fraction(name, value)
        else:
            raise UsageError(
                f"--augment: unknown {name!r}; use flip[=mode], rotate=F, zoom=F, translate=F, "
                "contrast=F, brightness=F, or none"
            )
    return parsed


def _fraction(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"--augment {name}: needs a number, e.g. {name}=0.1") from None
    if not 0 < number <= 1:
        raise UsageError(f"--augment {name}={value}: must be in (0, 1]")
    return number


def build_augmenter(spec: str, seed: int = 0) -> keras.layers.Pipeline | None:
    """The seeds' augmentation layers (RandomFlip, RandomRotation, RandomZoom, ...) or None.

    A ``keras.layers.Pipeline``, not a ``Sequential``: inside a tf.data map it runs on
    TensorFlow whatever the Keras backend (a Sequential on JAX fails on symbolic tensors)."""
    parsed = parse_augment(spec)
    if not parsed:
        return None
    makers = {
        "flip": lambda v: layers.RandomFlip(v, seed=seed),
        "rotate": lambda v: layers.RandomRotation(v, fill_mode="reflect", seed=seed + 1),
        "zoom": lambda v: layers.RandomZoom(v, fill_mode="reflect", seed=seed + 2),
        "translate": lambda v: layers.RandomTranslation(v, v, fill_mode="reflect", seed=seed + 3),
        "contrast": lambda v: layers.RandomContrast(v, seed=seed + 4),
        "brightness": lambda v: layers.RandomBrightness(v, value_range=(0, 255), seed=seed + 5),
    }
    return keras.layers.Pipeline(
        [makers[name](value) for name, value in parsed.items()], name="augmentation"
    )


def augment_images(augmenter: keras.layers.Pipeline, images: np.ndarray) -> np.ndarray:
    """One batch through ``augmenter`` in training mode, as NumPy: called directly on
    TensorFlow, in a tf.data map elsewhere (as training runs it; an eager call on JAX compiles
    each random op on its own: 3 s for the report's 9 images of a 32-px run)."""
    if keras.backend.backend() == "tensorflow":
        return keras.ops.convert_to_numpy(augmenter(images, training=True))
    views = tf.data.Dataset.from_tensors(images).map(lambda x: augmenter(x, training=True))
    return next(iter(views)).numpy()

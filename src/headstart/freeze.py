"""Freezing policy: which backbone layers train, and what happens to BatchNormalization.

One place decides it, so ``--unfreeze`` and ``--bn`` mean the same thing everywhere.
"""

from __future__ import annotations

import keras

from headstart.backbones import Backbone, default_unfreeze, unfreeze_units
from headstart.errors import UsageError


def resolve_unfreeze(spec: str | int, backbone: Backbone, base: keras.Model) -> int:
    """``--unfreeze`` as a number of top layers of ``base.layers`` (the seeds' ``layers[-N:]``),
    or of the backbone's own units (`headstart.backbones.unfreeze_units`: a ViT's blocks)."""
    total = len(unfreeze_units(backbone, base))
    text = str(spec).strip().lower()
    if text == "default":
        return default_unfreeze(backbone, base)
    if text == "all":
        return total
    if text == "none":
        return 0
    try:
        count = int(text)
    except ValueError:
        raise UsageError(
            f"--unfreeze {spec!r}: expected a number of layers, 'all' or 'none'"
        ) from None
    if not 0 <= count <= total:
        raise UsageError(f"--unfreeze {count}: {backbone.name} has {total} layers")
    return count


def freeze(base: keras.Model) -> None:
    """Freeze every weight of the base (workflow 1 and 2, stage 1)."""
    base.trainable = False


def unfreeze_top(
    base: keras.Model, count: int, bn: str = "frozen", backbone: Backbone | None = None
) -> None:
    """Make the top ``count`` layers of ``base`` trainable, the rest frozen (the top ``count``
    of ``backbone``'s units, when given: `headstart.backbones.unfreeze_units`).

    ``bn="frozen"`` keeps BatchNormalization layers frozen (the VGG16 fine-tuning article);
    ``bn="inference"`` lets their gamma/beta train while the moving statistics stay fixed,
    because the base always runs with ``training=False`` (the Keras guide). Recompile the model
    afterwards.
    """
    base.trainable = True  # every layer, and the layers inside layers
    layers = unfreeze_units(backbone, base) if backbone is not None else base.layers
    first = len(layers) - count
    for index, layer in enumerate(layers):
        is_batch_norm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = index >= first and not (is_batch_norm and bn == "frozen")

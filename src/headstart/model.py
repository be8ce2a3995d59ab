"""The classifier: raw RGB input -> preprocessing -> backbone (inference mode) -> head.

Every piece is a standard Keras layer, so the saved ``.keras`` file loads anywhere with
``keras.saving.load_model`` and takes images as they come (0..255 RGB).
"""

from __future__ import annotations

import dataclasses
import io
import random
import re
from typing import Any

import keras
import numpy as np
from keras import layers

from headstart.augment import AUTO
from headstart.backbones import (
    FUSION_SEPARATOR,
    Backbone,
    build_backbone,
    preprocessing_layers,
)
from headstart.config import Config
from headstart.errors import UsageError
from headstart.freeze import resolve_unfreeze

CLASSIFIER_NAME = "classifier"
FEATURES_NAME = "features"
TEMPERATURE_NAME = "temperature"  # --calibrate: the Rescaling layer that divides logits by T


def output_units(n_classes: int, multi_label: bool = False) -> int:
    """One logit for two classes (sigmoid), one per class otherwise (softmax); multi-label: one
    per label, each its own sigmoid."""
    return 1 if n_classes == 2 and not multi_label else n_classes


def build_head(
    feature_dim: int,
    n_classes: int,
    hidden: int,
    dropout: float,
    feature_norm: str = "none",
    head_builder=None,
    multi_label: bool = False,
) -> keras.Model:
    """The new classifier trained on pooled features:
    [L2 normalisation] -> [Dense(hidden)] -> [Dropout] -> logits (zero-initialised).

    ``feature_norm="l2"`` puts every feature vector on the sphere of radius sqrt(dim): its
    direction alone decides the class, at the scale (unit RMS per dimension) at which the
    default learning rate suits a linear layer; no custom layer, so the file loads anywhere.
    ``head_builder(features, n_classes) -> logits`` replaces it with the user's own layers
    (``output_units(n_classes)`` logits), still on pooled features so it trains on the cache.
    ``multi_label``: one logit per label (`output_units`).
    """
    inputs = keras.Input((feature_dim,), name="pooled_features")
    units = output_units(n_classes, multi_label)
    if head_builder is not None:
        return _custom_head(inputs, n_classes, head_builder, units)
    x = inputs
    if feature_norm == "l2":
        x = layers.UnitNormalization(name="l2_normalize")(x)
        x = layers.Rescaling(float(np.sqrt(feature_dim)), name="l2_scale")(x)
    if hidden:
        x = layers.Dense(hidden, activation="relu", name="hidden")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    # Zero-initialised: training starts from uniform predictions instead of a random linear map
    # of the features, which a few hundred images cannot fully undo (+0.2 to +0.9 points of
    # test accuracy on Fashion-MNIST features, bench/head_options.py; MAE's linear-probe practice).
    outputs = layers.Dense(units, kernel_initializer="zeros", name="logits")(x)
    return keras.Model(inputs, outputs, name=CLASSIFIER_NAME)


def _custom_head(inputs, n_classes: int, head_builder, units: int) -> keras.Model:
    name = getattr(head_builder, "__name__", "head_builder")
    outputs = head_builder(inputs, n_classes)
    if not isinstance(outputs, keras.KerasTensor) or tuple(outputs.shape) != (None, units):
        shape = getattr(outputs, "shape", type(outputs).__name__)
        raise UsageError(
            f"head_builder {name} returned {shape}: it must return a (None, {units}) logits "
            f"tensor built from its features argument (one logit per class, one for two "
            f"classes, one per label for multi-label: {units})"
        )
    return keras.Model(inputs, outputs, name=CLASSIFIER_NAME)


def build_model(
    backbone: Backbone,
    base: keras.Model,
    n_classes: int,
    *,
    head: str = "gap",
    hidden: int = 0,
    dropout: float = 0.2,
    feature_norm: str = "none",
    head_builder=None,
    multi_label: bool = False,
) -> keras.Model:
    """Assemble the full model around an already built ``base``.

    A pretrained base is called with ``training=False`` as in the Keras guide; note that Keras 3's
    ``fit`` overrides it, which is why training goes through ``trainer_for`` instead.
    A fusion (``backbone.parts``) takes its two bases as a tuple: see `_fused_features`.
    """
    if backbone.parts:
        inputs = keras.Input(base[0].input_shape[1:], name="image")
        features = _fused_features(backbone, base, inputs, head)
    else:
        inputs = keras.Input(base.input_shape[1:], name="image")
        output = _backbone_output(backbone, base, inputs)
        features = pooling(head, output)(name=FEATURES_NAME)(output)
    classifier = build_head(
        features.shape[-1], n_classes, hidden, dropout, feature_norm, head_builder, multi_label
    )
    name = keras_name(backbone.name.replace("+", "_and_"))
    return keras.Model(inputs, classifier(features), name=f"headstart_{name}")


def pooling(head: str, output) -> type[keras.layers.Layer]:
    """The pooling layer class for ``--head`` over a backbone's output: a feature map
    (batch, h, w, c), or a transformer's tokens (batch, tokens, d), whose "gap" is their mean
    (keras-hub's ViT classifier's ``pooling="avg"``)."""
    if head != "gap":
        return layers.Flatten
    tokens = len(output.shape) == 3
    return layers.GlobalAveragePooling1D if tokens else layers.GlobalAveragePooling2D


def keras_name(name: str) -> str:
    """``name`` as a Keras layer name: no "/" or ":" (a hub backbone's preset path)."""
    return re.sub(r"[^\w.+-]", "_", name)


def _backbone_output(backbone: Backbone, base: keras.Model, images, suffix: str = ""):
    """Raw images -> the backbone's own preprocessing -> its output feature map."""
    x = images
    for layer in preprocessing_layers(backbone, suffix):
        x = layer(x)
    return base(x, training=False) if backbone.pretrained else base(x)


def pooled_name(backbone: Backbone) -> str:
    """The pooling layer of one backbone of a fusion (its features, before concatenation)."""
    return f"pooled_{keras_name(backbone.name)}"


def _fused_features(backbone: Backbone, bases, images, head: str):
    """The advanced-tools chapter's models used as layers: the same image through both
    backbones, each with its own preprocessing and pooling, concatenated into the one
    ``features`` layer that the head, the feature cache and Grad-CAM's checks know."""
    pooled = []
    for part, base in zip(backbone.parts, bases, strict=True):
        output = _backbone_output(part, base, images, f"_{keras_name(part.name)}")
        pooled.append(pooling(head, output)(name=pooled_name(part))(output))
    return layers.Concatenate(name=FEATURES_NAME)(pooled)


class _InferenceModeBackbone(keras.Model):
    """Training view of a model: the backbone part always runs in inference mode.

    Keras 3's ``fit`` passes ``training=True`` into nested models, overriding the functional
    ``base(x, training=False)`` (keras-team/keras#20285), so an unfrozen BatchNormalization
    would normalise with batch statistics and update its moving averages. Calling the
    preprocessing + backbone part with ``training=False`` here keeps BN in inference mode for
    either ``--bn`` policy, while the head's Dropout still follows ``fit``. The weights are
    the full model's own: only the full model is ever saved.
    """

    def __init__(self, model: keras.Model):
        super().__init__(name=f"{model.name}_trainer")
        self.body = feature_extractor(model)
        self.head = classifier_of(model)

    def call(self, images, training=None):
        return self.head(self.body(images, training=False), training=training)


def trainer_for(model: keras.Model, backbone: Backbone) -> keras.Model:
    """The model to ``fit``: an inference-mode-backbone view for pretrained bases; a
    from-scratch model trains as it is (its BatchNorm must learn statistics)."""
    return _InferenceModeBackbone(model) if backbone.pretrained else model


def feature_extractor(model: keras.Model) -> keras.Model:
    """Input -> pooled backbone features: the part that is frozen during head training."""
    return keras.Model(model.input, model.get_layer(FEATURES_NAME).output, name="extractor")


def classifier_of(model: keras.Model) -> keras.Model:
    return model.get_layer(CLASSIFIER_NAME)


def base_of(model: keras.Model, backbone: Backbone) -> keras.Model:
    return model.get_layer(backbone_layer_name(model))


def backbone_layer_name(model: keras.Model) -> str:
    """The nested base is the only functional sub-model besides the classifier (a fusion
    model has two: a one-line UsageError names them)."""
    names = [
        layer.name
        for layer in model.layers
        if isinstance(layer, keras.Model) and layer.name != CLASSIFIER_NAME
    ]
    if not names:
        raise ValueError("model has no backbone sub-model")
    if len(names) > 1:
        raise UsageError(f"a two-backbone fusion model has no single backbone ({', '.join(names)})")
    return names[0]


def infer(model: keras.Model, images) -> np.ndarray:
    """``model``'s inference outputs for one batch, as NumPy. TensorFlow runs a direct call
    eagerly (a fresh ``predict`` function per model would make it warn about retracing); JAX
    would compile every operation of an eager call on its own (Grad-CAM of Lite0 on a small
    batch: 6.5 s against 0.8 s), so there the batch goes through ``predict_on_batch``, one
    compiled program."""
    if keras.backend.backend() == "jax":
        return np.asarray(model.predict_on_batch(images))
    return keras.ops.convert_to_numpy(model(images, training=False))


def parameter_counts(model: keras.Model) -> dict[str, int]:
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    total = sum(int(w.numpy().size) for w in model.weights)
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


def summary_text(model: keras.Model) -> str:
    """``model.summary(show_trainable=True)`` as text, ending with the machine-readable counts."""
    buffer = io.StringIO()
    model.summary(show_trainable=True, print_fn=lambda line, **_: buffer.write(line + "\n"))
    counts = parameter_counts(model)
    buffer.write(
        f"total={counts['total']} trainable={counts['trainable']} "
        f"non_trainable={counts['non_trainable']}\n"
    )
    return buffer.getvalue()


def temperature_of(model: keras.Model) -> float:
    """The model's temperature: 1.0 when it is not calibrated."""
    if TEMPERATURE_NAME not in [layer.name for layer in model.layers]:
        return 1.0
    return 1.0 / float(model.get_layer(TEMPERATURE_NAME).scale)


# ----------------------------------------------------------------------------- from a config


def build_from_config(config: Config, backbone: Backbone, n_classes: int, head_builder=None):
    """The run's full model and its base (a tuple of two for a fusion), initialised from the
    seed: the same on every call with one config, so a resumed run and every process of a
    distributed one build the very same weights."""
    model, seeded = build_seeded(config, backbone, n_classes, head_builder)
    return model, seeded.base


@dataclasses.dataclass(frozen=True)
class SeededBase:
    """A base built from a config's seed, and where it left Python's and NumPy's random
    generators: the rest of the model (the head's initial weights, its dropout's seed) is
    drawn from there (`build_on_base`)."""

    base: Any  # a keras.Model, or a fusion's two
    python_state: tuple
    numpy_state: tuple


def build_seeded(
    config: Config, backbone: Backbone, n_classes: int, head_builder=None
) -> tuple[keras.Model, SeededBase]:
    """`build_from_config`, with the base's `SeededBase` for `build_on_base`."""
    keras.utils.set_random_seed(config.seed)
    base = _bases(config, backbone)
    seeded = SeededBase(base, random.getstate(), np.random.get_state())
    return _around(config, backbone, base, n_classes, head_builder), seeded


def build_on_base(
    config: Config, backbone: Backbone, n_classes: int, seeded: SeededBase, head_builder=None
) -> keras.Model:
    """The model `build_from_config` builds with ``config`` (another head input, say), built
    around ``seeded``'s base as it is: the same backbone, size and weights from the same seed,
    not trained since. The random generators start where building that base left them, so the
    head is drawn as a whole build draws it, without building and loading the backbone again
    (a second Lite0 was 2-8 s, most on JAX; a large keras-hub backbone, more)."""
    keras.utils.set_random_seed(config.seed)
    random.setstate(seeded.python_state)
    np.random.set_state(seeded.numpy_state)
    return _around(config, backbone, seeded.base, n_classes, head_builder)


def _around(config: Config, backbone: Backbone, base, n_classes: int, head_builder):
    return build_model(
        backbone,
        base,
        n_classes,
        head=config.head,
        hidden=config.hidden,
        dropout=config.dropout,
        feature_norm="none" if config.feature_norm == AUTO else config.feature_norm,
        head_builder=head_builder,
        multi_label=bool(config.multi_label),
    )


def _bases(config: Config, backbone: Backbone):
    """The base, or a fusion's two as a tuple: each built from the seed as if it were alone,
    so that random weights (and so their cached features) are a single-backbone run's."""
    if not backbone.parts:
        return build_backbone(backbone, config.image_size, config.weights)
    bases = []
    for part, weights in zip(backbone.parts, per_part(config.weights, backbone), strict=True):
        keras.utils.set_random_seed(config.seed)
        bases.append(build_backbone(part, config.image_size, weights))
    return tuple(bases)


def per_part(value: str, backbone: Backbone) -> list[str]:
    """A fusion's "V1+V2" setting (``--weights``, ``--unfreeze``) as one value per backbone;
    a single value applies to both."""
    values = str(value).split(FUSION_SEPARATOR)
    return values if len(values) == len(backbone.parts) else [str(value)] * len(backbone.parts)


def base_parts(backbone: Backbone, base) -> list[tuple[Backbone, keras.Model]]:
    """(backbone, base) pairs: one for a single backbone, two for a fusion."""
    if not backbone.parts:
        return [(backbone, base)]
    return list(zip(backbone.parts, base, strict=True))


def unfreeze_counts(spec: str, backbone: Backbone, base) -> str:
    """``--unfreeze`` as layer counts, "N" or a fusion's "N1+N2": each base's top block by its
    own default, or the same given spec for both."""
    specs = per_part(spec, backbone) if backbone.parts else [spec]
    counts = [
        resolve_unfreeze(each, part, part_base)
        for each, (part, part_base) in zip(specs, base_parts(backbone, base), strict=True)
    ]
    return FUSION_SEPARATOR.join(str(count) for count in counts)


def compile_for(
    model: keras.Model,
    n_classes: int,
    learning_rate: float,
    *,
    weighted: bool = False,
    multi_label: bool = False,
    steps_per_execution: int = 1,
) -> None:
    """Logit outputs: binary cross-entropy for 2 classes, sparse categorical otherwise.

    ``weighted``: accuracy counts sample weights (``--distributed``, where validation's padding
    rows have weight 0, see `distributed.cluster.even_batches`; training accuracy then also
    counts --class-weight's weights). ``multi_label``: binary cross-entropy on each label's
    logit (0/1 targets, one column per label), and "accuracy" is the share of right yes/no
    decisions at probability 0.5 over images and labels. ``steps_per_execution``: batches per
    call of the compiled step (Keras's option: the same weights, fewer calls from Python;
    per-batch callbacks see only every so many batches)."""
    if n_classes == 2 or multi_label:
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        accuracy = keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    metrics = {"weighted_metrics" if weighted else "metrics": [accuracy]}
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=loss,
        steps_per_execution=steps_per_execution,
        **metrics,
    )
    # built now rather than in the first trace of the train step: on TensorFlow, variables
    # made while tracing have the step traced twice (a second each on a large top)
    model.optimizer.build(model.trainable_variables)

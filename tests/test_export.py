"""headstart export: every format is checked against model.keras when it is made, and the
artifact is usable by predict; a failed check or a missing runtime leaves nothing behind."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from headstart import predict
from headstart.cli import main
from headstart.deploy.export import FORMATS, ExportCheckFailed, export
from headstart.deploy.predictor import EXPORT_FILE, RUNTIMES, Predictor, load_predictor
from headstart.errors import UsageError

pytestmark = pytest.mark.slow  # end-to-end training runs of several seconds each

export_module = sys.modules["headstart.deploy.export"]
predictor_module = sys.modules["headstart.deploy.predictor"]

_NEEDS = {
    "saved_model": ("tensorflow",),
    "onnx": ("onnxruntime", "tf2onnx", "onnx"),
    "litert": ("ai_edge_litert",),
    "openvino": ("openvino",),
}
_ARTIFACT = {
    "saved_model": "saved_model",
    "onnx": "model.onnx",
    "litert": "model.tflite",
    "openvino": "model.xml",
}


def _needs(format: str):
    missing = [m for m in _NEEDS[format] if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"{format} needs {missing}: pip install -e '.[export]'"
    )


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="module")
def images(tiny_folder) -> list[str]:
    return sorted(str(p) for p in tiny_folder.rglob("*_00[0-3].*"))


@pytest.mark.parametrize("format", [pytest.param(f, marks=_needs(f)) for f in FORMATS])
def test_float_export_answers_like_model_keras(format, tiny_run, exports, images):
    result = export(tiny_run, format, out=exports / format)
    folder = result.path
    record = json.loads((folder / EXPORT_FILE).read_text())
    assert record == result.record
    check = record["check"]
    assert check["passed"] and check["top1_agreement"] == 1.0
    assert check["max_abs_prob_diff"] <= 1e-4
    assert check["images"] >= 1 and "test images of the run" in check["source"]
    assert check["accuracy_export"] == check["accuracy_keras"]
    assert record["format"] == format and record["quantize"] == "none"
    assert record["artifact"] == _ARTIFACT[format] and (folder / record["artifact"]).exists()
    assert record["runtime"]["name"] == RUNTIMES[format].distribution
    assert record["runtime"]["version"] not in ("", "unknown")
    assert record["size_bytes"] > 10_000 and record["image_size"] == [32, 32]
    assert json.loads((folder / "labels.json").read_text()) == ["cat", "dog"]
    assert _leftovers(exports) == []

    # predict accepts the export folder (and the model file in it) like a run folder
    expected = predict(tiny_run, images, top_k=2)
    for source in (folder, folder / record["artifact"]):
        got = predict(source, images, top_k=2)
        for a, b in zip(expected, got, strict=True):
            assert [label for label, _ in a.top] == [label for label, _ in b.top]
            assert np.allclose([p for _, p in a.top], [p for _, p in b.top], atol=1e-4)


@_needs("litert")
def test_quantized_export_is_smaller_and_passes_its_check(tiny_run, exports):
    floating = load_predictor(exports / "litert") if (exports / "litert").exists() else None
    result = export(tiny_run, "litert", quantize="dynamic", out=exports / "litert-dynamic")
    check = result.record["check"]
    assert check["top1_agreement"] >= 0.99
    assert check["accuracy_keras"] - check["accuracy_export"] <= 0.01
    assert result.record["thresholds"] == {"min_top1_agreement": 0.99, "max_accuracy_drop": 0.01}
    if floating is not None:  # int8 weights: about a quarter of the float file
        float_size = json.loads((exports / "litert" / EXPORT_FILE).read_text())["size_bytes"]
        assert result.record["size_bytes"] < 0.5 * float_size


@_needs("onnx")
def test_failed_check_exits_1_says_what_differed_and_keeps_nothing(
    tiny_run, tmp_path, monkeypatch, capsys
):
    real = export_module.load_artifact

    def off_by_a_little(folder):  # an artifact whose logits drift by 0.01
        loaded = real(folder)
        return Predictor(
            loaded.class_names, loaded.image_size, lambda x: loaded.logits(x) + 0.01, "drifting"
        )

    monkeypatch.setattr(export_module, "load_artifact", off_by_a_little)
    out = tmp_path / "exports" / "onnx"
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("headstart: error: the onnx export does not answer like model.keras")
    assert "max probability difference" in error and "must be <= 1e-4" in error
    assert "\n" not in error
    assert not out.exists() and _leftovers(out.parent) == []
    with pytest.raises(ExportCheckFailed):
        export(tiny_run, "onnx", out=out)


@_needs("onnx")
def test_run_without_test_images_is_checked_on_generated_images(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "predictions.csv").unlink()
    check = export(run, "onnx").record["check"]
    assert "generated images" in check["source"] and check["images"] == 32
    assert check["top1_agreement"] == 1.0 and "accuracy_keras" not in check
    assert (run / "exports" / "onnx" / "model.onnx").is_file()  # the default destination


def test_a_missing_runtime_is_one_line_naming_the_extra(tiny_run, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        predictor_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real(name, *a),
    )
    out = tmp_path / "onnx"
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "headstart: error: format onnx needs the Python package(s) onnxruntime: "
        "pip install 'headstart[export]'"
    )
    assert not out.exists()


def test_bad_options_are_usage_errors(tiny_run, tmp_path):
    with pytest.raises(UsageError, match="--format must be one of"):
        export(tiny_run, "coreml")
    with pytest.raises(UsageError, match="--quantize must be one of"):
        export(tiny_run, "litert", quantize="int4")
    with pytest.raises(UsageError, match="SavedModel is exported as float32"):
        export(tiny_run, "saved_model", quantize="int8")
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        export(tiny_run, "saved_model", out=tmp_path / "taken")
    with pytest.raises(UsageError, match="run folder not found"):
        export(tmp_path / "nowhere", "saved_model")


@pytest.mark.integration
@_needs("onnx")
@_needs("openvino")
def test_default_backbone_exports_pass_their_checks(tiny_folder, tmp_path):
    """The real EfficientNet-Lite0 (depthwise convolutions, its own layers) through two more
    runtimes: each float export agrees with model.keras. (All four formats on the demo run:
    README, "Export and serve".)"""
    from headstart import Config, train

    config = Config(
        data=str(tiny_folder),
        out=str(tmp_path / "lite0"),
        image_size=32,  # Lite0's smallest input: every layer is exported all the same
        epochs=1,
        fine_tune=False,
        augment="none",
        views=0,
        batch_size=8,
        report=False,
        quiet=True,
    )
    run = train(config).run_dir
    for format in ("onnx", "openvino"):
        check = export(run, format).record["check"]
        assert check["top1_agreement"] == 1.0 and check["max_abs_prob_diff"] <= 1e-4, format

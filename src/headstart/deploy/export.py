"""Export a run's model for another runtime, and prove that the artifact answers like it.

Each format goes through Keras' own ``model.export`` (quantized variants through the runtime's
own quantizer). The artifact takes raw RGB 0..255 images and gives logits, like ``model.keras``.
Before anything is kept, the artifact is loaded by its own runtime and run on up to 200 of the
run's test images (generated images when the run has none) beside ``model.keras``:

- float exports must agree on every top-1 answer, with probabilities within 1e-4;
- quantized exports must agree on at least 99% of top-1 answers and lose at most one point of
  accuracy.

The figures go to ``export.json``; a failed check raises `ExportCheckFailed` and leaves nothing
behind (the export is built in a hidden folder beside its destination and renamed at the end).
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from headstart import files, runs
from headstart._version import __version__
from headstart.data import UnreadableImage, read_image
from headstart.deploy.predictor import (
    EXPORT_FILE,
    RUNTIMES,
    Predictor,
    keras_predictor,
    load_artifact,
    require_runtime,
)
from headstart.errors import UsageError
from headstart.splits import load_image_folder

log = logging.getLogger(__name__)

FORMATS = ("saved_model", "onnx", "litert", "openvino")
QUANTIZE = ("none", "dynamic", "int8")
EXPORTS_DIR = "exports"  # default parent of exports, inside the run
CHECK_IMAGES = 200
FLOAT_MAX_PROB_DIFF = 1e-4
QUANTIZED_MIN_AGREEMENT = 0.99
QUANTIZED_MAX_ACCURACY_DROP = 0.01
PREDICTIONS_FILE = "predictions.csv"

_KERAS_FORMAT = {
    "saved_model": "tf_saved_model",
    "onnx": "onnx",
    "litert": "litert",
    "openvino": "openvino",
}
_ARTIFACT = {
    "saved_model": "saved_model",
    "onnx": "model.onnx",
    "litert": "model.tflite",
    "openvino": "model.xml",  # + model.bin
}
_CONVERTERS = {"onnx": ("tf2onnx", "onnx")}  # needed to export, beside the runtime
_QUANTIZERS = {"openvino": ("nncf",)}  # needed to quantize, beside the runtime
_BATCH = 32


class ExportCheckFailed(RuntimeError):
    """The artifact does not answer like model.keras; nothing was kept. The CLI exits 1."""


@dataclass(frozen=True)
class ExportResult:
    path: Path  # the export folder: artifact, labels.json, export.json
    record: dict  # what export.json holds


@dataclass(frozen=True)
class _CheckSet:
    images: np.ndarray  # (N, h, w, 3) float32 0..255
    labels: np.ndarray | None  # true class per image, None for generated images
    source: str


def export(
    run: str | Path,
    format: str,
    *,
    quantize: str = "none",
    out: str | Path | None = None,
    max_images: int = CHECK_IMAGES,
) -> ExportResult:
    """Export ``run``'s model.keras as ``format`` into ``out`` (default
    ``RUN/exports/<format>[-<quantize>]``), checked against model.keras; see the module doc."""
    _check_options(format, quantize, max_images)
    require_runtime(format, also=_CONVERTERS.get(format, ()) + _extra_quantizer(format, quantize))
    run_dir = runs.open_run_dir(run)
    name = format if quantize == "none" else f"{format}-{quantize}"
    destination = Path(out) if out else run_dir / EXPORTS_DIR / name
    if destination.exists():
        raise UsageError(f"{destination} already exists: give another --out or delete it")
    reference = keras_predictor(run_dir)
    check = _check_images(run_dir, reference, max_images)
    expected = _probabilities(reference, check.images)  # also builds the model, as export needs
    destination.parent.mkdir(parents=True, exist_ok=True)
    building = destination.with_name(
        f".{destination.name}.{os.getpid()}-{secrets.token_hex(4)}{files.TEMP_MARK}"
    )
    building.mkdir()
    try:
        calibration = _calibration(run_dir, reference, check) if quantize == "int8" else None
        artifact = _build(
            reference.model, format, quantize, building / _ARTIFACT[format], calibration
        )
        files.write_json(building / runs.LABELS_FILE, reference.class_names)
        if reference.multi_label:  # the thresholds travel with the model
            thresholds = dict(zip(reference.class_names, reference.thresholds, strict=True))
            record = {**runs.read_json(run_dir / runs.THRESHOLDS_FILE), "thresholds": thresholds}
            files.write_json(building / runs.THRESHOLDS_FILE, record)
        record = _record(run_dir, reference, format, quantize, artifact, calibration)
        files.write_json(building / EXPORT_FILE, record)  # the artifact's loader reads it
        figures = _compare(expected, _probabilities(load_artifact(building), check.images), check)
        failures = _failures(figures, quantized=quantize != "none")
        if failures:
            raise ExportCheckFailed(
                f"the {name} export does not answer like model.keras on {check.source}: "
                f"{'; '.join(failures)}; nothing was written"
            )
        record["check"] = {**figures, "passed": True}
        files.write_json(building / EXPORT_FILE, record)
        os.replace(building, destination)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return ExportResult(destination, record)


def _check_options(format: str, quantize: str, max_images: int) -> None:
    if format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if quantize not in QUANTIZE:
        raise UsageError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if format == "saved_model" and quantize != "none":
        raise UsageError(
            "--quantize applies to onnx, litert and openvino; a SavedModel is exported as float32"
        )
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise UsageError(f"max_images must be a positive integer, got {max_images!r}")


def _extra_quantizer(format: str, quantize: str) -> tuple[str, ...]:
    return _QUANTIZERS.get(format, ()) if quantize != "none" else ()


# ----------------------------------------------------------------------------- images


def _check_images(run_dir: Path, reference: Predictor, limit: int) -> _CheckSet:
    """Up to ``limit`` of the run's test images (from predictions.csv, spread over the file) with
    their true classes (none for a multi-label run); generated images when none is readable."""
    rows = _prediction_rows(run_dir / PREDICTIONS_FILE)
    picked = [rows[i] for i in _spread(len(rows), limit)]
    images, labels = [], []
    for path, true in picked:
        # a multi-label run's true label sets give no accuracy: its images are checked alone
        if true not in reference.class_names and not reference.multi_label:
            continue
        try:
            images.append(read_image(path, reference.image_size))
        except UnreadableImage:
            continue
        labels.append(None if reference.multi_label else reference.class_names.index(true))
    if images:
        source = f"{len(images)} test images of the run"
        known = None if reference.multi_label else np.array(labels)
        return _CheckSet(np.stack(images).astype("float32"), known, source)
    count = min(limit, 32)
    source = f"{count} generated images (the run's test images are not readable)"
    return _CheckSet(_generated_images(count, reference.image_size), None, source)


def _prediction_rows(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [(row["path"], row["true"]) for row in csv.DictReader(handle)]
    except (OSError, KeyError, ValueError, csv.Error):
        return []


def _spread(n: int, limit: int) -> list[int]:
    """``limit`` indices spread evenly over ``range(n)`` (files are often sorted by class)."""
    return sorted(set(np.linspace(0, n - 1, min(n, limit)).round().astype(int).tolist()))


def _generated_images(count: int, size: tuple[int, int]) -> np.ndarray:
    """Seeded smooth colour fields with noise: image-like inputs for a run with no test split."""
    rng = np.random.default_rng(0)
    height, width = size
    images = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BILINEAR), "float32")
        images.append(np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255))
    return np.stack(images).astype("float32")


def _calibration(run_dir: Path, reference: Predictor, check: _CheckSet) -> np.ndarray:
    """int8 activation ranges come from up to 200 training images of the run (the same split as
    training made); the check images stand in when the training folder is gone."""
    config = json.loads((run_dir / runs.CONFIG_FILE).read_text(encoding="utf-8"))
    try:
        folder = load_image_folder(
            config["data"],
            root=config.get("root"),
            val_split=config["val_split"],
            test_split=config["test_split"],
            seed=config["seed"],
        )
    except (UsageError, KeyError, TypeError, OSError):
        log.warning("calibrating int8 on the check images: the training folder is not readable")
        return check.images
    images = []
    for i in _spread(len(folder.train.paths), CHECK_IMAGES):
        try:
            images.append(read_image(folder.train.paths[i], reference.image_size))
        except UnreadableImage:
            continue
    return np.stack(images).astype("float32") if images else check.images


# ----------------------------------------------------------------------------- building


def _build(model, format: str, quantize: str, artifact: Path, calibration) -> Path:
    """Write the artifact: Keras' model.export, then the runtime's quantizer where asked."""
    with warnings.catch_warnings():  # Keras' tf2onnx patch probes np.object: not the user's to fix
        warnings.filterwarnings("ignore", "In the future `np.object`", FutureWarning)
        return _export_artifact(model, format, quantize, artifact, calibration)


def _export_artifact(model, format: str, quantize: str, artifact: Path, calibration) -> Path:
    if format == "litert":  # the TFLite converter quantizes while converting
        model.export(
            str(artifact), format="litert", verbose=False, **_litert_options(quantize, calibration)
        )
    elif quantize == "none":
        model.export(str(artifact), format=_KERAS_FORMAT[format], verbose=False)
    else:
        with tempfile.TemporaryDirectory(dir=artifact.parent) as scratch:
            floating = Path(scratch) / artifact.name
            model.export(str(floating), format=_KERAS_FORMAT[format], verbose=False)
            quantizer = _quantize_onnx if format == "onnx" else _quantize_openvino
            quantizer(floating, artifact, quantize, calibration)
    return artifact


def _litert_options(quantize: str, calibration) -> dict:
    import tensorflow as tf

    if quantize == "none":
        return {}
    options = {"optimizations": [tf.lite.Optimize.DEFAULT]}  # int8 weights, float activations
    if quantize == "int8":  # and int8 activations, their ranges measured on calibration images

        def representative_dataset():
            for image in calibration:
                yield [image[None]]

        options["representative_dataset"] = representative_dataset
    return options


def _quantize_onnx(floating: Path, artifact: Path, quantize: str, calibration) -> None:
    from onnxruntime import quantization

    if quantize == "dynamic":
        quantization.quantize_dynamic(
            str(floating), str(artifact), weight_type=quantization.QuantType.QInt8
        )
        return

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            import onnx

            name = onnx.load(str(floating), load_external_data=False).graph.input[0].name
            self.batches = iter({name: image[None]} for image in calibration)

        def get_next(self):
            return next(self.batches, None)

    quantization.quantize_static(
        str(floating),
        str(artifact),
        Reader(),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=True,
    )


def _quantize_openvino(floating: Path, artifact: Path, quantize: str, calibration) -> None:
    import nncf
    import openvino

    model = openvino.Core().read_model(str(floating))
    if quantize == "dynamic":  # int8 weights, float activations
        model = nncf.compress_weights(model)
    else:
        model = nncf.quantize(model, nncf.Dataset([image[None] for image in calibration]))
    openvino.save_model(model, str(artifact), compress_to_fp16=False)


# ----------------------------------------------------------------------------- checking


def _compare(expected: np.ndarray, got: np.ndarray, check: _CheckSet) -> dict:
    """Agreement, largest probability difference and (with true classes) both accuracies."""
    figures = {
        "images": len(check.images),
        "source": check.source,
        "top1_agreement": float(np.mean(expected.argmax(1) == got.argmax(1))),
        "max_abs_prob_diff": float(np.abs(expected - got).max()),
    }
    if check.labels is not None:
        figures["accuracy_keras"] = float(np.mean(expected.argmax(1) == check.labels))
        figures["accuracy_export"] = float(np.mean(got.argmax(1) == check.labels))
    return figures


def _probabilities(predictor: Predictor, images: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [predictor(images[i : i + _BATCH]) for i in range(0, len(images), _BATCH)]
    )


def _failures(figures: dict, *, quantized: bool) -> list[str]:
    """What differed, one phrase per broken threshold; empty when the check passes."""
    agreement, diff = figures["top1_agreement"], figures["max_abs_prob_diff"]
    failures = []
    if not quantized:
        if agreement < 1.0:
            failures.append(f"top-1 agreement {agreement:.2%} (must be 100%)")
        if not diff <= FLOAT_MAX_PROB_DIFF:
            failures.append(f"max probability difference {diff:.2e} (must be <= 1e-4)")
        return failures
    if agreement < QUANTIZED_MIN_AGREEMENT:
        failures.append(f"top-1 agreement {agreement:.2%} (must be >= 99%)")
    if "accuracy_keras" in figures:
        drop = figures["accuracy_keras"] - figures["accuracy_export"]
        if drop > QUANTIZED_MAX_ACCURACY_DROP + 1e-9:
            failures.append(
                f"accuracy {figures['accuracy_export']:.4f} vs {figures['accuracy_keras']:.4f} "
                f"for model.keras (may drop at most 1 point)"
            )
    return failures


def _thresholds(quantized: bool) -> dict:
    """The check's limits, as export.json states them."""
    if quantized:
        return {
            "min_top1_agreement": QUANTIZED_MIN_AGREEMENT,
            "max_accuracy_drop": QUANTIZED_MAX_ACCURACY_DROP,
        }
    return {"min_top1_agreement": 1.0, "max_abs_prob_diff": FLOAT_MAX_PROB_DIFF}


def _record(run_dir, reference, format, quantize, artifact, calibration) -> dict:
    """export.json, less the check's figures (added once they pass)."""
    runtime = RUNTIMES[format]
    record = {
        "format": format,
        "quantize": quantize,
        "artifact": artifact.name,
        "files": sorted(p.name for p in artifact.parent.iterdir() if p.name != EXPORT_FILE),
        "size_bytes": _size(artifact),
        "image_size": list(reference.image_size),
        "classes": reference.class_names,
        "input": "float32 RGB 0..255, (batch, height, width, 3), resized like model.keras",
        "output": "logits: one (sigmoid) for 2 classes, else one per class (softmax)",
        "runtime": {"name": runtime.distribution, "version": runtime.version()},
        "exported_with": {"keras": _version("keras"), "tensorflow": _version("tensorflow")},
        "thresholds": _thresholds(quantize != "none"),
        "run": str(Path(run_dir).resolve()),
        "headstart_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if format == "onnx":
        record["exported_with"]["tf2onnx"] = _version("tf2onnx")
    if calibration is not None:
        record["calibration_images"] = len(calibration)
    return record


def _size(artifact: Path) -> int:
    """Bytes of the model itself: one file, a SavedModel folder, or OpenVINO's .xml + .bin."""
    if artifact.is_dir():
        return sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in artifact.parent.glob(f"{artifact.stem}.*"))


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"

"""A classifier in any of its forms, as one callable: images in, class probabilities out.

A run directory (``model.keras``, run by Keras) and an exported artifact (a folder holding
``export.json`` and ``labels.json`` beside a SavedModel, ONNX, LiteRT or OpenVINO model, run by
that format's own runtime) look the same to `predict`, `serve` and the export check: a
`Predictor` takes raw RGB 0..255 images of its ``image_size`` and returns probabilities. A
multi-label model (its folder holds ``thresholds.json``) gives each label's own probability,
and `Predictor.labels_of` the labels at or above their thresholds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart import runs
from headstart.errors import UsageError
from headstart.metrics import probabilities_from_logits, sigmoid
from headstart.runtime import LATENCY, compile_openvino

EXPORT_FILE = "export.json"
EXPORT_EXTRA = "pip install 'headstart[export]'"


@dataclass(frozen=True)
class Runtime:
    """What runs one export format: the module to import and the distribution that provides it
    (whose version export.json records)."""

    module: str
    distribution: str

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"


RUNTIMES = {
    "keras": Runtime("keras", "keras"),
    "saved_model": Runtime("tensorflow", "tensorflow"),
    "onnx": Runtime("onnxruntime", "onnxruntime"),
    "litert": Runtime("ai_edge_litert", "ai-edge-litert"),
    "openvino": Runtime("openvino", "openvino"),
}


@dataclass(frozen=True)
class Predictor:
    """``predictor(images)``: (N, h, w, 3) float32 RGB 0..255 -> (N, C) probabilities.

    ``model`` is the Keras model when the predictor is a run (Grad-CAM needs its layers), None
    for an exported artifact. ``thresholds``: a multi-label model's decision threshold per
    label (None: single-label, the probabilities of one class each).
    """

    class_names: list[str]
    image_size: tuple[int, int]
    logits: Callable[[np.ndarray], np.ndarray]
    runtime: str  # e.g. "onnxruntime 1.32.0"
    model: object | None = None
    thresholds: tuple[float, ...] | None = None

    @property
    def multi_label(self) -> bool:
        return self.thresholds is not None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        logits = self.logits(np.asarray(images, dtype=np.float32))
        return sigmoid(logits) if self.multi_label else probabilities_from_logits(logits)

    def labels_of(self, row: np.ndarray) -> list[str]:
        """A multi-label model's answer for one probability row: the labels at or above their
        thresholds, most probable first."""
        order = np.argsort(-row, kind="stable")
        return [self.class_names[i] for i in order if row[i] >= self.thresholds[i]]


def load_predictor(path: str | Path) -> Predictor:
    """A run directory or an exported artifact (its folder, or the model file inside it)."""
    path = Path(path)
    for folder in (path, path.parent):
        if path.exists() and (folder / EXPORT_FILE).is_file():
            return load_artifact(folder)
    return keras_predictor(runs.open_run_dir(path))


def keras_predictor(run_dir: Path) -> Predictor:
    """The run's model.keras, as a Predictor."""
    class_names = runs.read_labels(run_dir)
    model = runs.load_model(run_dir, len(class_names))
    thresholds = runs.read_thresholds(run_dir, class_names)
    return Predictor(
        class_names=class_names,
        image_size=tuple(model.input_shape[1:3]),
        logits=lambda images: np.asarray(model.predict_on_batch(images)),
        runtime=f"keras {RUNTIMES['keras'].version()}",
        model=model,
        thresholds=None if thresholds is None else tuple(thresholds),
    )


def load_artifact(folder: Path) -> Predictor:
    """An exported artifact, run by its format's own runtime (see export.json's ``format``)."""
    record = _read_record(folder)
    format_name = record["format"]
    require_runtime(format_name)
    class_names = runs.read_labels(folder)
    artifact = folder / record["artifact"]
    if not artifact.exists():
        raise UsageError(f"{artifact} is missing: the export folder is damaged; export again")
    thresholds = runs.read_thresholds(folder, class_names)
    return Predictor(
        class_names=class_names,
        image_size=tuple(record["image_size"]),
        logits=_LOADERS[format_name](artifact),
        runtime=f"{RUNTIMES[format_name].distribution} {RUNTIMES[format_name].version()}",
        thresholds=None if thresholds is None else tuple(thresholds),
    )


def require_runtime(format_name: str, *, also: tuple[str, ...] = ()) -> None:
    """One clear line naming the extra to install when a format's runtime is missing."""
    modules = (RUNTIMES[format_name].module, *also)
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"format {format_name} needs the Python package(s) {', '.join(missing)}: {EXPORT_EXTRA}"
        )


def _read_record(folder: Path) -> dict:
    path = folder / EXPORT_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        format_name, image_size = record["format"], record["image_size"]
        record["artifact"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not a headstart export record: export again") from exc
    if format_name not in _LOADERS or len(image_size) != 2:
        raise UsageError(f"{path}: unknown format {format_name!r}; export again")
    return record


# ----------------------------------------------------------------------------- runtimes
# Each loader returns a function images -> logits, exactly as model.keras gives them.


def _saved_model(path: Path):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))  # kept: .serve alone lets its variables be freed
    return lambda images: loaded.serve(tf.constant(images)).numpy()


def _onnx(path: Path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def _litert(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    source = interpreter.get_input_details()[0]["index"]
    target = interpreter.get_output_details()[0]["index"]
    lock = threading.Lock()  # one interpreter holds one set of tensors: calls take turns

    def logits(images: np.ndarray) -> np.ndarray:
        with lock:
            if tuple(interpreter.get_input_details()[0]["shape"]) != images.shape:
                interpreter.resize_tensor_input(source, images.shape)  # batch size varies
                interpreter.allocate_tensors()
            interpreter.set_tensor(source, images)
            interpreter.invoke()
            return interpreter.get_tensor(target).copy()

    interpreter.allocate_tensors()
    return logits


def _openvino(path: Path):
    # OpenVINO runs in bfloat16 by default on CPUs that have it; float32 keeps the answers of
    # model.keras (the export check measures them this way)
    compiled = compile_openvino(path, config=LATENCY)  # one call at a time: both cores on it
    lock = threading.Lock()  # calling the compiled model reuses one infer request

    def logits(images: np.ndarray) -> np.ndarray:
        with lock:
            return np.array(compiled(images)[0])

    return logits


_LOADERS = {"saved_model": _saved_model, "onnx": _onnx, "litert": _litert, "openvino": _openvino}

"""The frozen parts of a model on the fastest runtime that agrees with Keras.

Extraction runs a frozen part (the pooled extractor, the trunk, one backbone of a fusion) over
every image of a run, often several times (views, splits): it is the run's dominant cost, and it
is pure inference. `FrozenRunner` runs such a part on OpenVINO when it is installed and Keras
runs on TensorFlow: the part goes through Keras' own ``model.export(format="openvino")``, is
compiled once in float32 (OpenVINO would pick bfloat16 on CPUs that have it), and batches go
through a queue of asynchronous requests (one per stream) while the next batch is decoded.

Before its first output is used, the part's answer on that real batch is compared with Keras':
the largest difference must be at most `AGREEMENT_BOUND` times the batch's largest absolute
output. Outputs are stored as float16, whose rounding alone moves a value by up to 2^-11 of its
magnitude; a runtime within 2^-14 of the largest output is thus 8 times finer than what storage
already does to every row (measured: about 3e-6 relative on EfficientNet-Lite0, bfloat16 about
1e-2). On a disagreement, or any error of the runtime, the runner falls back to Keras for good
with one log line saying why, and raises `RuntimeFallback` so that whatever it was computing is
computed again by Keras: rows of one cache entry never mix runtimes (the runtime is part of the
entry's key, `FrozenRunner.key`).

``--runtime auto`` (default) is OpenVINO where it is importable on the TensorFlow backend, Keras
elsewhere: on JAX (thus ``--distributed``) Keras' OpenVINO export goes through jax2tf, whose
graph OpenVINO 2026.4 does not convert (OpConversionFailure, even for a Conv2D and a pooling).
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import keras
import numpy as np

from headstart.config import RUNTIME_CHOICES
from headstart.errors import UsageError

log = logging.getLogger(__name__)

KERAS = "keras"
OPENVINO = "openvino"
PRECISION = "f32"
AGREEMENT_BOUND = 2.0**-14  # of the batch's largest |output|: see the module docstring
MAX_IN_FLIGHT = 4  # asynchronous requests, at most (OpenVINO suggests one per stream)
# float32 explicitly: OpenVINO's CPU default is bfloat16 where the CPU has it (about 1e-2 off).
# THROUGHPUT: one single-threaded stream per core (2 here), each batch on one stream: as fast as
# one two-threaded request on an idle machine, and up to 1.5x faster on a shared one, where the
# two threads of one request wait for each other (bench/results/runtime-latency.md).
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": PRECISION, "PERFORMANCE_HINT": "THROUGHPUT"}
LATENCY = {**OPENVINO_CONFIG, "PERFORMANCE_HINT": "LATENCY"}  # one request at a time (predict)
EXTRA = "pip install openvino"


class RuntimeFallback(Exception):
    """The runner left its runtime for Keras mid-way: what it was computing must be computed
    again (by the same runner, now on Keras)."""


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_runtime(choice: str) -> str:
    """What ``--runtime choice`` runs frozen parts on here: "keras" or "openvino"."""
    if choice not in RUNTIME_CHOICES:
        raise UsageError(f"--runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {choice!r}")
    on_tensorflow = keras.backend.backend() == "tensorflow"
    if choice == OPENVINO:
        if not openvino_installed():
            raise UsageError(f"--runtime openvino needs the openvino package: {EXTRA}")
        if not on_tensorflow:
            raise UsageError(
                f"--runtime openvino runs on the TensorFlow backend only (this is "
                f"{keras.backend.backend()}): use --runtime keras or auto"
            )
        return OPENVINO
    if choice == "auto" and on_tensorflow and openvino_installed():
        return OPENVINO
    return KERAS


def predict_on_batch(model: keras.Model, batch) -> np.ndarray:
    """``model.predict_on_batch``, its compiled step rebuilt if the model's variables changed
    sides (trainable or not) since it was built.

    A frozen part shares its layers with the run's model, which is frozen and thawed between
    passes. Keras builds the predict step once; on JAX under a distribution its output
    shardings list the variables by side, and a stale step fails with a pytree structure error.
    """
    sides = (len(model.trainable_variables), len(model.non_trainable_variables))
    step = model.predict_function
    if step is None or getattr(step, "variable_sides", None) != sides:
        model.make_predict_function(force=True)
        model.predict_function.variable_sides = sides
    return np.asarray(model.predict_on_batch(batch))


def compile_openvino(path: str | Path, batch: int | None = None, config: dict | None = None):
    """An OpenVINO IR (``.xml``) compiled for the CPU in float32 (``config``, by default
    `OPENVINO_CONFIG`); with ``batch``, for that batch size only (a static shape: about 15%
    faster than a dynamic batch on EfficientNet-Lite0 here, bench/runtime.py)."""
    import openvino  # optional (the export extra), and 1-2 s to import: only when it runs

    core = openvino.Core()
    model = core.read_model(str(path))
    if batch is not None:
        model.reshape([batch, *list(model.inputs[0].partial_shape)[1:]])
    return core.compile_model(model, "CPU", config or OPENVINO_CONFIG)


class FrozenRunner:
    """A frozen Keras model's outputs, batch by batch, on ``runtime`` ("keras" or "openvino").

    ``ir_dir``: a folder where the OpenVINO IR of this part is kept between runs (its name must
    identify the part: the feature cache names it by the entry's key without the view); None:
    a temporary folder, converted again by every run. ``batch_size``: the largest batch it will
    be given, compiled as a static shape (smaller batches are padded); None: any batch size.
    ``what`` names the part in log lines.
    """

    def __init__(
        self,
        model: keras.Model,
        runtime: str = KERAS,
        *,
        ir_dir: str | Path | None = None,
        batch_size: int | None = None,
        what: str = "the frozen part",
    ):
        self.model, self.runtime, self.what = model, runtime, what
        self.batch_size = batch_size
        self.ir_dir = Path(ir_dir) if ir_dir is not None else None
        self.compiled = None  # the OpenVINO model, once compiled
        self.checked = False  # the first batch agreed with Keras
        self.agreement: dict | None = None  # the check's figures
        self._scratch: tempfile.TemporaryDirectory | None = None

    @property
    def key(self) -> str:
        """The runtime and precision, as cache keys name them: rows of different keys are never
        mixed."""
        return KERAS if self.runtime == KERAS else f"{OPENVINO}:{PRECISION}"

    def outputs(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """The model's output for each batch of ``batches``, in order; raises `RuntimeFallback`
        (after switching to Keras) when the runtime fails or disagrees with Keras."""
        if self.runtime == KERAS:
            for batch in batches:
                yield predict_on_batch(self.model, batch)
            return
        yield from self._openvino_outputs(iter(batches))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """One batch; on a fallback, that batch again on Keras."""
        try:
            return next(self.outputs([batch]))
        except RuntimeFallback:
            return predict_on_batch(self.model, batch)

    # ------------------------------------------------------------------ OpenVINO
    def _openvino_outputs(self, batches: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """Batches go to a queue of asynchronous requests (one per OpenVINO stream, at most
        `MAX_IN_FLIGHT`); outputs come back in order.
        Reading the next batch (tf.data decodes it in its own threads) overlaps the inference:
        OpenVINO computes without holding Python's lock."""
        first = next(batches, None)
        if first is None:
            return
        try:
            if self.compiled is None:
                self.compiled = compile_openvino(self._ir(), self.batch_size)
            checked = None if self.checked else self._check(first)
            queue = _async_queue(self.compiled)
        except RuntimeFallback:
            raise
        except Exception as error:
            raise self._fall_back(f"failed ({_one_line(error)})") from error
        if checked is not None:
            yield checked
            first = None
        done: dict[int, np.ndarray] = {}
        queue.set_callback(lambda request, job: done.__setitem__(job[0], _output(request, job[1])))
        submitted = returned = 0
        for batch in batches if first is None else itertools.chain([first], batches):
            try:  # waits while every request is busy
                queue.start_async(self._padded(batch), (submitted, len(batch)))
            except Exception as error:
                raise self._fall_back(f"failed ({_one_line(error)})") from error
            submitted += 1
            while returned in done:
                yield done.pop(returned)
                returned += 1
        try:
            queue.wait_all()
        except Exception as error:
            raise self._fall_back(f"failed ({_one_line(error)})") from error
        while returned < submitted:
            if returned not in done:  # a request ended without calling back: an error
                raise self._fall_back("lost a batch")
            yield done.pop(returned)
            returned += 1

    def _check(self, batch: np.ndarray) -> np.ndarray:
        """The runtime's output for ``batch`` if it agrees with Keras' (see the module doc)."""
        expected = predict_on_batch(self.model, batch)
        got = np.asarray(self.compiled(self._padded(batch))[0])[: len(batch)]
        if got.shape != expected.shape:
            raise self._fall_back(f"gives shape {got.shape}, Keras {expected.shape}")
        scale = float(np.abs(expected).max()) if expected.size else 0.0
        diff = float(np.abs(got - expected).max()) if expected.size else 0.0
        self.agreement = {"max_abs_diff": diff, "max_abs_output": scale, "images": len(batch)}
        if not diff <= AGREEMENT_BOUND * scale:  # NaN disagrees too
            raise self._fall_back(
                f"disagrees with Keras on {len(batch)} images (max abs diff {diff:.2e} > "
                f"{AGREEMENT_BOUND:.1e} x largest output {scale:.3g})"
            )
        self.checked = True
        log.info(
            "%s runs on OpenVINO %s (max abs diff to Keras %.1e, largest output %.3g)",
            self.what,
            PRECISION,
            diff,
            scale,
        )
        return got

    def _padded(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` with zero images after it up to the static batch size."""
        missing = (self.batch_size or len(batch)) - len(batch)
        if missing <= 0:
            return batch
        return np.concatenate([batch, np.zeros((missing, *batch.shape[1:]), batch.dtype)])

    def _ir(self) -> Path:
        """The part as an OpenVINO IR: kept in ``ir_dir`` when given (converting takes
        seconds), else in a temporary folder that lives as long as the runner."""
        if self.ir_dir is not None and (self.ir_dir / "model.xml").is_file():
            return self.ir_dir / "model.xml"
        parent = self.ir_dir.parent if self.ir_dir is not None else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".openvino-", dir=parent)
        try:
            self.model.export(str(Path(scratch) / "model.xml"), format="openvino", verbose=False)
            if self.ir_dir is None:
                self._scratch = tempfile.TemporaryDirectory()
                shutil.move(scratch, Path(self._scratch.name) / "ir")
                return Path(self._scratch.name) / "ir" / "model.xml"
            try:
                Path(scratch).rename(self.ir_dir)  # whole or not at all: readers never see half
            except OSError:  # another run published it first: its IR is the same
                pass
            return self.ir_dir / "model.xml"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _fall_back(self, why: str) -> RuntimeFallback:
        self.runtime, self.compiled = KERAS, None
        log.warning("%s: OpenVINO %s; running it on Keras", self.what, why)
        return RuntimeFallback(why)


def _async_queue(compiled):
    import openvino  # optional, see compile_openvino

    requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    return openvino.AsyncInferQueue(compiled, max(1, min(requests, MAX_IN_FLIGHT)))


def _output(request, size: int) -> np.ndarray:
    """The first ``size`` rows (the rest are padding), copied: the request's buffer is reused."""
    return np.array(request.get_output_tensor(0).data[:size])


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]

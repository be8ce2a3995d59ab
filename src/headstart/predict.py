"""Class probabilities for image files, from a saved run."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from headstart import runs
from headstart.data import UnreadableImage, find_images, read_image
from headstart.errors import UsageError
from headstart.evaluate import probabilities_from_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    path: str
    top: tuple[tuple[str, float], ...]  # (class name, probability), most likely first
    error: str | None = None  # set when the file could not be read


def load_run_model(run: str | Path) -> tuple[keras.Model, list[str]]:
    run_dir = runs.open_run_dir(run)
    return keras.saving.load_model(run_dir / runs.MODEL_FILE), runs.read_labels(run_dir)


def predict(
    run: str | Path, paths: list[str], *, top_k: int = 1, batch_size: int = 32
) -> list[Prediction]:
    """Top-k classes for every image under ``paths`` (files, folders, globs).

    Unreadable files get a Prediction with ``error`` set instead of stopping the batch.
    """
    if top_k < 1:
        raise UsageError("--top-k must be at least 1")
    model, class_names = load_run_model(run)
    files = find_images(paths)
    size = tuple(model.input_shape[1:3])
    results: dict[str, Prediction] = {}
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images, good = _read_batch(chunk, size, results)
        if good:
            logits = model.predict(np.stack(images), verbose=0)
            probabilities = probabilities_from_logits(logits)
            for path, row in zip(good, probabilities, strict=True):
                results[path] = Prediction(path, _top(row, class_names, top_k))
    return [results[path] for path in files]


def _read_batch(paths, size, results):
    def read(path):
        try:
            return read_image(path, size)
        except UnreadableImage as error:
            return error

    with ThreadPoolExecutor() as pool:
        outputs = list(pool.map(read, paths))
    images, good = [], []
    for path, output in zip(paths, outputs, strict=True):
        if isinstance(output, UnreadableImage):
            log.warning("skipped %s: %s", path, output)
            results[path] = Prediction(path, (), error=str(output))
        else:
            images.append(output.astype("float32"))
            good.append(path)
    return images, good


def _top(row: np.ndarray, class_names: list[str], k: int) -> tuple[tuple[str, float], ...]:
    order = np.argsort(-row, kind="stable")[:k]
    return tuple((class_names[i], float(row[i])) for i in order)

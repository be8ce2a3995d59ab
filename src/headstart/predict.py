"""Class probabilities for image files, from a saved run."""

from __future__ import annotations

import logging
from collections.abc import Iterator
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
    """A run's model and class names, both checked (`runs.open_run_dir`, `runs.load_model`)."""
    run_dir = runs.open_run_dir(run)
    class_names = runs.read_labels(run_dir)
    return runs.load_model(run_dir, len(class_names)), class_names


def predict(
    run: str | Path, paths: list[str], *, top_k: int = 1, batch_size: int = 32
) -> list[Prediction]:
    """Top-k classes for every image under ``paths`` (files, folders, globs), as one list.

    Unreadable files get a Prediction with ``error`` set instead of stopping the batch. For
    thousands of files, `iter_predictions` gives the same results as they are computed.
    """
    return list(iter_predictions(run, paths, top_k=top_k, batch_size=batch_size))


def iter_predictions(
    run: str | Path, paths: list[str], *, top_k: int = 1, batch_size: int = 32
) -> Iterator[Prediction]:
    """`predict`, streamed: one Prediction per image, in `find_images` order, batch by batch.

    At most two batches of decoded images are in memory at once (the next batch is read while
    the model runs on this one), however many files there are. Arguments, the run and the
    paths are all checked before this returns, so a `UsageError` never comes halfway through.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"--top-k must be a positive integer, got {top_k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size!r}")
    model, class_names = load_run_model(run)
    files = find_images(paths)
    size = tuple(model.input_shape[1:3])
    return _stream(model, class_names, files, size, top_k, batch_size)


def _stream(model, class_names, files, size, top_k, batch_size) -> Iterator[Prediction]:
    starts = range(0, len(files), batch_size)
    with ThreadPoolExecutor(thread_name_prefix="headstart-predict") as pool:

        def submit(start):
            chunk = files[start : start + batch_size]
            return chunk, [pool.submit(_read, path, size) for path in chunk]

        pending = submit(starts[0]) if starts else None
        for start in starts:
            chunk, futures = pending
            batch = [future.result() for future in futures]
            pending = submit(start + batch_size) if start + batch_size < len(files) else None
            yield from _predict_batch(model, chunk, batch, class_names, top_k)
            del batch


def _read(path: str, size: tuple[int, int]) -> np.ndarray | UnreadableImage:
    try:
        return read_image(path, size)
    except UnreadableImage as error:
        return error


def _predict_batch(model, chunk, batch, class_names, top_k) -> Iterator[Prediction]:
    images = [image for image in batch if not isinstance(image, UnreadableImage)]
    rows = iter(())
    if images:
        logits = model.predict_on_batch(np.stack(images).astype("float32"))
        rows = iter(probabilities_from_logits(np.asarray(logits)))
    for path, image in zip(chunk, batch, strict=True):
        if isinstance(image, UnreadableImage):
            log.debug("cannot read %s: %s", path, image)
            yield Prediction(path, (), error=str(image))
        else:
            yield Prediction(path, _top(next(rows), class_names, top_k))


def _top(row: np.ndarray, class_names: list[str], k: int) -> tuple[tuple[str, float], ...]:
    order = np.argsort(-row, kind="stable")[:k]
    return tuple((class_names[i], float(row[i])) for i in order)

"""Class probabilities for image files, from a saved run or an exported artifact."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.data import UnreadableImage, find_images, read_image
from headstart.deploy.predictor import Predictor, load_predictor
from headstart.errors import UsageError
from headstart.tta import check_views, tta_probabilities

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    path: str
    top: tuple[tuple[str, float], ...]  # (class name, probability), most likely first
    error: str | None = None  # set when the file could not be read
    # a multi-label model's answer: the labels at or above their thresholds, most likely first
    # (``top`` then holds every label's probability); None for a single-label model
    labels: tuple[str, ...] | None = None


def predict(
    run: str | Path, paths: list[str], *, top_k: int = 1, batch_size: int = 32, tta: int = 1
) -> list[Prediction]:
    """Top-k classes for every image under ``paths`` (files, folders, globs), as one list.

    ``run`` is a run directory or an exported artifact (`headstart.deploy.export`). For a
    multi-label model each Prediction's ``labels`` is the set of labels at or above their
    thresholds, and ``top`` every label's probability (``top_k`` does not apply).

    Unreadable files get a Prediction with ``error`` set instead of stopping the batch. For
    thousands of files, `iter_predictions` gives the same results as they are computed. With
    ``tta`` > 1, probabilities are averaged over that many test-time views (`headstart.tta`).
    """
    return list(iter_predictions(run, paths, top_k=top_k, batch_size=batch_size, tta=tta))


def iter_predictions(
    run: str | Path, paths: list[str], *, top_k: int = 1, batch_size: int = 32, tta: int = 1
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
    check_views(tta)
    predictor = load_predictor(run)
    files = find_images(paths)
    return _stream(predictor, files, top_k, batch_size, tta)


def _stream(predictor: Predictor, files, top_k, batch_size, tta=1) -> Iterator[Prediction]:
    size = predictor.image_size
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
            yield from _predict_batch(predictor, chunk, batch, top_k, tta)
            del batch


def _read(path: str, size: tuple[int, int]) -> np.ndarray | UnreadableImage:
    try:
        return read_image(path, size)
    except UnreadableImage as error:
        return error


def _predict_batch(predictor: Predictor, chunk, batch, top_k, tta=1) -> Iterator[Prediction]:
    class_names = predictor.class_names
    images = [image for image in batch if not isinstance(image, UnreadableImage)]
    rows = iter(())
    if images:
        rows = iter(tta_probabilities(predictor, np.stack(images).astype("float32"), tta))
    for path, image in zip(chunk, batch, strict=True):
        if isinstance(image, UnreadableImage):
            log.debug("cannot read %s: %s", path, image)
            labels = () if predictor.multi_label else None
            yield Prediction(path, (), error=str(image), labels=labels)
        elif predictor.multi_label:
            row = next(rows)
            top = _top(row, class_names, len(class_names))
            yield Prediction(path, top, labels=tuple(predictor.labels_of(row)))
        else:
            yield Prediction(path, _top(next(rows), class_names, top_k))


def _top(row: np.ndarray, class_names: list[str], k: int) -> tuple[tuple[str, float], ...]:
    order = np.argsort(-row, kind="stable")[:k]
    return tuple((class_names[i], float(row[i])) for i in order)

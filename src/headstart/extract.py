"""Run the frozen part of a model once and train on what it produced.

Three pieces make the transfer-learning loop cheap without giving up augmentation or
fine-tuning: ``split_at_cut`` divides a backbone into a frozen trunk and a trainable top
(valid only where every path of the graph crosses the cut); ``extract_batches`` runs a frozen
part over image files (optionally through one augmented view) in bounded memory; and
``ViewSampler`` feeds ``fit`` from cached outputs, drawing one view per image per epoch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, replace

import keras
import numpy as np

from headstart.data import Split, make_dataset
from headstart.model import FEATURES_NAME, classifier_of
from headstart.runtime import FrozenRunner, predict_on_batch

log = logging.getLogger(__name__)

CHUNK_BYTES = 2**26  # `ViewSampler.as_dataset`: rows gathered at once (64 MB)


@dataclass
class TrunkSplit:
    """A backbone cut in two: ``trunk`` (frozen, cached) and ``top`` (fine-tuned).

    Both share layers with the full model, so training ``top`` trains the full model: the
    saved model is the reassembled whole without any copying.
    """

    cut_layer: str  # the first layer of the top; the trunk ends at its input
    trunk: keras.Model  # image (raw RGB) -> activations at the cut, preprocessing included
    top_block: keras.Model  # activations at the cut -> backbone output (the unfrozen layers)
    top: keras.Model  # activations at the cut -> logits (top block, pooling, classifier)


def split_at_cut(model: keras.Model, base: keras.Model, unfreeze: int) -> TrunkSplit | None:
    """Cut ``base`` before its top ``unfreeze`` layers, or None where the graph forbids it.

    The cut is the input of the first unfrozen layer. It is valid only if every later layer
    reads from the top part or from that one tensor (true at block boundaries: VGG's
    block4_pool, ResNet50's conv5_block2_out, MobileNetV2's block_15_add, Xception's last add
    before block14, EfficientNet's last block6 output); otherwise Keras cannot build the top
    as a model of the cut tensor alone, and training falls back to the full model.
    """
    if not 0 < unfreeze < len(base.layers):
        return None
    first = base.layers[len(base.layers) - unfreeze]
    if len(first._inbound_nodes) != 1 or isinstance(first.input, (list, tuple)):
        return None
    try:
        top_block = keras.Model(first.input, base.output, name=f"{base.name}_top")
    except ValueError as error:  # "graph disconnected": a path skips the cut
        log.info(
            "cannot cut %s before %s (%s): fine-tuning the full model", base.name, first.name, error
        )
        return None
    trunk = keras.Model(model.input, _preprocessed_base_call(model, base, first))
    return TrunkSplit(first.name, trunk, top_block, _top(top_block, model))


def with_head(split: TrunkSplit, model: keras.Model) -> TrunkSplit:
    """``split``'s cut, its top ending in ``model``'s pooling and head: the model of another
    head around the same base (`headstart.model.build_on_base`). A base is cut once: cutting
    calls its top layers again, and `split_at_cut` refuses a layer called more than once."""
    return replace(split, top=_top(split.top_block, model))


def _top(top_block: keras.Model, model: keras.Model) -> keras.Model:
    """Activations at the cut -> ``model``'s logits: the top block, pooling, classifier."""
    cut_input = keras.Input(top_block.input.shape[1:], name="trunk_activations")
    logits = classifier_of(model)(model.get_layer(FEATURES_NAME)(top_block(cut_input)))
    return keras.Model(cut_input, logits, name="top_and_head")


def _preprocessed_base_call(model: keras.Model, base: keras.Model, first) -> object:
    """The cut tensor as seen from the full model's input (preprocessing + trunk)."""
    inner = keras.Model(base.input, first.input)
    x = model.input
    for layer in model.layers[1:]:
        if layer is base:
            return inner(x)
        x = layer(x)
    raise ValueError("backbone not found in model")


class InferenceModeTop(keras.Model):
    """Training view of the top: the top block runs in inference mode (BatchNormalization
    keeps its statistics, as in the full model), the head follows ``fit``."""

    def __init__(self, split: TrunkSplit, model: keras.Model):
        super().__init__(name="top_trainer")
        pool = model.get_layer(FEATURES_NAME)
        self.body = keras.Model(split.top.input, pool(split.top_block(split.top.input)))
        self.head = classifier_of(model)

    def call(self, activations, training=None):
        return self.head(self.body(activations, training=False), training=training)


def extract_batches(
    extractor: keras.Model | FrozenRunner,
    paths: Sequence[str],
    image_size: int,
    *,
    batch_size: int = 32,
    augmenter: keras.Model | None = None,
    verbose: bool = True,
    only: Collection[int] | None = None,
) -> Iterator[np.ndarray]:
    """Outputs of ``extractor`` for image files, batch by batch (memory: a few batches).

    ``extractor``: a frozen Keras model, run by Keras, or a `headstart.runtime.FrozenRunner`
    (which may run it on OpenVINO, and raises `headstart.runtime.RuntimeFallback` when it falls
    back to Keras mid-pass). Decoding runs in tf.data's parallel map and is prefetched, so the
    model is not kept waiting for the files. The augmentation runs in order, batch after batch:
    in a parallel map its random draws would go to other images on every pass. ``only``: the
    numbers of the batches to run the extractor on; the others are still decoded and augmented,
    so that each image gets the draw a full pass gives it (``--distributed``: each process its
    part).
    """
    import tensorflow as tf  # the input pipeline is tf.data on every backend

    split = Split(tuple(paths), (0,) * len(paths))
    dataset = make_dataset(split, (image_size, image_size), batch_size=batch_size, cache=False)
    if augmenter is not None:
        dataset = dataset.map(lambda x, y: (augmenter(x, training=True), y))
        dataset = dataset.prefetch(tf.data.AUTOTUNE)
    sizes = [min(batch_size, len(paths) - start) for start in range(0, len(paths), batch_size)]
    total = sum(sizes) if only is None else sum(sizes[i] for i in only)
    progress = keras.utils.Progbar(total, unit_name="image") if verbose else None
    images = (  # JAX takes no tf tensor
        batch
        for number, (batch, _) in enumerate(dataset.as_numpy_iterator())
        if only is None or number in only
    )
    runner = extractor if isinstance(extractor, FrozenRunner) else FrozenRunner(extractor)
    for outputs in runner.outputs(images):
        if progress:
            progress.add(len(outputs))
        yield outputs


def run_in_batches(model: keras.Model, rows, batch_size: int = 256) -> np.ndarray:
    """``model`` over cached rows (anything with ``len`` and index-array access), in memory.

    Every call gets ``batch_size`` rows, a short last batch padded with copies of its last
    row (their outputs dropped): each batch shape is a compiled step of its own, and the
    splits' and views' different remainders made TensorFlow trace the step again for each
    (and warn of "excessive retracing"), JAX compile it again."""
    outputs = []
    for start in range(0, len(rows), batch_size):
        batch = np.asarray(rows[np.arange(start, min(start + batch_size, len(rows)))])
        short = batch_size - len(batch)
        padded = np.concatenate([batch, np.repeat(batch[-1:], short, axis=0)]) if short else batch
        outputs.append(predict_on_batch(model, padded)[: len(batch)])
    return np.concatenate(outputs) if outputs else np.zeros((0,))


class ViewSampler(keras.utils.PyDataset):
    """Batches from cached outputs of several views of the same images.

    Every epoch reshuffles the images and draws, for each one, which view it is seen in: K
    cached augmentations give the head (or the top block) augmented data at the cost of
    reading a row. With one view and ``shuffle=False`` it is a plain batched reader.
    """

    def __init__(
        self,
        views: Sequence,
        labels: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if not views or any(len(view) != len(labels) for view in views):
            raise ValueError("every view needs one row per label")
        self.views, self.labels = list(views), np.asarray(labels)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.set_epoch(0)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Draw ``epoch``'s order and views from (seed, epoch) alone: a run resumed at epoch
        k sees the batches an uninterrupted run would. ``fit`` callers set it at each epoch's
        start; without that, epochs simply advance one by one."""
        self.epoch = epoch
        n = len(self.labels)
        if not self.shuffle:
            self.order, self.view_of = np.arange(n), np.zeros(n, dtype=np.int64)
            return
        rng = np.random.default_rng([self.seed, epoch])
        self.order = rng.permutation(n)
        self.view_of = rng.integers(0, len(self.views), n)

    def on_epoch_end(self) -> None:
        self.set_epoch(self.epoch + 1)

    def __getitem__(self, index: int):
        return self.batches(index, index + 1)

    def batches(self, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's batches ``first`` to ``stop - 1``, one after the other in one array."""
        chosen = self.order[first * self.batch_size : stop * self.batch_size]
        views = self.view_of[chosen]
        some = self.views[0][chosen[:1]]
        batch = np.empty((len(chosen), *some.shape[1:]), dtype=np.float32)
        for view in np.unique(views):
            mask = views == view
            batch[mask] = self.views[view][chosen[mask]]
        return batch, self.labels[chosen]

    def as_dataset(self, chunk_bytes: int = CHUNK_BYTES):
        """The batches as tf.data, for ``fit`` on TensorFlow: the same batches, but gathered
        by `batches` a chunk of them at a time (about ``chunk_bytes``), one Python call per
        chunk instead of one per batch (Keras calls a PyDataset through a ``py_function`` per
        batch: a head's epoch on cached features costs 3x more so).

        A chunk is read when the epoch's iteration reaches it, after ``fit``'s
        ``on_epoch_begin``, where `set_epoch` must be called (nothing calls `on_epoch_end`).
        The number of batches is declared, so Keras never asks for one more."""
        import tensorflow as tf  # input pipelines are tf.data

        images, labels = self[0]
        per_chunk = max(1, chunk_bytes // max(1, images[:1].nbytes * self.batch_size))
        signature = (
            tf.TensorSpec((None, *images.shape[1:]), tf.float32),
            tf.TensorSpec((None, *labels.shape[1:]), tf.as_dtype(labels.dtype)),
        )

        def chunk(number):
            first = int(number) * per_chunk
            return self.batches(first, min(len(self), first + per_chunk))

        def read(number):
            rows, targets = tf.numpy_function(
                chunk, [number], (signature[0].dtype, signature[1].dtype), stateful=True
            )
            return tf.ensure_shape(rows, signature[0].shape), tf.ensure_shape(
                targets, signature[1].shape
            )

        def batched(rows, targets):
            return tf.data.Dataset.from_tensor_slices((rows, targets)).batch(self.batch_size)

        dataset = tf.data.Dataset.range(-(-len(self) // per_chunk)).map(read).flat_map(batched)
        return dataset.apply(tf.data.experimental.assert_cardinality(len(self)))

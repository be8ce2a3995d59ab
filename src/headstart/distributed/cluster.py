"""Data-parallel training across processes: Keras's distribution API on the JAX backend.

Every process runs the same ``headstart train``: the shared seed makes the weights start equal,
``keras.distribution.DataParallel`` splits each global batch across all processes' devices and
averages the gradients, and ``fit`` shards each tf.data pipeline by itself (process i gets
the i-th part of every global batch). TensorFlow's MultiWorkerMirroredStrategy is not used:
with Keras 3 ``fit`` it fails (keras-team/keras#20585). Only process 0 writes the run folder.

Feature extraction is sharded instead: each process runs the frozen backbone over its own part
of the images into the shared feature cache (`headstart.training.cache.FeatureCache.fill_part`), all
wait at a `barrier`, then every process reads all rows; the head and the fine-tuned top then
train data-parallel on the cached rows, fed as tf.data (`sampler_batches`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass

import keras
import numpy as np

from headstart.config import Config
from headstart.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cluster:
    """Where this process stands: ``process_id`` of ``num_processes`` (0 writes the run)."""

    process_id: int = 0
    num_processes: int = 1

    @property
    def writes(self) -> bool:
        return self.process_id == 0


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Cluster:
    """Join the cluster and make every later Keras model data-parallel over all its devices.

    Without arguments ``jax.distributed.initialize`` detects the cluster by itself (SLURM,
    Open MPI, Kubernetes, Cloud TPU); on CPUs the collectives go through gloo. Must run before
    any model is built (variables are laid out when they are created).
    """
    if keras.backend.backend() != "jax":
        raise UsageError(
            f"--distributed needs the JAX backend (this is {keras.backend.backend()}): "
            "pip install 'headstart[jax]' and set KERAS_BACKEND=jax"
        )
    import jax

    given = [coordinator is None, num_processes is None, process_id is None]
    if any(given) and not all(given):
        raise UsageError(
            "--coordinator, --num-processes and --process-id go together "
            "(or give none of them and let JAX detect the cluster)"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise UsageError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not jax.distributed.is_initialized():
        try:
            jax.distributed.initialize(
                coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
            )
        except ValueError as error:  # no cluster launcher found: nothing to detect
            raise UsageError(
                f"--distributed: JAX found no cluster ({error}): give --coordinator HOST:PORT "
                "--num-processes N --process-id I, or use `headstart launch --nproc N -- train`"
            ) from None
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    cluster = Cluster(jax.process_index(), jax.process_count())
    log.info(
        "process %d of %d, data-parallel over %d devices",
        cluster.process_id,
        cluster.num_processes,
        len(jax.devices()),
    )
    return cluster


def finish() -> None:
    """Back to single-process Keras (after training: evaluation and the report are local)."""
    keras.distribution.set_distribution(None)


def check_batch_size(batch_size: int, cluster: Cluster) -> None:
    """Each process takes an equal part of every global batch."""
    if batch_size % cluster.num_processes:
        raise UsageError(
            f"--batch-size {batch_size} is the global batch and must divide evenly among "
            f"{cluster.num_processes} processes: give a multiple of {cluster.num_processes}"
        )


def weights_digest(model: keras.Model) -> str:
    """A short hash of every variable's bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for variable in model.variables:
        digest.update(np.ascontiguousarray(np.asarray(variable.numpy())).tobytes())
    return digest.hexdigest()[:16]


def current(distributed: bool) -> Cluster:
    """This process's place in the cluster joined by `initialize` (a lone process otherwise)."""
    if not distributed:
        return Cluster()
    import jax

    return Cluster(jax.process_index(), jax.process_count())


def barrier(name: str) -> None:
    """Wait until every process reaches the point called ``name`` (the same on all of them:
    JAX checks it), e.g. until all have written their part of the feature cache."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def sampler_batches(sampler, *, training: bool):
    """A `headstart.extract.ViewSampler` as tf.data, the only input Keras's multi-process
    data adapter takes, in full global batches (`even_batches`).

    The generator reads the sampler when the epoch's iteration starts, after ``fit``'s
    ``on_epoch_begin`` has set its epoch: each epoch's order and views are drawn from the seed
    and the epoch number alone, so every process sees the same global batches, those a single
    process would (less the last partial training batch).
    """
    import tensorflow as tf

    images, labels = sampler[0]
    signature = (
        tf.TensorSpec((None, *images.shape[1:]), tf.float32),
        tf.TensorSpec((None, *labels.shape[1:]), tf.as_dtype(labels.dtype)),
    )

    def batches():
        for index in range(len(sampler)):
            yield sampler[index]

    dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
    return even_batches(dataset, len(sampler.labels), sampler.batch_size, training=training)


def even_batches(dataset, n_rows: int, batch_size: int, *, training: bool):
    """Only full global batches, so that every process gets an equal part of each one.

    Training drops the last partial batch (a different remainder every epoch, as the order is
    reshuffled). Evaluation pads it with rows of sample weight 0 and gives the real rows the
    weight (padded rows / real rows): Keras averages a batch's weighted loss over all its rows
    and the epoch over all batches' rows, so the loss is then the mean over the real images;
    accuracy, a weighted metric (`headstart.model.compile_for`), counts each image once.
    """
    import tensorflow as tf

    if training:
        steps = n_rows // batch_size
        batches = dataset.rebatch(batch_size, drop_remainder=True)
        return batches.apply(tf.data.experimental.assert_cardinality(steps))
    steps = -(-n_rows // batch_size)
    weight = steps * batch_size / n_rows
    weighted = dataset.map(lambda x, y: (x, y, tf.fill(tf.shape(y)[:1], weight)))
    pad = steps * batch_size - n_rows
    if pad:
        images, labels = dataset.element_spec
        filler = tf.data.Dataset.from_tensors(
            (
                tf.zeros((pad, *images.shape[1:]), images.dtype),
                tf.zeros((pad, *labels.shape[1:]), labels.dtype),
                tf.zeros((pad,), tf.float32),
            )
        )
        weighted = weighted.concatenate(filler)
    batches = weighted.rebatch(batch_size, drop_remainder=True)
    return batches.apply(tf.data.experimental.assert_cardinality(steps))


# ----------------------------------------------------------------------------- a run's place


def join(config: Config) -> Cluster:
    """``--distributed``: join the cluster before any model is built. Processes but 0 train in
    a scratch folder, deleted at the end, and show no progress bars."""
    if not config.distributed:
        return Cluster()
    cluster = initialize(config.coordinator, config.num_processes, config.process_id)
    check_batch_size(config.batch_size, cluster)
    return cluster


def place(config: Config, cluster: Cluster) -> Config:
    """A ``--distributed`` process's config: where it stands in the cluster (as joined, also
    when JAX detected it by itself), and quiet unless it writes the run."""
    if not config.distributed:
        return config
    return dataclasses.replace(
        config,
        num_processes=cluster.num_processes,
        process_id=cluster.process_id,
        quiet=config.quiet or not cluster.writes,
    )

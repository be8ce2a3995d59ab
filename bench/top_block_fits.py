"""Can the fine-tuning-rate trials use the second core? Fits of EfficientNet-Lite0's top block
(block7a, top conv, head) on random cached-trunk rows shaped as at 96 px (3x3x192; 1,000
training and 500 validation rows, batch 32, 32 batches per compiled call, 7 epochs):

- two fits one after the other, then the same two side by side in two threads;
- one fit compiled as headstart compiles it, then with XLA (``jit_compile=True``), then in
  ``mixed_bfloat16`` (bfloat16 compute, float32 weights; this CPU has AVX512-BF16).

Prints wall seconds and the cores kept busy (CPU over wall). Measured 2026-12-02 (2 cores,
two rounds each in two runs): threads took 0.77-0.96 of the sequential time (1.5-1.6 cores
busy against 1.3-1.5), XLA 3-5x the time of a plain fit (26-39 s against 7-10 s). Neither is
used. mixed_bfloat16 (05:54, quiet machine, two rounds): 4.5 and 4.7 s against 4.8 and 5.0 s
for float32, 0.94x, not worth moving the trials' numbers off the float32 model they choose for.

    python bench/top_block_fits.py
"""

import threading
import time
from functools import partial

import keras
import numpy as np

EPOCHS = 7
rng = np.random.default_rng(0)
TRAIN = rng.normal(size=(1000, 3, 3, 192)).astype("float32"), rng.integers(0, 10, 1000)
VAL = rng.normal(size=(500, 3, 3, 192)).astype("float32"), rng.integers(0, 10, 500)


def top_block(seed: int, jit_compile: bool = False, policy: str = "float32") -> keras.Model:
    """Lite0's block7a and top convolution (BatchNormalization in inference mode), pooling and
    a 10-class head, compiled with Adam as a fine-tuning trial is."""
    keras.utils.set_random_seed(seed)
    keras.config.set_dtype_policy(policy)
    inputs = keras.Input((3, 3, 192))
    x = keras.layers.Conv2D(1152, 1, use_bias=False)(inputs)
    x = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(x, training=False))
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(x, training=False))
    x = keras.layers.Conv2D(320, 1, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x, training=False)
    x = keras.layers.Conv2D(1280, 1, use_bias=False)(x)
    x = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(x, training=False))
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=32,
        jit_compile=jit_compile,
    )
    model.optimizer.build(model.trainable_variables)
    return model


def fit(model: keras.Model) -> None:
    model.fit(*TRAIN, batch_size=32, epochs=EPOCHS, validation_data=VAL, verbose=0, shuffle=False)


def timed(work) -> str:
    wall, cpu = time.monotonic(), time.process_time()
    work()
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    return f"{wall:.1f} s ({cpu / wall:.2f} cores)"


def side_by_side(models) -> None:
    threads = [threading.Thread(target=fit, args=(model,)) for model in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def one_after_the_other(models) -> None:
    for model in models:
        fit(model)


def main() -> None:
    fit(top_block(0))  # TensorFlow's own warm-up
    for _ in range(2):
        sequential = timed(partial(one_after_the_other, [top_block(1), top_block(2)]))
        threads = timed(partial(side_by_side, [top_block(1), top_block(2)]))
        plain = timed(partial(fit, top_block(1)))
        xla = timed(partial(fit, top_block(1, jit_compile=True)))
        bf16 = timed(partial(fit, top_block(1, policy="mixed_bfloat16")))
        print(
            f"two fits: sequential {sequential}, threads {threads}; "
            f"one fit: {plain}, XLA {xla}, mixed_bfloat16 {bf16}"
        )


if __name__ == "__main__":
    main()

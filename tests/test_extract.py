"""Cutting a backbone into a cached trunk and a trained top, and sampling cached views."""

import keras
import numpy as np
import pytest

from headstart.backbones import build_backbone, get_backbone
from headstart.extract import InferenceModeTop, ViewSampler, run_in_batches, split_at_cut
from headstart.freeze import freeze, resolve_unfreeze, unfreeze_top
from headstart.model import build_model, compile_for

# Where each backbone is cut by default (the input of its top block), checked below.
CUTS = {
    "tiny_test": ("top_conv", "block2_pool"),  # tests/conftest.py: the fast loop's case
    "efficientnet_lite0": ("block7a_expand_conv", "block6d_add"),
    "vgg16": ("block5_conv1", "block4_pool"),
    "resnet50": ("conv5_block3_1_conv", "conv5_block2_out"),
    "mobilenet_v2": ("block_16_expand", "block_15_add"),
    "xception": ("block14_sepconv1", None),  # the last residual add (auto-named add_N)
}


def _model(name, size, classes=3):
    keras.utils.set_random_seed(0)
    spec = get_backbone(name)
    base = build_backbone(spec, size, "none")
    return spec, base, build_model(spec, base, classes, hidden=8)


@pytest.mark.parametrize(
    "name",  # the real backbones take seconds each: full suite only
    [
        name if name == "tiny_test" else pytest.param(name, marks=pytest.mark.slow)
        for name in sorted(CUTS)
    ],
)
def test_reassembled_model_equals_top_on_cached_trunk(name):
    """After training the top on trunk activations, the one saved model (preprocessing +
    backbone + head) predicts what top(trunk(x)) predicts: float32 to 1e-4, and from the
    float16 cache to 1e-3 relative + 2e-2 absolute on logits (its storage precision)."""
    size = 75 if name == "xception" else 48
    spec, base, model = _model(name, size)
    count = resolve_unfreeze("default", spec, base)
    split = split_at_cut(model, base, count)
    assert split is not None and split.cut_layer == CUTS[name][0]
    cut_source = base.get_layer(split.cut_layer)._inbound_nodes[0].parent_nodes[0].operation
    if CUTS[name][1]:
        assert cut_source.name == CUTS[name][1]
    else:
        assert isinstance(cut_source, keras.layers.Add)
    freeze(base)
    unfreeze_top(base, count, "inference")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (6, size, size, 3)).astype("float32")
    trunk = split.trunk.predict(images, verbose=0)
    trainer = InferenceModeTop(split, model)
    compile_for(trainer, 3, 1e-2)
    trainer.fit(trunk, np.array([0, 1, 2, 0, 1, 2]), epochs=1, verbose=0)
    full = model.predict(images, verbose=0)
    np.testing.assert_allclose(full, split.top.predict(trunk, verbose=0), rtol=1e-4, atol=1e-4)
    from_cache = split.top.predict(trunk.astype(np.float16).astype(np.float32), verbose=0)
    np.testing.assert_allclose(full, from_cache, rtol=1e-3, atol=2e-2)


def test_cut_inside_a_residual_block_is_refused():
    spec, base, model = _model("resnet50", 48)
    names = [layer.name for layer in base.layers]
    inside = len(names) - names.index("conv5_block3_2_conv")  # skips the block's shortcut
    assert split_at_cut(model, base, inside) is None
    assert split_at_cut(model, base, 0) is None


def test_view_sampler_draws_one_view_per_image_per_epoch():
    n, k = 40, 3
    views = [
        np.full((n, 2), view, dtype=np.float32) + np.arange(n)[:, None] * 10 for view in range(k)
    ]
    labels = np.arange(n)
    sampler = ViewSampler(views, labels, batch_size=8, seed=1)
    seen_views = []
    for _ in range(30):  # epochs
        batches = [sampler[i] for i in range(len(sampler))]
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        assert sorted(y) == list(labels)  # every image exactly once per epoch
        view = x[:, 0] - y * 10
        assert np.all(np.isin(view, range(k))) and np.all(x[:, 0] == x[:, 1])
        seen_views.append(view)
        sampler.on_epoch_end()
    counts = np.bincount(np.concatenate(seen_views).astype(int), minlength=k)
    assert counts.min() > 0.28 * counts.sum()  # about a third each over 30 epochs
    again = ViewSampler(views, labels, batch_size=8, seed=1)
    np.testing.assert_array_equal(again[0][0], ViewSampler(views, labels, 8, seed=1)[0][0])


def test_validation_reader_is_in_order_and_clean():
    views = [np.arange(10, dtype=np.float32)[:, None], np.full((10, 1), -1, np.float32)]
    sampler = ViewSampler(views, np.arange(10), batch_size=4, shuffle=False)
    x = np.concatenate([sampler[i][0] for i in range(len(sampler))])
    np.testing.assert_array_equal(x[:, 0], np.arange(10))


def test_the_samplers_tf_data_gives_its_batches_and_the_same_training():
    """`ViewSampler.as_dataset` (what fit gets on TensorFlow): each epoch's batches, chunk
    after chunk, are the sampler's own, and a head trained on it (dropout, class weights, an
    epoch per call of the compiled step) ends with the same weights and logs to the bit."""
    rng = np.random.default_rng(0)
    views = [rng.normal(size=(50, 6)).astype(np.float32) for _ in range(2)]
    labels = rng.integers(0, 3, 50).astype(np.int32)
    sampler = ViewSampler(views, labels, batch_size=8, seed=2)
    dataset = sampler.as_dataset(chunk_bytes=3 * 8 * 6 * 4)  # three batches a chunk
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        got = [(x.numpy(), y.numpy()) for x, y in dataset]
        assert len(got) == len(sampler) == 7
        for (x, y), index in zip(got, range(len(sampler)), strict=True):
            np.testing.assert_array_equal(x, sampler[index][0])
            np.testing.assert_array_equal(y, sampler[index][1])

    def train(feed, steps):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        outputs = keras.layers.Dense(3)(keras.layers.Dropout(0.3)(inputs))
        model = keras.Model(inputs, outputs)
        compile_for(model, 3, 1e-2, steps_per_execution=steps)
        train_data = ViewSampler(views, labels, batch_size=8, seed=2)
        val_data = ViewSampler(views[:1], labels, batch_size=8, shuffle=False)
        history = model.fit(
            feed(train_data),
            validation_data=feed(val_data),
            epochs=2,
            verbose=0,
            shuffle=False,
            class_weight={0: 1.0, 1: 2.0, 2: 0.5},
            callbacks=[
                keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, _: train_data.set_epoch(e))
            ],
        )
        return history.history, [v.numpy() for v in model.weights]

    logs, weights = train(lambda data: data, 1)
    for steps in (5, 7):  # batches per call of the compiled step: a remainder, a whole epoch
        again_logs, again = train(lambda data: data.as_dataset(), steps)
        assert again_logs == logs
        for value, expected in zip(again, weights, strict=True):
            np.testing.assert_array_equal(value, expected)


class CountingTraces(keras.Model):
    """A Dense layer that counts how often its predict step is traced (or, on JAX, compiled):
    Python runs ``predict_step`` only then."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)
        self.traces = 0

    def call(self, x):
        return self.dense(x)

    def predict_step(self, data):
        self.traces += 1
        return super().predict_step(data)


def test_rows_of_any_count_run_through_one_compiled_step_and_match_the_model():
    """The splits' and views' row counts (1,000, 500, 28, 4 ...) leave different last batches:
    each is padded to the batch size, so the step is traced once and every row is the model's
    own answer, padding dropped."""
    model = CountingTraces()
    rows = np.random.default_rng(0).normal(size=(300, 5)).astype("float32")
    model(rows[:1])  # built, as a run's frozen parts are
    outputs = [run_in_batches(model, rows[:n], batch_size=64) for n in (300, 131, 7, 64)]
    assert model.traces == 1
    for n, output in zip((300, 131, 7, 64), outputs, strict=True):
        assert output.shape == (n, 3)
        np.testing.assert_allclose(output, model(rows[:n]), rtol=1e-5, atol=1e-6)

"""The feature cache: keyed by what decides an output, rows keyed by file content."""

import dataclasses
import importlib
import os
import shutil

import numpy as np
import pytest

from headstart import Config, train
from headstart.augment import AUTO_CANDIDATES
from headstart.cli import main
from headstart.training.cache import (
    EntrySpec,
    FeatureCache,
    clear,
    list_entries,
    use_compilation_cache,
)

SPEC = EntrySpec("efficientnet_lite0", "imagenet", 64, "lite", "pooled:gap", "clean")


def _files(tmp_path, n=4):
    paths = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(f"image-{i}".encode())
        paths.append(str(path))
    return paths


class Counting:
    """A fake backbone: output = a number derived from the file's bytes; counts what it ran."""

    def __init__(self):
        self.seen = []

    def __call__(self, paths):
        self.seen.extend(paths)
        for start in range(0, len(paths), 3):
            chunk = paths[start : start + 3]
            yield np.array([[len(open(p, "rb").read()), i] for i, p in enumerate(chunk)], "f4")


class Pass:
    """A fake extraction pass in batches of 2. An augmented view's row also holds a random
    draw made batch after batch, like a seeded augmenter's: it depends on the batch's place in
    the pass. ``only``: the batches to run the backbone on (the draws still advance)."""

    def __init__(self, random: bool):
        self.random, self.ran = random, []

    def __call__(self, paths, only=None):
        rng = np.random.default_rng(0)
        for number, start in enumerate(range(0, len(paths), 2)):
            chunk = paths[start : start + 2]
            draws = rng.random(len(chunk)) if self.random else np.zeros(len(chunk))
            if only is not None and number not in only:
                continue
            self.ran.extend(chunk)
            sizes = [len(open(path, "rb").read()) for path in chunk]
            yield np.array([sizes, draws], "f4").T


@pytest.mark.parametrize("view", ["clean", "flip#1#1"])
def test_parts_filled_apart_make_the_entry_a_single_pass_makes(tmp_path, view):
    """--distributed: 2 processes fill their parts of a cache; the merged entry has the rows
    of a single process exactly, augmented views' random draws included."""
    spec = dataclasses.replace(SPEC, view=view)
    paths = _files(tmp_path, n=7)
    shutil.copy(paths[0], tmp_path / "same_content.png")  # one key for two files
    paths.append(str(tmp_path / "same_content.png"))
    alone = Pass(random=view != "clean")
    expected = FeatureCache(tmp_path / "alone").rows(spec, paths, alone).to_numpy()
    cache, passes = FeatureCache(tmp_path / "parts"), [Pass(alone.random) for _ in range(2)]
    for part in (1, 0):  # either may finish first
        cache.fill_part(spec, paths, passes[part], part, 2, block=2)
    assert passes[0].ran and passes[1].ran  # both did a share: blocks 0, 2 and blocks 1, 3
    assert sorted(passes[0].ran + passes[1].ran) == sorted(alone.ran)  # each image once
    after = Pass(alone.random)
    np.testing.assert_array_equal(cache.rows(spec, paths, after).to_numpy(), expected)
    assert after.ran == []  # all cache hits
    assert len(list((tmp_path / "parts" / spec.key()).glob("*.keys.npy"))) == 2


def test_second_lookup_computes_nothing_and_returns_the_same_rows(tmp_path):
    cache, compute = FeatureCache(tmp_path / "cache"), Counting()
    paths = _files(tmp_path)
    first = cache.rows(SPEC, paths, compute).to_numpy()
    assert len(compute.seen) == 4 and first.shape == (4, 2)
    again = FeatureCache(tmp_path / "cache").rows(SPEC, paths, compute).to_numpy()
    assert len(compute.seen) == 4
    np.testing.assert_array_equal(first, again)


def test_changed_image_misses_renamed_image_hits(tmp_path):
    cache, compute = FeatureCache(tmp_path / "cache"), Counting()
    paths = _files(tmp_path)
    cache.rows(SPEC, paths, compute)
    renamed = str(tmp_path / "renamed.png")
    shutil.move(paths[0], renamed)
    with open(paths[1], "wb") as handle:
        handle.write(b"edited, and longer")
    os.utime(paths[1], ns=(1, 1))  # mtime alone must not be trusted: content decides
    compute.seen.clear()
    rows = cache.rows(SPEC, [renamed, *paths[1:]], compute).to_numpy()
    assert compute.seen == [paths[1]]
    assert rows[1, 0] == len(b"edited, and longer")


@pytest.mark.parametrize(
    "change",
    [
        {"image_size": 96},
        {"backbone": "efficientnet_lite1"},
        {"weights": "none:0"},
        {"output": "trunk:block7a_expand_conv"},
        {"view": "flip#0#1"},
        {"preprocessing": "tf"},
        {"runtime": "openvino:f32"},
    ],
)
def test_anything_that_changes_the_output_changes_the_entry(tmp_path, change):
    cache, compute = FeatureCache(tmp_path / "cache"), Counting()
    paths = _files(tmp_path)
    cache.rows(SPEC, paths, compute)
    other = EntrySpec(**{**SPEC.__dict__, **change})
    assert other.key() != SPEC.key()
    compute.seen.clear()
    cache.rows(other, paths, compute)
    assert len(compute.seen) == 4


def test_rows_are_float16_on_disk_and_read_lazily(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    paths = _files(tmp_path, 6)
    rows = cache.rows(SPEC, paths, Counting())
    shard = next((tmp_path / "cache" / SPEC.key()).glob("shard-*[0-9a-f].npy"))
    assert np.load(shard, mmap_mode="r").dtype == np.float16
    assert rows[np.array([5, 0])].shape == (2, 2) and rows[np.array([5, 0])].dtype == np.float32


def test_interrupted_computation_leaves_no_partial_shard(tmp_path):
    cache = FeatureCache(tmp_path / "cache")

    def broken(paths):
        yield np.zeros((1, 2), "f4")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.rows(SPEC, _files(tmp_path), broken)
    entry = tmp_path / "cache" / SPEC.key()
    assert not list(entry.glob("*.npy")) and not list(entry.glob(".*"))
    assert len(cache.rows(SPEC, _files(tmp_path), Counting())) == 4


def test_ls_and_clear(tmp_path, capsys):
    cache = FeatureCache(tmp_path / "cache")
    cache.rows(SPEC, _files(tmp_path), Counting())
    entries = list_entries(tmp_path / "cache")
    assert len(entries) == 1 and entries[0]["images"] == 4 and entries[0]["image_size"] == 64
    assert main(["cache", "ls", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "efficientnet_lite0" in capsys.readouterr().out
    (tmp_path / "cache" / ".xla").mkdir()  # JAX's compiled programs go too
    (tmp_path / "cache" / ".xla" / "jit_train_step-abc-cache").write_bytes(b"x")
    assert clear(tmp_path / "cache") > 0 and list_entries(tmp_path / "cache") == []
    assert not (tmp_path / "cache" / ".xla").exists()


def test_compiled_programs_are_kept_on_jax_alone_and_jaxs_own_setting_wins(tmp_path, monkeypatch):
    """The JAX pass (`test_backends.py`) checks that a run's programs land there."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert use_compilation_cache(tmp_path, "tensorflow") is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "theirs"))
    assert use_compilation_cache(tmp_path, "jax") is None


@pytest.mark.slow  # two default runs
def test_a_second_run_on_the_same_images_runs_the_backbone_zero_times(
    tiny_folder, tmp_path, monkeypatch
):
    train_module = importlib.import_module("headstart.training.views")  # not the `train` function
    calls = []
    real = train_module.extract_batches
    monkeypatch.setattr(
        train_module,
        "extract_batches",
        lambda extractor, paths, *a, **k: (
            calls.append(len(paths)) or real(extractor, paths, *a, **k)
        ),
    )
    config = dict(
        data=str(tiny_folder),
        backbone="tiny_test",  # tests/conftest.py: pretrained-style, so the default recipe
        weights="none",  # runs as on real weights (cached trunk, fine-tuning, refit)
        image_size=32,
        epochs=2,
        fine_tune_epochs=1,
        views=2,
        batch_size=8,
        quiet=True,
        cache_dir=str(tmp_path / "cache"),
        report=False,
    )
    first = train(Config(out=str(tmp_path / "one"), **config))
    # train and val (cross-validated choices): clean + 2 views of each augmenting --augment
    # auto candidate tried
    tried = len(first.config.augment_scores) - 1  # the search may stop before the strongest
    assert 1 <= tried <= len(AUTO_CANDIDATES) - 1
    assert sum(calls) == (28 + 8) * (1 + 2 * tried) + 4  # test: the test pass's frozen trunk
    calls.clear()
    second = train(Config(out=str(tmp_path / "two"), **config))
    assert calls == []
    assert second.metrics["accuracy"] == first.metrics["accuracy"]

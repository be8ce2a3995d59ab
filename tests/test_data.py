"""headstart.data: layouts, checking, splitting, decoding, tf.data pipelines, predict inputs."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart import data as data_module
from headstart.check import FactsReader, check_folder
from headstart.data import (
    IMAGE_EXTENSIONS,
    ImageFolder,
    Split,
    UnreadableImage,
    decode_threads,
    find_images,
    make_dataset,
    read_image,
    unreadable_images,
    write_skipped,
)
from headstart.errors import UsageError
from headstart.progress import progress_bar
from headstart.splits import load_image_folder

SMALL = (8, 10)  # (height, width): enough to decode, cheap to write


def _all_paths(folder: ImageFolder) -> list[str]:
    return [*folder.train.paths, *folder.val.paths, *folder.test.paths]


def _per_class(split: Split, names: tuple[str, ...]) -> dict[str, int]:
    return dict(zip(names, split.counts(len(names)), strict=True))


def _tree_fingerprint(root: Path) -> dict[str, tuple]:
    """Listing + content hash + mtime of everything below root (symlinks not followed)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir", path.stat().st_mtime_ns)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[rel] = ("file", digest, path.stat().st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def odd_folder(image_folder_factory) -> Path:
    return image_folder_factory(per_class=12, odd_files=True)


@pytest.fixture(scope="module")
def odd_loaded(odd_folder) -> ImageFolder:
    return load_image_folder(str(odd_folder))


# ----------------------------------------------------------------------------- layouts


def test_class_folders_layout_classes_sorted_and_labels(image_folder_factory, tmp_path):
    root = image_folder_factory(tmp_path / "d", classes=("dog", "cat", "bird"), size=SMALL)
    folder = load_image_folder(str(root))
    assert folder.layout == "class_folders"
    assert folder.root == str(root.resolve())
    assert folder.class_names == ("bird", "cat", "dog")
    for path, label in zip(
        _all_paths(folder),
        folder.train.labels + folder.val.labels + folder.test.labels,
        strict=True,
    ):
        assert os.path.isabs(path)
        assert Path(path).parent.name == folder.class_names[label]
    # 12 per class: test round(1.2)=1, val round(2.4)=2, train 9
    assert folder.train.counts(3) == [9, 9, 9]
    assert folder.val.counts(3) == [2, 2, 2]
    assert folder.test.counts(3) == [1, 1, 1]
    assert len(folder.train) == 27 and folder.skipped == ()
    assert sorted(_all_paths(folder)) == sorted(str(p) for p in root.rglob("*.*"))


@pytest.mark.parametrize(
    ("n", "val", "test", "expected"),  # expected (train, val, test) for one class
    [
        (10, 0.2, 0.1, (7, 2, 1)),
        (3, 0.2, 0.1, (1, 1, 1)),  # minimum of 1 each
        (5, 0.1, 0.0, (4, 1, 0)),  # round(0.5) = 0 -> at least 1
        (25, 0.1, 0.1, (21, 2, 2)),  # round half to even: round(2.5) = 2
        (7, 0.0, 0.0, (7, 0, 0)),
        (40, 0.25, 0.15, (24, 10, 6)),
    ],
)
def test_split_sizes_per_class_exact(image_folder_factory, tmp_path, n, val, test, expected):
    root = image_folder_factory(tmp_path / "d", classes=("a",), per_class=n, size=SMALL)
    image_folder_factory(root, classes=("b",), per_class=3, size=SMALL)
    folder = load_image_folder(str(root), val_split=val, test_split=test)
    assert len(folder.train) + len(folder.val) + len(folder.test) == n + 3
    got = (folder.train.counts(2)[0], folder.val.counts(2)[0], folder.test.counts(2)[0])
    assert got == expected


def test_split_is_seeded(image_folder_factory, tmp_path):
    root = image_folder_factory(tmp_path / "d", per_class=20, size=SMALL)
    first = load_image_folder(str(root), seed=3)
    again = load_image_folder(str(root), seed=3)
    other = load_image_folder(str(root), seed=4)
    assert (first.train, first.val, first.test) == (again.train, again.val, again.test)
    assert set(first.test.paths) != set(other.test.paths) or set(first.val.paths) != set(
        other.val.paths
    )
    assert first.train.counts(2) == other.train.counts(2)  # sizes do not depend on the seed
    # no overlap between splits
    assert len(set(_all_paths(first))) == 40


def test_adding_a_class_keeps_other_classes_split(image_folder_factory, tmp_path):
    root = image_folder_factory(tmp_path / "d", per_class=15, size=SMALL)
    before = load_image_folder(str(root))
    image_folder_factory(root, classes=("aardvark",), per_class=15, size=SMALL)
    after = load_image_folder(str(root))
    assert after.class_names == ("aardvark", "cat", "dog")
    keep = {p for p in before.test.paths}
    assert keep == {p for p in after.test.paths if "aardvark" not in p}


def test_split_folders_used_as_given(image_folder_factory, tmp_path):
    root = image_folder_factory(tmp_path / "d", per_class=8, size=SMALL, layout="split_folders")
    folder = load_image_folder(str(root), val_split=0.5, test_split=0.5 - 1e-9)
    assert folder.layout == "split_folders"
    assert folder.class_names == ("cat", "dog")
    assert (folder.train.counts(2), folder.val.counts(2), folder.test.counts(2)) == (
        [8, 8],
        [4, 4],
        [4, 4],
    )
    for split_name, split in (("train", folder.train), ("val", folder.val), ("test", folder.test)):
        assert all(Path(p).parts[-3] == split_name for p in split.paths)


def test_split_folders_validation_name_and_missing_test(image_folder_factory, tmp_path):
    root = image_folder_factory(
        tmp_path / "d",
        per_class=6,
        size=SMALL,
        layout="split_folders",
        splits=("train", "validation"),
    )
    folder = load_image_folder(str(root))
    assert folder.val.counts(2) == [3, 3]
    assert len(folder.test) == 0 and folder.test.counts(2) == [0, 0]
    assert all("/validation/" in p for p in folder.val.paths)


def test_split_folders_missing_val_is_carved_from_train(image_folder_factory, tmp_path):
    root = image_folder_factory(
        tmp_path / "d", per_class=10, size=SMALL, layout="split_folders", splits=("train", "test")
    )
    folder = load_image_folder(str(root), val_split=0.3, test_split=0.0)
    assert folder.train.counts(2) == [7, 7]
    assert folder.val.counts(2) == [3, 3]
    assert folder.test.counts(2) == [5, 5]
    assert all("/train/" in p for p in folder.val.paths)
    assert not set(folder.train.paths) & set(folder.val.paths)
    again = load_image_folder(str(root), val_split=0.3, test_split=0.0)
    assert again.val == folder.val


def test_split_folders_class_missing_from_train(image_folder_factory, tmp_path):
    root = image_folder_factory(tmp_path / "d", per_class=4, size=SMALL, layout="split_folders")
    image_folder_factory(root / "val", classes=("eel",), per_class=2, size=SMALL)
    with pytest.raises(UsageError, match="'eel' is in val/"):
        load_image_folder(str(root))


def test_split_folders_with_stray_folder_or_both_val_names(image_folder_factory, tmp_path):
    root = image_folder_factory(tmp_path / "d", per_class=4, size=SMALL, layout="split_folders")
    (root / "validation").mkdir()
    with pytest.raises(UsageError, match="both 'val' and 'validation'"):
        load_image_folder(str(root))
    (root / "validation").rmdir()
    image_folder_factory(root, classes=("ship",), per_class=2, size=SMALL)
    with pytest.raises(UsageError, match="'ship'"):
        load_image_folder(str(root))


# ----------------------------------------------------------------------------- odd files


def test_odd_files_are_used_or_skipped_with_reason(
    odd_folder, odd_loaded, image_folder_factory, caplog
):
    factory = image_folder_factory
    cat = odd_folder / "cat"
    assert odd_loaded.class_names == ("cat", "dog")  # no __MACOSX, no empty class
    assert dict(odd_loaded.skipped) == {str(cat / n): r for n, r in factory.ODD_BAD.items()}
    assert [p for p, _ in odd_loaded.skipped] == sorted(p for p, _ in odd_loaded.skipped)
    used = set(_all_paths(odd_loaded))
    assert {str(cat / n) for n in factory.ODD_GOOD} <= used
    assert len(used) == 2 * 12 + len(factory.ODD_GOOD)
    counts = [
        a + b + c
        for a, b, c in zip(
            odd_loaded.train.counts(2),
            odd_loaded.val.counts(2),
            odd_loaded.test.counts(2),
            strict=True,
        )
    ]
    assert counts == [12 + len(factory.ODD_GOOD), 12]
    # every image-looking file outside hidden/__MACOSX/empty folders is accounted for
    candidates = {
        str(p)
        for p in odd_folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(
            part.startswith(".") or part == "__MACOSX" for part in p.relative_to(odd_folder).parts
        )
    }
    assert candidates == used | {p for p, _ in odd_loaded.skipped}
    with caplog.at_level(logging.WARNING, logger="headstart.data"):
        load_image_folder(str(odd_folder))
    assert factory.EMPTY_CLASS in caplog.text


def test_one_read_serves_the_decode_check_and_the_data_check(odd_folder, odd_loaded):
    """With the data check's reader, the decode check skips the same files for the same
    reasons and splits the same; the facts it keeps make the report the data check makes when
    it reads every file itself."""
    reader = FactsReader()
    folder = load_image_folder(str(odd_folder), reader=reader)
    assert folder == odd_loaded
    assert set(reader.facts) == set(_all_paths(folder))
    report, alone = check_folder(folder, facts=reader.facts), check_folder(folder)
    assert {**report, "seconds": 0} == {**alone, "seconds": 0}
    assert report["odd"] and report["images"]["formats"]["JPEG"] > 0


def test_the_decode_check_shows_a_bar_on_a_terminal_only(odd_folder, monkeypatch, capsys):
    """The bar reaches N/N for N files when forced (a terminal); to a pipe, nothing."""
    stream = io.StringIO()
    forced = functools.partial(progress_bar, stream=stream, force=True)
    monkeypatch.setattr(data_module, "progress_bar", forced)
    folder = load_image_folder(str(odd_folder), progress=True)
    n = len(_all_paths(folder)) + len(folder.skipped)
    assert "checking images" in stream.getvalue() and f"{n}/{n}" in stream.getvalue()
    monkeypatch.undo()
    load_image_folder(str(odd_folder), progress=True)  # stderr is pytest's, not a terminal
    assert capsys.readouterr().err == ""
    with progress_bar(5, "checking images") as advance:
        advance(5)
    assert capsys.readouterr().err == ""


def test_sixteen_bit_png_is_scaled_not_clipped(odd_folder):
    image = read_image(str(odd_folder / "cat" / "sixteen_bit.png"))
    assert image.dtype == np.uint8 and image.shape == (40, 48, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert 70 <= image.min() <= 85 and 170 <= image.max() <= 180  # 20000/257, 45000/257
    assert len(np.unique(image)) > 50


def test_colour_modes_become_rgb(odd_folder):
    cat = odd_folder / "cat"
    cmyk = read_image(str(cat / "cmyk.jpg"))
    assert np.abs(cmyk.reshape(-1, 3).mean(0) - (255, 0, 0)).max() < 12
    grey = read_image(str(cat / "grey.jpg"))
    assert grey.shape == (40, 48, 3) and (grey[..., 0] == grey[..., 2]).all()
    for name in ("rgba.png", "palette.png"):  # transparent left half composited on white
        image = read_image(str(cat / name)).astype(int)
        assert (image[:, :24] == 255).all(), name
        assert np.abs(image[:, 24:] - (220, 40, 40)).max() <= 1, name
    gif = read_image(str(cat / "animated.gif")).astype(int)
    assert np.abs(gif - (255, 0, 0)).max() <= 2  # first frame, not the blue one
    assert read_image(str(cat / "tiny_1x1.png")).shape == (1, 1, 3)
    assert read_image(str(cat / "photo.webp")).shape == (40, 48, 3)


def test_exif_orientation_is_honoured(odd_folder, image_folder_factory):
    path = odd_folder / "cat" / "exif_rotated.jpg"
    with Image.open(path) as raw:
        assert raw.size == image_folder_factory.EXIF_STORED_SIZE == (30, 20)
    assert read_image(str(path)).shape == (30, 20, 3)  # (H, W): rotated 90 degrees
    assert read_image(str(path), (12, 6)).shape == (12, 6, 3)


def test_read_image_resizes_to_height_width(odd_folder):
    image = read_image(str(odd_folder / "cat" / "UPPER.JPG"), (16, 24))
    assert image.shape == (16, 24, 3) and image.dtype == np.uint8
    assert image[..., 0].mean() > 100 > image[..., 2].mean()  # still the red class colour


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("zero_bytes.jpg", "empty file"),
        ("truncated.jpg", "truncated"),
        ("text_not_image.jpg", "not an image"),
        ("does_not_exist.png", "missing file"),
    ],
)
def test_read_image_reasons(odd_folder, name, reason):
    with pytest.raises(UnreadableImage) as info:
        read_image(str(odd_folder / "cat" / name))
    assert str(info.value) == reason


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("limit", [1000, 500])  # PIL warns above the limit, raises above 2x
def test_decompression_bombs_are_skipped(odd_folder, monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # 40x48 = 1920 pixels
    with pytest.raises(UnreadableImage, match=r"^too large \(decompression bomb\)$"):
        read_image(str(odd_folder / "cat" / "rgba.png"))
    assert read_image(str(odd_folder / "cat" / "tiny_1x1.png")).shape == (1, 1, 3)


def test_symlink_loops_do_not_hang(image_folder_factory, tmp_path):
    root = image_folder_factory(tmp_path / "d", per_class=5, size=SMALL)
    os.symlink(root / "cat", root / "cat" / "loop")
    os.symlink(root, root / "dog" / "back_to_root")
    folder = load_image_folder(str(root), val_split=0.2, test_split=0.0)
    assert len(_all_paths(folder)) == 10
    assert find_images([str(root)]) == sorted(find_images([str(root)]))
    assert len(find_images([str(root)])) == 10


def test_data_folder_is_never_written(odd_folder, odd_loaded):
    before = _tree_fingerprint(odd_folder)
    folder = load_image_folder(str(odd_folder), seed=1)
    for images, _ in make_dataset(folder.train, (16, 16), batch_size=64, cache=True):
        assert images.shape[0] > 0
    find_images([str(odd_folder)])
    assert _tree_fingerprint(odd_folder) == before


def test_write_skipped(odd_loaded, tmp_path):
    out = tmp_path / "run" / "skipped.txt"
    write_skipped(odd_loaded.skipped, str(out))
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [tuple(line.split("\t")) for line in lines] == list(odd_loaded.skipped)
    assert len(lines) == 3
    write_skipped((), str(out))
    assert out.read_bytes() == b""


# ----------------------------------------------------------------------------- usage errors


def test_usage_errors_for_folders(tmp_path, image_folder_factory):
    with pytest.raises(UsageError, match="not found"):
        load_image_folder(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        load_image_folder(str(tmp_path / "file.txt"))
    root = image_folder_factory(tmp_path / "one", classes=("only",), per_class=4, size=SMALL)
    with pytest.raises(UsageError, match="need at least 2"):
        load_image_folder(str(root))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="found 0 class"):
        load_image_folder(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    ("val", "test", "option"),
    [
        (-0.1, 0.1, "--val-split"),
        (1.0, 0.0, "--val-split"),
        (0.2, 1.5, "--test-split"),
        (float("nan"), 0.1, "--val-split"),
        (0.6, 0.4, "--val-split 0.6 \\+ --test-split 0.4"),
    ],
)
def test_bad_split_fractions(tiny_folder, val, test, option):
    with pytest.raises(UsageError, match=option):
        load_image_folder(str(tiny_folder), val_split=val, test_split=test)


def test_class_with_too_few_images(image_folder_factory, tmp_path):
    root = image_folder_factory(tmp_path / "d", classes=("big",), per_class=10, size=SMALL)
    image_folder_factory(root, classes=("small",), per_class=2, size=SMALL)
    with pytest.raises(UsageError, match=r"class 'small' has 2 usable image\(s\).* at least 3"):
        load_image_folder(str(root), val_split=0.2, test_split=0.1)
    folder = load_image_folder(str(root), val_split=0.2, test_split=0.0)  # 1 val + 1 train
    assert folder.train.counts(2) == [8, 1]


def test_split_counts():
    split = Split(("a", "b", "c"), (0, 2, 2))
    assert len(split) == 3 and split.counts(4) == [1, 0, 2, 0]
    assert Split((), ()).counts(2) == [0, 0]


# ----------------------------------------------------------------------------- tf.data


def _labels(dataset) -> list[int]:
    return [int(y) for _, labels in dataset for y in labels.numpy()]


@pytest.fixture(scope="module")
def tiny_loaded(tiny_folder) -> ImageFolder:
    return load_image_folder(str(tiny_folder))


@pytest.mark.parametrize("cache", [True, False])
def test_make_dataset_batches(tiny_loaded, cache):
    split = tiny_loaded.train
    dataset = make_dataset(split, (24, 32), batch_size=8, cache=cache)
    images_spec, labels_spec = dataset.element_spec
    assert tuple(images_spec.shape) == (None, 24, 32, 3) and images_spec.dtype.name == "float32"
    assert tuple(labels_spec.shape) == (None,) and labels_spec.dtype.name == "int32"
    batches = list(dataset)
    assert [len(y) for _, y in batches] == [8, 8, 8, 4]  # 28 training images
    assert _labels(dataset) == list(split.labels)  # no shuffle: file order kept
    first = batches[0][0].numpy()
    assert 0 <= first.min() and first.max() <= 255 and first.max() > 1  # 0-255, not 0-1
    expected = read_image(split.paths[0], (24, 32)).astype(np.float32)
    np.testing.assert_array_equal(first[0], expected)


@pytest.mark.parametrize("cache", [True, False])
def test_make_dataset_shuffle_is_seeded(tiny_loaded, cache):
    split = tiny_loaded.train
    kwargs = {"batch_size": 64, "shuffle": True, "cache": cache}
    one = make_dataset(split, (8, 8), seed=1, **kwargs)
    epoch1, epoch2 = _labels(one), _labels(one)
    assert sorted(epoch1) == sorted(split.labels)
    assert epoch1 != list(split.labels)
    assert epoch1 != epoch2  # reshuffled every epoch
    assert _labels(make_dataset(split, (8, 8), seed=1, **kwargs)) == epoch1
    images = [b[0].numpy() for b in make_dataset(split, (8, 8), seed=1, **kwargs)]
    again = [b[0].numpy() for b in make_dataset(split, (8, 8), seed=1, **kwargs)]
    np.testing.assert_array_equal(images[0], again[0])
    assert _labels(make_dataset(split, (8, 8), seed=2, **kwargs)) != epoch1


def test_make_dataset_survives_files_broken_after_the_check(image_folder_factory, tmp_path, caplog):
    """A file that breaks mid-run becomes a grey stand-in: the run goes on, the length stays
    known (no "ran out of data" surprises in Keras), and the file is named in the log."""
    root = image_folder_factory(tmp_path / "d", per_class=5, size=SMALL)
    folder = load_image_folder(str(root), val_split=0.0, test_split=0.0)
    Path(folder.train.paths[3]).write_bytes(b"gone")
    dataset = make_dataset(folder.train, (8, 8), batch_size=4)
    assert int(dataset.cardinality()) == 3
    with caplog.at_level(logging.WARNING, logger="headstart.data"):
        batches = list(dataset.as_numpy_iterator())
    images = np.concatenate([x for x, _ in batches])
    assert len(images) == 10
    assert np.all(images[3] == 128) and not np.all(images[2] == 128)
    assert "became unreadable" in caplog.text and folder.train.paths[3] in caplog.text


def test_make_dataset_empty_split_and_bad_args(tiny_loaded):
    assert list(make_dataset(Split((), ()), (8, 8))) == []
    with pytest.raises(UsageError, match="--batch-size"):
        make_dataset(tiny_loaded.train, (8, 8), batch_size=0)
    for size in [(8, -1), 224, (8, 8, 3)]:
        with pytest.raises(UsageError, match="--image-size"):
            make_dataset(tiny_loaded.train, size)


# ----------------------------------------------------------------------------- find_images


def test_find_images(odd_folder, tmp_path, monkeypatch):
    cat = odd_folder / "cat"
    one = str(cat / "UPPER.JPG")
    assert find_images([one]) == [one]
    in_folder = find_images([str(cat)])
    assert in_folder == sorted(in_folder)
    assert str(cat / "nested" / "deeper" / "café photo ñ.png") in in_folder  # recursive
    assert not any("/." in p or "notes.txt" in p for p in in_folder)  # hidden, non-images
    assert len(in_folder) == 12 + 11 + 3  # good + odd good + odd bad (predict reports those)
    monkeypatch.chdir(odd_folder)
    pngs = find_images(["cat/*.png"])
    assert pngs == sorted(pngs) and all(p.startswith("cat/") and p.endswith(".png") for p in pngs)
    assert find_images([one, str(cat), one]) == in_folder  # duplicates dropped, order kept


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d / "missing.jpg", "no such file"),
        (lambda d: d / "*.webp", "pattern matches no image"),
        (lambda d: d / "notes.txt", "not a supported image"),
        (lambda d: d / "empty_dir", "contains no image"),
    ],
)
def test_find_images_errors(tmp_path, make, match):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / ".hidden.jpg").write_bytes(b"")
    with pytest.raises(UsageError, match=match):
        find_images([str(make(tmp_path))])
    with pytest.raises(UsageError):
        find_images([])


def test_checks_decode_small_files_in_one_thread_and_large_ones_on_every_core(tmp_path):
    """Threads pay off only where PIL's decoding (without Python's lock) dominates: the
    verdicts are the same either way."""
    rng = np.random.default_rng(0)
    small, large = tmp_path / "small", tmp_path / "large"
    for folder, side in ((small, 28), (large, 160)):  # noise PNGs: 2.4 KB and 77 KB
        folder.mkdir()
        for i in range(4):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / "broken.png").write_bytes(b"not an image")
    small_paths = sorted(str(p) for p in small.iterdir())
    large_paths = sorted(str(p) for p in large.iterdir())
    assert all(os.path.getsize(p) > data_module.SMALL_FILE_BYTES for p in large_paths[:-1])
    assert decode_threads(small_paths) == 1
    assert decode_threads(large_paths) == min(32, os.cpu_count() or 1)
    assert decode_threads([str(tmp_path / "missing.png")]) == 1
    for paths in (small_paths, large_paths):
        alone = unreadable_images(paths, 32, 1)
        assert unreadable_images(paths, 32, 4) == alone == unreadable_images(paths, 32, None)
        assert list(alone) == [paths[-1]] and "not an image" in alone[paths[-1]]

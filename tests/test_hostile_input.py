"""A real-world image folder, at its worst: training goes on, every bad file is skipped with its
reason, every good file is used, and not one byte of the folder changes. Plus a property test of
`read_image`: arbitrary bytes are decoded or refused with a reason, never a crash."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import stat
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from headstart import Config, files, runs, train
from headstart.cli import main
from headstart.data import UnreadableImage, read_image
from headstart.errors import UsageError
from headstart.splits import load_image_folder

# Expected here: PIL warns about decompression bombs before read_image refuses them, and about
# the corrupt EXIF blocks the fuzzer makes (the image itself is still read).
pytestmark = [
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin"),
]

# ----------------------------------------------------------------------------- building blocks


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, idat: bytes = b"") -> bytes:
    """An 8-bit greyscale PNG declaring width x height, with the given compressed pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", header) + (_png_chunk(b"IDAT", idat) if idat else b"")
    return b"\x89PNG\r\n\x1a\n" + chunks + _png_chunk(b"IEND", b"")


def _png_of_zeros(width: int, height: int) -> bytes:
    """A real, valid, all-black PNG: 100 M pixels compress to ~100 kB (a decompression bomb)."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return _png(width, height, idat)


def _jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _with_extraneous_bytes(jpeg: bytes) -> bytes:
    """Junk before the end-of-image marker: libjpeg's "Corrupt JPEG data: N extraneous bytes
    before marker 0xd9", common in the cats-vs-dogs set. The image data is intact."""
    assert jpeg.endswith(b"\xff\xd9")
    return jpeg[:-2] + b"\x00junk" * 25 + b"\xff\xd9"


POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto\nshowpage\n"
NOT_UTF8 = os.fsdecode(b"caf\xe9 latin-1 name.jpg")  # a Latin-1 name from an old zip


def _fingerprint(root: Path) -> dict[str, tuple]:
    """Every entry below root (symlinks not followed): kind, mode, mtime, sha256 or link target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            key = os.fsencode(os.path.relpath(path, root))
            if stat.S_ISLNK(info.st_mode):
                found[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[key] = ("dir", info.st_mode, info.st_mtime_ns)
            else:
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                found[key] = ("file", info.st_mode, info.st_mtime_ns, info.st_size, digest)
    return found


# ----------------------------------------------------------------------------- the hostile folder


#: Extra readable files in the first class, on top of the factory's odd files.
HOSTILE_GOOD = (
    "extraneous bytes.jpg",
    "Mixed Case.Jpeg",
    "SHOUT.PNG",
    NOT_UTF8,
    "link to good.png",  # a symlink to a file: followed
)
#: Extra unreadable files in the first class -> reason.
HOSTILE_BAD = {
    "bomb header.png": "too large (decompression bomb)",  # declares 30000 x 30000, 65 bytes
    "bomb zeros.png": "too large (decompression bomb)",  # 10000 x 10000 real pixels, ~100 kB
    "self loop.jpg": "symlink loop",
    "dangling.png": "broken symlink",
    "postscript.jpg": "not an image",  # never handed to Ghostscript
    "new\nline.jpg": "not an image",  # skipped.txt stays one line per file
}
CLASSES = ("cat", "chien noir ñ")  # unicode and a space in a class name


@pytest.fixture(scope="module")
def hostile(image_folder_factory, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "data"
    image_folder_factory(root, classes=CLASSES, per_class=12, odd_files=True)
    cat = root / CLASSES[0]
    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    (cat / "extraneous bytes.jpg").write_bytes(_with_extraneous_bytes(_jpeg_bytes(photo)))
    photo.save(cat / "Mixed Case.Jpeg", format="JPEG")
    photo.save(cat / "SHOUT.PNG", format="PNG")
    photo.save(os.path.join(os.fsencode(cat), os.fsencode(NOT_UTF8)), format="JPEG")
    os.symlink("cat_all_000.png", cat / "link to good.png")
    (cat / "bomb header.png").write_bytes(_png(30000, 30000))
    (cat / "bomb zeros.png").write_bytes(_png_of_zeros(10000, 10000))
    os.symlink("self loop.jpg", cat / "self loop.jpg")
    os.symlink("missing.png", cat / "dangling.png")
    (cat / "postscript.jpg").write_bytes(POSTSCRIPT)
    (cat / "new\nline.jpg").write_text("not an image\n")
    photo.save(cat / ".hidden.jpg", format="JPEG")  # hidden: ignored
    os.symlink("..", cat / "loop up")  # inside a class: symlinked folders are not followed
    os.symlink(".", root / "loop class")  # a class folder looping back to DATA: ignored
    return root


def _good_and_bad(factory, root: Path) -> tuple[set[str], dict[str, str]]:
    cat, other = root / CLASSES[0], root / CLASSES[1]
    good = {str(p) for p in cat.glob(f"{CLASSES[0]}_all_*")} | {str(p) for p in other.iterdir()}
    good |= {str(cat / name) for name in (*factory.ODD_GOOD, *HOSTILE_GOOD)}
    bad = {str(cat / n): r for n, r in {**factory.ODD_BAD, **HOSTILE_BAD}.items()}
    return good, bad


@pytest.mark.slow  # a full training run
def test_training_on_a_hostile_folder(hostile, image_folder_factory, tmp_path, caplog):
    good, bad = _good_and_bad(image_folder_factory, hostile)
    assert len(good) == 12 + 12 + len(image_folder_factory.ODD_GOOD) + len(HOSTILE_GOOD) == 40
    before = _fingerprint(hostile)
    config = Config(
        data=str(hostile),
        out=str(tmp_path / "run"),
        backbone="scratch_cnn",
        image_size=32,
        head="flatten",
        epochs=1,
        batch_size=8,
        augment="none",
        quiet=True,
    )
    with caplog.at_level(logging.WARNING, logger="headstart"):
        result = train(config)
    run = result.run_dir

    # every bad file listed once, with its reason; odd names escaped to one line each
    lines = (run / "skipped.txt").read_text(encoding="utf-8").splitlines()
    expected = {path.replace("\n", "\\n"): reason for path, reason in bad.items()}
    assert dict(line.split("\t") for line in lines) == expected
    assert len(lines) == len(bad) == result.metrics["skipped"] == 9

    # every good file used, each in exactly one split; all classes, and only them
    folder = load_image_folder(str(hostile))  # what train used: same seed and fractions
    used = [*folder.train.paths, *folder.val.paths, *folder.test.paths]
    assert sorted(used) == sorted(good) and len(used) == len(set(used)) == 40
    assert folder.class_names == CLASSES
    assert (len(folder.train), len(folder.val), len(folder.test)) == (28, 8, 4)
    assert result.metrics["n_test"] == 4
    assert runs.read_labels(run) == list(CLASSES)

    # warned about the empty class folder and the looping class symlink
    assert image_folder_factory.EMPTY_CLASS in caplog.text
    assert "loop class: a symlink back to" in caplog.text

    # a complete run, nothing half-written, and the data folder untouched to the byte
    rows = list(csv.DictReader((run / "history.csv").open(encoding="utf-8")))
    assert [row["stage"] for row in rows] == ["head", "refit_head"]  # the default refits
    assert not [p.name for p in run.iterdir() if files.is_temp_file(p.name)]
    assert _fingerprint(hostile) == before


def test_each_hostile_file_reads_as_expected(hostile):
    cat = hostile / CLASSES[0]
    clean = read_image(str(cat / "Mixed Case.Jpeg"))
    np.testing.assert_array_equal(read_image(str(cat / "extraneous bytes.jpg")), clean)
    assert read_image(os.path.join(str(cat), NOT_UTF8), (16, 16)).shape == (16, 16, 3)
    for name, reason in HOSTILE_BAD.items():
        with pytest.raises(UnreadableImage) as info:
            read_image(str(cat / name), (32, 32))
        assert str(info.value) == reason, name


def test_a_class_too_small_after_skipping_is_a_clear_error(image_folder_factory, tmp_path, capsys):
    root = image_folder_factory(tmp_path / "data", classes=("big", "few"), per_class=10)
    for path in sorted((root / "few").iterdir())[1:]:
        path.write_bytes(b"")  # 9 of the 10 'few' images become empty files
    argv = ["--quiet", "train", str(root), "--out", str(tmp_path / "run"), "--backbone"]
    assert main([*argv, "scratch_cnn"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        "headstart: error: class 'few' has 1 usable image(s); with --val-split 0.2 and "
        "--test-split 0.1 each class needs at least 3: add images or lower the split fractions"
    )
    assert not (tmp_path / "run").exists()  # refused before any run folder is made


def test_class_folder_name_that_is_not_utf8_is_a_clear_error(image_folder_factory, tmp_path):
    root = image_folder_factory(tmp_path / "data", classes=("ok",), per_class=4)
    image_folder_factory(root, classes=(os.fsdecode(b"caf\xe9"),), per_class=4)
    with pytest.raises(UsageError, match=r"class folder name 'caf\\udce9'.*not valid UTF-8"):
        load_image_folder(str(root))


# ----------------------------------------------------------------------------- property test


def _seed_files() -> dict[str, bytes]:
    """Small valid files of every format and mode read_image meets, as mutation seeds."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    seeds = {}
    variants = {
        "jpeg": (rgb, "JPEG", {}),
        "jpeg-progressive-cmyk": (rgb.convert("CMYK"), "JPEG", {"progressive": True}),
        "png-rgba": (rgb.convert("RGBA"), "PNG", {}),
        "png-palette": (rgb.convert("P"), "PNG", {"transparency": 0}),
        "png-16bit": (Image.fromarray(rng.integers(0, 65535, (6, 5), dtype=np.uint16)), "PNG", {}),
        "gif": (rgb, "GIF", {"save_all": True, "append_images": [rgb.rotate(90)]}),
        "webp": (rgb, "WEBP", {}),
        "bmp": (rgb, "BMP", {}),
    }
    for name, (image, fmt, options) in variants.items():
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        seeds[name] = buffer.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds["jpeg-exif"] = _jpeg_bytes(rgb, exif=exif)
    return seeds


SEEDS = _seed_files()
SIZES = st.sampled_from([None, (8, 8), (5, 9)])


def _check_read(data: bytes, size) -> None:
    """The property: an RGB uint8 array of the asked size, or UnreadableImage with a reason."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzz.jpg")
        with open(path, "wb") as handle:
            handle.write(data)
        try:
            image = read_image(path, size)
        except UnreadableImage as exc:
            assert str(exc).strip(), "a refusal needs a reason"
            return
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3 and min(image.shape) >= 1
    if size is not None:
        assert image.shape[:2] == size


@st.composite
def mutated(draw) -> bytes:
    """A valid file with bytes overwritten, inserted, deleted, or the tail cut off."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        if kind == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(data=st.binary(max_size=4096), size=SIZES)
def test_read_image_never_crashes_on_arbitrary_bytes(data, size):
    _check_read(data, size)


@_FUZZ
@given(data=mutated(), size=SIZES)
def test_read_image_never_crashes_on_mutated_images(data, size):
    _check_read(data, size)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_fuzz_seeds_are_readable(name):
    """The mutation seeds themselves decode, so the fuzzing starts from real images."""
    _check_read(SEEDS[name], (8, 8))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "seed.png")
        Path(path).write_bytes(SEEDS[name])
        assert read_image(path, (8, 8)).shape == (8, 8, 3)

"""Shared fixtures: tiny, learnable image folders generated on the fly (no binary test data)."""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Let `pytest` work from a fresh checkout without `pip install -e .`.
_SRC = Path(__file__).resolve().parents[1] / "src"
if importlib.util.find_spec("headstart") is None and _SRC.is_dir():
    sys.path.insert(0, str(_SRC))

# Well separated colours: a tiny model (or a frozen backbone + head) separates them in a few steps.
_PALETTE = np.array(
    [
        (220, 40, 40),
        (40, 90, 220),
        (40, 190, 60),
        (230, 200, 40),
        (170, 50, 200),
        (40, 200, 210),
        (240, 130, 30),
        (120, 120, 120),
    ],
    dtype=np.float64,
)


class ImageFolderFactory:
    """Callable fixture: ``image_folder_factory(root, classes=..., ...) -> Path``.

    Layouts: ``class_folders`` writes ``root/<class>/`` with `per_class` images each;
    ``split_folders`` writes ``root/<split>/<class>/`` for each name in `splits`, with
    `per_class` images in train and ``split_count(split, per_class)`` in the others.

    With ``odd_files=True`` the files in `ODD_GOOD` and `ODD_BAD` are added to the first class
    (in ``train/`` for the split layout), plus junk that must be ignored silently: `.DS_Store`
    files, a `__MACOSX` folder, a hidden `.thumbnails` folder holding a valid image,
    `notes.txt` files, and a class folder `EMPTY_CLASS` with no images. So the first class has
    ``per_class + len(ODD_GOOD)`` readable images and `len(ODD_BAD)` files are skipped.
    """

    #: Readable odd files (relative to the first class folder).
    ODD_GOOD: tuple[str, ...] = (
        "rgba.png",  # left half fully transparent over black: must come out white
        "sixteen_bit.png",  # I;16 gradient 20000..45000: mid-grey, never all 255
        "palette.png",  # P mode, index 0 transparent on the left half
        "cmyk.jpg",  # pure red in CMYK
        "grey.jpg",
        "animated.gif",  # frame 0 red, frame 1 blue
        "photo.webp",
        "tiny_1x1.png",
        "UPPER.JPG",
        "exif_rotated.jpg",  # stored 30 wide x 20 high, EXIF orientation 6
        "nested/deeper/café photo ñ.png",  # unicode + space, two folders down
    )
    #: Unreadable odd files -> the reason `load_image_folder` must give.
    ODD_BAD: dict[str, str] = {
        "zero_bytes.jpg": "empty file",
        "truncated.jpg": "truncated",
        "text_not_image.jpg": "not an image",
    }
    EMPTY_CLASS = "zz_empty_class"
    EXIF_STORED_SIZE = (30, 20)  # PIL (width, height) before rotation

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self._tmp = tmp_path_factory

    @staticmethod
    def split_count(split: str, per_class: int) -> int:
        """Images per class written into `split` in the split_folders layout."""
        return per_class if split == "train" else max(1, per_class // 2)

    def __call__(
        self,
        root: Path | str | None = None,
        classes: tuple[str, ...] = ("cat", "dog"),
        per_class: int = 12,
        size: tuple[int, int] = (40, 48),
        layout: str = "class_folders",
        odd_files: bool = False,
        splits: tuple[str, ...] = ("train", "val", "test"),
    ) -> Path:
        """Write the folder and return it; `size` is (height, width), seeded so it is stable."""
        root = Path(root) if root is not None else self._tmp.mktemp("images") / "data"
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1234)
        if layout == "class_folders":
            parents = {"": per_class}
        elif layout == "split_folders":
            parents = {split: self.split_count(split, per_class) for split in splits}
        else:
            raise ValueError(f"unknown layout {layout!r}")
        for parent, count in parents.items():
            for index, name in enumerate(classes):
                folder = root / parent / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    image = _class_image(index, size, rng)
                    ext = "png" if i % 2 == 0 else "jpg"
                    image.save(folder / f"{name}_{parent or 'all'}_{i:03d}.{ext}")
        if odd_files:
            first = root / ("train" if layout == "split_folders" else "") / classes[0]
            self._write_odd_files(root, first, size, rng)
        return root

    def _write_odd_files(self, root: Path, folder: Path, size: tuple[int, int], rng) -> None:
        h, w = size
        red = _class_image(0, size, rng)
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[:, w // 2 :] = (220, 40, 40, 255)
        Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
        ramp = np.linspace(20000, 45000, h * w).reshape(h, w).astype(np.uint16)
        Image.fromarray(ramp).save(folder / "sixteen_bit.png")
        pal = Image.new("P", (w, h), 0)
        pal.putpalette([0, 0, 0, 220, 40, 40] + [0] * 762)
        pal.paste(1, (w // 2, 0, w, h))
        pal.save(folder / "palette.png", transparency=0)
        Image.new("CMYK", (w, h), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
        red.convert("L").save(folder / "grey.jpg")
        frames = [Image.new("RGB", (w, h), (255, 0, 0)), Image.new("RGB", (w, h), (0, 0, 255))]
        frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
        red.save(folder / "photo.webp")
        Image.new("RGB", (1, 1), (220, 40, 40)).save(folder / "tiny_1x1.png")
        red.save(folder / "UPPER.JPG", format="JPEG")
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.new("RGB", self.EXIF_STORED_SIZE, (220, 40, 40)).save(
            folder / "exif_rotated.jpg", exif=exif
        )
        nested = folder / "nested" / "deeper"
        nested.mkdir(parents=True)
        red.save(nested / "café photo ñ.png")
        self._write_bad_files(folder, red)
        self._write_junk(root, folder, red)

    @staticmethod
    def _write_bad_files(folder: Path, image: Image.Image) -> None:
        (folder / "zero_bytes.jpg").write_bytes(b"")
        buf = io.BytesIO()
        image.resize((200, 160)).save(buf, format="JPEG", quality=95)
        (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        (folder / "text_not_image.jpg").write_text("this is not a JPEG\n")

    def _write_junk(self, root: Path, folder: Path, image: Image.Image) -> None:
        (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (root / "notes.txt").write_text("where these images came from\n")
        (folder / "notes.txt").write_text("a note\n")
        macosx = root / "__MACOSX" / folder.name
        macosx.mkdir(parents=True)
        (macosx / "._rgba.png").write_bytes(b"\x00\x05\x16\x07junk")
        (macosx / "real_looking.png").write_bytes(b"junk")
        hidden = folder / ".thumbnails"
        hidden.mkdir()
        image.save(hidden / "thumb.png")
        empty = folder.parent / self.EMPTY_CLASS
        empty.mkdir()
        (empty / ".DS_Store").write_bytes(b"\x00")
        (empty / "readme.txt").write_text("nothing here yet\n")


def _class_image(index: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Class colour x class stripe pattern + noise: learnable, yet no two images identical."""
    h, w = size
    colour = _PALETTE[index % len(_PALETTE)]
    yy, xx = np.mgrid[0:h, 0:w]
    coord = yy if index % 2 == 0 else xx
    stripes = 0.75 + 0.25 * (np.sin(coord * (0.5 + 0.2 * (index // 2))) > 0)
    pixels = colour * stripes[..., None] + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


#: The test suite's own backbone (registered for the session by `pytest_configure`): a tiny
#: pretrained-style convnet, so two-stage behaviour (cached features, then fine-tuning the top
#: block on the cached trunk) runs in seconds. Tests about a real backbone name that backbone.
TINY_BACKBONE = "tiny_test"
#: A second one, for two-backbone fusion: other widths, another input preprocessing, and a
#: Keras model named unlike its registry entry (as Keras applications are).
TINY_BACKBONE_B = "tiny_test_b"


def _tiny_base(name: str, widths: tuple[int, int, int], model_name=None):
    """``build(input_shape, weights)`` of a tiny pretrained-style backbone: two blocks
    (Conv2D -> BatchNormalization -> ReLU -> MaxPool, named ``block1_*``, ``block2_*``) and a top
    block (Conv2D -> BatchNormalization -> ReLU) from ``top_conv``, the default fine-tuning
    cut, so the cached trunk ends at ``block2_pool``. tiny_test (widths 8, 16, 32) at 32 px:
    8x8x32 out, 6,200 parameters (112 of them BatchNormalization's moving statistics).
    No ImageNet weights: "none" (random, from the seed) or a weights file."""

    def build(input_shape, weights):
        import keras
        from keras import layers

        from headstart.errors import UsageError

        if weights == "imagenet":
            raise UsageError(f"{name} has no ImageNet weights: use --weights none or a file")
        inputs = keras.Input(input_shape)
        x = inputs
        for block, filters in ((1, widths[0]), (2, widths[1])):
            x = layers.Conv2D(
                filters, 3, padding="same", use_bias=False, name=f"block{block}_conv"
            )(x)
            x = layers.BatchNormalization(name=f"block{block}_bn")(x)
            x = layers.ReLU(name=f"block{block}_relu")(x)
            x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
        x = layers.Conv2D(widths[2], 3, padding="same", use_bias=False, name="top_conv")(x)
        x = layers.BatchNormalization(name="top_bn")(x)
        x = layers.ReLU(name="top_relu")(x)
        model = keras.Model(inputs, x, name=model_name(input_shape) if model_name else name)
        if weights is not None:
            model.load_weights(weights)
        return model

    return build


#: Put this folder on a test subprocess's PYTHONPATH and its ``sitecustomize`` registers the
#: tiny backbones there too (``python -m headstart`` and the processes it launches).
SUBPROCESS_SITE = Path(__file__).resolve().parent / "subprocess_site"


def pytest_configure(config: pytest.Config) -> None:
    """Register the tiny backbones before collection (so registry-wide parametrized tests
    cover them too, and every test module sees them)."""
    register_tiny_backbones()


def register_tiny_backbones() -> None:
    from headstart.backbones import Backbone, register

    register(
        Backbone(
            TINY_BACKBONE,
            _tiny_base(TINY_BACKBONE, (8, 16, 32)),
            32,
            "tf",
            unfreeze_from="top_conv",
            min_size=8,
            pretrained=True,
            description="the test suite's tiny pretrained-style backbone (random weights)",
        )
    )
    register(
        Backbone(
            TINY_BACKBONE_B,
            _tiny_base(TINY_BACKBONE_B, (4, 8, 24), lambda shape: f"tiny_test_b_{shape[0]}"),
            32,
            "torch",
            unfreeze_from="top_conv",
            min_size=8,
            pretrained=True,
            description="the test suite's second tiny backbone (fusion tests)",
        )
    )


# The modules that take longest (minutes, not seconds: other processes, real weights), longest
# first (measured with --durations, 2026-12-01). `--dist loadfile` keeps a module on one
# worker, and xdist would hand out the modules with the most tests first, which left
# test_distributed_default.py (3 tests, the longest) for last, one worker idle meanwhile
# (2 min of an 18-min suite). Collected first, and with `--no-loadscope-reorder`
# (pyproject.toml's addopts), they start first: the longest-first schedule.
LONGEST_MODULES = (
    "test_distributed_default.py",
    "test_train.py",
    "test_distributed.py",
    "test_resume.py",
    "test_backbones.py",
    "test_report.py",
    "test_backends.py",
    "test_runs.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Real offline weights take minutes, not seconds: every integration test is also slow.
    The longest modules are collected first (`LONGEST_MODULES`)."""
    for item in items:
        if item.get_closest_marker("integration") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as found


def pytest_unconfigure(config: pytest.Config) -> None:
    from headstart.backbones import REGISTRY

    for name in (TINY_BACKBONE, TINY_BACKBONE_B):
        REGISTRY.pop(name, None)


@pytest.fixture(scope="session")
def image_folder_factory(tmp_path_factory: pytest.TempPathFactory) -> ImageFolderFactory:
    """Build image folders anywhere; see `ImageFolderFactory` for the layout and odd files."""
    return ImageFolderFactory(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_folder(image_folder_factory: ImageFolderFactory) -> Path:
    """Read-only, shared: DATA/{cat,dog}/ with 20 learnable 40x48 images each (PNG/JPEG)."""
    return image_folder_factory(classes=("cat", "dog"), per_class=20)


@pytest.fixture(scope="session")
def mirrored_classes(tmp_path_factory):
    """Read-only, shared: two classes that are mirror images of each other (a ramp rising to
    the right or to the left, with noise, 24 images each at 64 px): every flipping policy
    turns one class into the other."""
    root = tmp_path_factory.mktemp("mirrored") / "data"
    rng = np.random.default_rng(7)
    ramp = np.linspace(30, 220, 64)[None, :, None] * np.ones((64, 1, 3))
    for name, pixels in (("rising", ramp), ("falling", ramp[:, ::-1])):
        (root / name).mkdir(parents=True)
        for i in range(24):
            noisy = np.clip(pixels + rng.normal(0, 25, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_run(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only, shared: a finished 2-epoch scratch_cnn run (32 px) on `tiny_folder`; copy it
    before changing anything in it. --no-refit: its validation split is held out (what
    `headstart calibrate` and the validation figures need)."""
    from headstart import Config, train

    config = Config(
        data=str(tiny_folder),
        out=str(tmp_path_factory.mktemp("runs") / "tiny_run"),
        backbone="scratch_cnn",
        image_size=32,
        head="flatten",
        epochs=2,
        batch_size=8,
        augment="none",
        refit=False,
        quiet=True,
    )
    return train(config).run_dir


@pytest.fixture(scope="session", autouse=True)
def _isolated_feature_cache(tmp_path_factory: pytest.TempPathFactory):
    """Tests never read or fill the user's feature cache (~/.cache/headstart)."""
    import os

    previous = os.environ.get("HEADSTART_CACHE")
    os.environ["HEADSTART_CACHE"] = str(tmp_path_factory.mktemp("feature_cache"))
    yield
    if previous is None:
        os.environ.pop("HEADSTART_CACHE", None)
    else:
        os.environ["HEADSTART_CACHE"] = previous


ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_SITE = ROOT / "tests" / "subprocess_site"  # its sitecustomize registers tiny_test


@pytest.fixture(scope="session")
def jax_env(tmp_path_factory):
    """``jax_env(tmp) -> env`` for a headstart subprocess on the JAX backend (the distributed
    tests): the tiny test backbones registered, scratch run folders of processes other than 0
    under ``tmp/scratch``, and one JAX compilation cache for the session's processes, so the
    same model built again (another process, a resumed run) loads its XLA programs."""
    compilation_cache = tmp_path_factory.mktemp("jax-cache")

    def env(tmp: Path) -> dict:
        scratch = tmp / "scratch"
        scratch.mkdir(exist_ok=True)
        return {
            **os.environ,
            "KERAS_BACKEND": "jax",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(SUBPROCESS_SITE)]),
            "TMPDIR": str(scratch),
            "JAX_COMPILATION_CACHE_DIR": str(compilation_cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # even the initialisers' programs
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        }

    return env


@pytest.fixture(scope="session")
def child_processes():
    """``child_processes(pid) -> [pid, ...]``, read from /proc (Linux)."""

    def children(pid: int) -> list[int]:
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
        return found

    return children


@pytest.fixture(scope="session")
def run_cluster():
    """``run_cluster(commands, env, logs) -> (exit codes, log tails)``: one process per
    command, started together (the manual ``--coordinator`` form of a distributed run), each
    one's stderr in its log file (a full pipe would block it), all waited for (10 minutes at
    most) and none left running."""

    def run(commands: list[list[str]], env: dict, logs: list[Path]) -> tuple[list[int], str]:
        outputs = [log.open("w") for log in logs]
        processes = [
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=output, env=env)
            for command, output in zip(commands, outputs, strict=True)
        ]
        try:
            for process in processes:
                process.wait(timeout=600)
        finally:
            for process, output in zip(processes, outputs, strict=True):
                process.kill()
                output.close()
        return [p.returncode for p in processes], "".join(log.read_text()[-3000:] for log in logs)

    return run


def assert_same_training(run: Path, reference: Path, atol: float = 1e-4) -> list[dict]:
    """Two runs trained alike: the same stages, every epoch's losses and accuracies (the
    refit's have no validation figures) and the saved model's weights within ``atol`` (a
    distributed run's all-reduce sums in another order than one process: measured 1e-6 on
    the losses). Returns ``run``'s history rows."""
    import keras  # noqa: PLC0415  (conftest is imported by subprocesses that need no Keras)

    def history(folder: Path) -> list[dict]:
        return list(csv.DictReader((folder / "history.csv").open()))

    def weights(folder: Path) -> list[np.ndarray]:
        model = keras.saving.load_model(folder / "model.keras")
        return [np.asarray(v) for v in model.get_weights()]

    rows, reference_rows = history(run), history(reference)
    assert [r["stage"] for r in rows] == [r["stage"] for r in reference_rows]
    for a, b in zip(rows, reference_rows, strict=True):
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            if a[key] == b[key] == "":  # a refit epoch: no validation
                continue
            assert float(a[key]) == pytest.approx(float(b[key]), abs=atol), key
    for a, b in zip(weights(run), weights(reference), strict=True):
        np.testing.assert_allclose(a, b, atol=atol)
    return rows


@pytest.fixture(scope="session")
def same_training():
    """`assert_same_training`, for test modules (they do not import conftest)."""
    return assert_same_training

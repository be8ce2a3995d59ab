"""Read images and folders of labelled images, and feed them to Keras as tf.data pipelines.

Two folder layouts are accepted: ``DATA/<class>/*`` (split by `headstart.splits`, stratified
and seeded) and ``DATA/{train,val,test}/<class>/*`` (the user's split is kept). A CSV labels
file (``path,label[,split]``, `read_labels_csv`) is read into the very same `Scan`: without a
split column like the first layout, with one like the second. Every image is decoded once up
front so broken files are reported before training instead of killing it halfway. The data
folder is only ever read, never written.

Pixel conventions (identical for training and prediction, since both go through `read_image`):
transparent images are composited on white, 16-bit images are scaled to 8 bits, EXIF
orientation is applied, and GIF/WebP animations use their first frame.
"""

from __future__ import annotations

import csv
import errno
import glob
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from headstart.errors import UsageError
from headstart.files import write_text_atomic
from headstart.progress import progress_bar

if TYPE_CHECKING:
    import tensorflow as tf

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
# The PIL decoders for those formats (JPEG includes cameras' multi-picture MPO files), whatever
# the file's extension says. Other contents are refused: PIL's other plugins would hand
# PostScript to Ghostscript, and accept almost any bytes as TGA.
PIL_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")

CLASS_FOLDERS = "class_folders"
SPLIT_FOLDERS = "split_folders"
CSV_LAYOUT = "csv"  # a CSV labels file: path,label[,split]
CSV_COLUMNS = ("path", "label", "split")  # the columns headstart reads (others are ignored)
LABEL_SEPARATOR = ";"  # between the labels of a multi-label cell: cat;outdoor

_SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_CACHE_BUDGET_BYTES = 2 * 1024**3
_LOG_SKIPPED = 10  # skipped files named individually at WARNING level
_WHITE = (255, 255, 255, 255)


# ----------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class Split:
    """One subset (train, val or test) as parallel tuples, so it can feed tf.data directly.

    ``labels`` holds each image's class index; in a multi-label split (``n_labels`` > 0, the
    number of labels) each image's label indices instead, as a sorted tuple (maybe empty).
    """

    paths: tuple[str, ...]
    labels: tuple[int, ...] | tuple[tuple[int, ...], ...]
    n_labels: int = 0  # > 0: multi-label, with this many labels

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def multi_label(self) -> bool:
        return self.n_labels > 0

    def counts(self, n_classes: int) -> list[int]:
        """Images per class (carrying each label, in a multi-label split), including zeros, for
        reports and class weights."""
        if self.multi_label:
            return self.targets().sum(axis=0).astype(np.int64).tolist()
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=n_classes).tolist()

    def targets(self) -> np.ndarray:
        """What a model is fitted to: class indices (N,) int32, or for a multi-label split the
        (N, n_labels) float32 matrix of 0 and 1 (one column per label)."""
        if not self.multi_label:
            return np.asarray(self.labels, dtype=np.int32)
        matrix = np.zeros((len(self.labels), self.n_labels), dtype=np.float32)
        for row, indices in enumerate(self.labels):
            matrix[row, list(indices)] = 1.0
        return matrix


@dataclass(frozen=True)
class ImageFolder:
    """Everything training needs to know about a data folder, decided once, up front."""

    root: str
    class_names: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    skipped: tuple[tuple[str, str], ...]
    layout: str
    multi_label: bool = False  # each image has a set of labels (`Split.n_labels`)


class UnreadableImage(Exception):
    """Raised by read_image; str(exc) is the short reason."""


# ----------------------------------------------------------------------------- reading images


def read_image(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 RGB array (H, W, 3); resized (bilinear) to size=(height, width) when given.

    Training, checking and prediction all read through here (or `decode_image`), so pixels
    always match. Any failure becomes `UnreadableImage` with a short reason, never another
    exception type.
    """
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage("empty file")
        with Image.open(path, formats=PIL_FORMATS) as img:
            return decode_image(img, size)
    except UnreadableImage:
        raise
    except Exception as exc:  # any decoder failure means: skip this file
        raise UnreadableImage(unreadable_reason(exc)) from exc


def decode_image(img: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """The pixels of an opened image as `read_image` gives them (for a caller that opened the
    file itself, from bytes it also hashes, say); PIL's own exceptions pass through."""
    _refuse_bombs(img)
    if size is not None:
        # JPEG only: decode at 1/2, 1/4 or 1/8 scale, still >= size (square, so that an
        # EXIF rotation cannot make one side too small).
        img.draft("RGB", (max(size),) * 2)
    img.load()
    rgb = _to_rgb(_exif_transpose(img))
    if size is not None and rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.array(rgb, dtype=np.uint8)


def _refuse_bombs(img: Image.Image) -> None:
    """Treat PIL's DecompressionBombWarning threshold as an error.

    An explicit pixel check rather than ``warnings.catch_warnings()``: that context manager
    swaps process-global state and is not thread-safe before Python 3.14, and this function runs
    in thread pools. PIL itself raises DecompressionBombError above twice this limit.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise UnreadableImage("too large (decompression bomb)")


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Honour the orientation tag; a corrupt EXIF block is not a reason to lose the image."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # a bad tag only loses the rotation
        logger.debug("ignoring unusable EXIF in %s: %s", getattr(img, "filename", "?"), exc)
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB whatever the source mode: alpha composited on white, 16-bit scaled down."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):
        # I;16* and I come from 16-bit PNGs; plain convert() would clip them to white.
        grey = np.asarray(img).astype(np.float64) / 257.0
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def unreadable_reason(exc: Exception) -> str:
    """Short, stable reasons so skipped.txt can be grepped and summarised."""
    text = str(exc)
    if isinstance(exc, Image.DecompressionBombError):
        return "too large (decompression bomb)"
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(exc, FileNotFoundError):
        return "broken symlink" if exc.filename and os.path.islink(exc.filename) else "missing file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "not a file"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if "truncated" in text.lower():
        return "truncated"
    if isinstance(exc, (OSError, SyntaxError)):
        return f"corrupt ({_shorten(text)})"
    return f"unreadable ({type(exc).__name__}: {_shorten(text)})"


def _shorten(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- scanning


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(folder: str) -> list[str]:
    """Image files below folder, sorted; symlinked folders are not followed, so loops end."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False, onerror=_walk_error):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        found.extend(
            os.path.join(dirpath, f) for f in filenames if not _is_hidden(f) and _is_image_name(f)
        )
    return sorted(found)


def _walk_error(exc: OSError) -> None:
    logger.warning("cannot list %s: %s", exc.filename, exc.strerror or exc)


def _subfolders(folder: str) -> list[tuple[str, str]]:
    """(name, path) of visible subfolders, sorted by name, without symlinks that loop back."""
    try:
        with os.scandir(folder) as entries:
            found = [(e.name, e.path) for e in entries if not _is_hidden(e.name) and e.is_dir()]
    except OSError as exc:
        raise UsageError(f"cannot read data folder {folder}: {exc.strerror or exc}") from exc
    return sorted((name, path) for name, path in found if not _loops_back(folder, path))


def _loops_back(folder: str, path: str) -> bool:
    """A symlinked subfolder pointing at `folder` or above it would be a class (or split) holding
    every image of every class: warn and ignore it. Other symlinked folders are used."""
    if not os.path.islink(path):
        return False
    target, here = os.path.realpath(path), os.path.realpath(folder)
    if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
        logger.warning("ignoring %s: a symlink back to %s (a loop)", path, target)
        return True
    return False


def _scan_classes(
    folder: str, subfolders: list[tuple[str, str]] | None = None
) -> dict[str, list[str]]:
    """class name -> image paths, for one folder of class subfolders (listed here if not given)."""
    classes = {}
    for name, path in _subfolders(folder) if subfolders is None else subfolders:
        files = _walk_images(path)
        if files:
            classes[name] = files
        else:
            logger.warning("ignoring class folder with no images: %s", path)
    return classes


def _detect_layout(root: str) -> tuple[str, dict[str, dict[str, list[str]]]]:
    """Layout name and {split: {class: paths}}; splits absent from the folder are absent here."""
    folders = _subfolders(root)
    if not any(name.lower() == "train" for name, _ in folders):
        return CLASS_FOLDERS, {"all": _scan_classes(root, folders)}
    splits: dict[str, dict[str, list[str]]] = {}
    for name, path in folders:
        split = _SPLIT_NAMES.get(name.lower())
        if split is None:
            raise UsageError(
                f"{root} has a 'train' folder, so it is read as train/val/test splits, but it also "
                f"has '{name}': move class folders into train/<class>/ (or rename 'train' if it "
                f"is a class)"
            )
        if split in splits:
            raise UsageError(f"{root} has both 'val' and 'validation' folders: keep only one")
        splits[split] = _scan_classes(path)
    return SPLIT_FOLDERS, splits


# ----------------------------------------------------------------------------- checking


Reader = Callable[[str], object]  # decodes one file; raises UnreadableImage when it cannot


def _check_images(
    paths: list[str], check_size: int, workers: int | None, reader: Reader | None, progress: bool
) -> dict[str, str]:
    """`unreadable_images`, logged: how many, and the first few by name."""
    if not paths:
        return {}
    start = time.perf_counter()
    bad = unreadable_images(paths, check_size, workers, reader=reader, progress=progress)
    logger.info(
        "checked %d images in %.1fs: %d unreadable",
        len(paths),
        time.perf_counter() - start,
        len(bad),
    )
    for i, (path, reason) in enumerate(sorted(bad.items())):
        # A messy folder can have thousands: name a few, the caller writes the full list.
        logger.log(
            logging.WARNING if i < _LOG_SKIPPED else logging.DEBUG, "skipping %s: %s", path, reason
        )
    if len(bad) > _LOG_SKIPPED:
        logger.warning("... and %d more unreadable files", len(bad) - _LOG_SKIPPED)
    return bad


def unreadable_images(
    paths: list[str],
    check_size: int,
    workers: int | None,
    *,
    reader: Reader | None = None,
    progress: bool = False,
) -> dict[str, str]:
    """path -> reason for each of ``paths`` that `read_image` cannot decode (at ``check_size``
    pixels); in parallel threads when the files are large (`decode_threads`).

    ``reader(path)`` decodes each file instead, raising `UnreadableImage` for one training
    cannot read: `headstart.check.FactsReader` learns what the data check needs from that same
    read, so the files are not decoded again for it. ``progress``: a bar on a terminal
    (`headstart.progress`).
    """
    workers = workers or decode_threads(paths)
    read = reader or (lambda path: read_image(path, (check_size, check_size)))

    def reason(path: str) -> str | None:
        try:
            read(path)
        except UnreadableImage as exc:
            return str(exc)
        return None

    reasons = []
    with (
        progress_bar(len(paths), "checking images", enabled=progress) as advance,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="headstart-check") as pool,
    ):
        # one thread: this one, without a future per file (0.3 ms a small image)
        verdicts = map(reason, paths) if workers == 1 else pool.map(reason, paths)
        for verdict in verdicts:
            reasons.append(verdict)
            advance(1)
    return {p: r for p, r in zip(paths, reasons, strict=True) if r is not None}


# the median size of the files (a sample of them) under which the checks decode in one thread
SMALL_FILE_BYTES = 64 * 1024
_SIZE_SAMPLE = 64


def decode_threads(paths: list[str]) -> int:
    """Threads that decode ``paths`` in the checks. PIL decodes without Python's lock, the
    rest of the work (opening the file, a small image's hashes) holds it; so threads pay off
    on large files and cost on small ones: the data check's read of a 200 KB JPEG took 2.7 ms
    alone, 1.5 ms on 2 threads, 2.0 ms on 6; of a 28x28 PNG 0.3 ms alone, 0.5 ms on 2 threads,
    0.7 ms on 6 (2 cores). One thread per core for large files, one for small ones."""
    sizes = []
    for path in paths[:: max(1, len(paths) // _SIZE_SAMPLE)][:_SIZE_SAMPLE]:
        try:
            sizes.append(os.path.getsize(path))
        except OSError:  # unreadable: the check says why
            continue
    if not sizes or sorted(sizes)[len(sizes) // 2] < SMALL_FILE_BYTES:
        return 1
    return min(32, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class Scan:
    """A data folder as found on disk, before any split: its layout, the readable images of
    each split folder ("all" for the class-folder layout) by class, and the unreadable ones."""

    root: str
    layout: str
    found: dict[str, dict[str, list[str]]]
    unreadable: dict[str, str]
    labels_file: str | None = None  # the CSV labels file, when the data is one
    # multi-label: {split: {path: label names}} of the readable images (``found`` is empty)
    label_sets: dict[str, dict[str, tuple[str, ...]]] | None = None


def scan_data(
    data: str,
    *,
    root: str | None = None,
    check_size: int = 64,
    workers: int | None = None,
    multi_label: bool | None = None,
    reader: Reader | None = None,
    progress: bool = False,
) -> Scan:
    """`scan_folder` for a folder, `scan_csv` for a CSV labels file (``root``: the folder its
    relative paths start from; ``multi_label``: see `scan_csv`; both only for a CSV).
    ``reader`` and ``progress``: see `unreadable_images`."""
    check = {"check_size": check_size, "workers": workers, "reader": reader, "progress": progress}
    if is_labels_file(data):
        return scan_csv(data, root=root, multi_label=multi_label, **check)
    if root is not None:
        raise UsageError(
            f"--root {root} applies to a CSV labels file, and {data} is a folder: drop --root"
        )
    if multi_label:
        raise UsageError(
            f"--multi-label needs a CSV labels file (labels separated by ';'), and {data} is a "
            f"folder"
        )
    return scan_folder(data, **check)


def scan_folder(
    root: str,
    *,
    check_size: int = 64,
    workers: int | None = None,
    reader: Reader | None = None,
    progress: bool = False,
) -> Scan:
    """Find the class folders under ``root`` and decode every image once (unreadable files
    are recorded with their reason, never fatal); `headstart.splits` splits the result.
    ``reader`` and ``progress``: see `unreadable_images`."""
    _check_scan_arguments(check_size, workers)
    root = _existing_folder(root)
    layout, found = _detect_layout(root)
    paths = [p for classes in found.values() for files in classes.values() for p in files]
    bad = _check_images(paths, check_size, workers, reader, progress)
    found = {
        split: _drop_unreadable(classes, bad, "" if split == "all" else f" in {split}/")
        for split, classes in found.items()
    }
    return Scan(root, layout, found, bad)


def _check_scan_arguments(check_size: int, workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise UsageError(f"workers must be at least 1, got {workers!r}")
    if check_size < 1:
        raise UsageError(f"check_size must be at least 1, got {check_size!r}")


def _drop_unreadable(
    classes: dict[str, list[str]], bad: dict[str, str], where: str
) -> dict[str, list[str]]:
    kept = {}
    for name, files in classes.items():
        good = [f for f in files if f not in bad]
        if good:
            kept[name] = good
        else:
            logger.warning(
                "ignoring class '%s'%s: none of its %d images is readable", name, where, len(files)
            )
    return kept


def _existing_folder(root: str) -> str:
    path = os.path.abspath(os.fspath(root))
    if not os.path.exists(path):
        raise UsageError(f"data folder not found: {path}")
    if not os.path.isdir(path):
        raise UsageError(
            f"data path is not a folder: {path} (expected DATA/<class>/<images>, or a .csv "
            f"labels file with columns path,label)"
        )
    return path


def require_classes(
    root: str, names: Iterable[str], minimum: int, *, labels_file: str | None = None
) -> tuple[str, ...]:
    """The class names, sorted; at least ``minimum`` of them. ``labels_file``: the classes are
    the labels of that CSV file (``root`` is then the file too), not folder names."""
    class_names = tuple(sorted(names))
    what = "label" if labels_file else "class folder name"
    for name in class_names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            shown = name.encode("utf-8", "backslashreplace").decode("utf-8")
            raise UsageError(
                f"{what} '{shown}' in {root} is not valid UTF-8 (class names go into "
                f"labels.json): rename the {'label' if labels_file else 'folder'}"
            ) from None
    if len(class_names) < max(1, minimum):
        found = ", ".join(class_names) or "none"
        kind, fix = (
            ("label(s)", "give the images at least that many different labels")
            if labels_file
            else ("class folder(s)", "put each class's images in its own subfolder")
        )
        raise UsageError(
            f"{root}: found {len(class_names)} {kind} with readable images ({found}); "
            f"need at least {max(1, minimum)}: {fix}"
        )
    return class_names


# ----------------------------------------------------------------------------- CSV labels


@dataclass(frozen=True)
class LabelRow:
    """One image of a CSV labels file."""

    line: int  # its line in the file (the header is line 1), for error messages
    path: str  # absolute
    label: str  # the label cell, stripped
    split: str | None  # "train", "val" or "test"; None when the file has no split column


def is_labels_file(data) -> bool:
    """A dataset given as a CSV labels file (``path,label[,split]``) rather than a folder."""
    return os.fspath(data).lower().endswith(".csv")


def image_root(data, root=None) -> str:
    """The folder a dataset's image paths are relative to (absolute): DATA itself for a
    folder; for a CSV labels file ``root`` (``--root``) or, by default, the file's folder."""
    if not is_labels_file(data):
        return os.path.abspath(os.fspath(data))
    if root is not None:
        return os.path.abspath(os.fspath(root))
    return os.path.dirname(os.path.abspath(os.fspath(data)))


def read_labels_csv(path, root=None) -> list[LabelRow]:
    """The rows of a CSV labels file: a header naming the columns ``path`` and ``label`` (and
    optionally ``split``: train, val or test; other columns are ignored), then one row per
    image. Relative paths start from `image_root` (``root``, default the file's folder).

    Whether the images can be read is not checked here (`scan_csv` does, and skips those that
    cannot); a file that cannot be parsed as such a table is a one-line `UsageError` naming
    the line: no header, a column named twice, a row with too few or too many cells, an empty
    path, a split that is not train/val/test, an image listed twice, no rows.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise UsageError(f"labels file not found: {path} (a .csv file with columns path,label)")
    base = image_root(path, root)
    if root is not None and not os.path.isdir(base):
        raise UsageError(f"--root {root}: folder not found ({base})")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's BOM
            reader = csv.reader(handle)
            lines = [(reader.line_num, cells) for cells in reader]
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text ({exc.reason}): save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise UsageError(f"{path} is not a readable CSV file: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read labels file {path}: {exc.strerror or exc}") from None
    lines = [(line, cells) for line, cells in lines if any(c.strip() for c in cells)]
    if not lines:
        raise UsageError(
            f"{path} is empty: expected a header line path,label (optionally ,split) and one "
            f"row per image"
        )
    header_line, header = lines[0]
    columns = _csv_columns(path, header_line, header)
    rows = [_label_row(path, line, cells, columns, len(header), base) for line, cells in lines[1:]]
    if not rows:
        raise UsageError(f"{path} has a header but no rows: add one row per image")
    seen: dict[str, int] = {}
    for row in rows:
        key = os.path.normcase(row.path)
        if key in seen:
            raise UsageError(
                f"{path} line {row.line}: {row.path} is already listed on line {seen[key]}: "
                f"list each image once"
            )
        seen[key] = row.line
    return rows


def _csv_columns(path: str, line: int, header: list[str]) -> dict[str, int]:
    """Column name -> index, for the columns headstart reads."""
    names = [cell.strip().lower() for cell in header]
    for i, name in enumerate(names):
        if name and name in names[:i]:
            raise UsageError(
                f"{path} line {line}: the header names column '{name}' twice: keep one"
            )
    missing = [name for name in CSV_COLUMNS[:2] if name not in names]
    if missing:
        found = ",".join(cell.strip() for cell in header)
        raise UsageError(
            f"{path} line {line}: the header must name the columns path and label (optionally "
            f"split), found '{found}': add the header line path,label"
        )
    return {name: names.index(name) for name in CSV_COLUMNS if name in names}


def _label_row(
    path: str, line: int, cells: list[str], columns: dict[str, int], width: int, base: str
) -> LabelRow:
    if len(cells) != width:
        raise UsageError(
            f"{path} line {line}: {len(cells)} cells where the header has {width}: "
            f"{'fill in every column' if len(cells) < width else 'quote cells holding commas'}"
        )
    file = cells[columns["path"]].strip()
    if not file:
        raise UsageError(f"{path} line {line}: empty path: give every row an image path")
    split = None
    if "split" in columns:
        cell = cells[columns["split"]].strip()
        split = _SPLIT_NAMES.get(cell.lower())
        if split is None:
            raise UsageError(
                f"{path} line {line}: split '{cell}' is not train, val or test: fix the row "
                f"(or drop the split column to split by the seed)"
            )
    return LabelRow(
        line=line,
        path=os.path.normpath(os.path.join(base, os.path.expanduser(file))),
        label=cells[columns["label"]].strip(),
        split=split,
    )


def scan_csv(
    path: str,
    *,
    root: str | None = None,
    check_size: int = 64,
    workers: int | None = None,
    multi_label: bool | None = None,
    reader: Reader | None = None,
    progress: bool = False,
) -> Scan:
    """A CSV labels file (`read_labels_csv`) as the `Scan` of a folder: its images by class,
    under "all" without a split column, under train/val/test with one; every image decoded
    once, and those missing or unreadable recorded with their reason (never fatal).

    Multi-label (``multi_label`` True, or None and some label cell holds a `LABEL_SEPARATOR`):
    each cell is a set of labels separated by ';' (an empty cell: none), in ``label_sets``.
    ``reader`` and ``progress``: see `unreadable_images`.
    """
    _check_scan_arguments(check_size, workers)
    rows = read_labels_csv(path, root)
    path = os.path.abspath(os.fspath(path))
    if multi_label is None:
        multi_label = any(LABEL_SEPARATOR in row.label for row in rows)
    if rows[0].split is not None and not any(row.split == "train" for row in rows):
        raise UsageError(f"{path}: no row has split 'train': mark the training images train")
    found: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        if not row.label and not multi_label:
            raise UsageError(f"{path} line {row.line}: empty label: give every row its class")
        found.setdefault(row.split or "all", {}).setdefault(row.label, []).append(row.path)
    bad = _check_images([row.path for row in rows], check_size, workers, reader, progress)
    if multi_label:
        label_sets: dict[str, dict[str, tuple[str, ...]]] = {}
        for row in rows:
            if row.path not in bad:
                names = label_set(row.label)
                label_sets.setdefault(row.split or "all", {})[row.path] = names
        return Scan(image_root(path, root), CSV_LAYOUT, {}, bad, path, label_sets)
    found = {
        split: _drop_unreadable(classes, bad, "" if split == "all" else f" in {split} rows")
        for split, classes in found.items()
    }
    return Scan(image_root(path, root), CSV_LAYOUT, found, bad, labels_file=path)


def label_set(cell: str) -> tuple[str, ...]:
    """A multi-label cell's labels, sorted, without blanks or repeats: "outdoor; cat;" ->
    ("cat", "outdoor")."""
    return tuple(sorted({name.strip() for name in cell.split(LABEL_SEPARATOR)} - {""}))


# ----------------------------------------------------------------------------- tf.data


def make_dataset(
    split: Split,
    image_size: tuple[int, int],
    *,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    cache: bool | None = None,
) -> tf.data.Dataset:
    """(images float32 0-255, labels) batches, labels as `Split.targets` gives them (int32
    class indices, or float32 0/1 rows for multi-label); cache=None decides by estimated memory.

    Decoded uint8 images are cached *before* the shuffle, so epochs still see new orders;
    without a cache the cheap paths are shuffled instead, so no decoded-image buffer is needed.
    """
    import tensorflow as tf

    height, width = _validate_dataset_args(image_size, batch_size)
    if cache is None:
        cache = _fits_cache(len(split), image_size)
    paths = tf.constant([os.fsencode(p) for p in split.paths], dtype=tf.string)
    labels = tf.constant(split.targets())
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    buffer = max(1, len(split))
    if shuffle and not cache:
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(_tf_decoder(height, width), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache:
        ds = ds.cache()
        if shuffle:
            ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(
        lambda images, y: (tf.cast(images, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE
    )
    return ds.prefetch(tf.data.AUTOTUNE)


def _validate_dataset_args(image_size: tuple[int, int], batch_size: int) -> tuple[int, int]:
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(s, (int, np.integer)) and s > 0 for s in image_size)
    ):
        raise UsageError(f"--image-size must be two positive integers, got {image_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size!r}")
    return int(image_size[0]), int(image_size[1])


def _fits_cache(n_images: int, image_size: tuple[int, int]) -> bool:
    """Cache decoded images when they fit min(2 GiB, a quarter of RAM)."""
    needed = n_images * image_size[0] * image_size[1] * 3
    budget = _CACHE_BUDGET_BYTES
    try:
        budget = min(budget, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)
    except (AttributeError, ValueError, OSError):
        pass
    return needed <= budget


def _tf_decoder(height: int, width: int):
    """A tf.data map function decoding with PIL, so the pipeline matches `read_image` exactly."""
    import tensorflow as tf

    def load(path: bytes) -> np.ndarray:
        name = os.fsdecode(path)
        try:
            return read_image(name, (height, width))
        except UnreadableImage as exc:
            # Changed since the up-front check. A neutral grey stand-in keeps the dataset's
            # length known (Keras needs it for progress and steps) and the run alive.
            logger.warning(
                "%s became unreadable during training (%s): using a grey image", name, exc
            )
            return np.full((height, width, 3), 128, dtype=np.uint8)

    def decode(path, label):
        image = tf.numpy_function(load, [path], tf.uint8, stateful=False)
        image.set_shape((height, width, 3))
        return image, label

    return decode


# ----------------------------------------------------------------------------- predict inputs


def find_images(paths: list[str]) -> list[str]:
    """For `predict`: expand files, folders (recursive, sorted) and glob patterns to image files;
    UsageError when a path matches nothing.

    Paths are returned as the user spelled them (not made absolute), duplicates dropped.
    """
    if not paths:
        raise UsageError("no images given: pass image files, folders or glob patterns")
    found: list[str] = []
    for path in paths:
        found.extend(_expand(os.fspath(path)))
    seen: set[str] = set()
    unique = []
    for path in found:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _expand(path: str) -> list[str]:
    if os.path.isfile(path):
        if not _is_image_name(path):
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            raise UsageError(f"{path}: not a supported image file (expected one of {exts})")
        return [path]
    if os.path.isdir(path):
        images = _walk_images(path)
        if not images:
            raise UsageError(f"{path}: folder contains no image files")
        return images
    if any(char in path for char in "*?["):
        matches = []
        for match in sorted(glob.glob(path, recursive=True)):
            if os.path.isdir(match):
                matches.extend(_walk_images(match))
            elif _is_image_name(match):
                matches.append(match)
        if not matches:
            raise UsageError(f"{path}: pattern matches no image files")
        return matches
    raise UsageError(f"{path}: no such file or folder")


def write_skipped(skipped: Iterable[tuple[str, str]], path: str) -> None:
    """Write skipped.txt (atomically): one `path<TAB>reason` line per skipped file, an empty file
    when none. File names that are not valid UTF-8 are written with backslash escapes."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    text = "".join(f"{_one_line(file)}\t{_one_line(reason)}\n" for file, reason in skipped)
    write_text_atomic(path, text, errors="backslashreplace")


def _one_line(text: str) -> str:
    """Keep the TAB/newline format parseable even for odd file names."""
    return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")

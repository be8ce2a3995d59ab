"""Which images a run trains, validates and tests on: stratified seeded splits, split
manifests (a run's ``split.json``, `headstart check --fix-split`), cross-validation folds, and a
run's own split rebuilt from its ``split.json``. Every verb gets its split here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from headstart.config import Config
from headstart.data import (
    ImageFolder,
    Reader,
    Scan,
    Split,
    image_root,
    is_labels_file,
    require_classes,
    scan_data,
    unreadable_images,
)
from headstart.errors import UsageError
from headstart.files import write_ascii_json

SPLITS = ("train", "val", "test")
SPLIT_FILE = "split.json"  # a run's exact train/val/test file lists
_CHECK_SIDE = 32  # pixels: a manifest's files are decoded at this size to check them

logger = logging.getLogger(__name__)


def validate_fractions(val_split: float, test_split: float) -> None:
    for option, value in (("--val-split", val_split), ("--test-split", test_split)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise UsageError(f"{option} must be a fraction in [0, 1), got {value!r}")
    if val_split + test_split >= 1:
        raise UsageError(
            f"--val-split {val_split} + --test-split {test_split} must be below 1 "
            f"to leave images for training"
        )


def _split_sizes(n: int, val_split: float, test_split: float) -> tuple[int, int]:
    """(n_val, n_test): rounded, at least 1 each when the fraction is > 0."""
    n_val = max(1, round(n * val_split)) if val_split > 0 else 0
    n_test = max(1, round(n * test_split)) if test_split > 0 else 0
    return n_val, n_test


def _min_class_size(val_split: float, test_split: float) -> int:
    """Smallest class size that leaves at least one training image (fractions sum to < 1)."""
    n = 1
    while n - sum(_split_sizes(n, val_split, test_split)) < 1:
        n += 1
    return n


def shuffle_class(files: list[str], name: str, seed: int) -> list[str]:
    """Seeded per class *name*, so adding a class never reshuffles the others."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8", "surrogatepass"))])
    ordered = sorted(files)
    return [ordered[i] for i in rng.permutation(len(ordered))]


def stratify(
    files: list[str], name: str, val_split: float, test_split: float, seed: int, where: str
) -> tuple[list[str], list[str], list[str]]:
    """(train, val, test) for one class."""
    n = len(files)
    n_val, n_test = _split_sizes(n, val_split, test_split)
    if n - n_val - n_test < 1:
        need = _min_class_size(val_split, test_split)
        options = f"--val-split {val_split}"
        if test_split:
            options += f" and --test-split {test_split}"
        raise UsageError(
            f"class '{name}' has {n} usable image(s){where}; with {options} each class needs at "
            f"least {need}: add images or lower the split fractions"
        )
    shuffled = shuffle_class(files, name, seed)
    return shuffled[n_test + n_val :], shuffled[n_test : n_test + n_val], shuffled[:n_test]


def make_split(by_class: dict[str, list[str]], class_names: tuple[str, ...]) -> Split:
    index = {name: i for i, name in enumerate(class_names)}
    return sorted_split([(index[name], path) for name, files in by_class.items() for path in files])


def load_image_folder(
    data: str,
    *,
    root: str | None = None,
    val_split: float = 0.2,
    test_split: float = 0.1,
    seed: int = 0,
    check_size: int = 64,
    workers: int | None = None,
    min_classes: int = 2,
    reader: Reader | None = None,
    progress: bool = False,
    multi_label: bool | None = None,
) -> ImageFolder:
    """Scan ``data`` (a folder, or a CSV labels file whose relative paths start from ``root``,
    by default its folder), check every image (skipped files recorded, never fatal), split.

    `min_classes` is 2 for training; scoring a run on new images of one class needs only 1.
    ``reader`` decodes each file in the check (`headstart.data.unreadable_images`), ``progress``
    shows a bar on a terminal.

    In the train/val/test layout (and a CSV file with a split column) the user's split wins:
    `test_split` is ignored, and `val_split` is only used to carve a missing val split out of
    train.

    A multi-label CSV file (``multi_label`` True, or None and a label cell holding ';', see
    `headstart.data.scan_csv`) is split at random, seeded: stratifying by class does not apply
    to sets of labels (`split_multi_label`).
    """
    validate_fractions(val_split, test_split)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {seed!r}")
    scan = scan_data(
        data,
        root=root,
        check_size=check_size,
        workers=workers,
        multi_label=multi_label,
        reader=reader,
        progress=progress,
    )
    root, layout, found, bad = scan.root, scan.layout, scan.found, scan.unreadable
    if scan.label_sets is not None:
        folder = split_multi_label(scan, val_split, test_split, seed)
        _log_split(scan, folder)
        return folder
    if "all" in found:  # no split given: class folders, or a CSV file without a split column
        class_names, parts = _split_class_folders(scan, val_split, test_split, seed, min_classes)
    else:
        class_names, parts = _split_split_folders(scan, val_split, seed, min_classes)
    folder = ImageFolder(
        root=root,
        class_names=class_names,
        train=make_split(parts[0], class_names),
        val=make_split(parts[1], class_names),
        test=make_split(parts[2], class_names),
        skipped=tuple(sorted(bad.items())),
        layout=layout,
    )
    _log_split(scan, folder)
    return folder


def _log_split(scan: Scan, folder: ImageFolder) -> None:
    logger.info(
        "%s: %d %s, %d train / %d val / %d test images, %d unreadable files skipped",
        scan.labels_file or scan.root,
        len(folder.class_names),
        "labels (multi-label)" if folder.multi_label else "classes",
        len(folder.train),
        len(folder.val),
        len(folder.test),
        len(scan.unreadable),
    )


def split_multi_label(scan: Scan, val_split: float, test_split: float, seed: int) -> ImageFolder:
    """A multi-label scan as an `ImageFolder`: the split its CSV file's split column gives
    (validation carved out of train at random when no row says val), else a seeded random
    split into ``val_split`` and ``test_split`` of the images. The labels are every name that
    some readable image carries; an image may carry none."""
    sets = scan.label_sets or {}
    where = scan.labels_file or scan.root
    everything = {path: names for part in sets.values() for path, names in part.items()}
    class_names = require_classes(
        where, {n for names in everything.values() for n in names}, 1, labels_file=where
    )
    if "all" in sets:
        train, val, test = _random_parts(sorted(sets["all"]), val_split, test_split, seed, where)
    else:
        train, val = sorted(sets.get("train", {})), sorted(sets.get("val", {}))
        test = sorted(sets.get("test", {}))
        if "val" not in sets:
            train, val, _ = _random_parts(train, val_split, 0.0, seed, f"{where} (train rows)")
    index = {name: i for i, name in enumerate(class_names)}
    n = len(class_names)

    def split(paths: list[str]) -> Split:
        return sorted_split([(tuple(index[x] for x in everything[p]), p) for p in paths], n)

    unseen = sorted(set(class_names) - {x for p in train for x in everything[p]})
    if unseen:
        logger.warning(
            "%s: no training image carries %s: the model cannot learn %s",
            where,
            ", ".join(unseen),
            "it" if len(unseen) == 1 else "them",
        )
    return ImageFolder(
        root=scan.root,
        class_names=class_names,
        train=split(train),
        val=split(val),
        test=split(test),
        skipped=tuple(sorted(scan.unreadable.items())),
        layout=scan.layout,
        multi_label=True,
    )


def _random_parts(
    paths: list[str], val_split: float, test_split: float, seed: int, where: str
) -> tuple[list[str], list[str], list[str]]:
    """(train, val, test): ``paths`` shuffled by the seed, then cut into the fractions."""
    n = len(paths)
    n_val, n_test = _split_sizes(n, val_split, test_split)
    if n - n_val - n_test < 1:
        raise UsageError(
            f"{where}: {n} usable image(s) leave none for training with --val-split {val_split} "
            f"and --test-split {test_split}: add images or lower the split fractions"
        )
    shuffled = [paths[i] for i in np.random.default_rng(seed).permutation(n)]
    return shuffled[n_test + n_val :], shuffled[n_test : n_test + n_val], shuffled[:n_test]


_Parts = tuple[dict[str, list[str]], dict[str, list[str]], dict[str, list[str]]]


def _split_class_folders(
    scan: Scan, val_split: float, test_split: float, seed: int, min_classes: int
) -> tuple[tuple[str, ...], _Parts]:
    classes = scan.found["all"]
    where = scan.labels_file or scan.root
    class_names = require_classes(where, classes, min_classes, labels_file=scan.labels_file)
    parts: _Parts = ({}, {}, {})
    for name in class_names:
        for part, files in zip(
            parts, stratify(classes[name], name, val_split, test_split, seed, ""), strict=True
        ):
            part[name] = files
    return class_names, parts


def _split_split_folders(
    scan: Scan, val_split: float, seed: int, min_classes: int
) -> tuple[tuple[str, ...], _Parts]:
    found, csv_file = scan.found, scan.labels_file
    train = found["train"]
    if csv_file:
        class_names = require_classes(csv_file, train, min_classes, labels_file=csv_file)
    else:
        class_names = require_classes(os.path.join(scan.root, "train"), train, min_classes)
    for split in ("val", "test"):
        extra = sorted(set(found.get(split, {})) - set(train))
        if extra and csv_file:
            raise UsageError(
                f"{csv_file}: label '{extra[0]}' has {split} rows but no readable train "
                f"image: give it train rows or remove its {split} rows"
            )
        if extra:
            raise UsageError(
                f"class '{extra[0]}' is in {split}/ but has no readable images in train/ "
                f"({os.path.join(scan.root, 'train')}): add it to train/ or remove it from "
                f"{split}/"
            )
    if "val" in found:
        return class_names, (train, found["val"], found.get("test", {}))
    carved: _Parts = ({}, {}, found.get("test", {}))
    within = " in the train rows" if csv_file else " in train/"
    for name in class_names:
        kept, val, _ = stratify(train[name], name, val_split, 0.0, seed, within)
        carved[0][name], carved[1][name] = kept, val
    return class_names, carved


def split_manifest(folder: ImageFolder) -> dict:
    """The exact split as JSON (paths relative to the data folder): what ``split.json`` holds,
    so that a run records which images it trained, validated and tested on. A multi-label
    split gives each image its list of labels and says ``"multi_label": true``."""
    names = folder.class_names

    def files(split: Split) -> list[list]:
        return [
            [
                os.path.relpath(path, folder.root),
                [names[i] for i in label] if split.multi_label else names[label],
            ]
            for path, label in zip(split.paths, split.labels, strict=True)
        ]

    manifest = {
        "root": folder.root,
        "class_names": list(names),
        "train": files(folder.train),
        "val": files(folder.val),
        "test": files(folder.test),
    }
    if folder.multi_label:
        manifest["multi_label"] = True
    return manifest


def sorted_split(pairs: list[tuple], n_labels: int = 0) -> Split:
    """(label, path) pairs as a Split, in the one order every split has: by label, then path.
    ``n_labels`` > 0: a multi-label split, each label a tuple of label indices."""
    pairs = sorted(pairs)
    return Split(tuple(p for _, p in pairs), tuple(label for label, _ in pairs), n_labels)


def write_split_manifest(folder: ImageFolder, path: str | Path, *, note: str = "") -> Path:
    """Write the folder's exact train/val/test file lists, in the format of a run's split.json
    (`split_manifest`: paths relative to DATA, each with its class).

    `load_split_manifest` reads it back, so another run can use the very same split.
    """
    manifest = split_manifest(folder)
    if note:
        manifest["note"] = note
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_ascii_json(path, manifest)
    return path


def load_split_manifest(
    path: str | Path,
    data: str | Path | None = None,
    *,
    workers: int | None = None,
    reader: Reader | None = None,
    progress: bool = False,
) -> ImageFolder:
    """An `ImageFolder` from a split manifest (a run's split.json, or `--fix-split` output), as
    `load_image_folder` would have built it.

    ``data`` is the folder the relative paths start from (default: the manifest's ``root``, so a
    moved data folder needs it). Files missing or unreadable now are skipped with their reason,
    as `load_image_folder` does; a file listed twice, an unknown class, or a manifest with no
    readable file is a `UsageError`. ``reader`` and ``progress``: as for `load_image_folder`.
    """
    manifest = _read_manifest(Path(path))
    where = data if data is not None else manifest["root"]
    return _from_manifest(manifest, path, where, workers, reader, progress)


def _from_manifest(
    manifest: dict, path, data, workers: int | None, reader=None, progress: bool = False
) -> ImageFolder:
    """`load_split_manifest` of a manifest already read from ``path``."""
    root = os.path.abspath(os.fspath(data))
    if not os.path.isdir(root):
        raise UsageError(f"{path}: data folder {root} not found: pass the data folder")
    names = tuple(manifest["class_names"])
    index = {name: i for i, name in enumerate(names)}
    multi = bool(manifest.get("multi_label"))
    listed: dict[str, tuple[str, int | tuple[int, ...]]] = {}
    for split in SPLITS:
        for rel, label in manifest[split]:
            for name in label if multi else [label]:
                if name not in index:
                    raise UsageError(f"{path}: class '{name}' of {rel} is not in its class_names")
            if rel in listed:
                raise UsageError(f"{path}: {rel} is listed in {listed[rel][0]} and in {split}")
            listed[rel] = (split, tuple(index[x] for x in label) if multi else index[label])
    absolute = {rel: os.path.join(root, rel) for rel in listed}
    files = list(absolute.values())
    bad = unreadable_images(files, _CHECK_SIDE, workers, reader=reader, progress=progress)
    if len(bad) == len(absolute):
        raise UsageError(
            f"{path}: none of its {len(absolute)} files can be read under {root}: pass the data "
            "folder the manifest was written for"
        )
    parts: dict[str, list[tuple]] = {s: [] for s in SPLITS}
    for rel, (split, label) in listed.items():
        if absolute[rel] not in bad:
            parts[split].append((label, absolute[rel]))
    n_labels = len(names) if multi else 0
    return ImageFolder(
        root=root,
        class_names=names,
        train=sorted_split(parts["train"], n_labels),
        val=sorted_split(parts["val"], n_labels),
        test=sorted_split(parts["test"], n_labels),
        skipped=tuple(sorted(bad.items())),
        layout="manifest",
        multi_label=multi,
    )


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"split manifest not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable split manifest: {exc}") from None
    names = manifest.get("class_names") if isinstance(manifest, dict) else None
    pairs = [manifest.get(split) for split in SPLITS] if names else []
    multi = isinstance(manifest, dict) and manifest.get("multi_label") is True

    def label_ok(label) -> bool:  # a class name, or a multi-label split's list of them
        if multi:
            return isinstance(label, list) and all(isinstance(x, str) for x in label)
        return isinstance(label, str)

    if not (
        isinstance(names, list)
        and names
        and all(isinstance(n, str) for n in names)
        and isinstance(manifest.get("root"), str)
        and all(
            isinstance(part, list)
            and all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and label_ok(p[1])
                for p in part
            )
            for part in pairs
        )
    ):
        raise UsageError(
            f"{path} is not a headstart split manifest (a run's split.json, or the output of "
            "`headstart check DATA --fix-split PATH`)"
        )
    return manifest


def fold_of(folder: ImageFolder, folds: int, seed: int) -> dict[str, int]:
    """Each image's fold (0..K-1): every class is shuffled by the seed (as `train` splits
    it) and dealt round the folds, continuing where the previous class stopped, so every fold
    holds 1/K of each class and the folds' sizes differ by at most one."""
    if folder.multi_label:
        raise UsageError(
            "cv deals each class round the folds: it does not take multi-label data; train "
            "with a split column in the CSV file instead"
        )
    where, start = {}, 0
    paths, labels = _pooled(folder)
    for label, name in enumerate(folder.class_names):
        files = [p for p, y in zip(paths, labels, strict=True) if y == label]
        if len(files) < folds:
            raise UsageError(
                f"class '{name}' has {len(files)} image(s): --folds {folds} needs at least "
                f"{folds} per class (each fold tests 1/{folds} of every class); lower --folds"
            )
        for i, path in enumerate(shuffle_class(files, name, seed)):
            where[path] = (start + i) % folds
        start += len(files)
    return where


def fold_folder(folder: ImageFolder, where: dict[str, int], fold: int, val_split: float, seed: int):
    """Fold ``fold`` as an ImageFolder: its images are the test split; every class's other
    images are split into train and validation (``val_split`` of them) as `train` does."""
    parts: tuple[dict, dict, dict] = ({}, {}, {})
    paths, labels = _pooled(folder)
    for label, name in enumerate(folder.class_names):
        files = [p for p, y in zip(paths, labels, strict=True) if y == label]
        rest = [p for p in files if where[p] != fold]
        train, val, _ = stratify(rest, name, val_split, 0.0, seed, f" outside fold {fold + 1}")
        parts[0][name], parts[1][name] = train, val
        parts[2][name] = [p for p in files if where[p] == fold]
    splits = [make_split(part, folder.class_names) for part in parts]
    return dataclasses.replace(folder, train=splits[0], val=splits[1], test=splits[2])


def _pooled(folder: ImageFolder) -> tuple[tuple[str, ...], tuple[int, ...]]:
    parts = (folder.train, folder.val, folder.test)
    return sum((p.paths for p in parts), ()), sum((p.labels for p in parts), ())


def folder_for(config: Config, reader: Reader | None = None) -> ImageFolder:
    """The split a new run trains on: the data split by the seed, or exactly as a manifest says
    (``--split-from``: a run folder's split.json or a `check --fix-split` manifest).

    Every file is decoded once to check it (by ``reader`` when given, see
    `headstart.data.unreadable_images`), with a progress bar on a terminal unless ``--quiet``."""
    progress = not config.quiet
    if config.split_from:
        manifest = Path(config.split_from)
        if manifest.is_dir():
            manifest = manifest / SPLIT_FILE
        if not manifest.is_file():
            raise UsageError(
                f"--split-from {config.split_from}: give a run folder (with {SPLIT_FILE}) or "
                f"a split manifest written by `headstart check --fix-split`"
            )
        if config.root is not None and not is_labels_file(config.data):
            raise UsageError(f"--root {config.root} applies to a CSV labels file: drop it")
        where = image_root(config.data, config.root)
        folder = load_split_manifest(manifest, data=where, reader=reader, progress=progress)
    else:
        folder = load_image_folder(
            config.data,
            root=config.root,
            val_split=config.val_split,
            test_split=config.test_split,
            seed=config.seed,
            multi_label=config.multi_label,
            reader=reader,
            progress=progress,
        )
    if len(folder.val) == 0:
        raise UsageError("no validation images: give DATA/val or a positive --val-split")
    return folder


def run_split(run_dir: str | Path, data: str | Path) -> ImageFolder:
    """A run's own split, from its split.json: the very files it trained, validated and tested
    on, whether they came from the seed or from ``--split-from``. ``data`` is the folder the
    run's image paths start from (`run_images`), used when the one split.json names is not
    there any more."""
    manifest = Path(run_dir) / SPLIT_FILE
    if not manifest.is_file():
        raise UsageError(f"{run_dir} has no {SPLIT_FILE}: train it again")
    read = _read_manifest(manifest)
    where = read["root"] if Path(read["root"]).is_dir() else data
    return _from_manifest(read, manifest, where, None)


def run_images(config: Config) -> str:
    """The folder a run's image paths start from: its data folder, or for a CSV labels file
    ``--root`` (default: the file's folder)."""
    return image_root(config.data, config.root)

"""``headstart check DATA``: what a data folder would hide from a training run.

Small datasets lie easily: a photo copied into both train and test inflates test accuracy, the
same image under two class names caps it, one class dominating makes accuracy meaningless.
This module reports, for the split training would use (same `load_image_folder`, same seed):
images per class and split, the class imbalance ratio, unreadable and odd files, image sizes,
modes and formats, and duplicate groups, both exact (SHA-1 of the file) and near (a 256-bit
DCT hash, `perceptual_hash`, or for smooth images a thumbnail correlation, `thumbnail`),
flagged within a class, across splits (leakage) and across classes (label conflicts). It only
reads DATA; `leakage_free` and the split manifest functions move no file, they list them.

Library surface for training: `check_folder(folder)` -> report dict, `summary_line(report)`,
`write_split_manifest(folder, path)` and `load_split_manifest(path)`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from headstart.data import PIL_FORMATS, ImageFolder, UnreadableImage, is_labels_file, read_image
from headstart.errors import UsageError
from headstart.files import write_ascii_json
from headstart.splits import (
    SPLITS,
    load_image_folder,
    sorted_split,
    write_split_manifest,
)

log = logging.getLogger(__name__)
_BITS_IN_BYTE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

CHECK_FILE = "check.json"

# Perceptual hash: 16x16 lowest DCT frequencies of a 32x32 grey image, each bit = above median.
HASH_SIDE = 32
HASH_FREQUENCIES = 16
HASH_BITS = HASH_FREQUENCIES**2
# Near-duplicate threshold in bits of 256, measured on Fashion-MNIST: copies resized 4-8x and
# re-saved as JPEG (quality 75-90) differ in at most 12 bits, JPEG quality 50 copies of 28 px
# images in 16 (90%); among 10,000 distinct training images 2 pairs are within 16 bits (one a
# true duplicate), 7 within 24. Crops shift every frequency and are not caught.
NEAR_DISTANCE = 16
# Smooth images (gradients, blur) have no energy in most of those frequencies, so their bits are
# noise and copies land 40-60 bits apart. A second test catches them: the correlation of 16x16
# grey thumbnails. Copies of smooth images correlate >= 0.9998, resized or recompressed
# Fashion-MNIST copies >= 0.990; among its 10,000 distinct images 2 pairs reach 0.9995 (both
# look like the same garment), 4 reach 0.999: silhouettes alone correlate highly.
NEAR_CORRELATION = 0.9995
THUMBNAIL_SIDE = 16
IMBALANCE_WARNING = 3.0  # largest / smallest class above this gets a warning
_FLAT_STD = 1.0  # grey levels: below this an image has no structure to hash (exact match only)
_SMALL_SIDE = 16  # pixels: smaller images are listed as odd
_EXTREME_ASPECT = 5.0
_EXTENSION_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".webp": "WEBP",
}
_PAIR_BUDGET = 2**22  # cells of the pairwise distance matrix computed at once
_SHOWN = 5  # examples per problem in the terminal summary (check.json has all)


# ----------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class ImageFacts:
    """What the check learns from one file, decoded once at 32x32."""

    sha1: str
    phash: np.ndarray | None  # HASH_BITS // 8 uint8, None for a flat (structureless) image
    thumbnail: np.ndarray | None  # 16x16 grey, zero mean, unit norm, float32; None when flat
    width: int
    height: int
    mode: str
    format: str
    odd: tuple[str, ...]  # reasons the file is unusual though readable


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


_DCT = _dct_matrix(HASH_SIDE)


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])


def perceptual_hash(rgb: np.ndarray) -> np.ndarray | None:
    """256-bit pHash of a (32, 32, 3) uint8 image as 32 packed bytes; None when it is flat.

    Low DCT frequencies survive resizing, recompression and small colour shifts, so a copy
    lands within a few bits while distinct images differ in a quarter or more of them. Written
    here (a dozen lines of numpy) rather than taken from the `imagehash` package, which would
    bring SciPy and PyWavelets for the same arithmetic.
    """
    grey = _grey(rgb)
    if grey.std() < _FLAT_STD:
        return None  # the bits would be rounding noise: two blank images are not "similar"
    coefficients = (_DCT @ grey @ _DCT.T)[:HASH_FREQUENCIES, :HASH_FREQUENCIES].ravel()
    return np.packbits(coefficients > np.median(coefficients))


def thumbnail(rgb: np.ndarray) -> np.ndarray | None:
    """A (32, 32, 3) image as a 16x16 grey vector with zero mean and unit norm (2x2 means), so
    that a dot product of two is their correlation; None when the image is flat."""
    grey = _grey(rgb)
    if grey.std() < _FLAT_STD:
        return None
    side = THUMBNAIL_SIDE
    small = grey.reshape(side, HASH_SIDE // side, side, HASH_SIDE // side).mean(axis=(1, 3))
    small -= small.mean()
    return (small / np.linalg.norm(small)).ravel().astype(np.float32)


def inspect_image(path: str) -> ImageFacts:
    """Content hash, perceptual hash, size, mode and format of one file.

    Decodes through `read_image` (at 32x32, so JPEGs decode at reduced size), like training
    does; raises `UnreadableImage` for a file training would skip.
    """
    with open(path, "rb") as handle:
        sha1 = hashlib.file_digest(handle, "sha1").hexdigest()
    try:
        with Image.open(path, formats=PIL_FORMATS) as img:
            width, height, mode, fmt = img.width, img.height, img.mode, img.format or "?"
            frames = getattr(img, "n_frames", 1)
    except Exception as exc:  # read_image below gives the stable reason
        raise UnreadableImage(str(exc)) from exc
    small = read_image(path, (HASH_SIDE, HASH_SIDE))
    return ImageFacts(
        sha1,
        perceptual_hash(small),
        thumbnail(small),
        width,
        height,
        mode,
        fmt,
        _odd(path, width, height, fmt, frames),
    )


def _odd(path: str, width: int, height: int, fmt: str, frames: int) -> tuple[str, ...]:
    reasons = []
    expected = _EXTENSION_FORMATS.get(os.path.splitext(path)[1].lower())
    if expected and fmt not in (expected, "MPO" if expected == "JPEG" else expected):
        reasons.append(f"{fmt} content named {os.path.splitext(path)[1]}")
    if frames > 1:
        reasons.append(f"animated ({frames} frames): the first is used")
    if min(width, height) < _SMALL_SIDE:
        reasons.append(f"tiny ({width}x{height})")
    if max(width, height) > _EXTREME_ASPECT * min(width, height):
        reasons.append(f"extreme aspect ratio ({width}x{height})")
    return tuple(reasons)


def _inspect_all(paths: list[str], workers: int | None) -> list[ImageFacts | str]:
    """ImageFacts per path, or the reason it is unreadable; threads, since PIL drops the GIL."""

    def one(path: str) -> ImageFacts | str:
        try:
            return inspect_image(path)
        except (UnreadableImage, OSError) as exc:
            return str(exc)

    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="headstart-check") as pool:
        return list(pool.map(one, paths))


# ----------------------------------------------------------------------------- duplicates


def count_bits(words: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (a Hamming distance once XORed), as uint8: ``np.bitwise_count``
    where NumPy has it (2.0+), else byte by byte, so NumPy 1.26 works too."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).astype(np.uint8)
    as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(*words.shape, 8)
    return _BITS_IN_BYTE[as_bytes].sum(axis=-1, dtype=np.uint8)


def near_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for i < j whose packed hashes differ in at most ``max_distance`` bits.

    Every pair, by XOR and popcount one 64-bit word at a time over blocks of rows against the
    rows after them: about a second for 10,000 images on one core, memory bounded (~50 MB).
    """
    words = np.ascontiguousarray(hashes, dtype=np.uint8).view(np.uint64)
    n = len(words)
    block = max(1, _PAIR_BUDGET // max(1, n))
    pairs = []
    for start in range(0, n, block):
        rows, rest = words[start : start + block], words[start:]
        distance = np.zeros((len(rows), len(rest)), dtype=np.uint16)
        for w in range(words.shape[1]):
            distance += count_bits(rows[:, w, None] ^ rest[None, :, w])
        r, c = np.nonzero(distance <= max_distance)
        keep = c > r  # the upper triangle: each pair once, no self-pairs
        r, c = r[keep], c[keep]
        pairs.extend(
            zip(
                (r + start).tolist(),
                (c + start).tolist(),
                distance[r, c].tolist(),
                strict=True,
            )
        )
    return pairs


def correlated_pairs(thumbnails: np.ndarray, min_correlation: float) -> list[tuple[int, int]]:
    """(i, j) for i < j whose unit-norm thumbnails correlate at ``min_correlation`` or more:
    one matrix product per block of rows, against the rows after them."""
    vectors = np.asarray(thumbnails, dtype=np.float32)
    n = len(vectors)
    block = max(1, _PAIR_BUDGET // max(1, n))
    pairs = []
    for start in range(0, n, block):
        correlation = vectors[start : start + block] @ vectors[start:].T
        r, c = np.nonzero(correlation >= min_correlation)
        keep = c > r
        pairs.extend(zip((r[keep] + start).tolist(), (c[keep] + start).tolist(), strict=True))
    return pairs


def _groups(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components (union-find) with two or more members, each sorted."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(root(i), []).append(i)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])


def _duplicate_groups(facts: list[ImageFacts], max_distance: int) -> list[list[int]]:
    """Member indices of each group of files linked by equal content, a near perceptual hash
    or a near-perfect thumbnail correlation (linked in a chain: A~B and B~C group A, B, C)."""
    by_sha: dict[str, list[int]] = {}
    for i, fact in enumerate(facts):
        by_sha.setdefault(fact.sha1, []).append(i)
    pairs = [(m[0], other) for m in by_sha.values() for other in m[1:]]
    hashed = [i for i, fact in enumerate(facts) if fact.phash is not None]
    if hashed:
        hashes = np.stack([facts[i].phash for i in hashed])
        pairs += [(hashed[i], hashed[j]) for i, j, _ in near_pairs(hashes, max_distance)]
        thumbnails = np.stack([facts[i].thumbnail for i in hashed])
        pairs += [(hashed[i], hashed[j]) for i, j in correlated_pairs(thumbnails, NEAR_CORRELATION)]
    return _groups(len(facts), pairs)


def _spread(facts: list[ImageFacts], members: list[int]) -> tuple[int, float]:
    """(largest hash distance, smallest thumbnail correlation) between members of a group;
    (0, 1.0) when every file is byte-identical."""
    if len({facts[i].sha1 for i in members}) == 1:
        return 0, 1.0
    shown = [facts[i] for i in members[:200] if facts[i].phash is not None]
    if len(shown) < 2:
        return 0, 1.0
    words = np.stack([f.phash for f in shown]).view(np.uint64)
    distance = count_bits(words[:, None, :] ^ words[None, :, :]).sum(axis=-1).max()
    vectors = np.stack([f.thumbnail for f in shown])
    return int(distance), round(float((vectors @ vectors.T).min()), 5)


# ----------------------------------------------------------------------------- the report


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _entries(folder: ImageFolder) -> list[tuple[str, str, int]]:
    """(absolute path, split, label) of every readable image, train then val then test."""
    return [
        (path, name, label)
        for name in SPLITS
        for path, label in zip(
            getattr(folder, name).paths, getattr(folder, name).labels, strict=True
        )
    ]


def check_folder(
    folder: ImageFolder, *, near_distance: int = NEAR_DISTANCE, workers: int | None = None
) -> dict:
    """The check report (a JSON-ready dict) of an already split folder; reads, never writes.

    Training calls this with the `ImageFolder` it loaded, so the folder is not scanned twice.
    ``near_distance`` is the perceptual-hash distance (bits of 256) at or below which two
    images count as near-duplicates. Defaults to `NEAR_DISTANCE` (16).
    """
    if isinstance(near_distance, bool) or not isinstance(near_distance, int):
        raise UsageError(f"--near-distance must be an integer, got {near_distance!r}")
    if not 0 <= near_distance < HASH_BITS:
        raise UsageError(f"--near-distance must be in [0, {HASH_BITS - 1}], got {near_distance}")
    started = time.perf_counter()
    entries = _entries(folder)
    results = _inspect_all([path for path, _, _ in entries], workers)
    skipped = list(folder.skipped)
    kept, facts = [], []
    for entry, result in zip(entries, results, strict=True):
        if isinstance(result, str):  # changed since load_image_folder read it
            skipped.append((entry[0], result))
        else:
            kept.append(entry)
            facts.append(result)
    names = folder.class_names
    report = {
        "data": folder.root,
        "layout": folder.layout,
        "class_names": list(names),
        "n_images": len(kept),
        # images per split (the counts of a multi-label folder count each label an image has)
        "split_images": {split: sum(e[1] == split for e in kept) for split in SPLITS},
        "multi_label": folder.multi_label,
        "counts": _counts(kept, names),
        "imbalance_ratio": _imbalance(kept, names),
        "skipped": [
            {"path": _relative(p, folder.root), "reason": r} for p, r in sorted(set(skipped))
        ],
        "odd": [
            {"path": _relative(path, folder.root), "reasons": list(fact.odd)}
            for (path, _, _), fact in zip(kept, facts, strict=True)
            if fact.odd
        ],
        "images": _image_statistics(facts),
        "duplicates": _duplicates(kept, facts, folder, near_distance),
    }
    report["warnings"] = _warnings(report)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def _indices(label) -> tuple[int, ...]:
    """An image's class indices: its class, or a multi-label image's labels (maybe none)."""
    return label if isinstance(label, tuple) else (label,)


def _class_text(label, names) -> str:
    """An image's class name; a multi-label image's labels joined by ';' (as in the CSV)."""
    return ";".join(names[i] for i in _indices(label))


def _counts(kept: list[tuple[str, str, int]], names) -> dict:
    """{split: {class: n}} including zeros, plus "total" (multi-label: images per label)."""
    counts = {split: dict.fromkeys(names, 0) for split in (*SPLITS, "total")}
    for _, split, label in kept:
        for i in _indices(label):
            counts[split][names[i]] += 1
            counts["total"][names[i]] += 1
    return counts


def _imbalance(kept, names) -> float | None:
    totals = Counter(i for _, _, label in kept for i in _indices(label))
    sizes = [totals.get(i, 0) for i in range(len(names))]
    if not sizes or min(sizes) == 0:
        return None
    return round(max(sizes) / min(sizes), 3)


def _image_statistics(facts: list[ImageFacts]) -> dict:
    if not facts:
        return {}
    widths = np.array([f.width for f in facts])
    heights = np.array([f.height for f in facts])
    sizes = Counter(f"{f.width}x{f.height}" for f in facts)

    def spread(values: np.ndarray) -> dict:
        return {
            "min": int(values.min()),
            "median": float(np.median(values)),
            "max": int(values.max()),
        }

    return {
        "width": spread(widths),
        "height": spread(heights),
        "distinct_sizes": len(sizes),
        "common_sizes": [[size, n] for size, n in sizes.most_common(5)],
        "modes": dict(Counter(f.mode for f in facts).most_common()),
        "formats": dict(Counter(f.format for f in facts).most_common()),
    }


def _duplicates(kept, facts, folder: ImageFolder, near_distance: int) -> dict:
    names = folder.class_names
    groups = []
    for members in _duplicate_groups(facts, near_distance):
        exact = len({facts[i].sha1 for i in members}) == 1
        distance, correlation = _spread(facts, members)
        files = [
            {
                "path": _relative(kept[i][0], folder.root),
                "class": _class_text(kept[i][2], names),
                "split": kept[i][1],
            }
            for i in members
        ]
        classes = {f["class"] for f in files}
        splits = {f["split"] for f in files}
        flags = [
            flag
            for flag, on in (
                ("within_class", len(classes) == 1),
                ("across_splits", len(splits) > 1),
                ("across_classes", len(classes) > 1),
            )
            if on
        ]
        groups.append(
            {
                "exact": exact,
                "distance": distance,
                "correlation": correlation,
                "flags": flags,
                "files": files,
            }
        )
    return {
        "method": (
            f"exact: SHA-1 of the file; near: {HASH_BITS}-bit DCT perceptual hashes at most "
            f"{near_distance} bits apart, or {THUMBNAIL_SIDE}x{THUMBNAIL_SIDE} grey thumbnails "
            f"correlated >= {NEAR_CORRELATION}"
        ),
        "near_distance": near_distance,
        "near_correlation": NEAR_CORRELATION,
        "groups": groups,
        "n_groups": len(groups),
        "n_exact": sum(g["exact"] for g in groups),
        "n_near": sum(not g["exact"] for g in groups),
        "within_class": sum("within_class" in g["flags"] for g in groups),
        "across_splits": sum("across_splits" in g["flags"] for g in groups),
        "across_classes": sum("across_classes" in g["flags"] for g in groups),
        "extra_files": sum(len(g["files"]) - 1 for g in groups),
    }


def _warnings(report: dict) -> list[str]:
    """Plain sentences, most serious first."""
    warnings = []
    dup = report["duplicates"]
    if dup["across_splits"]:
        warnings.append(
            f"{dup['across_splits']} duplicate group(s) span train/val/test: test scores are "
            "inflated; write a leakage-free split with --fix-split"
        )
    if dup["across_classes"]:
        warnings.append(
            f"{dup['across_classes']} duplicate group(s) carry different class labels: "
            "fix the labels or remove the copies"
        )
    ratio = report["imbalance_ratio"]
    totals = report["counts"]["total"]
    if ratio is not None and ratio > IMBALANCE_WARNING:
        big, small = max(totals, key=totals.get), min(totals, key=totals.get)
        warnings.append(
            f"class imbalance {ratio:.1f}x ({big}: {totals[big]}, {small}: {totals[small]}): "
            "read balanced accuracy and macro-F1, not accuracy alone"
        )
    n_test = _split_images(report)["test"]
    if n_test:
        margin = 1.96 * 0.5 / np.sqrt(n_test)
        if margin > 0.02:
            warnings.append(
                f"the test split has {n_test} images: a 95% interval on test accuracy is up "
                f"to ±{margin * 100:.0f} points wide, so smaller differences are noise"
            )
    if report["skipped"]:
        warnings.append(f"{len(report['skipped'])} unreadable file(s) will be skipped")
    return warnings


# ----------------------------------------------------------------------------- summaries


def _split_images(report: dict) -> dict[str, int]:
    """Images per split (an older check.json has only the per-class counts)."""
    counts = report["counts"]
    return report.get("split_images") or {s: sum(counts[s].values()) for s in SPLITS}


def summary_line(report: dict) -> str:
    """One line for the training log and the report: sizes, imbalance, unreadable, duplicates."""
    sizes = _split_images(report)
    split_sizes = "/".join(str(sizes[s]) for s in SPLITS)
    dup = report["duplicates"]
    ratio = report["imbalance_ratio"]
    return (
        f"data check: {report['n_images']} images in {len(report['class_names'])} "
        f"{'labels (multi-label)' if report.get('multi_label') else 'classes'} "
        f"(train/val/test {split_sizes}), imbalance "
        f"{f'{ratio:.1f}x' if ratio is not None else 'n/a'}, {len(report['skipped'])} "
        f"unreadable, {dup['n_groups']} duplicate groups ({dup['n_exact']} exact): "
        f"{dup['across_splits']} across splits, {dup['across_classes']} across classes"
    )


def format_summary(report: dict) -> str:
    """The terminal summary of `headstart check`: tables and examples; check.json has all."""
    names = report["class_names"]
    counts = report["counts"]
    width = max(len("class"), *(len(n) for n in names))
    lines = [summary_line(report), ""]
    lines.append(f"{'class':<{width}}  {'train':>6}  {'val':>6}  {'test':>6}  {'total':>6}")
    for name in names[:20]:
        row = "  ".join(f"{counts[s][name]:>6}" for s in (*SPLITS, "total"))
        lines.append(f"{name:<{width}}  {row}")
    if len(names) > 20:
        lines.append(f"... {len(names) - 20} more classes")
    stats = report["images"]
    if stats:
        sizes = ", ".join(f"{size} ({n})" for size, n in stats["common_sizes"][:3])
        lines += [
            "",
            f"sizes: {stats['distinct_sizes']} distinct, most common {sizes}",
            "modes: " + ", ".join(f"{k} {v}" for k, v in stats["modes"].items()),
            "formats: " + ", ".join(f"{k} {v}" for k, v in stats["formats"].items()),
        ]
    lines += _examples(
        "unreadable", [f"{s['path']}: {s['reason']}" for s in report["skipped"]]
    ) + _examples("odd", [f"{o['path']}: {'; '.join(o['reasons'])}" for o in report["odd"]])
    dup = report["duplicates"]
    for flag, title in (
        ("across_splits", "duplicates across splits (leakage)"),
        ("across_classes", "duplicates across classes (label conflicts)"),
        ("within_class", "duplicates within a class"),
    ):
        shown = [_group_text(g) for g in dup["groups"] if flag in g["flags"]]
        lines += _examples(title, shown)
    if report["warnings"]:
        lines += ["", "warnings:", *(f"- {w}" for w in report["warnings"])]
    return "\n".join(lines)


def _examples(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    more = [f"  ... {len(items) - _SHOWN} more"] if len(items) > _SHOWN else []
    return ["", f"{title}: {len(items)}", *(f"  {item}" for item in items[:_SHOWN]), *more]


def _group_text(group: dict) -> str:
    kind = (
        "exact"
        if group["exact"]
        else f"near: {group['distance']} bits, correlation {group['correlation']:.4f}"
    )
    files = ", ".join(f"{f['path']} ({f['split']})" for f in group["files"][:4])
    more = f" and {len(group['files']) - 4} more" if len(group["files"]) > 4 else ""
    return f"[{kind}] {files}{more}"


# ----------------------------------------------------------------------------- split manifests


def leakage_free(folder: ImageFolder, report: dict) -> tuple[ImageFolder, int]:
    """The folder's split with every duplicate group moved whole into one split, and the number
    of files moved. Pure: nothing on disk changes.

    A group spanning splits goes into the earliest of train, val, test it touches, so val and
    test only ever lose images, never gain ones that resemble training images.
    """
    target: dict[str, str] = {}
    for group in report["duplicates"]["groups"]:
        splits = {f["split"] for f in group["files"]}
        if len(splits) > 1:
            where = next(s for s in SPLITS if s in splits)
            target.update((f["path"], where) for f in group["files"] if f["split"] != where)
    parts: dict[str, list[tuple[int, str]]] = {s: [] for s in SPLITS}
    for path, split, label in _entries(folder):
        parts[target.get(_relative(path, folder.root), split)].append((label, path))
    n_labels = folder.train.n_labels
    splits = {s: sorted_split(pairs, n_labels) for s, pairs in parts.items()}
    return replace(folder, **splits), len(target)


# ----------------------------------------------------------------------------- the verb


def default_out(data: str | Path) -> Path:
    """``./check-<DATA folder name>.json`` (``check-<name>.json`` for ``<name>.csv``): in the
    working folder, never inside a DATA folder."""
    path = Path(os.path.abspath(os.fspath(data)))
    name = (path.stem if is_labels_file(path) else path.name) or "data"
    return Path(f"check-{name}.json")


def check(
    data: str | Path,
    *,
    root: str | Path | None = None,
    multi_label: bool | None = None,
    val_split: float = 0.2,
    test_split: float = 0.1,
    seed: int = 0,
    out: str | Path | None = None,
    fix_split: str | Path | None = None,
    near_distance: int = NEAR_DISTANCE,
) -> dict:
    """Check DATA (a folder, or a CSV labels file whose relative paths start from ``root``) as
    `train` would split it; write the report to ``out`` (default `default_out`) and, with
    ``fix_split``, a leakage-free split manifest. Returns the report.

    Both outputs are refused inside a DATA folder (it is only ever read), and over a CSV file.
    """
    out = Path(out) if out else default_out(data)
    for option, target in (("--out", out), ("--fix-split", fix_split)):
        if target is not None:
            _refuse_inside(data, target, option)
    folder = load_image_folder(
        str(data),
        root=None if root is None else str(root),
        val_split=val_split,
        test_split=test_split,
        seed=seed,
        min_classes=1,
        multi_label=multi_label,
    )
    report = check_folder(folder, near_distance=near_distance)
    report["split"] = {"val_split": val_split, "test_split": test_split, "seed": seed}
    if is_labels_file(data):  # "data" is the folder the file's paths start from
        report["labels_file"] = os.path.abspath(os.fspath(data))
    if fix_split is not None:
        fixed, moved = leakage_free(folder, report)
        note = (
            f"leakage-free split of {folder.root} (seed {seed}, val {val_split}, test "
            f"{test_split}): {moved} file(s) moved so that each duplicate group is in one split"
        )
        write_split_manifest(fixed, fix_split, note=note)
        report["fixed_split"] = {"path": str(Path(fix_split).resolve()), "moved": moved}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_ascii_json(out, report)
    report["out"] = str(out)
    return report


def _refuse_inside(data: str | Path, target: str | Path, option: str) -> None:
    root = Path(os.path.realpath(os.fspath(data)))
    where = Path(os.path.realpath(os.fspath(target)))
    if is_labels_file(data):  # the images may sit anywhere: only the file itself is refused
        if where == root:
            raise UsageError(f"{option} {target} is the labels file {data}: choose another path")
        return
    if where == root or root in where.parents:
        raise UsageError(
            f"{option} {target} is inside the data folder {data}, which headstart never writes "
            "to: choose a path outside it"
        )

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
import io
import itertools
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from headstart.data import (
    PIL_FORMATS,
    ImageFolder,
    UnreadableImage,
    decode_image,
    is_labels_file,
    unreadable_images,
    unreadable_reason,
)
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
_IN_MEMORY_BYTES = 2**24  # a larger file is not held in memory whole while it is inspected
_PIECE_BITS = 8  # `near_pairs` compares pairs sharing a piece this long, at least; all otherwise
_SHARED_FRACTION = 8  # ... unless more than this fraction of all pairs share a piece
_CANDIDATES = 2**19  # pairs sharing a piece compared at once
_BAND_ROWS = 512  # `correlated_pairs`: rows multiplied at once with those that project close
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
    return _hashes(rgb)[0]


def thumbnail(rgb: np.ndarray) -> np.ndarray | None:
    """A (32, 32, 3) image as a 16x16 grey vector with zero mean and unit norm (2x2 means), so
    that a dot product of two is their correlation; None when the image is flat."""
    return _hashes(rgb)[1]


def _hashes(rgb: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(`perceptual_hash`, `thumbnail`) of one image, from one grey conversion."""
    grey = _grey(rgb)
    if grey.std() < _FLAT_STD:
        return None, None  # the bits would be rounding noise: two blank images are not "similar"
    coefficients = (_DCT @ grey @ _DCT.T)[:HASH_FREQUENCIES, :HASH_FREQUENCIES].ravel()
    phash = np.packbits(coefficients > np.median(coefficients))
    side = THUMBNAIL_SIDE
    small = grey.reshape(side, HASH_SIDE // side, side, HASH_SIDE // side).mean(axis=(1, 3))
    small -= small.mean()
    return phash, (small / np.linalg.norm(small)).ravel().astype(np.float32)


def inspect_image(path: str) -> ImageFacts:
    """Content hash, perceptual hash, size, mode and format of one file.

    Decodes like `read_image` (at 32x32, so JPEGs decode at reduced size), like training
    does; raises `UnreadableImage` for a file training would skip, or whose frames cannot be
    counted.
    """
    facts = _inspect(path)
    if isinstance(facts, str):
        raise UnreadableImage(facts)
    return facts


def _inspect(path: str) -> ImageFacts | str:
    """`inspect_image` from one read of the file: `UnreadableImage` (with `read_image`'s
    reason) when training cannot decode it; a reason of the check's own (the frames cannot be
    counted: training still reads the first) instead of facts otherwise."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > _IN_MEMORY_BYTES:  # hashed as it streams, decoded from the file
                sha1 = hashlib.file_digest(handle, "sha1").hexdigest()
            else:
                content = handle.read()
                sha1 = hashlib.sha1(content).hexdigest()
        if not size:
            raise UnreadableImage("empty file")
        source = path if size > _IN_MEMORY_BYTES else io.BytesIO(content)
        with Image.open(source, formats=PIL_FORMATS) as img:
            width, height, mode, fmt = img.width, img.height, img.mode, img.format or "?"
            small = decode_image(img, (HASH_SIDE, HASH_SIDE))
            try:  # after the pixels: counting seeks through a GIF's frames
                frames = getattr(img, "n_frames", 1)
            except Exception as exc:
                return str(exc)
    except UnreadableImage:
        raise
    except Exception as exc:  # as `read_image` words it
        raise UnreadableImage(unreadable_reason(exc)) from exc
    return ImageFacts(
        sha1,
        *_hashes(small),
        width,
        height,
        mode,
        fmt,
        _odd(path, width, height, fmt, frames),
    )


class FactsReader:
    """The decode check's reader (`headstart.data.unreadable_images`) when the data check
    follows: it decodes each file once, as training will, and keeps its facts (or the check's
    own reason, see `_inspect`) by path for `check_folder`. It decodes at the data check's
    32 px where the decode check alone decodes at 64: the same decoder either way (a JPEG at
    a reduced scale, which still reads all its data), so the same files are found unreadable,
    for the same reasons."""

    def __init__(self):
        self.facts: dict[str, ImageFacts | str] = {}

    def __call__(self, path: str) -> None:
        self.facts[path] = _inspect(path)


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


def _inspect_all(
    paths: list[str], workers: int | None, known: dict[str, ImageFacts | str], progress: bool
) -> list[ImageFacts | str]:
    """ImageFacts per path, or the reason it is unreadable: from ``known`` (what the decode
    check learnt), else read now in threads, since PIL drops the GIL."""
    missing = [path for path in paths if path not in known]
    if missing:
        reader = FactsReader()
        bad = unreadable_images(missing, HASH_SIDE, workers, reader=reader, progress=progress)
        known = {**known, **reader.facts, **bad}
    return [known[path] for path in paths]


# ----------------------------------------------------------------------------- duplicates


def count_bits(words: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (a Hamming distance once XORed), as uint8: ``np.bitwise_count``
    where NumPy has it (2.0+), else byte by byte, so NumPy 1.26 works too."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).astype(np.uint8)
    as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(*words.shape, 8)
    return _BITS_IN_BYTE[as_bytes].sum(axis=-1, dtype=np.uint8)


def near_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for i < j whose packed hashes differ in at most ``max_distance`` bits,
    in order of i then j.

    Exact, by multi-index hashing: cut into ``max_distance + 1`` pieces, two hashes that differ
    in at most ``max_distance`` bits agree on at least one piece whole (pigeonhole), so only
    pairs that share a piece's value are compared: a few thousand among 10,000 images (0.05 s)
    instead of all 50 million (about a second). When the pieces are too short to tell hashes
    apart (a large ``max_distance``), or so many hashes share them that it saves little, every
    pair is compared (`_all_near_pairs`); memory bounded either way.
    """
    words = np.ascontiguousarray(hashes, dtype=np.uint8).view(np.uint64)
    n, bits = len(words), words.shape[1] * 64
    pieces = max_distance + 1
    if n < 2 or bits // pieces < _PIECE_BITS:
        return _all_near_pairs(words, max_distance)
    bounds = np.linspace(0, bits, pieces + 1).round().astype(int)
    unpacked = np.unpackbits(np.ascontiguousarray(hashes, dtype=np.uint8), axis=1)
    groups = [_same_value(unpacked[:, lo:hi]) for lo, hi in itertools.pairwise(bounds)]
    shared = sum(int((sizes * (sizes - 1) // 2).sum()) for _, _, sizes in groups)
    if shared > n * (n - 1) // 2 // _SHARED_FRACTION:  # little to save over every pair
        return _all_near_pairs(words, max_distance)
    codes, distances = [np.zeros(0, np.int64)], [np.zeros(0, np.uint16)]
    for order, starts, sizes in groups:
        for i, j in _pairs_within(order, starts, sizes, words, max_distance):
            distance = count_bits(words[i] ^ words[j]).sum(axis=1, dtype=np.uint16)
            keep = distance <= max_distance
            codes.append(i[keep].astype(np.int64) * n + j[keep])
            distances.append(distance[keep])
    codes, first = np.unique(np.concatenate(codes), return_index=True)  # found in 2+ pieces
    distance = np.concatenate(distances)[first]
    return list(zip((codes // n).tolist(), (codes % n).tolist(), distance.tolist(), strict=True))


def _same_value(piece_bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The groups of rows that share a value of ``piece_bits`` (one row of 0/1 per hash):
    ``order`` lists the rows group after group; each group of two or more rows starts at
    ``starts`` in it and has ``sizes`` rows."""
    packed = np.packbits(piece_bits, axis=1)
    if packed.shape[1] <= 8:  # the value as one integer (zero bits after it)
        packed = np.pad(packed, ((0, 0), (0, 8 - packed.shape[1])))
        keys = np.ascontiguousarray(packed).view(np.uint64).ravel()
    else:
        keys = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    return order, starts[sizes > 1], sizes[sizes > 1]


def _pairs_within(order, starts, sizes, words: np.ndarray, max_distance: int):
    """(i, j) arrays, i < j, of every pair within each group (`_same_value`), at most about
    `_CANDIDATES` pairs at a time (~50 MB of hashes to compare); a group too large for that
    is compared by `_all_near_pairs` (only its near pairs come out)."""
    pairs = sizes * (sizes - 1) // 2
    for group in np.flatnonzero(pairs > _CANDIDATES):
        members = order[starts[group] : starts[group] + sizes[group]]
        near = _all_near_pairs(words[members], max_distance)
        if near:
            a, b, _ = (np.array(column) for column in zip(*near, strict=True))
            yield np.minimum(members[a], members[b]), np.maximum(members[a], members[b])
    small = np.flatnonzero(pairs <= _CANDIDATES)
    batch = np.cumsum(pairs[small]) // _CANDIDATES
    for chosen in np.split(small, np.flatnonzero(np.diff(batch)) + 1):
        if len(chosen):
            yield _all_pairs_of(order, starts[chosen], sizes[chosen])


def _all_pairs_of(order, starts, sizes) -> tuple[np.ndarray, np.ndarray]:
    """(i, j), i < j, of every pair within each group, vectorised over the groups."""
    offsets = np.cumsum(sizes) - sizes  # where each group starts among the rows taken
    rows = order[np.repeat(starts - offsets, sizes) + np.arange(sizes.sum())]
    ends = np.repeat(offsets + sizes, sizes)  # where each row's group ends
    after = ends - np.arange(len(rows)) - 1  # members after each row in its group
    first = np.repeat(np.arange(len(rows)), after)
    second = first + 1 + np.arange(len(first)) - np.repeat(np.cumsum(after) - after, after)
    i, j = rows[first], rows[second]
    return np.minimum(i, j), np.maximum(i, j)


def _all_near_pairs(words: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """`near_pairs` by comparing every pair: XOR and popcount one 64-bit word at a time, over
    blocks of rows against the rows after them (about a second for 10,000 hashes, ~50 MB)."""
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
    """(i, j) for i < j whose thumbnails correlate at ``min_correlation`` or more (their dot
    product: they have unit norm), in order of i then j.

    Two vectors of norm at most m whose dot product is at least c are within
    sqrt(2 m^2 - 2 c) of each other, and so are their projections on any unit direction. So
    with the rows sorted by their projection on the thumbnails' main direction of variation,
    each block of rows is multiplied only with the rows after it that project that close: at
    0.9995 a tenth of the pairs on Fashion-MNIST; every pair when the projections are alike.
    """
    vectors = np.asarray(thumbnails, dtype=np.float32)
    n = len(vectors)
    if n < 2:
        return []
    wide = vectors.astype(np.float64)
    largest = float(np.sqrt((wide * wide).sum(axis=1).max()))
    radius = np.sqrt(max(0.0, 2 * largest**2 - 2 * float(min_correlation)))
    radius = radius * (1 + 1e-6) + 1e-6  # the rounding of the projections, many times over
    projection = wide @ _main_direction(wide)
    order = np.argsort(projection, kind="stable")
    projection, ordered = projection[order], vectors[order]
    pairs = []
    start = 0
    while start < n:
        block = min(n - start, _BAND_ROWS)
        end = int(np.searchsorted(projection, projection[start + block - 1] + radius, "right"))
        if block * (end - start) > _PAIR_BUDGET and block > 1:
            block = max(1, _PAIR_BUDGET // (end - start))
            end = int(np.searchsorted(projection, projection[start + block - 1] + radius, "right"))
        correlation = ordered[start : start + block] @ ordered[start:end].T
        r, c = np.nonzero(correlation >= min_correlation)
        keep = c > r  # each pair once, from its first row in projection order
        i, j = order[r[keep] + start], order[c[keep] + start]
        pairs.extend(zip(np.minimum(i, j).tolist(), np.maximum(i, j).tolist(), strict=True))
        start += block
    return sorted(pairs)


def _main_direction(vectors: np.ndarray, steps: int = 30) -> np.ndarray:
    """A unit vector along which ``vectors`` vary most, or nearly: power iteration on their
    covariance, from their first coordinate axis (any unit vector would be correct, this one
    makes the bands of `correlated_pairs` narrow)."""
    centred = np.asarray(vectors - vectors.mean(axis=0), dtype=np.float32)
    covariance = (centred.T @ centred).astype(np.float64)
    axis = np.zeros(len(covariance))
    axis[0] = 1.0
    direction = axis
    for _ in range(steps):
        direction = covariance @ direction
        norm = np.linalg.norm(direction)
        if not norm > 0:  # no variation (or not along the start): any axis will do
            return axis
        direction /= norm
    return direction


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
    folder: ImageFolder,
    *,
    near_distance: int = NEAR_DISTANCE,
    workers: int | None = None,
    facts: dict[str, ImageFacts | str] | None = None,
    progress: bool = False,
) -> dict:
    """The check report (a JSON-ready dict) of an already split folder; reads, never writes.

    Training calls this with the `ImageFolder` it loaded, so the folder is not scanned twice,
    and with the ``facts`` its decode check learnt (`FactsReader`), so no file is decoded
    twice; a file without facts is read here (``progress``: a bar on a terminal).
    ``near_distance`` is the perceptual-hash distance (bits of 256) at or below which two
    images count as near-duplicates. Defaults to `NEAR_DISTANCE` (16).
    """
    if isinstance(near_distance, bool) or not isinstance(near_distance, int):
        raise UsageError(f"--near-distance must be an integer, got {near_distance!r}")
    if not 0 <= near_distance < HASH_BITS:
        raise UsageError(f"--near-distance must be in [0, {HASH_BITS - 1}], got {near_distance}")
    started = time.perf_counter()
    entries = _entries(folder)
    results = _inspect_all([path for path, _, _ in entries], workers, facts or {}, progress)
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
    progress: bool = True,
) -> dict:
    """Check DATA (a folder, or a CSV labels file whose relative paths start from ``root``) as
    `train` would split it; write the report to ``out`` (default `default_out`) and, with
    ``fix_split``, a leakage-free split manifest. Returns the report. ``progress``: a bar
    while the files are read, when stderr is a terminal.

    Both outputs are refused inside a DATA folder (it is only ever read), and over a CSV file.
    """
    out = Path(out) if out else default_out(data)
    for option, target in (("--out", out), ("--fix-split", fix_split)):
        if target is not None:
            _refuse_inside(data, target, option)
    reader = FactsReader()  # each file decoded once, for both the scan and the report
    folder = load_image_folder(
        str(data),
        root=None if root is None else str(root),
        val_split=val_split,
        test_split=test_split,
        seed=seed,
        min_classes=1,
        reader=reader,
        progress=progress,
        multi_label=multi_label,
    )
    report = check_folder(folder, near_distance=near_distance, facts=reader.facts)
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

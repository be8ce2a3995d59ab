"""Regenerate the bundled demo dataset ``src/headstart/demo_data/fashion_mnist/``.

Reads the Fashion-MNIST training set from the Debian package ``dataset-fashion-mnist``
(``apt-get install -y dataset-fashion-mnist``) and writes the first ``--per-class`` images of
each class, in file order, as optimised 8-bit greyscale 28x28 PNGs named by their index in the
training file. Deterministic: running it twice gives the same images and file names.

    python bench/make_demo_data.py
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/headstart/demo_data/fashion_mnist"

# Folder names for Fashion-MNIST labels 0..9 (README "Labels" table), lower-case and path-safe.
CLASS_NAMES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)

IDX_UBYTE_1D = 0x00000801  # labels: magic 2049
IDX_UBYTE_3D = 0x00000803  # images: magic 2051


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse a gzipped IDX file (big-endian header, unsigned bytes) into a uint8 array."""
    data = gzip.decompress(path.read_bytes())
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: IDX magic {magic:#010x}, expected {expected_magic:#010x}")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, body has {body.size} bytes")
    return body.reshape(shape)


def select_first_per_class(labels: np.ndarray, per_class: int) -> dict[int, np.ndarray]:
    """Indices of the first ``per_class`` examples of each label, in file order."""
    selected = {}
    for label in range(len(CLASS_NAMES)):
        indices = np.flatnonzero(labels == label)[:per_class]
        if len(indices) < per_class:
            raise ValueError(f"label {label}: only {len(indices)} examples, need {per_class}")
        selected[label] = indices
    return selected


def export(source: Path, out: Path, per_class: int) -> dict[str, int]:
    """Write the PNGs, replacing any previous export; returns the count per class folder."""
    images = read_idx(source / "train-images-idx3-ubyte.gz", IDX_UBYTE_3D)
    labels = read_idx(source / "train-labels-idx1-ubyte.gz", IDX_UBYTE_1D)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"unexpected shapes: images {images.shape}, labels {labels.shape}")

    counts = {}
    width = len(str(len(labels) - 1))  # zero-pad so a sorted listing is file order
    for label, indices in select_first_per_class(labels, per_class).items():
        class_dir = out / CLASS_NAMES[label]
        class_dir.mkdir(parents=True, exist_ok=True)
        for stale in class_dir.glob("*.png"):
            stale.unlink()
        for index in indices:
            image = Image.fromarray(images[index])  # 2-D uint8 -> mode "L"
            image.save(class_dir / f"{index:0{width}d}.png", optimize=True)
        counts[CLASS_NAMES[label]] = len(indices)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="IDX .gz folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="class-folder root")
    parser.add_argument("--per-class", type=int, default=100, help="images per class")
    args = parser.parse_args(argv)
    counts = export(args.source, args.out, args.per_class)
    for name, count in sorted(counts.items()):
        print(f"{name:12s} {count}")
    print(f"total        {sum(counts.values())} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

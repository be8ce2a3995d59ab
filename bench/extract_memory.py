"""Benchmark: peak memory of feature extraction does not grow with the dataset.

Extracts EfficientNet-Lite0 trunk activations (what fine-tuning caches, the largest output)
for N Fashion-MNIST training images written as PNG files, through headstart's feature cache,
in a fresh subprocess per N, and reports the subprocess's peak RSS. Usage:
``python bench/extract_memory.py [--counts 2000 20000] [--size 96]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from fast_loop import _idx  # noqa: E402  (the benchmark's IDX reader)

CHILD = """
import sys, time
from headstart.backbones import build_backbone, get_backbone
from headstart.training.cache import EntrySpec, FeatureCache
from headstart.data import find_images
from headstart.extract import extract_batches, split_at_cut
from headstart.freeze import resolve_unfreeze
from headstart.model import build_model

folder, size, cache_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
spec = get_backbone("efficientnet_lite0")
base = build_backbone(spec, size, "imagenet")
model = build_model(spec, base, 10)
split = split_at_cut(model, base, resolve_unfreeze("default", spec, base))
paths = find_images([folder])
entry = EntrySpec(spec.name, "imagenet", size, "lite", "trunk:" + split.cut_layer, "clean")
started = time.perf_counter()
rows = FeatureCache(cache_dir).rows(entry, paths, lambda missing: extract_batches(
    split.trunk, missing, size, batch_size=32, verbose=False))
print(len(rows), rows.shape, round(time.perf_counter() - started, 1))
"""


def write_images(root: Path, count: int) -> Path:
    folder = root / f"images-{count}"
    if not folder.exists():
        images = _idx("train-images-idx3-ubyte.gz")[:count]
        folder.mkdir(parents=True)
        for i, pixels in enumerate(images):
            Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return folder


def measure(folder: Path, size: int, work: Path) -> dict:
    cache = Path(tempfile.mkdtemp(dir=work))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(size), str(cache)],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cached = sum(f.stat().st_size for f in cache.rglob("*.npy"))
    return {
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "wall_seconds": round(wall, 1),
        "cache_mb": round(cached / 1e6, 1),
        "child": done.stdout.strip().splitlines()[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    work = Path(tempfile.gettempdir()) / "headstart-bench"
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    # RUSAGE_CHILDREN's ru_maxrss is the largest child so far: run the smallest count first
    for count in sorted(args.counts):
        results[count] = measure(write_images(work, count), args.size, work)
        print(count, results[count], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "extract_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        f"| {n} | {r['peak_rss_mb']} | {r['cache_mb']} | {r['wall_seconds']} |"
        for n, r in results.items()
    ]
    table = "| images | peak RSS MB | cache on disk MB | wall s |\n|---|---|---|---|\n"
    (out / "extract_memory.md").write_text(table + "\n".join(rows) + "\n")
    print(table + "\n".join(rows))


if __name__ == "__main__":
    main()

"""Benchmark: is headstart's default recipe as accurate as workflow 1, and faster?

Real data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``apt-get install
dataset-fashion-mnist``), split with ``numpy.random.default_rng(1234)``: for each class in
order, a permutation of its training indices; the first 100 are train, the next 50 val; all
10,000 test images. Written once as PNG files (the way users have their data).

Runs, at the default backbone's default size and at a smaller one:
  (a) workflow 1: frozen base in the loop with augmentation, then fine-tuning (no caches)
  (b) workflow 2: cached features, no augmentation, no fine-tuning (the raw-feature head)
  (c) headstart's default recipe: cached augmented views + fine-tuning on the cached trunk
      (cold feature cache: extraction time included); then the same again on the warm cache
      (c_default_warm), and (c_fixed) with (c)'s usual choices given as flags (cold cache)
  (d) the same top-block fine-tuning (fixed policy and rate) with the cached trunk (d1) and
      without it (d2: the full model on augmented images)
plus the throughput of feature extraction from files against ``predict`` on in-memory
tensors, with and without XLA and bfloat16. Wall times are from one run on this machine: read
them as ratios. Usage: ``python bench/fast_loop.py [--sizes 96 160 224] [--short-sizes 160]``
(short sizes run only (b) and (c): the figures of the "never loses to cached features" issue).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from make_demo_data import (  # noqa: E402  (the demo exporter's IDX reader and class names)
    CLASS_NAMES,
    DEFAULT_SOURCE,
    IDX_UBYTE_1D,
    IDX_UBYTE_3D,
    read_idx,
)


def _idx(name: str) -> np.ndarray:
    magic = IDX_UBYTE_3D if "images" in name else IDX_UBYTE_1D
    return read_idx(DEFAULT_SOURCE / name, magic)


def write_dataset(root: Path) -> Path:
    """DATA/{train,val,test}/<class>/*.png with the split described in the module docstring."""
    if (root / "done").exists():
        return root
    x, y = _idx("train-images-idx3-ubyte.gz"), _idx("train-labels-idx1-ubyte.gz")
    tx, ty = _idx("t10k-images-idx3-ubyte.gz"), _idx("t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(1234)
    parts = {"train": [], "val": []}
    for label in range(10):
        order = rng.permutation(np.flatnonzero(y == label))
        parts["train"] += list(order[:100])
        parts["val"] += list(order[100:150])
    for split, indices in parts.items():
        for i in indices:
            _save(root / split / CLASS_NAMES[y[i]] / f"{i:05d}.png", x[i])
    for i in range(len(tx)):
        _save(root / "test" / CLASS_NAMES[ty[i]] / f"{i:05d}.png", tx[i])
    (root / "done").touch()
    return root


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def recipe_runs(data: Path, size: int, work: Path, only=()) -> dict[str, dict]:
    from headstart import Config, train
    from headstart.augment import SEEDS_POLICY

    cache = work / f"cache-{size}"
    fixed_cache = work / f"cache-{size}-fixed"
    for directory in (cache, fixed_cache):
        shutil.rmtree(directory, ignore_errors=True)
    # (d) fine-tunes the same top block, from the same stage 1, with a fixed rate and policy
    same_fine_tuning = dict(
        augment=SEEDS_POLICY, views=2, fine_tune_lr=1e-4, fine_tune_epochs=5, feature_norm="none"
    )
    recipes = {
        "a_workflow1": dict(
            mode="frozen", augment=SEEDS_POLICY, fine_tune_lr=1e-5, fine_tune_epochs=5, cache=False
        ),
        "b_workflow2": dict(
            augment="none", views=0, fine_tune=False, cache=False, feature_norm="none"
        ),
        "c_default": dict(cache_dir=str(cache)),
        # a second run on the same images: every view (c) extracted is in the feature cache
        "c_default_warm": dict(cache_dir=str(cache)),
        # (c)'s usual choices given instead of chosen, on a cold cache: what choosing costs
        "c_fixed": dict(
            cache_dir=str(fixed_cache), augment="flip", feature_norm="l2", fine_tune_lr=1e-4
        ),
        "d1_trunk_cache": dict(cache_dir=str(cache), **same_fine_tuning),
        "d2_no_trunk_cache": dict(cache_dir=str(cache), cache_trunk=False, **same_fine_tuning),
    }
    if only:
        recipes = {name: options for name, options in recipes.items() if name in only}
    results = {}
    for name, options in recipes.items():
        out = work / f"run-{size}-{name}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        result = train(Config(data=str(data), out=str(out), image_size=size, quiet=True, **options))
        wall = time.perf_counter() - started
        history = _history(out / "history.csv")
        fine = [float(r["epoch_seconds"]) for r in history if r["stage"] == "fine_tune"]
        results[name] = {
            "train_seconds": result.metrics["train_seconds"],
            "wall_seconds_with_test": round(wall, 1),
            "test_accuracy": result.metrics["accuracy"],
            "n_test": result.metrics["n_test"],
            "saved_from": result.metrics["saved_from"]["stage"],
            "augment": result.metrics.get("augment"),
            "feature_norm": result.metrics.get("feature_norm"),
            "fine_tune_lr": result.metrics.get("fine_tune_lr"),
            "fine_tune_epoch_seconds": round(float(np.mean(fine[1:] or fine)), 2) if fine else None,
            "epochs": {s: sum(r["stage"] == s for r in history) for s in ("head", "fine_tune")},
        }
        print(name, size, results[name], flush=True)
    return results


def _history(path: Path) -> list[dict]:
    import csv

    with path.open() as handle:
        return list(csv.DictReader(handle))


def throughput(data: Path, size: int, n: int = 1500) -> dict:
    """Images/s of headstart's extraction from PNG files vs ``predict`` on in-memory tensors,
    and what XLA and bfloat16 change in memory (same batch size, same run)."""
    import keras

    from headstart.backbones import build_backbone, get_backbone
    from headstart.data import find_images, read_image
    from headstart.extract import extract_batches
    from headstart.model import build_model, feature_extractor

    paths = find_images([str(data / "test")])[:n]

    def extractor(policy: str = "float32"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            spec = get_backbone("efficientnet_lite0")
            base = build_backbone(spec, size, "imagenet")
            return feature_extractor(build_model(spec, base, 10))
        finally:
            keras.mixed_precision.set_global_policy("float32")

    def rate(function) -> float:
        function(32)  # warm up (tracing, compilation)
        started = time.perf_counter()
        function(len(paths))
        return len(paths) / (time.perf_counter() - started)

    model = extractor()
    images = np.stack([read_image(p, (size, size)) for p in paths]).astype("float32")
    from_files = rate(
        lambda k: sum(
            len(b) for b in extract_batches(model, paths[:k], size, batch_size=32, verbose=False)
        )
    )
    in_memory = rate(lambda k: model.predict(images[:k], batch_size=32, verbose=0))
    reference = model.predict(images[:256], batch_size=32, verbose=0)
    model.compile(jit_compile=True)
    xla = rate(lambda k: model.predict(images[:k], batch_size=32, verbose=0))
    bf16_model = extractor("mixed_bfloat16")
    bf16 = rate(lambda k: bf16_model.predict(images[:k], batch_size=32, verbose=0))
    bf16_features = bf16_model.predict(images[:256], batch_size=32, verbose=0).astype("float32")
    cosine = np.sum(reference * bf16_features, 1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(bf16_features, axis=1)
    )
    return {
        "images": len(paths),
        "from_files_per_s": round(from_files, 1),
        "in_memory_predict_per_s": round(in_memory, 1),
        "files_over_memory": round(from_files / in_memory, 3),
        "xla_in_memory_per_s": round(xla, 1),
        "bf16_in_memory_per_s": round(bf16, 1),
        "bf16_feature_cosine_min": round(float(cosine.min()), 5),
    }


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}; {results['date']}",
        "",
        "| size | recipe | train s | test accuracy | fine-tune s/epoch | epochs (head, ft) |"
        " saved from | head input | augment | fine-tune lr |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, runs in results["recipes"].items():
        for name, r in runs.items():
            lines.append(
                f"| {size} | {name} | {r['train_seconds']} | {r['test_accuracy']:.4f} | "
                f"{r['fine_tune_epoch_seconds'] or '-'} | {r['epochs']['head']}, "
                f"{r['epochs']['fine_tune']} | {r['saved_from']} | "
                f"{r.get('feature_norm') or '-'} | {r['augment']} | "
                f"{r['fine_tune_lr'] if r['fine_tune_lr'] is not None else '-'} |"
            )
    lines += [
        "",
        "| size | from files img/s | in-memory predict img/s | ratio | XLA img/s |"
        " bf16 img/s | bf16 feature cosine (min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, t in results["throughput"].items():
        lines.append(
            f"| {size} | {t['from_files_per_s']} | {t['in_memory_predict_per_s']} | "
            f"{t['files_over_memory']} | {t['xla_in_memory_per_s']} | "
            f"{t['bf16_in_memory_per_s']} | {t['bf16_feature_cosine_min']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 160, 224])
    parser.add_argument(
        "--short-sizes",
        type=int,
        nargs="*",
        default=[160],
        help="sizes where only (b) and (c) run, without the throughput figures",
    )
    parser.add_argument(
        "--recipes", nargs="*", default=[], help="run only these (e.g. a_workflow1 c_default)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the other sizes' rows of the results file"
    )
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "headstart-bench"))
    args = parser.parse_args()
    work = Path(args.work)
    data = write_dataset(work / "fashion")
    results = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{__import__('os').cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "recipes": {},
        "throughput": {},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.keep and (out / "fast_loop.json").exists():  # rows of sizes not run this time
        earlier = json.loads((out / "fast_loop.json").read_text())
        for key in ("recipes", "throughput"):
            results[key] = {s: r for s, r in earlier[key].items() if int(s) not in args.sizes}
    for size in args.sizes:
        short = size in args.short_sizes
        if not short:
            results["throughput"][str(size)] = throughput(data, size)
            print("throughput", size, results["throughput"][str(size)], flush=True)
        only = ("b_workflow2", "c_default") if short else tuple(args.recipes)
        results["recipes"][str(size)] = recipe_runs(data, size, work, only)
        # after every size, so that a long run's finished figures are never lost
        (out / "fast_loop.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "fast_loop.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()

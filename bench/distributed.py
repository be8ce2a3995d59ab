"""Benchmark: images/s of feature extraction and of training epochs, 1 and 2 local processes.

Real data: Fashion-MNIST from Debian's ``dataset-fashion-mnist``, the first ``--per-class``
training images of each class (seeded permutation), written once as PNG files and split by
headstart 70/20/10. Each configuration runs ``headstart launch --nproc N -- train DATA ...``
(JAX backend, DataParallel, the same global batch) in the default extract mode with a cold
feature cache of its own: EfficientNet-Lite0 with its real weights at ``--size`` px, the trunk
(up to the fine-tuning cut) extracted once for the training and validation images, sharded
over the processes; then stage 1 (the head on pooled features derived from the cached trunk)
and stage 2 (fine-tuning the top block on the cached trunk), a fixed number of epochs each.

Measured: extraction images/s = (training + validation images) / seconds from the first
"computing" line to the first epoch (the cold backbone pass, its compilation, the barrier,
and the pooled features derived from the trunk); each stage's images/s = training images in
whole global batches / epoch seconds of its last epoch (the first compiles).

One process is pinned to one core (``taskset -c 0``), two processes share two cores (``taskset
-c 0,1``), so each has about one; a third run gives one process both cores, the fair
comparison on the same hardware. Usage: ``python bench/distributed.py [--per-class 48]``;
writes ``bench/results/distributed.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from fast_loop import _idx, _save  # noqa: E402  (Fashion-MNIST IDX reader, PNG writer)
from make_demo_data import CLASS_NAMES  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def write_folder(root: Path, per_class: int) -> Path:
    """DATA/<class>/*.png: the first ``per_class`` images of each class, seeded."""
    if (root / "done").exists():
        return root
    x, y = _idx("train-images-idx3-ubyte.gz"), _idx("train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(1234)
    for label in range(10):
        for i in rng.permutation(np.flatnonzero(y == label))[:per_class]:
            _save(root / CLASS_NAMES[label] / f"{i:05d}.png", x[i])
    (root / "done").touch()
    return root


def run(data: Path, out: Path, nproc: int, cores: str, args: argparse.Namespace) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cache = out.with_name(out.name + "-cache")
    shutil.rmtree(cache, ignore_errors=True)  # cold: every run extracts everything
    command = ["taskset", "-c", cores, sys.executable, "-m", "headstart", "launch"]
    command += ["--nproc", str(nproc), "--", "train", str(data), f"--out={out}"]
    command += [
        f"--cache-dir={cache}",
        f"--image-size={args.size}",
        f"--batch-size={args.batch_size}",
        f"--epochs={args.epochs}",
        f"--fine-tune-epochs={args.epochs}",
        "--fine-tune-lr=1e-4",
        "--augment=none",
        "--views=0",
        "--feature-norm=none",
        "--patience=100",
        "--no-check",
    ]
    started = time.perf_counter()
    lines = []  # (seconds since start, line) as launch forwards them
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, errors="replace") as done:
        for line in done.stdout:
            lines.append((time.perf_counter() - started, line))
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"nproc {nproc} failed:\n{''.join(t for _, t in lines[-60:])}")
    first = next(t for t, line in lines if "headstart: computing trunk:" in line)
    trained = next(t for t, line in lines if line.startswith("[0] Epoch 1/"))
    rows = list(csv.DictReader((out / "history.csv").open()))
    split = json.loads((out / "split.json").read_text())
    n_extracted = len(split["train"]) + len(split["val"])
    n_train = len(split["train"]) // args.batch_size * args.batch_size  # whole global batches
    result = {
        "nproc": nproc,
        "cores": cores,
        "wall_seconds": round(wall, 1),
        "extracted_images": n_extracted,
        "extraction_seconds": round(trained - first, 1),
        "extraction_images_per_second": round(n_extracted / (trained - first), 1),
        "train_images_per_epoch": n_train,
    }
    for stage in ("head", "fine_tune"):
        seconds = [float(r["epoch_seconds"]) for r in rows if r["stage"] == stage]
        result[f"{stage}_epoch_seconds"] = seconds
        if seconds:
            result[f"{stage}_images_per_second"] = round(n_train / seconds[-1], 1)
    metrics = json.loads((out / "metrics.json").read_text())
    result["test_accuracy"] = metrics.get("accuracy")
    result["final_weights"] = [line.split()[-1] for _, line in lines if "final weights" in line]
    print({k: v for k, v in result.items()}, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=48)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", default="/tmp/headstart-bench-distributed")
    args = parser.parse_args()
    work = Path(args.work)
    os.environ.setdefault("HEADSTART_CACHE", str(work / "cache"))
    data = write_folder(work / "data", args.per_class)
    configurations = [(1, "0"), (2, "0,1"), (1, "0,1")]  # the last: 1 process, both cores
    results = [
        run(data, work / f"run-{n}-{cores.replace(',', '')}", n, cores, args)
        for n, cores in configurations
    ]
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    meta |= {"settings": vars(args), "date": time.strftime("%Y-%m-%d")}
    (RESULTS / "distributed.json").write_text(json.dumps({**meta, "runs": results}, indent=2))
    lines = [
        f"# 1 vs 2 local processes ({args.size} px, global batch {args.batch_size}, "
        f"{meta['date']})",
        "",
        "| processes | cores (taskset -c) | extraction img/s (cold cache) | stage 1 img/s | "
        "stage 2 img/s (cached trunk) | wall s | test accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['nproc']} | {r['cores']} | {r['extraction_images_per_second']} | "
            f"{r.get('head_images_per_second')} | {r.get('fine_tune_images_per_second')} | "
            f"{r['wall_seconds']} | {r['test_accuracy']} |"
        )
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Benchmark: images/s of a training epoch with 1 and 2 local processes (`headstart launch`).

Real data: Fashion-MNIST from Debian's ``dataset-fashion-mnist``, the first ``--per-class``
training images of each class (seeded permutation), written once as PNG files and split by
headstart 70/20/10. Each configuration runs ``headstart launch --nproc N -- train DATA
--distributed ...`` (JAX backend, DataParallel, the same global batch), EfficientNet-Lite0 with
its real weights at ``--size`` px: stage 1 with the frozen backbone in the loop, then stage 2
fine-tuning the top block, a fixed number of epochs each (no early stop). Throughput is training
images / epoch seconds (validation included) of each stage's last epoch (the first compiles).

One process is pinned to one core (``taskset -c 0``), two processes share two cores (``taskset
-c 0,1``), so each has about one. Usage: ``python bench/distributed.py [--per-class 48]``;
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


def run(data: Path, out: Path, nproc: int, args: argparse.Namespace) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cores = "0" if nproc == 1 else "0,1"
    command = ["taskset", "-c", cores, sys.executable, "-m", "headstart", "launch"]
    command += ["--nproc", str(nproc), "--", "train", str(data), f"--out={out}"]
    command += [
        f"--image-size={args.size}",
        f"--batch-size={args.batch_size}",
        f"--epochs={args.epochs}",
        f"--fine-tune-epochs={args.epochs}",
        "--fine-tune-lr=1e-4",
        "--augment=none",
        "--patience=100",
        "--no-check",
        "--quiet",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"nproc {nproc} failed:\n{done.stdout[-3000:]}")
    rows = list(csv.DictReader((out / "history.csv").open()))
    split = json.loads((out / "split.json").read_text())
    n_train = len(split["train"]) // args.batch_size * args.batch_size  # whole global batches
    result = {"nproc": nproc, "wall_seconds": round(wall, 1), "train_images_per_epoch": n_train}
    for stage in ("head", "fine_tune"):
        seconds = [float(r["epoch_seconds"]) for r in rows if r["stage"] == stage]
        result[f"{stage}_epoch_seconds"] = seconds
        if seconds:
            result[f"{stage}_images_per_second"] = round(n_train / seconds[-1], 1)
    metrics = json.loads((out / "metrics.json").read_text())
    result["test_accuracy"] = metrics.get("accuracy")
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=48)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--work", default="/tmp/headstart-bench-distributed")
    args = parser.parse_args()
    work = Path(args.work)
    os.environ.setdefault("HEADSTART_CACHE", str(work / "cache"))
    data = write_folder(work / "data", args.per_class)
    results = [run(data, work / f"run-{n}", n, args) for n in (1, 2)]
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    meta |= {"settings": vars(args), "date": time.strftime("%Y-%m-%d")}
    (RESULTS / "distributed.json").write_text(json.dumps({**meta, "runs": results}, indent=2))
    lines = [
        f"# 1 vs 2 local processes ({args.size} px, global batch {args.batch_size}, "
        f"{meta['date']})",
        "",
        "| processes | stage 1 img/s | stage 2 img/s | wall s | test accuracy |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['nproc']} | {r.get('head_images_per_second')} | "
            f"{r.get('fine_tune_images_per_second')} | {r['wall_seconds']} | "
            f"{r['test_accuracy']} |"
        )
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

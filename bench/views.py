"""Benchmark: how test accuracy grows with K cached augmented views, against workflow 1.

On the Fashion-MNIST split of ``bench/fast_loop.py`` (100 train + 50 validation images per
class, all 10,000 test images), EfficientNet-Lite0's pooled features are extracted once: clean
images of every split, plus up to max(K) augmented views of the training images per policy.
For each K, headstart's stage-1 head (zero-initialised Dense on the raw pooled features,
dropout 0.2, Adam 1e-3, early stopping on validation loss, `bench/head_options.py`'s
procedure) trains on the clean view plus the first K augmented ones, over several seeds. The
reference is workflow 1 with the same policy: the frozen base in the loop, new
augmented images every epoch, the same head and procedure (``headstart train --mode frozen
--no-fine-tune``). Also recorded: the seconds one augmented view costs (a backbone pass over
the 1,000 training images), so accuracy can be read against time.

Usage: ``python bench/views.py [--size 96] [--views 0 1 2 4 8] [--seeds 3]``; writes
bench/results/views-SIZE.{json,md}.
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

sys.path.insert(0, str(Path(__file__).parent))
from fast_loop import write_dataset  # noqa: E402  (the shared Fashion-MNIST split)
from head_options import (  # noqa: E402  (stage 1's procedure on cached features)
    feature_views,
    train_head,
)

POLICIES = ("flip", "flip,rotate=0.1,zoom=0.2")  # the usual winner here, and the seeds' policy


def extract_views(data: Path, size: int, policies, max_views: int) -> dict:
    """Clean features of every split, and ``max_views`` views per policy of the training
    split, each view a fresh draw of the policy (headstart's own `FeatureViews`)."""
    extracted, folder = feature_views(data, size)
    out, seconds = {}, []
    for split in ("train", "val", "test"):
        out[split] = [np.asarray(extracted.rows("pooled", split), dtype="float32")]  # clean
        out[f"{split}_labels"] = np.asarray(getattr(folder, split).labels)
    for policy in policies:
        out[policy] = []
        for view in range(1, max_views + 1):
            started = time.perf_counter()
            out[policy].append(np.asarray(extracted.rows("pooled", "train", policy, view)))
            seconds.append(time.perf_counter() - started)
    out["seconds_per_view"] = float(np.median(seconds)) if seconds else None
    return out


def workflow1(data: Path, size: int, policy: str, work: Path) -> dict:
    """Workflow 1: frozen base in the loop, ``policy`` on every epoch, head only."""
    from headstart import Config, train

    out = work / f"views-workflow1-{size}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = train(
        Config(
            data=str(data),
            out=str(out),
            image_size=size,
            mode="frozen",
            augment=policy,
            feature_norm="none",
            fine_tune=False,
            cache=False,
            quiet=True,
        )
    )
    return {
        "test_accuracy": result.metrics["accuracy"],
        "train_seconds": result.metrics["train_seconds"],
        "wall_seconds_with_test": round(time.perf_counter() - started, 1),
    }


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}; {results['date']}; {results['size']} px; "
        f"extracted heads: mean (min-max) over seeds {results['seeds']}; one augmented view "
        f"costs {results['seconds_per_view']:.1f} s",
        "",
        "| policy | training | test accuracy | val accuracy |",
        "|---|---|---|---|",
    ]
    for policy, by_k in results["runs"].items():
        for k, runs in by_k.items():
            test = [r["test_accuracy"] for r in runs]
            val = np.mean([r["val_accuracy"] for r in runs])
            lines.append(
                f"| {policy} | K={k} cached views | {np.mean(test):.4f} "
                f"({min(test):.4f}-{max(test):.4f}) | {val:.4f} |"
            )
        reference = results["workflow1"].get(policy)
        if reference:
            lines.append(
                f"| {policy} | workflow 1 (base in the loop, {reference['train_seconds']} s) | "
                f"{reference['test_accuracy']:.4f} | - |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--views", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-workflow1", action="store_true", help="skip the reference runs")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "headstart-bench"))
    args = parser.parse_args()
    work = Path(args.work)
    data = write_dataset(work / "fashion")
    extracted = extract_views(data, args.size, POLICIES, max(args.views))
    results = {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "size": args.size,
        "seeds": list(range(args.seeds)),
        "seconds_per_view": extracted["seconds_per_view"],
        "runs": {},
        "workflow1": {},
    }
    for policy in POLICIES:
        results["runs"][policy] = {}
        for k in args.views:
            subset = {**extracted, "train": [*extracted["train"], *extracted[policy][:k]]}
            results["runs"][policy][k] = [
                train_head(subset, init="zeros", norm="none", seed=s) for s in results["seeds"]
            ]
        if not args.no_workflow1:
            results["workflow1"][policy] = workflow1(data, args.size, policy, work)
        print(markdown(results), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"views-{args.size}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"views-{args.size}.md").write_text(markdown(results))


if __name__ == "__main__":
    main()

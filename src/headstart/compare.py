"""``headstart compare RUN RUN…``: runs side by side, as a table and overlaid validation curves.

Everything comes from the run directories (config.json, metrics.json, history.csv,
summary.txt), so runs trained months apart, or on other machines, compare the same way.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart import figures, files, runs
from headstart.backbones import get_backbone
from headstart.errors import UsageError
from headstart.evaluation import PREDICTIONS_FILE
from headstart.metrics import paired_difference
from headstart.report import read_history, stage_parameters

COMPARE_TABLE = "compare.md"
COMPARE_FIGURE = "compare.png"
DEFAULT_OUT = "comparison"

COLUMNS = (
    "run",
    "backbone",
    "mode",
    "augment",
    "image size",
    "epochs",
    "wall time",
    "test accuracy",
    "95% CI",
    "parameters trained",
)
_RIGHT = {"image size", "epochs", "wall time", "test accuracy", "95% CI", "parameters trained"}


@dataclass
class Comparison:
    rows: list[dict]  # one per run, keyed by COLUMNS, as displayed
    table: str  # aligned plain text, for the terminal
    markdown_path: Path
    figure_path: Path
    noise: list[str]  # per run: is its accuracy gap to the best run more than noise?


def compare(run_dirs: list[str | Path], *, out: str | Path | None = None) -> Comparison:
    """Compare runs: writes ``OUT/compare.md`` (the table) and ``OUT/compare.png`` (validation
    accuracy and loss of every run over both stages); ``out`` defaults to ``./comparison``."""
    if not run_dirs:
        raise UsageError("compare needs at least one run directory")
    paths = [_run_dir(run) for run in run_dirs]
    names = _names(paths)
    rows, curves = [], []
    for name, path in zip(names, paths, strict=True):
        history = read_history(path)
        rows.append(_row(name, path, history))
        curves.append({"name": name, "history": history})
    noise = noise_verdicts(names, paths)
    out_dir = Path(out or DEFAULT_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = out_dir / COMPARE_TABLE
    files.write_text_atomic(markdown, _markdown(rows, paths, noise))
    figure = figures.compare_curves(curves, out_dir / COMPARE_FIGURE)
    return Comparison(rows, _text(rows), markdown, figure, noise)


def _run_dir(run: str | Path) -> Path:
    path = Path(run)
    for name in (runs.CONFIG_FILE, runs.METRICS_FILE):
        if not (path / name).is_file():
            raise UsageError(f"{path} is not a finished headstart run: {name} is missing")
    return path


def _names(paths: list[Path]) -> list[str]:
    """Folder names, with as many parent folders as it takes to tell them apart."""
    for depth in range(1, 6):
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _row(name: str, path: Path, history: list[dict]) -> dict:
    config = json.loads((path / runs.CONFIG_FILE).read_text(encoding="utf-8"))
    metrics = json.loads((path / runs.METRICS_FILE).read_text(encoding="utf-8"))
    stages = [row.get("stage", "head") for row in history]
    head_epochs, tune_epochs = stages.count("head"), stages.count("fine_tune")
    if _pretrained(config):
        mode = config.get("mode", "?") + (" + fine-tune" if tune_epochs else "")
    else:
        mode = "from scratch"
    if metrics.get("refit"):  # then trained again on train + validation (training.refit)
        mode += " + refit"
    summary_file = path / runs.SUMMARY_FILE
    summary = summary_file.read_text(encoding="utf-8") if summary_file.is_file() else ""
    trained = " → ".join(f"{s['trainable']:,}" for s in stage_parameters(summary)) or "?"
    accuracy = metrics.get("accuracy")
    seconds = metrics.get("train_seconds")
    interval = metrics.get("accuracy_ci95")
    if metrics.get("multi_label"):  # no accuracy: its headline figure, mean average precision
        score = f"mAP {metrics['map']:.4f}"
    else:
        score = f"{accuracy:.4f}" if isinstance(accuracy, int | float) else "?"
    return {
        "run": name,
        "backbone": config.get("backbone", "?"),
        "mode": mode,
        "augment": config.get("augment", "?") or "none",
        "image size": str(config.get("image_size", "?")),
        "epochs": f"{head_epochs}+{tune_epochs}" if tune_epochs else str(head_epochs),
        "wall time": f"{seconds:.0f} s" if isinstance(seconds, int | float) else "?",
        "test accuracy": score,
        "95% CI": f"{interval[0]:.2f}-{interval[1]:.2f}" if interval else "?",
        "parameters trained": trained,
    }


# ----------------------------------------------------------------------------- noise


def accuracy_difference(run_a: str | Path, run_b: str | Path) -> dict:
    """Test accuracy of run A minus run B, and whether it is within noise.

    On the test images both runs scored (their predictions.csv, same path and true class): a
    paired bootstrap, ``method: "paired bootstrap"``. Without shared images: whether the two
    runs' 95% intervals from metrics.json overlap (cruder), ``method: "interval overlap"``.
    ``method: None`` when neither is available (runs from before intervals were recorded).
    """
    answers_a, answers_b = _test_answers(Path(run_a)), _test_answers(Path(run_b))
    shared = sorted(set(answers_a) & set(answers_b))
    shared = [path for path in shared if answers_a[path][0] == answers_b[path][0]]
    if shared:
        result = paired_difference(
            np.array([answers_a[p][1] for p in shared]), np.array([answers_b[p][1] for p in shared])
        )
        return {
            "method": "paired bootstrap",
            **result,
            "n_a": len(answers_a),
            "n_b": len(answers_b),
        }
    metrics = [_metrics(Path(run)) for run in (run_a, run_b)]
    intervals = [m.get("accuracy_ci95") for m in metrics]
    if not all(intervals):
        return {"method": None}
    (low_a, high_a), (low_b, high_b) = intervals
    return {
        "method": "interval overlap",
        "difference": metrics[0]["accuracy"] - metrics[1]["accuracy"],
        "intervals": intervals,
        "within_noise": bool(low_a <= high_b and low_b <= high_a),
    }


def noise_verdicts(names: list[str], paths: list[Path]) -> list[str]:
    """One sentence per run other than the most accurate: is the gap to it more than noise?"""
    accuracies = [_metrics(path).get("accuracy") for path in paths]
    known = [i for i, a in enumerate(accuracies) if isinstance(a, int | float)]
    if len(known) < 2:
        return []
    best = max(known, key=lambda i: accuracies[i])
    lines = []
    for i in known:
        if i != best:
            lines.append(
                _verdict(names[i], names[best], accuracy_difference(paths[i], paths[best]))
            )
    return lines


def _verdict(name: str, best: str, result: dict) -> str:
    if result["method"] is None:
        return f"{name} vs {best}: no predictions.csv or intervals to judge the difference"
    verdict = "within noise" if result["within_noise"] else "more than noise"
    if result["method"] == "paired bootstrap":
        low, high = result["ci95"]
        partial = (
            f" of {result['n_a']} and {result['n_b']}"
            if (result["n_a"], result["n_b"]) != (result["n"], result["n"])
            else ""
        )
        return (
            f"{name} vs {best}: {result['difference']:+.4f} accuracy on {result['n']} shared test "
            f"images{partial}, 95% paired bootstrap {low:+.4f} to {high:+.4f}: {verdict}"
        )
    return (
        f"{name} vs {best}: {result['difference']:+.4f} accuracy on different test images; "
        f"their 95% intervals {'overlap' if result['within_noise'] else 'do not overlap'}: "
        f"{verdict}"
    )


def _test_answers(run: Path) -> dict[str, tuple[str, bool]]:
    """path -> (true class, answered right) from the run's predictions.csv; {} without one."""
    path = run / PREDICTIONS_FILE
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        return {
            row["path"]: (row["true"], row["true"] == row["predicted"])
            for row in csv.DictReader(handle)
        }


def _metrics(run: Path) -> dict:
    try:
        return json.loads((run / runs.METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _pretrained(config: dict) -> bool:

    try:
        return get_backbone(config.get("backbone", "")).pretrained
    except UsageError:  # a backbone this version does not know
        return config.get("weights") not in (None, "none")


def _text(rows: list[dict]) -> str:
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in COLUMNS}

    def line(values: dict) -> str:
        cells = [
            values[c].rjust(widths[c]) if c in _RIGHT else values[c].ljust(widths[c])
            for c in COLUMNS
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line({c: c for c in COLUMNS}), *(line(row) for row in rows)])


def _markdown(rows: list[dict], paths: list[Path], noise: list[str]) -> str:
    header = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join("---:" if c in _RIGHT else "---" for c in COLUMNS) + "|"
    body = ["| " + " | ".join(row[c].replace("|", "\\|") for c in COLUMNS) + " |" for row in rows]
    notes = [
        "",
        "Epochs: stage 1 (head) + stage 2 (fine-tuning), as run (early stopping included).",
        "Parameters trained: trainable parameters per stage (from each run's summary.txt).",
        "Augment: the run's --augment setting.",
        "95% CI: bootstrap interval of the test accuracy (metrics.json).",
        *(
            ["", "Is each difference to the most accurate run more than noise?", ""]
            if noise
            else []
        ),
        *(f"- {line}" for line in noise),
        "",
        f"![validation curves]({COMPARE_FIGURE})",
        "",
        "Runs:",
        *(f"- `{row['run']}`: `{path.resolve()}`" for row, path in zip(rows, paths, strict=True)),
    ]
    return "\n".join([header, rule, *body, *notes]) + "\n"

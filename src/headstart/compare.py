"""``headstart compare RUN RUN…``: runs side by side, as a table and overlaid validation curves.

Everything comes from the run directories (config.json, metrics.json, history.csv,
summary.txt), so runs trained months apart, or on other machines, compare the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from headstart import figures, runs
from headstart.errors import UsageError
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
    "parameters trained",
)
_RIGHT = {"image size", "epochs", "wall time", "test accuracy", "parameters trained"}


@dataclass
class Comparison:
    rows: list[dict]  # one per run, keyed by COLUMNS, as displayed
    table: str  # aligned plain text, for the terminal
    markdown_path: Path
    figure_path: Path


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
    out_dir = Path(out or DEFAULT_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = out_dir / COMPARE_TABLE
    runs.write_text_atomic(markdown, _markdown(rows, paths))
    figure = figures.compare_curves(curves, out_dir / COMPARE_FIGURE)
    return Comparison(rows, _text(rows), markdown, figure)


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
    summary_file = path / runs.SUMMARY_FILE
    summary = summary_file.read_text(encoding="utf-8") if summary_file.is_file() else ""
    trained = " → ".join(f"{s['trainable']:,}" for s in stage_parameters(summary)) or "?"
    accuracy = metrics.get("accuracy")
    seconds = metrics.get("train_seconds")
    return {
        "run": name,
        "backbone": config.get("backbone", "?"),
        "mode": mode,
        "augment": config.get("augment", "?") or "none",
        "image size": str(config.get("image_size", "?")),
        "epochs": f"{head_epochs}+{tune_epochs}" if tune_epochs else str(head_epochs),
        "wall time": f"{seconds:.0f} s" if isinstance(seconds, int | float) else "?",
        "test accuracy": f"{accuracy:.4f}" if isinstance(accuracy, int | float) else "?",
        "parameters trained": trained,
    }


def _pretrained(config: dict) -> bool:
    from headstart.backbones import get_backbone

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


def _markdown(rows: list[dict], paths: list[Path]) -> str:
    header = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join("---:" if c in _RIGHT else "---" for c in COLUMNS) + "|"
    body = ["| " + " | ".join(row[c].replace("|", "\\|") for c in COLUMNS) + " |" for row in rows]
    notes = [
        "",
        "Epochs: stage 1 (head) + stage 2 (fine-tuning), as run (early stopping included).",
        "Parameters trained: trainable parameters per stage (from each run's summary.txt).",
        "Augment: the run's --augment setting.",
        "",
        f"![validation curves]({COMPARE_FIGURE})",
        "",
        "Runs:",
        *(f"- `{row['run']}`: `{path.resolve()}`" for row, path in zip(rows, paths, strict=True)),
    ]
    return "\n".join([header, rule, *body, *notes]) + "\n"

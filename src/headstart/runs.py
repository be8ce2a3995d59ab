"""The run directory: where a run's files go, written atomically (never half a file)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from headstart.errors import UsageError

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.txt"
SKIPPED_FILE = "skipped.txt"


def new_run_dir(out: str | None) -> Path:
    """``out`` or ``runs/<timestamp>``; a non-empty folder is refused, never overwritten."""
    path = Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if path.exists() and any(path.iterdir()):
        raise UsageError(f"--out {path} already exists and is not empty: choose a new folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_run_dir(run: str | Path) -> Path:
    """An existing run directory, checked to hold a model and its labels."""
    path = Path(run)
    for name in (MODEL_FILE, LABELS_FILE):
        if not (path / name).is_file():
            raise UsageError(f"{path} is not a headstart run: {name} is missing")
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a temporary file beside ``path``, then rename: readers see old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, value: object) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def save_model_atomic(model, path: str | Path) -> None:
    """``model.save`` to a temporary ``.keras`` file beside ``path``, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_labels(run: Path) -> list[str]:
    return json.loads((run / LABELS_FILE).read_text(encoding="utf-8"))

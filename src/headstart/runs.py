"""The run directory: the files a run holds, and opening one safely (version, model file).

Every file of a run is written atomically (`headstart.files`): a run killed at any moment
holds complete files only.
"""

from __future__ import annotations

import json
import re
import time
import zipfile
from pathlib import Path

import keras

from headstart import layers  # noqa: F401  registers the custom layers saved models hold
from headstart._version import __version__
from headstart.errors import UsageError
from headstart.splits import SPLIT_FILE  # noqa: F401  a run's exact train/val/test file lists

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.txt"
SKIPPED_FILE = "skipped.txt"
# a multi-label run's one decision threshold per label (its presence makes a run multi-label)
THRESHOLDS_FILE = "thresholds.json"


_KERAS_ARCHIVE = {"config.json", "metadata.json"}  # members every .keras zip holds


def default_run_dir() -> Path:
    """``runs/<timestamp>``: where a run goes without ``--out``."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def new_run_dir(out: str | None) -> Path:
    """``out`` or `default_run_dir`; a non-empty folder is refused, never overwritten."""
    path = Path(out) if out else default_run_dir()
    if path.exists() and any(path.iterdir()):
        raise UsageError(f"--out {path} already exists and is not empty: choose a new folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_run_dir(run: str | Path) -> Path:
    """An existing run directory from a compatible headstart, holding a Keras model file.

    Checked up front, so that a wrong path, a damaged or foreign model file, or a run from an
    incompatible version is one clear `UsageError` instead of a Keras traceback.
    """
    path = Path(run)
    if path.is_file():
        hint = f"({path.parent})" if path.suffix == ".keras" else "(the --out of headstart train)"
        raise UsageError(f"{path} is a file: give the run folder that holds model.keras {hint}")
    if not path.is_dir():
        raise UsageError(f"run folder not found: {path} (give the --out of headstart train)")
    missing = [n for n in (MODEL_FILE, LABELS_FILE, CONFIG_FILE) if not (path / n).is_file()]
    if missing == [MODEL_FILE]:
        raise UsageError(
            f"{path} has no {MODEL_FILE}: its training stopped before the first epoch ended; "
            f"train again"
        )
    if missing:
        raise UsageError(f"{path} is not a headstart run: {missing[0]} is missing")
    check_version(path)
    check_model_file(path / MODEL_FILE)
    return path


def check_version(run: Path) -> str:
    """The headstart version that made ``run`` (from config.json); UsageError when unknown or of
    another major version, whose run folders this version cannot promise to read."""
    config_file = Path(run) / CONFIG_FILE
    values = read_json(config_file)
    made_by = values.get("headstart_version") if isinstance(values, dict) else None
    if not isinstance(made_by, str) or _major(made_by) is None:
        raise UsageError(
            f"{config_file} does not say which headstart version made it (no valid "
            f"headstart_version): train the run again with headstart {__version__}"
        )
    major = _major(made_by)
    if major != _major(__version__):
        raise UsageError(
            f"{run} was made by headstart {made_by}, this is headstart {__version__}: run folders "
            f"of another major version are not compatible; use headstart {major}.x "
            f"(pip install 'headstart=={major}.*') or train again"
        )
    return made_by


def _major(version: str) -> int | None:
    match = re.match(r"(\d+)\.\d+", version)
    return int(match[1]) if match else None


def check_model_file(path: Path) -> None:
    """A ``.keras`` file is a zip archive holding config.json and metadata.json: refuse anything
    else with the file's name, before Keras fails on it with a traceback."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UsageError(
            f"{path} is not a Keras model file (not a .keras zip archive): it is damaged or was "
            f"replaced; train again or restore it from a copy"
        ) from exc
    if not _KERAS_ARCHIVE <= names:
        raise UsageError(
            f"{path} is a zip archive but not a Keras .keras model (no config.json and "
            f"metadata.json inside): train again or restore it from a copy"
        )


def load_model(run: Path, n_classes: int):
    """The run's model, checked to be a headstart classifier: RGB images in, one logit per class
    (one in all for two classes) out. Anything else is a UsageError naming the file."""
    path = Path(run) / MODEL_FILE
    check_model_file(path)
    try:
        model = keras.saving.load_model(path)
    except Exception as exc:  # unknown layers, unsafe lambdas, broken weights: all the same to us
        raise UsageError(
            f"{path} cannot be loaded by Keras {keras.__version__} ({type(exc).__name__}: "
            f"{_shorten(exc)}): it is not a headstart model, or it is damaged"
        ) from exc
    multi = is_multi_label(run)
    units = 1 if n_classes == 2 and not multi else n_classes
    try:
        inputs, outputs = tuple(model.input_shape), tuple(model.output_shape)
    except (AttributeError, TypeError, ValueError):
        inputs = outputs = ()
    if len(inputs) != 4 or inputs[-1] != 3 or outputs[1:] != (units,):
        raise UsageError(
            f"{path} is not a headstart classifier for the {n_classes} classes of "
            f"{LABELS_FILE}: it takes {inputs or '?'} and gives {outputs or '?'}, expected "
            f"(None, height, width, 3) images in and {units} logit(s) out"
        )
    return model


def is_multi_label(run: Path) -> bool:
    """A run (or an export folder) of a multi-label model: it holds thresholds.json."""
    return (Path(run) / THRESHOLDS_FILE).is_file()


def refuse_multi_label(run: Path, verb: str) -> None:
    """One line for a verb that works on class probabilities only."""
    if is_multi_label(run):
        raise UsageError(
            f"{run} is a multi-label run: {verb} works on single-label runs (one class per "
            f"image) only"
        )


def read_thresholds(run: Path, class_names: list[str]) -> list[float] | None:
    """A multi-label run's decision thresholds, in ``class_names`` order; None for a run that is
    not multi-label."""
    path = Path(run) / THRESHOLDS_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    chosen = record.get("thresholds") if isinstance(record, dict) else None
    if not (
        isinstance(chosen, dict)
        and set(chosen) == set(class_names)
        and all(isinstance(v, int | float) for v in chosen.values())
    ):
        raise UsageError(
            f"{path} must hold a threshold for each label of {LABELS_FILE}: the run folder is "
            f"damaged"
        )
    return [float(chosen[name]) for name in class_names]


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{path} is not readable JSON ({_shorten(exc)}): the run folder is damaged; train again"
        ) from exc


def was_refit(run: Path) -> bool:
    """Whether model.keras was refit on the training and validation images (metrics.json's
    ``refit``, `headstart.training.refit`): its validation images are then training images."""
    path = Path(run) / METRICS_FILE
    return path.is_file() and read_json(path).get("refit") is True


def read_labels(run: Path) -> list[str]:
    """labels.json: the class names in output order."""
    path = Path(run) / LABELS_FILE
    labels = read_json(path)
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
        raise UsageError(f"{path} must be a JSON list of class names: the run folder is damaged")
    return labels


def _shorten(exc: BaseException, limit: int = 100) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

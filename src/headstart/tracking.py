"""What a run tells an observer as it happens (`Tracker`), and `MlflowTracker`, which logs it
to MLflow (``--mlflow [URI]``, ``Config.mlflow``).

A tracker is told the run's settings when it starts (`Tracker.start`), every epoch of both
stages as history.csv gets it (`Tracker.epoch`: the epoch counts on across stages), the
validation score of each candidate of the choices made on validation (`Tracker.trial`: the
head's input, the augmentation, the fine-tuning rate, which ``train(callbacks=...)`` does not
see), and at the end the run's metrics and files (`Tracker.end`) or its failure
(`Tracker.fail`). ``train(config, tracker=...)`` takes any object with these methods;
subclass `Tracker` and override what you need. Only the process that writes the run folder
tracks it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from headstart import files
from headstart.config import MLFLOW_DEFAULT, Config
from headstart.errors import UsageError

log = logging.getLogger(__name__)

MLFLOW_FILE = "mlflow.json"  # in the run folder: the MLflow run it is logged to (resume goes on)
MLFLOW_DEFAULT_FOLDER = "mlruns"
MLFLOW_EXPERIMENT = "headstart"  # unless $MLFLOW_EXPERIMENT_NAME names another
# config fields that are records of the run's choices, not settings: logged as trial metrics
_RECORDS = ("augment_scores", "feature_norm_scores", "fine_tune_lr_scores", "choice_noise")
# metrics.json entries about the run itself; the others are test metrics ("test_" + name)
_RUN_METRICS = ("train_seconds", "total_seconds", "skipped")
# MLflow's metric and parameter names: letters, digits and _ - . space : /
_NAME_UNSAFE = re.compile(r"[^\w\-. :/]")
_NO_COLON_URIS = ("databricks", "databricks-uc", "uc")


class Tracker:
    """An observer of a training run: every method does nothing here; override what you need.

    ``choice`` in `trial` is the Config field chosen ("feature_norm", "augment",
    "fine_tune_lr"), ``candidate`` the value tried, ``score`` its ``{"val_accuracy",
    "val_loss", "epochs"}`` (accuracy None: no epoch beat stage 1, for a fine-tuning rate)."""

    def start(self, config: Config) -> None:
        """The run starts (or resumes): ``config`` as config.json holds it, ``config.out`` the
        run folder."""

    def epoch(self, row: dict) -> None:
        """An epoch ended: its row of history.csv (``epoch`` counting on across both stages,
        ``stage`` "head" or "fine_tune", then loss, accuracy, val_loss, val_accuracy...)."""

    def trial(self, choice: str, candidate: str, score: dict) -> None:
        """A candidate of a choice made on validation was scored."""

    def end(self, config: Config, metrics: dict, paths: Sequence[Path]) -> None:
        """The run is complete: its final config (the choices made), metrics.json's content,
        and the run folder's main files (report, model, metrics, config, labels, history)."""

    def fail(self, error: BaseException) -> None:
        """The run stopped on ``error`` (KeyboardInterrupt for a Ctrl-C)."""


class Trackers(Tracker):
    """Several trackers told the same things, in order."""

    def __init__(self, trackers: Sequence[Tracker]):
        self.trackers = list(trackers)

    def start(self, config):
        for tracker in self.trackers:
            tracker.start(config)

    def epoch(self, row):
        for tracker in self.trackers:
            tracker.epoch(row)

    def trial(self, choice, candidate, score):
        for tracker in self.trackers:
            tracker.trial(choice, candidate, score)

    def end(self, config, metrics, paths):
        for tracker in self.trackers:
            tracker.end(config, metrics, paths)

    def fail(self, error):
        for tracker in self.trackers:
            tracker.fail(error)


def trackers_for(config: Config, tracker: Tracker | None = None) -> Tracker:
    """The run's tracker: the user's (``train(tracker=...)``), plus an `MlflowTracker` when
    ``config.mlflow`` is set; a `Tracker` that does nothing when neither is."""
    chosen = [t for t in (tracker,) if t is not None]
    if config.mlflow:
        chosen.append(MlflowTracker(config.mlflow))
    return chosen[0] if len(chosen) == 1 else Trackers(chosen)


def resolve_mlflow_uri(value: str) -> str:
    """``--mlflow``'s value as a tracking URI: "default" is $MLFLOW_TRACKING_URI, else the
    folder ./mlruns; a folder (a local file store) becomes an absolute ``file:`` URI, so that
    config.json says where the run went; any other URI (sqlite:, http:...) is kept."""
    if value == MLFLOW_DEFAULT:
        value = os.environ.get("MLFLOW_TRACKING_URI") or MLFLOW_DEFAULT_FOLDER
    if value.startswith("file:") and not value.startswith("file://"):
        value = value[len("file:") :]  # file:./mlruns, file:/abs/mlruns
    elif value in _NO_COLON_URIS or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", value):
        return value  # a URI (a one-letter scheme would be a Windows drive)
    return Path(value).expanduser().resolve().as_uri()


class MlflowTracker(Tracker):
    """Logs a run to MLflow: the config as parameters (and the choices made, as
    ``chosen.<field>`` parameters), every epoch's metrics with step = the epoch across both
    stages, each candidate's validation scores (``trial/<choice>/<candidate>/val_accuracy``,
    ``.../val_loss``, ``.../epochs``), the test metrics (``test_<name>``) and the run's files
    as artifacts. The run folder's mlflow.json names the MLflow run, so a resumed run goes on
    logging to it.

    Through `mlflow.tracking.MlflowClient` only: MLflow's active-run state is left alone.
    A local folder is MLflow's file store, which MLflow 3 keeps in maintenance mode and opens
    only with ``MLFLOW_ALLOW_FILE_STORE=true``: set for the store's opening here (unless it is
    set already); reading it back needs it too."""

    def __init__(self, uri: str = MLFLOW_DEFAULT, experiment: str | None = None):
        self.uri = resolve_mlflow_uri(uri)
        named = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        self.experiment = named or MLFLOW_EXPERIMENT
        self.client = None
        self.run_id: str | None = None
        self._params: dict[str, str] = {}

    def start(self, config: Config) -> None:
        if importlib.util.find_spec("mlflow") is None:
            raise UsageError('--mlflow needs MLflow: pip install "headstart[mlflow]"')
        from mlflow.tracking import MlflowClient  # optional (the mlflow extra), ~1 s to import

        run_dir = Path(config.out)
        with allow_file_store(self.uri):
            self.client = MlflowClient(self.uri)
        record = _read_record(run_dir / MLFLOW_FILE)
        if record is not None and record.get("tracking_uri") == self.uri:  # a resumed run
            self.run_id = record["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(self.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(self.experiment)
            )
            run = self.client.create_run(
                experiment_id,
                run_name=run_dir.name,
                tags={"headstart.run_dir": str(run_dir), "headstart.data": config.data},
            )
            self.run_id = run.info.run_id
            files.write_json(
                run_dir / MLFLOW_FILE,
                {"tracking_uri": self.uri, "experiment": self.experiment, "run_id": self.run_id},
            )
        self._params = _params(config)
        self._log(params=self._params)
        log.info("mlflow: run %s in %s (experiment %s)", self.run_id, self.uri, self.experiment)

    def epoch(self, row: dict) -> None:
        step = int(row["epoch"])
        values = {k: v for k, v in row.items() if k not in ("epoch", "stage")}
        self._log(metrics=values, step=step)

    def trial(self, choice: str, candidate: str, score: dict) -> None:
        """``trial/<choice>/<candidate>/<val_accuracy|val_loss|epochs>``; a candidate that
        never beat stage 1 has only ``epochs``, 0."""
        prefix = f"trial/{choice}/{_safe_name(str(candidate))}"
        values = {**score, "epochs": score.get("epochs") or 0}
        self._log(metrics={f"{prefix}/{key}": value for key, value in values.items()})

    def end(self, config: Config, metrics: dict, paths: Sequence[Path]) -> None:
        chosen = {
            f"chosen.{key}": value
            for key, value in _params(config).items()
            if self._params.get(key) != value
        }
        final = {
            key if key in _RUN_METRICS else f"test_{key}": value for key, value in metrics.items()
        }
        self._log(params=chosen, metrics=final)
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status="FINISHED")

    def fail(self, error: BaseException) -> None:
        if self.client is not None and self.run_id is not None:
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            self.client.set_terminated(self.run_id, status=status)

    def _log(self, *, params: dict | None = None, metrics: dict | None = None, step: int = 0):
        """One batch: the parameters as text, the metrics that are numbers (None is left out)."""
        from mlflow.entities import Metric, Param  # loaded by start's MlflowClient already

        now = int(time.time() * 1000)
        numbers = {
            key: float(value)
            for key, value in (metrics or {}).items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(key, value, now, step) for key, value in numbers.items()],
            params=[Param(key, value) for key, value in (params or {}).items()],
        )


@contextlib.contextmanager
def allow_file_store(uri: str):
    """MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is true: set for
    the opening of a ``file:`` store only, and only when the user has not set it."""
    if not uri.startswith("file:") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


def _params(config: Config) -> dict[str, str]:
    """The config's settings as MLflow parameters (text; the choices' records left out)."""
    values = dataclasses.asdict(config)
    return {key: str(value) for key, value in values.items() if key not in _RECORDS}


def _safe_name(text: str) -> str:
    return _NAME_UNSAFE.sub("_", text)


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None

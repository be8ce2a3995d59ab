"""`--config FILE` (train, cv, tune) and run tracking: the `Tracker` seam and `--mlflow`, logged
to a local MLflow file store and read back with MlflowClient."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest

from headstart import Config, UsageError
from headstart.cli import _config_of, build_parser, main
from headstart.config import read_config_file
from headstart.tracking import Tracker, resolve_mlflow_uri

TINY = dict(backbone="tiny_test", weights="none", image_size=32, batch_size=8, runtime="keras")
RECORDS = ("augment_scores", "feature_norm_scores", "fine_tune_lr_scores", "choice_noise")


def _config(argv: list[str]) -> Config:
    args = build_parser().parse_args(argv)
    return _config_of(args, **({"fine_tune": False} if args.verb == "cv" else {}))


# ------------------------------------------------------------------------------ --config


def test_without_config_the_defaults_are_configs():
    assert _config(["train", "DATA"]) == Config(data="DATA")
    assert _config(["cv", "DATA"]) == Config(data="DATA", fine_tune=False)  # cv's own default


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_values_and_given_flags_override_them(tmp_path, suffix):
    """A flag given on the command line wins even when it repeats the default (--batch-size
    32): given is told apart from default by argparse.SUPPRESS, not by comparing values."""
    if suffix == ".yaml":
        pytest.importorskip("yaml")
        text = "data: D\nbatch_size: 8\nlr: 1e-3\nfine-tune-lr: 1e-5\nepochs: 4\nfine_tune: false\n"
    else:
        text = json.dumps(
            {"data": "D", "batch_size": 8, "lr": 0.001, "fine-tune-lr": 1e-5, "epochs": 4}
        )
        text = text[:-1] + ', "fine_tune": false}'
    path = tmp_path / f"settings{suffix}"
    path.write_text(text)
    config = _config(["train", "--config", str(path)])
    assert (config.data, config.batch_size, config.lr, config.epochs) == ("D", 8, 1e-3, 4)
    assert config.fine_tune_lr == 1e-5 and config.fine_tune is False  # YAML's "1e-5" text too
    config = _config(["train", "OTHER", "--config", str(path), "--batch-size", "32", "--lr", "1"])
    assert (config.data, config.batch_size, config.lr, config.epochs) == ("OTHER", 32, 1.0, 4)
    # cv's own default (head only) is under the file: the file's fine_tune wins
    path.write_text('{"data": "D", "fine_tune": true}')
    assert _config(["cv", "--config", str(path)]).fine_tune is True
    assert _config(["cv", "D"]).fine_tune is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"data": "D", "epoch": 3}', "unknown key 'epoch' (did you mean epochs?)"),
        ('{"data": "D", "epochs": "three"}', "epochs must be an integer, not 'three'"),
        ('{"data": "D", "mode": "fast"}', "mode must be 'extract' or 'frozen', not 'fast'"),
        ("[1, 2]", "must be a mapping of settings (key: value), not a list"),
        ("{data: D", "not valid JSON"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_key_and_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"--config {path}: {message}" in error


def test_config_file_errors_without_pyyaml_or_data(tmp_path, monkeypatch, capsys):
    path = tmp_path / "settings.yml"
    path.write_text("epochs: 3\n")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "yaml" else find_spec(name)
    )
    with pytest.raises(UsageError, match=r"reading YAML needs PyYAML: pip install pyyaml"):
        read_config_file(path)
    (tmp_path / "empty.json").write_text("")
    assert main(["train", "--config", str(tmp_path / "empty.json")]) == 2
    assert (
        "train needs DATA (a folder of class folders, or a CSV labels file), or a --config file "
        "with data" in capsys.readouterr().err
    )
    assert main(["train", "--mlflow", "DATA"]) == 2  # nargs="?": --mlflow took DATA
    assert "put DATA before --mlflow" in capsys.readouterr().err
    with pytest.raises(UsageError, match="give a .yaml, .yml or .json file"):
        read_config_file(tmp_path / "settings.toml")


def test_resume_refuses_config_and_other_options(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--config", "x.json", "--lr", "1"]) == 2
    assert "drop --config, --lr" in capsys.readouterr().err


# ------------------------------------------------------------------------------- --mlflow


def test_mlflow_uris_and_the_missing_package(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_mlflow_uri("default") == (tmp_path / "mlruns").as_uri()
    assert resolve_mlflow_uri("file:store") == (tmp_path / "store").as_uri()
    assert resolve_mlflow_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert resolve_mlflow_uri("sqlite:///m.db") == "sqlite:///m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_mlflow_uri("default") == "sqlite:///env.db"
    assert _config(["train", "D", "--mlflow"]).mlflow == "default"
    assert _config(["train", "D", "--mlflow", "runs/ml"]).mlflow == "runs/ml"
    assert _config(["train", "D"]).mlflow is None
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name)
    )
    assert main(["train", "D", "--mlflow"]) == 2
    error = capsys.readouterr().err
    assert error == 'headstart: error: --mlflow needs MLflow: pip install "headstart[mlflow]"\n'


class Recorder(Tracker):
    """A user's tracker: keeps what it is told."""

    def __init__(self):
        self.events = []

    def start(self, config):
        self.events.append(("start", config.out))

    def epoch(self, row):
        self.events.append(("epoch", row))

    def trial(self, choice, candidate, score):
        self.events.append(("trial", (choice, candidate, score)))

    def end(self, config, metrics, paths):
        self.events.append(("end", (config, metrics, [p.name for p in paths])))


@pytest.fixture(scope="module")
def tracked(tiny_folder, tmp_path_factory):
    """The default recipe (its three choices on validation) on tiny_test, logged to a local
    MLflow file store and to a `Recorder`."""
    pytest.importorskip("mlflow")
    from headstart import train

    tmp = tmp_path_factory.mktemp("tracked")
    recorder = Recorder()
    config = Config(
        data=str(tiny_folder),
        out=str(tmp / "run"),
        epochs=3,
        fine_tune_epochs=2,
        quiet=True,
        mlflow=str(tmp / "mlruns"),
        **TINY,
    )
    result = train(config, tracker=recorder)
    return result, recorder, tmp


def _client(uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store: read back
    return MlflowClient(uri)


def _history(run) -> list[dict]:
    with (run / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_mlflow_gets_params_every_epoch_each_trial_the_test_metrics_and_files(tracked, monkeypatch):
    result, _, tmp = tracked
    config, metrics, run = result.config, result.metrics, result.run_dir
    assert config.mlflow == (tmp / "mlruns").as_uri()  # config.json says where it went
    record = json.loads((run / "mlflow.json").read_text())
    client = _client(config.mlflow, monkeypatch)
    logged = client.get_run(record["run_id"])
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    params = logged.data.params
    assert (params["epochs"], params["backbone"], params["augment"]) == ("3", "tiny_test", "auto")
    assert params["chosen.augment"] == config.augment  # the choices made, beside the request
    assert params["chosen.feature_norm"] == config.feature_norm
    assert not any(key.endswith("_scores") for key in params)
    history = _history(run)
    for key in ("loss", "val_loss", "val_accuracy"):
        values = client.get_metric_history(record["run_id"], key)
        rows = [r for r in history if r[key]]  # the refit's (the default) have no val_ figures
        assert [m.step for m in values] == [int(r["epoch"]) for r in rows]  # the global epoch
        assert [m.value for m in values] == pytest.approx([float(r[key]) for r in rows])
    assert len(client.get_metric_history(record["run_id"], "loss")) == len(history)
    choosing = {r["stage"] for r in history} - {"refit_head", "refit_fine_tune"}
    assert choosing == {"head", "fine_tune"} or metrics["fine_tune_lr"] is None
    for choice in ("feature_norm", "augment", "fine_tune_lr"):
        scores = getattr(config, f"{choice}_scores")
        assert scores, choice
        for candidate, score in scores.items():
            key = f"trial/{choice}/{candidate}/epochs"
            assert logged.data.metrics[key] == (score["epochs"] or 0)
            if score["val_accuracy"] is not None:
                assert logged.data.metrics[f"trial/{choice}/{candidate}/val_accuracy"] == (
                    pytest.approx(score["val_accuracy"])
                )
    assert logged.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert logged.data.metrics["test_loss"] == pytest.approx(metrics["loss"])
    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"report.html", "model.keras", "metrics.json", "config.json"} <= artifacts


@pytest.mark.slow
def test_a_tracker_sees_every_epoch_and_trial(tracked):
    result, recorder, _ = tracked
    kinds = [kind for kind, _ in recorder.events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    epochs = [row for kind, row in recorder.events if kind == "epoch"]
    assert [row["epoch"] for row in epochs] == list(range(len(_history(result.run_dir))))
    trials = {(c, k): s for kind, (c, k, s) in (e for e in recorder.events if e[0] == "trial")}
    config = result.config
    assert trials == {
        (choice, candidate): score
        for choice in ("feature_norm", "augment", "fine_tune_lr")
        for candidate, score in getattr(config, f"{choice}_scores").items()
    }
    final, metrics, names = recorder.events[-1][1]
    assert final == config and metrics == result.metrics
    assert {"report.html", "model.keras", "metrics.json", "config.json"} <= set(names)


@pytest.mark.slow
def test_a_runs_config_json_as_config_trains_that_run_again(tracked, monkeypatch, capsys):
    """Its settings, choices included (no candidate is trained again): the same saved model and
    test metrics; config.json differs only in the folder and the choices' records."""
    result, _, tmp = tracked
    run, again = result.run_dir, tmp / "again"
    argv = ["train", "--config", str(run / "config.json"), "--out", str(again), "--quiet"]
    assert main(argv) == 0
    first = json.loads((run / "config.json").read_text())
    second = json.loads((again / "config.json").read_text())
    differ = {key for key in first if first[key] != second[key]}
    assert differ <= {"out", *RECORDS} and "out" in differ
    assert all(second[key] == {} for key in RECORDS)
    metrics = json.loads((again / "metrics.json").read_text())
    same = ("accuracy", "loss", "macro_f1", "augment", "feature_norm", "refit_epochs")
    for key in (*same, "validation_choosing_phase"):  # the default refits: no saved_from
        assert metrics[key] == result.metrics[key], key
    # the file's mlflow went on: a second MLflow run in the same experiment
    client = _client(first["mlflow"], monkeypatch)
    experiment = client.get_experiment_by_name("headstart")
    assert len(client.search_runs([experiment.experiment_id])) == 2


@pytest.mark.slow  # importing MLflow: 2-5 s
def test_mlflow_run_goes_on_after_a_resume_and_records_a_ctrl_c(tmp_path, monkeypatch):
    """No training: the tracker alone, as a run killed by Ctrl-C and resumed would drive it."""
    pytest.importorskip("mlflow")
    from headstart.tracking import MlflowTracker

    run = tmp_path / "run"
    run.mkdir()
    config = Config(data="D", out=str(run), mlflow=str(tmp_path / "mlruns"))
    first = MlflowTracker(config.mlflow)
    first.start(config)
    first.epoch({"epoch": 0, "stage": "head", "loss": 0.9, "val_loss": 1.0})
    first.trial("augment", "flip,rotate=0.1", {"val_accuracy": 0.5, "val_loss": 1.0, "epochs": 2})
    first.fail(KeyboardInterrupt())
    client = _client(first.uri, monkeypatch)
    assert client.get_run(first.run_id).info.status == "KILLED"
    again = MlflowTracker(config.mlflow)
    again.start(config)  # resumed: the same MLflow run, named in the run folder's mlflow.json
    assert again.run_id == first.run_id
    again.epoch({"epoch": 1, "stage": "head", "loss": 0.8, "val_loss": 0.7})
    (run / "metrics.json").write_text("{}")
    again.end(config, {"accuracy": 0.75, "train_seconds": 3.0}, [run / "metrics.json"])
    logged = client.get_run(first.run_id)
    assert logged.info.status == "FINISHED"
    history = client.get_metric_history(first.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.7)]
    metrics = logged.data.metrics
    assert metrics["trial/augment/flip_rotate_0.1/val_accuracy"] == 0.5  # MLflow-safe name
    assert (metrics["test_accuracy"], metrics["train_seconds"]) == (0.75, 3.0)
    assert [a.path for a in client.list_artifacts(first.run_id)] == ["metrics.json"]


def test_a_custom_head_runs_config_needs_its_head_builder():
    from headstart import train

    with pytest.raises(UsageError, match=r"custom_head my\.head: that run's head is Python code"):
        train(Config(data="D", custom_head="my.head"))

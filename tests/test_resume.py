"""`headstart train --resume RUN`: a run killed at any moment continues to the same result."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from headstart import Config, UsageError, train
from headstart.cli import main
from headstart.training import recipe, resume
from headstart.training.state import RESUME_FILE, TrainingState, read_state, write_state

# Both stages long enough that a kill lands inside the stage it aims at (an epoch here takes
# ~0.1 s); patience never ends a stage early, so both runs do every epoch.
EPOCHS = 12
OPTIONS = (
    *("--backbone", "tiny_test", "--weights", "none", "--image-size", "32"),  # tests/conftest.py
    *("--epochs", str(EPOCHS), "--fine-tune-epochs", str(EPOCHS), "--patience", "100"),
    *("--batch-size", "8", "--views", "2"),
    *("--fine-tune-lr", "1e-4"),  # fixed: "auto" would skip a stage 2 that cannot beat 100%
    # fixed: with "auto" stage 1 repeats the chosen trial by replaying it, no epoch to kill
    # (`test_killed_while_a_stage_replays_its_trial_resumes_to_the_uninterrupted_result`)
    *("--augment", "none"),
    "--no-report",  # a resumed run's report: test_distributed's resumed run
)
# the processes see this tree and, through its sitecustomize, the suite's tiny backbones
_TESTS = Path(__file__).resolve().parent
_PYTHONPATH = os.pathsep.join(
    [str(_TESTS.parent / "src"), str(_TESTS / "subprocess_site")]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
# Resumed and uninterrupted runs do the same float32 arithmetic in the same order; the
# tolerance only allows for a different thread interleaving in TensorFlow's CPU kernels.
TOLERANCE = 1e-5


def _assert_ends_as(run, reference) -> list[dict]:
    """The resumed ``run`` ended as the uninterrupted ``reference``: every epoch's figures
    (the refit's have no validation figures) and the test probabilities within TOLERANCE.
    Returns ``run``'s history rows."""
    expected, got = _history(reference), _history(run)
    assert [r["stage"] for r in got] == [r["stage"] for r in expected]
    for column in ("loss", "val_loss", "accuracy", "val_accuracy", "learning_rate"):
        assert [r[column] == "" for r in got] == [r[column] == "" for r in expected]
        np.testing.assert_allclose(
            [float(r[column]) for r in got if r[column]],
            [float(r[column]) for r in expected if r[column]],
            rtol=TOLERANCE,
            atol=TOLERANCE,
            err_msg=column,
        )
    np.testing.assert_allclose(
        _probabilities(run), _probabilities(reference), rtol=0, atol=TOLERANCE
    )
    return got


def _history(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "history.csv").open()))


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _probabilities(run: Path) -> np.ndarray:
    rows = list(csv.DictReader((run / "predictions.csv").open()))
    columns = list(rows[0])[4:]  # path, true, predicted, confidence, then one per class
    return np.array([[float(row[c]) for c in columns] for row in rows])


def _start(data: Path, run: Path | None, resume_run: Path | None = None) -> subprocess.Popen:
    where = ["--resume", str(resume_run)] if resume_run else [str(data), "--out", str(run)]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "headstart",
            "--quiet",
            "train",
            *where,
            *(OPTIONS if resume_run is None else ()),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": _PYTHONPATH},
    )


def _kill_during(process: subprocess.Popen, run: Path, stage: str, after_rows: int) -> None:
    """SIGKILL (no clean-up possible) once history.csv shows ``after_rows`` epochs of ``stage``."""
    deadline = time.monotonic() + 240
    try:
        while True:
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, f"{stage} did not reach epoch {after_rows}"
            try:
                rows = [r for r in _history(run) if r["stage"] == stage]
            except (OSError, KeyError):
                rows = []
            if len(rows) >= after_rows:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.slow
def test_killed_in_stage_1_in_stage_2_and_in_the_refit_resumes_to_the_uninterrupted_result(
    tiny_folder, tmp_path
):
    reference = tmp_path / "reference"
    assert main(["--quiet", "train", str(tiny_folder), "--out", str(reference), *OPTIONS]) == 0

    run = tmp_path / "run"
    _kill_during(_start(tiny_folder, run), run, "head", after_rows=3)
    state = read_state(run)
    assert state.stage == "head" and 2 <= state.next_epoch < EPOCHS  # killed mid-epoch 3 or 4
    assert not (run / "metrics.json").exists()

    _kill_during(_start(tiny_folder, None, resume_run=run), run, "fine_tune", after_rows=3)
    state = read_state(run)
    assert state.stage == "fine_tune" and 2 <= state.next_epoch < EPOCHS
    assert state.optimizer, "the optimizer's moments are saved mid-stage"

    # the refit (the default): stage 1 again on train + validation, for the chosen epochs
    refit_rows = [r for r in _history(reference) if r["stage"] == "refit_head"]
    assert len(refit_rows) >= 4  # so that the kill lands inside it
    _kill_during(_start(tiny_folder, None, resume_run=run), run, "refit_head", after_rows=2)
    state = read_state(run)
    assert state.stage == "refit_head" and 1 <= state.next_epoch < len(refit_rows)
    assert state.plan["head"]["epochs"] == len(refit_rows) and state.optimizer

    result = resume(run)
    assert not (run / RESUME_FILE).exists()  # a finished run does not keep it

    got = _assert_ends_as(run, reference)
    assert [r["epoch"] for r in got] == [str(i) for i in range(len(_history(reference)))]
    saved = result.metrics["validation_choosing_phase"]
    expected_saved = _metrics(reference)["validation_choosing_phase"]
    assert (saved["stage"], saved["epoch"]) == (expected_saved["stage"], expected_saved["epoch"])
    assert saved["val_loss"] == pytest.approx(expected_saved["val_loss"], abs=TOLERANCE)
    assert result.metrics["refit_epochs"] == _metrics(reference)["refit_epochs"]
    assert result.metrics["train_seconds"] > 0
    # the times are the resumed launch's: it started in the refit (from Python: no start-up)
    phases = result.metrics["phase_seconds"]
    assert list(phases) == [
        "decode check",
        "build model",
        "extraction clean",  # the cached trunk, read back
        "refit",
        "test",
        "other",
    ]
    assert all(p["computed"] == 0 for p in result.metrics["extraction_passes"])  # cache hits
    assert sum(phases.values()) == pytest.approx(result.metrics["total_seconds"], rel=0.01)
    assert "start-up" in _metrics(reference)["phase_seconds"]  # trained by the command line


@pytest.mark.slow
def test_killed_while_a_stage_replays_its_trial_resumes_to_the_uninterrupted_result(
    tiny_folder, tmp_path, monkeypatch
):
    """A stage that repeats its chosen trial replays it (`Session.fit`): the model holds only
    the trial's best weights, so the training state is written at the stage's last epoch only.
    A kill while the replay writes history.csv leaves the state before the stage or after it,
    never one that continues from the wrong weights; the resumed run ends as an uninterrupted
    one."""
    options = [*OPTIONS[: OPTIONS.index("--epochs")], "--epochs", "6", "--fine-tune-epochs", "2"]
    options += ["--batch-size", "8", "--views", "1", "--fine-tune-lr", "1e-4", "--augment", "auto"]
    reference = tmp_path / "reference"
    assert main(["--quiet", "train", str(tiny_folder), "--out", str(reference), *options]) == 0
    head = [r for r in _history(reference) if r["stage"] == "head"]

    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "headstart", "--quiet", "train", str(tiny_folder)]
        + ["--out", str(run), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": _PYTHONPATH},
    )
    _kill_during(process, run, "head", after_rows=1)
    state = read_state(run)
    assert (state.stage, state.next_epoch) in (("head", 0), ("head", len(head)), ("fine_tune", 0))
    if state.stage == "head" and state.next_epoch == 0:
        assert state.variables == {}  # before the stage: it runs again from the start

    kept = []  # where the resumed run keeps its compiled programs (JAX: `.xla/` there)
    monkeypatch.setattr(recipe, "use_compilation_cache", lambda *args: kept.append(args))
    resume(run)
    _assert_ends_as(run, reference)
    assert kept == [(None, keras.backend.backend())]  # the default cache, as trained


def test_resume_refuses_what_it_cannot_continue(tiny_run, tmp_path, capsys):
    with pytest.raises(UsageError, match="the run is complete, there is nothing to resume"):
        resume(tiny_run)
    with pytest.raises(UsageError, match="not a headstart run folder"):
        resume(tmp_path)
    assert main(["train", "--resume", str(tiny_run), "--epochs", "3"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"headstart: error: --resume {tiny_run} continues the run with the settings in its "
        f"config.json: drop --epochs"
    )
    assert main(["train"]) == 2
    assert "train needs DATA" in capsys.readouterr().err


@pytest.mark.slow  # a full training run
def test_resume_of_a_run_whose_images_changed_is_refused(image_folder_factory, tmp_path):
    data = image_folder_factory(tmp_path / "data", per_class=10)
    run = tmp_path / "run"
    config = Config(
        data=str(data),
        out=str(run),
        backbone="scratch_cnn",
        image_size=32,
        epochs=1,
        batch_size=8,
        augment="none",
        quiet=True,
        head="flatten",
    )
    train(config)
    write_state(run, TrainingState("head", next_epoch=0))  # as if killed after the set-up
    next(data.glob("cat/*.png")).unlink()
    with pytest.raises(UsageError, match="are not those the run started with"):
        resume(run)


def test_damaged_state_file_is_a_clear_error(tmp_path):
    (tmp_path / RESUME_FILE).write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(UsageError, match=f"{RESUME_FILE} is damaged"):
        read_state(tmp_path)


def test_state_round_trip(tmp_path):
    state = TrainingState(
        "fine_tune",
        next_epoch=4,
        variables={3: np.arange(6, dtype="float32").reshape(2, 3), 7: np.array([1, 2], "uint32")},
        optimizer=[np.array(5, "int64"), np.ones(3, "float32")],
        best_values={3: np.zeros((2, 3), "float32")},
        callbacks={"checkpoint": {"best": 0.5, "stage": "head", "epoch": 2}, "history": []},
        train_seconds=12.5,
    )
    write_state(tmp_path, state)
    again = read_state(tmp_path)
    assert (again.stage, again.next_epoch, again.train_seconds) == ("fine_tune", 4, 12.5)
    assert again.callbacks == state.callbacks
    assert sorted(again.variables) == [3, 7] and again.variables[7].dtype == np.uint32
    np.testing.assert_array_equal(again.variables[3], state.variables[3])
    assert [a.tolist() for a in again.optimizer] == [5, [1.0, 1.0, 1.0]]

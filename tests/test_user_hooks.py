"""train(callbacks=..., head_builder=...) from Python, and the two runnable examples."""

import csv
import importlib.util
import json
from pathlib import Path

import keras
import numpy as np
import pytest

from headstart import Config, runs, train
from headstart.backbones import build_backbone, get_backbone
from headstart.errors import UsageError
from headstart.model import build_model
from headstart.training import resume
from headstart.training.state import TrainingState, write_state

pytestmark = pytest.mark.slow  # end-to-end training runs of several seconds each

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _history(run: Path) -> list[tuple[str, int]]:
    """(stage, 1-based epoch within the stage) of every row of history.csv."""
    with (run / runs.HISTORY_FILE).open(newline="") as handle:
        stages = [row["stage"] for row in csv.DictReader(handle)]
    return [(stage, stages[: i + 1].count(stage)) for i, stage in enumerate(stages)]


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append((self.model.name, epoch, "val_loss" in logs))


def test_callbacks_see_every_epoch_of_both_stages_not_the_trials(tiny_folder, tmp_path):
    """One call per epoch in history.csv, in both stages and in the refit (the default, with
    no validation logs); the candidate trials (three fine-tuning rates here) would add more."""
    recorder = _Recorder()
    config = Config(
        data=str(tiny_folder),
        out=str(tmp_path / "run"),
        backbone="tiny_test",  # tests/conftest.py registers it: tiny, pretrained-style
        weights="none",
        image_size=32,
        epochs=2,
        fine_tune_epochs=2,
        fine_tune_lr=1e-3,
        augment="none",
        batch_size=8,
        check=False,
        report=False,
        quiet=True,
    )
    result = train(config, callbacks=[recorder])
    history = _history(result.run_dir)
    assert history[:4] == [("head", 1), ("head", 2), ("fine_tune", 1), ("fine_tune", 2)]
    refit = history[4:]
    assert refit[0] == ("refit_head", 1)
    assert {stage for stage, _ in refit} <= {"refit_head", "refit_fine_tune"}
    assert len(recorder.epochs) == len(history)
    assert [has_val for _, _, has_val in recorder.epochs] == [True] * 4 + [False] * len(refit)
    assert recorder.epochs[0][0] == "classifier"  # stage 1 fits the head on cached features


def test_activation_callback_example(tiny_folder, tmp_path):
    """Seed 004's callback saves every top-level layer's output on the same validation images
    after every epoch of every stage: the features stay put while the head trains."""
    module = _example("save_activations")
    run = module.main(
        [str(tiny_folder), "--out", str(tmp_path / "run"), "--backbone", "tiny_test"]
        + ["--weights", "none", "--image-size", "32", "--epochs", "2", "--images", "3"]
    )
    folder = run / "activations"
    model = runs.load_model(run, 2)
    layers = [layer.name for layer in model.layers[1:]]
    expected = {f"{s}_epoch{e:03d}_{name}.npy" for s, e in _history(run) for name in layers}
    assert {p.name for p in folder.iterdir()} == expected
    features = [np.load(folder / f"head_epoch{e:03d}_features.npy") for e in (1, 2)]
    logits = [np.load(folder / f"head_epoch{e:03d}_classifier.npy") for e in (1, 2)]
    assert features[0].shape == (3, 32) and logits[0].shape == (3, 1)  # tiny_test: 32 channels
    np.testing.assert_allclose(features[0], features[1], atol=1e-5)  # frozen backbone
    assert not np.allclose(logits[0], logits[1])  # the head learned


def test_residual_head_example(tiny_folder, tmp_path):
    module = _example("residual_head")
    run = module.main(
        [str(tiny_folder), "--out", str(tmp_path / "run"), "--backbone", "scratch_cnn"]
        + ["--image-size", "32", "--epochs", "2"]
    )
    config = json.loads((run / runs.CONFIG_FILE).read_text())
    assert config["custom_head"] == "residual_head.residual_head"
    head = runs.load_model(run, 2).get_layer("classifier")
    assert [layer.name for layer in head.layers] == [
        "pooled_features",
        "project",
        "block",
        "residual",
        "dropout",
        "logits",
    ]
    assert isinstance(head.get_layer("residual"), keras.layers.Add)
    # an interrupted run with a custom head cannot rebuild it from config.json alone
    write_state(run, TrainingState("fine_tune"))
    with pytest.raises(UsageError, match=r"custom head \(residual_head.residual_head\)"):
        resume(run)


def test_head_builder_must_return_one_logit_per_class():
    spec = get_backbone("scratch_cnn")
    base = build_backbone(spec, 32, "none")

    def too_wide(features, n_classes):
        return keras.layers.Dense(n_classes)(features)  # 2 units, but 2 classes take 1 logit

    with pytest.raises(UsageError, match=r"too_wide returned \(None, 2\).*\(None, 1\)"):
        build_model(spec, base, 2, head_builder=too_wide)
    model = build_model(spec, base, 3, head_builder=too_wide)
    assert model.output_shape == (None, 3)

"""Test-time augmentation: fixed views, averaged probabilities; one view is plain prediction."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from headstart.cli import main
from headstart.deploy.predict import predict
from headstart.errors import UsageError
from headstart.evaluation import evaluate, predict_split
from headstart.splits import load_image_folder
from headstart.tta import MAX_VIEWS, augmented_views, check_views, describe, tta_probabilities


def test_views_are_fixed_and_keep_the_shape():
    images = np.random.default_rng(0).integers(0, 256, (2, 20, 30, 3)).astype("float32")
    views = augmented_views(images, MAX_VIEWS)
    assert len(views) == MAX_VIEWS and all(v.shape == images.shape for v in views)
    np.testing.assert_array_equal(views[0], images)
    np.testing.assert_array_equal(views[1], images[:, :, ::-1])  # horizontal mirror
    assert not np.array_equal(views[2], images)  # a 90% centre crop, resized back
    for a, b in zip(views, augmented_views(images, MAX_VIEWS), strict=True):
        np.testing.assert_array_equal(a, b)  # deterministic
    assert describe(3) == ["original", "flip", "crop centre"]


@pytest.mark.parametrize("views", [0, MAX_VIEWS + 1, True, 2.0])
def test_bad_view_counts_are_usage_errors(views):
    with pytest.raises(UsageError, match="--tta must be an integer from 1"):
        check_views(views)


def test_one_view_is_one_plain_call_and_more_views_average():
    calls = []

    def probabilities_of(batch):
        calls.append(batch.copy())
        logits = batch.mean(axis=(1, 2))  # (B, 3): depends on where the pixels are
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    images = np.random.default_rng(1).uniform(0, 3, (4, 16, 16, 3)).astype("float32")
    plain = tta_probabilities(probabilities_of, images, 1)
    assert len(calls) == 1
    np.testing.assert_array_equal(plain, probabilities_of(images))
    averaged = tta_probabilities(probabilities_of, images, 4)
    expected = np.mean([probabilities_of(v) for v in augmented_views(images, 4)], axis=0)
    np.testing.assert_allclose(averaged, expected, rtol=1e-12)
    assert averaged.shape == plain.shape


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory):
    """evaluate writes evaluation.json: work on a copy of the shared run."""
    copy = tmp_path_factory.mktemp("tta") / "run"
    shutil.copytree(tiny_run, copy)
    return copy


@pytest.mark.slow  # a full training run
def test_tta_on_a_saved_model(run_copy, tiny_folder):
    from headstart import runs

    model = runs.load_model(run_copy, 2)
    split = load_image_folder(str(tiny_folder)).train
    plain = predict_split(model, split)
    np.testing.assert_array_equal(predict_split(model, split, tta=1), plain)
    augmented = predict_split(model, split, tta=5)
    assert augmented.shape == plain.shape and not np.allclose(augmented, plain)
    np.testing.assert_allclose(augmented.sum(axis=1), 1.0, rtol=1e-6)

    files = list(split.paths[:5])
    default = predict(run_copy, files, top_k=2)
    assert predict(run_copy, files, top_k=2, tta=1) == default
    with_tta = predict(run_copy, files, top_k=2, tta=3)
    assert [p.path for p in with_tta] == files and all(len(p.top) == 2 for p in with_tta)
    assert [p.top for p in with_tta] != [p.top for p in default]


@pytest.mark.slow  # a full training run
def test_evaluate_reports_the_effect_of_tta(run_copy, tiny_folder):
    plain = evaluate(run_copy, tiny_folder)
    assert "tta" not in plain
    metrics = evaluate(run_copy, tiny_folder, tta=3)
    tta = metrics["tta"]
    assert tta["views"] == 3 and tta["transforms"] == describe(3)
    assert tta["accuracy_without"] == plain["accuracy"]
    assert tta["accuracy_change"] == pytest.approx(metrics["accuracy"] - plain["accuracy"])
    low, high = tta["accuracy_change_ci95"]
    assert low <= tta["accuracy_change"] <= high
    assert json.loads((run_copy / "evaluation.json").read_text())["tta"] == tta


def test_cli_tta(run_copy, tiny_folder, capsys):
    image = str(next(tiny_folder.glob("cat/*.png")))
    assert main(["predict", str(run_copy), image, "--tta", "2"]) == 0
    assert image in capsys.readouterr().out
    assert main(["predict", str(run_copy), image, "--tta", "0"]) == 2
    assert "--tta must be an integer" in capsys.readouterr().err
    assert main(["evaluate", str(run_copy), str(tiny_folder), "--tta", "2"]) == 0
    out = capsys.readouterr().out
    assert "test-time augmentation (2 views)" in out and "95% bootstrap intervals" in out

"""headstart cv: stratified folds, one train run per fold, the backbone run once for all."""

from __future__ import annotations

import importlib
import json
from collections import Counter

import numpy as np
import pytest

from headstart.cli import main
from headstart.errors import UsageError
from headstart.splits import fold_folder, fold_of, load_image_folder

pytestmark = pytest.mark.slow  # end-to-end training runs of several seconds each


@pytest.fixture(scope="module")
def three_classes(image_folder_factory, tmp_path_factory):
    return image_folder_factory(
        tmp_path_factory.mktemp("cv") / "data", classes=("a", "b", "c"), per_class=10
    )


def test_folds_are_stratified_disjoint_and_seeded(three_classes):
    folder = load_image_folder(str(three_classes), val_split=0.0, test_split=0.0)
    where = fold_of(folder, 4, seed=0)
    assert sorted(where) == sorted(folder.train.paths)  # every image in exactly one fold
    sizes = Counter(where.values())
    assert sorted(sizes) == [0, 1, 2, 3] and max(sizes.values()) - min(sizes.values()) <= 1
    for label in range(3):  # each class is dealt evenly: 10 images -> 3, 3, 2, 2
        per_fold = Counter(
            where[p]
            for p, y in zip(folder.train.paths, folder.train.labels, strict=True)
            if y == label
        )
        assert sorted(per_fold.values()) == [2, 2, 3, 3]
    assert fold_of(folder, 4, seed=0) == where
    assert fold_of(folder, 4, seed=1) != where
    tests = []
    for fold in range(4):
        part = fold_folder(folder, where, fold, val_split=0.2, seed=0)
        assert set(part.test.paths) == {p for p, f in where.items() if f == fold}
        splits = [set(part.train.paths), set(part.val.paths), set(part.test.paths)]
        assert sum(map(len, splits)) == 30 and len(set.union(*splits)) == 30
        assert set(part.val.labels) == {0, 1, 2}  # validation is stratified too
        tests.extend(part.test.paths)
    assert sorted(tests) == sorted(folder.train.paths)  # every image tested exactly once


def test_too_few_images_for_the_folds_is_a_usage_error(three_classes):
    folder = load_image_folder(str(three_classes), val_split=0.0, test_split=0.0)
    with pytest.raises(UsageError, match="--folds 11 needs at least 11 per class"):
        fold_of(folder, 11, seed=0)


def test_cv_trains_one_run_per_fold_on_features_extracted_once(
    tiny_folder, tmp_path, monkeypatch, capsys
):
    train_module = importlib.import_module("headstart.training.views")
    extracted = []
    real = train_module.extract_batches
    monkeypatch.setattr(
        train_module,
        "extract_batches",
        lambda extractor, paths, *a, **k: (
            extracted.extend(paths) or real(extractor, paths, *a, **k)
        ),
    )
    out = tmp_path / "cv"
    argv = ["--quiet", "cv", str(tiny_folder), "--folds", "3", "--out", str(out)]
    argv += ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32"]
    argv += ["--epochs", "2", "--augment", "none"]
    argv += ["--batch-size", "8", "--no-check", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    # 40 images, each a training or validation image in two of the three folds: the backbone
    # extracted each one once, and the other fold read it from the feature cache
    assert len(extracted) == 40 and len(set(extracted)) == 40
    summary = json.loads((out / "cv.json").read_text())
    rows = summary["per_fold"]
    assert [r["fold"] for r in rows] == [1, 2, 3] and sum(r["n_test"] for r in rows) == 40
    assert summary["fine_tune"] is False
    for row in rows:
        metrics = json.loads((out / f"fold{row['fold']}" / "metrics.json").read_text())
        assert row["accuracy"] == metrics["accuracy"] and row["macro_f1"] == metrics["macro_f1"]
        assert "fine_tune_kept" not in metrics  # head only
    accuracies = [r["accuracy"] for r in rows]
    assert summary["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert summary["std"]["accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
    tested = [
        path
        for row in rows
        for path, _ in json.loads((out / f"fold{row['fold']}" / "split.json").read_text())["test"]
    ]
    assert len(set(tested)) == 40  # every image tested once
    printed = capsys.readouterr().out
    assert "3-fold cross-validation: accuracy" in printed and "±" in printed


def test_cv_refuses_test_split_and_split_from(tiny_folder, tmp_path, capsys):
    assert main(["cv", str(tiny_folder), "--test-split", "0.2", "--out", str(tmp_path / "a")]) == 2
    assert "--test-split does not apply" in capsys.readouterr().err
    assert main(["cv", str(tiny_folder), "--split-from", "x", "--out", str(tmp_path / "b")]) == 2
    assert "drop --split-from" in capsys.readouterr().err
    assert main(["cv", str(tiny_folder), "--folds", "1", "--out", str(tmp_path / "c")]) == 2
    assert "--folds must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # refused up front


def test_a_ctrl_c_during_cv_names_the_finished_folds():
    import argparse

    from headstart.cli import _interrupted

    message = _interrupted(argparse.Namespace(verb="cv", out="runs/cv"))
    assert "complete run in runs/cv" in message and "new --out" in message

"""Multi-label classification from a CSV file whose label cells hold sets (``cat;outdoor``):
reading and splitting, the metrics (checked against scikit-learn), the thresholds, and one
trained run through train, evaluate, predict, report, serve and export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from headstart.cli import main
from headstart.compare import compare
from headstart.data import write_skipped
from headstart.errors import UsageError
from headstart.metrics import average_precision, best_threshold, multi_label_metrics
from headstart.splits import (
    SPLITS,
    load_image_folder,
    load_split_manifest,
    write_split_manifest,
)
from headstart.training.choose import best_of

ATTRIBUTES = ("blue_circle", "bright", "red_square", "stripes")  # sorted: labels.json's order


def write_attributes(root: Path, n: int, size: int = 40, seed: int = 0) -> Path:
    """``n`` images, each with 1 to 3 of 4 visual attributes (a red square on the left, a blue
    circle on the right, horizontal stripes, a bright background), every 15th with none; and
    root/labels.csv naming them (``red_square;stripes``, an empty cell for none)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = [["path", "label"]]
    for i in range(n):
        chosen = set() if i % 15 == 14 else set(rng.choice(4, rng.integers(1, 4), replace=False))
        names = [ATTRIBUTES[c] for c in sorted(chosen)]
        pixels = np.full((size, size, 3), rng.integers(190, 235) if 1 in chosen else 45, float)
        if 3 in chosen:
            for y in range(0, size, 6):
                pixels[y : y + 3] = 128
        pixels += rng.normal(0, 8, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw, side = ImageDraw.Draw(image), size // 4
        if 2 in chosen:
            x, y = rng.integers(1, size // 2 - side), rng.integers(1, size - side - 1)
            draw.rectangle([x, y, x + side, y + side], fill=(220, 30, 30))
        if 0 in chosen:
            x, y = rng.integers(size // 2, size - side - 1), rng.integers(1, size - side - 1)
            draw.ellipse([x, y, x + side, y + side], fill=(30, 60, 230))
        image.save(root / f"{i:03d}.png")
        rows.append([f"{i:03d}.png", ";".join(rng.permutation(names))])
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return root / "labels.csv"


# ----------------------------------------------------------------------------- metrics


def _random_case(seed: int, n: int = 300, labels: int = 5):
    rng = np.random.default_rng(seed)
    targets = rng.random((n, labels)) < rng.uniform(0.1, 0.6, labels)
    scores = np.round(np.clip(rng.normal(0.3 + 0.35 * targets, 0.25), 0, 1), 2)  # with ties
    return targets, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_scikit_learn(seed):
    from sklearn import metrics as sk  # noqa: PLC0415  (a test-only cross-check)

    targets, scores = _random_case(seed)
    thresholds = np.random.default_rng(seed).uniform(0.3, 0.7, targets.shape[1])
    names = [f"l{i}" for i in range(targets.shape[1])]
    got = multi_label_metrics(targets, scores, names, thresholds)
    predicted = scores >= thresholds
    assert got["map"] == pytest.approx(sk.average_precision_score(targets, scores), abs=1e-12)
    assert got["micro_f1"] == pytest.approx(sk.f1_score(targets, predicted, average="micro"))
    assert got["macro_f1"] == pytest.approx(sk.f1_score(targets, predicted, average="macro"))
    assert got["subset_accuracy"] == pytest.approx(sk.accuracy_score(targets, predicted))
    inside = np.clip(scores, 0.01, 0.99)  # (the two clip 0 and 1 differently)
    loss = multi_label_metrics(targets, inside, names, thresholds)["loss"]
    assert loss == pytest.approx(sk.log_loss(targets.ravel(), inside.ravel()))
    for i, name in enumerate(names):
        row = got["per_class"][name]
        assert row["average_precision"] == pytest.approx(
            sk.average_precision_score(targets[:, i], scores[:, i]), abs=1e-12
        )
        assert row["precision"] == pytest.approx(sk.precision_score(targets[:, i], predicted[:, i]))
        assert row["recall"] == pytest.approx(sk.recall_score(targets[:, i], predicted[:, i]))
        assert row["support"] == int(targets[:, i].sum())
    # the same scores for every image: each label's average precision is its share
    constant = np.tile(targets.mean(axis=0), (len(targets), 1))
    baseline = multi_label_metrics(targets, constant, names, thresholds)
    assert (
        baseline["map"]
        == pytest.approx(got["map_baseline"])
        == pytest.approx(sk.average_precision_score(targets, constant))
    )
    assert average_precision(np.zeros(4, bool), np.arange(4)) is None


def test_threshold_gives_the_best_f1_on_its_images():
    from sklearn.metrics import f1_score  # noqa: PLC0415

    for seed in range(5):
        targets, scores = _random_case(seed, n=120, labels=1)
        threshold, f1 = best_threshold(targets[:, 0], scores[:, 0])
        every = [f1_score(targets[:, 0], scores[:, 0] >= t) for t in np.unique(scores)]
        assert f1 == pytest.approx(max(every))
        assert f1_score(targets[:, 0], scores[:, 0] >= threshold) == pytest.approx(f1)
    assert best_threshold(np.zeros(3, bool), np.array([0.1, 0.5, 0.9])) == (0.5, None)


def test_choices_of_a_multi_label_run_go_by_validation_loss():
    scores = {
        "none": {"val_accuracy": 0.90, "val_loss": 0.40},
        "flip": {"val_accuracy": 0.85, "val_loss": 0.30},
        "more": {"val_accuracy": None, "val_loss": 0.10},  # did not beat stage 1
    }
    assert best_of(scores) == "none" and best_of(scores, by_loss=True) == "flip"


# ----------------------------------------------------------------------------- reading


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_attributes(tmp_path_factory.mktemp("ml") / "small", 30, size=16)


def test_a_cell_with_a_semicolon_makes_the_file_multi_label(small, tmp_path):
    folder = load_image_folder(str(small), seed=1)
    assert folder.multi_label and folder.class_names == ATTRIBUTES
    assert (len(folder.train), len(folder.val), len(folder.test)) == (21, 6, 3)
    rows = dict(csv.reader(small.open()))
    for split in SPLITS:  # each image's set, as its cell says (an empty cell: no label)
        part = getattr(folder, split)
        for path, label, target in zip(part.paths, part.labels, part.targets(), strict=True):
            names = sorted(rows[Path(path).name].split(";")) if rows[Path(path).name] else []
            assert [ATTRIBUTES[i] for i in label] == names
            assert target.tolist() == [float(n in names) for n in ATTRIBUTES]
    assert load_image_folder(str(small), seed=1) == folder  # seeded
    assert load_image_folder(str(small), seed=2).test != folder.test
    # the manifest keeps the sets (split.json, --split-from)
    manifest = write_split_manifest(folder, tmp_path / "split.json")
    assert json.loads(manifest.read_text())["multi_label"] is True
    assert load_split_manifest(manifest) == folder.__class__(
        **{**vars(folder), "layout": "manifest"}
    )


def test_multi_label_can_be_forced_or_refused(small, tmp_path):
    single = tmp_path / "single.csv"
    single.write_text(
        f"path,label\n{small.parent / '000.png'},cat\n{small.parent / '001.png'},"
        f"dog\n{small.parent / '002.png'},\n",
        encoding="utf-8",
    )
    with pytest.raises(UsageError, match="line 4: empty label"):
        load_image_folder(str(single), val_split=0.3, test_split=0.0)
    forced = load_image_folder(str(single), val_split=0.3, test_split=0.0, multi_label=True)
    assert forced.multi_label and forced.class_names == ("cat", "dog")
    assert sorted(forced.train.labels + forced.val.labels) == [(), (0,), (1,)]
    with pytest.raises(UsageError, match="line 16: empty label"):  # image 014 has none
        load_image_folder(str(small), multi_label=False)
    single.write_text(single.read_text().replace(",\n", ",a;b\n"), encoding="utf-8")
    plain = load_image_folder(str(single), val_split=0.0, test_split=0.0, multi_label=False)
    assert not plain.multi_label and plain.class_names == ("a;b", "cat", "dog")
    with pytest.raises(UsageError, match="--multi-label needs a CSV labels file"):
        load_image_folder(str(small.parent), multi_label=True)


def test_a_split_column_is_kept_and_missing_files_are_skipped(small, tmp_path):
    rows = list(csv.reader(small.open()))[1:]
    labels = tmp_path / "split.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for i, (path, cell) in enumerate(rows):
            writer.writerow([small.parent / path, cell, ("train", "val", "test")[i % 3]])
        writer.writerow([tmp_path / "gone.png", "bright", "train"])
    folder = load_image_folder(str(labels))
    for i, split in enumerate(SPLITS):
        assert sorted(getattr(folder, split).paths) == sorted(
            str(small.parent / path) for path, _ in rows[i::3]
        )
    assert folder.skipped == ((str(tmp_path / "gone.png"), "missing file"),)
    write_skipped(folder.skipped, str(tmp_path / "skipped.txt"))


# ----------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One run through the CLI (the label cells' ';' makes it multi-label), cheap: the tiny
    backbone with random weights, 32 px, 120 images, the head alone (on flattened features:
    where the square and the circle are is part of what it sees)."""
    labels = write_attributes(tmp_path_factory.mktemp("ml") / "attributes", 120)
    out = tmp_path_factory.mktemp("runs") / "multi"
    argv = ["--quiet", "train", str(labels), "-o", str(out), "--backbone", "tiny_test"]
    argv += ["--weights", "none", "--image-size", "32", "--epochs", "8", "--lr", "0.05"]
    argv += ["--no-fine-tune", "--augment", "none", "--feature-norm", "none", "--no-check"]
    argv += ["--runtime", "keras", "--batch-size", "16", "--test-split", "0.25"]
    argv += ["--head", "flatten"]
    assert main(argv) == 0
    return out


@pytest.mark.slow
def test_a_multi_label_run_beats_the_constant_baseline(run, capsys):
    """mAP on the held-out test images against a constant model that scores every image with
    each label's share of the training images (scikit-learn computes both)."""
    from sklearn.metrics import average_precision_score, f1_score  # noqa: PLC0415

    config, metrics = (json.loads((run / f).read_text()) for f in ("config.json", "metrics.json"))
    assert config["multi_label"] is True and metrics["multi_label"] is True
    split = json.loads((run / "split.json").read_text())
    names = json.loads((run / "labels.json").read_text())
    assert names == list(ATTRIBUTES) and split["multi_label"] is True

    def matrix(rows):
        return np.array([[name in labels for name in names] for _, labels in rows], float)

    train, test = matrix(split["train"]), matrix(split["test"])
    with open(run / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    probabilities = np.array([[float(row[name]) for name in names] for row in rows])
    model_map = average_precision_score(test, probabilities)
    constant = average_precision_score(test, np.tile(train.mean(axis=0), (len(test), 1)))
    assert metrics["map"] == pytest.approx(model_map) and len(test) == metrics["n_test"] == 30
    assert metrics["map_baseline"] == pytest.approx(constant)
    assert model_map >= constant + 0.25, (model_map, constant)  # measured: 1.000 against 0.575
    # micro-F1 against the best a constant answer can do (every label on every image)
    predicted = np.array([[n in row["predicted"].split(";") for n in names] for row in rows])
    everything = f1_score(test, np.ones_like(test), average="micro")
    assert f1_score(test, predicted, average="micro") >= everything + 0.15
    thresholds = json.loads((run / "thresholds.json").read_text())
    assert set(thresholds["thresholds"]) == set(names)
    assert thresholds["chosen_on"].startswith("validation")
    for row in rows:  # predicted: the labels at or above their thresholds
        called = [n for n in names if float(row[n]) >= thresholds["thresholds"][n]]
        assert row["predicted"].split(";") == called or (not called and not row["predicted"])


@pytest.mark.slow
def test_evaluate_predict_and_report_of_a_multi_label_run(run, capsys):
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert main(["evaluate", str(run), config["data"]]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"mAP {metrics['map']:.4f}") and "threshold" in out
    images = sorted(Path(config["data"]).parent.glob("00[0-2].png"))
    assert main(["predict", str(run), *map(str, images), "--format", "json"]) == 0
    answers = json.loads(capsys.readouterr().out)
    thresholds = json.loads((run / "thresholds.json").read_text())["thresholds"]
    for answer in answers:
        assert len(answer["top"]) == 4  # every label's probability
        assert answer["labels"] == [
            t["label"] for t in answer["top"] if t["probability"] >= thresholds[t["label"]]
        ]
    assert main(["predict", str(run), str(images[0]), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "path,rank,label,probability,predicted,error" and len(lines) == 5
    page = (run / "report.html").read_text()
    assert "mean average precision" in page and "<th>threshold</th>" in page.replace(
        ' class="n"', ""
    )
    assert "not drawn for a multi-label run" in page and not (run / "confusion.png").exists()
    assert main(["calibrate", str(run)]) == 2
    assert "multi-label run: calibrate" in capsys.readouterr().err
    row = compare([run], out=run.parent / "comparison").rows[0]
    assert row["test accuracy"] == f"mAP {metrics['map']:.4f}"  # its headline figure, not "?"


@pytest.mark.slow
def test_serve_and_export_of_a_multi_label_run(run, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient  # noqa: PLC0415

    from headstart import predict  # noqa: PLC0415
    from headstart.deploy.export import export  # noqa: PLC0415
    from headstart.deploy.predictor import load_predictor  # noqa: PLC0415
    from headstart.deploy.serve import create_app  # noqa: PLC0415

    config = json.loads((run / "config.json").read_text())
    image = Path(config["data"]).parent / "001.png"
    expected = predict(run, [str(image)])[0]
    with TestClient(create_app(load_predictor(run))) as client:
        files = {"files": (image.name, image.read_bytes(), "image/png")}
        answer = client.post("/predict", files=files).json()["predictions"][0]
    assert answer["labels"] == list(expected.labels)
    assert [t["label"] for t in answer["top"]] == [label for label, _ in expected.top]
    result = export(run, "openvino", out=tmp_path / "ov")
    assert (result.path / "thresholds.json").is_file() and result.record["check"]["passed"]
    exported = predict(result.path, [str(image)])[0]
    assert exported.labels == expected.labels
    assert np.allclose([p for _, p in exported.top], [p for _, p in expected.top], atol=1e-4)

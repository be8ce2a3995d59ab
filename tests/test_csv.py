"""CSV labels files (``path,label[,split]``): read into the same split as a folder, through
every verb that takes data; a bad file is one line naming the row, a missing image is skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from headstart import Config, evaluate, train
from headstart.cli import main
from headstart.config import Config as ConfigClass
from headstart.data import write_skipped
from headstart.errors import UsageError
from headstart.splits import SPLITS, folder_for, load_image_folder, split_manifest


def _write_csv(path: Path, rows: list[list[str]], header: str = "path,label") -> Path:
    lines = [header] + [",".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _images(folder: Path) -> list[tuple[str, str]]:
    """(path relative to folder, class) of every image of a class-folder layout, sorted."""
    return sorted(
        (f"{cls.name}/{image.name}", cls.name)
        for cls in folder.iterdir()
        if cls.is_dir()
        for image in cls.iterdir()
    )


def _splits(folder) -> dict[str, set[str]]:
    return {name: set(getattr(folder, name).paths) for name in SPLITS}


@pytest.fixture(scope="module")
def csv_data(image_folder_factory, tmp_path_factory) -> Path:
    """data/{cat,dog}/ with 12 images each, and data/labels.csv listing them relatively."""
    root = image_folder_factory(
        tmp_path_factory.mktemp("csv") / "data", per_class=12, size=(24, 24)
    )
    _write_csv(root / "labels.csv", [list(row) for row in _images(root)])
    return root


# ----------------------------------------------------------------------------- reading


def test_without_split_column_the_split_is_the_folders(csv_data, tmp_path):
    """Relative to the CSV's folder, absolute, or relative to --root: the very split (and the
    split.json) that the class folders give, by the same stratified seeded split."""
    by_folder = load_image_folder(str(csv_data), seed=3)
    relative = load_image_folder(str(csv_data / "labels.csv"), seed=3)
    rows = _images(csv_data)
    absolute = _write_csv(tmp_path / "abs.csv", [[str(csv_data / p), c] for p, c in rows])
    elsewhere = _write_csv(tmp_path / "rel.csv", [list(row) for row in rows])
    for folder in (
        relative,
        load_image_folder(str(absolute), seed=3),
        load_image_folder(str(elsewhere), root=str(csv_data), seed=3),
    ):
        assert folder.class_names == ("cat", "dog") and folder.layout == "csv"
        assert _splits(folder) == _splits(by_folder)
        assert folder.train.labels == by_folder.train.labels
        assert not folder.skipped
    assert relative.root == str(csv_data)  # split.json's paths start from the CSV's folder
    assert split_manifest(relative)["train"] == split_manifest(by_folder)["train"]
    assert (len(relative.train), len(relative.val), len(relative.test)) == (18, 4, 2)


def test_split_column_is_honoured_exactly(csv_data, tmp_path):
    """Every row goes where its split cell says (any case, 'validation' for val); the fractions
    and the seed play no part."""
    rows, wanted = [], {name: set() for name in SPLITS}
    spelled = {"train": "Train", "val": "validation", "test": "TEST"}
    for i, (path, label) in enumerate(_images(csv_data)):
        split = ("train", "train", "val", "test", "train")[i % 5]
        rows.append([path, label, spelled[split] if i % 2 else split])
        wanted[split].add(str(csv_data / path))
    labels = _write_csv(csv_data.parent / "split.csv", rows, header="label,split,path")
    # the header's order is free: put the columns back in that order
    labels.write_text(
        "label,split,path\n" + "".join(f"{r[1]},{r[2]},{r[0]}\n" for r in rows), encoding="utf-8"
    )
    for seed, val_split in ((0, 0.2), (7, 0.5)):
        folder = load_image_folder(str(labels), root=str(csv_data), seed=seed, val_split=val_split)
        assert _splits(folder) == wanted
    # no val rows: validation is carved out of train (as for folders with no val/)
    no_val = _write_csv(
        tmp_path / "no_val.csv",
        [r[:2] + ["test" if r[2] == "TEST" else "train"] for r in rows],
        header="path,label,split",
    )
    folder = load_image_folder(str(no_val), root=str(csv_data))
    assert len(folder.val) == 4 and folder.val.labels == (0, 0, 1, 1)


def test_missing_and_unreadable_images_are_skipped_not_fatal(csv_data, tmp_path):
    rows = [list(row) for row in _images(csv_data)]
    (tmp_path / "notes.png").write_text("not an image")
    rows += [["gone/away.png", "cat"], [str(tmp_path / "notes.png"), "dog"]]
    labels = _write_csv(tmp_path / "labels.csv", rows)
    folder = load_image_folder(str(labels), root=str(csv_data))
    assert folder.skipped == (
        (str(csv_data / "gone" / "away.png"), "missing file"),
        (str(tmp_path / "notes.png"), "not an image"),
    )
    assert len(folder.train) + len(folder.val) + len(folder.test) == 24
    write_skipped(folder.skipped, str(tmp_path / "skipped.txt"))
    assert (tmp_path / "skipped.txt").read_text().splitlines()[0].endswith("\tmissing file")


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "is empty: expected a header line path,label"),
        ("\n\n", "is empty"),
        ("path,label\n", "has a header but no rows"),
        ("cat/a.png,cat\n", "line 1: the header must name the columns path and label"),
        ("path,Label,label\nx.png,cat,cat\n", "line 1: the header names column 'label' twice"),
        ("path,label,split\nx.png,cat,training\n", "line 2: split 'training' is not train, val"),
        ("path,label,split\nx.png,cat,\n", "line 2: split '' is not train, val or test"),
        ("path,label\n\nx.png,cat,extra\n", "line 3: 3 cells where the header has 2"),
        ("path,label\nx.png\n", "line 2: 1 cells where the header has 2: fill in"),
        ("path,label\n ,cat\n", "line 2: empty path"),
        ("path,label\nx.png,\n", "line 2: empty label"),
        ("path,label\nx.png,cat\n./x.png,dog\n", "line 3: .*already listed on line 2"),
        ("path,label,split\nx.png,cat,val\n", "no row has split 'train'"),
    ],
)
def test_a_bad_csv_file_is_one_line_naming_the_row(tmp_path, text, match):
    labels = tmp_path / "labels.csv"
    labels.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=match) as error:
        load_image_folder(str(labels))
    assert "\n" not in str(error.value) and str(labels) in str(error.value)


def test_other_usage_errors(csv_data, tmp_path):
    with pytest.raises(UsageError, match="labels file not found"):
        load_image_folder(str(tmp_path / "nope.csv"))
    with pytest.raises(UsageError, match="--root .* folder not found"):
        load_image_folder(str(csv_data / "labels.csv"), root=str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="applies to a CSV labels file"):
        load_image_folder(str(csv_data), root=str(csv_data))
    one = _write_csv(tmp_path / "one.csv", [[p, "cat"] for p, _ in _images(csv_data)])
    with pytest.raises(UsageError, match="found 1 label.*need at least 2: give the images"):
        load_image_folder(str(one), root=str(csv_data))
    bom = tmp_path / "excel.csv"  # Excel writes a byte-order mark
    bom.write_bytes(b"\xef\xbb\xbfpath,label\n" + (csv_data / "labels.csv").read_bytes()[11:])
    assert len(load_image_folder(str(bom), root=str(csv_data)).train) == 18


# ----------------------------------------------------------------------------- verbs


def test_cli_check_on_a_csv_file(csv_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(csv_data)  # the default report, check-labels.json, lands beside the CSV
    assert main(["check", "labels.csv"]) == 0
    report = json.loads((csv_data / "check-labels.json").read_text())
    (csv_data / "check-labels.json").unlink()
    assert report["layout"] == "csv" and report["counts"]["total"] == {"cat": 12, "dog": 12}
    elsewhere = _write_csv(tmp_path / "x.csv", [list(r) for r in _images(csv_data)])
    out = tmp_path / "check.json"
    argv = ["check", "--labels", str(elsewhere), "--root", str(csv_data), "-o", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["counts"]["test"] == {"cat": 1, "dog": 1}
    assert main(["check", str(elsewhere), "-o", str(elsewhere)]) == 2
    assert "is the labels file" in capsys.readouterr().err
    assert main(["check", str(elsewhere), "--labels", str(elsewhere)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["check"]) == 2
    assert "check needs DATA" in capsys.readouterr().err


def test_cv_folds_on_a_csv_file(csv_data, tmp_path, monkeypatch):
    """Each fold is a run on a split manifest of the CSV's images (train is not run here: the
    folds' splits are what it would read)."""
    import headstart.cv

    seen = []

    class Result:
        metrics = dict.fromkeys(headstart.cv.SCORES, 1.0)
        run_dir = tmp_path

    def fake_train(config):
        seen.append(folder_for(config))
        return Result()

    monkeypatch.setattr(headstart.cv, "train", fake_train)
    elsewhere = _write_csv(tmp_path / "x.csv", [list(r) for r in _images(csv_data)])
    config = ConfigClass(data=str(elsewhere), root=str(csv_data), out=str(tmp_path / "cv"))
    headstart.cv.cross_validate(config, folds=3)
    tested = sorted(p for folder in seen for p in folder.test.paths)
    assert len(seen) == 3 and tested == sorted(str(csv_data / p) for p, _ in _images(csv_data))


# ----------------------------------------------------------------------------- training


def _tiny(*extra: str) -> list[str]:
    return [
        "--backbone",
        "tiny_test",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--no-fine-tune",  # the choices on validation still run; stage 2 is the folder's
        "--batch-size",
        "8",
        *extra,
    ]


@pytest.mark.slow
def test_cli_train_on_a_csv_file_then_evaluate_and_resume_split(csv_data, tmp_path, capsys):
    """The default path with a CSV in place of the folder: a missing image is in skipped.txt,
    config.json records the CSV (what --resume reads: it rebuilds the same split.json), and
    evaluate takes the CSV too (--labels, --root)."""
    labels = tmp_path / "labels.csv"
    rows = [[str(csv_data / p), c] for p, c in _images(csv_data)] + [["lost.png", "dog"]]
    _write_csv(labels, rows)
    run = tmp_path / "run"
    assert main(["--quiet", "train", str(labels), "-o", str(run), *_tiny()]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert (run / "skipped.txt").read_text() == f"{tmp_path / 'lost.png'}\tmissing file\n"
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == str(labels) and config["root"] is None
    recorded = json.loads((run / "split.json").read_text())
    assert split_manifest(folder_for(Config.load(run / "config.json"))) == recorded
    assert main(["train", "--resume", str(run), "--labels", str(labels)]) == 2
    assert capsys.readouterr().err.strip().endswith("config.json: drop --labels")
    assert (
        len(recorded["test"]) == 2
        and json.loads((run / "metrics.json").read_text())["skipped"] == 1
    )
    moved = tmp_path / "moved.csv"  # the same images listed relative to another folder
    _write_csv(moved, [list(r) for r in _images(csv_data)])
    assert main(["evaluate", str(run), "--labels", str(moved), "--root", str(csv_data)]) == 0
    assert "(n=24)" in capsys.readouterr().out  # another labels file: all of its images


@pytest.mark.slow
def test_python_api_train_with_root_and_split_column(csv_data, tmp_path):
    rows = [
        [p, c, ("train", "train", "train", "val", "test", "train")[i % 6]]
        for i, (p, c) in enumerate(_images(csv_data))
    ]
    labels = _write_csv(tmp_path / "labels.csv", rows, header="path,label,split")
    config = Config(
        data=str(labels),
        root=os.path.relpath(csv_data),
        out=str(tmp_path / "run"),
        backbone="tiny_test",
        weights="none",
        image_size=32,
        epochs=2,
        fine_tune=False,
        augment="none",  # no choices, no data check, Keras runs the backbone: the cheap path
        feature_norm="none",
        check=False,
        runtime="keras",
        batch_size=8,
        quiet=True,
    )
    result = train(config)
    manifest = json.loads((result.run_dir / "split.json").read_text())
    for split in SPLITS:
        assert sorted(p for p, _ in manifest[split]) == sorted(r[0] for r in rows if r[2] == split)
    assert result.config.root == str(csv_data)
    assert result.metrics["n_test"] == 4
    metrics = evaluate(result.run_dir, str(labels), root=str(csv_data))
    assert metrics["n_test"] == 4  # the run's own labels file: its test rows

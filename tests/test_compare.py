"""`headstart compare`: a table of runs with the right numbers, and their validation curves."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from headstart import Config, train
from headstart.cli import main
from headstart.compare import COLUMNS, compare
from headstart.report import stage_parameters


@pytest.fixture(scope="module")
def two_runs(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    common = dict(data=str(tiny_folder), backbone="scratch_cnn", batch_size=8, quiet=True)
    plain = Config(out=str(root / "scratch"), image_size=32, epochs=2, augment="none", **common)
    augmented = Config(
        out=str(root / "scratch_augmented"),
        image_size=36,
        epochs=3,
        augment="flip",
        head="flatten",
        **common,
    )
    return [train(plain).run_dir, train(augmented).run_dir]


def test_compare_table_has_each_runs_numbers(two_runs, tmp_path):
    result = compare(two_runs, out=tmp_path / "cmp")
    assert [row["run"] for row in result.rows] == ["scratch", "scratch_augmented"]
    for row, run in zip(result.rows, two_runs, strict=True):
        metrics = json.loads((run / "metrics.json").read_text())
        config = json.loads((run / "config.json").read_text())
        history = list(csv.DictReader((run / "history.csv").open()))
        trained = stage_parameters((run / "summary.txt").read_text())[0]["trainable"]
        assert row["test accuracy"] == f"{metrics['accuracy']:.4f}"
        assert row["wall time"] == f"{metrics['train_seconds']:.0f} s"
        assert row["epochs"] == str(len(history))
        assert row["image size"] == str(config["image_size"])
        assert row["parameters trained"] == f"{trained:,}"
        assert row["backbone"] == "scratch_cnn" and row["mode"] == "from scratch"
    assert [row["augment"] for row in result.rows] == ["none", "flip"]
    assert result.rows[0]["parameters trained"] != result.rows[1]["parameters trained"]
    lines = result.table.splitlines()
    assert lines[0].split()[:2] == ["run", "backbone"] and len(lines) == 3
    markdown = result.markdown_path.read_text()
    assert markdown.startswith("| " + " | ".join(COLUMNS) + " |")
    assert "| scratch_augmented | scratch_cnn | from scratch | flip | 36 |" in markdown
    pixels = np.asarray(Image.open(result.figure_path).convert("RGB")).astype(int)
    assert pixels.shape[1] >= 800 and pixels.std() > 20
    for colour in ((31, 119, 180), (255, 127, 14)):  # one line per run: C0 and C1
        assert (np.abs(pixels - colour).max(axis=-1) <= 6).sum() > 100


def test_cli_compare(two_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *map(str, two_runs)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "scratch_augmented" in out
    assert (tmp_path / "comparison" / "compare.md").is_file()
    assert (tmp_path / "comparison" / "compare.png").is_file()
    assert main(["compare", str(two_runs[0]), str(tmp_path)]) == 2
    assert "not a finished headstart run" in capsys.readouterr().err


def test_same_folder_names_are_told_apart(two_runs, tmp_path):
    import shutil

    copies = []
    for parent in ("monday", "tuesday"):
        copies.append(tmp_path / parent / "run")
        shutil.copytree(two_runs[0], copies[-1])
    result = compare(copies, out=tmp_path / "cmp")
    assert [row["run"] for row in result.rows] == ["monday/run", "tuesday/run"]

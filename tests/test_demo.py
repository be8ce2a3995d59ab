"""`headstart demo`, the README's first command, on the data shipped in the package."""

import json
from pathlib import Path

import pytest

from headstart.cli import main
from headstart.splits import load_image_folder
from headstart.training.demo import demo_data_path


def test_demo_data_ships_with_the_package():
    folder = load_image_folder(demo_data_path())
    assert len(folder.class_names) == 10 and not folder.skipped
    assert (len(folder.train), len(folder.val), len(folder.test)) == (700, 200, 100)
    assert (Path(demo_data_path()) / "LICENSE").read_text().count("Zalando") >= 1


@pytest.mark.integration
def test_demo_trains_a_useful_classifier(tmp_path, capsys):
    assert main(["--quiet", "demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and str(tmp_path / "demo") in out
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    # measured 0.87 (seed 0); ten classes, so chance is 0.10
    assert metrics["n_test"] == 100 and metrics["accuracy"] >= 0.8

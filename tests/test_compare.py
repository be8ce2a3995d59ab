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

pytestmark = pytest.mark.slow  # end-to-end training runs of several seconds each


@pytest.fixture(scope="module")
def two_runs(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    common = dict(data=str(tiny_folder), backbone="scratch_cnn", batch_size=8, quiet=True)
    common["report"] = False  # compare reads history.csv and metrics.json
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
        choosing = [r for r in history if r["stage"] in ("head", "fine_tune")]  # refit aside
        assert row["epochs"] == str(len(choosing))
        assert row["image size"] == str(config["image_size"])
        assert row["parameters trained"] == f"{trained:,}"
        refit = " + refit" if metrics["refit"] else ""  # the default, kept if it beat chance
        assert row["backbone"] == "scratch_cnn" and row["mode"] == "from scratch" + refit
    assert [row["augment"] for row in result.rows] == ["none", "flip"]
    assert result.rows[0]["parameters trained"] != result.rows[1]["parameters trained"]
    lines = result.table.splitlines()
    assert lines[0].split()[:2] == ["run", "backbone"] and len(lines) == 3
    markdown = result.markdown_path.read_text()
    assert markdown.startswith("| " + " | ".join(COLUMNS) + " |")
    mode = result.rows[1]["mode"]
    assert f"| scratch_augmented | scratch_cnn | {mode} | flip | 36 |" in markdown
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


# ----------------------------------------------------------------------------- noise


def _fake_run(root, name: str, right: list[bool], *, paths=None, interval=None):
    """A run folder with just what the noise verdict reads: predictions.csv and metrics.json."""
    run = root / name
    run.mkdir()
    paths = paths or [f"/data/img_{i:04d}.png" for i in range(len(right))]
    with (run / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", "confidence", "a", "b"])
        for path, ok in zip(paths, right, strict=True):
            writer.writerow([path, "a", "a" if ok else "b", "0.9", "0.9", "0.1"])
    metrics = {"accuracy": float(np.mean(right))}
    if interval:
        metrics["accuracy_ci95"] = interval
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_paired_bootstrap_on_shared_test_images(tmp_path):
    from headstart.compare import accuracy_difference

    rng = np.random.default_rng(0)
    a = rng.random(300) < 0.85
    b = a.copy()
    b[np.flatnonzero(a)[:3]] = False  # one point worse on the same images
    c = a.copy()
    c[np.flatnonzero(a)[:60]] = False  # twenty points worse
    runs = [_fake_run(tmp_path, name, list(x)) for name, x in (("a", a), ("b", b), ("c", c))]
    close = accuracy_difference(runs[0], runs[1])
    assert close["method"] == "paired bootstrap" and close["n"] == 300
    assert close["difference"] == pytest.approx(0.01)
    assert close["within_noise"]  # 3 images of 300 could go either way on another test set
    far = accuracy_difference(runs[0], runs[2])
    assert not far["within_noise"] and far["ci95"][0] > 0.1
    rng2 = np.random.default_rng(1)
    d = np.where(rng2.random(300) < 0.5, a, rng2.random(300) < 0.84)  # a different model
    assert accuracy_difference(runs[0], _fake_run(tmp_path, "d", list(d)))["within_noise"]


def test_without_shared_images_intervals_are_compared(tmp_path):
    from headstart.compare import accuracy_difference

    other = [f"/elsewhere/{i}.png" for i in range(50)]
    a = _fake_run(tmp_path, "a", [True] * 45 + [False] * 5, interval=[0.8, 0.96])
    b = _fake_run(tmp_path, "b", [True] * 40 + [False] * 10, paths=other, interval=[0.68, 0.9])
    c = _fake_run(tmp_path, "c", [True] * 20 + [False] * 30, paths=other, interval=[0.26, 0.54])
    assert accuracy_difference(a, b)["method"] == "interval overlap"
    assert accuracy_difference(a, b)["within_noise"]
    assert not accuracy_difference(a, c)["within_noise"]
    (b / "metrics.json").write_text('{"accuracy": 0.8}')  # a run from before intervals
    assert accuracy_difference(a, b) == {"method": None}


def test_compare_says_when_a_difference_is_noise(tiny_run, tmp_path, capsys, monkeypatch):
    import shutil

    copies = []
    for name in ("first", "second"):
        copies.append(tmp_path / name)
        shutil.copytree(tiny_run, copies[-1])
    result = compare(copies, out=tmp_path / "cmp")
    (line,) = result.noise
    assert line.startswith("second vs first: +0.0000 accuracy on ") and "within noise" in line
    assert line in result.markdown_path.read_text()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    low, high = metrics["accuracy_ci95"]
    assert result.rows[0]["95% CI"] == f"{low:.2f}-{high:.2f}"
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *map(str, copies)]) == 0
    assert "within noise" in capsys.readouterr().out

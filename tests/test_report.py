"""Figures, report.html and TensorBoard logs: written by every `train`, checked as pictures."""

import base64
import csv
import dataclasses
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from headstart import Config, figures, train
from headstart.cli import main
from headstart.report import ranked_errors, report, stage_parameters
from headstart.splits import load_image_folder

pytestmark = pytest.mark.slow  # end-to-end training runs of several seconds each

LONG_NAME = "fox_with_a_really_long_class_name"
CLASSES = ("cat", "dog", LONG_NAME)
FIGURES = (
    "samples.png",
    "augmentations.png",
    "curves.png",
    "confusion.png",
    "per_class.png",
    "reliability.png",
    "errors.png",
    "gradcam.png",
)
FINE_TUNE_TINT = (253, 241, 227)  # figures._STAGE_COLOURS["fine_tune"]
REFIT_TINT = (233, 245, 234)  # figures._STAGE_COLOURS["refit"]
CURVE_BLUE = (31, 119, 180)  # matplotlib's C0: the train curve
BANNER = (26, 79, 156)  # the report header's #1a4f9c


@pytest.fixture(scope="module")
def data(image_folder_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("report_data") / "data"
    return image_folder_factory(root, classes=CLASSES, per_class=12, size=(36, 36))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A 3-class scratch run with augmentation and TensorBoard logs: seconds to train."""
    config = Config(
        data=str(data),
        out=str(tmp_path_factory.mktemp("runs") / "scratch"),
        backbone="scratch_cnn",
        image_size=32,
        epochs=3,
        lr=3e-3,
        batch_size=8,
        augment="flip,rotate=0.1",
        tensorboard=True,
        quiet=True,
    )
    return train(config).run_dir


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _has_colour(pixels: np.ndarray, rgb, tolerance: int = 6, minimum: int = 20) -> bool:
    close = np.abs(pixels.astype(int) - np.array(rgb)).max(axis=-1) <= tolerance
    return int(close.sum()) >= minimum


def test_train_writes_every_figure_and_the_report(run):
    for name in FIGURES:
        pixels = _png(run / name)
        height, width, _ = pixels.shape
        assert 250 <= width <= 2500 and 120 <= height <= 3000, (name, pixels.shape)
        assert pixels.std() > 20, f"{name} looks blank"
    assert (run / "report.html").stat().st_size > 50_000


def test_a_failing_report_never_costs_the_trained_run(tiny_folder, tmp_path, monkeypatch, caplog):
    import headstart.report

    def broken(run, **options):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(headstart.report, "report", broken)
    config = Config(
        data=str(tiny_folder),
        out=str(tmp_path / "run"),
        backbone="scratch_cnn",
        image_size=32,
        epochs=1,
        augment="none",
        quiet=True,
    )
    result = train(config)
    assert "accuracy" in result.metrics and (result.run_dir / "model.keras").is_file()
    assert json.loads((result.run_dir / "metrics.json").read_text()) == result.metrics
    assert not (result.run_dir / "report.html").exists()
    assert "report not written (the run itself is complete): no fonts today" in caplog.text


def test_no_report_skips_the_figures_and_headstart_report_draws_them_later(
    tiny_folder, tmp_path, capsys
):
    """``--no-report`` (a sweep, a script, CI): the run is complete without report.html or a
    figure, and its time has no "report" phase; `headstart report RUN` draws them from the
    run's files. From Python, ``Config(report=False)``."""
    run = tmp_path / "run"
    command = ["--quiet", "train", str(tiny_folder), "--out", str(run), "--backbone"]
    command += ["scratch_cnn", "--image-size", "32", "--epochs", "1", "--augment", "none"]
    assert main([*command, "--no-report"]) == 0
    capsys.readouterr()
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "config.json").read_text())["report"] is False
    assert (run / "model.keras").is_file() and metrics["n_test"] == 4
    assert not (run / "report.html").exists() and not list(run.glob("*.png"))
    assert "report" not in metrics["phase_seconds"]
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").stat().st_size > 20_000
    assert {"curves.png", "confusion.png", "samples.png"} <= {p.name for p in run.glob("*.png")}
    assert Config(data="d").report is True  # the default: train writes the report


def test_report_is_self_contained_and_has_the_run_numbers(run, data):
    page = (run / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    drawn = FIGURES + (("model.png",) if figures.graph_tools_available() else ())
    assert len(sources) == len(drawn)
    embedded = set()
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        embedded.add(base64.b64decode(source.split(",", 1)[1]))
    assert embedded == {(run / name).read_bytes() for name in drawn}
    assert (figures.GRAPH_HINT in page) != figures.graph_tools_available()
    for external in ("http://", "https://", "<script", "<link", 'src="file:'):
        assert external not in page
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['accuracy']:.4f}" in page and f"{metrics['macro_f1']:.4f}" in page
    assert "headstart report: scratch" in page
    folder = load_image_folder(str(data))
    counts = [len(folder.train), len(folder.val), len(folder.test)]
    assert f'<td>all classes</td><td class="n">{counts[0]}</td>' in page
    assert f'<td class="n">{counts[2]}</td><td class="n">{sum(counts)}</td>' in page
    for name in CLASSES:
        assert f"<td>{name}</td>" in page
    stages = stage_parameters((run / "summary.txt").read_text())
    assert len(stages) == 1 and f"{stages[0]['trainable']:,}" in page
    assert "No unreadable files were skipped" in page
    assert "tensorboard --logdir" in page
    assert "does not give the confusion matrix" not in page  # re-created split == training's


def test_the_report_notices_a_test_split_that_changed(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    matrix = np.array(metrics["confusion_matrix"])
    matrix[0, 0] += 1
    metrics["confusion_matrix"] = matrix.tolist()
    (copy / "metrics.json").write_text(json.dumps(metrics))
    assert "does not give the confusion matrix" in report(copy).read_text()


def test_report_without_the_data_folder_still_shows_what_it_can(run, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(run, copy)
    for name in FIGURES:
        (copy / name).unlink()
    config = json.loads((copy / "config.json").read_text())
    config["data"] = str(tmp_path / "gone")
    (copy / "config.json").write_text(json.dumps(config))
    page = report(copy).read_text()
    graph = 1 if figures.graph_tools_available() else 0
    # curves, confusion, per-class, reliability
    assert page.count("data:image/png;base64,") == 4 + graph
    assert page.count("is not there any more") == 4  # samples, augmentations, errors, Grad-CAM
    assert not (copy / "samples.png").exists()


def test_tensorboard_logs_every_epoch_of_the_stage(run):
    from tensorflow.compat.v1.train import summary_iterator

    rows = csv.DictReader((run / "history.csv").open())
    epochs = len([row for row in rows if row["stage"] == "head"])  # the refit logs apart
    for split in ("train", "validation"):
        files = list((run / "tensorboard" / "head" / split).glob("events.out.tfevents.*"))
        assert files, split
        steps = {
            event.step
            for path in files
            for event in summary_iterator(str(path))
            for value in event.summary.value
            if value.tag == "epoch_loss"
        }
        assert steps == set(range(epochs))


def test_tensorboard_without_the_package_is_refused_up_front(monkeypatch):
    import importlib.util

    from headstart.errors import UsageError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    with pytest.raises(UsageError, match="pip install tensorboard"):
        Config(data="anything", tensorboard=True).validate()
    Config(data="anything").validate()


def test_curves_mark_fine_tuning_only_when_it_ran(tmp_path):
    row = {"accuracy": 0.5, "val_accuracy": 0.6, "loss": 1.0, "val_loss": 0.9}
    head = [dict(row, stage="head") for _ in range(4)]
    tuned = head + [dict(row, stage="fine_tune") for _ in range(3)]
    with_tuning = _png(figures.curves(tuned, tmp_path / "tuned.png", saved_epoch=6))
    without = _png(figures.curves(head, tmp_path / "head.png", saved_epoch=2))
    assert _has_colour(with_tuning, FINE_TUNE_TINT, minimum=2000)
    assert not _has_colour(without, FINE_TUNE_TINT, minimum=2000)
    assert _has_colour(without, CURVE_BLUE)


def test_curves_show_the_refit_apart_from_the_choosing_phase(drawn, tmp_path):
    """The refit's epochs (training curves only) are tinted and labelled; the validation
    curves and the star are the choosing phase's."""
    row = {"accuracy": 0.5, "val_accuracy": 0.6, "loss": 1.0, "val_loss": 0.9}
    refit = {"accuracy": 0.7, "val_accuracy": "", "loss": 0.8, "val_loss": ""}
    history = [dict(row, stage="head") for _ in range(3)]
    history += [dict(refit, stage="refit_head") for _ in range(3)]
    pixels = _png(figures.curves(history, tmp_path / "refit.png", saved_epoch=3))
    assert _has_colour(pixels, REFIT_TINT, minimum=2000)
    assert not _has_colour(pixels, FINE_TUNE_TINT, minimum=2000)
    labels = [text.get_text() for text in drawn[0].axes[0].get_legend().get_texts()]
    assert labels == [
        "train",
        "validation (choosing phase)",
        "train (refit on train + validation)",
        "chosen on validation",
    ]


def _no_overlap(boxes) -> bool:
    boxes = [b for b in boxes if b.width > 0]
    return not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def _labels_apart(texts, renderer) -> bool:
    """Tick labels do not overlap: boxes for horizontal text; rotated (parallel) strings need
    the distance between neighbours' baselines, spacing x sin(angle), above the text height."""
    if not texts or texts[0].get_rotation() % 180 == 0:
        return _no_overlap([t.get_window_extent(renderer) for t in texts])
    angle = np.radians(texts[0].get_rotation())
    anchors = np.array([t.get_transform().transform(t.get_position()) for t in texts])
    spacing = np.min(np.linalg.norm(np.diff(anchors, axis=0), axis=1))
    font = texts[0].get_fontsize() * renderer.points_to_pixels(1.0)
    return spacing * abs(np.sin(angle)) > font


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib figures the figure functions save, for inspecting their layout."""
    saved = []
    original = figures._save  # noqa: SLF001

    def keep(fig, path, **options):
        saved.append(fig)
        return original(fig, path, **options)

    monkeypatch.setattr(figures, "_save", keep)
    return saved


@pytest.mark.parametrize("n_classes", [2, 10, 40])
def test_class_names_never_overlap(drawn, tmp_path, n_classes):
    names = [f"class_{i:02d}_{'with_a_long_name' * (i % 3)}" for i in range(n_classes)]
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 5, (n_classes, n_classes)) + np.eye(n_classes, dtype=int) * 20
    per_class = {n: {"precision": 0.5, "recall": 0.7, "f1": 0.6, "support": 9} for n in names}
    metrics = {"class_names": names, "per_class": per_class, "macro_f1": 0.6}
    figures.confusion(matrix.tolist(), names, tmp_path / "confusion.png")
    figures.per_class(metrics, tmp_path / "per_class.png")
    count, columns = (9, 3) if n_classes <= 4 else (20, 5)  # as the report lays them out
    images = [np.full((32, 32, 3), 10 * i, np.uint8) for i in range(count)]
    labels = [names[i % n_classes] for i in range(count)]
    figures.samples(images, labels, tmp_path / "s.png", columns=columns)
    for fig in drawn:
        canvas = FigureCanvasAgg(fig)  # the canvas savefig used: same layout, same text sizes
        canvas.draw()
        renderer = canvas.get_renderer()
        for ax in fig.axes:
            for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
                assert _labels_apart([t for t in labels if t.get_text()], renderer)
        titled = [ax for ax in fig.axes if ax.get_title()]
        assert _no_overlap([ax.title.get_window_extent(renderer) for ax in titled])
    width, height = Image.open(tmp_path / "confusion.png").size
    assert max(width, height) <= 2400  # grows with the class count, within reason
    assert all(len(t.get_text()) <= 18 for t in drawn[0].axes[0].get_xticklabels())


def test_errors_are_ranked_by_confidence_and_none_is_a_message(tmp_path):
    labels = [0, 1, 2, 0, 1]
    predicted = [0, 2, 1, 1, 1]
    confidence = [0.99, 0.60, 0.95, 0.60, 0.80]
    assert ranked_errors(labels, predicted, confidence).tolist() == [2, 1, 3]
    pixels = _png(figures.errors([], [], [], [], tmp_path / "none.png", n_test=7))
    assert pixels.std() > 5 and pixels.shape[1] > 300  # a line of text, not an empty image


@pytest.mark.parametrize("count", [1, 2, 7])
def test_a_grid_s_title_fits_whatever_its_cell_count(drawn, tmp_path, count):
    """One wrong test image (a good model's report) under the errors' long title, Grad-CAM's
    two-line title: every title lies inside the figure and clear of the cells."""
    images = [np.full((48, 48, 3), 30 * i, np.uint8) for i in range(count)]
    names = ["pullover"] * count
    figures.errors(
        images, names, ["coat"] * count, [0.9] * count, tmp_path / "e.png", n_test=10_000
    )
    empty = [np.zeros((6, 6))] * count  # no overlay: the title gets its second line
    figures.gradcam_grid(images, empty, ["wrong: coat\n0.90"] * count, tmp_path / "g.png")
    for fig in drawn:
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        frame = fig.bbox
        (title,) = [t.get_window_extent(renderer) for t in fig.texts if t.get_text()]
        assert frame.x0 <= title.x0 and title.x1 <= frame.x1 and title.y1 <= frame.y1
        texts = [title] + [ax.title.get_window_extent(renderer) for ax in fig.axes]
        assert all(frame.x0 <= t.x0 and t.x1 <= frame.x1 for t in texts)
        shown = [ax.get_window_extent(renderer) for ax in fig.axes if ax.images]
        assert _no_overlap([title, *shown])


def test_model_graph_or_the_one_line_hint(monkeypatch, tmp_path):
    from headstart.summaries import summary

    monkeypatch.setattr(figures, "graph_tools_available", lambda: False)
    text = summary("scratch_cnn", image_size=32, plot=str(tmp_path / "graph.png"))
    assert text.splitlines()[-1] == figures.GRAPH_HINT
    assert "pip install pydot" in text and "apt-get install graphviz" in text
    assert not (tmp_path / "graph.png").exists()
    monkeypatch.undo()
    if not figures.graph_tools_available():
        pytest.skip("pydot or Graphviz's dot not installed: the graph itself is not drawn")
    text = summary("scratch_cnn", image_size=32, plot=str(tmp_path / "graph.png"))
    assert text.endswith(f"model graph written to {tmp_path / 'graph.png'}\n")
    assert _png(tmp_path / "graph.png").std() > 10


def test_cli_report(run, capsys):
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert (run / "report.html").is_file()
    assert main(["report", str(run.parent / "not_a_run")]) == 2


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless browser check needs Debian's chromium: apt-get install chromium",
)
def test_report_renders_in_headless_chromium(run, tmp_path):
    shot = tmp_path / "shot.png"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        (run / "report.html").resolve().as_uri(),
    ]
    subprocess.run(command, capture_output=True, timeout=120, check=True)
    pixels = _png(shot)
    assert pixels.shape == (2000, 1280, 3)
    assert pixels.std() > 30
    # the title banner across the top, and the embedded figures drawn (not broken-image icons):
    # the curves' blue line and the confusion matrix's dark blue cells
    assert (np.abs(pixels[:60].astype(int) - BANNER).max(axis=-1) <= 3).mean() > 0.5
    assert _has_colour(pixels[100:], CURVE_BLUE, minimum=200)
    assert _has_colour(pixels[100:], (8, 48, 107), tolerance=12, minimum=500)  # Blues' top


@pytest.mark.integration
def test_transfer_run_report_shows_both_stages(tiny_folder, tmp_path):
    config = Config(
        data=str(tiny_folder),
        out=str(tmp_path / "lite0"),
        image_size=64,
        epochs=2,
        fine_tune_epochs=1,
        fine_tune_lr=1e-4,  # a fixed rate: stage 2 runs even when it cannot beat stage 1
        batch_size=8,
        tensorboard=True,
        quiet=True,
    )
    run = train(config).run_dir
    assert {"head", "fine_tune"} <= {p.name for p in (run / "tensorboard").iterdir()}
    stages = stage_parameters((run / "summary.txt").read_text())
    assert [s["stage"] for s in stages] == ["stage 1: head training", "stage 2: fine-tuning"]
    assert stages[1]["trainable"] > stages[0]["trainable"]
    page = (run / "report.html").read_text()
    assert all(f"{s['trainable']:,}" in page for s in stages)
    assert "efficientnet_lite0 output (2x2x1280)" in page  # Grad-CAM's layer, found by itself
    assert _has_colour(_png(run / "curves.png"), FINE_TUNE_TINT, minimum=2000)
    gradcam = Image.open(io.BytesIO((run / "gradcam.png").read_bytes()))
    assert gradcam.size[0] > 300


def test_report_of_a_split_from_run_describes_the_runs_own_split(data, tmp_path):
    """A run trained on a manifest's split (--split-from) is reported on that split, not on the
    one its seed and fractions would make."""
    from headstart.report import write_figures
    from headstart.splits import write_split_manifest

    seeded = load_image_folder(str(data), val_split=0.2, test_split=0.1, seed=0)
    # another split: half of each class's training images move to test
    moved = seeded.train.paths[::2]
    keep = [i for i, path in enumerate(seeded.train.paths) if path not in moved]
    train_split = type(seeded.train)(
        tuple(seeded.train.paths[i] for i in keep), tuple(seeded.train.labels[i] for i in keep)
    )
    test_split = type(seeded.test)(
        seeded.test.paths + moved,
        seeded.test.labels + tuple(seeded.train.labels[::2]),
    )
    other = dataclasses.replace(seeded, train=train_split, test=test_split)
    manifest = write_split_manifest(other, tmp_path / "split.json")
    config = Config(
        data=str(data),
        out=str(tmp_path / "run"),
        backbone="scratch_cnn",
        image_size=32,
        epochs=1,
        batch_size=8,
        augment="none",
        split_from=str(manifest),
        refit=False,  # not about the refit
        quiet=True,
    )
    run = train(config).run_dir
    (run / "report.html").unlink()
    assert main(["--quiet", "report", str(run)]) == 0  # no folder handed over: read from disk
    n = len(CLASSES)
    expected = {split: getattr(other, split).counts(n) for split in ("train", "val", "test")}
    assert expected["test"] != seeded.test.counts(n)  # the two splits differ
    assert {split: write_figures(run).data[split] for split in expected} == expected
    page = (run / "report.html").read_text()
    totals = [sum(expected[split]) for split in ("train", "val", "test")]
    row = "".join(f"<td[^>]*>{count}</td>" for count in (*totals, sum(totals)))
    assert re.search(r"all classes</td>\s*" + row, page), "the report's table is the run's split"

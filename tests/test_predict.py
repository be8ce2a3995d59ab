"""`predict` on big folders: streamed batch by batch with bounded memory; a bad image is a line
of output with its reason, never the end of the run."""

from __future__ import annotations

import csv
import io
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart.cli import main
from headstart.data import read_image
from headstart.deploy.predict import iter_predictions

BATCH = 32  # predict's default batch size
predict_module = sys.modules["headstart.deploy.predict"]  # `headstart.predict` is the function


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    return tiny_run


def _folder(root: Path, n: int, bad: int) -> list[str]:
    """n tiny PNGs, sorted by name, with a text file posing as image number `bad`."""
    root.mkdir()
    rng = np.random.default_rng(n)
    for i in range(n):
        path = root / f"img_{i:05d}.png"
        if i == bad:
            path.write_text("not an image\n")
        else:
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(path)
    return [str(root / f"img_{i:05d}.png") for i in range(n)]


class LiveImages:
    """Stands in for read_image and counts the decoded images alive at once (peak) and read."""

    def __init__(self):
        self.lock = threading.Lock()
        self.alive = self.peak = self.reads = 0

    def __call__(self, path, size=None):
        image = read_image(path, size)
        with self.lock:
            self.reads += 1
            self.alive += 1
            self.peak = max(self.peak, self.alive)
        weakref.finalize(image, self._freed)
        return image

    def _freed(self):
        with self.lock:
            self.alive -= 1


@pytest.mark.slow  # a full training run
def test_iter_predictions_streams_with_bounded_memory(run_dir, tmp_path, monkeypatch, capsys):
    # 500 files through the library: results come before most files are even read
    small = _folder(tmp_path / "small", 500, bad=250)
    library = LiveImages()
    monkeypatch.setattr(predict_module, "read_image", library)
    stream = iter_predictions(run_dir, [str(tmp_path / "small")], top_k=2)
    first = next(stream)
    assert library.reads <= 2 * BATCH  # this batch and the one being read ahead
    results = [first, *stream]
    assert [r.path for r in results] == small
    assert results[250].error == "not an image" and results[250].top == ()
    assert all(len(r.top) == 2 and r.error is None for i, r in enumerate(results) if i != 250)

    # 2,000 files through the CLI: a line per file, the bad one with its reason
    big = _folder(tmp_path / "big", 2000, bad=1000)
    cli = LiveImages()
    monkeypatch.setattr(predict_module, "read_image", cli)
    assert main(["predict", str(run_dir), str(tmp_path / "big"), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.reader(io.StringIO(captured.out)))
    assert rows[0] == ["path", "rank", "label", "probability", "error"]
    assert [row[0] for row in rows[1:]] == big
    assert rows[1001] == [big[1000], "", "", "", "not an image"]
    assert all(
        row[1] == "1" and row[2] in ("cat", "dog") for row in rows[1:] if row[0] != big[1000]
    )
    assert captured.err.strip() == (
        "headstart: 1 of 2000 images could not be read (the reasons are in the output)"
    )

    # memory: decoded images held at once do not grow with the number of files
    assert library.reads == 499 and cli.reads == 1999  # each image decoded once
    assert cli.peak == library.peak <= 2 * BATCH
    assert cli.alive == library.alive == 0


def test_table_output_reports_a_bad_file_inline(run_dir, tmp_path, capsys):
    files = _folder(tmp_path / "few", 3, bad=1)
    assert main(["predict", str(run_dir), *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[1] == f"{files[1]}\tskipped: not an image"
    assert lines[0].startswith(f"{files[0]}\t") and lines[0].split("\t")[1].split()[0] in (
        "cat",
        "dog",
    )

"""A full disk (ENOSPC) while a run writes: one line naming the file and the space it needed,
every file already written stays complete, and ``--resume`` goes on once space is freed.

For real: a tmpfs of 1 MB mounted for the test (root only; skipped with its reason elsewhere)
holds the run and its feature cache, part-filled with a ballast file so that the run stops
midway; the ballast is deleted and the run resumed to the end. Injected: each writer (JSON and
text files, resume.npz, model.keras, a feature cache shard, the report) meets an OSError
ENOSPC at its write.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import keras
import numpy as np
import pytest

from headstart import files, report, runs
from headstart.cli import EXIT_DISK_FULL, main
from headstart.errors import DiskFullError
from headstart.training.cache import EntrySpec, FeatureCache
from headstart.training.state import RESUME_FILE, TrainingState, read_state, write_state

_TESTS = Path(__file__).resolve().parent
_PYTHONPATH = os.pathsep.join(
    [str(_TESTS.parent / "src"), str(_TESTS / "subprocess_site")]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
OPTIONS = (
    *("--backbone=tiny_test", "--weights=none", "--image-size=32"),  # tests/conftest.py
    *("--epochs=2", "--no-fine-tune", "--feature-norm=none", "--no-check", "--augment=none"),
    "--quiet",
)
ONE_LINE = re.compile(
    r"headstart: no space left on device writing (?P<path>\S+) \(needs about [\d.]+ [KM]B, "
    r"[\d.]+ [KM]B free\); free space, then (?P<next>.*)"
)


def _enospc(path="") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) or None)


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if files.is_temp_file(p.name)]


@pytest.fixture
def full_after(monkeypatch):
    """``full_after(n)``: from now on every file written through ``os.fdopen`` takes ``n``
    bytes, then the disk is full (the write raises ENOSPC, as the system would)."""

    def install(limit: int) -> None:
        real_fdopen = os.fdopen

        class Filling:
            def __init__(self, handle):
                self.handle, self.written = handle, 0

            def write(self, data):
                room = limit - self.written
                if len(data) > room:
                    self.handle.write(data[:room])
                    self.written = limit
                    raise _enospc()
                self.written += len(data)
                return self.handle.write(data)

            def __getattr__(self, name):
                return getattr(self.handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()

        monkeypatch.setattr(os, "fdopen", lambda *a, **k: Filling(real_fdopen(*a, **k)))

    return install


# ------------------------------------------------------------------------- injected


@pytest.mark.parametrize(
    "write",
    [
        lambda path: files.write_json(path, {"accuracy": 0.5, "rows": list(range(2000))}),
        lambda path: files.write_text_atomic(path, "x" * 20_000),
        lambda path: files.write_bytes_atomic(path, b"\0" * 20_000),
    ],
    ids=["json", "text", "bytes"],
)
def test_an_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(
    tmp_path, full_after, write
):
    path = tmp_path / "metrics.json"
    path.write_text('{"old": true}\n')
    full_after(1000)
    with pytest.raises(DiskFullError) as raised:
        write(path)
    error = raised.value
    assert error.errno == errno.ENOSPC and isinstance(error, OSError)
    assert error.path == str(path) and error.filename == str(path)
    assert error.needed > 1000 and error.free is not None
    assert str(error).startswith(f"no space left on device writing {path} (needs about ")
    assert json.loads(path.read_text()) == {"old": True}  # untouched
    assert _temp_files(tmp_path) == []  # the half-written temporary file is gone


def test_other_errors_are_not_disk_full(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "fdopen", fail)
    with pytest.raises(OSError) as raised:
        files.write_text_atomic(tmp_path / "a.txt", "x")
    assert not isinstance(raised.value, DiskFullError)
    assert _temp_files(tmp_path) == []
    # a quota is a full disk too, and so is a library's message that lost the errno (h5py)
    assert files.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert files.is_disk_full(RuntimeError("Can't write data (errno = 28, error message = ...)"))
    wrapped = ValueError("saving failed")
    wrapped.__cause__ = _enospc()
    assert files.is_disk_full(wrapped)
    assert not files.is_disk_full(ValueError("errno = 280"))


def test_resume_state_on_a_full_disk_keeps_the_previous_state(tmp_path, full_after):
    write_state(tmp_path, TrainingState("head", next_epoch=3, variables={0: np.ones(4)}))
    full_after(100)
    bigger = TrainingState("head", next_epoch=4, variables={0: np.ones(50_000)})
    with pytest.raises(DiskFullError) as raised:
        write_state(tmp_path, bigger)
    assert raised.value.path == str(tmp_path / RESUME_FILE)
    assert raised.value.needed > 50_000 * 8
    kept = read_state(tmp_path)  # the state of the last epoch that could be saved
    assert kept.next_epoch == 3 and np.array_equal(kept.variables[0], np.ones(4))
    assert _temp_files(tmp_path) == []


def test_model_on_a_full_disk_keeps_the_previous_model(tmp_path, monkeypatch):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3000)])  # ~108 KB float32
    path = tmp_path / runs.MODEL_FILE
    files.save_model_atomic(model, path)
    before = path.read_bytes()

    def save_then_fill(target, *args, **kwargs):  # the zip is half written when space runs out
        Path(target).write_bytes(b"PK" + b"\0" * 5000)
        raise _enospc(target)

    monkeypatch.setattr(model, "save", save_then_fill)
    with pytest.raises(DiskFullError) as raised:
        files.save_model_atomic(model, path)
    assert raised.value.path == str(path)
    assert raised.value.needed >= files.model_bytes(model) > 100_000
    assert "needs about 129 KB" in str(raised.value)  # 108 KB of weights, 17 KB of file
    assert 0.9 * len(before) < files.model_bytes(model) < 1.2 * len(before)
    assert path.read_bytes() == before
    keras.saving.load_model(path)  # still loads
    assert _temp_files(tmp_path) == []


def test_a_cache_shard_on_a_full_disk_is_not_left_half_written(tmp_path, monkeypatch):
    images = []
    for i in range(6):
        image = tmp_path / "images" / f"{i}.png"
        image.parent.mkdir(exist_ok=True)
        image.write_bytes(uuid.uuid4().bytes)  # only their content hashes are read
        images.append(str(image))
    cache = FeatureCache(tmp_path / "cache")
    spec = EntrySpec("tiny", "none:0", 32, "tf", "pooled:gap", "clean")

    def compute(paths):
        yield np.ones((len(paths), 100), np.float32)

    first = cache.rows(spec, images[:3], compute).to_numpy()

    def no_room(fd, offset, length):  # what posix_fallocate says on a full file system
        raise _enospc()

    monkeypatch.setattr(os, "posix_fallocate", no_room, raising=False)
    with pytest.raises(DiskFullError) as raised:
        cache.rows(spec, images, compute)
    entry = tmp_path / "cache" / spec.key()
    assert re.fullmatch(rf"{re.escape(str(entry))}/shard-\w+\.npy", raised.value.path)
    assert raised.value.needed >= 3 * 100 * 2  # the three new rows, float16
    assert _temp_files(tmp_path / "cache") == []
    assert len(list(entry.glob("*.npy"))) == 2  # the first shard and its keys only
    monkeypatch.undo()
    again = FeatureCache(tmp_path / "cache").rows(spec, images[:3], compute).to_numpy()
    np.testing.assert_array_equal(again, first)  # still there and readable


def test_the_report_stops_on_a_full_disk_but_not_on_other_failures(tmp_path, monkeypatch):
    errors = iter([DiskFullError(tmp_path / "report.html", 300_000, 0), _enospc(), ValueError()])

    def failing_report(run, folder=None, model=None):
        raise next(errors)

    monkeypatch.setattr(report, "report", failing_report)
    with pytest.raises(DiskFullError):
        report.redraw(tmp_path)
    with pytest.raises(OSError):
        report.redraw(tmp_path)
    assert report.redraw(tmp_path) is None  # any other failure: a warning, the run is complete


@pytest.mark.parametrize("resumable", [True, False], ids=["resume", "before-resume-state"])
def test_the_cli_says_it_in_one_line(tmp_path, monkeypatch, capsys, resumable):
    import headstart.budget

    run = tmp_path / "run"

    def fake_train(config, **_):
        run.mkdir()
        (run / "config.json").write_text("{}")
        if resumable:
            (run / RESUME_FILE).write_bytes(b"")
        raise DiskFullError(run / runs.MODEL_FILE, 12 * 2**20, 300 * 1024)

    monkeypatch.setattr(headstart.budget, "train", fake_train)  # what the CLI calls
    code = main(["train", str(tmp_path), "--out", str(run)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_DISK_FULL == 1
    assert len(lines) == 1
    if resumable:
        again = f"continue with `headstart train --resume {run}`"
    else:  # stopped before its first resume state: the folder is not empty, so a new one
        again = "run train again with a new --out"
    assert lines[0] == (
        f"headstart: no space left on device writing {run / runs.MODEL_FILE} (needs about "
        f"12 MB, 300 KB free); free space, then {again}"
    )


def test_the_cli_names_the_file_of_a_write_headstart_does_not_make(tmp_path, monkeypatch, capsys):
    import headstart.budget

    def fake_train(config, **_):
        raise _enospc(tmp_path / "run" / "tensorboard" / "events")

    monkeypatch.setattr(headstart.budget, "train", fake_train)  # what the CLI calls
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run")]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith(
        f"headstart: no space left on device writing {tmp_path}/run/tensorboard/events ("
    )
    assert line.endswith("; free space, then run train again")


# ------------------------------------------------------------------------- for real


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs mounted at ``tmp_path / "disk"`` for the test (needs root)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root: the full disk is tested by injection only")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


_FILL_SHARD = """
import sys
import numpy as np
from headstart.errors import DiskFullError
from headstart.training.cache import EntrySpec, FeatureCache

cache, image = sys.argv[1:]
spec = EntrySpec("tiny", "none:0", 32, "tf", "pooled:gap", "clean")
try:
    FeatureCache(cache).rows(spec, [image], lambda paths: iter([np.ones((1, 200_000))]))
except DiskFullError as error:
    print(error.path, error.needed, error.free)
"""


def test_a_cache_shard_on_a_real_full_disk_is_an_error_not_a_crash(small_disk, tmp_path):
    """Writing a memory map finds no space with a SIGBUS: the shard's space is reserved
    first, so a full disk is a `DiskFullError` here (in a process of its own: a SIGBUS would
    kill it, not the test run)."""
    image = tmp_path / "image.png"
    image.write_bytes(b"any bytes: only the content hash is read")
    ballast = small_disk / "ballast"
    with ballast.open("wb") as handle:  # leave 100 KB for a 400 KB shard
        os.posix_fallocate(handle.fileno(), 0, files.free_bytes(small_disk) - 100 * 1024)
    cache = small_disk / "cache"
    done = subprocess.run(
        [sys.executable, "-c", _FILL_SHARD, str(cache), str(image)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(_TESTS.parent / "src")},  # no Keras: 0.5 s
        timeout=60,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    path, needed, free = done.stdout.split()
    assert re.fullmatch(rf"{re.escape(str(cache))}/\w+/shard-\w+\.npy", path)
    assert int(needed) >= 400_000 and 80 * 1024 < int(free) <= 100 * 1024
    assert _temp_files(cache) == []
    assert [p.name for p in cache.rglob("*.npy")] == []


def _headstart(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": _PYTHONPATH, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "headstart", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _check_complete(run: Path) -> None:
    """Every file the run folder holds is whole: JSON parses, the state and the model load."""
    assert _temp_files(run) == []
    for path in run.glob("*.json"):
        json.loads(path.read_text())
    if (run / RESUME_FILE).exists():
        assert read_state(run) is not None
    if (run / runs.MODEL_FILE).exists():
        keras.saving.load_model(run / runs.MODEL_FILE)


@pytest.mark.slow
def test_a_run_on_a_full_disk_stops_in_one_line_and_resumes(small_disk, image_folder_factory):
    data = image_folder_factory(per_class=10, size=(32, 32))
    run, cache = small_disk / "run", small_disk / "cache"
    # the run's first files and the feature cache (~120 KB in 4 KB pages) fit, model.keras
    # (~100 KB) does not: the run stops at the end of its first epoch
    ballast = small_disk / "ballast"
    with ballast.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, files.free_bytes(small_disk) - 160 * 1024)

    stopped = _headstart("train", str(data), "--out", str(run), "--cache-dir", str(cache), *OPTIONS)
    last = stopped.stderr.strip().splitlines()[-1]
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    line = ONE_LINE.fullmatch(last)
    assert line, last
    assert Path(line["path"]) == run / runs.MODEL_FILE, last
    assert line["next"] == f"continue with `headstart train --resume {run}`"
    _check_complete(run)
    assert _temp_files(cache) == []

    ballast.unlink()
    resumed = _headstart("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _check_complete(run)
    assert not (run / RESUME_FILE).exists()
    metrics = json.loads((run / runs.METRICS_FILE).read_text())
    assert metrics["n_test"] == 0 or "accuracy" in metrics
    runs.load_model(run, len(runs.read_labels(run)))  # a checked headstart classifier

"""One cache, many runs: real processes share a feature cache at the same moment, or die while
writing to it, and every run still gets correct rows with each image computed once.

The workers are small ``python -c`` programs using `FeatureCache` with a fake backbone whose
output is derived from each file's bytes (deterministic, so bit-identity can be checked); one
end-to-end test runs two real ``headstart train`` processes on one ``--cache-dir``.
"""

import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from headstart.files import is_temp_file
from headstart.training.cache import STALE_SECONDS, EntrySpec, FeatureCache

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "tests" / "subprocess_site"  # its sitecustomize registers the tiny backbones
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(SITE)])}
WORKER_ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # no SITE: no TensorFlow import
SPEC = EntrySpec("efficientnet_lite0", "imagenet", 64, "lite", "pooled:gap", "clean")

# argv: cache dir, image dir, work dir, worker name. Waits for work/go, then reads the rows of
# every image through the cache and saves them to work/<name>.npy. The fake backbone appends
# each image it computes to work/computed (one line per image; O_APPEND writes of one line do
# not interleave), sleeps 50 ms per batch of 2, and blocks for good after its first batch if
# work/<name>.block exists (so a test can kill it in the middle of writing a shard).
WORKER = """
import hashlib, logging, os, sys, time
from pathlib import Path
import numpy as np
from headstart.training.cache import STALE_SECONDS, EntrySpec, FeatureCache

logging.basicConfig(level=logging.INFO, format="headstart: %(message)s")  # as the CLI does

cache_dir, images, work, name = sys.argv[1:]
work = Path(work)
paths = sorted(str(p) for p in Path(images).iterdir())
spec = EntrySpec("efficientnet_lite0", "imagenet", 64, "lite", "pooled:gap", "clean")

def compute(missing):
    for number, start in enumerate(range(0, len(missing), 2)):
        chunk = missing[start : start + 2]
        with open(work / "computed", "a") as log:
            log.write("".join(p + "\\n" for p in chunk))
        time.sleep(0.05)
        rows = [np.frombuffer(hashlib.sha256(open(p, "rb").read()).digest(), np.uint8)
                for p in chunk]
        yield np.array(rows, "f4")
        if number == 0 and (work / f"{name}.block").exists():
            (work / f"{name}.blocked").touch()
            while True:
                time.sleep(0.02)

(work / f"{name}.ready").touch()
while not (work / "go").exists():
    time.sleep(0.005)
rows = FeatureCache(cache_dir).rows(spec, paths, compute).to_numpy()
np.save(work / f"{name}.npy", rows)
"""


def _images(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"img{i:02d}.png").write_bytes(f"image number {i}".encode() * (i + 1))
    return folder


def _expected(images: Path) -> np.ndarray:
    """What the fake backbone makes of each image, in the workers' order (float16 is exact
    for its integer outputs 0..255)."""
    return np.array(
        [
            np.frombuffer(hashlib.sha256(p.read_bytes()).digest(), np.uint8)
            for p in sorted(images.iterdir())
        ],
        "f4",
    )


def _start(cache: Path, images: Path, work: Path, name: str) -> subprocess.Popen:
    command = [sys.executable, "-c", WORKER, str(cache), str(images), str(work), name]
    return subprocess.Popen(command, env=WORKER_ENV, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.01)


def _finish(process: subprocess.Popen) -> str:
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-3000:]
    return err


def _computed(work: Path) -> list[str]:
    return (work / "computed").read_text().splitlines()


def _assert_whole(entry: Path) -> int:
    """No torn entry: every published shard has as many rows as keys, no key is in two shards,
    and nothing else is left (no temporary file, no shard without keys). Returns the rows."""
    names = {p.name for p in entry.iterdir()}
    keys_files = sorted(n for n in names if n.endswith(".keys.npy"))
    shards = {n[: -len(".keys.npy")] + ".npy" for n in keys_files}
    assert names == {"meta.json", *keys_files, *shards}, names
    keys = []
    for name in keys_files:
        shard_keys = np.load(entry / name)
        rows = np.load(entry / (name[: -len(".keys.npy")] + ".npy"), mmap_mode="r")
        assert len(shard_keys) == len(rows) > 0
        keys += [k.decode() for k in shard_keys]
    assert len(keys) == len(set(keys)), "an image was computed and published twice"
    return len(keys)


def test_two_processes_started_together_compute_each_image_once(tmp_path):
    """The second process waits on the entry's lock, then finds the first's rows: 16 images
    computed once in all, both processes get the single-process rows bit for bit."""
    images, cache = _images(tmp_path / "images", 16), tmp_path / "cache"
    work = tmp_path / "work"
    work.mkdir()
    workers = [_start(cache, images, work, name) for name in ("a", "b")]
    for name, worker in zip("ab", workers, strict=True):
        _wait_for(work / f"{name}.ready", worker)
    (work / "go").touch()  # both are past their imports: they ask the cache at the same moment
    errors = [_finish(worker) for worker in workers]
    expected = _expected(images)
    for name in "ab":
        np.testing.assert_array_equal(np.load(work / f"{name}.npy"), expected)
    computed = _computed(work)
    assert sorted(computed) == sorted(str(p) for p in images.iterdir())  # 16 lines: each once
    # one waited for the other (the fake backbone takes 0.4 s) and said so
    assert sorted("another run is computing" in e for e in errors) == [False, True], errors
    assert _assert_whole(cache / SPEC.key()) == 16
    assert len(json.loads((cache / "file_hashes.json").read_text())) == 16


def test_a_writer_killed_mid_shard_leaves_the_cache_usable(tmp_path):
    """A is killed while writing its shard and holding the entry's lock; B, waiting on that
    lock meanwhile, never deletes A's file while A lives, then takes over: it removes A's
    leftover, computes all 8 images and gets the right rows."""
    images, cache = _images(tmp_path / "images", 8), tmp_path / "cache"
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.block").touch()
    writer = _start(cache, images, work, "a")
    _wait_for(work / "a.ready", writer)
    (work / "go").touch()
    _wait_for(work / "a.blocked", writer)  # 2 rows written into its half-made shard
    entry = cache / SPEC.key()
    (leftover,) = [p for p in entry.iterdir() if is_temp_file(p.name)]
    old = time.time() - STALE_SECONDS - 60  # as a crash two minutes ago would leave it
    os.utime(leftover, (old, old))
    waiting = _start(cache, images, work, "b")  # b sweeps the entry: a holds its shard's flock
    time.sleep(1.0)
    assert waiting.poll() is None and leftover.exists()  # b waits for a; a's file is kept
    assert not (work / "b.npy").exists()
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    err = _finish(waiting)
    assert not leftover.exists() and "removed" in err
    np.testing.assert_array_equal(np.load(work / "b.npy"), _expected(images))
    assert len(_computed(work)) == 2 + 8  # a's first batch, lost with it; then all by b
    assert _assert_whole(entry) == 8


def test_sweep_removes_only_dead_writers_leftovers(tmp_path):
    """A shard whose keys never came (killed between the two renames) and an old temporary file
    go; a young one, a held one (its writer lives), and published shards stay."""
    cache = FeatureCache(tmp_path / "cache")
    images = _images(tmp_path / "images", 3)
    paths = sorted(str(p) for p in images.iterdir())
    cache.rows(SPEC, paths, lambda missing: iter([np.ones((len(missing), 2), "f4")]))
    entry = tmp_path / "cache" / SPEC.key()
    published = sorted(p.name for p in entry.iterdir())
    old = time.time() - STALE_SECONDS - 1
    orphan, dead, young, held = (
        entry / "shard-0123456789ab.npy",
        entry / ".shard-dead00000000.npy.tmp",
        entry / ".shard-young0000000.npy.tmp",
        entry / ".shard-held00000000.npy.tmp",
    )
    for path in (orphan, dead, young, held):
        path.write_bytes(b"half a shard")
        if path is not young:
            os.utime(path, (old, old))
    handle = os.open(held, os.O_RDONLY)
    fcntl.flock(handle, fcntl.LOCK_EX)  # another open file: conflicts even in this process
    try:
        FeatureCache(tmp_path / "cache").rows(SPEC, paths, lambda missing: iter(()))
    finally:
        os.close(handle)
    assert sorted(p.name for p in entry.iterdir()) == sorted([*published, young.name, held.name])


def test_hash_memos_of_two_runs_are_merged_not_overwritten(tmp_path):
    images = _images(tmp_path / "images", 4)
    paths = sorted(str(p) for p in images.iterdir())
    first, second = FeatureCache(tmp_path / "cache"), FeatureCache(tmp_path / "cache")
    first.content_hashes(paths[:2])
    second.content_hashes(paths[2:])  # loaded before first wrote: must re-read, not overwrite
    assert sorted(json.loads((tmp_path / "cache" / "file_hashes.json").read_text())) == paths


@pytest.mark.slow
def test_two_train_runs_at_once_on_one_cache_dir(tiny_folder, tmp_path):
    """Two ``headstart train`` in two terminals, one --cache-dir: both finish, each image's
    rows are computed once per entry (never published twice, whole shards), and a third run
    afterwards computes nothing, changes no cache file, and trains to the same numbers."""
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "headstart", "train", str(tiny_folder)]
    options = [
        f"--cache-dir={cache}",
        "--backbone=tiny_test",  # tests/conftest.py: registered in the processes by SITE
        "--weights=none",
        "--image-size=32",
        "--epochs=1",
        "--no-fine-tune",
        "--batch-size=8",
        "--augment=none",
        "--no-report",
        "--no-check",
    ]

    def start(name):
        out = tmp_path / name
        return out, subprocess.Popen(
            [*command, f"--out={out}", *options],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    runs = [start("a"), start("b")]
    errors = [_finish(process) for _, process in runs]
    computing = [len(re.findall(r"headstart: computing", e)) for e in errors]
    entries = sorted(p.parent for p in cache.glob("*/meta.json"))
    outputs = [json.loads((e / "meta.json").read_text())["output"] for e in entries]
    assert outputs == ["pooled:gap"]  # the clean view of the 28 train, 8 val and 4 test images
    assert [_assert_whole(e) for e in entries] == [40]  # the test pass's backbone part too
    assert sum(computing) == sum(len(list(e.glob("*.keys.npy"))) for e in entries)

    def files():
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in cache.rglob("*.npy")}

    before = files()
    warm, process = start("warm")
    err = _finish(process)
    assert "headstart: computing" not in err and files() == before, err[-3000:]
    metrics = []  # the same rows, so the same head to the last digit (timings aside)
    for out in (runs[0][0], runs[1][0], warm):
        found = json.loads((out / "metrics.json").read_text())
        timings = ("phase_seconds", "total_seconds", "train_seconds", "extraction_passes")
        timings += ("phase_cpu_seconds", "total_cpu_seconds")
        metrics.append({k: v for k, v in found.items() if k not in timings})
    assert metrics[0] == metrics[1] == metrics[2] and metrics[0]["n_test"] == 4

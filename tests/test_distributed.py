"""Data-parallel training over processes on loopback: `headstart launch` + `train --distributed`.

The multi-process tests run real processes on 127.0.0.1 (JAX backend, gloo collectives) on a
scratch CNN at 32 px; each is bounded by a timeout.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from headstart.cli import main
from headstart.distributed.cluster import Cluster, check_batch_size, even_batches, initialize
from headstart.distributed.launch import free_port, launch, process_environment
from headstart.errors import UsageError
from headstart.model import compile_for
from headstart.training.cache import FeatureCache
from headstart.training.state import read_state

needs_jax = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="JAX not installed: pip install headstart[jax]"
)
TRAIN = [  # the scratch CNN: one stage, the cheapest model
    "--backbone=scratch_cnn",
    "--image-size=32",
    "--head=flatten",
    "--epochs=2",
    "--batch-size=4",  # global batch: 28 train and 8 val images make whole batches
    "--lr=3e-3",
    "--dropout=0",  # dropout masks of a sharded batch need not match the unsharded ones
    "--augment=none",
    "--no-check",
    "--no-report",
]
BOTH_STAGES = [  # tiny_test (random weights, 32 px): a head epoch, then a fine-tuning epoch
    "--backbone=tiny_test",  # tests/conftest.py: registered in the processes by jax_env
    "--weights=none",
    "--mode=frozen",  # what --distributed trains on; the one-process run must do the same
    "--image-size=32",
    "--epochs=1",
    "--fine-tune-epochs=1",
    "--fine-tune-lr=1e-3",
    "--batch-size=4",
    "--lr=3e-3",
    "--dropout=0",
    "--augment=none",
    "--no-check",
    "--no-report",
]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the TensorFlow refusal")
def test_distributed_on_tensorflow_is_a_clear_usage_error():
    with pytest.raises(UsageError, match="needs the JAX backend.*KERAS_BACKEND=jax"):
        initialize("127.0.0.1:1234", 2, 0)


def test_global_batch_must_divide_among_processes():
    check_batch_size(8, Cluster(0, 2))
    with pytest.raises(UsageError, match="--batch-size 9 .* multiple of 2"):
        check_batch_size(9, Cluster(1, 2))


def test_even_batches_drop_the_training_remainder_and_pad_validation_with_weight_0():
    images = tf.data.Dataset.from_tensor_slices((np.arange(10.0)[:, None], np.arange(10)))
    train = list(even_batches(images.batch(4), 10, 4, training=True))
    assert [len(y) for _, y in train] == [4, 4]
    assert even_batches(images.batch(4), 10, 4, training=True).cardinality() == 2
    val = list(even_batches(images.batch(4), 10, 4, training=False))
    assert [len(y) for _, y, _ in val] == [4, 4, 4]
    weights = np.concatenate([w.numpy() for _, _, w in val])
    labels = np.concatenate([y.numpy() for _, y, _ in val])
    np.testing.assert_allclose(weights, [1.2] * 10 + [0.0] * 2)  # 12 rows for 10 images
    assert labels[:10].tolist() == list(range(10))  # every image once, in order


@pytest.mark.parametrize("n_classes", [2, 3])
def test_padded_validation_scores_exactly_the_real_images(n_classes):
    """Tolerance 1e-6 (float32 sums in another order): the padding counts for nothing."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 3)).astype("f4"), rng.integers(0, n_classes, 10).astype("i4")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1 if n_classes == 2 else 3)])
    compile_for(model, n_classes, 1e-3, weighted=True)
    plain = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    expected = model.evaluate(plain, verbose=0, return_dict=True)
    padded = even_batches(plain, 10, 4, training=False)
    got = model.evaluate(padded, verbose=0, return_dict=True)
    assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-6)


def test_launch_refuses_other_verbs_and_no_processes():
    with pytest.raises(UsageError, match="launch runs `train`"):
        launch(2, ["--", "predict", "run"])
    with pytest.raises(UsageError, match="--nproc must be at least 1"):
        launch(0, ["--", "train", "data"])


def test_launched_processes_share_the_cores_unless_the_user_set_the_threads():
    """As torchrun's OMP_NUM_THREADS: cores // processes threads each (at least 1), for OpenMP,
    TensorFlow and XLA alike; a count the user set is kept, and so are their XLA flags."""
    env = process_environment(2, {"PATH": "/bin"}, cores=2)
    assert env["KERAS_BACKEND"] == "jax" and env["PATH"] == "/bin"
    assert env["OMP_NUM_THREADS"] == env["TF_NUM_INTRAOP_THREADS"] == "1"
    assert env["TF_NUM_INTEROP_THREADS"] == "1"
    assert env["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    many = process_environment(3, {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}, cores=16)
    assert many["OMP_NUM_THREADS"] == "5"
    assert many["XLA_FLAGS"] == (
        "--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=5"
    )
    assert process_environment(4, {}, cores=2)["OMP_NUM_THREADS"] == "1"
    mine = {
        "OMP_NUM_THREADS": "2",
        "TF_NUM_INTRAOP_THREADS": "3",
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true",
    }
    chosen = process_environment(2, mine, cores=2)
    assert chosen["OMP_NUM_THREADS"] == chosen["TF_NUM_INTEROP_THREADS"] == "2"
    assert chosen["TF_NUM_INTRAOP_THREADS"] == "3"
    assert chosen["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=true"
    nested = process_environment(2, {"OMP_NUM_THREADS": "4,2"}, cores=8)  # OpenMP's own
    assert nested["OMP_NUM_THREADS"] == "4,2" and "TF_NUM_INTRAOP_THREADS" not in nested
    assert "XLA_FLAGS" not in nested and nested["KERAS_BACKEND"] == "jax"


@pytest.mark.slow
@needs_jax
def test_two_processes_end_identical_and_match_one_process(
    image_folder_factory, tmp_path, jax_env, same_training
):
    """Both stages. Tolerance: weights and every epoch's losses and accuracies within 1e-4 of a
    one-process run with the same global batch and seed (the all-reduce sums in another order;
    measured: 1e-6 on the losses)."""
    data = image_folder_factory(tmp_path / "data", per_class=20)  # 28 train, 8 val, 4 test
    env = jax_env(tmp_path)
    env.pop("OMP_NUM_THREADS", None)  # launch chooses the threads (and says so)
    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "headstart"]
    launched = subprocess.run(
        [*cmd, "launch", "--nproc", "2", "--", "train", str(data), f"--out={two}", *BOTH_STAGES],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stdout[-3000:]
    assert launched.stdout.startswith(  # 2 processes on this machine's cores (CI: 2)
        f"headstart launch: {max(1, os.cpu_count() // 2)} thread(s) per process for the math"
    )
    digests = dict(
        re.findall(r"\[\d\] headstart: process (\d): final weights (\w+)", launched.stdout)
    )
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]  # bit-identical
    assert "[1] process 1 done (process 0 writes the run)" in launched.stdout
    assert not list((tmp_path / "scratch").rglob("model.keras"))  # process 1 cleaned up
    alone = subprocess.run(
        [*cmd, "train", str(data), f"--out={one}", *BOTH_STAGES, "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    rows = same_training(two, one)
    stages = [r["stage"] for r in rows]
    assert stages[:3] == ["head", "fine_tune", "refit_head"]  # then the default refit


@pytest.mark.slow  # a full training run
def test_cluster_options_on_resume_of_a_run_that_was_not_distributed_are_refused(tiny_run, capsys):
    assert main(["train", "--resume", str(tiny_run), "--distributed", "--process-id=1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"headstart: error: --resume {tiny_run}: the run was not --distributed: drop "
        "--distributed, --process-id (or `headstart launch`) and resume it in one process"
    )


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the TensorFlow refusal")
def test_cli_distributed_on_tensorflow_exits_2_with_one_line(tiny_folder, tmp_path, capsys):
    assert main(["train", str(tiny_folder), "--out", str(tmp_path / "run"), "--distributed"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("headstart: error: --distributed needs the JAX backend")
    assert "\n" not in error and not (tmp_path / "run").exists()


@pytest.mark.slow
@needs_jax
def test_distributed_without_a_cluster_says_how_to_give_one(tiny_folder, tmp_path, jax_env):
    done = subprocess.run(
        [sys.executable, "-m", "headstart", "train", str(tiny_folder), "--distributed"],
        capture_output=True,
        text=True,
        env=jax_env(tmp_path),
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "headstart: error: --distributed: JAX found no cluster" in done.stderr
    assert "--coordinator HOST:PORT --num-processes N --process-id I" in done.stderr
    assert not (tmp_path / "runs").exists()


EXTRACT = [  # tiny_test (random weights, 32 px) in extract mode: sharded extraction, both stages
    "--backbone=tiny_test",
    "--weights=none",
    "--image-size=32",
    "--epochs=2",
    "--fine-tune-epochs=1",
    "--fine-tune-lr=1e-3",
    "--batch-size=4",
    "--lr=3e-3",
    "--dropout=0",
    "--augment=flip",
    "--views=1",  # an augmented view: its random draws must match a single process's too
    "--feature-norm=none",
    "--no-check",
]
# crash both processes right after process 0 saved the state of stage 1's first epoch
CRASH_AFTER_FIRST_EPOCH = """
import importlib, os, sys
resume = importlib.import_module("headstart.training.state")
save = resume.ResumeCheckpoint.on_epoch_end
def crash(self, epoch, logs=None):
    save(self, epoch, logs)
    if self.stage == "head" and epoch == 0:
        os._exit(3)
resume.ResumeCheckpoint.on_epoch_end = crash
from headstart.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def sharded_runs(image_folder_factory, tmp_path_factory, jax_env, run_cluster):
    """A 2-process extract-mode run in the manual --coordinator form, as on two machines
    without a shared file system (each process its own cache, "two-0" and "two-1"), crashed
    after its first epoch and resumed by `headstart launch --nproc 2` (both processes then
    share process 0's cache, the run's own); and the same run in one process, uninterrupted,
    with cache "one"."""
    tmp = tmp_path_factory.mktemp("sharded")
    data = image_folder_factory(tmp / "data", per_class=20)  # 28 train, 8 val, 4 test
    env, run = jax_env(tmp), tmp / "two"
    port = free_port()
    train = ["train", str(data), f"--out={run}", *EXTRACT]
    cluster = ["--distributed", f"--coordinator=127.0.0.1:{port}", "--num-processes=2"]
    commands = [
        [sys.executable, "-c", CRASH_AFTER_FIRST_EPOCH, *train, *cluster, f"--process-id={i}"]
        + [f"--cache-dir={tmp / f'cache-two-{i}'}"]
        for i in range(2)
    ]
    codes, tails = run_cluster(commands, env, [tmp / f"crashed-{i}.log" for i in range(2)])
    assert codes == [3, 3], tails
    state = read_state(run)
    scratch_before = sorted((tmp / "scratch").iterdir())
    resumed = subprocess.run(
        [sys.executable, "-m", "headstart", "launch", "--nproc", "2"]
        + ["--", "train", "--resume", str(run)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    alone = subprocess.run(
        [sys.executable, "-m", "headstart", "train", str(data), f"--out={tmp / 'one'}"]
        + [f"--cache-dir={tmp / 'cache-one'}", *EXTRACT, "--quiet", "--no-report"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    return {
        "tmp": tmp,
        "state": state,
        "resumed": resumed.stdout,
        "new_scratch": sorted((tmp / "scratch").iterdir()) != scratch_before,
    }


def _entries(cache: Path) -> dict[str, dict]:
    """Each entry's meta (less when it was last used) and its rows by content key."""
    entries = {}
    for meta in sorted(cache.glob("*/meta.json")):
        index = FeatureCache._index(meta.parent)
        rows = {
            key: np.load(meta.parent / f"{shard}.npy", mmap_mode="r")[row]
            for key, (shard, row) in index.items()
        }
        described = {k: v for k, v in json.loads(meta.read_text()).items() if k != "last_used"}
        entries[meta.parent.name] = {"meta": described, "rows": rows}
    return entries


@pytest.mark.slow
@needs_jax
@pytest.mark.parametrize("process", [0, 1])
def test_sharded_extraction_fills_the_cache_one_process_would(sharded_runs, process):
    """Tolerance 0: each process extracts whole batches of a single process's pass (the same
    images, the same augmentation draws), so every float16 row is bit-identical. With no
    shared cache, each process extracts its own part, then the parts it does not find: the
    very rows of the other process's part, its augmented view's draws included."""
    tmp = sharded_runs["tmp"]
    cache = tmp / f"cache-two-{process}"
    two, one = _entries(cache), _entries(tmp / "cache-one")
    assert len(one) == 2  # the trunk activations of the clean images and of the flipped view
    assert set(two) == set(one)
    for key, entry in one.items():
        assert two[key]["meta"] == entry["meta"]
        # one process also cached its test split's rows (its test pass runs the frozen part
        # like extraction; a distributed run's process 0 scores the test images on Keras)
        extra = set(entry["rows"]) - set(two[key]["rows"])
        assert set(two[key]["rows"]) <= set(entry["rows"])
        # the validation images' flipped view (the refit's, 8 rows) was extracted after the
        # resume, into the run's own cache: process 0's
        later = 8 if process == 1 and entry["meta"]["view"] != "clean" else 0
        assert len(extra) == (4 if entry["meta"]["view"] == "clean" else later)
        for content, row in two[key]["rows"].items():
            np.testing.assert_array_equal(row, entry["rows"][content])
        shards = list((cache / key).glob("*.keys.npy"))
        assert len(shards) >= 2  # written in parts: its own, then the other process's


@pytest.mark.slow
@needs_jax
def test_resumed_distributed_run_ends_as_one_uninterrupted_process(sharded_runs, same_training):
    """The 2-process run crashed after epoch 1 and resumed with `launch --nproc 2` ends
    bit-identical on both processes and within 1e-4 of one uninterrupted process (weights,
    every epoch's losses and accuracies: the all-reduce sums in another order)."""
    tmp, resumed = sharded_runs["tmp"], sharded_runs["resumed"]
    state = sharded_runs["state"]
    assert (state.stage, state.next_epoch) == ("head", 1)
    assert "resuming" in resumed and "stage head, epoch 2" in resumed
    digests = dict(re.findall(r"\[\d\] headstart: process (\d): final weights (\w+)", resumed))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    assert "[1] process 1 done (process 0 writes the run)" in resumed
    assert not sharded_runs["new_scratch"]  # process 1's scratch copy is gone
    two, one = tmp / "two", tmp / "one"
    assert not (two / "resume.npz").exists() and (two / "metrics.json").is_file()
    rows = same_training(two, one)  # the refit too (the default), on the validation images'
    assert [r["epoch"] for r in rows][:3] == ["0", "1", "2"]  # flipped view, extracted in parts
    passes = json.loads((two / "metrics.json").read_text())["extraction_passes"]
    assert rows[3]["stage"] == "refit_head" and ("val", "flip#1") in [
        (p["split"], p["view"]) for p in passes
    ]
    # where the time went: every process logs its breakdown, process 0 writes its own
    assert re.search(r"\[0\] headstart: time [\d.]+ s: start-up ", resumed)
    assert re.search(r"\[1\] headstart: time [\d.]+ s: start-up ", resumed)
    metrics = json.loads((two / "metrics.json").read_text())
    phases = metrics["phase_seconds"]
    assert {"start-up", "stage 1", "stage 2", "refit", "test", "report"} <= set(phases)
    assert sum(phases.values()) == pytest.approx(metrics["total_seconds"], rel=0.01)

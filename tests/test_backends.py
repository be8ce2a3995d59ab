"""The model code is backend-agnostic: the core subset passes on JAX, and a model saved on
TensorFlow predicts the same on JAX."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from headstart.data import read_image

needs_jax = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="JAX not installed: pip install headstart[jax]"
)
ROOT = Path(__file__).resolve().parents[1]


def _on_jax(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT / "src")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the runs' own: the feature cache's
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


@pytest.mark.slow
@needs_jax
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the second pass itself")
def test_core_subset_passes_on_jax(tmp_path):
    """The CI's second backend: `pytest -m core` again with KERAS_BACKEND=jax (~40 s here),
    collecting only the modules with core tests (importing all the others costs seconds).
    Its training runs keep their compiled programs in the feature cache's ``.xla`` folder
    (`headstart.training.cache.use_compilation_cache`): a refit loads stage 1's train step."""
    modules = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").glob("test_*.py")
        if "pytest.mark.core" in path.read_text()
    )
    args = ["-m", "pytest", "-m", "core", "-q", "-p", "no:cacheprovider", "-n", "0", *modules]
    done = _on_jax([*args, f"--basetemp={tmp_path}"], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
    # the nested session's cache (conftest's $HEADSTART_CACHE): programs kept, in one folder
    programs = list(tmp_path.glob("feature_cache*/.xla/*"))
    assert len(programs) >= 3, sorted(p.name for p in tmp_path.rglob("*"))[:50]


@pytest.mark.slow  # another process, on JAX
@needs_jax
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="saves on TensorFlow")
def test_model_saved_on_tensorflow_predicts_the_same_on_jax(tiny_run, tiny_folder, tmp_path):
    """Tolerance: 1e-5 absolute on the outputs (float32 kernels differ between backends)."""
    images = [
        *sorted((tiny_folder / "cat").iterdir())[:3],
        *sorted((tiny_folder / "dog").iterdir())[:3],
    ]
    batch = np.stack([read_image(str(p), (32, 32)) for p in images]).astype("float32")
    np.save(tmp_path / "x.npy", batch)
    ours = keras.saving.load_model(tiny_run / "model.keras").predict(batch, verbose=0)
    code = (
        "import sys, keras, numpy as np\n"
        "assert keras.backend.backend() == 'jax'\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "np.save(sys.argv[3], m.predict(np.load(sys.argv[2]), verbose=0))\n"
    )
    args = [str(tiny_run / "model.keras"), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")]
    done = _on_jax(["-c", code, *args], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = np.load(tmp_path / "y.npy")
    assert theirs.shape == ours.shape == (6, 1)
    assert np.ptp(ours) > 1e-3  # a trained model whose outputs differ between images
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


@pytest.mark.core
def test_augmentation_runs_inside_tf_data_on_every_backend():
    """The input pipeline is tf.data on every backend, augmentation included."""
    import tensorflow as tf

    from headstart.augment import build_augmenter

    augmenter = build_augmenter("flip,rotate=0.1,zoom=0.2", seed=0)
    images = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(4))).batch(4)
    dataset = dataset.map(lambda x, y: (augmenter(x, training=True), y))
    out = next(iter(dataset))[0].numpy()
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 255
    assert not np.allclose(out, images)  # rotated and zoomed

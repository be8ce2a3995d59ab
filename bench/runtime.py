"""Benchmark: the frozen parts on Keras, OpenVINO and ONNX Runtime, images/s and agreement.

EfficientNet-Lite0 with its real ImageNet weights (offline), at 96 and 224 px, batch 32: the
pooled extractor (what stage 1 caches) and the trunk (what fine-tuning caches). The images are
256 crops of scikit-image's colour photos, decoded once into memory and also written as JPEG
files. Every variant runs in this one process, interleaved (one pass of each, then again,
``--repeats`` times; the median pass counts), so machine load hits them alike:

- ``keras``: ``predict_on_batch``, batch after batch (headstart before the runtime seam);
- ``openvino f32 sync``: the compiled model (dynamic batch) called batch after batch;
- ``headstart openvino``: `headstart.runtime.FrozenRunner`, what extraction now uses (static
  batch of 32, `headstart.runtime.OPENVINO_CONFIG`, one request in flight per stream);
- ``openvino f32 throughput``: PERFORMANCE_HINT THROUGHPUT (streams chosen by OpenVINO), an
  AsyncInferQueue of as many requests as it suggests;
- ``openvino f32 static 32``: the IR reshaped to a static batch of 32, called batch after batch;
  then the same with CPU plugin settings headstart does not use: denormals flushed to zero
  (``CPU_DENORMALS_OPTIMIZATION``), threads pinned to cores (``ENABLE_CPU_PINNING``), one
  stream of two threads;
- ``openvino bf16 sync``: OpenVINO's own default precision on this CPU, for information;
- ``onnxruntime``: Keras' ONNX export in an InferenceSession (all cores, sequential);
- from files: `headstart.extract.extract_batches` (tf.data decoding overlapped with inference)
  with Keras and with the headstart runner.

Agreement is against Keras on all 256 images: max abs difference, the same relative to the
largest |output| (headstart's check bounds it by 2^-14), and the lowest cosine similarity.

Usage: ``python bench/runtime.py [--sizes 96 224] [--repeats 5]``; writes
bench/results/runtime.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import openvino
from PIL import Image

from headstart.backbones import build_backbone, default_unfreeze, get_backbone
from headstart.data import Split, make_dataset
from headstart.extract import extract_batches, split_at_cut
from headstart.model import build_model, feature_extractor
from headstart.runtime import OPENVINO, FrozenRunner, predict_on_batch

BATCH = 32
IMAGES = 256
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field")


def photo_crops(folder: Path) -> list[str]:
    """IMAGES JPEG files: random square crops of scikit-image's colour photos."""
    from skimage import data as photos

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(IMAGES):
        image = getattr(photos, PHOTOS[i % len(PHOTOS)])()[..., :3]
        side = int(rng.integers(min(image.shape[:2]) // 3, min(image.shape[:2]) + 1))
        top = int(rng.integers(0, image.shape[0] - side + 1))
        left = int(rng.integers(0, image.shape[1] - side + 1))
        crop = Image.fromarray(image[top : top + side, left : left + side]).resize((256, 256))
        path = folder / f"{i:03d}.jpg"
        crop.save(path, quality=90)
        paths.append(str(path))
    return paths


def decoded(paths: list[str], size: int) -> list[np.ndarray]:
    """The batches headstart's pipeline gives the extractor, decoded once into memory."""
    split = Split(tuple(paths), (0,) * len(paths))
    dataset = make_dataset(split, (size, size), batch_size=BATCH, cache=False)
    return [np.asarray(images) for images, _ in dataset.as_numpy_iterator()]


def export_ir(model: keras.Model, folder: Path) -> tuple[Path, float]:
    started = time.perf_counter()
    path = folder / "model.xml"
    model.export(str(path), format="openvino", verbose=False)
    return path, time.perf_counter() - started


def openvino_variants(xml: Path, runner: FrozenRunner) -> dict:
    """name -> function(batches) -> outputs, each compiled once here."""
    core = openvino.Core()
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    sync = core.compile_model(str(xml), "CPU", {**f32, "PERFORMANCE_HINT": "LATENCY"})
    bf16 = core.compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    throughput = core.compile_model(str(xml), "CPU", {**f32, "PERFORMANCE_HINT": "THROUGHPUT"})
    static_model = core.read_model(str(xml))
    static_model.reshape([BATCH, *list(static_model.inputs[0].partial_shape)[1:]])
    static = core.compile_model(static_model, "CPU", {**f32, "PERFORMANCE_HINT": "LATENCY"})
    tuned = {  # CPU plugin settings beside headstart's (a static batch, THROUGHPUT)
        name: core.compile_model(static_model, "CPU", {**f32, **config})
        for name, config in (
            (
                "denormals flushed",
                {"PERFORMANCE_HINT": "THROUGHPUT", "CPU_DENORMALS_OPTIMIZATION": True},
            ),
            ("threads pinned", {"PERFORMANCE_HINT": "THROUGHPUT", "ENABLE_CPU_PINNING": True}),
            ("1 stream of 2 threads", {"NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": 2}),
        )
    }
    requests = throughput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")

    def pad(batch):  # a static batch: the last one padded to BATCH
        return np.concatenate(
            [batch, np.zeros((BATCH - len(batch), *batch.shape[1:]), batch.dtype)]
        )

    def synchronous(compiled, static=False):
        def run(batches):
            return [np.array(compiled(pad(b) if static else b)[0])[: len(b)] for b in batches]

        return run

    def queued(compiled, static=False):  # as many requests in flight as it suggests
        def run(batches):
            queue = openvino.AsyncInferQueue(
                compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
            )
            done = {}
            queue.set_callback(
                lambda request, i: done.__setitem__(i, np.array(request.get_output_tensor(0).data))
            )
            for i, b in enumerate(batches):
                queue.start_async(pad(b) if static else b, i)
            queue.wait_all()
            return [done[i][: len(b)] for i, b in enumerate(batches)]

        return run

    return {
        "openvino f32 sync": synchronous(sync),
        "headstart openvino": lambda batches: list(runner.outputs(batches)),
        f"openvino f32 throughput ({requests} requests)": queued(throughput),
        "openvino f32 static 32": synchronous(static, static=True),
        **{f"openvino f32 static 32, {name}": queued(c, static=True) for name, c in tuned.items()},
        "openvino bf16 sync": synchronous(bf16),
    }


def onnxruntime_variant(model: keras.Model, folder: Path):
    try:
        import onnxruntime
    except ImportError:
        return None
    path = folder / "model.onnx"
    model.export(str(path), format="onnx", verbose=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batches: [session.run(None, {name: b})[0] for b in batches]


def agreement(expected: np.ndarray, got: np.ndarray) -> dict:
    diff = float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max())
    a, b = expected.reshape(len(expected), -1), got.reshape(len(got), -1)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return {
        "max_abs_diff": diff,
        "max_abs_diff_relative": diff / scale if scale else 0.0,
        "min_cosine": float(cosine.min()),
    }


def measure(part: keras.Model, name: str, size: int, paths, repeats: int, work: Path) -> dict:
    """Every variant on one frozen part, interleaved."""
    batches = decoded(paths, size)
    folder = Path(tempfile.mkdtemp(dir=work))
    xml, export_seconds = export_ir(part, folder)
    started = time.perf_counter()
    runner = FrozenRunner(part, OPENVINO, ir_dir=folder / "headstart", batch_size=BATCH, what=name)
    runner.outputs(batches[:1]).__next__()  # converts, compiles and checks
    runner_seconds = time.perf_counter() - started
    variants = {"keras": lambda bs: [predict_on_batch(part, b) for b in bs]}
    variants.update(openvino_variants(xml, runner))
    onnx = onnxruntime_variant(part, folder)
    if onnx is not None:
        variants["onnxruntime"] = onnx
    files_runners = {
        "keras, from files": part,
        "headstart openvino, from files": runner,
    }
    for function in variants.values():  # warm-up
        function(batches[:2])
    timings = {name: [] for name in [*variants, *files_runners]}
    outputs = {}
    for _ in range(repeats):
        for variant, function in variants.items():
            started = time.perf_counter()
            outputs[variant] = np.concatenate(function(batches))
            timings[variant].append(time.perf_counter() - started)
        for variant, extractor in files_runners.items():
            started = time.perf_counter()
            outputs[variant] = np.concatenate(
                list(extract_batches(extractor, paths, size, batch_size=BATCH, verbose=False))
            )
            timings[variant].append(time.perf_counter() - started)
    expected = outputs["keras"]
    result = {
        "part": name,
        "size": size,
        "output_shape": list(expected.shape[1:]),
        "export_seconds": round(export_seconds, 2),
        "headstart_prepare_seconds": round(runner_seconds, 2),
        "headstart_check": runner.agreement,
        "headstart_runtime_after": runner.key,
        "variants": {},
    }
    keras_rate = IMAGES / statistics.median(timings["keras"])
    for variant, seconds in timings.items():
        rate = IMAGES / statistics.median(seconds)
        result["variants"][variant] = {
            "images_per_s": round(rate, 1),
            "vs_keras": round(rate / keras_rate, 2),
            "best_pass_images_per_s": round(IMAGES / min(seconds), 1),
            "best_vs_keras": round(min(timings["keras"]) / min(seconds), 2),
            "passes_s": [round(s, 3) for s in seconds],
            **agreement(expected, outputs[variant]),
        }
    return result


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"EfficientNet-Lite0 (ImageNet weights), batch {BATCH}, {IMAGES} images, median of "
        f"{meta['repeats']} interleaved passes; {meta['cpus']} CPUs ({meta['processor']}), "
        f"shared: load average {meta['load_before']} before, {meta['load_after']} after; "
        f"OpenVINO {meta['openvino']}, onnxruntime {meta['onnxruntime']}, "
        f"TensorFlow {meta['tensorflow']}.",
        "",
        "| part | px | variant | images/s (median) | vs Keras | best pass | vs Keras' best |"
        " max abs diff | rel. to max | min cosine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for variant, r in result["variants"].items():
            lines.append(
                f"| {result['part']} | {result['size']} | {variant} | {r['images_per_s']} | "
                f"{r['vs_keras']}x | {r['best_pass_images_per_s']} | {r['best_vs_keras']}x | "
                f"{r['max_abs_diff']:.1e} | {r['max_abs_diff_relative']:.1e} | "
                f"{r['min_cosine']:.6f} |"
            )
    lines.append("")
    lines.append("| part | px | Keras export to IR s | runner ready (export, compile, check) s |")
    lines.append("|---|---|---|---|")
    for result in results:
        lines.append(
            f"| {result['part']} | {result['size']} | {result['export_seconds']} | "
            f"{result['headstart_prepare_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--parts", nargs="+", default=["pooled", "trunk"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="headstart-runtime-"))
    paths = photo_crops(work / "images")
    backbone = get_backbone("efficientnet_lite0")
    results = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    for size in args.sizes:
        base = build_backbone(backbone, size, "imagenet")
        model = build_model(backbone, base, 10)
        parts = {"pooled": feature_extractor(model)}
        if "trunk" in args.parts:
            parts["trunk"] = split_at_cut(model, base, default_unfreeze(backbone, base)).trunk
        for name in args.parts:
            result = measure(parts[name], name, size, paths, args.repeats, work)
            results.append(result)
            print(json.dumps(result["variants"], indent=1), flush=True)
    meta = {
        "repeats": args.repeats,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "openvino": openvino.get_version(),
        "onnxruntime": _version("onnxruntime"),
        "tensorflow": _version("tensorflow"),
        "keras": keras.__version__,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    table = markdown(results, meta)
    (out / "runtime.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""Benchmark: which head trains best on cached features (issue "never loses to cached features").

On the Fashion-MNIST split of ``bench/fast_loop.py`` (100 train + 50 validation images per
class, all 10,000 test images), the default backbone's pooled features are extracted once
per size (clean images, plus ``--views`` flip views of the training images), then linear heads
are trained by stage 1's procedure (Adam 1e-3, dropout 0.2, early stopping on validation
loss with patience 3, the learning rate divided by 5 on plateaus, the best epoch on
validation loss kept), over several seeds:

  glorot       the classic head: Dense on raw features, Glorot-uniform kernel (Keras' default)
  zeros        the same Dense with a zero-initialised kernel (headstart's head)
  zeros+l2     zero-initialised, on L2-normalised features scaled to radius sqrt(dim)
               (headstart's ``--feature-norm l2``)
  glorot+l2    L2-normalised features with the default initialisation (the two changes apart)

and, with ``--more``, the other head options the "never loses to cached features" issue names,
each on headstart's head (zeros+l2): a higher learning rate (1e-2), label smoothing 0.1, and
AdamW weight decay 1e-2.

Usage: ``python bench/head_options.py [--sizes 96 160] [--seeds 3]``; writes
bench/results/head_options.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from fast_loop import write_dataset  # noqa: E402  (the shared Fashion-MNIST split)

VARIANTS = {
    "glorot": dict(init="glorot_uniform", norm="none"),
    "zeros": dict(init="zeros", norm="none"),
    "zeros+l2": dict(init="zeros", norm="l2"),
    "glorot+l2": dict(init="glorot_uniform", norm="l2"),
}
MORE = {
    "zeros+l2, lr 1e-2": dict(init="zeros", norm="l2", learning_rate=1e-2),
    "zeros+l2, label smoothing 0.1": dict(init="zeros", norm="l2", label_smoothing=0.1),
    "zeros+l2, weight decay 1e-2": dict(init="zeros", norm="l2", weight_decay=1e-2),
}


def feature_views(data: Path, size: int):
    """headstart's own `FeatureViews` over the benchmark split (EfficientNet-Lite0, its offline
    weights, seed 0, no feature cache): the extraction every run does, with nothing re-wired."""
    from headstart import Config
    from headstart.backbones import get_backbone, resolve_weights
    from headstart.model import build_from_config
    from headstart.splits import load_image_folder
    from headstart.training.views import FeatureViews

    spec = get_backbone("efficientnet_lite0")
    config = Config(
        data=str(data),
        image_size=size,
        weights=resolve_weights(spec, "default"),
        batch_size=32,
        cache=False,
        quiet=True,
    )
    folder = load_image_folder(str(data), val_split=0.2, test_split=0.1, seed=config.seed)
    model, _ = build_from_config(config, spec, len(folder.class_names))
    return FeatureViews(config, spec, folder, model, cache=None), folder


def features(data: Path, size: int, views: int) -> dict[str, list[np.ndarray]]:
    """Pooled features of every split: view 0 clean, then ``views`` flipped training views."""
    extracted, folder = feature_views(data, size)
    out = {}
    for split in ("train", "val", "test"):
        n_views = views if split == "train" else 0
        out[split] = [
            np.asarray(view, dtype="float32")
            for view in extracted.views("pooled", split, "flip", n_views)
        ]
        out[f"{split}_labels"] = np.asarray(getattr(folder, split).labels)
    return out


def train_head(
    data: dict,
    init: str,
    norm: str,
    seed: int,
    learning_rate: float = 1e-3,
    label_smoothing: float = 0.0,
    weight_decay: float = 0.0,
) -> dict[str, float]:
    import keras
    from keras import layers

    from headstart.extract import ViewSampler

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((data["train"][0].shape[1],))
    x = inputs
    if norm == "l2":
        x = layers.UnitNormalization()(x)
        x = layers.Rescaling(float(np.sqrt(inputs.shape[-1])))(x)
    x = layers.Dropout(0.2)(x)
    head = keras.Model(inputs, layers.Dense(10, kernel_initializer=init)(x))
    optimizer = (
        keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
        if weight_decay
        else keras.optimizers.Adam(learning_rate)
    )
    # label smoothing needs one-hot targets (SparseCategoricalCrossentropy has none)
    encode = (lambda y: keras.utils.to_categorical(y, 10)) if label_smoothing else (lambda y: y)
    head.compile(
        optimizer,
        keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing)
        if label_smoothing
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy")
            if label_smoothing
            else keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        ],
    )
    train = ViewSampler(data["train"], encode(data["train_labels"]), 32, seed=seed)
    best = {"val_loss": np.inf}

    def keep_best(epoch, logs):
        if logs["val_loss"] < best["val_loss"]:
            best.update(val_loss=logs["val_loss"], val_accuracy=logs["val_accuracy"])
            best["weights"] = head.get_weights()

    head.fit(
        train,
        validation_data=(data["val"][0], encode(data["val_labels"])),
        epochs=20,
        shuffle=False,
        verbose=0,
        callbacks=[
            keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, _: train.set_epoch(e)),
            keras.callbacks.EarlyStopping(patience=3),
            keras.callbacks.ReduceLROnPlateau(factor=0.2, patience=2),
            keras.callbacks.LambdaCallback(on_epoch_end=keep_best),
        ],
    )
    head.set_weights(best["weights"])
    predicted = head.predict(data["test"][0], batch_size=1024, verbose=0).argmax(1)
    return {
        "val_accuracy": round(float(best["val_accuracy"]), 4),
        "val_loss": round(float(best["val_loss"]), 4),
        "test_accuracy": round(float((predicted == data["test_labels"]).mean()), 4),
    }


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}; {results['date']}; mean over seeds {results['seeds']}",
        "",
        "| size | training views | head | val accuracy | val loss | test accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for key, by_variant in results["runs"].items():
        size, views = key.split("/")
        for name, runs in by_variant.items():
            mean = {m: np.mean([r[m] for r in runs]) for m in runs[0]}
            lines.append(
                f"| {size} | {views} | {name} | {mean['val_accuracy']:.4f} | "
                f"{mean['val_loss']:.4f} | {mean['test_accuracy']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 160])
    parser.add_argument("--views", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--more", action="store_true", help="only the other head options")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "headstart-bench"))
    args = parser.parse_args()
    data = write_dataset(Path(args.work) / "fashion")
    results = {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "seeds": list(range(args.seeds)),
        "runs": {},
    }
    for size in args.sizes:
        extracted = features(data, size, max(args.views))
        for views in args.views:
            subset = {**extracted, "train": extracted["train"][: 1 + views]}
            results["runs"][f"{size}/{views}"] = {
                name: [train_head(subset, seed=s, **options) for s in results["seeds"]]
                for name, options in (MORE if args.more else VARIANTS).items()
            }
            print(markdown(results), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "head_options_more" if args.more else "head_options"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(results))


if __name__ == "__main__":
    main()

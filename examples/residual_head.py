"""A custom head from Python: the advanced-tools chapter's residual connection, on the
pooled features.

    python examples/residual_head.py [DATA] [--out RUN] [--backbone NAME]

DATA defaults to the Fashion-MNIST sample bundled with headstart. The head is built from
plain Keras layers (so model.keras loads anywhere) and takes the backbone's pooled features, so
stage 1 still trains on the feature cache; config.json records ``custom_head``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from keras import layers

from headstart import Config, train
from headstart.model import output_units

DEMO_DATA = Path(__file__).resolve().parents[1] / "src/headstart/demo_data/fashion_mnist"


def residual_head(features, n_classes: int, width: int = 128):
    """features -> Dense(width) -> [Dense(width) + shortcut] -> Dropout -> logits.

    The shortcut adds the block's input to its output (``layers.add``, the advanced-tools
    chapter), so the block only has to learn a correction; both sides have ``width`` units, so
    no projection is needed.
    """
    x = layers.Dense(width, activation="relu", name="project")(features)
    y = layers.Dense(width, activation="relu", name="block")(x)
    y = layers.add([x, y], name="residual")
    y = layers.Dropout(0.2, name="dropout")(y)
    return layers.Dense(output_units(n_classes), name="logits")(y)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(DEMO_DATA))
    parser.add_argument("--out")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="default", help="imagenet, none, or a file")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)
    config = Config(
        data=args.data,
        out=args.out,
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        epochs=args.epochs,
        quiet=True,
    )
    result = train(config, head_builder=residual_head)
    print(f"test accuracy {result.metrics.get('accuracy', float('nan')):.4f}, run {result.run_dir}")
    return result.run_dir


if __name__ == "__main__":
    main()

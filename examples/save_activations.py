"""The advanced-tools chapter's custom callback: save the activations of a fixed validation
sample every epoch.

    python examples/save_activations.py [DATA] [--out RUN] [--backbone NAME]

DATA defaults to the Fashion-MNIST sample bundled with headstart. After every epoch of each
stage, the callback runs the same few validation images through the whole classifier and saves
each top-level layer's output as ``RUN/activations/<stage>_epoch<NNN>_<layer>.npy``, e.g.
``head_epoch001_features.npy`` (images x pooled features) and ``head_epoch001_classifier.npy``
(images x logits). Stage 1 trains the head on cached features, so the backbone's activations
stay the same there; the head's change from epoch to epoch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import keras
import numpy as np

from headstart import Config, train
from headstart.data import read_image
from headstart.training.callbacks import RunCallback

DEMO_DATA = Path(__file__).resolve().parents[1] / "src/headstart/demo_data/fashion_mnist"


class SaveActivations(RunCallback):
    """Every layer's output on the first ``n_images`` validation images, after every epoch.

    A `RunCallback`, so it sees the whole classifier (``self.classifier``, raw images in) even
    while ``fit`` trains the head alone on cached features (``self.model``).
    """

    def __init__(self, n_images: int = 4):
        super().__init__()
        self.n_images = n_images
        self._sample = None
        self._probe = None

    def on_train_begin(self, logs=None):
        if self._probe is None:  # the same images and the same layers in both stages
            self._sample = self._validation_sample()
            # headstart's classifier is a chain of top-level layers (image, preprocessing,
            # backbone, features, classifier); called anew, as the layers also serve in the
            # frozen extractors headstart built, whose outputs are not this model's
            layers = self.classifier.layers[1:]
            self._names = [layer.name for layer in layers]
            x = inputs = keras.Input(self.classifier.input_shape[1:])
            outputs = []
            for layer in layers:
                x = layer(x)
                outputs.append(x)
            self._probe = keras.Model(inputs, outputs, name="activations")

    def on_epoch_end(self, epoch, logs=None):
        folder = self.run_dir / "activations"
        folder.mkdir(exist_ok=True)
        outputs = self._probe(self._sample, training=False)
        for name, value in zip(self._names, outputs, strict=True):
            path = folder / f"{self.stage}_epoch{epoch + 1:03d}_{name}.npy"
            np.save(path, keras.ops.convert_to_numpy(value))

    def _validation_sample(self) -> np.ndarray:
        """The first validation images of the run's split.json, at the model's input size."""
        manifest = json.loads((self.run_dir / "split.json").read_text(encoding="utf-8"))
        size = tuple(self.classifier.input_shape[1:3])
        files = [Path(manifest["root"]) / rel for rel, _ in manifest["val"][: self.n_images]]
        return np.stack([read_image(str(path), size) for path in files]).astype("float32")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(DEMO_DATA))
    parser.add_argument("--out")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="default", help="imagenet, none, or a file")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--images", type=int, default=4, help="validation images to probe")
    args = parser.parse_args(argv)
    config = Config(
        data=args.data,
        out=args.out,
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        epochs=args.epochs,
        fine_tune_epochs=2,
        quiet=True,
    )
    result = train(config, callbacks=[SaveActivations(args.images)])
    print(f"activations saved to {result.run_dir / 'activations'}")
    return result.run_dir


if __name__ == "__main__":
    main()

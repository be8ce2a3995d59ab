"""``headstart demo``: the whole recipe on a small real dataset shipped with the package."""

from __future__ import annotations

from importlib import resources

from headstart.config import Config
from headstart.training import TrainResult, train

DEMO_IMAGE_SIZE = 128  # Fashion-MNIST is 28x28: 128 px keeps the demo to minutes on 2 CPU cores


def demo_data_path() -> str:
    """1,000 Fashion-MNIST training images (100 per class, MIT licence) as PNG class folders."""
    return str(resources.files("headstart") / "demo_data" / "fashion_mnist")


def demo(
    out: str | None = None, *, quiet: bool = False, started: float | None = None
) -> TrainResult:
    """Train and evaluate the default offline backbone on the demo data (``started``: as
    for `train`)."""
    config = Config(data=demo_data_path(), out=out, image_size=DEMO_IMAGE_SIZE, quiet=quiet)
    return train(config, started=started)

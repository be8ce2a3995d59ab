"""headstart: a folder of labelled images in, a fine-tuned Keras image classifier out."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TensorFlow's C++ start-up chatter

from headstart._version import __version__
from headstart.backbones import list_backbones
from headstart.config import Config
from headstart.demo import demo
from headstart.deploy.predict import predict
from headstart.errors import UsageError
from headstart.evaluate import evaluate
from headstart.summary import summary
from headstart.train import train

__all__ = [
    "Config",
    "__version__",
    "UsageError",
    "demo",
    "evaluate",
    "list_backbones",
    "predict",
    "summary",
    "train",
]

"""headstart: a folder of labelled images in, a fine-tuned Keras image classifier out."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TensorFlow's C++ start-up chatter

from headstart.backbones import list_backbones
from headstart.config import Config
from headstart.demo import demo
from headstart.errors import UsageError
from headstart.evaluate import evaluate
from headstart.model import summary
from headstart.predict import predict
from headstart.train import train

__version__ = "0.1.0"

__all__ = [
    "Config",
    "UsageError",
    "demo",
    "evaluate",
    "list_backbones",
    "predict",
    "summary",
    "train",
]

"""headstart: a folder of labelled images in, a fine-tuned Keras image classifier out.

The public functions load on first use: ``import headstart`` (and so the ``headstart`` command's
``--help``) does not import Keras or TensorFlow until a verb needs them.
"""

import importlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TensorFlow's C++ start-up chatter

from headstart._version import __version__  # noqa: E402
from headstart.errors import DiskFullError, UsageError  # noqa: E402

# public name -> the module that defines it (none of these names is also a module's)
_PUBLIC = {
    "Config": "headstart.config",
    "MlflowTracker": "headstart.tracking",
    "Tracker": "headstart.tracking",
    "demo": "headstart.training.demo",
    "evaluate": "headstart.evaluation",
    "list_backbones": "headstart.backbones",
    "predict": "headstart.deploy.predict",
    "summary": "headstart.summaries",
    "train": "headstart.training",
    "train_with_budget": "headstart.budget",
}

__all__ = ["DiskFullError", "UsageError", "__version__", *sorted(_PUBLIC)]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'headstart' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))

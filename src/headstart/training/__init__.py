"""Training: the recipe (`train`, `resume`), its two stages (`session`), the choices it makes
on validation (`choose`), the cached features (`views`, `cache`), callbacks and resumable
state.

`train`, `resume` and their types load from `headstart.training.recipe` on first use, so that
importing one submodule (the feature cache for `headstart cache ls`, the resume state for a
Ctrl-C message) does not load the whole recipe with it.
"""

import importlib

__all__ = ["HeadBuilder", "TrainResult", "resume", "train"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'headstart.training' has no attribute {name!r}")
    value = getattr(importlib.import_module("headstart.training.recipe"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value

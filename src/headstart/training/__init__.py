"""Training: the recipe (`train`, `resume`), its two stages (`session`), the choices it makes
on validation (`choose`), the cached features (`views`, `cache`), callbacks and resumable
state."""

from headstart.training.recipe import HeadBuilder, TrainResult, resume, train

__all__ = ["HeadBuilder", "TrainResult", "resume", "train"]

"""The recipe: train a head on the frozen backbone, then fine-tune the top of the backbone."""

from headstart.training.recipe import *  # noqa: F403  (temporary during the move)
from headstart.training.recipe import _build, _climb, _load_folder, _weights_id  # noqa: F401

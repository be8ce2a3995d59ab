"""The custom Keras layers a saved headstart model may hold, registered with Keras.

Keras-only: `headstart.runs` imports this module before it loads any ``model.keras``, so every
run folder loads with ``safe_mode`` whatever verb made it.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from headstart.metrics import EPSILON

_LOG_FLOOR = 1e-12  # probabilities are floored here before the log: logits stay finite


@keras.saving.register_keras_serializable(package="headstart")
class ProbabilityAverage(layers.Layer):
    """Members' logits in, the logits of their weighted mean class probability out.

    Multi-class: ``log(sum_i w_i softmax(l_i))``, whose softmax is the mean itself. Two classes
    (one sigmoid logit each): ``logit(sum_i w_i sigmoid(l_i))``. Keras has no built-in layer
    for the log, hence this one (registered, so ``.keras`` files load with ``safe_mode``).
    """

    def __init__(self, member_weights: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self.member_weights = [float(w) for w in member_weights]

    def call(self, member_logits):
        ops = keras.ops
        binary = member_logits[0].shape[-1] == 1
        squash = ops.sigmoid if binary else ops.softmax
        mean = sum(w * squash(x) for w, x in zip(self.member_weights, member_logits, strict=True))
        if binary:
            mean = ops.clip(mean, EPSILON, 1 - EPSILON)  # float32 cannot hold 1 - p nearer 1
            return ops.log(mean) - ops.log(1 - mean)
        return ops.log(ops.maximum(mean, _LOG_FLOOR))

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "member_weights": self.member_weights}

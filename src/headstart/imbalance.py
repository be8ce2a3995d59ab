"""Class imbalance: ``--class-weight auto|balanced|none``.

A head trained on 300 cats and 30 dogs learns that "cat" is a safe answer. Balanced class
weights (scikit-learn's definition, ``n_samples / (n_classes * count_c)``) make every class
contribute the same total weight to the training loss. Over the training split they average
exactly 1, so the weighted loss stays on the scale of the unweighted one and the learning
rates of the recipe need no change.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from headstart.config import CLASS_WEIGHT_CHOICES, IMBALANCE_THRESHOLD
from headstart.errors import UsageError


def imbalance_ratio(counts: Sequence[int]) -> float | None:
    """Largest / smallest class count; None when a class has no images (undefined)."""
    counts = [int(c) for c in counts]
    if not counts or min(counts) == 0:
        return None
    return max(counts) / min(counts)


def resolve_class_weight(choice: str, counts: Sequence[int]) -> str:
    """``auto`` -> ``balanced`` when the training split's imbalance ratio exceeds
    `IMBALANCE_THRESHOLD` (or a class is missing from it), else ``none``; other choices stay."""
    if choice not in CLASS_WEIGHT_CHOICES:
        raise UsageError(f"--class-weight must be one of {', '.join(CLASS_WEIGHT_CHOICES)}")
    if choice != "auto":
        return choice
    ratio = imbalance_ratio(counts)
    return "balanced" if ratio is None or ratio > IMBALANCE_THRESHOLD else "none"


def balanced_weights(counts: Sequence[int]) -> dict[int, float]:
    """``{class index: n_samples / (n_classes * count)}``; a class with no training images gets
    1.0 (it never occurs in training, so its weight is never used)."""
    counts = np.asarray(counts, dtype=np.float64)
    n_classes = len(counts)
    weights = np.ones(n_classes)
    np.divide(counts.sum(), n_classes * counts, out=weights, where=counts > 0)
    return {i: float(w) for i, w in enumerate(weights)}


def class_weights(choice: str, counts: Sequence[int]) -> dict[int, float] | None:
    """What ``fit(class_weight=...)`` gets for a resolved choice: None for ``none``."""
    return balanced_weights(counts) if resolve_class_weight(choice, counts) == "balanced" else None

"""How much a choice made on a few hundred images can be trusted: folds, standard errors and
the one-standard-error rule.

A candidate's score on one validation split of 500 images has a 95% interval of about ±3
points near 0.83; candidates that differ by less are a coin toss. `headstart.training.choose`
scores the cheap candidates by k-fold cross-validation over the training and validation
images (`fold_assignment`, `mean_and_se`), the expensive ones on the single split with a
*paired* standard error of their per-image differences (`paired_se`), and keeps the simplest
candidate whose score is within one standard error of the best's (`one_se_choice`, the
one-standard-error rule of Breiman et al.'s CART and of Hastie, Tibshirani and Friedman's
*Elements of Statistical Learning*, 7.10).

Nothing here trains: plain numbers in, plain numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def fold_assignment(targets: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each row's fold (0..folds-1), stratified: every class's rows, shuffled by ``seed``,
    are dealt round the folds, continuing where the previous class stopped, so each fold
    holds about 1/folds of every class and the folds' sizes differ by at most one.

    ``targets``: class indices (one per row), or a multi-label 0/1 matrix (rows x labels),
    whose rows are dealt in one seeded shuffle (a label set is not one class)."""
    targets = np.asarray(targets)
    rng = np.random.default_rng([seed, folds])
    fold = np.empty(len(targets), dtype=np.int64)
    if targets.ndim > 1:
        fold[rng.permutation(len(targets))] = np.arange(len(targets)) % folds
        return fold
    start = 0
    for label in np.unique(targets):
        rows = rng.permutation(np.flatnonzero(targets == label))
        fold[rows] = (start + np.arange(len(rows))) % folds
        start += len(rows)
    return fold


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """The mean of ``values`` (one score per fold) and its standard error, the sample
    standard deviation over sqrt(n) (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def paired_se(a: Sequence[float], b: Sequence[float]) -> float:
    """The standard error of mean(a) - mean(b) where both are scored on the same items (per
    image: 1/0 right or wrong, or a loss): the sample standard deviation of the per-item
    differences over sqrt(n). Pairing removes what both candidates find easy or hard alike,
    so it is far smaller than either score's own error when they mostly agree."""
    differences = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(differences) < 2:
        return 0.0
    return float(differences.std(ddof=1) / math.sqrt(len(differences)))


def one_se_choice(
    means: dict[str, float | None],
    tolerance: Callable[[str, str], float],
    *,
    lower_is_better: bool = False,
) -> tuple[str | None, str | None]:
    """The one-standard-error rule: (chosen, best) among ``means`` (given simplest, cheapest
    first; None: the candidate has no score and cannot be chosen).

    ``best`` has the best mean (the first of equals); ``chosen`` is the first candidate
    whose mean is within ``tolerance(candidate, best)`` of the best's, inclusive (the best's
    standard error for cross-validated means; the paired standard error of the two for
    scores on one split). Both None when no candidate has a score."""
    scored = [name for name, mean in means.items() if mean is not None]
    if not scored:
        return None, None
    sign = 1.0 if lower_is_better else -1.0  # smaller `sign * mean` is better
    best = min(scored, key=lambda name: sign * means[name])
    for name in scored:
        if sign * (means[name] - means[best]) <= tolerance(name, best) + 1e-12:
            return name, best
    return best, best  # not reached: the best is within any tolerance of itself

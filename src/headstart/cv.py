"""``headstart cv DATA --folds K``: stratified K-fold cross-validation, mean ± std (DATA: a
folder, or a CSV labels file whose split column, if any, is pooled like split folders).

On a small dataset one test split of 50 images says little: another split could move the
accuracy by several points. K-fold tests every image exactly once, on a model that never saw
it, and the spread over the folds shows how much a single split can be trusted.

Each fold is an ordinary run (``OUT/fold1`` ...) of the library's `train`, on a split
manifest (``OUT/splits/fold1.json``, the ``--split-from`` mechanism): fold k's images are
the test split, the rest is split into train and validation as `train` would. In extract mode
the feature cache keys rows by image content, so the backbone extracts each image's features
once for all folds; each fold's test images still go through the full model once, to score it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from headstart import files, runs
from headstart.config import Config
from headstart.data import ImageFolder
from headstart.errors import UsageError
from headstart.splits import fold_folder, fold_of, load_image_folder, write_split_manifest
from headstart.training import train

log = logging.getLogger(__name__)

CV_FILE = "cv.json"
DEFAULT_FOLDS = 5
SCORES = ("accuracy", "macro_f1", "balanced_accuracy")


def cross_validate(config: Config, folds: int = DEFAULT_FOLDS) -> dict:
    """Train ``folds`` runs of ``config`` (one per fold, into ``config.out``) and write
    ``cv.json``: each fold's test accuracy, macro-F1 and balanced accuracy, and their mean and
    sample standard deviation over the folds. Every setting of ``config`` applies to every
    fold (the CLI's ``cv`` turns fine-tuning off unless ``--fine-tune`` is given)."""

    if folds < 2:
        raise UsageError("--folds must be at least 2")
    if config.split_from:
        raise UsageError("cv makes its own splits: drop --split-from")
    pooled = load_image_folder(
        config.data,
        root=config.root,
        val_split=0.0,
        test_split=0.0,
        seed=config.seed,
        multi_label=config.multi_label,
    )
    where = fold_of(pooled, folds, config.seed)
    out = runs.new_run_dir(config.out)
    rows = []
    for fold in range(folds):
        folder = fold_folder(pooled, where, fold, config.val_split, config.seed)
        manifest = write_split_manifest(
            folder,
            out / "splits" / f"fold{fold + 1}.json",
            note=f"headstart cv: fold {fold + 1} of {folds}, seed {config.seed}",
        )
        log.info("fold %d of %d: %d test images", fold + 1, folds, len(folder.test))
        result = train(
            dataclasses.replace(config, out=str(out / f"fold{fold + 1}"), split_from=str(manifest))
        )
        rows.append(_fold_row(fold, folder, result))
    summary = {
        "data": str(Path(config.data).resolve()),
        "folds": folds,
        "seed": config.seed,
        "fine_tune": config.fine_tune,
        "per_fold": rows,
        "mean": {key: float(np.mean([r[key] for r in rows])) for key in SCORES},
        "std": {key: float(np.std([r[key] for r in rows], ddof=1)) for key in SCORES},
        "std_of": "folds (sample standard deviation, ddof=1)",
        "skipped": len(pooled.skipped),
        "out": str(out),
    }
    files.write_json(out / CV_FILE, summary)
    return summary


def _fold_row(fold: int, folder: ImageFolder, result) -> dict:
    metrics = result.metrics
    return {
        "fold": fold + 1,
        "n_train": len(folder.train),
        "n_val": len(folder.val),
        "n_test": len(folder.test),
        **{key: float(metrics[key]) for key in SCORES},
        "run": str(result.run_dir),
    }


def format_cv(summary: dict) -> str:
    """The per-fold table and the mean ± std line, for the terminal."""
    lines = [f"{'fold':>4}  {'test images':>11}  {'accuracy':>8}  {'macro-F1':>8}"]
    for row in summary["per_fold"]:
        lines.append(
            f"{row['fold']:>4}  {row['n_test']:>11}  {row['accuracy']:>8.4f}  "
            f"{row['macro_f1']:>8.4f}"
        )
    mean, std = summary["mean"], summary["std"]
    lines.append(
        f"{summary['folds']}-fold cross-validation: accuracy {mean['accuracy']:.4f} ± "
        f"{std['accuracy']:.4f}, macro-F1 {mean['macro_f1']:.4f} ± {std['macro_f1']:.4f} "
        f"(mean ± std over folds)"
    )
    return "\n".join(lines)

"""The time budget (``--time-limit MINUTES``, ``--quality fast|balanced|best``): the default
model first, then candidates while the time allows, then the ensemble of those that help.

Without a budget (the default, ``--quality fast``, ``--time-limit 0``) this is `train`: one
model, in the time it always took, and one log line saying how to buy more. With one, the run
folder ``RUN`` holds every model trained in ``RUN/members/NAME/`` (each a normal run), and
``RUN`` itself is the result: the ensemble of the members that help, or the best member alone.

1. The default model trains first (``members/default``), writing its choosing phase's
   validation probabilities (`headstart.training.recipe.write_validation_probabilities`: out of
   sample even though the model is refit on train + validation).
2. Its measured times (metrics.json's ``phase_seconds`` and ``extraction_passes``) price every
   candidate (`Costs`, `estimate_seconds`): the backbone's work scales with the image size²
   and each backbone's relative cost (`BACKBONE_COST`); the rest of the run does not.
3. While time remains, the candidate with the most expected accuracy per estimated second
   that fits what remains is trained (`next_candidate`): a larger input size, a deeper
   fine-tune (every block) at that size, the other offline EfficientNet-Lite backbones and a
   two-backbone fusion (`default_candidates`). Each reuses the default run's split and its
   cheap choices (augmentation, head input), chooses its own fine-tuning rate, and is stopped at
   the deadline if its estimate was short (`deadline`); estimates are corrected by the ratio of
   actual to estimated seconds so far.
4. The members' validation probabilities decide the result: the ensemble (weights fitted on
   validation, `headstart.ensemble.fit_weights`) is kept only if k-fold cross-validation over
   the validation images says it beats its best member by more than one standard error
   (`ensemble_evidence`); otherwise the best member alone, which is the default model unless
   another beats it by more than one standard error (`best_member`).

metrics.json's ``budget`` records each candidate's estimate and actual seconds, what it scored
on validation, what was kept, and the ensemble's evidence.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headstart import files, runs
from headstart.backbones import FUSION_SEPARATOR, get_backbone
from headstart.config import Config
from headstart.ensemble import ensemble, fit_weights
from headstart.errors import DiskFullError, UsageError
from headstart.report import redraw
from headstart.training.noise import fold_assignment, mean_and_se, paired_se
from headstart.training.recipe import (
    VALIDATION_PROBABILITIES_FILE,
    TrainResult,
    read_validation_probabilities,
    train,
)

log = logging.getLogger(__name__)

# --quality's minutes. balanced: the 10 minutes on 2 cores, where the benchmark's
# default run (1,500 labelled images, 10,000 test images) takes 90 s at 96 px and
# `estimate_seconds` prices the fusion with Lite1, Lite1, Lite2 and Lite0 at 160 px at 58, 39,
# 85 and 133 s: all of them and their ensemble. best: 30, room for the full fine-tune at 160 px
# too (666 s).
QUALITY_MINUTES = {"fast": 0.0, "balanced": 10.0, "best": 30.0}
MEMBERS_DIR = "members"
DEFAULT_MEMBER = "default"
# The backbone's cost per pixel relative to Lite0's: published multiply-adds at each native
# size over that size squared (EfficientNet-Lite: 407M at 224, 631M at 240, 899M at 260 px).
# Another backbone (a test's tiny one) counts as 1.
BACKBONE_COST = {"efficientnet_lite0": 1.0, "efficientnet_lite1": 1.35, "efficientnet_lite2": 1.64}
LITE = tuple(BACKBONE_COST)  # the backbones whose ImageNet weights are offline
SIZE_LADDER = (96, 128, 160, 192, 224, 260, 300)
# Seconds per image of one extraction pass of Lite0 at 224 px on 2 cores (OpenVINO), when the
# default run extracted nothing (a warm feature cache): 1.35 ms at 96 px in the benchmark's
# default run (10,000 test images in 13.5 s), times (224 / 96)^2.
FALLBACK_SECONDS_PER_IMAGE_224 = 0.0074
# A training step on images (forward and backward, Keras, augmentation) against one extraction
# forward pass, per image: the deeper fine-tune's cost per epoch.
TRAIN_STEP_COST = 4.0
# ... and its start: tracing the whole backbone's training step (the first epoch of
# `--unfreeze all` on Lite0 at 128 px took 16.3 s, the next 3.2 s, on 30 images)
DEEP_START_SECONDS = 15.0
# Expected test-accuracy points a candidate adds, alone or as an ensemble member (priors from
# the measurements of issue 20 and the README: the full fine-tune at 160 px +1.3 over the
# default at 96 px; the Lite0 + Lite1 fusion and a 3-member ensemble +1.0 each; a larger size
# +0.5 on its own).
GAINS = {"size": 0.6, "deep": 1.3, "backbone": 0.5, "fusion": 1.0}
FINISH_SECONDS = 5.0  # the ensemble (or the copy of the best member) and metrics.json
FINISH_SECONDS_PER_MEMBER = 4.0  # loading each member's model for the ensemble
OVERRUN = 0.10  # the budget's promise: never more than 10% over the limit
MIN_WEIGHT = 0.02  # a member weighted less is left out of the ensemble
EVIDENCE_FOLDS = 5


@dataclass(frozen=True)
class Candidate:
    """A model to add to the default one: the `Config` fields it ``changes`` (out, split and
    the default run's choices are set for it), the ``gain`` expected (test-accuracy points),
    what its backbone runs (``backbones`` at ``size``) and whether it fine-tunes every block on
    images (``deep``) or not at all (``fine_tune`` False)."""

    name: str
    changes: dict
    gain: float
    backbones: tuple[str, ...]
    size: int
    deep: bool = False
    fine_tune: bool = True


@dataclass
class Costs:
    """The default run's measured seconds, split by what drives them (`from_metrics`)."""

    backbone: str
    size: int
    fixed: float  # decode, model building, stage 1, report, other: not the backbone's work
    build: float  # building the model (loading its weights): again for a fusion's second part
    per_image: float  # one extraction forward pass, per image
    extraction_images: int  # images (views) a cold cache extracts
    fine_tune: float  # stage 2 and the refit on cached rows
    rate_trials: float  # the fine-tuning rate's trials (a candidate choosing its own pays them)
    test: float
    train_images: int
    val_images: int
    fine_tune_epochs: int

    @classmethod
    def from_metrics(cls, metrics: dict, config: Config) -> Costs:
        phases = metrics.get("phase_seconds") or {}
        passes = metrics.get("extraction_passes") or []
        extraction = sum(v for k, v in phases.items() if k.startswith("extraction"))
        computed = sum(p["computed"] for p in passes)
        size = int(config.image_size)
        factor = backbone_cost(config.backbone)
        if computed:
            per_image = extraction / computed
        else:
            per_image = FALLBACK_SECONDS_PER_IMAGE_224 * factor * (size / 224) ** 2

        def clean(split: str) -> int:
            return max((p["images"] for p in passes if p["split"] == split), default=0)

        others = ("start-up", "data check", "head input", "augmentation", "fine-tuning rate")
        scaled = ("stage 2", "refit", "test")
        fixed = sum(
            v
            for k, v in phases.items()
            if k not in others and k not in scaled and not k.startswith("extraction")
        )
        return cls(
            backbone=config.backbone,
            size=size,
            fixed=fixed,
            build=phases.get("build model", 0.0),
            per_image=per_image,
            extraction_images=sum(p["images"] for p in passes),
            fine_tune=phases.get("stage 2", 0.0) + phases.get("refit", 0.0),
            rate_trials=phases.get("fine-tuning rate", 0.0),
            test=phases.get("test", 0.0),
            train_images=clean("train"),
            val_images=clean("val"),
            fine_tune_epochs=config.fine_tune_epochs,
        )


def backbone_cost(name: str) -> float:
    """Per-pixel cost relative to Lite0's (a fusion: the sum of its two)."""
    return sum(BACKBONE_COST.get(part, 1.0) for part in name.split(FUSION_SEPARATOR))


def time_limit_seconds(config: Config) -> float:
    """The budget in seconds: ``time_limit`` minutes, else ``quality``'s (0: no budget)."""
    minutes = config.time_limit
    if minutes is None:
        minutes = QUALITY_MINUTES[config.quality]
    return 60.0 * float(minutes)


def larger_size(size: int) -> int:
    """The candidate size above ``size``: the first of `SIZE_LADDER` at least 1.6 times it
    (96 -> 160: where the issue's deeper fine-tune paid), else the ladder's largest above it,
    else ``size`` (nothing larger to try)."""
    above = [s for s in SIZE_LADDER if s > size]
    return next((s for s in above if s >= 1.6 * size), above[-1] if above else size)


def default_candidates(config: Config) -> list[Candidate]:
    """What the budget may add to a default run of ``config`` (resolved: its backbone and size
    as run): for an offline EfficientNet-Lite backbone, the larger size, the deeper fine-tune
    there, the size a step larger again, the other two Lite variants at the same size and the
    fusion with the first of them; nothing for other backbones (their weights may not be
    offline), a custom head or workflow 1 (no cached features)."""
    name, size = config.backbone, int(config.image_size)
    if name not in LITE or config.mode != "extract" or config.custom_head:
        log.info(
            "time budget: no candidates for %s (mode %s%s): they are for %s in extract mode",
            name,
            config.mode,
            ", custom head" if config.custom_head else "",
            ", ".join(LITE),
        )
        return []
    found = []
    large = larger_size(size)
    if large != size:
        found.append(
            Candidate(f"{name}-{large}", {"image_size": large}, GAINS["size"], (name,), large)
        )
        if config.fine_tune:  # every block, at a size where it paid (issue 20: +1.3 at 160 px)
            changes = {"image_size": large, "unfreeze": "all", "fine_tune_lr": 1e-4}
            found.append(
                Candidate(f"{name}-{large}-all", changes, GAINS["deep"], (name,), large, deep=True)
            )
        larger = larger_size(large)  # a step further: what a long budget has time for
        if larger != large:  # (--quality best at 96 px ran out of candidates at 19 minutes)
            changes = {"image_size": larger}
            found.append(Candidate(f"{name}-{larger}", changes, GAINS["size"], (name,), larger))
    others = [other for other in LITE if other != name]
    for other in others:
        found.append(
            Candidate(f"{other}-{size}", {"backbone": other}, GAINS["backbone"], (other,), size)
        )
    fusion = f"{name}{FUSION_SEPARATOR}{others[0]}"  # its parts' cached features: a head only
    found.append(
        Candidate(
            f"{fusion}-{size}",
            {"backbone": fusion, "fine_tune": False},
            GAINS["fusion"],
            (name, others[0]),
            size,
            fine_tune=False,
        )
    )
    return [c for c in found if all(get_backbone(b).offline_weights() for b in c.backbones)]


def estimate_seconds(
    candidate: Candidate, costs: Costs, extracted: frozenset = frozenset(), own_rate: bool = False
) -> float:
    """``candidate``'s seconds, priced from the default run's ``costs``: its extraction (of
    the backbones at sizes not in ``extracted``, whose cached rows it reuses), stage 2 and the
    refit on cached rows (the deeper fine-tune: every epoch on images), its test pass, and the
    rest of a run. ``own_rate``: it chooses its fine-tuning rate (the trials again)."""
    own = backbone_cost(costs.backbone) * costs.size**2

    def work(parts) -> float:  # the backbone's work relative to the default run's
        return sum(backbone_cost(b) * candidate.size**2 for b in parts) / own

    scale = work(candidate.backbones)
    new = work([b for b in candidate.backbones if (b, candidate.size) not in extracted])
    seconds = costs.fixed + costs.build * (len(candidate.backbones) - 1)
    seconds += costs.extraction_images * costs.per_image * new + costs.test * scale
    if candidate.deep:  # stage 2 and its refit on images, every epoch, all their epochs
        images = costs.train_images + (costs.train_images + costs.val_images)
        seconds += TRAIN_STEP_COST * costs.per_image * scale * costs.fine_tune_epochs * images
        seconds += DEEP_START_SECONDS
    elif candidate.fine_tune:
        seconds += (costs.fine_tune + (costs.rate_trials if own_rate else 0.0)) * scale
    return seconds


def next_candidate(
    pool: Sequence[Candidate], estimates: Sequence[float], available: float
) -> int | None:
    """The index in ``pool`` of the candidate to train next: of those whose estimate fits in
    ``available`` seconds, the most expected gain per second (the earlier on a tie); None when
    none fits."""
    fitting = [i for i, seconds in enumerate(estimates) if seconds <= available]
    if not fitting:
        return None
    return max(fitting, key=lambda i: (pool[i].gain / max(estimates[i], 1e-9), -i))


def finish_seconds(members: int) -> float:
    """What the end takes: the ensemble of ``members`` (loading each) and metrics.json."""
    return FINISH_SECONDS + FINISH_SECONDS_PER_MEMBER * members


def correction(ratios: Sequence[float]) -> float:
    """The factor on later estimates: the geometric mean of actual / estimated seconds so far,
    within [0.5, 3] (1 before any)."""
    if not ratios:
        return 1.0
    return float(np.clip(math.exp(np.mean(np.log(np.maximum(ratios, 1e-6)))), 0.5, 3.0))


class OutOfTime(BaseException):
    """A candidate stopped at the budget's deadline (a BaseException, as KeyboardInterrupt, so
    that no ``except Exception`` in the recipe swallows it)."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise `OutOfTime` in the block once ``seconds`` have passed: a SIGALRM timer, which stops
    extraction, the choices' trials and training alike (a Keras callback would see only the
    stages' epochs). In a thread other than the main one, or without SIGALRM, nothing stops the
    block: the budget then relies on its estimates alone."""
    usable = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if not usable:
        yield
        return

    def stop(signum, frame):
        raise OutOfTime

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------- choosing the result


def _accuracies(probabilities, labels) -> np.ndarray:
    """(members, images): 1 where a member's top class is the label."""
    return np.stack([np.argmax(p, axis=1) == labels for p in probabilities]).astype(np.float64)


def best_member(probabilities: Sequence[np.ndarray], labels: np.ndarray) -> dict:
    """The member to keep alone: the first (the default model) unless another's validation
    accuracy beats it by more than one standard error of the paired difference (the one-SE
    rule); of those that do, the largest gain. Returns ``index`` and each member's ``gain``
    and ``se`` against the first."""
    labels = np.asarray(labels)
    right = _accuracies(probabilities, labels)
    gains = [float((row - right[0]).mean()) for row in right]
    errors = [paired_se(row, right[0]) for row in right]
    beyond = [i for i in range(1, len(right)) if gains[i] > errors[i]]
    index = max(beyond, key=lambda i: gains[i]) if beyond else 0
    return {"index": index, "gain": gains, "se": errors}


def ensemble_evidence(
    probabilities: Sequence[np.ndarray],
    labels: np.ndarray,
    folds: int = EVIDENCE_FOLDS,
    seed: int = 0,
) -> dict:
    """Whether the fitted ensemble beats its best member beyond noise, by k-fold
    cross-validation over the validation images (stratified by class): on each fold, weights
    fitted on the other folds (`fit_weights`) and the member most accurate on them, both
    scored on the fold; ``keep`` when the mean gain in accuracy exceeds its standard error
    over the folds. Accuracy, not log-loss: averaging probabilities nearly always lowers the
    log-loss, while the ensemble must earn its inference cost in answers."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = [np.asarray(p, dtype=np.float64) for p in probabilities]
    folds = max(2, min(folds, int(np.bincount(labels).max()), len(labels) // 2))
    fold_of = fold_assignment(labels, folds, seed)  # the choices' own stratified folds
    right = _accuracies(probabilities, labels)
    gains = []
    for fold in range(folds):
        held, rest = fold_of == fold, fold_of != fold
        if not held.any():
            continue
        weights = fit_weights([p[rest] for p in probabilities], labels[rest])
        best = int(np.argmax(right[:, rest].mean(axis=1)))  # the first on a tie
        mixed = sum(w * p[held] for w, p in zip(weights, probabilities, strict=True))
        gains.append(
            float(np.mean(np.argmax(mixed, axis=1) == labels[held]) - right[best, held].mean())
        )
    mean, se = mean_and_se(gains)
    se = se if len(gains) > 1 else math.inf  # one fold: no evidence
    return {
        "metric": "accuracy",
        "folds": len(gains),
        "fold_gains": [round(g, 6) for g in gains],
        "mean_gain": round(mean, 6),
        "se": round(se, 6),
        "keep": bool(mean > se),
    }


# ---------------------------------------------------------------------------------- the run


@dataclass
class _Member:
    name: str
    run_dir: Path
    estimate: float | None
    seconds: float
    status: str  # "trained", "stopped at the deadline", "failed: ..."
    changes: dict = field(default_factory=dict)

    def record(self) -> dict:
        row = {"name": self.name, "changes": self.changes, "seconds": round(self.seconds, 1)}
        if self.estimate is not None:
            row["estimate_seconds"] = round(self.estimate, 1)
        return {**row, "status": self.status}


Trainer = Callable[..., TrainResult]
CandidateList = Callable[[Config], list[Candidate]]


def train_with_budget(
    config: Config,
    *,
    started: float | None = None,
    candidates: CandidateList = default_candidates,
    trainer: Trainer | None = None,
) -> TrainResult:
    """`train` within ``config``'s time budget (`time_limit_seconds`): with none, exactly
    `train(config)`; with one, the default model, then candidates while the time allows (from
    ``candidates(config of the default run)``), then the ensemble of those that help or the
    best alone, in ``config.out``. ``started``: as for `train` (the command line's process
    start), and the budget counts from it. ``trainer``: `train` (tests give a stand-in; None:
    this module's `train`, looked up now, so a test can replace it for the command line)."""
    trainer = trainer or train
    config.validate()
    limit = time_limit_seconds(config)
    if limit and config.distributed:
        raise UsageError("--time-limit/--quality: a time budget runs in one process: drop one")
    if not limit:
        log.info(
            "one model (no time budget): --quality balanced (%g min) or best (%g min), or "
            "--time-limit MINUTES, adds larger sizes, deeper fine-tuning, Lite1/Lite2 and their "
            "ensemble",
            QUALITY_MINUTES["balanced"],
            QUALITY_MINUTES["best"],
        )
        return trainer(config, started=started)
    origin = time.monotonic() - (max(0.0, time.time() - started) if started else 0.0)

    def elapsed() -> float:
        return time.monotonic() - origin

    run_dir = runs.new_run_dir(config.out)
    members_dir = run_dir / MEMBERS_DIR
    log.info("time budget %.1f min: the default model first, in %s", limit / 60, members_dir)
    base = dataclasses.replace(
        config, time_limit=None, quality="fast", validation_probabilities=True
    )
    first = trainer(
        dataclasses.replace(base, out=str(members_dir / DEFAULT_MEMBER)), started=started
    )
    members = [_Member(DEFAULT_MEMBER, first.run_dir, None, elapsed(), "trained")]
    log.info("time budget: the default model took %.0f s of %.0f s", elapsed(), limit)
    tried: list[_Member] = []
    if first.config.multi_label or not (first.run_dir / VALIDATION_PROBABILITIES_FILE).is_file():
        log.info("time budget: the default model alone (multi-label, or no validation images)")
    else:
        pool = candidates(first.config)
        _add_candidates(first, base, pool, members, tried, limit, elapsed, trainer)
    return _finish(run_dir, members, tried, limit, elapsed, config)


def _inherited(first: TrainResult, rate: str | float) -> dict:
    """What every candidate takes from the default run: its split, its size and the cheap
    choices it made (augmentation, head input). Not its fine-tuning rate: ``rate`` is the one
    given (``--fine-tune-lr``; "auto": each candidate chooses its own, since a rate chosen at
    one size and backbone says little of another: in the benchmark of docs/benchmarks.md the
    default's 1e-3, inherited at 160 px, peaked on validation at 0.854 and refit to 0.818 on
    test)."""
    chosen = first.config
    return {
        "split_from": str(first.run_dir),
        "check": False,  # the default run checked the data
        "image_size": chosen.image_size,
        "augment": chosen.augment,
        "feature_norm": chosen.feature_norm,
        "fine_tune_lr": rate,
    }


def _add_candidates(first, base, pool, members, tried, limit, elapsed, trainer) -> None:
    """Train candidates from ``pool`` while they fit (`next_candidate`), each stopped at the
    deadline that leaves time for the end; the trained ones join ``members``, every one
    started or passed over is recorded in ``tried``."""
    costs = Costs.from_metrics(first.metrics, first.config)
    inherited = _inherited(first, base.fine_tune_lr)
    own_rate = inherited["fine_tune_lr"] == "auto"
    extracted = {(first.config.backbone, costs.size)} if base.cache else set()
    members_dir = first.run_dir.parent
    pool, ratios = list(pool), []
    while pool:
        factor = correction(ratios)
        raw = [
            estimate_seconds(c, costs, frozenset(extracted), own_rate and not c.deep) for c in pool
        ]
        estimates = [factor * seconds for seconds in raw]
        available = limit - elapsed() - finish_seconds(len(members) + 1)
        index = next_candidate(pool, estimates, available)
        if index is None:
            for candidate, estimate in zip(pool, estimates, strict=True):
                log.info(
                    "time budget: %s not started (estimated %.0f s, %.0f s left)",
                    candidate.name,
                    estimate,
                    max(available, 0.0),
                )
                tried.append(_Member(candidate.name, None, estimate, 0.0, "not started"))
            return
        candidate, estimate, raw_estimate = pool.pop(index), estimates.pop(index), raw.pop(index)
        out = members_dir / candidate.name
        changes = {**inherited, **candidate.changes}
        log.info(
            "time budget: training %s (estimated %.0f s, %.0f s left, %.2f points expected)",
            candidate.name,
            estimate,
            available,
            candidate.gain,
        )
        begun = elapsed()
        status = _train_candidate(
            trainer,
            dataclasses.replace(base, out=str(out), **changes),
            limit - begun - finish_seconds(len(members)),
        )
        seconds = elapsed() - begun
        ratios.append(seconds / max(raw_estimate, 1e-6))
        member = _Member(candidate.name, out, estimate, seconds, status, candidate.changes)
        tried.append(member)
        log.info(
            "time budget: %s %s in %.0f s (estimated %.0f s)",
            candidate.name,
            status,
            seconds,
            estimate,
        )
        if status == "trained":
            members.append(member)
            if base.cache:  # a fusion of these reuses their cached features
                extracted.update((b, candidate.size) for b in candidate.backbones)
        else:
            shutil.rmtree(out, ignore_errors=True)


def _train_candidate(trainer: Trainer, config: Config, seconds: float) -> str:
    """Train one candidate, stopped after ``seconds``: "trained", "stopped at the deadline",
    or "failed: <why>" (the run goes on with the members it has; a full disk stops it)."""
    try:
        with deadline(seconds):
            trainer(config)
    except OutOfTime:
        return "stopped at the deadline"
    except DiskFullError:
        raise
    except Exception as error:  # one candidate's failure does not lose the models trained
        log.warning("time budget: %s failed: %s", Path(config.out).name, error)
        return f"failed: {error}"
    return "trained"


def _finish(run_dir: Path, members, tried, limit: float, elapsed, config: Config) -> TrainResult:
    """The result in ``run_dir``: the ensemble of the members that help, if it beats the best
    member beyond noise, else the best member; metrics.json's ``budget`` says what was tried,
    what it cost and what was kept."""
    record: dict = {
        "quality": config.quality,
        "time_limit_minutes": config.time_limit,
        "limit_seconds": round(limit, 1),
        "candidates": [m.record() for m in tried],
        "default_seconds": round(members[0].seconds, 1),
    }
    chosen, weights = [members[0]], [1.0]
    if len(members) > 1:
        chosen, weights, evidence = _choose(members, config.seed)
        record.update(evidence)
    if len(chosen) > 1:
        metrics = _ensemble_of(run_dir, chosen, weights)
        outcome = "ensemble of " + ", ".join(
            f"{m.name} ({w:.2f})" for m, w in zip(chosen, weights, strict=True)
        )
    else:
        metrics = _copy_member(run_dir, chosen[0].run_dir)
        outcome = f"{chosen[0].name} alone"
    if len(chosen) > 1:  # a member's report.html is copied with it; the ensemble's is drawn
        report = runs.read_json(members[0].run_dir / runs.METRICS_FILE)["phase_seconds"]
        if elapsed() + 2 * report.get("report", FINISH_SECONDS) <= limit * (1 + OVERRUN):
            redraw(run_dir)
        else:
            log.info("time budget: no report.html, to end in time (`headstart report %s`)", run_dir)
    record["kept"] = [m.name for m in chosen]
    record["weights"] = [round(w, 6) for w in weights]
    record["outcome"] = outcome
    record["seconds"] = round(elapsed(), 1)
    metrics["budget"] = record
    files.write_json(run_dir / runs.METRICS_FILE, metrics)
    log.info(
        "time budget: %d model(s) trained in %.0f s of %.0f s; kept: %s",
        len(members),
        record["seconds"],
        limit,
        outcome,
    )
    return TrainResult(run_dir, metrics, Config.load(run_dir / runs.CONFIG_FILE))


def _choose(members, seed: int) -> tuple[list, list[float], dict]:
    """The members to keep and their weights, from their validation probabilities (of each
    choosing phase's model), with the evidence for metrics.json."""
    read = [read_validation_probabilities(m.run_dir) for m in members]
    labels = read[0][1]
    if any(not np.array_equal(r[1], labels) for r in read):
        raise UsageError(f"{members[0].run_dir.parent}: the members' validation images differ")
    probabilities = [r[0] for r in read]
    best = best_member(probabilities, labels)
    evidence = ensemble_evidence(probabilities, labels, seed=seed)
    fitted = fit_weights(probabilities, labels)
    accuracy = _accuracies(probabilities, np.asarray(labels)).mean(axis=1)
    names = [m.name for m in members]
    record = {
        "validation_accuracy": {
            m.name: round(float(a), 6) for m, a in zip(members, accuracy, strict=True)
        },
        "best_member": {
            "name": members[best["index"]].name,
            "rule": "the default unless another's validation accuracy beats it by more than "
            "one standard error (paired)",
            "gain_over_default": dict(zip(names, best["gain"], strict=True)),
            "se": dict(zip(names, best["se"], strict=True)),
        },
        "fitted_weights": {m.name: round(w, 6) for m, w in zip(members, fitted, strict=True)},
        "ensemble_evidence": evidence,
    }
    kept = [i for i, w in enumerate(fitted) if w >= MIN_WEIGHT]
    if evidence["keep"] and len(kept) > 1:
        total = sum(fitted[i] for i in kept)
        return [members[i] for i in kept], [fitted[i] / total for i in kept], record
    log.info(
        "time budget: the ensemble's cross-validated gain %+.4f (SE %.4f) is within noise: "
        "the best member alone",
        evidence["mean_gain"],
        evidence["se"],
    )
    return [members[best["index"]]], [1.0], record


def _copy_member(run_dir: Path, member: Path) -> dict:
    """The member's files (not its folders) copied into ``run_dir``, config.json's ``out``
    pointing there; its metrics."""
    for path in member.iterdir():
        if path.is_file():
            shutil.copy2(path, run_dir / path.name)
    _point_config_at(run_dir)
    return runs.read_json(run_dir / runs.METRICS_FILE)


def _ensemble_of(run_dir: Path, chosen, weights: list[float]) -> dict:
    """`headstart.ensemble.ensemble` of the chosen members with their weights, scored from
    their own test predictions, its files moved into ``run_dir``; its metrics."""
    scratch = run_dir / MEMBERS_DIR / ".ensemble"
    members = [m.run_dir for m in chosen]
    result = ensemble(members, str(scratch), weights=weights, test_from_members=True)
    for path in scratch.iterdir():
        path.replace(run_dir / path.name)
    scratch.rmdir()
    _point_config_at(run_dir)
    return result.metrics


def _point_config_at(run_dir: Path) -> None:
    """config.json's ``out``: the budget's run folder (its other keys as they are)."""
    values = runs.read_json(run_dir / runs.CONFIG_FILE)
    values["out"] = str(run_dir)
    files.write_json(run_dir / runs.CONFIG_FILE, values)

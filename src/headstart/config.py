"""Every setting of a run in one typed dataclass, resolved once and written to ``config.json``."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from headstart._version import __version__
from headstart.errors import UsageError
from headstart.files import write_text_atomic

CLASS_WEIGHT_CHOICES = ("auto", "balanced", "none")  # --class-weight, see headstart.imbalance
# "auto" turns balanced weights on above this ratio of the largest to the smallest class's
# training images: 3:2 is where the loss of a class is outweighed by half again as many others.
IMBALANCE_THRESHOLD = 1.5

Mode = Literal["extract", "frozen"]
Head = Literal["gap", "flatten"]
BatchNormPolicy = Literal["frozen", "inference"]

GUIDE_FINE_TUNE_LR = 1e-5  # the Keras transfer-learning guide's fine-tuning rate
# 1e-5 (the Keras guide's) never beat stage 1 in fine_tune_epochs on the benchmark's cached trunk
FINE_TUNE_LR_CANDIDATES = (1e-4, 1e-3)
DEFAULT_AUGMENT = "auto"  # chosen on validation (headstart.augment.AUTO_CANDIDATES)
FEATURE_NORMS = ("none", "l2")  # the head's input: raw pooled features, or L2-normalised
RUNTIME_CHOICES = ("auto", "keras", "openvino")  # --runtime, see headstart.runtime
MLFLOW_DEFAULT = "default"  # --mlflow without a URI: $MLFLOW_TRACKING_URI, else ./mlruns
QUALITY_CHOICES = ("fast", "balanced", "best")  # --quality, see headstart.budget


@dataclass
class Config:
    """All settings of ``headstart train``; defaults are the recommended recipe.

    ``image_size``, ``weights`` and ``unfreeze`` start as ``None``/"default" and are
    resolved from the backbone registry before training, so ``config.json`` always
    holds the concrete values that were used.
    """

    data: str  # a folder of labelled images, or a CSV labels file (path,label[,split])
    # a CSV labels file's relative paths start from this folder (--root); None: the file's own
    root: str | None = None
    # each image has a set of labels (a CSV file's cells "cat;outdoor"): one sigmoid per label.
    # None: detected (a label cell holding ';'); config.json holds the resolved choice
    multi_label: bool | None = None
    out: str | None = None
    backbone: str = "efficientnet_lite0"  # a registry name, "A+B" (fusion) or "hub:PRESET"
    weights: str = "default"  # "imagenet", "none", a path, or "default" (the backbone's own)
    image_size: int | None = None  # None: the backbone's default input size
    mode: Mode = "extract"  # extract: cache backbone features (workflow 2); frozen: workflow 1
    epochs: int = 20  # stage 1 (head) epochs; early stopping ends it sooner
    fine_tune: bool = True
    fine_tune_epochs: int = 10  # early stopping ends it sooner
    unfreeze: str = "default"  # top N backbone layers, "all", or "default" (the top block)
    bn: BatchNormPolicy = "frozen"
    lr: float = 1e-3
    # "auto": chosen on validation among FINE_TUNE_LR_CANDIDATES when the trunk is cached (the
    # Keras guide's 1e-5 otherwise); then the rate used, or None if none beat stage 1
    fine_tune_lr: float | str | None = "auto"
    fine_tune_lr_scores: dict[str, dict] = dataclasses.field(default_factory=dict)
    batch_size: int = 32
    augment: str = DEFAULT_AUGMENT  # used wherever images run through the backbone in training
    # --augment auto: each candidate policy's validation accuracy and loss (the winner is then
    # written to `augment`); empty when a policy was given
    augment_scores: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    views: int = 1  # extract mode: cached augmented views per training image (0: clean only)
    cache: bool = True  # keep backbone outputs in the on-disk feature cache, reused across runs
    cache_dir: str | None = None  # None: $HEADSTART_CACHE or ~/.cache/headstart
    cache_trunk: bool = True  # fine-tune on cached activations of the frozen trunk
    # what runs the frozen parts when extracting (headstart.runtime): auto = OpenVINO where it
    # is installed and the backend is TensorFlow, else Keras; every output is checked first
    runtime: str = "auto"
    head: Head = "gap"
    hidden: int = 0  # width of an optional hidden Dense layer in the head; 0: none
    # "auto": each of FEATURE_NORMS trained on cached features and the best on validation
    # kept (its scores in feature_norm_scores); "none" where there are no cached features
    feature_norm: str = "auto"
    feature_norm_scores: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    dropout: float = 0.2
    seed: int = 0
    check: bool = True  # `headstart check` of the data at the start (check.json, one line)
    split_from: str | None = None  # a run folder (its split.json) or a split manifest
    val_split: float = 0.2
    test_split: float = 0.1
    patience: int = 3  # early stopping patience, in epochs, on validation loss
    # once every choice is made on validation, train the final model again on train + val
    # with them, for the chosen epochs (headstart.training.refit); False: the chosen model
    refit: bool = True
    # report.html and its figures at the end of the run; False: none (a sweep, a script, CI),
    # `headstart report RUN` draws them later from the run's files
    report: bool = True
    # The headstart that wrote config.json; `runs.open_run_dir` refuses other major versions.
    headstart_version: str = __version__
    quiet: bool = False
    tensorboard: bool = False  # write TensorBoard logs of both stages to RUN/tensorboard/<stage>
    # --mlflow (headstart.tracking): log the run to MLflow; None: off; a tracking URI or a
    # folder (a local file store), or "default": $MLFLOW_TRACKING_URI, else ./mlruns. The run
    # records the URI it resolved to.
    mlflow: str | None = None
    # Small-data honesty (issue 7). class_weight "auto": "balanced" when the training split's
    # largest/smallest class ratio exceeds headstart.imbalance.IMBALANCE_THRESHOLD, else "none";
    # config.json holds the resolved choice.
    class_weight: str = "auto"
    calibrate: bool = False  # temperature scaling fitted on validation, saved inside model.keras
    # train(head_builder=f) only: f's module.name (the head is the user's code, not JSON)
    custom_head: str | None = None
    # --distributed (headstart.distributed): data-parallel over processes on the JAX backend;
    # coordinator, num_processes and process_id all None: jax.distributed detects the cluster
    distributed: bool = False
    coordinator: str | None = None  # HOST:PORT of process 0
    num_processes: int | None = None
    process_id: int | None = None
    # The time budget (headstart.budget): minutes for the whole run, in which candidates are
    # added to the default model (None: --quality's; 0: the default model only)
    time_limit: float | None = None
    quality: str = "fast"  # fast: the default model only; balanced, best: a budget's minutes
    # write the choosing phase's validation probabilities (validation_probabilities.npz): a
    # budget's members, whose ensemble weights are fitted on them
    validation_probabilities: bool = False
    # the cheap choices (head input, augmentation, stage 1's epochs in the refit) scored by
    # k-fold cross-validation over train + validation, the simplest kept unless another wins
    # by more than one standard error (headstart.training.noise); 0 or 1: on validation alone
    choice_folds: int = 5
    # per choice: how it was scored, the best and the chosen candidate, whether within noise
    choice_noise: dict[str, dict] = dataclasses.field(default_factory=dict)
    # the refit's stage-1 epochs where cross-validation chose the head: the median of the
    # chosen candidate's folds' best epochs; None: as many as the choosing phase's stage 1
    head_epochs: int | None = None

    def validate(self) -> None:
        """Reject impossible values with the option's name, before any work starts."""
        checks = [
            (self.mode in ("extract", "frozen"), "--mode must be 'extract' or 'frozen'"),
            (self.head in ("gap", "flatten"), "--head must be 'gap' or 'flatten'"),
            (
                self.feature_norm in ("auto", *FEATURE_NORMS),
                "--feature-norm must be auto, none or l2",
            ),
            (self.bn in ("frozen", "inference"), "--bn must be 'frozen' or 'inference'"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.fine_tune_epochs >= 0, "--fine-tune-epochs must be 0 or more"),
            (self.lr > 0, "--lr must be positive"),
            (
                self.fine_tune_lr in ("auto", None)
                or (isinstance(self.fine_tune_lr, float | int) and self.fine_tune_lr > 0),
                "--fine-tune-lr must be auto or a positive number",
            ),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.hidden >= 0, "--hidden must be 0 (no hidden layer) or a positive width"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.patience >= 1, "--patience must be at least 1"),
            (self.views >= 0, "--views must be 0 or more"),
            (self.choice_folds >= 0, "--choice-folds must be 0 or more (0 or 1: one split)"),
            (self.head_epochs is None or self.head_epochs >= 1, "head_epochs must be 1 or more"),
            (self.image_size is None or self.image_size >= 1, "--image-size must be positive"),
            (
                self.class_weight in CLASS_WEIGHT_CHOICES,
                "--class-weight must be auto, balanced or none",
            ),
            (
                self.runtime in RUNTIME_CHOICES,
                f"--runtime must be one of {', '.join(RUNTIME_CHOICES)}",
            ),
            (
                self.runtime != "openvino" or importlib.util.find_spec("openvino") is not None,
                "--runtime openvino needs the openvino package: pip install openvino",
            ),
            (
                not self.tensorboard or importlib.util.find_spec("tensorboard") is not None,
                "--tensorboard needs the tensorboard package: pip install tensorboard",
            ),
            (
                self.quality in QUALITY_CHOICES,
                f"--quality must be one of {', '.join(QUALITY_CHOICES)}",
            ),
            (
                self.time_limit is None or self.time_limit >= 0,
                "--time-limit must be 0 or more minutes",
            ),
            (
                not self.mlflow or importlib.util.find_spec("mlflow") is not None,
                '--mlflow needs MLflow: pip install "headstart[mlflow]"',
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        """Write config.json, stamped with the headstart version that is writing it."""
        stamped = dataclasses.replace(self, headstart_version=__version__)
        write_text_atomic(path, stamped.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a run's config.json; unknown keys (from newer versions) are ignored."""
        values = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


# ------------------------------------------------------------------------- --config FILE

CONFIG_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def read_config_file(path: str | Path) -> dict:
    """The settings a ``--config`` file gives: a YAML or JSON mapping of `Config` fields
    (``fine_tune_lr`` or ``fine-tune-lr``), checked against their types. A run's own
    config.json is such a file. An unknown key, a value of the wrong type or an unreadable
    file is a one-line `UsageError` naming the key and the file."""
    path = Path(path)
    if path.suffix.lower() not in CONFIG_FILE_SUFFIXES:
        raise UsageError(f"--config {path}: give a .yaml, .yml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise UsageError(f"--config {path}: cannot read it ({reason})") from exc
    values = _parse_yaml(text, path) if path.suffix.lower() != ".json" else _parse_json(text, path)
    if values is None:  # an empty file sets nothing
        return {}
    if not isinstance(values, dict):
        raise UsageError(
            f"--config {path}: must be a mapping of settings (key: value), "
            f"not a {type(values).__name__}"
        )
    hints = typing.get_type_hints(Config)
    settings = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in hints:
            close = difflib.get_close_matches(name, list(hints), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"--config {path}: unknown key {key!r}{hint}")
        fitted = _fit(value, hints[name])
        if fitted is _NO_FIT:
            raise UsageError(
                f"--config {path}: {key} must be {_type_text(hints[name])}, not {value!r}"
            )
        settings[name] = fitted
    return settings


def _parse_json(text: str, path: Path):
    try:
        return json.loads(text) if text.strip() else None
    except ValueError as exc:
        raise UsageError(f"--config {path}: not valid JSON ({exc})") from exc


def _parse_yaml(text: str, path: Path):
    if importlib.util.find_spec("yaml") is None:
        raise UsageError(
            f"--config {path}: reading YAML needs PyYAML: pip install pyyaml (or give a .json file)"
        )
    import yaml  # optional: only YAML config files need it

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())})") from exc


_NO_FIT = object()


def _fit(value, hint):
    """``value`` as a field of type ``hint`` wants it (an int where a float goes becomes a float,
    and so does a number written as text, as YAML reads ``1e-3``), or `_NO_FIT`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        # a number first: "1e-5" is a rate where the field is float | str | None, "auto" text
        for arm in sorted(args, key=lambda arm: arm is not float):
            fitted = _fit(value, arm)
            if fitted is not _NO_FIT:
                return fitted
        return _NO_FIT
    if origin is Literal:
        return value if value in args else _NO_FIT
    if origin is dict or hint is dict:
        return value if isinstance(value, dict) else _NO_FIT
    if hint is type(None):
        return value if value is None else _NO_FIT
    if hint is bool:
        return value if isinstance(value, bool) else _NO_FIT
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_FIT
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value) if isinstance(value, str) else _NO_FIT
        except ValueError:
            return _NO_FIT
    return value if isinstance(value, hint) else _NO_FIT


def _type_text(hint) -> str:
    """``int | None`` -> "int or null"; a Literal -> its values."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(arm) for arm in args)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is dict or hint is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )

"""The ``headstart`` command: argument parsing, and one handler per verb that calls the library
function of the same name.

``headstart --help`` and ``--version`` answer at once: this module's top imports only light
modules (no Keras, TensorFlow, matplotlib or Pillow), and each handler imports its verb's module
when it runs, with a comment naming the heavy dependency that import brings.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import logging
import os
import sys
import time

from headstart._version import __version__
from headstart.config import (
    CLASS_WEIGHT_CHOICES,
    IMBALANCE_THRESHOLD,
    MLFLOW_DEFAULT,
    QUALITY_CHOICES,
    RUNTIME_CHOICES,
    Config,
    read_config_file,
)
from headstart.distributed import launch
from headstart.errors import DiskFullError, UsageError
from headstart.files import free_bytes, is_disk_full
from headstart.training.phases import process_started

EXIT_USAGE = 2
EXIT_DISK_FULL = 1  # not 2: the command was right, the machine ran out of space
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what shells report after a Ctrl-C

log = logging.getLogger(__name__)
VERBOSE_HELP = "debug lines, and TensorFlow's C++ warnings and errors (hidden otherwise)"


def main(argv: list[str] | None = None) -> int:
    """Parse, then run the verb's handler; a UsageError is one line and exit 2, a full disk
    one line naming the file and how to go on, and exit 1, a Ctrl-C one line saying what the
    run folder holds."""
    # a run's "start-up" phase: from the process's start (here, where it cannot be read)
    started = process_started() or time.time()
    args = build_parser().parse_args(argv)
    args.started = started
    # TensorFlow's C++ warnings and errors (such as CUDA probing on a machine with no GPU) only
    # with --verbose; read when TensorFlow is first imported, which the verbs do after this.
    # (Its few lines logged before absl is initialised ignore it: TensorFlow 2.21.)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if args.verbose else "2")
    _set_up_logging(args.verbose, args.quiet)
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"headstart: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:
        if not is_disk_full(error):
            raise
        print(_disk_full(args, error), file=sys.stderr)
        return EXIT_DISK_FULL
    except KeyboardInterrupt:
        if sys.stdout.isatty():
            print()  # end the progress bar's line
        print(_interrupted(args), file=sys.stderr)
        return EXIT_INTERRUPTED


class _SourceFormatter(logging.Formatter):
    """``headstart: message`` for headstart's lines; another library's lines are prefixed with
    its own name (``tensorflow: ...``), so no one mistakes them for headstart's."""

    def format(self, record: logging.LogRecord) -> str:
        record.source = record.name.split(".", 1)[0] if record.name != "root" else "headstart"
        return super().format(record)


def _set_up_logging(verbose: bool, quiet: bool) -> None:
    """Info lines by default, warnings only with ``--quiet``; ``--verbose`` adds headstart's
    debug lines, not other libraries' (Pillow's debug lines alone are two per image read)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_SourceFormatter("%(source)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, handlers=[handler])
    if verbose:
        logging.getLogger("headstart").setLevel(logging.DEBUG)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each verb's subparser is built, and given its handler, by its
    ``_add_<verb>`` function below (in the order ``--help`` lists them)."""
    # --quiet works before or after the verb (`headstart --quiet train`, `headstart train --quiet`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars or info lines",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
    )
    parser = argparse.ArgumentParser(
        prog="headstart", description="Folder of labelled images -> fine-tuned Keras classifier."
    )
    # its own action: set_defaults on a shared parent action would reach the verbs' copies too
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info lines")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--version", action="version", version=f"headstart {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    add_verb = functools.partial(verbs.add_parser, parents=[common])
    for add in (
        _add_train,
        _add_launch,
        _add_evaluate,
        _add_predict,
        _add_check,
        _add_backbones,
        _add_cache,
        _add_summary,
        _add_demo,
        _add_explain,
        _add_cv,
        _add_calibrate,
        _add_report,
        _add_compare,
        _add_export,
        _add_serve,
        _add_ensemble,
        _add_tune,
    ):
        add(add_verb)
    return parser


# ------------------------------------------------------------------------------------ verbs


def _add_train(add_verb) -> None:
    parser = add_verb("train", help="train, evaluate and save a classifier")
    _train_arguments(parser)
    parser.add_argument(
        "--quality",
        choices=QUALITY_CHOICES,
        default=argparse.SUPPRESS,
        help="fast: the default model only (the default); balanced, best: a time budget of 10 "
        "or 30 minutes for larger sizes, deeper fine-tuning, Lite1/Lite2 and their ensemble",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="MINUTES",
        default=argparse.SUPPRESS,
        help="the whole run's time budget in minutes (overrides --quality's; 0: one model)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted run from its last epoch (its config.json decides the rest)",
    )
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    if args.resume:
        return _resume(args)
    from headstart.budget import train_with_budget  # Keras/TensorFlow

    config = _resolve_out(args, _config_of(args))
    _print_result(train_with_budget(config, started=args.started))
    return 0


def _resume(args: argparse.Namespace) -> int:
    """``train --resume RUN``: the run's settings, this launch's place in a cluster."""
    _check_resume_arguments(args)
    args.out = args.resume  # so that a Ctrl-C message names the run
    from headstart.training import resume  # Keras/TensorFlow

    cluster = {key: getattr(args, key, None) for key in CLUSTER_OPTIONS}
    _print_result(resume(args.resume, **cluster, started=args.started))
    return 0


def _add_launch(add_verb) -> None:
    parser = add_verb("launch", help="run `train --distributed` in N local processes")
    parser.add_argument("--nproc", type=int, required=True, help="how many processes")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- train DATA [options]")
    parser.set_defaults(handler=_launch)


def _launch(args: argparse.Namespace) -> int:
    """Exit 1 when a process failed: the launcher's own code, passed on."""
    return launch.launch(args.nproc, args.command)


def _add_evaluate(add_verb) -> None:
    parser = add_verb("evaluate", help="score a run on a folder (or CSV file) of labelled images")
    parser.add_argument("run")
    _data_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tta", type=int, default=1, metavar="N", help=_TTA_HELP)
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    # Pillow; evaluate() itself loads Keras/TensorFlow
    from headstart.evaluation import evaluate, format_metrics, format_tta, format_uncertainty

    _take_labels(args)
    metrics = evaluate(
        args.run, args.data, root=args.root, batch_size=args.batch_size, tta=args.tta
    )
    print(format_metrics(metrics))
    for line in (format_uncertainty(metrics), format_tta(metrics)):
        if line:
            print(line)
    return 0


def _add_predict(add_verb) -> None:
    parser = add_verb("predict", help="classify image files, folders or globs")
    parser.add_argument("run")
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--tta", type=int, default=1, metavar="N", help=_TTA_HELP)
    parser.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    """Unreadable images are reported, not fatal: exit 0 with a count on stderr."""
    from headstart.deploy.predict import iter_predictions  # Keras/TensorFlow

    predictions = iter_predictions(args.run, args.paths, top_k=args.top_k, tta=args.tta)
    total, unreadable = _print_predictions(predictions, args.format)
    if unreadable:
        print(
            f"headstart: {unreadable} of {total} images could not be read "
            f"(the reasons are in the output)",
            file=sys.stderr,
        )
    return 0


def _add_check(add_verb) -> None:
    parser = add_verb("check", help="check a data folder: counts, bad files, duplicates, leakage")
    _data_arguments(parser)
    parser.add_argument("-o", "--out", help="report file (default: ./check-<DATA name>.json)")
    parser.add_argument(
        "--fix-split",
        metavar="PATH",
        help="also write a leakage-free split manifest (JSON file lists; no file is moved)",
    )
    for option in ("val_split", "test_split", "seed"):  # the split train would make
        parser.add_argument(
            "--" + option.replace("_", "-"),
            type=int if option == "seed" else float,
            default=getattr(Config(data=""), option),
            help="as for train",
        )
    parser.add_argument(
        "--multi-label",
        action="store_const",
        const=True,
        help="read a CSV file's label cells as sets of labels separated by ';' (default: when "
        "a cell holds ';')",
    )
    # no default here: check's own (NEAR_DISTANCE) applies, and --help need not import check
    parser.add_argument(
        "--near-distance",
        type=int,
        metavar="BITS",
        help="perceptual-hash bits (of 256) within which images are near-duplicates",
    )
    parser.set_defaults(handler=_check)


def _check(args: argparse.Namespace) -> int:
    from headstart.check import check, format_summary  # Pillow

    near = {} if args.near_distance is None else {"near_distance": args.near_distance}
    _take_labels(args)
    report = check(
        args.data,
        root=args.root,
        multi_label=args.multi_label,
        val_split=args.val_split,
        test_split=args.test_split,
        seed=args.seed,
        out=args.out,
        fix_split=args.fix_split,
        **near,
    )
    if hasattr(sys.stdout, "reconfigure"):  # file names need not be valid UTF-8
        sys.stdout.reconfigure(errors="backslashreplace")
    print(format_summary(report))
    written = [report["out"]] + ([args.fix_split] if args.fix_split else [])
    print(f"written: {', '.join(written)}")
    return 0


def _add_backbones(add_verb) -> None:
    add_verb("backbones", help="list the available backbones").set_defaults(handler=_backbones)


def _backbones(args: argparse.Namespace) -> int:
    from headstart.backbones import list_backbones  # Keras/TensorFlow

    _print_backbones(list_backbones())
    return 0


def _add_cache(add_verb) -> None:
    parser = add_verb("cache", help="list or clear the feature cache")
    parser.add_argument("action", choices=("ls", "clear"))
    parser.add_argument("--cache-dir", help="default: $HEADSTART_CACHE or ~/.cache/headstart")
    parser.set_defaults(handler=_cache)


def _cache(args: argparse.Namespace) -> int:
    from headstart.training import cache  # NumPy

    if args.action == "clear":
        print(f"freed {cache.clear(args.cache_dir) / 1e6:.1f} MB")
    else:
        _print_cache_entries(cache.list_entries(args.cache_dir))
    return 0


def _add_summary(add_verb) -> None:
    parser = add_verb("summary", help="print a model summary and parameter counts")
    parser.add_argument("--backbone", default=Config(data="").backbone)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--head", choices=("gap", "flatten", "none"), default="gap")
    parser.add_argument("--hidden", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--unfreeze", help="N, all or none (default: none; all for scratch)")
    parser.add_argument("--bn", choices=("frozen", "inference"), default="frozen")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--plot", metavar="PNG", help="also draw the model graph (needs pydot)")
    parser.set_defaults(handler=_summary)


def _summary(args: argparse.Namespace) -> int:
    from headstart.summaries import summary  # Keras/TensorFlow

    text = summary(
        args.backbone,
        image_size=args.image_size,
        head=args.head,
        hidden=args.hidden,
        dropout=args.dropout,
        classes=args.classes,
        unfreeze=args.unfreeze,
        bn=args.bn,
        weights=args.weights,
        plot=args.plot,
    )
    print(text, end="")
    return 0


def _add_demo(add_verb) -> None:
    parser = add_verb("demo", help="train on the bundled Fashion-MNIST sample")
    parser.add_argument("-o", "--out")
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from headstart.training.demo import demo  # Keras/TensorFlow

    _resolve_out(args, Config(data="", out=args.out))
    _print_result(demo(args.out, quiet=args.quiet, started=args.started))
    return 0


def _add_explain(add_verb) -> None:
    parser = add_verb("explain", help="Grad-CAM heatmaps: where the model looked")
    parser.add_argument("run")
    parser.add_argument("paths", nargs="+", metavar="image")
    parser.add_argument("-o", "--out", help="folder for the PNGs (default: RUN/explain)")
    parser.add_argument(
        "--class", dest="target", metavar="NAME", help="explain this class, not the predicted one"
    )
    parser.set_defaults(handler=_explain)


def _explain(args: argparse.Namespace) -> int:
    from headstart.explain import explain  # Keras/TensorFlow

    for path in explain(args.run, args.paths, out=args.out, target=args.target):
        print(path)
    return 0


def _add_cv(add_verb) -> None:
    parser = add_verb("cv", help="stratified K-fold cross-validation: accuracy mean ± std")
    parser.add_argument("--folds", type=int, default=5, metavar="K")
    # every fold trains with these (DATA's splits pooled); --out holds fold1..K and cv.json
    _train_arguments(parser)
    parser.add_argument(
        "--fine-tune",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also fine-tune in every fold (default: head only)",
    )
    parser.set_defaults(handler=_cv)


def _cv(args: argparse.Namespace) -> int:
    config = _config_of(args, fine_tune=False)  # cv's own default: the head only
    if config.test_split != Config(data="").test_split:
        raise UsageError("cv: --test-split does not apply, each fold tests 1/K of the images")
    from headstart.cv import cross_validate, format_cv  # Pillow; each fold loads Keras

    summary = cross_validate(_resolve_out(args, config), folds=args.folds)
    print(format_cv(summary))
    print(f"written: {summary['out']}/cv.json")
    return 0


def _add_calibrate(add_verb) -> None:
    parser = add_verb("calibrate", help="temperature-scale a run's confidences on validation")
    parser.add_argument("run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.set_defaults(handler=_calibrate)


def _calibrate(args: argparse.Namespace) -> int:
    """The run's figures and report.html follow its new confidences: redrawn here."""
    from headstart.calibrate import calibrate, format_calibration  # Keras/TensorFlow

    metrics = calibrate(args.run, batch_size=args.batch_size)
    _redraw_report(args.run)
    print(format_calibration(metrics))
    return 0


def _add_report(add_verb) -> None:
    parser = add_verb("report", help="draw the run's figures and write RUN/report.html")
    parser.add_argument("run")
    parser.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from headstart.report import report  # matplotlib

    print(report(args.run))
    return 0


def _add_compare(add_verb) -> None:
    parser = add_verb("compare", help="compare runs: table and validation curves")
    parser.add_argument("runs", nargs="+", metavar="run")
    parser.add_argument("-o", "--out", help="folder for compare.md and compare.png (./comparison)")
    parser.set_defaults(handler=_compare)


def _compare(args: argparse.Namespace) -> int:
    from headstart.compare import compare  # matplotlib

    result = compare(args.runs, out=args.out)
    print(result.table)
    for line in result.noise:
        print(line)
    print(f"written: {result.markdown_path}, {result.figure_path}")
    return 0


def _add_export(add_verb) -> None:
    parser = add_verb("export", help="export a run for another runtime, checked against it")
    parser.add_argument("run")
    parser.add_argument(
        "--format", required=True, choices=("saved_model", "onnx", "litert", "openvino")
    )
    parser.add_argument("--quantize", choices=("none", "dynamic", "int8"), default="none")
    parser.add_argument(
        "-o", "--out", help="export folder (default: RUN/exports/FORMAT[-QUANTIZE])"
    )
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    """Exit 1 when the artifact does not answer like model.keras (nothing is kept then)."""
    # Pillow; export() loads Keras and the format's own runtime
    from headstart.deploy.export import ExportCheckFailed, export

    try:
        result = export(args.run, args.format, quantize=args.quantize, out=args.out)
    except ExportCheckFailed as error:
        print(f"headstart: error: {error}", file=sys.stderr)
        return 1
    check = result.record["check"]
    print(
        f"{result.path}: {result.record['size_bytes'] / 1e6:.1f} MB, "
        f"{result.record['runtime']['name']} {result.record['runtime']['version']}; "
        f"on {check['source']}: top-1 agreement {check['top1_agreement']:.2%}, "
        f"max probability difference {check['max_abs_prob_diff']:.1e}"
    )
    return 0


def _add_serve(add_verb) -> None:
    parser = add_verb("serve", help="serve a run over HTTP: JSON API and a web page")
    parser.add_argument("run", help="a run folder or an exported model folder")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--max-batch", type=int, default=32, help="at most this many images per model call"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a model call may wait for the images of requests being decoded right "
        "now (never when there are none; 0: never)",
    )
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="request body limit")
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from headstart.deploy.serve import serve  # Pillow; serve() loads FastAPI, uvicorn and Keras

    serve(
        args.run,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_mb=args.max_upload_mb,
    )
    return 0


def _add_ensemble(add_verb) -> None:
    parser = add_verb("ensemble", help="average runs' class probabilities into one model")
    parser.add_argument("runs", nargs="+", metavar="run", help="runs sharing labels and split")
    parser.add_argument("-o", "--out", help="the ensemble's run folder (default: runs/<timestamp>)")
    parser.add_argument(
        "--weights", help="w1,w2,... (one per run), or fit: chosen on validation (default: mean)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.set_defaults(handler=_ensemble)


def _ensemble(args: argparse.Namespace) -> int:
    """The ensemble is a run: it gets its figures and report.html like any other."""
    from headstart.ensemble import ensemble  # Keras/TensorFlow

    result = ensemble(args.runs, args.out, weights=args.weights, batch_size=args.batch_size)
    _redraw_report(result.run_dir)
    print("weights: " + ", ".join(f"{w:.3f}" for w in result.weights))
    _print_result(result)
    return 0


def _add_tune(add_verb) -> None:
    parser = add_verb("tune", help="search head hyperparameters with KerasTuner on cached features")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--max-time", type=float, metavar="MIN", help="start no trial after this")
    parser.add_argument(
        "--algorithm", choices=("bayesian", "random", "hyperband"), default="bayesian"
    )
    parser.add_argument(
        "--no-train", dest="train_best", action="store_false", help="don't train the best fully"
    )
    # the settings kept fixed (--lr, --dropout, --hidden and --head are tuned)
    _train_arguments(parser)
    parser.set_defaults(handler=_tune)


def _tune(args: argparse.Namespace) -> int:
    from headstart.tune import tune  # KerasTuner, Keras/TensorFlow

    result = tune(
        _config_of(args),
        trials=args.trials,
        max_time=args.max_time,
        algorithm=args.algorithm,
        train_best=args.train_best,
    )
    print(f"{len(result.rows)} trials: {result.out / 'trials.csv'}")
    print(f"best: {result.command}")
    if result.run is not None:
        _print_result(result.run)
    return 0


# ------------------------------------------------------------------------ shared options


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    """DATA (optional here: `_take_labels` requires it), or ``--labels CSV``, and ``--root``:
    for the verbs that read labelled data without training (``check``, ``evaluate``)."""
    parser.add_argument(
        "data",
        nargs="?",
        help="DATA/<class>/*, DATA/{train,val,test}/<class>/*, or a CSV labels file with "
        "columns path,label[,split]",
    )
    _labels_arguments(parser.add_argument)


def _labels_arguments(add) -> None:
    add("--labels", metavar="CSV", help="a CSV labels file (path,label[,split]), in place of DATA")
    add(
        "--root",
        metavar="DIR",
        help="the folder a CSV file's relative image paths start from (default: the CSV's folder)",
    )


def _take_labels(args: argparse.Namespace) -> None:
    """``--labels CSV`` is DATA; giving both, or neither, is a usage error."""
    data, labels = getattr(args, "data", None), getattr(args, "labels", None)
    if data and labels:
        raise UsageError(f"give DATA ({data}) or --labels {labels}, not both")
    args.data = data or labels
    if not args.data:
        raise UsageError(f"{args.verb} needs DATA (a folder, or a CSV labels file) or --labels CSV")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a training run, shared by ``train``, ``cv`` and ``tune``: `Config`'s
    fields. None has a default here (argparse.SUPPRESS: an option not given is not in the
    namespace), so that `_config_of` can tell the options given, which override a --config
    file, from the rest, which `Config`'s defaults fill."""
    data_help = (
        "DATA/<class>/*, DATA/{train,val,test}/<class>/*, or a CSV labels file with columns "
        "path,label[,split] (or `data:` in --config)"
    )
    parser.add_argument("data", nargs="?", default=argparse.SUPPRESS, help=data_help)
    add = functools.partial(parser.add_argument, default=argparse.SUPPRESS)
    _labels_arguments(add)
    add(
        "--config",
        metavar="FILE",
        help="settings from a YAML or JSON file of config.json's keys (a run's own config.json "
        "trains that run again); options given here override it",
    )
    add("-o", "--out", help="run directory (default: runs/<timestamp>)")
    add(
        "--backbone",
        help="see `headstart backbones`; A+B fuses two (their pooled features concatenated); "
        "hub:PRESET or hub:/path/to/preset is a keras-hub image backbone",
    )
    add("--weights", help="imagenet, none, or a weights file path")
    add("--image-size", type=int, help="input size in pixels (default: the backbone's)")
    add(
        "--mode",
        choices=("extract", "frozen"),
        help="stage 1: extract = cache backbone features (fast), frozen = backbone in the loop",
    )
    add("--epochs", type=int, help="stage 1 (head) epochs")
    add("--fine-tune-epochs", type=int)
    add("--no-fine-tune", dest="fine_tune", action="store_false", help="skip stage 2")
    add(
        "--unfreeze",
        help="top backbone layers to fine-tune: N, all, or default (the top block)",
    )
    add(
        "--bn",
        choices=("frozen", "inference"),
        help="BatchNormalization when fine-tuning: frozen, or gamma/beta train (inference)",
    )
    add("--lr", type=float)
    add(
        "--fine-tune-lr",
        type=_rate_or_auto,
        help="auto (chosen on validation, with the cached trunk) or a rate, e.g. 1e-5",
    )
    add("--batch-size", type=int)
    add(
        "--augment",
        help="auto (chosen on validation), none, or a policy, e.g. flip,rotate=0.1,zoom=0.2",
    )
    add(
        "--views",
        type=int,
        help="extract mode: cached augmented views per training image",
    )
    add(
        "--cache-dir", help="feature cache folder (default: $HEADSTART_CACHE or ~/.cache/headstart)"
    )
    add(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="keep backbone outputs in memory only, not in the on-disk cache",
    )
    add(
        "--no-trunk-cache",
        dest="cache_trunk",
        action="store_false",
        help="fine-tune the full model on images instead of cached trunk activations",
    )
    add(
        "--runtime",
        choices=RUNTIME_CHOICES,
        help="what runs the frozen backbone when extracting: auto (OpenVINO when installed, on "
        "TensorFlow; checked against Keras, which it falls back to), keras, or openvino",
    )
    add("--head", choices=("gap", "flatten"))
    add("--hidden", type=int, help="hidden Dense width (0: none)")
    add("--dropout", type=float)
    add(
        "--feature-norm",
        choices=("auto", "none", "l2"),
        help="the head's input: auto (chosen on validation), none, or l2 (L2-normalised)",
    )
    add(
        "--split-from",
        metavar="RUN",
        help="reuse a run's exact train/val/test split (or a `check --fix-split` manifest)",
    )
    add(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip the data check (duplicates, leakage, imbalance) at the start",
    )
    add(
        "--multi-label",
        action="store_const",
        const=True,
        help="a CSV file's label cells are sets of labels separated by ';' (cat;outdoor): one "
        "sigmoid per label (default: detected, when a cell holds ';')",
    )
    add("--val-split", type=float)
    add("--test-split", type=float)
    add("--patience", type=int, help="early stopping patience")
    add(
        "--refit",
        action=argparse.BooleanOptionalAction,
        help="once every choice is made on validation, train the final model again on train + "
        "validation images for the chosen epochs (default; --no-refit: keep the chosen model)",
    )
    add(
        "--choice-folds",
        type=int,
        metavar="K",
        help="score the head input and augmentation by K-fold cross-validation over train + "
        "validation, keeping the simplest within one standard error of the best (default 5; "
        "0 or 1: on the validation split alone)",
    )
    add("--seed", type=int)
    add("--tensorboard", action="store_true", help="write TensorBoard logs to RUN/tensorboard/")
    add(
        "--report",
        action=argparse.BooleanOptionalAction,
        help="draw the figures and write RUN/report.html at the end (default; --no-report: "
        "skip them, `headstart report RUN` draws them later)",
    )
    add(
        "--mlflow",
        nargs="?",
        const=MLFLOW_DEFAULT,
        metavar="URI",
        help="log the run to MLflow: a tracking URI or a folder (default: $MLFLOW_TRACKING_URI, "
        'else ./mlruns); needs pip install "headstart[mlflow]"',
    )
    # small-data honesty (issue 7)
    add(
        "--class-weight",
        choices=CLASS_WEIGHT_CHOICES,
        help="balanced: weight classes by n/(classes*count); auto: balanced when the largest "
        f"training class has over {IMBALANCE_THRESHOLD}x the images of the smallest",
    )
    add(
        "--calibrate",
        action="store_true",
        help="temperature scaling fitted on validation, saved inside model.keras",
    )
    add(
        "--distributed",
        action="store_true",
        help="data-parallel over processes (JAX backend); see `headstart launch`",
    )
    add("--coordinator", metavar="HOST:PORT", help="--distributed: process 0's address")
    add("--num-processes", type=int, help="--distributed: how many processes in all")
    add("--process-id", type=int, help="--distributed: this process's number, 0 to N-1")


_TTA_HELP = (
    "test-time augmentation: average N views (1 = off; 2 adds a horizontal flip, more add 90%% "
    "crops). A flip is wrong for classes told apart by left and right (text, digits, arrows)"
)


def _config_of(args: argparse.Namespace, **verb_defaults) -> Config:
    """The Config that the train options of ``train``, ``cv`` and ``tune`` describe: `Config`'s
    defaults, then the verb's own (``verb_defaults``), then the --config file's values, then the
    options given on the command line (the only ones in ``args``, see `_train_arguments`)."""
    given = {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__}
    if not given.get("quiet"):  # --quiet has a default (False) on the main parser
        given.pop("quiet", None)
    if "labels" in args:  # --labels CSV: DATA under another name
        if "data" in given:
            raise UsageError(f"give DATA ({given['data']}) or --labels {args.labels}, not both")
        given["data"] = args.labels
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    values = {**verb_defaults, **from_file, **given}
    if "data" not in values:
        hint = ", or --resume RUN" if args.verb == "train" else ""
        if given.get("mlflow", MLFLOW_DEFAULT) != MLFLOW_DEFAULT:  # `--mlflow DATA` took it
            hint += f" (--mlflow took {given['mlflow']} as its URI: put DATA before --mlflow)"
        raise UsageError(
            f"{args.verb} needs DATA (a folder of class folders, or a CSV labels file), or a "
            "--config file with data" + hint
        )
    return Config(**values)


def _rate_or_auto(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither auto nor a number") from None


# --resume: these describe the new launch (where this process stands), not the run's settings
CLUSTER_OPTIONS = ("coordinator", "num_processes", "process_id")


def _check_resume_arguments(args: argparse.Namespace) -> None:
    """--resume takes every setting from the run's config.json: refuse others, rather than
    silently ignoring them. The cluster options are the new launch's (`headstart launch`
    adds them and --distributed), so they are taken, for a run that was --distributed."""
    # the train options given are the only ones in args (see `_train_arguments`)
    defaults = vars(build_parser().parse_args(["train", "--resume", args.resume]))
    launch_options = ("distributed", *CLUSTER_OPTIONS)
    given = [
        "--" + key.replace("_", "-")
        for key in vars(args)
        if key not in defaults and key not in ("data", "started", *launch_options)
    ]
    if getattr(args, "data", None):
        given.insert(0, "DATA")
    if given:
        raise UsageError(
            f"--resume {args.resume} continues the run with the settings in its config.json: "
            f"drop {', '.join(given)}"
        )
    config = os.path.join(args.resume, "config.json")
    launched = [f"--{key.replace('_', '-')}" for key in launch_options if getattr(args, key, None)]
    if launched and os.path.isfile(config) and not Config.load(config).distributed:
        raise UsageError(
            f"--resume {args.resume}: the run was not --distributed: drop {', '.join(launched)} "
            f"(or `headstart launch`) and resume it in one process"
        )


def _resolve_out(args: argparse.Namespace, config: Config) -> Config:
    """Decide the run folder here (``config.out``, from --out or --config, or a new
    runs/<timestamp>), so that a Ctrl-C message can name it: ``config`` with it."""
    from headstart import runs  # Keras (runs registers the saved models' layers): needed next

    args.out_given = bool(config.out)
    args.out = config.out or str(runs.default_run_dir())
    return dataclasses.replace(config, out=args.out)


def _redraw_report(run) -> None:
    """The run's figures and report.html, after a verb changed the run (a failure to draw is a
    warning: it loses nothing the verb made)."""
    from headstart.report import redraw  # matplotlib

    redraw(run)


# --------------------------------------------------------------------------------- Ctrl-C


def _interrupted(args: argparse.Namespace) -> str:
    """One line after Ctrl-C: what the run folder holds and what can be done with it.

    Every file in a run is written atomically, so whatever is there is complete: model.keras is
    the best model on validation so far (the checkpoint saves it at each improvement).
    """
    if args.verb == "cv" and getattr(args, "out", None):
        return (
            f"headstart: interrupted; each fold finished so far is a complete run in {args.out} "
            f"(no cv.json yet): run cv again with a new --out"
        )
    from headstart import runs  # Keras: loaded by the interrupted verb already

    run = getattr(args, "out", None) if args.verb in ("train", "demo") else None
    kept = [
        name
        for name in (
            runs.MODEL_FILE,
            runs.CONFIG_FILE,
            runs.LABELS_FILE,
            runs.HISTORY_FILE,
            runs.SKIPPED_FILE,
        )
        if run and os.path.isfile(os.path.join(run, name))
    ]
    members = os.path.join(run, "members") if run else ""
    if not kept and members and os.path.isdir(members):  # a time budget's (headstart.budget)
        return (
            f"headstart: interrupted; the time budget's finished members are complete runs in "
            f"{members} (a member being trained resumes with `headstart train --resume "
            f"{members}/NAME`); {run} has no result yet: run train again with a new --out"
        )
    if not kept:
        return "headstart: interrupted before anything was saved"
    again = _how_to_go_on(args, run)
    if runs.MODEL_FILE in kept:
        return (
            f"headstart: interrupted; {run} keeps {', '.join(kept)}: model.keras is the best "
            f"model on validation so far, ready for `headstart predict {run}` and `headstart "
            f"evaluate {run} DATA` (no test metrics yet); to train it fully, {again}"
        )
    what = "to go on" if "--resume" in again else "to start again"
    return (
        f"headstart: interrupted before the first epoch ended; {run} keeps "
        f"{', '.join(kept)} but no model: {what}, {again}"
    )


def _disk_full(args: argparse.Namespace, error: Exception) -> str:
    """One line for a full disk: the file that could not be written, the space it needed, and
    how to go on (every file already in the run folder is complete: the writes are atomic)."""
    if not isinstance(error, DiskFullError):  # a write headstart does not make itself
        found = error
        while found is not None and not getattr(found, "filename", None):
            found = found.__cause__ or found.__context__
        path = os.fsdecode(getattr(found, "filename", None) or "")
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        while folder and not os.path.isdir(folder) and folder != os.path.dirname(folder):
            folder = os.path.dirname(folder)  # the file system it was on: the nearest folder
        error = DiskFullError(path or "a file", free=free_bytes(folder) if folder else None)
    run = getattr(args, "out", None) if args.verb in ("train", "demo") else None
    if run and os.path.isdir(run):
        again = _how_to_go_on(args, run)
    elif run:
        again = "run train again"
    else:
        again = "run the command again"
    return f"headstart: {error}; free space, then {again}"


def _how_to_go_on(args: argparse.Namespace, run: str) -> str:
    """Resume when the run saved its resume state, else train again."""
    # Keras/TensorFlow; only reached once train or demo saved files, so they are loaded already
    from headstart.training.state import RESUME_FILE

    if os.path.isfile(os.path.join(run, RESUME_FILE)):
        return f"continue with `headstart train --resume {run}`"
    if getattr(args, "out_given", False):
        return "run train again with a new --out"
    return "run train again"


# ------------------------------------------------------------------------------- printing


def _print_result(result) -> None:
    """A trained (or ensembled) run: test scores, calibration, the saved model, the folder."""
    # Pillow; the verb that made ``result`` has loaded it already
    from headstart.evaluation import format_metrics, format_uncertainty

    if result.metrics.get("n_test"):
        print(format_metrics(result.metrics))
        if format_uncertainty(result.metrics):
            print(format_uncertainty(result.metrics))
    config = getattr(result, "config", None)  # an ensemble's result has none
    if config is not None and config.distributed and not result.metrics:
        print(f"process {result.config.process_id} done (process 0 writes the run)")
        return
    if result.metrics.get("calibration"):
        # Keras/TensorFlow; loaded already by the training that calibrated
        from headstart.calibrate import format_calibration

        print(format_calibration(result.metrics))
    saved = result.metrics.get("saved_from", {})
    chosen = result.metrics.get("validation_choosing_phase", {})
    if saved.get("stage"):
        print(
            f"model.keras: best validation loss {saved['val_loss']:.4f} "
            f"({saved['stage']} stage, epoch {saved['epoch']})"
        )
    elif chosen.get("stage"):
        epochs = result.metrics["refit_epochs"]
        print(
            f"model.keras: refit on {result.metrics['refit_images']} training + validation "
            f"images ({epochs['head']} + {epochs['fine_tune']} epochs); chosen on validation: "
            f"loss {chosen['val_loss']:.4f}, accuracy {chosen['val_accuracy']:.4f} "
            f"({chosen['stage']} stage, epoch {chosen['epoch']})"
        )
    print(f"run saved to {result.run_dir}")
    if result.metrics.get("multi_label"):
        print(
            f"test mAP {result.metrics['map']:.4f} (constant baseline "
            f"{result.metrics['map_baseline']:.4f}), micro-F1 {result.metrics['micro_f1']:.4f} "
            f"on {result.metrics['n_test']} images"
        )
    if "accuracy" in result.metrics:
        print(
            f"test accuracy {result.metrics['accuracy']:.4f} on {result.metrics['n_test']} images"
        )
    budget = result.metrics.get("budget")
    if budget:  # headstart.budget: what the time bought
        print(
            f"time budget: {budget['seconds']:.0f} s of {budget['limit_seconds']:.0f} s, "
            f"{len(budget['candidates'])} candidate(s) beside the default model; "
            f"kept: {budget['outcome']}"
        )


def _print_predictions(predictions, output_format: str) -> tuple[int, int]:
    """Print predictions as they come (table, csv: a folder of any size streams); json collects
    them into one document. Returns (images, unreadable images)."""
    if hasattr(sys.stdout, "reconfigure"):  # file names need not be valid UTF-8
        sys.stdout.reconfigure(errors="backslashreplace")
    writer = csv.writer(sys.stdout)
    rows, total, unreadable, multi = [], 0, 0, False
    for p in predictions:
        if output_format == "csv" and not total:  # multi-label: a "predicted" column (0 or 1)
            multi = p.labels is not None
            predicted = ["predicted"] if multi else []
            writer.writerow(["path", "rank", "label", "probability", *predicted, "error"])
        total += 1
        unreadable += p.error is not None
        row = {
            "path": p.path,
            "error": p.error or "",
            "top": [{"label": label, "probability": round(prob, 6)} for label, prob in p.top],
        }
        if p.labels is not None:  # multi-label: the labels at or above their thresholds
            row["labels"] = list(p.labels)
        if output_format == "json":
            rows.append(row)
        elif output_format == "csv":
            for rank, item in enumerate(row["top"], 1):
                called = [int(item["label"] in row["labels"])] if multi else []
                writer.writerow(
                    [row["path"], rank, item["label"], item["probability"], *called, ""]
                )
            if row["error"]:
                writer.writerow([row["path"], "", "", "", *[""] * multi, row["error"]])
        else:
            text = "  ".join(f"{i['label']} {i['probability']:.3f}" for i in row["top"])
            if p.labels is not None and not p.error:
                text = f"[{', '.join(p.labels) or 'no label'}]  {text}"
            print(f"{row['path']}\t{text or 'skipped: ' + row['error']}")
    if output_format == "json":
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    return total, unreadable


def _print_backbones(rows: list[dict]) -> None:
    header = ("name", "parameters", "image size", "offline weights", "description")
    table = [header] + [
        (
            r["name"],
            f"{r['parameters']:,}",
            str(r["image_size"]),
            r["offline_weights"],
            r["description"],
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1])
    print(
        "\nhub:PRESET, hub:/path/to/preset: a keras-hub image backbone, by preset name or local "
        'preset folder (pip install "headstart[hub]"; docs/backbones.md)'
    )


def _print_cache_entries(entries: list[dict]) -> None:
    if not entries:
        print("feature cache is empty")
    for entry in entries:
        print(
            f"{entry['key']}  {entry['backbone']:<20} {entry['image_size']:>4}px  "
            f"{entry['output']:<28} {entry['view'][:30]:<30} {entry['images']:>7} images  "
            f"{entry['bytes'] / 1e6:8.1f} MB  {entry['last_used']}"
        )


if __name__ == "__main__":
    sys.exit(main())
